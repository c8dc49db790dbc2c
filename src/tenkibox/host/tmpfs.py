"""Room on the run root's tmpfs: what it holds, and whether a capture may stage more on it.

The run root (``/dev/shm/tenki-<tag>``, ``config.run_dir``) holds each VM's sockets and logs, the
guest RAM of booted VMs (a sparse file mapped ``share=on``: it fills as the guest touches its
memory) and a capture's staging copy of that RAM. tmpfs is memory: when it is full, a guest
that touches a page of RAM not yet in its file gets SIGBUS and its QEMU dies. So room for a
capture's staging is what the file system has free *less* what the running guests' RAM files
may still take (their size minus what they hold), less a margin for the small files.
(A restored VM maps its RAM image privately: its pages are not on this tmpfs.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: kept free for sockets, logs and machine notes
STAGING_MARGIN_BYTES = 64 << 20
#: a VM's guest RAM file in its run directory (``engine.machine.MachineFiles.ram``)
RAM_FILE = "ram"


@dataclass(frozen=True)
class TmpfsUse:
    """The file system of the run root (all of it: other users of /dev/shm count too)."""

    used_bytes: int
    total_bytes: int
    free_bytes: int  # what may still be written (``f_bavail``)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TmpfsUse:
        return cls(int(data["used_bytes"]), int(data["total_bytes"]), int(data["free_bytes"]))


def tmpfs_use(run_root: Path) -> TmpfsUse:
    """The use of the file system that holds ``run_root`` (or its nearest existing parent)."""
    path = run_root
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return TmpfsUse(used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize, total_bytes=total,
                    free_bytes=st.f_bavail * st.f_frsize)


def ram_growth_bytes(run_root: Path) -> int:
    """What the guest RAM files under ``run_root`` may still take: each one's size less the
    blocks it holds."""
    grow = 0
    for ram in run_root.glob(f"*/{RAM_FILE}") if run_root.exists() else []:
        try:
            st = ram.stat()
        except OSError:  # its VM stopped meanwhile
            continue
        grow += max(0, st.st_size - st.st_blocks * 512)
    return grow


def staging_room_bytes(run_root: Path) -> int:
    """How much a capture may stage on the run root's tmpfs now without taking room the
    running guests' RAM may still need (never negative)."""
    free = tmpfs_use(run_root).free_bytes
    return max(0, free - ram_growth_bytes(run_root) - STAGING_MARGIN_BYTES)


def staging_space_ok(run_root: Path, need_bytes: int) -> bool:
    """Whether ``need_bytes`` of capture staging fit on the run root's tmpfs now
    (``staging_room_bytes``). Call before staging; the answer holds only while nothing else
    grows, so a staging write can still fail (ENOSPC) and must be handled as before."""
    room = staging_room_bytes(run_root)
    if need_bytes > room:
        log.warning("tmpfs of %s: %d bytes of staging do not fit (room for %d)", run_root,
                    need_bytes, room)
        return False
    return True

"""qcow2 overlays: a VM's writable top over the frozen layers under it.

A VM's disk is a chain ``base <- layer ... <- top``. Frozen layers (the base image, the layers
earlier captures froze) are artifacts, stored by digest in the artifact store
(``artifacts.store``) and never written again; the VM's own layers (its top, and layers a capture
froze while the VM runs on) are in ``host/disks/<session>/``. What may be removed, and when, is the
artifact store's garbage collection (``LocalArtifactStore.collect``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import InternalError


def run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise InternalError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise InternalError(f"{what} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


QCOW2_MAGIC = b"QFI\xfb"


def virtual_size(image: Path) -> int:
    """The virtual size in a qcow2 header (bytes 24-31, big-endian), read without opening the
    image's backing chain."""
    try:
        with open(image, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise InternalError(f"cannot read the disk layer {image.name}: {exc}") from exc
    if len(head) < 32 or head[:4] != QCOW2_MAGIC:
        raise InternalError(f"the disk layer {image.name} is not a qcow2 image")
    return int.from_bytes(head[24:32], "big")


def create_overlay(path: Path, backing: Path) -> Path:
    """A new qcow2 over ``backing``. The backing chain is not opened (``-u``): a frozen
    layer's header still names the file it was frozen over (a path in some VM's disk
    directory, long gone); QEMU is always given the whole chain explicitly (``-blockdev``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), "-u",
         str(path), str(virtual_size(backing))], "creating the disk overlay")
    return path


def create_blank(path: Path, size: int) -> Path:
    """A new, empty qcow2 of ``size`` bytes (for a VM that never runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        "creating a blank disk")
    return path

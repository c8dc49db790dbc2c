"""qcow2 overlays: a VM's writable top over the frozen layers under it.

A VM's disk is a chain ``base <- layer ... <- top``. Frozen layers (the base image, the layers
earlier captures froze) are artifacts, stored by digest in the artifact store
(``artifacts.store``) and never written again; the VM's own layers (its top, and layers a capture
froze while the VM runs on) are in ``host/disks/<session>/``. What may be removed, and when, is the
artifact store's garbage collection (``LocalArtifactStore.collect``).
"""

from __future__ import annotations

import subprocess
import threading
from collections import OrderedDict
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


class _Overlays:
    """The bytes ``qemu-img create`` wrote for an empty overlay, by (backing file, size).

    Every restore of a snapshot puts the same empty overlay over the same frozen layer, and
    ``qemu-img`` writes the same 192 KiB for it each time (its qcow2 holds no name, time or
    random field). Starting ``qemu-img`` was ~10 ms of each restore; writing the bytes it wrote
    the first time costs well under one. Bounded: the least recently used entry goes first."""

    LIMIT = 32
    MAX_BYTES = 1 << 20  # an overlay's metadata only; anything larger is not kept

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._by_key.get(key)
            if data is not None:
                self._by_key.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        if len(data) > self.MAX_BYTES:
            return
        with self._lock:
            self._by_key[key] = data
            self._by_key.move_to_end(key)
            while len(self._by_key) > self.LIMIT:
                self._by_key.popitem(last=False)


_overlays = _Overlays()


def create_overlay(path: Path, backing: Path, *, reuse: bool = False) -> Path:
    """A new qcow2 over ``backing``. The backing chain is not opened (``-u``): a frozen
    layer's header still names the file it was frozen over (a path in some VM's disk
    directory, long gone); QEMU is always given the whole chain explicitly (``-blockdev``).
    ``reuse``: ``backing`` is a frozen layer that more overlays will be put over (boots and
    restores), so ``qemu-img``'s bytes are kept for the next one (``_Overlays``); a capture's
    overlay over a VM's own top is made once and is not kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = (str(backing), virtual_size(backing))
    data = _overlays.get(key) if reuse else None
    if data is not None:
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise InternalError(f"creating the disk overlay failed: {exc}") from exc
        return path
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", key[0], "-u",
         str(path), str(key[1])], "creating the disk overlay")
    if not reuse:
        return path
    try:
        with open(path, "rb") as f:
            data = f.read(_Overlays.MAX_BYTES + 1)
    except OSError:
        return path  # the overlay is there; only the shortcut for the next one is lost
    if data[:4] == QCOW2_MAGIC:
        _overlays.put(key, data)
    return path


def create_blank(path: Path, size: int) -> Path:
    """A new, empty qcow2 of ``size`` bytes (for a VM that never runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        "creating a blank disk")
    return path

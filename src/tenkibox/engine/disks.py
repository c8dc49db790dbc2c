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


def create_overlay(path: Path, backing: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)],
        "creating the disk overlay")
    return path

"""``LocalHost``'s part of ``tenki admin verify`` and of start-up, on real files and processes
(no VM): what it uses (images, VMs' files) for a deep check, and what repair removes of what no
one owns: never a directory that a VM, a live record or a running process still has."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.images import DIGESTS, flip_byte, write_image

from tenkibox.config import Layout
from tenkibox.host.api import InUse, MachineShape
from tenkibox.host.local import LocalHost
from tenkibox.host.vm import VMRecord


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TENKI_RUN_ROOT", str(tmp_path / "run"))
    monkeypatch.setenv("TENKI_NET", "user")  # no network is built here
    return tmp_path / "home"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def old(path: Path, seconds: float = 3600) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def vm_of(record: VMRecord) -> SimpleNamespace:
    """What the host reads of a VM here: its note (no QEMU behind it)."""
    return SimpleNamespace(record=record)


def shape() -> MachineShape:
    return MachineShape(cpu=1, memory_mb=256, kernel=DIGESTS["kernel"],
                        initrd=DIGESTS["initrd"], cmdline="")


def test_start_up_removes_every_temporary_of_the_store(home: Path) -> None:
    host = LocalHost(Layout(home), "tcg")
    records = host.store.keys.directory
    records.mkdir(parents=True, exist_ok=True)
    temps = [_file(host.store.temp_path(), b"x"), _file(records / ".0123.feedf00d.tmp", b"k")]
    host._remove_leftovers()
    assert [t for t in temps if t.exists()] == []


def test_what_the_host_uses_is_verified_in_full(home: Path) -> None:
    """The built images' stored files and every VM's files are what the host adds to a deep
    verification; bit rot (content changed, stat not) passes a boot's stat check and is found
    by it."""
    write_image(home)
    host = LocalHost(Layout(home), "tcg")
    assert host.local_artifacts() == []  # not stored yet: a boot reads them in full
    host.ctx.image_artifacts("sandbox")
    layer, ram = "1" * 64, "2" * 64
    host.vms["ses_a"] = vm_of(VMRecord(  # type: ignore[assignment]
        "ses_a", shape(), [DIGESTS["disk"], layer], frozen=[("top-0.qcow2", "3" * 64),
                                                            ("top-1.qcow2", "")], ram=ram))
    uses = host.local_artifacts()
    assert uses == [
        InUse(DIGESTS["disk"], "disk", image_id="sandbox"),
        InUse(DIGESTS["kernel"], "kernel", image_id="sandbox"),
        InUse(DIGESTS["initrd"], "initrd", image_id="sandbox"),
        InUse(DIGESTS["disk"], "disk layer 0", session_id="ses_a"),
        InUse(layer, "disk layer 1", session_id="ses_a"),
        InUse("3" * 64, "disk layer 2", session_id="ses_a"),
        InUse(DIGESTS["kernel"], "kernel", session_id="ses_a"),
        InUse(DIGESTS["initrd"], "initrd", session_id="ses_a"),
        InUse(ram, "RAM image", session_id="ses_a"),
    ]
    stored = host.store.local_path(DIGESTS["disk"])
    flip_byte(stored, 100)
    host.store.keys.remember(stored, DIGESTS["disk"])  # bit rot: the stat key did not move
    host.ctx.image_artifacts("sandbox")  # trusted on its key until the scrub reads it
    images = {u.digest: u.kind for u in uses if u.image_id}
    bad = _run(host.verify_artifacts(images, deep=True))
    assert list(bad) == [DIGESTS["disk"]] and "is corrupt" in bad[DIGESTS["disk"]]


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _run(coro: object) -> list[str] | dict[str, str]:
    import asyncio

    return asyncio.run(coro)  # type: ignore[arg-type]

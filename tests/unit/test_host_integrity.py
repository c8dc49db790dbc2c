"""``LocalHost``'s part of ``tenki admin verify`` and of start-up, on real files and processes
(no VM): what it uses (images, VMs' files) for a deep check, and what repair removes of what no
one owns: never a directory that a VM, a live record or a running process still has."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.images import DIGESTS, flip_byte, write_image

from tenkibox.config import Layout
from tenkibox.engine import net
from tenkibox.engine.machine import read_argv
from tenkibox.host import local as local_mod
from tenkibox.host import unowned
from tenkibox.host.api import InUse, MachineShape, Unowned
from tenkibox.host.local import LocalHost
from tenkibox.host.vm import PARTIAL, VMRecord


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


def test_repair_never_removes_a_directory_that_someone_still_has(
        home: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    host = LocalHost(Layout(home), "tcg")
    run, disks = host.paths.layout.run, host.paths.disks
    dirs = {}
    for name in ("ses_gone", "ses_held", "ses_live", "ses_qemu", "ses_passt"):
        for root in (run, disks):
            d = root / name
            d.mkdir(parents=True)
            (d / "vm.json").write_text("{}")
            dirs[name, root] = d
    host.vms["ses_held"] = vm_of(VMRecord("ses_held", shape(), []))  # type: ignore[assignment]
    # stand-ins for a QEMU and a passt of ours: their programs' names and tokens (a path in
    # the VM's run directory, ``vm_process_owner``); another program naming it is not ours
    procs.append(_stand_in("qemu-system-x86_64", "-qmp",
                           f"unix:{run}/ses_qemu/qmp.sock,server=on,wait=off"))
    procs.append(_stand_in("passt", "--pid", f"{run}/ses_passt/{net.PASST_PID}"))
    procs.append(_stand_in("tail", f"{run}/ses_gone/qemu.log"))
    found = host.unowned_files(set())
    assert [u for u in found if u.kind == "vm"] == [
        Unowned("vm", name) for name in ("ses_gone", "ses_live", "ses_passt", "ses_qemu")]
    removed = _run(host.remove_unowned(found, set(), {"ses_live"}))
    assert removed == [Unowned("vm", "ses_gone")]
    assert [d for d in dirs.values() if not d.exists()] == [run / "ses_gone",
                                                            disks / "ses_gone"]
    # once they are gone, the next repair removes them
    for p in procs:
        p.kill()
        p.wait()
    found = host.unowned_files(set())
    removed = _run(host.remove_unowned(found, set(), {"ses_live"}))
    assert removed == [Unowned("vm", "ses_passt"), Unowned("vm", "ses_qemu")]
    assert (run / "ses_live").exists() and (disks / "ses_held").exists()
    # the names are plain data: one that is no session's directory removes nothing
    outside = _file(home / "keep" / "file", b"x")
    assert _run(host.remove_unowned([Unowned("vm", ".."), Unowned("vm", "../keep"),
                                     Unowned("temporary", "keep/file")], set(), set())) == []
    assert outside.exists() and run.exists() and disks.exists()


def test_repair_removes_unreferenced_artifacts_and_crashed_temporaries(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = LocalHost(Layout(home), "tcg")
    store = host.store
    kept = store.put(_file(tmp_path / "kept", b"kept"))
    unused = store.put(_file(tmp_path / "unused", b"unused"))
    crashed_put = old(_file(store.temp_path(), b"half"))
    writing_put = _file(store.temp_path(), b"under way")
    records = store.keys.directory
    crashed_key = old(_file(records / ".0123.0badc0de.tmp", b"k d"))
    writing_key = _file(records / ".0123.feedf00d.tmp", b"k d")
    monkeypatch.setattr(local_mod, "GC_GRACE_S", 0.0)  # both stored just now
    monkeypatch.setattr(unowned, "GC_GRACE_S", 0.0)
    def temporary(path: Path) -> Unowned:  # named by its path in the data directory
        return Unowned("temporary", str(path.relative_to(home)))

    found = host.unowned_files({kept})
    assert Unowned("artifact", unused) in found and Unowned("artifact", kept) not in found
    assert {temporary(p) for p in (crashed_put, writing_put, crashed_key, writing_key)} <= set(
        found)
    # an artifact referenced meanwhile is asked about again, and kept
    removed = _run(host.remove_unowned([*found, Unowned("artifact", kept)], {kept}, set()))
    assert sorted(removed, key=str) == sorted(
        [Unowned("artifact", unused), temporary(crashed_put), temporary(crashed_key)], key=str)
    assert store.has(kept) and not store.has(unused)
    assert writing_put.exists() and writing_key.exists()
    # within the GC's grace (a capture's put just before its record names it): kept too
    again = store.put(_file(tmp_path / "again", b"again"))
    monkeypatch.setattr(unowned, "GC_GRACE_S", 3600.0)
    assert _run(host.remove_unowned([Unowned("artifact", again)], set(), set())) == []
    assert store.has(again)


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


def test_the_images_stored_are_never_asked_on_the_event_loop(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bucket, asking whether a file is stored is a request: ``local_artifacts``, part
    of every status a host answers, asks in a thread and answers from what it knows, so a slow
    bucket never holds the loop (and a worker's heartbeats). A local store is asked at once."""
    write_image(home)
    host = LocalHost(Layout(home), "tcg")
    host.ctx.image_artifacts("sandbox")  # stored

    async def at_once() -> list[InUse]:
        return host.local_artifacts()

    assert {u.kind for u in asyncio.run(at_once())} == {"disk", "kernel", "initrd"}
    host = LocalHost(Layout(home), "tcg")
    monkeypatch.setattr(host.store, "remote", True)  # its questions as a bucket's
    asked_on: list[threading.Thread] = []
    has = host.store.has

    def slow_has(digest: str) -> bool:
        asked_on.append(threading.current_thread())
        time.sleep(0.2)
        return has(digest)

    monkeypatch.setattr(host.store, "has", slow_has)

    async def go() -> list[InUse]:
        loop_thread = threading.current_thread()
        assert host.local_artifacts() == []  # not known yet: asked in a thread
        uses: list[InUse] = []
        for _ in range(200):
            uses = host.local_artifacts()
            if len(uses) == 3:
                break
            await asyncio.sleep(0.05)
        assert asked_on and loop_thread not in asked_on
        n = len(asked_on)
        again = host.local_artifacts()  # known now: not asked again
        assert again == uses and len(asked_on) == n
        await host.shutdown()
        return uses

    uses = asyncio.run(go())
    assert {u.kind for u in uses} == {"disk", "kernel", "initrd"}


def _stand_in(program: str, *args: str) -> subprocess.Popen[bytes]:
    """``sh`` blocked in ``read``, started under ``program``'s name with ``args``."""
    p = subprocess.Popen([program, "-c", "read x", *args], executable="/bin/sh",
                         stdin=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 5
    while not read_argv(p.pid) and time.monotonic() < deadline:  # empty just after the exec
        time.sleep(0.005)
    return p


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _run(coro: object) -> Any:
    import asyncio

    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_save_of_the_vm_note_cut_short_leaves_nothing_after_recovery(tmp_path: Path) -> None:
    """Recovery (``LocalHost._attach``) loads the note as last saved whole and drops the
    temporary file of a save a kill cut short (it failed a kill -9 case at ``convert``)."""
    (tmp_path / PARTIAL).write_text('{"session_id": "ses_half')
    VMRecord.drop_partial(tmp_path)
    assert not (tmp_path / PARTIAL).exists()
    VMRecord.drop_partial(tmp_path)  # nothing to drop: fine


def test_the_vm_note_keeps_what_ram_its_vm_was_launched_with(tmp_path: Path) -> None:
    """A server started again attaches with the note's RAM backend: a booted VM whose RAM is a
    memfd must not be taken for one with anonymous RAM (it would be saved live, which reads,
    and so allocates, every page of the memfd). Notes written before the field: anonymous."""
    VMRecord("ses_m", shape(), [], ram_shared=True).save(tmp_path)
    assert VMRecord.load(tmp_path).ram_shared is True
    data = VMRecord("ses_a", shape(), []).to_json()
    del data["ram_shared"]
    assert VMRecord.from_json(data).ram_shared is False

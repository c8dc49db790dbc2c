"""Damaged storage: nothing corrupt may reach a guest, nothing corrupt may be sealed.

- Every stored file a snapshot's restore depends on, damaged (one byte flipped), with its mtime
  moved and with its old mtime put back (``os.utime``, simulating bit rot): the restore is
  refused with SnapshotFailed naming the file, in one line from the CLI, and no QEMU starts.
- The derived RAM cache, damaged with its mtime kept: the next clone's memory is intact.
- A frozen layer under a running restored session, damaged: a new snapshot of that session is
  not READY over it.

The files are found without knowing the layout: what entered the data directory while the
source booted (base image, kernel, initrd, as the source is the first session of the home) and
while each snapshot was taken (RAM image, device state, frozen layer), by ctime; a file's role
is its first bytes (or, for the boot files, its name). The image is copied into this module's
home, not hard-linked, so that damage stays here.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faultlib as fl
import pytest

from tenkibox import errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(faulty_server: Any) -> fl.FaultServer:
    return faulty_server(copy_images=True)


@dataclass
class Source:
    session: Any
    boot_files: list[Path]  # stored while it booted: base image, kernel, initrd (+ records)
    shm_md5: str


@pytest.fixture(scope="module")
def source(server: fl.FaultServer, client: Any) -> Source:
    assert not fl.list_sessions(server), "the source must be the first session of its home"
    s = fl.new_source(client, "corrupt-source", shm_mib=16)
    rec = fl.get_session(server, s.id)
    boot = fl.stored_files(server, fl.parse_time(rec["created_at"]) - 1,
                           fl.parse_time(rec["ready_at"]) + 1)
    assert [p for p in boot if not fl.derived(p)], "no stored file appeared during the boot"
    return Source(s, boot, fl.sh(s, "cat /root/shm.md5").split()[0])


def fresh_snapshot(server: fl.FaultServer, client: Any, source: Source,
                   name: str) -> tuple[str, list[Path]]:
    """A new READY snapshot of the source and the files stored while it was taken. Files that
    were already there are left out: the ctime window alone also catches an earlier snapshot's
    file whose byte a previous case put back just before this capture began."""
    before = set(fl.stored_files(server, 0, float("inf")))
    snap = client.create_snapshot_and_wait(source.session.id, name, timeout=300)
    rec = fl.get_snapshot(server, snap.id)
    assert rec is not None and rec["ready_at"]
    new = fl.stored_files(server, fl.parse_time(rec["created_at"]) - 0.5,
                          fl.parse_time(rec["ready_at"]) + 0.5)
    new = [p for p in new if p not in source.boot_files and p not in before]
    assert [p for p in new if not fl.derived(p)], f"no stored file appeared for {snap.id}"
    return snap.id, new


def signature(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(4).hex()


def data_roles(source: Source, new: list[Path]) -> list[tuple[str, str]]:
    roles = [("boot", p.name) for p in source.boot_files if not fl.derived(p)]
    sigs = sorted({signature(p) for p in new if not fl.derived(p)})
    return roles + [("new", s) for s in sigs]


def resolve(role: tuple[str, str], source: Source, new: list[Path]) -> list[Path]:
    kind, key = role
    if kind == "boot":
        return [p for p in source.boot_files if p.name == key]
    if kind == "new":
        return [p for p in new if not fl.derived(p) and signature(p) == key]
    return [p for p in [*source.boot_files, *new] if fl.derived(p)]


def label(role: tuple[str, str], files: list[Path]) -> str:
    kind, key = role
    if kind == "derived":
        return f"derived records ({len(files)} files)"
    what = {"54454e4b": "RAM image", "5145564d": "device state", "28b52ffd": "device state",
            "514649fb": "qcow2 layer"}
    return f"{kind} file {what.get(key, key)} {files[0].name[:16] if files else '?'}"


@dataclass
class Attempt:
    error: Exception | None
    session_id: str | None
    cli: Any
    launched: list[fl.VmProc]


def attempt_restore(server: fl.FaultServer, client: Any, snapshot_id: str) -> Attempt:
    before = {p.pid for p in fl.vm_processes(server)}
    err: Exception | None = None
    sid = None
    with fl.ProcWatch(server) as watch:
        try:
            sid = client.create_and_wait(snapshot_id=snapshot_id, timeout=120).id
        except errors.TenkiError as exc:
            err = exc
        cli = server.cli("sandbox", "snapshot", "restore", snapshot_id, "--json")
    launched = watch.new_since(before)
    return Attempt(err, sid, cli, launched)


def tidy_attempt(server: fl.FaultServer, a: Attempt) -> list[str]:
    """Terminate whatever the attempt started; returns the ids."""
    import json

    ids = [a.session_id] if a.session_id else []
    if a.cli.returncode == 0:
        ids.append(json.loads(a.cli.stdout)["id"])
    with server.http() as api:
        for sid in ids:
            api.delete(f"/v1/sessions/{sid}")
    return ids


def data_intact(server: fl.FaultServer, session_id: str, shm_md5: str) -> None:
    with server.client() as c:
        s = c.get(session_id)
        assert s.files.read_text(fl.MARKER_PATH) == fl.MARKER
        got = fl.sh(s, f"md5sum {fl.SHM_PATH}").split()[0]
        assert got == shm_md5, "the restored guest's memory (/dev/shm) differs from the capture"


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-moved", "mtime-restored"])
def test_damaged_stored_file_refuses_the_restore(server: fl.FaultServer, client: Any,
                                                 source: Source, keep_mtime: bool,
                                                 subtests: Any) -> None:
    home = Path(server.home)
    probe, new = fresh_snapshot(server, client, source, "probe")
    roles = [*data_roles(source, new), ("derived", "")]
    assert len(roles) >= 4, roles
    for i, role in enumerate(roles):
        snap_id, new = (probe, new) if i == 0 else fresh_snapshot(server, client, source,
                                                                    f"damage-{i}")
        targets = resolve(role, source, new)
        with subtests.test(msg=label(role, targets)):
            assert targets, f"no file for {role} in snapshot {snap_id}"
            flipped = [(p, *fl.flip_byte(p, keep_mtime=keep_mtime)) for p in targets]
            try:
                a = attempt_restore(server, client, snap_id)
            finally:
                for p, off, old in flipped:
                    fl.put_byte(p, off, old, keep_mtime=keep_mtime)
            try:
                if role[0] == "derived":
                    # damage to a derived record may be refused or repaired, never harmful
                    assert not a.launched or a.session_id, \
                        f"a QEMU started but the restore failed: {a.error}"
                    if a.session_id:
                        data_intact(server, a.session_id, source.shm_md5)
                    continue
                target = targets[0]
                assert not a.launched, (f"a guest ran on a damaged {target.name}: "
                                        f"{[p.line() for p in a.launched]}")
                assert a.error is not None, f"restore of {snap_id} with {target} damaged succeeded"
                assert fl.names_file(str(a.error), target, home), \
                    f"the error does not name {target.name}: {a.error}"
                err = a.cli.stderr.decode(errors="replace")
                lines = err.strip().splitlines()
                assert a.cli.returncode != 0 and len(lines) == 1 and \
                    lines[0].startswith("error: ") and "Traceback" not in err, \
                    f"CLI restore: exit {a.cli.returncode}, stderr {err!r}"
                assert fl.names_file(lines[0], target, home), \
                    f"the CLI's error does not name {target.name}: {lines[0]}"
                assert isinstance(a.error, errors.SnapshotFailedError), \
                    f"refused with {type(a.error).__name__}, not SnapshotFailedError: {a.error}"
            finally:
                tidy_attempt(server, a)
                with server.http() as api:
                    api.delete(f"/v1/snapshots/{snap_id}")
    fl.assert_settled(server)


def _backing_file(pid: int, roots: list[Path]) -> Path:
    """The largest regular file under ``roots`` that QEMU ``pid`` maps: its RAM."""
    best: tuple[int, str] | None = None
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith("(deleted)"):
            continue
        path = parts[5]
        if not any(path.startswith(str(r) + "/") for r in roots):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if best is None or hi - lo > best[0]:
            best = (hi - lo, path)
    assert best is not None, f"QEMU {pid} maps no file of this server"
    return Path(best[1])


def _pages_of(blob: bytes, cache: Path, limit: int = 64) -> list[int]:
    """Offsets in ``cache`` of 4 KiB pages whose content is a page of ``blob``."""
    wanted = {hashlib.sha1(blob[i:i + 4096]).digest() for i in range(0, len(blob), 4096)}
    found: list[int] = []
    with open(cache, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size and len(found) < limit:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end and len(found) < limit:
                chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                for i in range(0, len(chunk) - 4095, 4096):
                    if hashlib.sha1(chunk[i:i + 4096]).digest() in wanted:
                        found.append(pos + i)
                pos += len(chunk)
    return found


def test_damaged_ram_cache_is_verified_or_rebuilt(server: fl.FaultServer, client: Any,
                                                  source: Source) -> None:
    snap_id, _ = fresh_snapshot(server, client, source, "cache")
    first = client.create_and_wait(snapshot_id=snap_id, timeout=120)
    try:
        data_intact(server, first.id, source.shm_md5)
        pids = fl.qemu_pids(server, first.id)
        assert len(pids) == 1
        cache = _backing_file(pids[0], [Path(server.home), Path(server.run_root)])
    finally:
        first.terminate()
    blob = source.session.files.read(fl.SHM_PATH)
    assert hashlib.md5(blob).hexdigest() == source.shm_md5
    offsets = _pages_of(blob, cache)
    assert offsets, f"the guest's /dev/shm pages are not in {cache}: is it still the RAM?"
    st = cache.stat()
    with open(cache, "r+b") as f:
        for off in offsets:
            f.seek(off + 100)
            b = f.read(1)[0]
            f.seek(off + 100)
            f.write(bytes([b ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = client.create_and_wait(snapshot_id=snap_id, timeout=120)
    try:
        data_intact(server, second.id, source.shm_md5)
    finally:
        second.terminate()
        client.delete_snapshot(snap_id)
    fl.assert_settled(server)


def _read_only_files(pid: int, root: Path) -> list[Path]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0],
                        8)
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith(str(root) + "/") and flags & 3 == os.O_RDONLY \
                and Path(target).is_file():
            out.append(Path(target))
    return out


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-moved", "mtime-restored"])
def test_damaged_layer_under_a_running_session_is_not_sealed(server: fl.FaultServer,
                                                             client: Any, source: Source,
                                                             keep_mtime: bool) -> None:
    snap_id, _ = fresh_snapshot(server, client, source, "lower")
    restored = client.create_and_wait(snapshot_id=snap_id, timeout=120)
    made: list[str] = []
    try:
        restored.files.write("/root/after-restore.txt", "x")
        pids = fl.qemu_pids(server, restored.id)
        assert len(pids) == 1
        lower = [p for p in _read_only_files(pids[0], Path(server.home))
                 if signature(p) == "514649fb" and p.name not in
                 {b.name for b in source.boot_files}]
        assert lower, "the restored QEMU has no frozen layer open (other than the base image)"
        layer = max(lower, key=lambda p: p.stat().st_ctime)  # the snapshot's own layer
        off, old = fl.flip_byte(layer, keep_mtime=keep_mtime)
        try:
            snap = client.create_snapshot(restored.id, "over-damage")
            made.append(snap.id)
            with pytest.raises(errors.SnapshotFailedError) as failed:
                got = client.wait_snapshot_ready(snap.id, timeout=300)
                pytest.fail(f"snapshot {got.id} became {got.state.value} over a damaged layer "
                            f"({layer.name})")
        finally:
            fl.put_byte(layer, off, old, keep_mtime=keep_mtime)
        assert fl.names_file(str(failed.value), layer, Path(server.home)), \
            f"the failure does not name the damaged layer {layer.name}: {failed.value}"
        assert fl.get_session(server, restored.id)["state"] in fl.LIVE
        assert restored.files.read_text("/root/after-restore.txt") == "x"
    finally:
        restored.terminate()
        with server.http() as api:
            for sid in [snap_id, *made]:
                api.delete(f"/v1/snapshots/{sid}")
        time.sleep(0.5)
    fl.assert_settled(server)

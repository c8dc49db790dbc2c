"""Recovery after a crash at each step: a new control plane on a database a dead server left,
over a host that still has (or no longer has) the VMs. Every record must end in a steady state,
with the right reason.

Two ways to get there: records written directly in every in-between state (a store as any crash
could leave it), and real operations cut short by ``InProcessServer.crash()`` while the fake
host holds them, then a new server on the same data directory.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from support.fake_host import FakeHost, image_digest
from support.helpers import (
    build_row,
    fake_manifest,
    seed,
    session_row,
    snapshot_row,
    volume_row,
)
from support.server import InProcessServer, open_test_store

from tenkibox import Client, errors, steps
from tenkibox.control.plane import ControlPlane
from tenkibox.host.api import VolumeMountSpec
from tenkibox.store.db import Store
from tenkibox.store.tables import BuildRow, SessionRow, SnapshotRow, VolumeRow

STEADY = {"session": {"READY", "TERMINATED", "FAILED"},
          "snapshot": {"READY", "FAILED", "DELETED"},
          "volume": {"AVAILABLE", "IN_USE", "DELETED"}}
LOST = "VM not found after server restart (no VM on the fake host)"

MakeServer = Callable[..., InProcessServer]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = open_test_store(tmp_path / "home")
    yield s
    s.close()


async def recovered(store: Store, host: FakeHost) -> ControlPlane:
    plane = ControlPlane(store, host)
    await plane.start()
    await plane.stop()
    return plane


def assert_all_steady(plane: ControlPlane) -> None:
    states = {"session": [(r.id, r.state) for r in plane.records.all(SessionRow)],
              "snapshot": [(r.id, r.state) for r in plane.records.all(SnapshotRow)],
              "volume": [(r.id, r.state) for r in plane.records.all(VolumeRow)]}
    for kind, found in states.items():
        for record_id, state in found:
            assert state in STEADY[kind], (kind, record_id, state)


async def test_sessions(store: Store) -> None:
    host = FakeHost()
    creating = session_row("CREATING")
    creating_vm = session_row("CREATING")  # its boot had launched the VM
    terminating = session_row("TERMINATING", state_reason="max duration reached")
    terminating_vm = session_row("TERMINATING")
    ready = session_row("READY")
    ready_lost = session_row("READY")
    running = session_row("RUNNING")
    running_lost = session_row("RUNNING")
    done = session_row("TERMINATED", state_reason=None)
    failed = session_row("FAILED", state_reason="boom")
    for srow in (creating, creating_vm, terminating, terminating_vm, ready, ready_lost, running,
                 running_lost, done, failed):
        seed(store, srow)
    for srow in (creating_vm, terminating_vm, ready, running):
        host.seed_vm(srow.id)
    host.strays = 1  # a process of ours no session owns

    plane = await recovered(store, host)

    def row(r: SessionRow) -> SessionRow:
        return plane.records.get(SessionRow, r.id)

    for srow in (creating, creating_vm):
        assert (row(srow).state, row(srow).state_reason) == (
            "FAILED", "the server stopped before the session was ready")
        assert row(srow).terminated_at is not None
    assert (row(terminating).state, row(terminating).state_reason) == (
        "TERMINATED", "max duration reached")
    assert row(terminating_vm).state == "TERMINATED"
    assert (row(ready).state, row(running).state) == ("READY", "READY")
    for srow in (ready_lost, running_lost):
        assert (row(srow).state, row(srow).state_reason) == ("TERMINATED", LOST)
    assert (row(done).state, row(failed).state, row(failed).state_reason) == (
        "TERMINATED", "FAILED", "boom")
    # the host: asked to find the live ones, left with exactly the VMs of READY sessions
    assert host.calls_to("recover") == [",".join(sorted(
        x.id for x in (ready, ready_lost, running, running_lost)))]
    assert set(host.vms) == {ready.id, running.id}
    assert set(host.calls_to("terminate")) >= {terminating.id, terminating_vm.id}
    assert_all_steady(plane)


async def test_snapshots_and_their_artifacts(store: Store) -> None:
    host = FakeHost()
    kept = fake_manifest("kept")
    dropped = fake_manifest("dropped")
    for m in (kept, dropped):
        for d in m.digests():
            host.artifacts[d] = 0.0  # stored long ago
    stray = "f" * 64
    host.artifacts[stray] = 0.0
    creating = snapshot_row("CREATING")
    deleting = snapshot_row("DELETING", manifest=dropped)
    ready = snapshot_row("READY", manifest=kept)
    failed = snapshot_row("FAILED", state_reason="capture failed: boom")
    for prow in (creating, deleting, ready, failed):
        seed(store, prow)

    plane = await recovered(store, host)

    def row(r: SnapshotRow) -> SnapshotRow:
        return plane.records.get(SnapshotRow, r.id)

    assert (row(creating).state, row(creating).state_reason) == (
        "FAILED", "the server stopped during the capture")
    assert row(deleting).state == "DELETED" and row(deleting).deleted_at is not None
    assert (row(ready).state, row(failed).state) == ("READY", "FAILED")
    # nothing in flight at a start: whatever no record references goes at once
    assert set(kept.digests()) <= set(host.artifacts)
    assert stray not in host.artifacts
    assert not (set(dropped.digests()) - set(kept.digests())) & set(host.artifacts)
    assert image_digest("sandbox") in host.artifacts  # shared with the kept snapshot
    assert_all_steady(plane)


async def test_volumes(store: Store) -> None:
    host = FakeHost()
    ended = session_row("TERMINATED")
    live = session_row("READY")
    lost = session_row("READY")
    for srow in (ended, live, lost):
        seed(store, srow)
    host.seed_vm(live.id)
    deleting = volume_row("DELETING")
    of_ended = volume_row("IN_USE", ended.id, "/data")
    of_live = volume_row("IN_USE", live.id, "/data")
    of_lost = volume_row("IN_USE", lost.id, "/data")
    of_nobody = volume_row("IN_USE", "ses_never_existed", "/data")
    free = volume_row("AVAILABLE")
    rows = (deleting, of_ended, of_live, of_lost, of_nobody, free)
    for vrow in rows:
        seed(store, vrow)
        host.volumes[vrow.id] = vrow.size_bytes
    host.volumes["vol_unowned"] = 1 << 20  # a file no record owns

    plane = await recovered(store, host)

    def row(r: VolumeRow) -> VolumeRow:
        return plane.records.get(VolumeRow, r.id)

    assert row(deleting).state == "DELETED" and deleting.id not in host.volumes
    for vrow in (of_ended, of_lost, of_nobody):
        assert (row(vrow).state, row(vrow).session_id, row(vrow).path) == (
            "AVAILABLE", None, None)
    assert (row(of_live).state, row(of_live).session_id) == ("IN_USE", live.id)
    assert host.vm(live.id).mounts == {"/data": VolumeMountSpec(of_live.id, "/data", False)}
    assert row(free).state == "AVAILABLE"
    assert set(host.volumes) == {x.id for x in rows} - {deleting.id}  # unowned file removed
    assert_all_steady(plane)


async def test_template_builds(store: Store) -> None:
    """A build the server was running when it stopped is FAILED at the step "server", and its
    build session goes; a finished build stays as it is."""
    host = FakeHost()
    booting = session_row("CREATING", workspace_id="ws_default")  # its VM was starting
    setting_up = session_row("RUNNING", workspace_id="ws_default")  # its setup script ran
    seed(store, booting, setting_up)
    host.seed_vm(setting_up.id)
    pending = build_row("PENDING", template_id="tpl_a")
    building = build_row("BUILDING", template_id="tpl_b", session_id=setting_up.id)
    building_boot = build_row("BUILDING", template_id="tpl_c", session_id=booting.id)
    ready = build_row("READY", template_id="tpl_d", snapshot_id="snp_golden")
    failed = build_row("FAILED", template_id="tpl_e", failed_step="setup", error="setup: 1")
    seed(store, pending, building, building_boot, ready, failed)

    plane = await recovered(store, host)

    def row(r: BuildRow) -> BuildRow:
        return plane.records.get(BuildRow, r.id)

    for b in (pending, building, building_boot):
        assert (row(b).state, row(b).failed_step, row(b).error) == (
            "FAILED", "server", "server: the server stopped during the build")
        assert row(b).completed_at is not None
    assert (row(ready).state, row(ready).snapshot_id) == ("READY", "snp_golden")
    assert (row(failed).state, row(failed).error) == ("FAILED", "setup: 1")
    # the build sessions: the one that ran is terminated (its VM stopped), the booting one
    # failed with the server
    srow = plane.records.get(SessionRow, setting_up.id)
    assert (srow.state, srow.state_reason) == ("TERMINATED", "its template build ended")
    assert plane.records.get(SessionRow, booting.id).state == "FAILED"
    assert not host.vms
    assert_all_steady(plane)


async def test_recovery_is_idempotent(store: Store) -> None:
    host = FakeHost()
    seed(store, session_row("CREATING"))
    seed(store, snapshot_row("CREATING"))
    seed(store, volume_row("DELETING"))
    first = await recovered(store, host)
    before = {(r.id, r.state, r.state_reason) for r in first.records.all(SessionRow)}
    second = await recovered(store, host)
    assert {(r.id, r.state, r.state_reason) for r in second.records.all(SessionRow)} == before
    assert_all_steady(second)


async def test_a_vm_whose_session_is_over_is_stopped(store: Store) -> None:
    """Between restarts too (the sweeper, every GC period): the host runs no VM of a session
    that ended, whatever write or host call failed half-way to leave it."""
    host = FakeHost()
    ended, failed = session_row("TERMINATED"), session_row("FAILED", state_reason="boom")
    creating, ready = session_row("CREATING"), session_row("READY")
    terminating = session_row("TERMINATING")  # its terminate is under way: not this one's
    seed(store, ended, failed, creating, ready, terminating)
    for srow in (ended, failed, creating, ready, terminating):
        host.seed_vm(srow.id)
    host.seed_vm("ses_norecord0000000")
    plane = ControlPlane(store, host)  # not started: recovery would stop them first
    host.fail_next("terminate", errors.InternalError("qmp: no answer"))  # the first one tried

    first = await plane.sessions.stop_unowned_vms()
    second = await plane.sessions.stop_unowned_vms()

    unowned = sorted([ended.id, failed.id, "ses_norecord0000000"])
    assert sorted(first + second) == unowned and len(first) == 2 and second == [unowned[0]]
    assert set(host.vms) == {creating.id, ready.id, terminating.id}
    assert plane.records.get(SessionRow, failed.id).state_reason == "boom"  # records untouched


# -- real operations cut short ------------------------------------------------------------------


def restart(make_inproc: MakeServer, crashed: InProcessServer) -> InProcessServer:
    """A crash, then a new server on the same data directory and host (gates opened)."""
    crashed.crash()
    crashed.host.release_all()
    return make_inproc(home=crashed.home, host=crashed.host)


def in_background(fn: Callable[[], object]) -> threading.Thread:
    """``fn()`` in a thread, its errors ignored (the server dies under it)."""

    def run() -> None:
        try:
            fn()
        except errors.TenkiError:
            pass

    t = threading.Thread(target=run)
    t.start()
    return t


def test_crash_during_boot(make_inproc: MakeServer) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        vol = c.create_volume("v", "1MiB")
        gate = host.block("boot")
        sid = c.create(volumes=[f"{vol.id}:/data"]).id
    gate.wait_entered()
    server = restart(make_inproc, server)
    with Client(endpoint=server.url) as c:
        record = c.get(sid).record
        assert (record.state, record.state_reason) == (
            "FAILED", "the server stopped before the session was ready")
        assert c.get_volume(vol.id).state == "AVAILABLE"
        assert not host.vms


def test_crash_during_attach_at_create(make_inproc: MakeServer) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        vol = c.create_volume("v", "1MiB")
        gate = host.block("attach_volume")
        sid = c.create(volumes=[f"{vol.id}:/data"]).id
    gate.wait_entered()  # the VM runs, the volume is reserved (IN_USE), not yet plugged
    server = restart(make_inproc, server)
    with Client(endpoint=server.url) as c:
        assert c.get(sid).state == "FAILED"
        assert c.get_volume(vol.id).state == "AVAILABLE"
        assert sid not in host.vms  # the VM no record runs is stopped


def test_crash_during_restore(make_inproc: MakeServer) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        src = c.create_and_wait()
        snap = src.snapshot("x")
        gate = host.block("restore")
        sid = c.create(snapshot_id=snap.id).id
    gate.wait_entered()  # the record is CREATING, naming the snapshot's digests
    server = restart(make_inproc, server)
    with Client(endpoint=server.url) as c:
        record = c.get(sid).record
        assert (record.state, record.state_reason) == (
            "FAILED", "the server stopped before the session was ready")
        assert sid not in host.vms
        # the snapshot is not to blame (READY, its artifacts kept by the restart's GC) and its
        # source session ran on
        assert c.get_snapshot(snap.id).state == "READY"
        assert c.get(src.id).state == "READY"
        again = c.create_and_wait(snapshot_id=snap.id)
        assert again.state == "READY" and host.restores[-1].session_id == again.id


def test_crash_during_capture(make_inproc: MakeServer) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        s = c.create_and_wait()
        gate = host.block("capture")
        snap = c.create_snapshot(s.id, "x")
    gate.wait_entered()
    server = restart(make_inproc, server)
    with Client(endpoint=server.url) as c:
        failed = c.get_snapshot(snap.id)
        assert (failed.state, failed.state_reason) == (
            "FAILED", "the server stopped during the capture")
        assert c.get(s.id).state == "READY"  # its VM outlived the server
        assert c.get(s.id).exec("echo", "still here").stdout == "still here\n"


def test_crash_during_terminate(make_inproc: MakeServer) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        s = c.create_and_wait()
    gate = host.block("terminate")
    t = in_background(lambda: Client(endpoint=server.url).terminate(s.id))
    gate.wait_entered()
    server = restart(make_inproc, server)
    t.join(20)
    with Client(endpoint=server.url) as c:
        assert c.get(s.id).state == "TERMINATED"
        assert not host.vms


def test_crash_during_snapshot_delete(make_inproc: MakeServer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        s = c.create_and_wait()
        snap = s.snapshot("x")
        # the deletion job dies right after DELETING is written: at the fault point where the
        # fault suite kills the server ("delete.mark"), this job alone is cancelled
        def fault_point(plan: str, step: str, when: str = "") -> None:
            if (plan, step, when) == ("delete", "mark", ""):
                raise asyncio.CancelledError

        monkeypatch.setattr(steps, "fault_point", fault_point)
        assert c.delete_snapshot(snap.id).state == "DELETING"
        assert c.get_snapshot(snap.id).state == "DELETING"
    monkeypatch.undo()
    server = restart(make_inproc, server)
    with Client(endpoint=server.url) as c:
        assert c.get_snapshot(snap.id).state == "DELETED"


def test_crash_during_volume_delete(make_inproc: MakeServer) -> None:
    host = FakeHost()
    server = make_inproc(host=host)
    with Client(endpoint=server.url) as c:
        vol = c.create_volume("v", "1MiB")
    gate = host.block("delete_volume")
    t = in_background(lambda: Client(endpoint=server.url).delete_volume(vol.id))
    gate.wait_entered()
    server = restart(make_inproc, server)
    t.join(20)
    with Client(endpoint=server.url) as c:
        assert c.get_volume(vol.id).state == "DELETED"
        assert vol.id not in host.volumes

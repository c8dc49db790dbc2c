"""Pause and resume of a session through the REST API (the SDK over HTTP) and the control
plane's Python API, with the real app, control plane and SQLite over the fake host:

    READY/RUNNING ──pause──> PAUSING ──captured, VM stopped──> PAUSED
                               └──capture failed──> READY/RUNNING (reason kept)
    PAUSED ──resume (quotas checked again)──> RESUMING ──restored──> READY
                                                  └──failed──> FAILED
    PAUSING/PAUSED/RESUMING ──terminate──> TERMINATED (the PAUSE snapshot released)

Races are held with the fake host's gates, never with sleeps.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.fake_host import FakeHost
from support.helpers import (
    eventually,
    eventually_async,
    fake_manifest,
    now,
    seed,
    session_row,
    snapshot_row,
    volume_row,
)
from support.server import InProcessServer, open_test_store

from tenkibox import Client, errors
from tenkibox.control.plane import ControlPlane
from tenkibox.models import SessionState, SnapshotState, SnapshotType
from tenkibox.store.tables import SessionRow, SnapshotRow, WorkspaceRow

S = SessionState


def ready_session(client: Client) -> str:
    s = client.create_and_wait(timeout=5)
    s.files.write("/tmp/note", b"kept across the pause")
    return s.id


def pause_snapshots(client: Client, session_id: str) -> list[str]:
    return [s.id for s in client.list_snapshots(session_id) if s.type == SnapshotType.PAUSE]


def snapshot_state(inproc: InProcessServer, snapshot_id: str) -> str:
    row = inproc.store.get_snapshot(snapshot_id)
    assert row is not None
    return row.state


# -- the happy path -------------------------------------------------------------------------------


def test_pause_then_resume(client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    sid = ready_session(client)
    paused = client.pause(sid)
    assert paused.state == S.PAUSED and paused.record.state_reason is None
    assert not fake_host.has_vm(sid)  # its memory went back to the host
    assert fake_host.calls_to("capture") == [sid]
    assert fake_host.calls_to("terminate") == [sid]
    snaps = client.list_snapshots(sid)
    assert [(s.type, s.state) for s in snaps] == [(SnapshotType.PAUSE, SnapshotState.READY)]
    snap_id = snaps[0].id

    resumed = client.resume(sid)
    assert resumed.id == sid and resumed.state == S.READY
    spec = fake_host.restores[-1]
    assert (spec.session_id, spec.snapshot_id, spec.keep_identity) == (sid, snap_id, True)
    assert resumed.files.read("/tmp/note") == b"kept across the pause"
    assert resumed.exec("echo", "hi").stdout == "hi\n"
    # released once resumed
    eventually(lambda: snapshot_state(inproc, snap_id) == "DELETED", what="the release")
    assert pause_snapshots(client, sid) == []
    assert client.get(sid).record.terminated_at is None


def test_the_guest_stays_paused_once_captured(client: Client, fake_host: FakeHost) -> None:
    sid = ready_session(client)
    gate = fake_host.block("terminate")
    client.pause(sid, wait=False)
    gate.wait_entered()
    assert fake_host.vm(sid).frozen  # nothing it did after the captured instant is lost
    gate.release()
    assert client.get(sid).refresh().state in (S.PAUSING, S.PAUSED)
    client.sessions.pause(sid)  # joins: the namespace spelling
    assert client.get(sid).state == S.PAUSED


def test_pause_and_resume_are_idempotent(client: Client, fake_host: FakeHost) -> None:
    sid = ready_session(client)
    s = client.get(sid)
    assert s.resume().state == S.READY  # already running: answered as it is
    assert s.pause().state == S.PAUSED
    assert s.pause().state == S.PAUSED  # already paused
    assert fake_host.calls_to("capture") == [sid]
    assert s.resume().state == S.READY
    assert s.resume().state == S.READY
    assert fake_host.calls_to("restore") == [sid]


def test_pausing_and_resuming_are_visible(client: Client, fake_host: FakeHost) -> None:
    sid = ready_session(client)
    gate = fake_host.block("capture")
    assert client.pause(sid, wait=False).state == S.PAUSING
    gate.wait_entered()
    assert client.get(sid).state == S.PAUSING
    # a second pause joins the first (no second capture)
    assert client.pause(sid, wait=False).state == S.PAUSING
    # no exec, no files meanwhile
    with pytest.raises(errors.ConflictError, match="paused"):
        client.get(sid).exec("true")
    # a resume of a session being paused is refused
    with pytest.raises(errors.ConflictError, match="PAUSING"):
        client.resume(sid, wait=False)
    gate.release()
    assert client.pause(sid).state == S.PAUSED
    assert fake_host.calls_to("capture") == [sid]

    gate = fake_host.block("restore")
    assert client.resume(sid, wait=False).state == S.RESUMING
    gate.wait_entered()
    assert client.get(sid).state == S.RESUMING
    assert client.resume(sid, wait=False).state == S.RESUMING
    gate.release()
    assert client.resume(sid).state == S.READY
    assert fake_host.calls_to("restore") == [sid]


def test_exec_and_files_on_a_paused_session_are_refused(client: Client) -> None:
    sid = ready_session(client)
    s = client.pause(sid)
    for call in (lambda: s.exec("true"), lambda: s.files.read("/tmp/note"),
                 lambda: s.files.write("/tmp/x", b"1")):
        with pytest.raises(errors.ConflictError, match="paused") as info:
            call()
        assert info.value.status == 409
    with pytest.raises(errors.ConflictError, match="only a running session"):
        s.snapshot()


# -- failures -------------------------------------------------------------------------------------


def test_a_failed_pause_leaves_the_session_running(client: Client, inproc: InProcessServer,
                                                   fake_host: FakeHost) -> None:
    sid = ready_session(client)
    fake_host.fail_next("capture", errors.InternalError("no space left for the RAM image"))
    with pytest.raises(errors.SnapshotFailedError, match="no space left for the RAM image"):
        client.pause(sid)
    record = client.get(sid).record
    assert record.state == S.READY
    assert record.state_reason == "pause failed: no space left for the RAM image"
    assert fake_host.has_vm(sid) and fake_host.calls_to("terminate") == []
    assert client.get(sid).exec("echo", "ok").stdout == "ok\n"
    # the failed PAUSE snapshot is not left behind
    snap_ids = [r.id for r in inproc.store.all(SnapshotRow, SnapshotRow.session_id == sid)]
    assert len(snap_ids) == 1
    eventually(lambda: snapshot_state(inproc, snap_ids[0]) == "DELETED")
    # and it can be paused again
    assert client.pause(sid).state == S.PAUSED


def test_a_failed_pause_of_a_running_session_is_running_again(client: Client,
                                                               fake_host: FakeHost) -> None:
    s = client.create_and_wait(timeout=5)
    proc = s.start("sleep", "30")
    assert client.get(s.id).state == S.RUNNING
    fake_host.fail_next("capture", errors.InternalError("boom"))
    with pytest.raises(errors.SnapshotFailedError):
        s.pause()
    assert client.get(s.id).state == S.RUNNING
    proc.kill()


def test_a_pause_whose_vm_died_is_failed(client: Client, fake_host: FakeHost) -> None:
    sid = ready_session(client)
    gate = fake_host.block("capture")
    client.pause(sid, wait=False)
    gate.wait_entered()
    fake_host.kill_vm(sid, "QEMU was killed")
    gate.release()
    record = eventually(lambda: (r := client.get(sid).record).state == S.FAILED and r)
    assert record.state_reason is not None
    assert record.state_reason.startswith("the VM was lost during the pause")


def test_a_failed_resume_is_failed_with_the_reason(client: Client, inproc: InProcessServer,
                                                   fake_host: FakeHost) -> None:
    sid = ready_session(client)
    client.pause(sid)
    [snap_id] = pause_snapshots(client, sid)
    fake_host.fail_next("restore", errors.InternalError("QEMU did not start"))
    with pytest.raises(errors.SessionFailedError, match="resume failed: QEMU did not start"):
        client.resume(sid)
    record = client.get(sid).record
    assert record.state == S.FAILED
    assert record.state_reason == "resume failed: QEMU did not start"
    assert record.terminated_at is not None
    # the snapshot is kept (a new session can be made of it), and may be deleted now
    assert snapshot_state(inproc, snap_id) == "READY"
    assert client.restore_snapshot(snap_id).wait_ready(5).state == S.READY
    client.delete_snapshot(snap_id)


def test_resume_without_its_snapshot_fails(client: Client, inproc: InProcessServer,
                                           fake_host: FakeHost) -> None:
    sid = ready_session(client)
    client.pause(sid)
    [snap_id] = pause_snapshots(client, sid)
    for d in list(fake_host.artifacts):  # the RAM image lost in storage
        row = inproc.store.get_snapshot(snap_id)
        assert row is not None
        if d == row.files["ram"]:
            del fake_host.artifacts[d]
    with pytest.raises(errors.SessionFailedError, match="RAM image"):
        client.resume(sid)
    assert snapshot_state(inproc, snap_id) == "FAILED"  # damaged: no restore of it can succeed


# -- terminate and races --------------------------------------------------------------------------


def test_terminate_a_paused_session_releases_its_snapshot(client: Client,
                                                          inproc: InProcessServer) -> None:
    sid = ready_session(client)
    client.pause(sid)
    [snap_id] = pause_snapshots(client, sid)
    assert client.terminate(sid).state == S.TERMINATED
    assert snapshot_state(inproc, snap_id) in ("DELETING", "DELETED")
    eventually(lambda: snapshot_state(inproc, snap_id) == "DELETED")
    with pytest.raises(errors.ConflictError, match="only a PAUSED session"):
        client.resume(sid)


def test_terminate_during_the_pause_wins(client: Client, inproc: InProcessServer,
                                         fake_host: FakeHost) -> None:
    sid = ready_session(client)
    gate = fake_host.block("capture")
    client.pause(sid, wait=False)
    gate.wait_entered()
    assert client.terminate(sid).state == S.TERMINATED
    gate.release()
    assert not fake_host.has_vm(sid)
    snaps = inproc.store.all(SnapshotRow, SnapshotRow.session_id == sid)
    assert len(snaps) == 1
    eventually(lambda: snapshot_state(inproc, snaps[0].id) == "DELETED")
    assert client.get(sid).state == S.TERMINATED


def test_a_waiting_pause_hears_of_the_terminate(inproc: InProcessServer,
                                                fake_host: FakeHost) -> None:
    with Client(endpoint=inproc.url) as client:
        sid = ready_session(client)
    plane = inproc.plane
    gate = fake_host.block("capture")

    async def pause_and_terminate() -> BaseException | None:
        import asyncio

        waiting = asyncio.ensure_future(plane.sessions.pause(sid))
        await gate.until_entered()
        await plane.sessions.terminate(sid)
        try:
            await waiting
        except errors.TenkiError as exc:
            return exc
        return None

    err = inproc.run(pause_and_terminate())
    assert isinstance(err, errors.ConflictError) and "terminated during the pause" in str(err)


def test_terminate_during_the_resume_wins(client: Client, inproc: InProcessServer,
                                          fake_host: FakeHost) -> None:
    sid = ready_session(client)
    client.pause(sid)
    [snap_id] = pause_snapshots(client, sid)
    gate = fake_host.block("restore")
    client.resume(sid, wait=False)
    gate.wait_entered()
    assert client.terminate(sid).state == S.TERMINATED
    gate.release()
    assert not fake_host.has_vm(sid)
    eventually(lambda: snapshot_state(inproc, snap_id) == "DELETED")


def test_python_api_without_waiting(inproc: InProcessServer, fake_host: FakeHost) -> None:
    with Client(endpoint=inproc.url) as client:
        sid = ready_session(client)
    sessions = inproc.plane.sessions
    gate = fake_host.block("capture")
    assert inproc.run(sessions.pause(sid, wait=False)).state == S.PAUSING
    gate.release()
    assert inproc.run(sessions.pause(sid)).state == S.PAUSED
    gate = fake_host.block("restore")
    assert inproc.run(sessions.resume(sid, wait=False)).state == S.RESUMING
    gate.release()
    assert inproc.run(sessions.resume(sid, None, wait=True)).state == S.READY
    with pytest.raises(errors.SessionNotFoundError):
        inproc.run(sessions.pause(sid, "ws_other"))


# -- ownership, quotas ----------------------------------------------------------------------------


def test_a_pause_snapshot_is_owned_by_its_session(client: Client) -> None:
    sid = ready_session(client)
    client.pause(sid)
    [snap_id] = pause_snapshots(client, sid)
    assert client.get_snapshot(snap_id).type == SnapshotType.PAUSE
    with pytest.raises(errors.ConflictError, match="released when the session is resumed"):
        client.delete_snapshot(snap_id)
    with pytest.raises(errors.ConflictError, match="resume that session instead"):
        client.create(snapshot_id=snap_id)
    # user snapshots are USER
    other = client.create_and_wait(timeout=5)
    assert other.snapshot().type == SnapshotType.USER


def test_volumes_stay_attached_across_a_pause(client: Client, fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    s = client.create_and_wait(volumes=[f"{vol.id}:/data"], timeout=5)
    s.files.write("/data/kept.txt", "on the volume")
    assert s.pause().state == S.PAUSED
    held = client.get_volume(vol.id)  # still the paused session's: nobody else may take it
    assert (held.state.value, held.session_id, held.path) == ("IN_USE", s.id, "/data")
    other = client.create_and_wait(timeout=5)
    with pytest.raises(errors.ConflictError, match="in use"):
        other.attach_volume(vol.id, "/data")
    resumed = s.resume()
    assert resumed.state == S.READY and resumed.record.state_reason is None
    assert [v.volume_id for v in resumed.record.volumes] == [vol.id]
    assert s.files.read_text("/data/kept.txt") == "on the volume"  # plugged in again
    s.terminate()
    assert client.get_volume(vol.id).state.value == "AVAILABLE"


def test_a_volume_that_fails_to_come_back_is_released_with_a_warning(
        client: Client, fake_host: FakeHost) -> None:
    vol = client.create_volume("data", "1MiB")
    s = client.create_and_wait(volumes=[f"{vol.id}:/data"], timeout=5)
    s.pause()
    fake_host.fail_next("attach_volume", errors.InternalError("the device did not appear"))
    resumed = s.resume()
    assert resumed.state == S.READY
    assert "volume attach failed" in (resumed.record.state_reason or "")
    assert client.get_volume(vol.id).state.value == "AVAILABLE"


def test_a_paused_session_counts_against_no_quota(client: Client) -> None:
    ws = next(w for w in client.workspaces.list() if w.name == "default")
    client.workspaces.update(ws.id, quotas={"max_concurrent_sessions": 1,
                                            "max_memory_mib": 4096})
    first = client.create_and_wait(memory_mb=4096, timeout=5)
    first.pause()
    usage = client.workspaces.usage(ws.id)
    assert (usage.concurrent_sessions, usage.memory_mib) == (0, 0)
    second = client.create_and_wait(memory_mb=4096, timeout=5)  # the paused one holds no place
    with pytest.raises(errors.QuotaExceededError, match="max_concurrent_sessions=1"):
        first.resume()
    assert client.get(first.id).state == S.PAUSED  # refused: still paused, still resumable
    second.terminate()
    assert first.resume().state == S.READY
    assert client.workspaces.usage(ws.id).concurrent_sessions == 1


def test_resume_checks_the_host_capacity(inproc: InProcessServer, tmp_path: Path) -> None:
    host = FakeHost(memory_total_mib=4096)
    inproc.reset(tmp_path / "small", host=host)
    with Client(endpoint=inproc.url) as client:
        first = client.create_and_wait(memory_mb=4096, timeout=5)
        first.pause()
        second = client.create_and_wait(memory_mb=4096, timeout=5)
        with pytest.raises(errors.CapacityUnavailableError):
            first.resume()
        second.terminate()
        assert first.resume().state == S.READY


def test_a_paused_session_past_its_max_duration_is_terminated(client: Client) -> None:
    s = client.create_and_wait(max_duration=1, timeout=5)
    s.pause()
    eventually(lambda: client.get(s.id).state == S.TERMINATED, timeout=10,
               what="the expiry of the paused session")


# -- recovery -------------------------------------------------------------------------------------


async def test_recovery_of_pauses_and_resumes_cut_short(tmp_path: Path) -> None:
    store = open_test_store(tmp_path / "home")
    host = FakeHost()
    m = fake_manifest("paused")
    for d in m.digests():
        host.artifacts[d] = time.monotonic()
    ws = "ws_test"
    seed(store, WorkspaceRow(id=ws, name="test", quotas={}, created_at=now(), updated_at=now()))
    rows = {
        # PAUSING, VM still there (captured or not): runs on
        "vm_left": session_row("PAUSING", workspace_id=ws),
        # PAUSING, no VM, a READY PAUSE snapshot: PAUSED
        "captured": session_row("PAUSING", workspace_id=ws),
        # PAUSING, no VM, capture cut short: FAILED
        "lost": session_row("PAUSING", workspace_id=ws),
        # RESUMING with its snapshot: resumed again
        "resuming": session_row("RESUMING", workspace_id=ws),
        # RESUMING without one: FAILED
        "no_snapshot": session_row("RESUMING", workspace_id=ws),
        "paused": session_row("PAUSED", workspace_id=ws),
    }
    for row in rows.values():
        seed(store, row)
    host.seed_vm(rows["vm_left"].id)
    snaps = {
        "vm_left": snapshot_row("CREATING", rows["vm_left"].id, type="PAUSE", workspace_id=ws),
        "captured": snapshot_row("READY", rows["captured"].id, manifest=m, type="PAUSE",
                                 workspace_id=ws),
        "lost": snapshot_row("CREATING", rows["lost"].id, type="PAUSE", workspace_id=ws),
        "resuming": snapshot_row("READY", rows["resuming"].id, manifest=m, type="PAUSE",
                                 workspace_id=ws),
        "paused": snapshot_row("READY", rows["paused"].id, manifest=m, type="PAUSE",
                               workspace_id=ws),
    }
    for snap in snaps.values():
        seed(store, snap)
    # volumes: a paused session keeps its own; a session that ends FAILED frees its own
    held = volume_row("IN_USE", rows["paused"].id, "/data", workspace_id=ws)
    freed = volume_row("IN_USE", rows["lost"].id, "/data", workspace_id=ws)
    for vol in (held, freed):
        seed(store, vol)
        host.volumes[vol.id] = 1 << 20
    plane = ControlPlane(store, host)
    await plane.start()
    try:
        def state(key: str) -> str:
            row = store.get_session(rows[key].id)
            assert row is not None
            return row.state

        await eventually_async(lambda: state("resuming") == "READY", what="the resume again")
        assert state("vm_left") == "READY"
        assert "the server stopped during the pause" in (
            store.get_session(rows["vm_left"].id).state_reason or "")  # type: ignore[union-attr]
        assert host.has_vm(rows["vm_left"].id)
        assert state("captured") == "PAUSED" and not host.has_vm(rows["captured"].id)
        assert state("lost") == "FAILED"
        assert state("no_snapshot") == "FAILED"
        assert "no READY PAUSE snapshot" in (
            store.get_session(rows["no_snapshot"].id).state_reason or "")  # type: ignore[union-attr]
        assert state("paused") == "PAUSED"
        assert plane.volumes.get(held.id).state.value == "IN_USE"
        assert plane.volumes.get(held.id).session_id == rows["paused"].id
        assert plane.volumes.get(freed.id).state.value == "AVAILABLE"
        assert host.restores[-1].keep_identity
        await eventually_async(lambda: all(
            (store.get_snapshot(snaps[k].id) or SnapshotRow()).state == "DELETED"
            for k in ("vm_left", "lost", "resuming")), what="the releases")
        assert (store.get_snapshot(snaps["captured"].id) or SnapshotRow()).state == "READY"
        # the recovered PAUSED session resumes
        resumed = await plane.sessions.resume(rows["captured"].id)
        assert resumed.state == S.READY
        assert {r.id for r in plane.records.all(SessionRow, SessionRow.state == "PAUSED")} \
            == {rows["paused"].id}
    finally:
        await plane.stop()
        store.close()

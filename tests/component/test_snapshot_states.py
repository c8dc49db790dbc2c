"""Every state change of a snapshot through the REST API (the SDK over HTTP), with the real app,
control plane and SQLite, and the fake host below them (no VMs).

    CREATING ──sealed──> READY ──delete/expiry──> DELETING ──> DELETED
        └──failed────> FAILED ──delete/expiry──┘
                  READY ──an artifact found damaged──> FAILED
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.fake_host import FakeHost, image_digest
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client, errors
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.host.api import COLLECT_GRACE_S, Manifest
from tenkibox.models import SessionState, SnapshotState
from tenkibox.store.tables import SnapshotRow

P = SnapshotState


def manifest_of(inproc: InProcessServer, snapshot_id: str) -> Manifest:
    row = inproc.plane.records.get(SnapshotRow, snapshot_id)
    return Manifest.from_json(row.files)


def test_capture_is_creating_then_ready(client: Client, inproc: InProcessServer,
                                        fake_host: FakeHost) -> None:
    s = client.create_and_wait(cpu=1, memory_mb=512)
    gate = fake_host.block("capture")
    snap = client.create_snapshot(s.id, "base")
    assert snap.state == P.CREATING and snap.ready_at is None
    gate.wait_entered()
    assert client.get_snapshot(snap.id).state == P.CREATING
    gate.release()
    ready = client.wait_snapshot_ready(snap.id, timeout=5)
    assert ready.state == P.READY and ready.state_reason is None
    assert ready.ready_at is not None
    assert (ready.cpu, ready.memory_mb, ready.memory_bytes) == (1, 512, 512 << 20)
    assert ready.size_bytes == FakeHost.capture_size_bytes
    assert ready.compressed_bytes == FakeHost.capture_stored_bytes
    m = manifest_of(inproc, snap.id)  # the record names the manifest, every artifact stored
    assert set(m.digests()) <= set(fake_host.artifacts)
    assert m.layers[0] == image_digest("sandbox")
    assert client.get(s.id).state == SessionState.READY  # the session goes on


def test_capture_failure_is_failed_with_the_reason(client: Client,
                                                  fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    fake_host.fail_next("capture", errors.InternalError("at compress-ram: No space left"))
    snap = client.create_snapshot(s.id, "x")
    with pytest.raises(errors.SnapshotFailedError, match="No space left"):
        client.wait_snapshot_ready(snap.id, timeout=5)
    failed = client.get_snapshot(snap.id)
    assert failed.state == P.FAILED
    assert failed.state_reason == "capture failed: at compress-ram: No space left"
    assert client.get(s.id).state == SessionState.READY  # the session is not harmed
    with pytest.raises(errors.SnapshotFailedError, match="only a READY snapshot"):
        client.restore_snapshot(snap.id)


def test_session_ended_during_the_capture(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    gate = fake_host.block("capture")
    snap = client.create_snapshot(s.id, "x")
    gate.wait_entered()
    s.terminate()
    gate.release()
    with pytest.raises(errors.SnapshotFailedError,
                       match=r"the session ended during the capture \(terminated\)"):
        client.wait_snapshot_ready(snap.id, timeout=5)


def test_snapshots_of_one_session_are_taken_one_after_the_other(
        client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    gate = fake_host.block("capture")
    first = client.create_snapshot(s.id, "1")
    second = client.create_snapshot(s.id, "2")
    gate.wait_entered()
    assert gate.held == 1  # the second waits for the first, not in the host
    gate.release()
    for snap in (first, second):
        assert client.wait_snapshot_ready(snap.id, timeout=5).state == P.READY
    assert fake_host.calls_to("capture") == [s.id, s.id]


def test_snapshot_refused_unless_the_session_runs(client: Client, fake_host: FakeHost) -> None:
    gate = fake_host.block("boot")
    s = client.create()
    with pytest.raises(errors.ConflictError, match="is CREATING; only a running session"):
        client.create_snapshot(s.id, "x")
    gate.release()
    s.wait_ready(5)
    s.terminate()
    with pytest.raises(errors.ConflictError, match="is TERMINATED"):
        client.create_snapshot(s.id, "x")
    with pytest.raises(errors.SessionNotFoundError):
        client.create_snapshot("ses_nope", "x")


@pytest.mark.parametrize("start", ["READY", "FAILED"])
def test_delete_is_deleting_then_deleted(client: Client, inproc: InProcessServer,
                                         fake_host: FakeHost, start: str) -> None:
    s = client.create_and_wait()
    keep = s.snapshot("keep")
    if start == "FAILED":
        fake_host.fail_next("capture", errors.InternalError("boom"))
        snap = client.create_snapshot(s.id, "gone")
        with pytest.raises(errors.SnapshotFailedError):
            client.wait_snapshot_ready(snap.id, timeout=5)
        own: set[str] = set()
    else:
        snap = s.snapshot("gone")
        own = set(manifest_of(inproc, snap.id).digests()) - set(
            manifest_of(inproc, keep.id).digests())
        assert own and own <= set(fake_host.artifacts)
    s.terminate()  # nothing else holds the snapshot's artifacts
    answer = client.delete_snapshot(snap.id)
    assert answer.state == P.DELETING
    eventually(lambda: client.get_snapshot(snap.id).state == P.DELETED, what="DELETED")
    gone = client.get_snapshot(snap.id)
    assert gone.deleted_at is not None
    assert [x.id for x in client.list_snapshots()] == [keep.id]  # the list leaves it out
    fake_host.age_artifacts()  # past the grace that spares a capture's fresh artifacts
    inproc.run(inproc.plane.snapshots.collect_garbage())
    assert not own & set(fake_host.artifacts)  # its own artifacts are collected
    assert set(manifest_of(inproc, keep.id).digests()) <= set(fake_host.artifacts)
    # deleting again answers the record as it is
    assert client.delete_snapshot(snap.id).state == P.DELETED
    with pytest.raises(errors.SnapshotFailedError, match="is DELETED"):
        client.restore_snapshot(snap.id)


def test_a_deleted_snapshots_fresh_files_go_once_the_grace_is_over(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    """Deleted within the GC's grace of its capture (or of a rewrite that moved a file's
    ctime), a snapshot's files were spared by the delete's collection and then waited for the
    sweeper's pass every ~30 s (CI's fault suite caught them as unowned). Now the delete
    collects once more when the grace is over: no sweeper, no aging here."""
    s = client.create_and_wait()
    snap = s.snapshot("young")
    s.terminate()
    eventually(lambda: client.get(s.id).state.value == "TERMINATED", what="TERMINATED")
    own = set(manifest_of(inproc, snap.id).digests()) - fake_host.referenced_locally()
    assert own and own <= set(fake_host.artifacts)
    client.delete_snapshot(snap.id)
    eventually(lambda: client.get_snapshot(snap.id).state == P.DELETED, what="DELETED")
    assert own & set(fake_host.artifacts), "the grace spares them at first"
    eventually(lambda: not own & set(fake_host.artifacts), timeout=COLLECT_GRACE_S + 5,
               what="the second collection")


def test_what_a_failed_capture_stored_goes_once_the_grace_is_over(
        client: Client, fake_host: FakeHost) -> None:
    """A capture that fails after storing some of its files (a damaged older layer is found
    at the checksum step, after the RAM image is stored) leaves them unreferenced but young:
    they go at a collection once the grace is over, not at the sweeper's pass."""
    s = client.create_and_wait()
    stored_then_failed = "f" * 64
    fake_host.artifacts[stored_then_failed] = time.monotonic()  # what the host put before
    fake_host.fail_next("capture", errors.SnapshotFailedError("disk layer 1 is corrupt"))
    snap = client.create_snapshot(s.id, "x")
    with pytest.raises(errors.SnapshotFailedError):
        client.wait_snapshot_ready(snap.id, timeout=5)
    assert stored_then_failed in fake_host.artifacts, "the grace spares it at first"
    eventually(lambda: stored_then_failed not in fake_host.artifacts,
               timeout=COLLECT_GRACE_S + 5, what="the collection after the failure")


def test_delete_while_creating_is_refused(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    gate = fake_host.block("capture")
    snap = client.create_snapshot(s.id, "x")
    with pytest.raises(errors.ConflictError, match="is CREATING"):
        client.delete_snapshot(snap.id)
    gate.release()
    client.wait_snapshot_ready(snap.id, timeout=5)


def test_concurrent_deletes(client: Client, inproc: InProcessServer) -> None:
    s = client.create_and_wait()
    snap = s.snapshot("x")
    answers: list[object] = []

    def delete() -> None:
        with Client(endpoint=inproc.url) as c:
            try:
                answers.append(c.delete_snapshot(snap.id).state)
            except Exception as exc:
                answers.append(exc)

    threads = [threading.Thread(target=delete) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(answers) == 4 and all(a in (P.DELETING, P.DELETED) for a in answers), answers
    eventually(lambda: client.get_snapshot(snap.id).state == P.DELETED, what="DELETED")


def test_damaged_artifact_found_by_verify_is_failed(client: Client, inproc: InProcessServer,
                                                   fake_host: FakeHost) -> None:
    s = client.create_and_wait()
    snap = s.snapshot("x")
    ram = manifest_of(inproc, snap.id).ram
    fake_host.corrupt.add(ram)
    report = client.verify_store(repair=False)
    assert not report.ok
    assert client.get_snapshot(snap.id).state == P.READY  # a report only, without repair
    client.verify_store(repair=True)
    damaged = client.get_snapshot(snap.id)
    assert damaged.state == P.FAILED
    assert damaged.state_reason == f"damaged in storage: RAM image {ram[:12]} does not match " \
        "its digest"
    # a FAILED snapshot is deleted like any other
    assert client.delete_snapshot(snap.id).state == P.DELETING


def test_verify_names_an_unowned_artifact_by_its_digest(
        client: Client, inproc: InProcessServer, fake_host: FakeHost, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stray = "e" * 64
    fake_host.artifacts[stray] = 0.0  # stored long ago, named by no record
    report = client.verify_store(repair=False)
    assert not report.ok
    assert [(u.kind, u.name) for u in report.unowned] == [("artifact", stray)]
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)
    out = CliRunner().invoke(cli, ["admin", "verify"], obj=CliState())
    assert out.exit_code == 1
    assert f"unowned artifact: {stray}" in out.output.splitlines()
    repaired = client.verify_store(repair=True)
    assert not repaired.ok  # it was found: the report says so, and that repair removed it
    assert [(u.kind, u.name) for u in repaired.removed] == [("artifact", stray)]
    assert stray not in fake_host.artifacts
    assert client.verify_store(repair=False).ok


def test_a_restore_in_progress_keeps_the_artifacts_it_reads(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    """The snapshot is deleted (and the GC runs) while a restore of it is still starting: the
    restore's record names every artifact it reads, so none is collected under it."""
    src = client.create_and_wait()
    snap = src.snapshot("x")
    src.terminate()
    gate = fake_host.block("restore")
    r = client.create(snapshot_id=snap.id)
    gate.wait_entered()
    client.delete_snapshot(snap.id)
    eventually(lambda: client.get_snapshot(snap.id).state == P.DELETED, what="DELETED")
    fake_host.age_artifacts()
    inproc.run(inproc.plane.snapshots.collect_garbage())
    gate.release()
    assert r.wait_ready(5).state == SessionState.READY

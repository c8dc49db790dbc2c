"""Expiry by the sweeper (its interval made small): a session past ``max_duration_s`` is
terminated with the reason, a snapshot past ``expires_at`` is deleted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.fake_host import FakeHost
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client
from tenkibox.control import plane
from tenkibox.models import SessionState, SnapshotState

SWEEP_S = 0.05


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, inproc: InProcessServer, fake_host: FakeHost,
           tmp_path: Path) -> Iterator[Client]:
    monkeypatch.setattr(plane, "SWEEP_INTERVAL_S", SWEEP_S)
    inproc.reset(tmp_path / "home", host=fake_host)  # a control plane that sweeps that often
    with Client(endpoint=inproc.url) as c:
        yield c


def test_session_past_its_max_duration_is_terminated(client: Client,
                                                     fake_host: FakeHost) -> None:
    # long enough that a loaded machine still sees it READY first (the wait would fail)
    s = client.create_and_wait(max_duration=1.5)
    record = s.record
    assert record.expires_at is not None
    assert record.expires_at - record.created_at == timedelta(seconds=1.5)
    other = client.create_and_wait()  # without a limit
    eventually(lambda: client.get(s.id).state == SessionState.TERMINATED, timeout=10,
               what="the expiry")
    ended = client.get(s.id).record
    assert ended.state_reason == "max duration reached"
    assert ended.terminated_at is not None and ended.terminated_at >= record.expires_at
    assert not fake_host.has_vm(s.id)
    time.sleep(5 * SWEEP_S)
    assert client.get(other.id).state == SessionState.READY


def test_a_terminate_that_failed_is_retried_by_the_sweeper(client: Client,
                                                            fake_host: FakeHost) -> None:
    from tenkibox import errors

    # armed first, and the session not waited for: on a loaded machine its 0.2 s can be over
    # before a wait sees it READY, or before the failure is armed (a dry run saw the former)
    fake_host.fail_next("terminate", errors.InternalError("QEMU did not quit"))
    s = client.create(max_duration=0.2)
    eventually(lambda: client.get(s.id).state == SessionState.TERMINATED, timeout=5,
               what="the expiry, retried")
    assert client.get(s.id).record.state_reason == "max duration reached"
    assert fake_host.calls_to("terminate") == [s.id, s.id]
    assert not fake_host.has_vm(s.id)


def test_running_session_expires_too(client: Client) -> None:
    s = client.create_and_wait(max_duration=1.5)
    s.start("sleep", "60")
    eventually(lambda: client.get(s.id).state == SessionState.TERMINATED, timeout=10,
               what="the expiry")


def test_expiry_waits_for_a_boot_in_progress(client: Client, fake_host: FakeHost) -> None:
    gate = fake_host.block("boot")
    s = client.create(max_duration=0.1)
    gate.wait_entered()
    time.sleep(0.3)  # past its time while still CREATING: the boot is not cut short
    assert client.get(s.id).state == SessionState.CREATING
    gate.release()
    eventually(lambda: client.get(s.id).state == SessionState.TERMINATED, timeout=5,
               what="the expiry once READY")
    assert client.get(s.id).record.state_reason == "max duration reached"


def test_snapshot_past_expires_at_is_deleted(client: Client) -> None:
    s = client.create_and_wait()
    soon = datetime.now(UTC) + timedelta(seconds=1)  # must still be future when it arrives
    expiring = s.snapshot("soon", expires_at=soon)
    kept = s.snapshot("kept", expires_at=datetime.now(UTC) + timedelta(days=1))
    assert expiring.state == SnapshotState.READY and expiring.expires_at == soon
    eventually(lambda: client.get_snapshot(expiring.id).state == SnapshotState.DELETED,
               timeout=5, what="the expiry")
    assert client.get_snapshot(kept.id).state == SnapshotState.READY
    assert [x.id for x in client.list_snapshots()] == [kept.id]


def test_failed_snapshot_expires_too(client: Client, fake_host: FakeHost) -> None:
    from tenkibox import errors

    s = client.create_and_wait()
    fake_host.fail_next("capture", errors.InternalError("boom"))
    snap = client.create_snapshot(s.id, "x", expires_at=datetime.now(UTC)
                                  + timedelta(seconds=1))
    with pytest.raises(errors.SnapshotFailedError):
        client.wait_snapshot_ready(snap.id, timeout=5)
    eventually(lambda: client.get_snapshot(snap.id).state == SnapshotState.DELETED, timeout=5,
               what="the expiry")

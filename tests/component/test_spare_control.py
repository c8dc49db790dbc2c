"""Spares (``control/spares.py``): after a restore, the host is asked to prepare the next restore
of the same snapshot under a session id chosen then; the next create of that snapshot gets that
id, and its host's restore claims the spare. The real app and control plane over the fake host,
which records the spares it is asked for (the real host's part: tests/integration/test_spares.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.fake_host import FakeHost
from support.helpers import eventually

from tenkibox import Client, errors
from tenkibox.control.spares import SPARES_PER_HOST


@pytest.fixture(autouse=True)
def spares_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TENKI_SPARES", "on")
    yield


def spares_of(host: FakeHost, snapshot_id: str) -> list[str]:
    return [sid for sid, spec in host.spares.items() if spec.snapshot_id == snapshot_id]


def test_the_next_restore_of_a_snapshot_gets_the_spare_prepared_for_it(
        client: Client, fake_host: FakeHost) -> None:
    source = client.create_and_wait(cpu=2, memory_mb=1024)
    snap = client.create_snapshot_and_wait(source.id, "base")
    assert fake_host.spares == {}  # a boot is not a restore: nothing to prepare
    first = client.create_and_wait(snapshot_id=snap.id)
    spare = eventually(lambda: spares_of(fake_host, snap.id), what="a spare")[0]
    spec = fake_host.spares[spare]
    # the restore it serves: the snapshot's, under a session id of its own, named for it
    assert spare not in (first.id, source.id) and spare.startswith("ses_")
    assert spec.hostname == f"tenki-{spare.split('_', 1)[1][:8]}"
    assert spec.manifest == fake_host.restores[-1].manifest and not spec.keep_identity
    # an admin sees it: a paused VM that no session record names yet
    listed = client.host_status().spares
    assert [(s.session_id, s.snapshot_id, s.host_id) for s in listed] == \
        [(spare, snap.id, client.hosts.list()[0].host_id)]  # the host that restored ``first``
    second = client.create_and_wait(snapshot_id=snap.id, name="second")
    assert second.id == spare and fake_host.claimed == [spare]
    assert second.record.name == "second" and second.record.snapshot_id == snap.id
    # the session is the user's like any other; the next spare is asked for in turn
    assert {s.id for s in client.list()} == {source.id, first.id, second.id}
    nxt = eventually(lambda: spares_of(fake_host, snap.id), what="the next spare")[0]
    assert nxt != spare
    # a session is listed once it is created, never a spare
    assert nxt not in {s.id for s in client.list()}


def test_deleting_the_snapshot_drops_its_spare(client: Client, fake_host: FakeHost) -> None:
    source = client.create_and_wait(cpu=1, memory_mb=512)
    snap = client.create_snapshot_and_wait(source.id, "base")
    client.create_and_wait(snapshot_id=snap.id).terminate()
    spare = eventually(lambda: spares_of(fake_host, snap.id), what="a spare")[0]
    client.delete_snapshot(snap.id)
    eventually(lambda: spare in fake_host.dropped_spares, what="the spare dropped")
    assert spares_of(fake_host, snap.id) == []
    assert client.host_status().spares == []


def test_a_host_holds_at_most_so_many_spares_the_oldest_goes(
        client: Client, fake_host: FakeHost) -> None:
    source = client.create_and_wait(cpu=1, memory_mb=512)
    snaps = [client.create_snapshot_and_wait(source.id, f"s{i}")
             for i in range(SPARES_PER_HOST + 1)]
    for snap in snaps:
        client.create_and_wait(snapshot_id=snap.id).terminate()
        eventually(lambda snap=snap: spares_of(fake_host, snap.id), what="its spare")
    eventually(lambda: len(fake_host.spares) == SPARES_PER_HOST, what="the oldest dropped")
    assert spares_of(fake_host, snaps[0].id) == []
    assert all(spares_of(fake_host, s.id) for s in snaps[1:])


def test_a_spare_that_the_host_refused_is_not_given(client: Client,
                                                    fake_host: FakeHost) -> None:
    """A note whose spare the host never made (here: its id taken meanwhile) only means the
    restore that takes it runs whole; the note is forgotten, and the next restore asks again."""
    source = client.create_and_wait(cpu=1, memory_mb=512)
    snap = client.create_snapshot_and_wait(source.id, "base")
    fake_host.fail_next("prepare_spare", errors.ConflictError("taken"))
    client.create_and_wait(snapshot_id=snap.id).terminate()
    asked = eventually(lambda: [k for op, k in fake_host.calls if op == "prepare_spare"],
                       what="a spare asked for")
    r = client.create_and_wait(snapshot_id=snap.id)
    assert r.id != asked[0] and fake_host.claimed == []
    eventually(lambda: spares_of(fake_host, snap.id), what="a spare asked for again")


def test_no_spares_when_turned_off(client: Client, fake_host: FakeHost,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_SPARES", "off")
    source = client.create_and_wait(cpu=1, memory_mb=512)
    snap = client.create_snapshot_and_wait(source.id, "base")
    client.create_and_wait(snapshot_id=snap.id).terminate()
    client.create_and_wait(snapshot_id=snap.id).terminate()
    assert fake_host.spares == {} and fake_host.claimed == []

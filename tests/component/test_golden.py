"""Golden snapshots (issue 12): a plain create restores the golden snapshot of its image and
size, made on first use; the real app and control plane over the fake host."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from support.fake_host import FakeHost
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import Client, SessionState
from tenkibox.store.tables import SnapshotRow


@pytest.fixture(autouse=True)
def golden_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TENKI_GOLDEN", "on")
    yield


def goldens(server: InProcessServer) -> list[str]:
    rows = server.store.all(SnapshotRow)
    return [r.id for r in rows if (r.template_id or "").startswith("golden:")
            and r.state == "READY"]


def ops(host: FakeHost, op: str) -> list[str]:
    return [k for o, k in host.calls if o == op]


def test_first_create_boots_and_the_next_restore(client: Client, inproc: InProcessServer,
                                                 fake_host: FakeHost) -> None:
    first = client.create(cpu=2, memory_mb=1024)
    assert first.record.state_reason is not None and "golden snapshot" in \
        first.record.state_reason
    first.wait_ready()
    assert first.record.state_reason is None  # READY clears the note
    eventually(lambda: len(goldens(inproc)) == 1, timeout=10, what="the golden snapshot")
    golden = goldens(inproc)[0]
    assert golden not in [s.id for s in client.list_snapshots()]
    # the build session is gone and was never the user's
    assert [s.id for s in client.list()] == [first.id]
    second = client.create_and_wait(cpu=2, memory_mb=1024, env={"MINE": "1"})
    assert second.id in ops(fake_host, "restore") and second.id not in ops(fake_host, "boot")
    rec = second.record
    assert rec.snapshot_id is None and rec.template_id is None and rec.state_reason is None
    assert rec.env_keys == ["MINE"]  # the session's own env, applied to its execs
    # another size: booted, and its own golden snapshot follows
    other = client.create_and_wait(cpu=1, memory_mb=512)
    assert other.id in ops(fake_host, "boot")
    eventually(lambda: len(goldens(inproc)) == 2, timeout=10, what="the second golden snapshot")
    # asked for: a cold boot
    cold = client.create_and_wait(cpu=2, memory_mb=1024, cold_boot=True)
    assert cold.id in ops(fake_host, "boot")


def test_a_damaged_golden_snapshot_is_dropped_and_the_create_boots(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    client.create_and_wait(memory_mb=1024)
    eventually(lambda: len(goldens(inproc)) == 1, timeout=10, what="the golden snapshot")
    golden = goldens(inproc)[0]
    row = inproc.store.get_snapshot(golden)
    assert row is not None
    fake_host.corrupt.add(row.files["ram"])
    s = client.create_and_wait(memory_mb=1024)
    assert s.record.state == SessionState.READY and s.id in ops(fake_host, "boot")
    assert inproc.store.get_snapshot(golden).state == "FAILED"  # type: ignore[union-attr]
    # and a new one is made for the next creates
    eventually(lambda: len(goldens(inproc)) == 1 and goldens(inproc)[0] != golden,
               timeout=10, what="a new golden snapshot")


def test_a_golden_snapshot_of_an_older_machine_layout_is_replaced(
        client: Client, inproc: InProcessServer, fake_host: FakeHost) -> None:
    """One made before new VMs' RAM was padded (its key has no layout) would give its sessions
    an unpadded VM, which is never saved live: the create boots, a new one is made, and the old
    one is deleted."""
    from tenkibox.control.golden import LAYOUT, PREFIX

    client.create_and_wait(memory_mb=1024)
    eventually(lambda: len(goldens(inproc)) == 1, timeout=10, what="the golden snapshot")
    old = goldens(inproc)[0]
    with inproc.store.tx() as tx:
        row = tx.get(SnapshotRow, old)
        assert row is not None and row.template_id.endswith(f"/{LAYOUT}")
        row.template_id = PREFIX + row.template_id[len(PREFIX):].removesuffix(f"/{LAYOUT}")
    s = client.create_and_wait(memory_mb=1024)
    assert s.id in ops(fake_host, "boot") and s.id not in ops(fake_host, "restore")
    eventually(lambda: goldens(inproc) != [] and old not in goldens(inproc), timeout=10,
               what="a golden snapshot of this layout, and the old one gone")
    assert inproc.store.get_snapshot(old).state in ("DELETING", "DELETED")  # type: ignore[union-attr]


def test_golden_snapshots_are_bounded(client: Client, inproc: InProcessServer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import tenkibox.control.golden as g

    monkeypatch.setattr(g, "GOLDEN_MAX", 2)
    for mib in (512, 768, 1024):
        client.create_and_wait(memory_mb=mib)
        eventually(lambda: not inproc.plane.golden.building(), timeout=10, what="the build")
    assert len(goldens(inproc)) == 2


def test_off_means_every_create_boots(client: Client, inproc: InProcessServer,
                                      fake_host: FakeHost,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_GOLDEN", "off")
    s = client.create_and_wait(memory_mb=1024)
    assert s.record.state_reason is None
    time.sleep(0.2)
    assert goldens(inproc) == [] and not inproc.plane.golden.building()
    assert ops(fake_host, "boot") == [s.id]

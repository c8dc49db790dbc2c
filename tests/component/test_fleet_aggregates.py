"""``Fleet``'s combined answers over fake members and real records: what garbage collection
keeps, when an artifact counts as damaged, which VMs a terminate stops, which deaths reach the
control plane, and that an unreachable member spoils none of it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fake_host import FakeHost, digest
from support.helpers import seed, session_row
from support.server import open_test_store

from tenkibox.control.fleet import Fleet
from tenkibox.control.records import Records
from tenkibox.errors import InternalError
from tenkibox.host.api import VMGone
from tenkibox.store.db import Store


class Unreachable(FakeHost):
    """A member whose calls fail as a host worker that does not answer."""

    async def verify_artifacts(self, digests: dict[str, str], *, deep: bool) -> dict[str, str]:
        raise InternalError("host unreachable")

    async def collect_garbage(self, referenced: set[str], grace_s: float | None = None) -> int:
        raise InternalError("host unreachable")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_test_store(tmp_path / "home")
    yield s
    s.close()


def fleet_of(store: Store, **members: FakeHost) -> Fleet:
    fleet = Fleet(dict(members))
    fleet.bind(Records(store))
    return fleet


async def test_collection_keeps_what_any_member_runs_on(store: Store) -> None:
    a, b = FakeHost(host_id="a"), FakeHost(host_id="b")
    shared: dict[str, float] = {}
    a.artifacts = b.artifacts = shared  # one bucket
    vm = b.seed_vm("ses_onb")  # b's VM runs on its layers: a must not delete them
    a._store(digest("junk"))
    a.age_artifacts()
    fleet = fleet_of(store, a=a, b=b)
    await fleet.collect_garbage(set(), grace_s=0)
    assert set(vm.layers) <= set(shared) and digest("junk") not in shared


async def test_damaged_only_where_no_member_has_a_good_copy(store: Store) -> None:
    a, b, down = FakeHost(host_id="a"), FakeHost(host_id="b"), Unreachable(host_id="c")
    good, lost = a._store(digest("good")), digest("lost")
    fleet = fleet_of(store, a=a, b=b, c=down)
    assert await fleet.verify_artifacts({good: "RAM image", lost: "layer"}, deep=False) == {
        lost: f"layer {lost[:12]} is missing"}
    b._store(lost)
    assert await fleet.verify_artifacts({good: "x", lost: "y"}, deep=False) == {}
    # a member that cannot answer never makes anything look damaged; none answering fails
    with pytest.raises(InternalError):
        await fleet_of(store, c=down).verify_artifacts({good: "x"}, deep=False)
    assert await fleet.collect_garbage(set(), grace_s=0) >= 0  # down skipped, not raised


async def test_terminate_stops_every_copy_and_watch_reports_only_the_owner(store: Store) -> None:
    a, b = FakeHost(host_id="a"), FakeHost(host_id="b")
    seed(store, session_row("READY", id="ses_x", host_id="a"))
    fleet = fleet_of(store, a=a, b=b)
    a.seed_vm("ses_x")
    b.seed_vm("ses_x")  # a stale copy (a partitioned host kept it)
    assert fleet.has_vm("ses_x") and fleet.host_of("ses_x") == "a"
    gone: list[VMGone] = []

    async def follow() -> None:
        async for g in fleet.watch():
            gone.append(g)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    b.kill_vm("ses_x", "fenced")  # not the owner: not the session's death
    await asyncio.sleep(0.05)
    assert gone == []
    b.seed_vm("ses_x")
    await fleet.terminate("ses_x", [])
    assert "ses_x" not in a.vms and "ses_x" not in b.vms
    a.seed_vm("ses_x")
    a.kill_vm("ses_x", "qemu died")
    await asyncio.sleep(0.05)
    assert gone == [VMGone("ses_x", "qemu died")]
    task.cancel()
    await fleet.shutdown()

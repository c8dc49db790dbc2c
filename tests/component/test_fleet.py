"""Many hosts: the real control plane and API over a fleet of fake hosts.

Workers register over the real REST API (``POST /v1/hosts``); the server's ``connect`` makes
each the fake host of its address (``InProcessServer(workers=...)``). Placement, pins, drain,
remove, host loss, fencing's ``owned``, routing of exec and files, the cache preference of a
restore, volumes' hosts and concurrent creates are checked against the records and the fakes.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from support.fake_host import FakeHost
from support.server import AUTH, InProcessServer, open_test_store

from tenkibox import Client
from tenkibox.control.fleet import CACHE_PREFERENCE
from tenkibox.errors import (
    CapacityUnavailableError,
    ConflictError,
    HostNotFoundError,
    NetworkPolicyUnsupportedError,
    PermissionDeniedError,
    ValidationError,
)
from tenkibox.models import HostState, SessionState
from tenkibox.store.tables import HostRow

MakeServer = Callable[..., InProcessServer]
A, B = "http://10.77.0.2:7070", "http://10.77.0.3:7070"


def worker(memory_mib: int = 8192) -> FakeHost:
    return FakeHost(memory_total_mib=memory_mib)


def register(server: InProcessServer, address: str, host_id: str | None = None,
             **extra: Any) -> httpx.Response:
    body = {"host_id": host_id, "address": address, "secret": "s3cret-" + "x" * 24, "cpus": 2,
            "memory_total_mib": 8192, "memory_reserve_mib": 0, "overcommit": 1.0,
            "accelerator": "tcg", "qemu_version": "8.2.2", "cpu_model": "qemu64",
            "vms": [], **extra}
    return httpx.post(f"{server.url}/v1/hosts", json=body, headers=AUTH)


def joined(server: InProcessServer, address: str, host_id: str | None = None) -> str:
    r = register(server, address, host_id)
    assert r.status_code == 200, r.text
    return str(r.json()["host_id"])


def heartbeat(server: InProcessServer, host_id: str, vms: list[str] | None = None
              ) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/hosts/{host_id}/heartbeat", json={"vms": vms or []},
                      headers=AUTH)


def two_workers(make_inproc: MakeServer, memory_mib: int = 8192, **kw: Any
                ) -> tuple[InProcessServer, dict[str, FakeHost]]:
    """A pure control plane with workers at A and B; returns it and host id -> fake."""
    fakes = {A: worker(memory_mib), B: worker(memory_mib)}
    server = make_inproc(workers=fakes, local_host=False, **kw)
    return server, {joined(server, A): fakes[A], joined(server, B): fakes[B]}


def until_lost(server: InProcessServer, sdk: Client, silent: str, beating: str,
               timeout: float = 10.0) -> None:
    """Until ``silent`` is LOST, while ``beating`` heartbeats every 0.2 s (and is answered)."""
    deadline = time.monotonic() + timeout
    while sdk.get_host(silent).state != HostState.LOST:
        assert heartbeat(server, beating).status_code == 200
        assert time.monotonic() < deadline, f"{silent} was not marked LOST"
        time.sleep(0.2)


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# -- one machine: the embedded host is the member "local" --------------------------------------


def test_a_single_server_is_a_fleet_of_its_local_host(inproc: InProcessServer) -> None:
    with Client(endpoint=inproc.url) as sdk:
        (local,) = sdk.hosts.list()
        assert (local.host_id, local.state, local.address) == ("local", HostState.ACTIVE, None)
        s = sdk.create_and_wait(memory_mb=1024)
        assert s.record.host_id == "local"
        assert sdk.hosts.get("local").memory_promised_mib == 1024
        assert sdk.host_status().memory_promised_mib == 1024  # the aggregate: the same
        with pytest.raises(ConflictError, match="embedded host"):
            sdk.hosts.remove("local", force=True)
    # a single-machine server has a connect (the runtime's), but no worker listens at A
    r = register(inproc, A)
    assert r.status_code == 422 and r.json()["error"]["field"] == "address"


# -- registration and heartbeats ----------------------------------------------------------------


def test_register_assigns_an_id_and_lists_the_host(make_inproc: MakeServer) -> None:
    server = make_inproc(workers={A: worker()})
    r = register(server, A)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["host_id"].startswith("host-") and body["state"] == "ACTIVE"
    assert body["owned"] == [] and body["heartbeat_interval_s"] > 0
    assert "secret" not in body and "s3cret" not in r.text
    assert server.connected == [(body["host_id"], A, "s3cret-" + "x" * 24)]
    with Client(endpoint=server.url) as sdk:
        hosts = sdk.hosts.list()
        assert [h.host_id for h in hosts] == ["local", body["host_id"]]
        got = sdk.hosts.get(body["host_id"])
        assert (got.address, got.cpu_model, got.qemu_version) == (A, "qemu64", "8.2.2")
        with pytest.raises(HostNotFoundError):
            sdk.hosts.get("host-nope")
    # the same id again: the same host, not a new one
    assert joined(server, A, body["host_id"]) == body["host_id"]
    assert len(httpx.get(f"{server.url}/v1/hosts", headers=AUTH).json()) == 2


def test_bad_registrations_name_the_field(make_inproc: MakeServer) -> None:
    server = make_inproc(workers={A: worker()})
    r = register(server, A, host_id="local")
    assert r.status_code == 422 and r.json()["error"]["field"] == "host_id"
    r = httpx.post(f"{server.url}/v1/hosts", json={"secret": "x" * 20}, headers=AUTH)
    assert r.status_code == 422 and "address" in r.text
    r = register(server, "http://10.77.0.9:7070")  # no worker there: cannot connect
    assert r.status_code == 422 and r.json()["error"]["field"] == "address"
    r = heartbeat(server, "host-unknown")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"


def test_workspace_keys_may_not_touch_hosts(make_inproc: MakeServer) -> None:
    server = make_inproc(workers={A: worker()})
    with Client(endpoint=server.url) as admin:
        key = admin.create_api_key(server.default_workspace, name="user").key
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{server.url}/v1/hosts", headers=headers).status_code == 403
    assert httpx.post(f"{server.url}/v1/hosts", json={}, headers=headers).status_code in (
        403, 422)
    with Client(endpoint=server.url, api_key=key) as user:
        with pytest.raises(PermissionDeniedError):
            user.create(memory_mb=1024, host_id="local")


def test_heartbeat_owned_lists_exactly_the_live_sessions_placed_there(
        make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        on_a = [sdk.create_and_wait(memory_mb=1024, host_id=a) for _ in range(3)]
        on_b = sdk.create_and_wait(memory_mb=1024, host_id=b)
        on_a[2].terminate()
        r = heartbeat(server, a, vms=fakes[a].list_vms())
        assert r.status_code == 200, r.text
        assert r.json() == {"state": "ACTIVE", "owned": sorted(s.id for s in on_a[:2])}
        assert heartbeat(server, b).json()["owned"] == [on_b.id]
        # a registration answers the same (a worker that restarted learns what it owns)
        assert register(server, A, host_id=a).json()["owned"] == sorted(s.id for s in on_a[:2])


# -- placement -----------------------------------------------------------------------------------


def test_creates_go_where_there_is_room_until_every_host_is_full(
        make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc, memory_mib=4096)
    with Client(endpoint=server.url) as sdk:
        sessions = [sdk.create_and_wait(memory_mb=2048) for _ in range(4)]
        placed = [s.record.host_id for s in sessions]
        assert sorted(placed) == sorted([*fakes, *fakes])  # two on each
        for s in sessions:  # each VM runs on the host its record names, and only there
            host_id = s.record.host_id
            assert host_id is not None
            assert s.id in fakes[host_id].vms
            assert all(s.id not in f.vms for h, f in fakes.items() if h != host_id)
        with pytest.raises(CapacityUnavailableError, match="none of the 2 ACTIVE hosts"):
            sdk.create(memory_mb=2048)
        assert {h.host_id: h.memory_promised_mib for h in sdk.hosts.list()} == {
            h: 4096 for h in fakes}


def test_a_pin_places_on_that_host_or_says_why_not(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc, memory_mib=4096)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        for _ in range(2):
            assert sdk.create_and_wait(memory_mb=2048, host_id=b).host_id == b
        with pytest.raises(ConflictError, match=f"host {b}|capacity"):
            sdk.create(memory_mb=2048, host_id=b)  # full: the caller chose it, 409
        with pytest.raises(ValidationError) as err:
            sdk.create(memory_mb=1024, host_id="host-nowhere")
        assert err.value.field == "host_id"
        sdk.hosts.drain(a)
        with pytest.raises(ConflictError, match="DRAINING"):
            sdk.create(memory_mb=1024, host_id=a)
    r = httpx.post(f"{server.url}/v1/sessions", json={"host_id": "bad id!"}, headers=AUTH)
    assert r.status_code == 422 and "host_id" in r.text


def test_drain_stops_new_placements_and_running_sessions_go_on(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        running = sdk.create_and_wait(memory_mb=1024, host_id=a)
        drained = sdk.hosts.drain(a)
        assert drained.state == HostState.DRAINING and drained.sessions == 1
        assert sdk.hosts.drain(a).state == HostState.DRAINING  # idempotent
        for _ in range(3):
            assert sdk.create_and_wait(memory_mb=1024).record.host_id == b
        assert running.exec("echo", "still here").stdout == "still here\n"
        assert sdk.hosts.undrain(a).state == HostState.ACTIVE
        assert sdk.create_and_wait(memory_mb=1024).record.host_id == a  # the one with room


def test_remove_refuses_while_sessions_run_unless_forced(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        s = sdk.create_and_wait(memory_mb=1024, host_id=b)
        with pytest.raises(ConflictError, match="1 live sessions"):
            sdk.hosts.remove(b)
        sdk.hosts.remove(b, force=True)
        ended = sdk.get(s.id).record
        assert (ended.state, ended.state_reason) == (SessionState.TERMINATED, "host removed")
        assert s.id not in fakes[b].vms  # it answered: its VM was stopped through it
        assert [h.host_id for h in sdk.hosts.list()] == [a]
        with pytest.raises(HostNotFoundError):
            sdk.hosts.remove(b)
        sdk.hosts.remove(a)  # nothing on it: no force needed
        with pytest.raises(CapacityUnavailableError, match="no ACTIVE host"):
            sdk.create(memory_mb=1024)


# -- host loss -------------------------------------------------------------------------------------


def test_a_silent_host_is_lost_its_sessions_end_and_it_may_come_back(
        make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    server.call(setattr, server.plane.hosts, "lost_after_s", 1.0)
    with Client(endpoint=server.url) as sdk:
        on_a = sdk.create_and_wait(memory_mb=1024, host_id=a)
        snap = sdk.create_snapshot_and_wait(on_a.id)
        on_b = sdk.create_and_wait(memory_mb=1024, host_id=b)
        # b keeps beating, a is silent
        until_lost(server, sdk, a, b)
        lost = sdk.get_host(a)
        assert "no heartbeat" in (lost.state_reason or "")
        until(lambda: sdk.get(on_a.id).record.state == SessionState.TERMINATED)
        ended = sdk.get(on_a.id).record
        assert ended.state_reason == "host lost" and ended.host_id == a
        assert sdk.get(on_b.id).record.state == SessionState.READY  # the other host's runs on
        assert sdk.get_snapshot(snap.id).state.value == "READY"  # snapshots stay
        # a lost host's heartbeat is refused: it registers again, owning nothing
        r = heartbeat(server, a, vms=[on_a.id])
        assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
        back = register(server, A, host_id=a).json()
        assert (back["host_id"], back["state"], back["owned"]) == (a, "ACTIVE", [])
        assert sdk.create_and_wait(memory_mb=1024, host_id=a).record.host_id == a


def test_a_restarted_control_plane_counts_a_hosts_silence_from_its_own_start(
        make_inproc: MakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hosts' heartbeats failed while no control plane listened: a new one judges their
    silence from when it started, not from their last heartbeat before it."""
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    by_address = {address: fakes[host_id] for host_id, address, _ in server.connected}
    server.crash()
    # their last heartbeats, a minute ago: the control plane was down since
    store = open_test_store(server.home, server.database_url)
    try:
        with store.tx() as orm:
            for row in orm.query(HostRow):
                row.last_heartbeat_at = datetime.now(UTC) - timedelta(seconds=60)
    finally:
        store.close()
    monkeypatch.setenv("TENKI_HOST_LOST_AFTER_S", "2")
    again = make_inproc(home=server.home, workers=by_address, local_host=False)
    again.run(again.plane.hosts.sweep())  # at once, before any heartbeat reached it
    with Client(endpoint=again.url) as sdk:
        assert {h.host_id: h.state for h in sdk.hosts.list()} == {
            a: HostState.ACTIVE, b: HostState.ACTIVE}
        assert heartbeat(again, a).status_code == 200
        # the silence it can judge still counts: b beats, a no more
        until_lost(again, sdk, a, b, timeout=15)
        assert sdk.get_host(b).state == HostState.ACTIVE


def test_a_control_plane_whose_loop_was_held_does_not_lose_the_hosts_it_could_not_hear(
        make_inproc: MakeServer) -> None:
    """Its loop held (synchronous work, or no CPU for it) longer than a host may be silent, a
    control plane reads the heartbeats that arrived meanwhile only after it: it allows its
    hosts that much more before it judges them lost, and still judges a silent one."""
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    hosts = server.plane.hosts
    server.call(setattr, hosts, "lost_after_s", 1.0)
    deadline = time.monotonic() + 1.5  # a few sweeps: the control plane hears its hosts
    while time.monotonic() < deadline:
        for host_id in fakes:
            assert heartbeat(server, host_id).status_code == 200
        time.sleep(0.2)

    async def held() -> None:
        time.sleep(1.5)  # the loop is held: no heartbeat is read, no probe runs
        await hosts.sweep()  # before any heartbeat read since

    server.run(held())
    with Client(endpoint=server.url) as sdk:
        assert {h.state for h in sdk.hosts.list()} == {HostState.ACTIVE}
        # the holding lies behind: a silent host is lost again, within the delay and that much
        until_lost(server, sdk, a, b, timeout=15)
        assert sdk.get_host(b).state == HostState.ACTIVE


def test_a_host_lost_while_a_create_is_placed_is_passed_over(
        make_inproc: MakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that leaves the fleet between the choice of candidates and the record naming
    one (lost by the sweep meanwhile) is skipped for the next one; pinned to it, the create
    is a conflict naming it."""
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    hosts = server.plane.hosts
    with Client(endpoint=server.url) as sdk:
        source = sdk.create_and_wait(memory_mb=1024, host_id=b)
        snap = sdk.create_snapshot_and_wait(source.id)
        source.terminate()

        async def lost_while_asked(digests: list[str]) -> int:
            # what the sweep does to a silent host, while the create awaits this answer
            await hosts.records.transition(HostRow, a, HostState.LOST,
                                           expected=[HostState.ACTIVE], state_reason="test")
            await hosts.fleet.close_member(hosts.fleet.discard(a))
            return 10**9  # a would have been preferred: it "caches" everything

        monkeypatch.setattr(fakes[a], "cached_bytes", lost_while_asked)
        clone = sdk.restore_snapshot(snap.id)
        assert clone.record.host_id == b
        clone.wait_ready()
        with pytest.raises(ConflictError) as err:
            sdk.create(memory_mb=1024, host_id=a)
        assert a in err.value.message


# -- routing ----------------------------------------------------------------------------------


def test_exec_and_files_reach_the_host_of_the_session(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        sa = sdk.create_and_wait(memory_mb=1024, host_id=a)
        sb = sdk.create_and_wait(memory_mb=1024, host_id=b)
        sa.files.write("/root/where", "on a")
        sb.files.write("/root/where", "on b")
        assert fakes[a].file(sa.id, "/root/where") == b"on a"
        assert fakes[b].file(sb.id, "/root/where") == b"on b"
        assert sa.exec("cat", "/root/where").stdout == "on a"
        assert sb.files.read("/root/where") == b"on b"
        assert fakes[a].calls_to("start_process") == [sa.id]
        assert fakes[b].calls_to("start_process") == []
        sa.terminate()
        assert fakes[a].calls_to("terminate") == [sa.id] and sa.id not in fakes[a].vms
        assert fakes[b].calls_to("terminate") == []


def test_a_restore_prefers_the_host_that_caches_the_snapshot_unless_it_is_much_fuller(
        make_inproc: MakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server, fakes = two_workers(make_inproc, memory_mib=20480)
    a, b = sorted(fakes)
    # one bucket for both (the fakes' stores are one), but a's local cache holds nothing
    fakes[a].artifacts = fakes[b].artifacts
    fakes[a].saved = fakes[b].saved
    fakes[a].stored_sizes = fakes[b].stored_sizes

    async def nothing_cached(digests: list[str]) -> int:
        return 0

    monkeypatch.setattr(fakes[a], "cached_bytes", nothing_cached)
    capacity = fakes[b].capacity.memory_capacity_mib
    with Client(endpoint=server.url) as sdk:
        source = sdk.create_and_wait(memory_mb=1024, host_id=b)
        source.files.write("/root/data", "kept")
        snap = sdk.create_snapshot_and_wait(source.id)
        # b is a little fuller (the source runs there), but only b caches the artifacts
        clone = sdk.restore_snapshot(snap.id)
        assert clone.record.host_id == b
        clone.wait_ready()
        assert clone.files.read("/root/data") == b"kept"
        # b fuller than a by more than the cache is worth: a, which fetches the files
        sdk.create_and_wait(memory_mb=int(capacity * CACHE_PREFERENCE) + 1, host_id=b)
        far = sdk.restore_snapshot(snap.id)
        assert far.record.host_id == a
        far.wait_ready()
        assert far.files.read("/root/data") == b"kept"  # restored on another host
        # once a caches them too, room alone decides
        monkeypatch.undo()
        other = sdk.restore_snapshot(snap.id)
        assert other.record.host_id == a
        other.wait_ready()


def test_volumes_stay_on_their_host_and_bring_their_sessions(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        v1 = sdk.create_volume("one", "1MiB")
        v2 = sdk.create_volume("two", "1MiB")
        assert {v1.host_id, v2.host_id} == {a, b}  # the host with fewest volumes
        assert v1.id in fakes[v1.host_id or ""].volumes
        for _ in range(2):  # whatever the room says, the volume's host
            s = sdk.create_and_wait(memory_mb=1024, volumes=[f"{v1.id}:/data"])
            assert s.record.host_id == v1.host_id
            s.terminate()
        other = b if v1.host_id == a else a
        with pytest.raises(ValidationError) as err:
            sdk.create(memory_mb=1024, volumes=[f"{v1.id}:/data"], host_id=other)
        assert err.value.field == "host_id"
        with pytest.raises(ValidationError) as err:
            sdk.create(memory_mb=1024, volumes=[f"{v1.id}:/a", f"{v2.id}:/b"])
        assert err.value.field == "volumes"
        elsewhere = sdk.create_and_wait(memory_mb=1024, host_id=other)
        with pytest.raises(ConflictError, match="stays on its host"):
            elsewhere.attach_volume(v1.id, "/data")
        sdk.delete_volume(v1.id)
        assert v1.id not in fakes[v1.host_id or ""].volumes


def test_concurrent_creates_spread_over_the_hosts(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)

    def create(_: int) -> str | None:
        with Client(endpoint=server.url) as sdk:
            return sdk.create_and_wait(memory_mb=512).record.host_id

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        placed = list(pool.map(create, range(10)))
    counts = {h: placed.count(h) for h in fakes}
    assert counts == {h: 5 for h in fakes}, counts
    assert {h: len(f.vms) for h, f in fakes.items()} == counts


def test_a_vm_gone_on_a_host_the_session_left_is_not_its_death(make_inproc: MakeServer) -> None:
    """The record decides: a VM of the session that dies on another host (a partitioned host
    that kept it) does not fail the session that runs where its record says."""
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    with Client(endpoint=server.url) as sdk:
        s = sdk.create_and_wait(memory_mb=1024, host_id=a)
        fakes[b].seed_vm(s.id)  # a stale copy on b
        fakes[b].kill_vm(s.id, "fenced")
        time.sleep(0.3)
        assert sdk.get(s.id).record.state == SessionState.READY
        fakes[a].kill_vm(s.id, "qemu died")
        until(lambda: sdk.get(s.id).record.state == SessionState.FAILED)


def test_a_host_registering_again_without_a_vm_fails_its_session(
        make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, _ = sorted(fakes)
    server.call(setattr, server.plane.hosts, "heartbeat_interval_s", 0.1)
    with Client(endpoint=server.url) as sdk:
        kept = sdk.create_and_wait(memory_mb=1024, host_id=a)
        gone = sdk.create_and_wait(memory_mb=1024, host_id=a)
        time.sleep(0.3)  # both READY for longer than an interval
        back = register(server, A, host_id=a, vms=[kept.id]).json()
        assert back["owned"] == [kept.id]
        ended = sdk.get(gone.id).record
        assert ended.state == SessionState.FAILED
        assert ended.state_reason == f"its VM was gone when host {a} registered again"
        assert sdk.get(kept.id).record.state == SessionState.READY


def test_a_paused_session_outlives_its_host_and_resumes_on_another(
        make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    fakes[b].artifacts = fakes[a].artifacts  # one bucket
    fakes[b].saved = fakes[a].saved
    server.call(setattr, server.plane.hosts, "lost_after_s", 1.0)
    with Client(endpoint=server.url) as sdk:
        s = sdk.create_and_wait(memory_mb=1024, host_id=a)
        s.files.write("/root/state", "before the pause")
        s.pause()
        assert sdk.get(s.id).record.state == SessionState.PAUSED
        until_lost(server, sdk, a, b)  # a is silent, b beats
        assert sdk.get(s.id).record.state == SessionState.PAUSED  # no VM: nothing was lost
        s.resume()
        resumed = sdk.get(s.id)
        assert (resumed.record.state, resumed.record.host_id) == (SessionState.READY, b)
        assert resumed.files.read("/root/state") == b"before the pause"
        assert s.id in fakes[b].vms and fakes[b].restores[-1].keep_identity


def test_a_restarted_control_plane_reconnects_its_hosts_and_keeps_their_sessions(
        make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    by_address = {address: fakes[host_id] for host_id, address, _ in server.connected}
    with Client(endpoint=server.url) as sdk:
        on_a = sdk.create_and_wait(memory_mb=1024, host_id=a)
        on_b = sdk.create_and_wait(memory_mb=1024, host_id=b)
    server.crash()
    # the hosts ran on; a new control plane finds them in the records, with their secrets
    again = make_inproc(home=server.home, workers=by_address, local_host=False)
    assert sorted(again.connected) == sorted(server.connected)
    with Client(endpoint=again.url) as sdk:
        for s, host_id in ((on_a, a), (on_b, b)):
            record = sdk.get(s.id).record
            assert (record.state, record.host_id) == (SessionState.READY, host_id)
            assert sdk.get(s.id).exec("echo", "alive").stdout == "alive\n"
        assert {h.host_id: h.state for h in sdk.hosts.list()} == {
            a: HostState.ACTIVE, b: HostState.ACTIVE}


def test_a_network_policy_goes_to_a_host_that_enforces_it(make_inproc: MakeServer) -> None:
    server, fakes = two_workers(make_inproc)
    a, b = sorted(fakes)
    fakes[b].network_enforced = False  # no root, no nftables there
    with Client(endpoint=server.url) as sdk:
        for _ in range(3):  # whatever the room says
            s = sdk.create_and_wait(memory_mb=1024, allow_inbound=True)
            assert s.record.host_id == a
        assert sdk.create_and_wait(memory_mb=1024).record.host_id == b  # the default: anywhere
        with pytest.raises(NetworkPolicyUnsupportedError) as err:
            sdk.create(memory_mb=1024, allow_outbound=False, host_id=b)
        assert err.value.field == "allow_outbound" and f"host {b}" in err.value.message
        sdk.hosts.drain(a)
        with pytest.raises(NetworkPolicyUnsupportedError) as err:
            sdk.create(memory_mb=1024, allow_inbound=True)
        assert "no ACTIVE host can enforce it" in err.value.message

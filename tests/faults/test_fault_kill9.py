"""kill -9 of the server at every named step of boot, restore, capture, delete, terminate and pause.

Each case restarts the module's server with ``TENKI_FAULT=plan.step[:after]`` (the server
SIGKILLs itself when that step starts, or ends with ``:after``), starts the operation, waits
for the server to die, restarts it without the fault and checks the settled-state invariant
(``faultlib.assert_settled``) plus what the operation must have become.

One source session and one READY snapshot (``baseline``) serve the whole module; boots come
first so that the baseline is old enough for a stale guest clock to show after a restore.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faultlib as fl
import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

BOOT_STEPS = ["image", "overlay", "network", "network:after", "launch", "launch:after", "roms",
              "agent", "clock"]
RESTORE_STEPS = ["verify", "overlay", "load-ram", "network", "network:after", "launch",
                 "launch:after", "wire", "load-state", "resume", "agent", "agent:after"]
# ``agent``: the built image's agent (0.5.2) sets the clock and identity inside the restore's
# first request, so the older agents' ``settle`` (or ``clock`` and ``identity``) steps do not
# happen here
# a booted session (its RAM in a memfd) is captured by the pages it touched (``host/written.py``):
# copied ahead while it runs, then stopped and the pages written since copied
CAPTURE_STEPS = ["copy-ahead", "pause", "freeze-disk", "device-state", "copy-written", "resume",
                 "convert", "compress-ram", "checksum", "sync", "sync:after"]
# a session restored from a snapshot that wrote little is captured by its written pages (at
# ``prepare:after`` the copy's target is allocated and the guest still runs; at ``copy-ahead``
# its QEMU's writes are tracked, engine/writetrack.py, and stay so when the server dies)
WRITTEN_STEPS = ["prepare:after", "copy-ahead", "pause", "copy-written", "copy-written:after",
                 "convert", "compress-ram"]
# one that wrote more than ``written.limit`` is saved live
LIVE_STEPS = ["pre-copy", "device-state", "convert"]
DELETE_STEPS = ["mark", "remove-files"]
TERMINATE_STEPS = ["flush-volumes", "stop-vm", "stop-vm:after", "cleanup"]
# a pause is a capture (the guest left paused), then the VM's stop
PAUSE_STEPS = ["capture.device-state", "capture.sync:after", "terminate.stop-vm",
               "terminate.stop-vm:after"]

FAULT_WAIT_S = 120.0
MIN_SNAPSHOT_AGE_S = 45.0  # a restored guest's clock is this far behind until corrected


@dataclass
class World:
    source: Any  # SDK Session
    hostname: str
    machine_id: str
    baseline: str  # snapshot id
    baseline_at: float


def _make_world(client: Any) -> World:
    src = fl.new_source(client, "kill9-source")
    snap = client.create_snapshot_and_wait(src.id, "baseline", timeout=300)
    return World(src, fl.sh(src, "hostname"), fl.sh(src, "cat /etc/machine-id"), snap.id,
                 time.time())


@pytest.fixture(scope="module")
def server(faulty_server: Callable[..., fl.FaultServer]) -> fl.FaultServer:
    """This module's server: a restored session is saved live past a quarter of its RAM (at
    ``TENKI_DIRECT_MAX_MIB``'s default, a 512 MiB guest never is)."""
    return faulty_server({"TENKI_DIRECT_MAX_MIB": "64"})


@pytest.fixture(scope="module")
def world(server: fl.FaultServer, client: Any) -> World:
    return _make_world(client)


@pytest.fixture
def live(world: World, server: fl.FaultServer, client: Any) -> World:
    """The module's world, repaired when an earlier case broke it (that case failed already)."""
    if not server.alive():
        server.restart()
    src_ok = fl.get_session(server, world.source.id)["state"] in fl.LIVE
    snap = fl.get_snapshot(server, world.baseline)
    if not src_ok or snap is None or snap["state"] != "READY":
        fresh = _make_world(client)
        world.__dict__.update(fresh.__dict__)
    return world


def _known(server: fl.FaultServer) -> tuple[set[str], set[str]]:
    return ({s["id"] for s in fl.list_sessions(server)},
            {s["id"] for s in fl.list_snapshots(server)})


def _tidy(server: fl.FaultServer, world: World) -> None:
    """Remove what a case made (sessions other than the source, snapshots other than the
    baseline), so that every case starts from the same world."""
    if not server.alive():
        server.restart()
    with server.http() as api:
        for s in fl.list_sessions(server):
            if s["id"] != world.source.id and s["state"] not in ("TERMINATED", "FAILED"):
                api.delete(f"/v1/sessions/{s['id']}")
        for s in fl.list_snapshots(server):
            if s["id"] != world.baseline and s["state"] in ("READY", "FAILED"):
                api.delete(f"/v1/snapshots/{s['id']}")
    deadline = time.monotonic() + 30
    while any(s["state"] == "DELETING" for s in fl.list_snapshots(server)) \
            and time.monotonic() < deadline:
        time.sleep(0.2)


def inject(server: fl.FaultServer, fault: str, start: Callable[[httpx.Client], Any],
           finished: Callable[[], bool]) -> None:
    """Restart the server with ``fault``, run ``start`` (an HTTP call that may die with the
    server), wait until the server died of the fault, restart it without the fault."""
    server.with_fault(fault)
    with server.http() as api:
        try:
            start(api)
        except httpx.TransportError:
            pass  # the server died while answering
    deadline = time.monotonic() + FAULT_WAIT_S
    done_at: float | None = None
    status: int | None = None
    while time.monotonic() < deadline:
        status = server.wait_dead(0.2)
        if status is not None:
            break
        try:
            if done_at is None and finished():
                done_at = time.monotonic()
        except httpx.HTTPError:
            pass
        if done_at is not None and time.monotonic() - done_at > 2.0:
            break
    log = server.log_tail(20000)
    if status is None:
        server.restart()
        pytest.fail(f"TENKI_FAULT={fault} did not fire: the operation "
                    f"{'finished' if done_at else 'did not finish'} and the server is still "
                    "running (no fault point with that name?)", pytrace=False)
    assert status == -signal.SIGKILL, f"server exited with {status}, not SIGKILL: {log[-2000:]}"
    assert fault in log, f"the server was SIGKILLed, but its log does not name {fault}: " \
                         f"{log[-2000:]}"
    server.restart()


# -- boot ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", BOOT_STEPS)
def test_kill_during_boot(server: fl.FaultServer, live: World, step: str) -> None:
    made: dict[str, str] = {}

    def start(api: httpx.Client) -> None:
        r = api.post("/v1/sessions", json={"name": f"boot-{step}", "memory_mb": 512, "cpu": 1})
        assert r.status_code == 201, r.text
        made["id"] = r.json()["id"]

    def finished() -> bool:
        return "id" not in made or \
            fl.get_session(server, made["id"])["state"] not in fl.SESSION_MOVING

    try:
        before, _ = _known(server)
        inject(server, f"boot.{step}", start, finished)
        sid = made.get("id") or _new_one(server, before)
        rec = fl.wait_session_state(server, sid, {"READY", "RUNNING", "FAILED", "TERMINATED"},
                                    fl.SETTLE_S)
        assert rec["state"] in ("READY", "FAILED"), rec
        if rec["state"] == "FAILED":
            assert rec["state_reason"], rec
        else:
            with server.client() as c:
                s = c.get(sid)
                assert fl.sh(s, "echo ok") == "ok"
                assert fl.guest_clock_skew(s) < 3.0
        fl.assert_settled(server)
    finally:
        _tidy(server, live)


def _new_one(server: fl.FaultServer, before: set[str]) -> str:
    new = [s["id"] for s in fl.list_sessions(server) if s["id"] not in before]
    assert len(new) == 1, f"expected one new session, found {new}"
    return new[0]


# -- restore ------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", RESTORE_STEPS)
def test_kill_during_restore(server: fl.FaultServer, live: World, step: str) -> None:
    age = time.time() - live.baseline_at
    if age < MIN_SNAPSHOT_AGE_S:
        time.sleep(MIN_SNAPSHOT_AGE_S - age)
    made: dict[str, str] = {}

    def start(api: httpx.Client) -> None:
        r = api.post("/v1/sessions", json={"snapshot_id": live.baseline,
                                           "name": f"restore-{step}"})
        if r.status_code == 201:
            made["id"] = r.json()["id"]

    def finished() -> bool:
        return "id" not in made or \
            fl.get_session(server, made["id"])["state"] not in fl.SESSION_MOVING

    try:
        before, _ = _known(server)
        inject(server, f"restore.{step}", start, finished)
        sid = made.get("id") or _new_one(server, before)
        rec = fl.wait_session_state(server, sid, {"READY", "RUNNING", "FAILED", "TERMINATED"},
                                    fl.SETTLE_S)
        assert rec["state"] in ("READY", "FAILED"), rec
        if rec["state"] == "FAILED":
            assert rec["state_reason"], rec
        else:
            # recovery finished the restore: a new identity and a corrected clock
            with server.client() as c:
                s = c.get(sid)
                assert fl.sh(s, "hostname") != live.hostname, \
                    "a restored session ended READY with the source's hostname"
                assert fl.sh(s, "cat /etc/machine-id") != live.machine_id, \
                    "a restored session ended READY with the source's machine-id"
                skew = fl.guest_clock_skew(s)
                assert skew < 3.0, f"a restored session ended READY with its clock {skew:.1f}s off"
                assert s.files.read_text(fl.MARKER_PATH) == fl.MARKER
                assert fl.counting(s), "the restored guest does not run"
        fl.assert_settled(server)
    finally:
        _tidy(server, live)


# -- terminate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("step", TERMINATE_STEPS)
def test_kill_during_terminate(server: fl.FaultServer, client: Any, live: World,
                               step: str) -> None:
    victim = client.create_and_wait(snapshot_id=live.baseline, name=f"term-{step}", timeout=120)
    pids = fl.qemu_pids(server, victim.id)
    assert len(pids) == 1, fl.vm_processes(server)

    def start(api: httpx.Client) -> None:
        api.delete(f"/v1/sessions/{victim.id}")

    def finished() -> bool:
        return fl.get_session(server, victim.id)["state"] in ("TERMINATED", "FAILED")

    try:
        inject(server, f"terminate.{step}", start, finished)
        rec = fl.wait_session_state(server, victim.id, {"TERMINATED", "FAILED"}, fl.SETTLE_S)
        assert rec["state"] == "TERMINATED", rec
        assert not fl.wait_gone(pids, 5.0), f"QEMU of terminated {victim.id} still runs"
        fl.assert_settled(server)
    finally:
        _tidy(server, live)


# -- delete -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_kill_during_delete(server: fl.FaultServer, client: Any, live: World, step: str) -> None:
    snap = client.create_snapshot_and_wait(live.source.id, f"del-{step}", timeout=300)

    def start(api: httpx.Client) -> None:
        api.delete(f"/v1/snapshots/{snap.id}")

    def finished() -> bool:
        rec = fl.get_snapshot(server, snap.id)
        return rec is None or rec["state"] == "DELETED"

    try:
        inject(server, f"delete.{step}", start, finished)
        rec = fl.wait_snapshot_state(server, snap.id, {"DELETED"}, fl.SETTLE_S)
        assert rec is not None and rec["state"] == "DELETED", rec
        assert snap.id not in {s["id"] for s in fl.list_snapshots(server)}
        fl.assert_settled(server)
    finally:
        _tidy(server, live)


# -- capture (last: it risks the shared source) -------------------------------------------------


@pytest.mark.parametrize("step", CAPTURE_STEPS)
def test_kill_during_capture(server: fl.FaultServer, live: World, step: str) -> None:
    _kill_capture(server, live, live.source.id, step)


@pytest.mark.parametrize("step", WRITTEN_STEPS)
def test_kill_during_capture_of_a_restored_session(server: fl.FaultServer, client: Any,
                                                   live: World, step: str) -> None:
    victim = client.create_and_wait(snapshot_id=live.baseline, name=f"restored-{step}",
                                    timeout=300)

    def capture_again() -> None:
        # the server died with the victim's writes tracked: the next server's capture takes
        # the registration it finds, and what it captures restores
        fl.sh(victim, "head -c 8M /dev/urandom > /dev/shm/again")
        want = fl.sh(victim, "md5sum /dev/shm/again")
        snap = client.create_snapshot_and_wait(victim.id, "after-crash", timeout=300)
        clone = client.create_and_wait(snapshot_id=snap.id, name="after-crash", timeout=300)
        try:
            assert fl.sh(clone, "md5sum /dev/shm/again") == want
        finally:
            clone.terminate()

    _kill_capture(server, live, victim.id, step,
                  then=capture_again if step == "copy-ahead" else None)


@pytest.mark.parametrize("step", LIVE_STEPS)
def test_kill_during_live_capture_of_a_restored_session(server: fl.FaultServer, client: Any,
                                                        live: World, step: str) -> None:
    victim = client.create_and_wait(snapshot_id=live.baseline, name=f"live-{step}",
                                    timeout=300)
    # more than ``written.limit`` of a 512 MiB guest here (128 MiB: ``server``)
    fl.sh(victim, "head -c 160M /dev/urandom > /dev/shm/more")
    _kill_capture(server, live, victim.id, step)


def _kill_capture(server: fl.FaultServer, live: World, source_id: str, step: str,
                  then: Callable[[], None] | None = None) -> None:
    """``then``: more checks of the case, before what it made is removed."""
    made: dict[str, str] = {}

    def start(api: httpx.Client) -> None:
        r = api.post("/v1/snapshots", json={"session_id": source_id, "name": f"cap-{step}"})
        assert r.status_code == 202, r.text
        made["id"] = r.json()["id"]

    def finished() -> bool:
        if "id" not in made:
            return True
        rec = fl.get_snapshot(server, made["id"])
        return rec is None or rec["state"] not in fl.SNAPSHOT_MOVING

    try:
        _, before = _known(server)
        inject(server, f"capture.{step}", start, finished)
        snap_id = made.get("id")
        if snap_id is None:
            new = [s["id"] for s in fl.list_snapshots(server) if s["id"] not in before]
            assert len(new) <= 1, new
            snap_id = new[0] if new else None
        if snap_id is not None:
            rec = fl.wait_snapshot_state(server, snap_id, {"READY", "FAILED"}, fl.SETTLE_S)
            assert rec is not None and rec["state"] in ("READY", "FAILED"), rec
            if rec["state"] == "FAILED":
                assert rec["state_reason"], rec
        src = fl.get_session(server, source_id)
        assert src["state"] in fl.LIVE, f"the source did not survive: {src}"
        with server.client() as c:
            s = c.get(source_id)
            assert fl.sh(s, "echo ok") == "ok"
            assert fl.counting(s), "the source was left paused"
        fl.assert_settled(server)  # a READY snapshot made by the case is restored there
        if then is not None:
            then()
    finally:
        _tidy(server, live)


# -- pause (a session of its own per case) -------------------------------------------------------


@pytest.mark.parametrize("fault", PAUSE_STEPS)
def test_kill_during_pause(server: fl.FaultServer, client: Any, live: World, fault: str) -> None:
    """Whatever the step, the session ends READY with its VM running on (the capture or the stop
    cut short) or PAUSED with a READY PAUSE snapshot and no VM; either way it goes on: a
    resume brings back its marker and its counter (``assert_settled``)."""
    victim = fl.new_source(client, f"pause-{fault.replace(':', '-').replace('.', '-')}")
    try:
        def start(api: httpx.Client) -> None:
            r = api.post(f"/v1/sessions/{victim.id}/pause")
            assert r.status_code in (200, 202), r.text

        def finished() -> bool:
            return fl.get_session(server, victim.id)["state"] not in fl.SESSION_MOVING

        inject(server, fault, start, finished)
        rec = fl.wait_session_state(server, victim.id, fl.LIVE | {"PAUSED", "FAILED"},
                                    fl.SETTLE_S)
        assert rec["state"] in fl.LIVE | {"PAUSED"}, f"the paused session was lost: {rec}"
        if rec["state"] in fl.LIVE:
            with server.client() as c:
                s = c.get(victim.id)
                assert fl.sh(s, f"cat {fl.MARKER_PATH}") == fl.MARKER.strip()
                assert fl.counting(s), "the session was left paused"
        fl.assert_settled(server)  # a PAUSED one is resumed there, its marker read back
        assert fl.get_session(server, victim.id)["state"] in fl.LIVE
    finally:
        _tidy(server, live)

"""Races and deaths around a session's life: terminates of a session still CREATING, a storm of
terminates, snapshots and restores on one session, and the VM's own processes dying (QEMU, the
network helper) or parts of its network (namespace, host table, veth pair) removed under a READY
session.

One server, one source session and one READY snapshot serve the module; the sessions that are
raced or killed are restored from that snapshot (a restore is much cheaper than a boot).
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faultlib as fl
import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUICK_S = 10.0  # "within a few seconds", with room for a loaded 2-core machine


@pytest.fixture(scope="module")
def baseline(server: fl.FaultServer, client: Any) -> str:
    src = fl.new_source(client, "lifecycle-source")
    return str(client.create_snapshot_and_wait(src.id, "baseline", timeout=300).id)


def _restore(server: fl.FaultServer, snapshot_id: str, name: str) -> str:
    with server.http() as api:
        r = api.post("/v1/sessions", json={"snapshot_id": snapshot_id, "name": name})
        assert r.status_code == 201, r.text
        sid = str(r.json()["id"])
    rec = fl.wait_session_state(server, sid, fl.LIVE | {"FAILED", "TERMINATED"}, 120)
    assert rec["state"] in fl.LIVE, rec
    return sid


def _error_shape(r: httpx.Response) -> None:
    assert r.status_code < 500, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body


# -- terminates of a session still CREATING -----------------------------------------------------


@pytest.mark.parametrize("kind", ["boot", "restore"])
@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_double_terminate_while_creating(server: fl.FaultServer, baseline: str, kind: str,
                                         delay: float) -> None:
    body: dict[str, Any] = ({"memory_mb": 512, "cpu": 1} if kind == "boot"
                            else {"snapshot_id": baseline})
    with fl.ProcWatch(server) as watch, server.http() as api:
        r = api.post("/v1/sessions", json={**body, "name": f"dbl-{kind}"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert r.json()["state"] == "CREATING"
        time.sleep(delay)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(
                lambda _: httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=60,
                                       headers=fl.AUTH),
                range(2)))
        returned = time.monotonic()
        for a in answers:
            _error_shape(a)
            assert a.status_code == 200, a.text
            assert a.json()["state"] in ("TERMINATING", "TERMINATED"), a.json()
        rec = fl.wait_session_state(server, sid, {"TERMINATED", "FAILED", "READY"}, QUICK_S)
        assert rec["state"] == "TERMINATED", rec
        launched = [p.pid for p in watch.seen.values() if p.owner == sid]
    left = fl.wait_gone(launched, max(0.5, QUICK_S - (time.monotonic() - returned)))
    assert not left, f"QEMU of terminated {sid} still runs: {left}"
    assert not fl.qemu_pids(server, sid)
    # further terminates are harmless
    for _ in range(2):
        again = httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=60, headers=fl.AUTH)
        assert again.status_code == 200 and again.json()["state"] == "TERMINATED", again.text
    time.sleep(1.0)  # a boot that was not really stopped would come back now
    assert fl.get_session(server, sid)["state"] == "TERMINATED"
    assert not fl.qemu_pids(server, sid)
    fl.assert_settled(server, restore=False)


# -- a storm on one session ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_concurrent_terminates_snapshots_restores(server: fl.FaultServer, baseline: str,
                                                  seed: int) -> None:
    target = _restore(server, baseline, f"storm-{seed}")
    rng = random.Random(seed)
    ops: list[tuple[str, str, dict[str, Any] | None]] = (
        [("DELETE", f"/v1/sessions/{target}", None)] * 2
        + [("POST", "/v1/snapshots", {"session_id": target, "name": f"storm-{seed}-{i}"})
           for i in range(3)]
        + [("POST", "/v1/sessions", {"snapshot_id": baseline, "name": f"storm-{seed}-r{i}"})
           for i in range(2)]
        + [("POST", f"/v1/sessions/{target}/processes", {"argv": ["sync"]})] * 3
    )
    rng.shuffle(ops)
    barrier = threading.Barrier(len(ops))

    def call(op: tuple[str, str, dict[str, Any] | None]) -> httpx.Response:
        method, path, body = op
        with httpx.Client(base_url=server.url, timeout=120, headers=fl.AUTH) as api:
            barrier.wait(30)
            time.sleep(rng.random() * 0.3)
            return api.request(method, path, json=body)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(ops)) as pool:
        answers = list(pool.map(call, ops))
    # the storm settles in seconds: the target ends TERMINATED, every record steady
    rec = fl.wait_session_state(server, target, {"TERMINATED", "FAILED"}, QUICK_S)
    assert rec["state"] == "TERMINATED", rec
    deadline = started + 60
    while time.monotonic() < deadline:
        moving = [s for s in fl.list_sessions(server) if s["state"] in fl.SESSION_MOVING] + \
                 [s for s in fl.list_snapshots(server) if s["state"] in fl.SNAPSHOT_MOVING]
        if not moving:
            break
        time.sleep(0.3)
    assert not moving, f"not settled 60s after the storm: {moving}"
    fl.assert_settled(server)
    for a in answers:  # every answer a success or a 4xx in the one error format
        _error_shape(a)
    # tidy: the restores and the snapshots of the storm
    with server.http() as api:
        for a in answers:
            if a.status_code in (201, 202) and a.request.url.path in ("/v1/sessions",
                                                                      "/v1/snapshots"):
                rid = a.json()["id"]
                kind = "sessions" if rid.startswith("ses_") else "snapshots"
                api.delete(f"/v1/{kind}/{rid}")


# -- the VM's processes die ----------------------------------------------------------------------


def test_qemu_killed_under_a_ready_session(server: fl.FaultServer, baseline: str) -> None:
    sid = _restore(server, baseline, "qemu-victim")
    pids = fl.qemu_pids(server, sid)
    assert len(pids) == 1, fl.vm_processes(server)
    helpers = fl.passt_pids(server, sid)
    os.kill(pids[0], signal.SIGKILL)
    rec = fl.wait_session_state(server, sid, {"FAILED", "TERMINATED"}, QUICK_S)
    assert rec["state"] in ("FAILED", "TERMINATED"), \
        f"QEMU was killed {QUICK_S:.0f}s ago and the session is still {rec['state']}"
    reason = rec["state_reason"] or ""
    assert "QEMU" in reason or "VM" in reason, f"the reason does not say the VM died: {reason!r}"
    assert not fl.wait_gone(helpers, QUICK_S), "the network helper outlived its VM"
    fl.assert_settled(server)


def test_network_namespace_removed_under_a_ready_session(server: fl.FaultServer,
                                                         baseline: str) -> None:
    """The guest network of a VM is its namespace (host/network): removed from outside, the
    guest has no network left, so the session must not stay READY."""
    sid = _restore(server, baseline, "netns-victim")
    [netns] = [p for p in Path("/run/netns").glob(f"tenki-*-{sid}")]
    qemu = fl.qemu_pids(server, sid)
    subprocess.run(["ip", "netns", "delete", netns.name], check=True)
    rec = fl.wait_session_state(server, sid, {"FAILED", "TERMINATED"}, QUICK_S)
    assert rec["state"] == "FAILED", rec
    assert "network" in (rec["state_reason"] or ""), rec
    assert not fl.wait_gone(qemu, QUICK_S), "a FAILED session's QEMU still runs"
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert sid not in tables, "the VM's host table outlived it"
    fl.assert_settled(server)


@pytest.mark.parametrize("part", ["table", "link"])
def test_network_part_removed_under_a_ready_session(server: fl.FaultServer, baseline: str,
                                                    part: str) -> None:
    """The VM's nftables table on the host (its egress policy) or the host end of its veth
    pair removed from outside: the guest's network is no longer what the session promises,
    so the session is FAILED with the reason, and nothing of it is left."""
    sid = _restore(server, baseline, f"net-{part}-victim")
    spaces, tables = fl.server_networks(server)
    assert sid in spaces and sid in tables, (spaces, tables)
    qemu = fl.qemu_pids(server, sid)
    if part == "table":
        subprocess.run(["nft", "delete", "table", "ip", tables[sid]], check=True)
        said = "nftables table"
    else:
        links = subprocess.run(["ip", "-n", spaces[sid], "-o", "link"], check=True,
                               capture_output=True, text=True).stdout
        [slot] = re.findall(r"\btkn(\d+)@", links)
        subprocess.run(["ip", "link", "delete", f"tkh{slot}"], check=True)
        said = f"tkh{slot}"
    rec = fl.wait_session_state(server, sid, {"FAILED", "TERMINATED"}, QUICK_S)
    assert rec["state"] == "FAILED", rec
    reason = rec["state_reason"] or ""
    assert "network" in reason and said in reason, reason
    assert not fl.wait_gone(qemu, QUICK_S), "a FAILED session's QEMU still runs"
    spaces, tables = fl.server_networks(server)
    assert sid not in spaces and sid not in tables, "the VM's network outlived it"
    fl.assert_settled(server)


def test_network_helper_killed_under_a_ready_session(
        faulty_server: Callable[..., fl.FaultServer]) -> None:
    """Where a host cannot build namespaces, VMs get the user-mode helper passt; if it dies,
    the session must not stay READY either (a server of its own, forced to passt)."""
    server = faulty_server({"TENKI_NET": "passt"}, name="passt")
    with server.client() as c:
        sid = c.create_and_wait(name="passt-victim", memory_mb=512, cpu=1, timeout=300).id
    helpers = fl.passt_pids(server, sid)
    assert len(helpers) == 1, [p.line() for p in fl.vm_processes(server)]
    os.kill(helpers[0], signal.SIGKILL)
    deadline = time.monotonic() + QUICK_S
    outcome = None
    while time.monotonic() < deadline and outcome is None:
        rec = fl.get_session(server, sid)
        if rec["state"] in ("FAILED", "TERMINATED"):
            outcome = "failed"
        elif rec["state"] in fl.LIVE:
            fresh = [p for p in fl.passt_pids(server, sid) if p not in helpers]
            if fresh:
                outcome = "restarted"
        time.sleep(0.2)
    assert outcome is not None, (
        f"the network helper of {sid} was killed {QUICK_S:.0f}s ago: the session is still "
        f"{fl.get_session(server, sid)['state']} and no helper was restarted")
    if outcome == "failed":
        reason = fl.get_session(server, sid)["state_reason"] or ""
        assert "network" in reason or "passt" in reason, \
            f"the reason does not name the network helper: {reason!r}"
        assert not fl.wait_gone(fl.qemu_pids(server, sid), QUICK_S), \
            "a FAILED session's QEMU still runs"
    else:
        with server.client() as c:
            s = c.get(sid)
            assert s.shell("getent hosts deb.debian.org", timeout=30).exit_code == 0, \
                "the network helper was restarted but the network does not work"
        httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=60, headers=fl.AUTH)
    fl.assert_settled(server)

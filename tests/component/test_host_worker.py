"""The host worker against a stub control plane (a tiny ASGI app that records what it is sent
and answers what the test says): registration, recovery of what the control plane says the host
owns, heartbeats, re-registration on 404, fencing with its grace; and ``tenki host run`` as a
process, registering and serving its host API until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from support.control_stub import KEY, StubControl, serve_in_thread
from support.fake_host import FakeHost
from support.host_service import remote_of as remote_of_journaled
from support.server import ADMIN_KEY, AUTH, InProcessServer

from tenkibox.errors import AuthenticationError, ConnectionError
from tenkibox.host.api import BootSpec, VolumeMountSpec
from tenkibox.host.journal import MountJournal
from tenkibox.host.worker import ControlClient, HostWorker, Machine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_worker(stub: StubControl, fake: FakeHost, tmp_path: Path,
                clock: Clock | None = None) -> HostWorker:
    control = ControlClient("http://control", KEY, transport=httpx.ASGITransport(stub.app))
    return HostWorker(fake, control, address="http://10.77.0.2:7070", secret="s3cret",
                      machine=Machine("tcg", "QEMU emulator version 9.2.0", "Test CPU",
                                      tmp_path),
                      id_file=tmp_path / "host-id", clock=clock or Clock())


async def test_registers_recovers_what_it_owns_and_keeps_its_id(tmp_path: Path) -> None:
    stub, fake = StubControl(interval_s=2.5), FakeHost()
    fake.seed_vm("ses_a")
    fake.seed_vm("ses_b")
    stub.owned = ["ses_a"]
    worker = make_worker(stub, fake, tmp_path)
    assert await worker.start(asyncio.Event())
    body = stub.registrations[0]
    assert body["host_id"] is None and body["secret"] == "s3cret"
    assert body["address"] == "http://10.77.0.2:7070" and body["vms"] == ["ses_a", "ses_b"]
    assert (body["cpus"], body["accelerator"], body["cpu_model"]) == (2, "tcg", "Test CPU")
    assert body["qemu_version"].startswith("QEMU") and body["disk_total_bytes"] > 0
    assert body["network_enforced"] is True
    assert {"memory_total_mib", "memory_reserve_mib", "overcommit",
            "disk_free_bytes"} <= set(body)
    assert (tmp_path / "host-id").read_text().strip() == "host-abc"
    assert worker.interval_s == 2.5 and fake.capacity.host_id == "host-abc"
    assert list(fake.vms) == ["ses_a"]  # recovery stopped what no record places here
    assert fake.calls_to("recover") == ["ses_a"]

    again = make_worker(stub, FakeHost(), tmp_path)  # a restarted worker
    await again.start(asyncio.Event())
    assert stub.registrations[1]["host_id"] == "host-abc"


async def test_owned_may_name_the_volumes_recovery_keeps(tmp_path: Path) -> None:
    stub, fake = StubControl(), FakeHost()
    fake.seed_vm("ses_a")
    await fake.create_volume("vol_a", 1 << 20)
    stub.owned = [{"session_id": "ses_a", "volumes": [{"volume_id": "vol_a", "path": "/d"}]}]
    await make_worker(stub, fake, tmp_path).start(asyncio.Event())
    assert list(fake.vms["ses_a"].mounts) == ["/d"]


async def test_heartbeat_fences_vms_it_does_not_own_after_the_grace(tmp_path: Path) -> None:
    stub, fake, clock = StubControl(interval_s=5.0), FakeHost(), Clock()
    fake.seed_vm("ses_a")
    fake.seed_vm("ses_b")
    stub.owned = ["ses_a", "ses_b"]
    worker = make_worker(stub, fake, tmp_path, clock)
    await worker.start(asyncio.Event())

    stub.owned = ["ses_a"]  # ses_b now runs elsewhere (this host was partitioned)
    fake.seed_vm("ses_new")  # a boot whose record the answer may predate
    await worker.heartbeat()
    beat = stub.heartbeats[-1]
    assert beat["vms"] == ["ses_a", "ses_b", "ses_new"] and beat["host_id"] == "host-abc"
    assert {"memory_used_mib", "tmpfs_used_bytes", "tmpfs_total_bytes",
            "disk_free_bytes"} <= set(beat)
    assert sorted(fake.vms) == ["ses_a", "ses_new"]  # ses_b at once; ses_new spared
    assert worker.fenced == ["ses_b"]

    clock.now += 2.0
    await worker.heartbeat()
    assert "ses_new" in fake.vms  # still younger than an interval
    stub.owned = ["ses_a", "ses_new"]  # its record named this host in time
    clock.now += 10.0
    await worker.heartbeat()
    assert sorted(fake.vms) == ["ses_a", "ses_new"]

    fake.seed_vm("ses_stray")
    stub.owned = ["ses_a", "ses_new"]
    await worker.heartbeat()
    clock.now += 5.0
    await worker.heartbeat()
    assert sorted(fake.vms) == ["ses_a", "ses_new"] and worker.fenced[-1] == "ses_stray"


async def test_a_control_plane_that_forgot_the_host_gets_it_registered_again(
        tmp_path: Path) -> None:
    stub, fake = StubControl(), FakeHost()
    worker = make_worker(stub, fake, tmp_path)
    await worker.start(asyncio.Event())
    stub.known.clear()  # e.g. removed with --force, or its records restored from a backup
    await worker.heartbeat()
    assert [r["host_id"] for r in stub.registrations] == [None, "host-abc"]
    await worker.heartbeat()
    assert len(stub.heartbeats) == 1


async def test_control_plane_down_or_refusing_changes_nothing_on_the_host(
        tmp_path: Path) -> None:
    stub, fake = StubControl(), FakeHost()
    fake.seed_vm("ses_a")
    stub.owned = ["ses_a"]
    worker = make_worker(stub, fake, tmp_path)
    await worker.start(asyncio.Event())
    down = ControlClient("http://127.0.0.1:9", KEY)
    worker.control = down
    with pytest.raises(ConnectionError):
        await worker.heartbeat()
    await down.aclose()
    assert list(fake.vms) == ["ses_a"]

    stub.refuse = True
    refused = make_worker(stub, FakeHost(), tmp_path / "other")
    (tmp_path / "other").mkdir()
    with pytest.raises(AuthenticationError):
        await refused.start(asyncio.Event())


async def test_run_heartbeats_every_interval_until_stopped(tmp_path: Path) -> None:
    stub, fake = StubControl(interval_s=0.05), FakeHost()
    worker = make_worker(stub, fake, tmp_path)
    stop = asyncio.Event()
    await worker.start(stop)
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.4)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert len(stub.heartbeats) >= 3


def test_tenki_host_run_registers_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The command itself, with a real ``LocalHost`` (no VMs): the control plane it registers
    with can call its API with the secret, and no one else can; SIGTERM ends it cleanly."""
    stub = StubControl(interval_s=0.2)
    server, thread, port = serve_in_thread(stub)
    # its run directory in the test's tmp_path, not the machine's /dev/shm (nothing left there)
    env = {**os.environ, "TENKI_API_KEY": KEY, "PYTHONPATH": os.pathsep.join(sys.path),
           "TENKI_RUN_ROOT": str(tmp_path / "run")}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tenkibox.cli.main import cli; cli()", "host", "run",
         "--control", f"http://127.0.0.1:{port}", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "home")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(stub.heartbeats) < 2 and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        assert len(stub.heartbeats) >= 2, proc.stdout.read() if proc.poll() is not None else ""
        reg = stub.registrations[0]
        assert reg["address"].startswith("http://127.0.0.1:")
        ok = httpx.get(reg["address"] + "/host/v1/status",
                       headers={"Authorization": f"Bearer {reg['secret']}"})
        assert ok.status_code == 200 and ok.json()["vms"] == []
        assert ok.json()["capacity"]["host_id"] == "host-abc"
        assert httpx.get(reg["address"] + "/host/v1/status").status_code == 401
        assert (tmp_path / "home" / "host-id").read_text().strip() == "host-abc"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "registered as host-abc" in out and "the VMs keep running" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.should_exit = True
        thread.join(10)


def test_registration_body_is_json_serialisable(tmp_path: Path) -> None:
    worker = make_worker(StubControl(), FakeHost(), tmp_path)
    json.dumps(worker.registration())
    json.dumps(worker.heartbeat_body())


async def test_a_restarted_worker_recovers_each_vm_with_the_mounts_it_had(
        tmp_path: Path) -> None:
    """The control plane names owned sessions by id; the service noted their mounts."""
    fake = FakeHost()
    await fake.create_volume("vol_a", 1 << 20)
    await fake.create_volume("vol_b", 1 << 20)
    journal = MountJournal(tmp_path / "mounts.json")
    async with remote_of_journaled(fake, journal) as remote:
        await remote.boot(BootSpec("ses_a", 1, 512, "sandbox", "a"))
        await remote.boot(BootSpec("ses_x", 1, 512, "sandbox", "x"))
        await remote.attach_volume("ses_a", VolumeMountSpec("vol_a", "/a"))
        await remote.attach_volume("ses_a", VolumeMountSpec("vol_b", "/b"))
        await remote.detach_volume("ses_a", VolumeMountSpec("vol_b", "/b"))
        await remote.attach_volume("ses_x", VolumeMountSpec("vol_b", "/b"))
    assert [m.volume_id for m in MountJournal(tmp_path / "mounts.json").mounts("ses_a")] \
        == ["vol_a"]
    stub = StubControl()
    stub.owned = ["ses_a"]  # ses_x runs elsewhere now
    worker = make_worker(stub, fake, tmp_path)
    worker.journal = MountJournal(tmp_path / "mounts.json")
    await worker.start(asyncio.Event())
    assert list(fake.vms) == ["ses_a"] and list(fake.vms["ses_a"].mounts) == ["/a"]
    again = MountJournal(tmp_path / "mounts.json")
    assert again.mounts("ses_x") == [] and len(again.mounts("ses_a")) == 1


def test_the_real_control_plane_takes_the_workers_registration_and_heartbeats(
        make_inproc: Callable[..., InProcessServer], tmp_path: Path) -> None:
    """The worker's bodies against the fleet's real ``/v1/hosts`` routes (a pure control
    plane whose member at the worker's address is a fake): registered, heartbeating, and
    registered again under its id once the host record is removed."""
    address = "http://10.77.0.9:7070"
    server = make_inproc(workers={address: FakeHost()}, local_host=False)

    async def scenario() -> tuple[HostWorker, str]:
        control = ControlClient(server.url, ADMIN_KEY)
        worker = HostWorker(FakeHost(), control, address=address, secret="s" * 43,
                            machine=Machine.probe("tcg", tmp_path),
                            id_file=tmp_path / "host-id")
        try:
            assert await worker.start(asyncio.Event())
            first = worker.host_id
            await worker.heartbeat()
            r = httpx.delete(f"{server.url}/v1/hosts/{first}?force=true", headers=AUTH)
            assert r.status_code == 204, r.text
            await worker.heartbeat()  # 404: registered again, under the same id
            return worker, str(first)
        finally:
            await control.aclose()

    worker, first = asyncio.run(scenario())
    assert worker.host_id == first and (tmp_path / "host-id").read_text().strip() == first
    info = httpx.get(f"{server.url}/v1/hosts/{first}", headers=AUTH).json()
    assert info["state"] == "ACTIVE" and info["address"] == address
    assert info["cpu_model"] == "qemu64" and info["accelerator"] == "tcg"

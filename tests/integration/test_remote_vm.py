"""A real host worker (``tenki host run``: a ``LocalHost`` behind ``host.service``) driven by
``RemoteHost`` as a control plane drives it, with a stub control plane for its registration:
boot a VM, exec in it, write and read a file, capture, restore the capture as a second VM,
terminate both; the worker stops on SIGTERM and nothing is left (the run's leak check)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest
from support.control_stub import KEY, StubControl, serve_in_thread

from tenkibox.host.api import BootSpec, CaptureSpec, ExecSpec, RestoreSpec
from tenkibox.host.remote import RemoteHost

pytestmark = pytest.mark.integration

SOURCE, CLONE = "ses_wire_src", "ses_wire_clone"
TENKI = [sys.executable, "-m", "tenkibox"]


@pytest.fixture
def worker(fresh_home: Any) -> Iterator[tuple[StubControl, subprocess.Popen[bytes]]]:
    home, run_root = fresh_home
    stub = StubControl(interval_s=1.0)
    stub.owned = [SOURCE, CLONE]  # placed here by the records: never fenced
    server, thread, port = serve_in_thread(stub)
    env = {**os.environ, "TENKI_RUN_ROOT": str(run_root), "TENKI_API_KEY": KEY,
           "TENKI_LOG_LEVEL": "INFO"}
    log = open(home / "worker.log", "ab")  # closed below
    proc = subprocess.Popen([*TENKI, "host", "run", "--control", f"http://127.0.0.1:{port}",
                             "--listen", "127.0.0.1:0", "--data-dir", str(home)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not stub.registrations and time.monotonic() < deadline:
            assert proc.poll() is None, (home / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
        assert stub.registrations, "the worker did not register"
        yield stub, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        server.should_exit = True
        thread.join(10)
        # VMs outlive a worker by design: the test terminated them; any left is killed here
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if str(run_root) in line:
                os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(run_root, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


async def _chunks(data: bytes) -> AsyncGenerator[bytes, None]:
    for i in range(0, len(data), 1 << 16):
        yield data[i:i + (1 << 16)]


async def _scenario(address: str, secret: str) -> None:
    remote = RemoteHost(address, secret, host_id="host-abc")
    try:
        await remote.refresh()
        assert remote.capacity.host_id == "host-abc" and remote.list_vms() == []
        await remote.boot(BootSpec(SOURCE, 1, 512, "sandbox", "wire-src"))
        assert remote.has_vm(SOURCE)

        ref = await remote.start_process(SOURCE, ExecSpec(["sh", "-c", "echo hello-$((6*7))"],
                                                          {}))
        out = b"".join([e.data async for e in remote.process_events(SOURCE, ref.process_id)
                        if e.type == "stdout"])
        assert out == b"hello-42\n"
        assert await remote.process_exit(SOURCE, ref.process_id) == 0

        payload = os.urandom(3 << 20)
        assert await remote.write_file(SOURCE, "/root/wire.bin", _chunks(payload), 0o644) \
            == len(payload)
        back = b"".join([c async for c in remote.read_file(SOURCE, "/root/wire.bin")])
        assert back == payload

        sync = await remote.start_process(SOURCE, ExecSpec(["sync"], {}))
        assert await remote.process_exit(SOURCE, sync.process_id) == 0
        captured = await remote.capture(CaptureSpec(SOURCE, "snp_wire", "sandbox", []))
        await remote.terminate(SOURCE, [])
        assert not remote.has_vm(SOURCE)

        started = await remote.restore(RestoreSpec(CLONE, "snp_wire", captured.manifest,
                                                   "wire-clone"))
        assert started.ram == captured.manifest.ram
        again = b"".join([c async for c in remote.read_file(CLONE, "/root/wire.bin")])
        assert again == payload
        await remote.terminate(CLONE, [])
        await remote.refresh()
        assert remote.list_vms() == []
        assert await remote.collect_garbage(set(), grace_s=0) > 0
    finally:
        await remote.aclose()


def test_a_real_host_behind_the_wire(worker: tuple[StubControl, subprocess.Popen[bytes]]
                                     ) -> None:
    stub, proc = worker
    reg = stub.registrations[0]
    asyncio.run(asyncio.wait_for(_scenario(reg["address"], reg["secret"]), 900))
    assert stub.heartbeats, "no heartbeat in all that time"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

"""The real guest agent and the real host client, talking over a unix socket instead of a VM.

The agent runs in a thread with its ``ListenPort`` (each accepted connection plays the host side
of the virtio port), so everything but the virtio transport is the code that runs in the guest.
The parts of the system the agent changes (clock, hostname, /etc) are redirected so the tests
cannot touch the machine running them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tenkibox.engine.agent import AgentClient, AgentError, AgentProcess, AgentTimeoutError
from tenkibox.errors import InternalError, WaitTimeoutError
from tenkibox.guest import agent as guest


class SandboxSystem(guest.System):
    """Writes /etc below a temp root and records what would change the real machine."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.clock: list[int] = []
        self.hostnames: list[str] = []
        self.entropy: list[bytes] = []

    def set_clock(self, epoch_ns: int) -> None:
        self.clock.append(epoch_ns)

    def set_hostname(self, name: str) -> None:
        self.hostnames.append(name)

    def mix_entropy(self, data: bytes) -> None:
        self.entropy.append(data)


@dataclass
class Guest:
    agent: guest.Agent
    system: SandboxSystem
    sock: Path
    root: Path
    thread: threading.Thread
    clients: list[AgentClient] = field(default_factory=list)

    def client(self) -> AgentClient:
        c = AgentClient(self.sock, default_timeout=10)
        self.clients.append(c)
        return c


@pytest.fixture
def vm() -> Iterator[Guest]:
    # Short path: unix socket paths are limited to 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="tka-"))
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\told\n")
    system = SandboxSystem(str(root))
    sock = base / "agent.sock"
    agent = guest.Agent(guest.ListenPort(str(sock)), system)
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    g = Guest(agent, system, sock, root, thread)
    yield g
    agent.stop()
    thread.join(5)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def client(vm: Guest) -> AsyncIterator[AgentClient]:
    c = vm.client()
    await c.connect(timeout=10)
    yield c
    await c.close()


async def collect(proc: AgentProcess) -> tuple[bytes, bytes, dict]:
    out, err = bytearray(), bytearray()
    async for ev in proc.events():
        if ev["event"] == "stdout":
            out += ev["data"]
        elif ev["event"] == "stderr":
            err += ev["data"]
        else:
            return bytes(out), bytes(err), ev
    raise AssertionError("event stream ended without exit")


async def test_ping(client: AgentClient) -> None:
    info = await client.ping()
    assert info["pid"] == os.getpid()  # the agent runs in this process's thread
    assert info["version"] == guest.VERSION
    assert isinstance(info["uptime_s"], float) and info["uptime_s"] > 0
    assert client.connected


async def test_exec_streams_and_exit_code(client: AgentClient) -> None:
    proc = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert proc.pid > 0
    out, err, ev = await collect(proc)
    assert (out, err) == (b"out\n", b"err\n")
    assert ev == {"event": "exit", "exit_code": 3, "timed_out": False}
    assert await proc.wait() == 3
    assert proc.exit_code == 3


async def test_exec_env_cwd_and_default_env(client: AgentClient, vm: Guest) -> None:
    proc = await client.exec(
        ["sh", "-c", 'echo "$FOO|$PATH|$HOME|$(pwd)"'], env={"FOO": "bar"}, cwd=str(vm.root))
    out, _, ev = await collect(proc)
    assert ev["exit_code"] == 0
    assert out.decode().strip() == f"bar|{guest.DEFAULT_PATH}|/root|{vm.root}"


async def test_exec_own_process_group(client: AgentClient) -> None:
    proc = await client.exec(["sh", "-c", "ps -o pgid= -p $$"])
    out, _, _ = await collect(proc)
    assert int(out) == proc.pid


async def test_exec_missing_program_and_cwd(client: AgentClient) -> None:
    with pytest.raises(AgentError) as ei:
        await client.exec(["/nonexistent/program"])
    assert ei.value.errno == "ENOENT"
    with pytest.raises(AgentError) as ei:
        await client.exec(["true"], cwd="/nonexistent/dir")
    assert ei.value.errno == "ENOENT"


async def test_stdin_roundtrip(client: AgentClient) -> None:
    proc = await client.exec(["cat"], stdin=True)
    payload = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk and than a pipe holds
    reader = asyncio.create_task(collect(proc))
    await proc.write_stdin(payload)
    await proc.close_stdin()
    out, _, ev = await reader
    assert ev["exit_code"] == 0
    assert out == payload


async def test_stdin_without_pipe_is_an_error(client: AgentClient) -> None:
    proc = await client.exec(["sleep", "5"])
    with pytest.raises(AgentError) as ei:
        await proc.write_stdin(b"x")
    assert ei.value.errno == "EBADF"
    await proc.kill()
    assert await proc.wait() == 137


async def test_timeout_kills_the_group(client: AgentClient) -> None:
    t0 = time.monotonic()
    # The child sleep would hold the pipes open if only the leader were killed.
    proc = await client.exec(["sh", "-c", "sleep 30 & sleep 30; echo never"], timeout_s=0.5)
    out, _, ev = await collect(proc)
    assert ev == {"event": "exit", "exit_code": 124, "timed_out": True}
    assert out == b""
    assert time.monotonic() - t0 < 5
    assert proc.timed_out


async def test_kill_with_signal(client: AgentClient) -> None:
    proc = await client.exec(["sleep", "30"])
    await proc.kill(15)
    assert await proc.wait() == 128 + 15
    await proc.kill()  # after the exit: a no-op


async def test_background_child_does_not_hold_exit(client: AgentClient) -> None:
    t0 = time.monotonic()
    proc = await client.exec(["sh", "-c", "sleep 3 & echo started"])
    out, _, ev = await collect(proc)
    assert out == b"started\n"
    assert ev["exit_code"] == 0
    assert time.monotonic() - t0 < 2.5


async def test_large_output_is_complete(client: AgentClient) -> None:
    n = 12 * 1024 * 1024  # three times the agent's per-process buffer
    proc = await client.exec(["head", "-c", str(n), "/dev/urandom"])
    out, _, ev = await collect(proc)
    assert ev["exit_code"] == 0
    assert len(out) == n


async def test_concurrent_requests_are_multiplexed(client: AgentClient, vm: Guest) -> None:
    slow = await client.exec(["sh", "-c", "sleep 1; echo slow"])
    t0 = time.monotonic()
    pings = await asyncio.gather(*(client.ping() for _ in range(20)))
    assert len(pings) == 20
    assert time.monotonic() - t0 < 1
    procs = await asyncio.gather(*(client.exec(["echo", str(i)]) for i in range(10)))
    results = await asyncio.gather(*(collect(p) for p in procs))
    assert [r[0] for r in results] == [f"{i}\n".encode() for i in range(10)]
    assert (await collect(slow))[0] == b"slow\n"


async def test_files_roundtrip(client: AgentClient, vm: Guest) -> None:
    path = vm.root / "a" / "b" / "c.bin"
    data = os.urandom(2 * 1024 * 1024 + 5)
    assert await client.write_file(str(path), data, mode=0o600) == len(data)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o600
    assert await client.read_file(str(path)) == data
    # Replacing with shorter content truncates.
    assert await client.write_file(str(path), b"short") == 5
    assert await client.read_file(str(path)) == b"short"
    assert await client.write_file(str(path), b"") == 0
    assert await client.read_file(str(path)) == b""
    # Files without a size (procfs) are read until a short read.
    assert b"MemTotal" in await client.read_file("/proc/meminfo")


async def test_file_errors_carry_errno(client: AgentClient, vm: Guest) -> None:
    with pytest.raises(AgentError) as ei:
        await client.read_file(str(vm.root / "missing"))
    assert ei.value.errno == "ENOENT"
    assert isinstance(ei.value, InternalError)
    with pytest.raises(AgentError) as ei:
        await client.read_file(str(vm.root))
    assert ei.value.errno == "EISDIR"
    (vm.root / "file").write_text("x")
    with pytest.raises(AgentError) as ei:
        await client.write_file(str(vm.root / "file" / "below"), b"x")
    assert ei.value.errno in ("ENOTDIR", "EEXIST")


async def test_set_time_reports_delta(client: AgentClient, vm: Guest) -> None:
    target = time.time_ns() + 3_600 * 10**9
    delta = await client.set_time(target)
    assert vm.system.clock == [target]
    assert 3599 < delta < 3601
    delta = await client.set_time()
    assert abs(delta) < 1
    assert len(vm.system.clock) == 2


async def test_reidentify(client: AgentClient, vm: Guest) -> None:
    entropy = os.urandom(64)
    await client.reidentify("clone-1", "0123456789abcdef0123456789abcdef", entropy)
    assert vm.system.hostnames == ["clone-1"]
    assert vm.system.entropy == [entropy]
    etc = vm.root / "etc"
    assert (etc / "hostname").read_text() == "clone-1\n"
    assert (etc / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    hosts = (etc / "hosts").read_text()
    assert "127.0.1.1\tclone-1" in hosts and "old" not in hosts and "localhost" in hosts
    with pytest.raises(AgentError) as ei:
        await client.reidentify("bad name!", "0123456789abcdef0123456789abcdef", entropy)
    assert ei.value.errno == "EINVAL"


async def test_sync_and_unknown_op(client: AgentClient) -> None:
    await client.sync()
    with pytest.raises(AgentError) as ei:
        await client._call("frobnicate", 5)
    assert ei.value.errno == "ENOSYS"


async def test_umount_of_a_plain_directory_is_a_noop(client: AgentClient, vm: Guest) -> None:
    await client.umount(str(vm.root))


async def test_reconnect_keeps_processes_and_output(vm: Guest) -> None:
    c = vm.client()
    await c.connect(timeout=10)
    first = await c.ping()
    proc = await c.exec(["sh", "-c", "echo early; sleep 0.6; echo late; exit 7"])
    events = proc.events()
    # Received before the host goes: what is in flight when a host disconnects is lost.
    assert await anext(events) == {"event": "stdout", "data": b"early\n"}
    await c.disconnect()
    assert not c.connected
    with pytest.raises(AgentError):
        await c.ping()
    await asyncio.sleep(1.0)  # "late" and the exit happen while no host is connected
    await c.connect(timeout=10)
    assert (await c.ping())["boot_id"] == first["boot_id"]
    rest = [ev async for ev in events]
    assert rest == [{"event": "stdout", "data": b"late\n"},
                    {"event": "exit", "exit_code": 7, "timed_out": False}]
    await c.close()


async def test_torn_line_from_a_previous_host_is_dropped(vm: Guest) -> None:
    # A host that dies halfway through a request leaves a partial line in the agent.
    s = socket.socket(socket.AF_UNIX)
    deadline = time.monotonic() + 5
    while True:
        try:
            s.connect(str(vm.sock))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)
    s.sendall(b'{"id": 1, "op": "exec", "argv": ["touch", "/tmp/should-not')
    s.close()
    c = vm.client()
    await c.connect(timeout=10)
    proc = await c.exec(["echo", "ok"])
    assert (await collect(proc))[0] == b"ok\n"
    await c.close()


async def test_connection_loss_fails_pending_calls(vm: Guest) -> None:
    c = vm.client()
    await c.connect(timeout=10)
    proc = await c.exec(["sleep", "30"])
    # No such disk: the agent waits for it to be hot-plugged while we pull the plug.
    pending = asyncio.create_task(c.mount("nope", "/mnt/x", read_only=False, mkfs=False))
    await asyncio.sleep(0.2)
    vm.agent.stop()
    with pytest.raises(AgentError, match="connection lost"):
        await pending
    assert not c.connected
    await c.close()
    with pytest.raises(AgentError, match="closed"):
        await proc.wait()


async def test_connect_times_out_without_agent(tmp_path: Path) -> None:
    c = AgentClient(tmp_path / "nobody.sock")
    t0 = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        await c.connect(timeout=0.3)
    assert time.monotonic() - t0 < 2
    # Listening but never answering (a booting guest): still a timeout, and an AgentError.
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "mute.sock"))
    srv.listen(1)
    c = AgentClient(tmp_path / "mute.sock")
    with pytest.raises(AgentTimeoutError):
        await c.connect(timeout=0.5)
    await c.close()
    srv.close()


async def test_request_timeout(vm: Guest) -> None:
    c = vm.client()
    await c.connect(timeout=10)
    with pytest.raises(AgentTimeoutError):
        await c.mount("nope", "/mnt/x", read_only=False, mkfs=False, timeout=0.2)
    assert c.connected  # a slow answer does not cost the connection
    await c.ping()
    await c.close()

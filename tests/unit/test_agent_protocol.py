"""The guest agent and the real host client, talking over a unix socket instead of a VM.

Every test runs against ``agentd`` (``src/tenkibox/guest/agentd``, what the guest runs), in a
process of its own in its test mode (``support/agentd.py``: identity files below a temp root,
and the clock, hostname and entropy recorded instead of set), and most also against the Python
module (``support/pyagent.py``, the in-process guest of other host-side tests), so both keep
the protocol. Tests marked ``pyagent_only`` look inside the Python module (its threads, its
handlers); the host-client behaviour they check is the same whichever agent answers.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import agentd
from support import pyagent as guest
from support.guest_system import SandboxSystem

from tenkibox.engine import agent as engine_agent
from tenkibox.engine.agent import AgentClient, AgentError, AgentProcess, AgentTimeoutError
from tenkibox.errors import InternalError, ValidationError, WaitTimeoutError
from tenkibox.images.builder import IDENTITY_FILES


@dataclass
class Guest:
    """One agent serving ``sock``; ``system``: what it changed instead of the machine (clock,
    hostnames, entropy)."""

    kind: str  # "agentd" or "pyagent"
    sock: Path
    root: Path
    system: Any
    pid: int
    version: str
    agent: guest.Agent | None = None  # pyagent
    thread: threading.Thread | None = None  # pyagent
    proc: subprocess.Popen[bytes] | None = None  # agentd
    clients: list[AgentClient] = field(default_factory=list)

    @property
    def py(self) -> guest.Agent:
        assert self.agent is not None, "a pyagent_only test"
        return self.agent

    def client(self) -> AgentClient:
        c = AgentClient(self.sock, default_timeout=10)
        self.clients.append(c)
        return c

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            if self.thread is not None:
                self.thread.join(5)
        if self.proc is not None:
            agentd.stop(self.proc)

    def close(self) -> None:
        """Stop the agent and remove its temporary directory (``base``)."""
        self.stop_agent()
        shutil.rmtree(self.root.parent, ignore_errors=True)


def _root(base: Path) -> Path:
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\told\n")
    return root


def _py_guest(base: Path, warmup: guest.Warmup | None = None,
              system: SandboxSystem | None = None) -> Guest:
    root = _root(base)
    system = system or SandboxSystem(str(root))
    sock = base / "agent.sock"
    agent = guest.Agent(guest.ListenPort(str(sock)), system, warmup)
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    return Guest("pyagent", sock, root, system, os.getpid(), guest.VERSION, agent=agent,
                 thread=thread)


def _agentd_guest(base: Path, binary: Path, warm_program: str | None = None) -> Guest:
    root = _root(base)
    sock = base / "agent.sock"
    proc = agentd.start(binary, sock, root, warm_program=warm_program)
    return Guest("agentd", sock, root, agentd.Calls(root), proc.pid, agentd.version(),
                 proc=proc)


@pytest.fixture(params=["agentd", "pyagent"])
def vm(request: pytest.FixtureRequest) -> Iterator[Guest]:
    # Short path: unix socket paths are limited to 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="tka-"))
    g = (_agentd_guest(base, request.getfixturevalue("agentd_binary"))
         if request.param == "agentd" else _py_guest(base))
    yield g
    g.close()


#: a test that looks inside the Python module: run against it alone
pyagent_only = pytest.mark.parametrize("vm", ["pyagent"], indirect=True)
#: what only agentd does: the Python module, a test double now, holds a stopping agent's
#: output forever (its stop waits for a pump blocked on the port)
agentd_only = pytest.mark.parametrize("vm", ["agentd"], indirect=True)


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


async def test_ping(client: AgentClient, vm: Guest) -> None:
    info = await client.ping()
    assert info["pid"] == vm.pid
    assert info["version"] == vm.version
    assert isinstance(info["uptime_s"], float) and info["uptime_s"] > 0
    # what /proc/uptime says (the agent reads the clock behind it, not the file)
    assert abs(info["uptime_s"] - float(Path("/proc/uptime").read_text().split()[0])) < 1
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
    assert ei.value.errno == "ENOTDIR" and "cwd /nonexistent/dir" in ei.value.message


async def test_exec_as_another_user(client: AgentClient, vm: Guest) -> None:
    """``user``: the agent switches in the child (what the official SDKs' commands need)."""
    if os.getuid() != 0:
        pytest.fail("the agent runs as root in a guest; this test must too")
    nobody = 65534
    proc = await client.exec(["sh", "-c", "id -u; id -g"], user=nobody)
    out, _, ev = await collect(proc)
    assert ev["exit_code"] == 0 and out.split() == [b"65534", b"65534"]
    with pytest.raises(AgentError) as ei:
        await client.exec(["true"], user=-1)
    assert ei.value.errno == "EINVAL"
    assert await client.version() == tuple(int(p) for p in vm.version.split("."))


async def test_exec_as_another_user_reports_launch_errors(client: AgentClient, vm: Guest,
                                                          tmp_path: Path) -> None:
    """A failure before the program starts is the exec's error (Popen's), not an exit 127."""
    if os.getuid() != 0:
        pytest.fail("the agent runs as root in a guest; this test must too")
    nobody = 65534
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    prog = private / "prog"
    prog.write_text("#!/bin/sh\necho hi\n")
    prog.chmod(0o755)
    # Found (by root) but not executable for the user: its directory is closed to it.
    with pytest.raises(AgentError) as ei:
        await client.exec([str(prog)], user=nobody)
    assert ei.value.errno == "EACCES"
    assert str(ei.value).endswith(f"[Errno 13] Permission denied: '{prog}'")
    with pytest.raises(AgentError) as ei:
        await client.exec(["/nonexistent/prog", "x"], user=nobody)
    assert ei.value.errno == "ENOENT"
    assert str(ei.value).endswith("[Errno 2] No such file or directory: '/nonexistent/prog'")
    # As root it runs (so the error above is the user's).
    out, _, ev = await collect(await client.exec([str(prog)]))
    assert ev["exit_code"] == 0 and out == b"hi\n"
    # As Popen does, the directory is changed to as root: a cwd closed to the user works.
    out, _, ev = await collect(await client.exec(["sh", "-c", "id -u; /bin/pwd"], user=nobody,
                                                 cwd=str(private)))
    assert ev["exit_code"] == 0 and out.split() == [b"65534", str(private).encode()]
    # The failed launchers were reaped: no zombie children of agentd (the Python module runs
    # in the test process, whose children are the whole run's: its Popen reaps its own).
    await asyncio.sleep(0.2)
    for pid in _children(vm.pid) if vm.kind == "agentd" else []:
        assert _state(pid) != "Z", pid


@agentd_only
async def test_an_exec_as_another_user_starts_the_program_directly_where_it_can(
        client: AgentClient, vm: Guest) -> None:
    """agentd starts the program as the user at once (no launcher: one program start fewer);
    only when that fails does the launcher change directory as root first."""
    nobody = 65534
    # not below pytest's tmp_path: its parents are closed to other users
    base = Path(tempfile.mkdtemp(prefix="tka-user-"))
    base.chmod(0o755)
    open_dir = base / "open"
    open_dir.mkdir(mode=0o755)
    private = base / "private"
    private.mkdir(mode=0o700)
    try:
        await _exec_in(client, vm, nobody, open_dir, private)
    finally:
        shutil.rmtree(base)


async def _exec_in(client: AgentClient, vm: Guest, nobody: int, open_dir: Path,
                   private: Path) -> None:
    out, _, ev = await collect(await client.exec(["sh", "-c", "id -u; id -G; /bin/pwd"],
                                                 user=nobody, cwd=str(open_dir)))
    assert ev["exit_code"] == 0
    assert out.split() == [b"65534", *_groups_of(nobody), str(open_dir).encode()]
    assert vm.system.launchers == []
    out, _, ev = await collect(await client.exec(["sh", "-c", "id -u; id -G; /bin/pwd"],
                                                 user=nobody, cwd=str(private)))
    assert ev["exit_code"] == 0
    assert out.split() == [b"65534", *_groups_of(nobody), str(private).encode()]
    assert vm.system.launchers == [nobody]


def _groups_of(uid: int) -> list[bytes]:
    """``id -G`` of ``uid`` as the agent sets them: its primary group, then its others."""
    import grp
    import pwd
    entry = pwd.getpwuid(uid)
    others = [g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem]
    return [str(g).encode() for g in dict.fromkeys([entry.pw_gid, *others])]


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


async def test_settle_sets_the_clock_then_the_identity_in_one_request(
        client: AgentClient, vm: Guest) -> None:
    # what a restore sends once the ping was answered (agents from SETTLE_SINCE)
    assert await client.version() >= engine_agent.SETTLE_SINCE
    target = time.time_ns() + 3_600 * 10**9
    entropy = os.urandom(64)
    got = await client.settle(("clone-2", "0123456789abcdef0123456789abcdef", entropy), target)
    assert vm.system.clock == [target]
    assert 3599 < got["delta_s"] < 3601
    assert got["took_s"] >= 0
    assert vm.system.hostnames == ["clone-2"] and vm.system.entropy == [entropy]
    etc = vm.root / "etc"
    assert (etc / "hostname").read_text() == "clone-2\n"
    assert (etc / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert "127.0.1.1\tclone-2" in (etc / "hosts").read_text()


async def test_identity_files_linked_into_run_are_written_where_they_point(
        client: AgentClient, vm: Guest) -> None:
    # the image links them into /run/tenki (tmpfs): the files there change, the links stay
    etc, run = vm.root / "etc", vm.root / "run" / "tenki"
    run.mkdir(parents=True)
    for name in IDENTITY_FILES:
        (run / name).write_text("before\n")
        (etc / name).unlink(missing_ok=True)
        (etc / name).symlink_to(f"../run/tenki/{name}")
    await client.settle(("clone-3", "0123456789abcdef0123456789abcdef", os.urandom(64)))
    assert all((etc / name).is_symlink() for name in IDENTITY_FILES)
    assert (run / "hostname").read_text() == "clone-3\n"
    assert (run / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert "127.0.1.1\tclone-3" in (run / "hosts").read_text()
    assert sorted(p.name for p in run.iterdir()) == sorted(IDENTITY_FILES)  # no temporary left


async def test_settle_without_identity_only_sets_the_clock(client: AgentClient,
                                                           vm: Guest) -> None:
    # the resume of a paused session: the same guest, its identity stays
    got = await client.settle(None)
    assert abs(got["delta_s"]) < 1
    assert len(vm.system.clock) == 1
    assert vm.system.hostnames == [] and vm.system.entropy == []
    assert not (vm.root / "etc" / "machine-id").exists()


async def test_a_refused_settle_changes_nothing(client: AgentClient, vm: Guest) -> None:
    # the identity is checked before the clock is set: no half-settled guest
    for hostname, machine_id, data in [("bad name!", "0" * 32, "AAAA"),
                                       ("ends-in-a-newline\n", "0" * 32, "AAAA"),
                                       ("-dash-first", "0" * 32, "AAAA"),
                                       ("x" * 64, "0" * 32, "AAAA"),
                                       ("ok", "not-hex", "AAAA"),
                                       ("ok", "0" * 31, "AAAA"),
                                       ("ok", "0" * 32, "not base64!")]:
        with pytest.raises(AgentError) as ei:
            await client._call("settle", 5, epoch_ns=time.time_ns(), hostname=hostname,
                               machine_id=machine_id, entropy=data)
        assert ei.value.errno == "EINVAL"
    assert vm.system.clock == [] and vm.system.hostnames == [] and vm.system.entropy == []
    assert not (vm.root / "etc" / "hostname").exists()


async def test_a_hosts_file_that_is_not_utf8_keeps_its_bytes(client: AgentClient,
                                                             vm: Guest) -> None:
    hosts = vm.root / "etc" / "hosts"
    hosts.write_bytes(b"127.0.0.1\tlocalhost\n10.0.0.9\tcaf\xe9\n")
    await client.settle(("clone-7", "0123456789abcdef0123456789abcdef", os.urandom(64)))
    assert hosts.read_bytes() == (b"127.0.0.1\tlocalhost\n127.0.1.1\tclone-7\n"
                                  b"10.0.0.9\tcaf\xe9\n")


class OrderedSystem(SandboxSystem):
    """Records, in ``events``, when the clock and the hostname were set."""

    def __init__(self, root: str, events: list[str]) -> None:
        super().__init__(root)
        self.events = events

    def set_clock(self, epoch_ns: int) -> None:
        super().set_clock(epoch_ns)
        self.events.append("clock")

    def set_hostname(self, name: str) -> None:
        super().set_hostname(name)
        self.events.append("hostname")


class OrderedWarmup(guest.Warmup):
    """Records its pokes in ``events`` and starts nothing."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def poke(self) -> None:
        self.events.append("poke")


async def test_a_settle_sets_the_clock_before_it_wakes_the_warmup() -> None:
    # setting the clock waits for every vCPU to take an interrupt: the one the warm-up wakes
    # would be busy translating
    events: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="tka-"))
    g = _py_guest(base, OrderedWarmup(events), OrderedSystem(str(base / "root"), events))
    c = g.client()
    try:
        await c.connect(10)
        await c.settle(("clone-8", "0123456789abcdef0123456789abcdef", os.urandom(64)))
        assert events == ["clock", "poke", "hostname"]
    finally:
        await c.close()
        g.close()


@pytest.fixture
def warm_vm() -> Iterator[tuple[Guest, Path]]:
    # the agent with a warm-up shell whose program records each start in ``pokes``
    base = Path(tempfile.mkdtemp(prefix="tka-"))
    pokes = base / "pokes"
    program = base / "program"
    program.write_text(f"#!/bin/sh\necho started >> {pokes}\n")
    program.chmod(0o755)
    warmup = guest.Warmup(str(program))
    warmup.start()
    g = _py_guest(base, warmup)
    yield g, pokes
    g.close()
    warmup.close()  # the parked shell reads the end of its pipe and exits


def _lines_soon(path: Path, n: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = len(path.read_text().splitlines()) if path.exists() else 0
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


async def test_each_settle_starts_the_warmup_program_once(
        warm_vm: tuple[Guest, Path]) -> None:
    g, pokes = warm_vm
    c = g.client()
    await c.connect(10)
    shell = g.py.warmup.proc if g.py.warmup else None
    await c.settle(("clone-4", "0123456789abcdef0123456789abcdef", os.urandom(64)))
    assert _lines_soon(pokes, 1) == 1
    await c.settle(None)  # a resume's settle too: its QEMU is as new as a clone's
    assert _lines_soon(pokes, 2) == 2
    # the same shell, parked again after each program
    assert g.py.warmup is not None and g.py.warmup.proc is shell
    assert shell is not None and shell.poll() is None
    await c.close()


async def test_a_refused_settle_starts_no_warmup(warm_vm: tuple[Guest, Path]) -> None:
    g, pokes = warm_vm
    c = g.client()
    await c.connect(10)
    with pytest.raises(AgentError):
        await c._call("settle", 5, epoch_ns=time.time_ns(), hostname="bad name!",
                      machine_id="0" * 32, entropy="AAAA")
    await c.settle(None)
    assert _lines_soon(pokes, 2, timeout=1.0) == 1
    await c.close()


async def test_a_settle_told_not_to_warm_sets_everything_but_starts_nothing(
        warm_vm: tuple[Guest, Path]) -> None:
    # a host whose cores are all taken (restore.warm_exec_path) sends warm=false
    g, pokes = warm_vm
    c = g.client()
    await c.connect(10)
    await c.settle(("clone-6", "0123456789abcdef0123456789abcdef", os.urandom(64)), warm=False)
    assert g.system.hostnames == ["clone-6"] and len(g.system.clock) == 1
    with pytest.raises(AgentError) as ei:  # not a bool: refused, nothing changed
        await c._call("settle", 5, epoch_ns=time.time_ns(), warm="no")
    assert ei.value.errno == "EINVAL" and "warm" in str(ei.value)
    assert len(g.system.clock) == 1
    await c.settle(None)  # the default warms, as agents before 0.4.1 always did
    assert _lines_soon(pokes, 1) == 1
    assert _lines_soon(pokes, 2, timeout=0.5) == 1
    await c.close()


async def test_a_warmup_shell_that_is_gone_is_replaced_and_the_settle_goes_on(
        warm_vm: tuple[Guest, Path]) -> None:
    g, pokes = warm_vm
    warmup = g.py.warmup
    assert warmup is not None and warmup.proc is not None
    gone = warmup.proc
    gone.kill()
    gone.wait()
    c = g.client()
    await c.connect(10)
    await c.settle(("clone-5", "0123456789abcdef0123456789abcdef", os.urandom(64)))
    assert g.system.hostnames == ["clone-5"]
    assert warmup.proc is not None and warmup.proc is not gone and warmup.proc.poll() is None
    await c.settle(None)  # the new shell serves the next one
    assert _lines_soon(pokes, 1) == 1
    await c.close()


def test_a_warmup_shell_ends_when_its_agent_lets_go() -> None:
    warmup = guest.Warmup()
    warmup.start()
    proc = warmup.proc
    assert proc is not None and proc.poll() is None
    warmup.close()  # the pipe's end closes: the shell's read ends its loop
    assert proc.returncode == 0 and warmup.proc is None


@pyagent_only
async def test_settle_is_answered_on_the_reader_thread(client: AgentClient, vm: Guest) -> None:
    # inline, like set_time: no thread is started for it (in a just-restored guest that costs
    # more than the work), and it never waits behind a slow request
    assert "settle" in vm.py.inline
    await client.settle(("clone-3", "0123456789abcdef0123456789abcdef", os.urandom(64)))
    assert vm.system.hostnames == ["clone-3"]


async def test_connect_learns_the_version_from_its_ping(vm: Guest) -> None:
    # version() after connect() costs no request: a restore asks it to pick settle
    c = vm.client()
    await c.connect(5)
    pings: list[str] = []
    real_call = c._call

    async def spy(op: str, *args: object, **kw: object) -> dict[str, object]:
        pings.append(op)
        return await real_call(op, *args, **kw)  # type: ignore[arg-type]

    c._call = spy  # type: ignore[method-assign]
    assert await c.version() == tuple(int(p) for p in vm.version.split("."))
    assert pings == []
    await c.close()


async def test_sync_and_unknown_op(client: AgentClient) -> None:
    await client.sync()
    with pytest.raises(AgentError) as ei:
        await client._call("frobnicate", 5)
    assert ei.value.errno == "ENOSYS"


async def test_umount_of_a_plain_directory_is_a_noop(client: AgentClient, vm: Guest) -> None:
    await client.umount(str(vm.root))


async def test_umount_answers_was_mounted(client: AgentClient, vm: Guest) -> None:
    msg = await client._call("umount", 5, path=str(vm.root) + "/")
    assert msg["ok"] is True and msg["was_mounted"] is False


async def test_mount_of_a_missing_disk_fails_after_wait_s(client: AgentClient, vm: Guest) -> None:
    t0 = time.monotonic()
    with pytest.raises(AgentError) as ei:
        await client._call("mount", 5, serial="nope", path=str(vm.root / "mnt"), read_only=False,
                           mkfs=False, wait_s=0.2)
    assert 0.15 < time.monotonic() - t0 < 3
    assert ei.value.errno == "ENODEV"
    assert "no virtio disk with serial 'nope'" in str(ei.value)
    assert not (vm.root / "mnt").exists()


@pytest.mark.parametrize("path", ["/", "relative", "/a/.."])
async def test_mount_refuses_a_bad_path(client: AgentClient, path: str) -> None:
    with pytest.raises(AgentError) as ei:
        await client._call("mount", 5, serial="nope", path=path, read_only=False, mkfs=False,
                           wait_s=0)
    assert ei.value.errno == "EINVAL"
    assert "path must be absolute and not /" in str(ei.value)


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
    vm.stop_agent()
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


# -- bounded memory: chunked files, output flow control ------------------------------------------


def count_op(vm: Guest, op: str) -> list[dict]:
    """Record the requests of ``op`` the agent receives (wraps its handler)."""
    seen: list[dict] = []
    handler = vm.py.ops[op]

    def counting(req: dict) -> dict | None:
        seen.append(req)
        return handler(req)

    vm.py.ops[op] = counting
    return seen


def part_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(guest.TMP_SUFFIX)]


@pyagent_only
async def test_read_chunks_stop_when_the_iterator_is_closed(client: AgentClient,
                                                            vm: Guest) -> None:
    reads = count_op(vm, "read_file")
    chunks = client.read_file_chunks("/dev/zero", chunk=64 << 10)
    got = [await anext(chunks) for _ in range(3)]
    assert [len(c) for c in got] == [64 << 10] * 3 and not any(got[0])
    await chunks.aclose()
    await asyncio.sleep(0.2)
    assert len(reads) == 3  # one request per chunk taken, none after the close
    assert [r["offset"] for r in reads] == [0, 64 << 10, 128 << 10]


async def test_read_chunks_of_a_file(client: AgentClient, vm: Guest) -> None:
    path = vm.root / "f.bin"
    data = os.urandom(2 * 1024 * 1024 + 3)
    path.write_bytes(data)
    chunks = [c async for c in client.read_file_chunks(str(path))]
    assert [len(c) for c in chunks] == [1 << 20, 1 << 20, 3]
    assert b"".join(chunks) == data
    (vm.root / "empty").write_bytes(b"")
    assert [c async for c in client.read_file_chunks(str(vm.root / "empty"))] == []
    stream = await client.read_file_stream(str(path), chunk=1 << 19)
    assert b"".join([c async for c in stream]) == data
    # The first read happens before the stream is handed out: errors come first.
    with pytest.raises(AgentError) as ei:
        await client.read_file_stream(str(vm.root / "missing"))
    assert ei.value.errno == "ENOENT"


@pyagent_only
async def test_read_file_refuses_big_files(client: AgentClient, vm: Guest) -> None:
    path = vm.root / "big.bin"
    path.write_bytes(b"x" * (3 << 20))
    reads = count_op(vm, "read_file")
    with pytest.raises(ValidationError) as ei:
        await client.read_file(str(path), max_bytes=2 << 20)
    assert ei.value.field == "path" and "use a stream" in ei.value.message
    assert len(reads) == 1  # the size in the first answer is enough
    # No size to go by: stops once past the limit.
    with pytest.raises(ValidationError):
        await client.read_file("/dev/zero", max_bytes=3 << 20)
    assert len(reads) <= 1 + 4
    assert await client.read_file(str(path), max_bytes=3 << 20) == b"x" * (3 << 20)


async def chunked(data: bytes, size: int, fail_after: int | None = None,
                  pause: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        if fail_after is not None and i >= fail_after:
            if pause is not None:
                pause.set()
                await asyncio.sleep(3600)
            raise RuntimeError("client went away")
        yield data[i:i + size]


@pyagent_only
async def test_write_chunks_go_through_a_temporary_file(client: AgentClient, vm: Guest) -> None:
    d = vm.root / "up"
    path = d / "file.bin"
    data = os.urandom(3 * 1024 * 1024 + 500)
    writes = count_op(vm, "write_file")
    seen_during: list[tuple[bool, list[str]]] = []

    async def watched() -> AsyncIterator[bytes]:
        async for piece in chunked(data, 100_000):
            if d.exists():
                seen_during.append((path.exists(), part_files(d)))
            yield piece

    assert await client.write_file_chunks(str(path), watched(), mode=0o640) == len(data)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o640
    assert part_files(d) == []
    # While uploading, only the temporary file existed, beside the destination.
    assert seen_during and all(not exists and len(parts) == 1 for exists, parts in seen_during)
    # 100 kB pieces are coalesced into 1 MiB requests.
    assert [len(w["data"]) for w in writes[:3]] == [len(base64.b64encode(b"x" * (1 << 20)))] * 3
    assert len(writes) == 4
    # Empty files too.
    assert await client.write_file_chunks(str(d / "empty"), chunked(b"", 10)) == 0
    assert (d / "empty").read_bytes() == b""


async def test_aborted_write_leaves_no_file(client: AgentClient, vm: Guest) -> None:
    d = vm.root / "up"
    d.mkdir()
    old = d / "old.txt"
    old.write_bytes(b"previous content")
    data = os.urandom(3 << 20)
    with pytest.raises(RuntimeError, match="went away"):
        await client.write_file_chunks(str(old), chunked(data, 1 << 18, fail_after=2 << 20))
    with pytest.raises(RuntimeError):
        await client.write_file_chunks(str(d / "new.bin"),
                                       chunked(data, 1 << 18, fail_after=2 << 20))
    # Cancelled mid-upload (the HTTP client disconnected).
    paused = asyncio.Event()
    task = asyncio.create_task(client.write_file_chunks(
        str(d / "cancelled.bin"), chunked(data, 1 << 18, fail_after=1 << 20, pause=paused)))
    await paused.wait()
    assert len(part_files(d)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 5
    while part_files(d) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sorted(p.name for p in d.iterdir()) == ["old.txt"]
    assert old.read_bytes() == b"previous content"


async def test_write_follows_a_symlink_and_refuses_a_directory(client: AgentClient,
                                                               vm: Guest) -> None:
    real = vm.root / "real.txt"
    real.write_text("old")
    link = vm.root / "link.txt"
    link.symlink_to(real)
    assert await client.write_file(str(link), b"new") == 3
    assert link.is_symlink() and real.read_bytes() == b"new"
    with pytest.raises(AgentError) as ei:
        await client.write_file(str(vm.root), b"x")
    assert ei.value.errno == "EISDIR"
    assert part_files(vm.root) == []


@pyagent_only
async def test_write_to_an_agent_without_temporary_files(client: AgentClient,
                                                         vm: Guest) -> None:
    # An older agent ignores ``tmp`` and writes in place; the host carries on that way.
    handler = vm.py.ops["write_file"]
    vm.py.ops["write_file"] = lambda req: handler({k: v for k, v in req.items() if k != "tmp"})
    path = vm.root / "legacy.bin"
    data = os.urandom((2 << 20) + 1)
    assert await client.write_file(str(path), data) == len(data)
    assert path.read_bytes() == data
    assert part_files(vm.root) == []


async def _read_slowly(proc: AgentProcess, total: int, bound: int) -> None:
    """Take all of ``proc``'s output with a slow reader: the host never holds more than
    ``bound`` (about the window), and nothing is lost."""
    received, peak = 0, 0
    async for ev in proc.events():
        peak = max(peak, proc.queued_bytes)
        if ev["event"] == "stdout":
            received += len(ev["data"])
            if received % (4 << 20) < len(ev["data"]):
                await asyncio.sleep(0.05)
        else:
            assert ev == {"event": "exit", "exit_code": 0, "timed_out": False}
    assert received == total
    assert peak <= bound
    assert proc.lost_bytes == 0


def agent_proc(vm: Guest, rid: int) -> guest.Proc:
    with vm.py.procs_lock:
        return vm.py.procs[rid]


def _state(pid: int) -> str | None:
    """A process's state letter, or None once it is gone (it may go between two reads of
    /proc, so a missing file is an answer, not an error)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


async def wait_until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pyagent_only
async def test_credit_holds_a_fast_producer(client: AgentClient, vm: Guest) -> None:
    total = 48 << 20
    proc = await client.exec(["head", "-c", str(total), "/dev/zero"])
    assert proc.flow_control and proc.window == guest.CREDIT_WINDOW
    gp = agent_proc(vm, proc.id)
    bound = proc.window + 2 * guest.PIPE_READ
    # Nobody reads: the agent stops at the window, and so does the host's queue.
    await wait_until(lambda: gp.unacked >= proc.window)
    await asyncio.sleep(0.5)
    assert gp.unacked <= bound
    assert proc.queued_bytes <= bound
    assert not proc.exited and gp.popen.poll() is None  # blocked on its pipe
    await _read_slowly(proc, total, bound)


@pyagent_only
async def test_acks_only_for_what_the_consumer_took(client: AgentClient, vm: Guest) -> None:
    acks = count_op(vm, "ack")
    proc = await client.exec(["head", "-c", str(16 << 20), "/dev/zero"])
    gp = agent_proc(vm, proc.id)
    await wait_until(lambda: gp.unacked >= proc.window)
    events = proc.events()
    taken = 0
    while taken < (1 << 20):
        taken += len((await anext(events))["data"])
    await asyncio.sleep(0.3)
    acked = sum(a["bytes"] for a in acks)
    assert taken - guest.CREDIT_WINDOW // 4 < acked <= taken  # batched, never ahead
    assert all(a["target"] == proc.id for a in acks)
    rest = [ev async for ev in events]
    assert rest[-1]["exit_code"] == 0
    assert taken + sum(len(ev.get("data", b"")) for ev in rest) == 16 << 20


async def test_exec_without_credit_still_works(client: AgentClient, vm: Guest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # What an older agent does: no window in the answer, output sent as fast as it comes.
    proc = await client.exec(["head", "-c", str(12 << 20), "/dev/urandom"], flow_control=False)
    assert not proc.flow_control and proc.window == 0
    out, _, ev = await collect(proc)
    assert ev["exit_code"] == 0 and len(out) == 12 << 20
    # Nobody reading: the host drops beyond its queue limit and says how much, in order.
    monkeypatch.setattr(engine_agent, "QUEUE_LIMIT", 1 << 20)
    proc = await client.exec(["head", "-c", str(8 << 20), "/dev/zero"], flow_control=False)
    await proc.wait_exit()
    assert proc.queued_bytes <= 1 << 20
    kinds, delivered, lost = [], 0, 0
    async for ev in proc.events():
        kinds.append(ev["event"])
        delivered += len(ev.get("data", b""))
        lost += ev.get("bytes", 0) if ev["event"] == "lost" else 0
    assert "lost" in kinds and kinds[-1] == "exit"
    assert lost == proc.lost_bytes > 0
    assert delivered + lost == 8 << 20


async def test_wait_discards_unread_output(client: AgentClient) -> None:
    proc = await client.exec(["head", "-c", str(16 << 20), "/dev/zero"])
    assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_reconnect_forgives_output_in_flight(vm: Guest) -> None:
    c = vm.client()
    await c.connect(timeout=10)
    total = 16 << 20
    proc = await c.exec(["head", "-c", str(total), "/dev/zero"])
    # a window's worth sent and not acknowledged (nobody read it): the agent holds the pipe
    await wait_until(lambda: proc.queued_bytes >= proc.window)
    if vm.agent is not None:
        assert agent_proc(vm, proc.id).unacked >= proc.window
    await c.disconnect()
    await c.connect(timeout=10)
    received = 0
    async for ev in proc.events():
        received += len(ev.get("data", b""))
        if ev["event"] == "exit":
            assert ev["exit_code"] == 0
    assert received <= total
    await c.close()


@pyagent_only
async def test_output_of_an_unknown_process_is_acknowledged(vm: Guest) -> None:
    # A process of a previous host (a server restart, a process running since before a
    # snapshot): the new host does not know it and must not hold it.
    old = vm.client()
    await old.connect(timeout=10)
    proc = await old.exec(["head", "-c", str(16 << 20), "/dev/zero"])
    gp = agent_proc(vm, proc.id)
    await wait_until(lambda: gp.unacked >= proc.window)
    await old.disconnect()
    new = vm.client()
    await new.connect(timeout=10)
    await wait_until(lambda: gp.exited and proc.id not in vm.py.procs)
    await new.close()
    await old.close()


async def test_write_to_special_files_is_in_place(client: AgentClient, vm: Guest) -> None:
    # No temporary file can be made beside a device or a FIFO: those are written in place.
    fifo = vm.root / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert await client.write_file(str(fifo), b"through the fifo") == 0
    reader.join(5)
    assert got == [b"through the fifo"]
    mode = os.stat("/dev/null").st_mode
    assert await client.write_file("/dev/null", b"x" * 100) == 0
    assert os.stat("/dev/null").st_mode == mode  # a device's mode is never changed
    assert part_files(vm.root) == []


# -- parked threads (guest.Threads) -------------------------------------------------------------


def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_parked_thread_runs_the_next_work() -> None:
    # what a restored guest gains: its first exec's threads were made before the snapshot
    pool = guest.Threads(keep=2)
    ran: list[int] = []
    pool.start(lambda: ran.append(threading.get_ident()))
    _until(lambda: pool.parked == 1)
    pool.start(lambda: ran.append(threading.get_ident()))
    _until(lambda: len(ran) == 2)
    assert ran[0] == ran[1]  # the same thread, woken, not a new one
    pool.close()
    _until(lambda: pool.parked == 0)


def test_busy_pool_never_makes_work_wait() -> None:
    # requests may block (a mount, a process's waiter): work beyond the parked threads gets a
    # new thread at once, and at most ``keep`` threads stay parked afterwards
    pool = guest.Threads(keep=1)
    release = threading.Event()
    started: list[int] = []
    for _ in range(3):
        pool.start(lambda: (started.append(threading.get_ident()), release.wait(5)))
    _until(lambda: len(started) == 3)
    assert len(set(started)) == 3
    release.set()
    _until(lambda: pool.parked == 1)
    time.sleep(0.05)
    assert pool.parked == 1
    pool.close()


def test_crashing_work_does_not_take_its_thread_down() -> None:
    pool = guest.Threads(keep=1)

    def boom() -> None:
        raise RuntimeError("agent bug")

    pool.start(boom)
    _until(lambda: pool.parked == 1)
    done = threading.Event()
    pool.start(done.set)
    assert done.wait(5)
    pool.close()
    _until(lambda: pool.parked == 0)


@pyagent_only
async def test_exec_reuses_the_threads_of_the_last_one(client: AgentClient, vm: Guest,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # pumps, waiter and request threads go back to the agent's pool: a second exec starts
    # no thread of its own
    # long enough that its request thread, two pumps and waiter all run at once
    proc = await client.exec(["sleep", "0.3"])
    assert await proc.wait() == 0
    _until(lambda: vm.py.threads.parked >= 4)
    started: list[str] = []

    class Counted(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    monkeypatch.setattr(guest.threading, "Thread", Counted)
    proc = await client.exec(["sh", "-c", "echo hi"])
    out, _, ev = await collect(proc)
    assert out == b"hi\n" and ev["exit_code"] == 0
    assert started == []


async def test_nothing_reaches_the_agent_while_quiet(client: AgentClient, vm: Guest) -> None:
    """``quiet()`` (a capture copying a stopped guest's memory): a request made inside is sent
    only on the way out, and output acknowledgements are added up and sent then."""
    async with client.quiet():
        asking = asyncio.ensure_future(client.ping())
        await asyncio.sleep(0.3)
        assert not asking.done()  # held: not sent, so not answered
        client._ack(7, 100)
        client._ack(7, 28)
        assert client._held_acks == {7: 128}
    assert (await asyncio.wait_for(asking, 5))["version"] == vm.version
    assert client._held_acks is None


async def test_identity_files_of_the_same_length_are_rewritten_in_place(
        client: AgentClient, vm: Guest) -> None:
    # a clone of a clone: the files keep their inode (no new file, no rename), their mode is
    # the one asked for, and one of another length is replaced whole, with no old tail
    etc = vm.root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hostname").write_text("clone-a\n")
    (etc / "machine-id").write_text("f" * 32 + "\n")
    (etc / "machine-id").chmod(0o600)
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tclone-a-much-longer\n")
    inodes = {n: (etc / n).stat().st_ino for n in ("hostname", "machine-id", "hosts")}
    await client.settle(("clone-b", "0123456789abcdef0123456789abcdef", os.urandom(64)))
    assert (etc / "hostname").read_text() == "clone-b\n"
    assert (etc / "machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert (etc / "hosts").read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\tclone-b\n"
    assert (etc / "hostname").stat().st_ino == inodes["hostname"]
    assert (etc / "machine-id").stat().st_ino == inodes["machine-id"]
    assert (etc / "machine-id").stat().st_mode & 0o777 == 0o444
    assert (etc / "hosts").stat().st_ino != inodes["hosts"]  # shorter now: replaced
    assert sorted(p.name for p in etc.iterdir() if "tmp" in p.name) == []


async def test_a_fifo_in_place_of_an_identity_file_does_not_hold_the_settle(
        client: AgentClient, vm: Guest) -> None:
    etc = vm.root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hostname").unlink(missing_ok=True)
    os.mkfifo(etc / "hostname")
    await asyncio.wait_for(
        client.settle(("clone-c", "0123456789abcdef0123456789abcdef", os.urandom(64))), 10)
    assert (etc / "hostname").read_text() == "clone-c\n"  # replaced by a file


# -- black-box replacements of the tests above that look inside the Python agent -----------------


def _children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:  # a thread may end between the listing and the read
            out += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


async def test_a_fast_producer_waits_for_its_acks(client: AgentClient, vm: Guest) -> None:
    total = 48 << 20
    proc = await client.exec(["head", "-c", str(total), "/dev/zero"])
    assert proc.flow_control and proc.window == 2 << 20
    bound = proc.window + 2 * 65536
    await asyncio.sleep(1.0)  # nobody reads: the agent stops at the window
    assert proc.window <= proc.queued_bytes <= bound
    assert not proc.exited
    assert Path(f"/proc/{proc.pid}").exists()  # blocked on its pipe
    await _read_slowly(proc, total, bound)


@agentd_only  # the Python double's stop can hang on the output held for the old host
async def test_a_new_host_acknowledges_a_process_it_does_not_know(vm: Guest) -> None:
    old = vm.client()
    await old.connect(timeout=10)
    proc = await old.exec(["head", "-c", str(16 << 20), "/dev/zero"])
    await asyncio.sleep(0.5)
    assert Path(f"/proc/{proc.pid}").exists()
    await old.disconnect()
    new = vm.client()
    await new.connect(timeout=10)
    await wait_until(lambda: _state(proc.pid) in (None, "Z"))
    await new.close()
    await old.close()


async def test_agentd_runs_its_warmup_from_a_warm_ping_or_a_settle_one_at_a_time(
        agentd_binary: Path) -> None:
    """agentd's warm-up (0.5.1): no parked shell; a ping with ``warm`` (a restore's first) or a
    settle runs the program once, the way an exec starts one, and reaps it; a poke while a run
    is on starts none; a refused request or ``warm: false`` none."""
    base = Path(tempfile.mkdtemp(prefix="tka-"))
    pokes, release = base / "pokes", base / "release"
    program = base / "program"
    # each run records its start, then holds until the test lets it go
    program.write_text(f"#!/bin/sh\necho started >> {pokes}\n"
                       f"while [ ! -e {release} ]; do sleep 0.02; done\n")
    program.chmod(0o755)
    g = _agentd_guest(base, agentd_binary, warm_program=str(program))
    c = g.client()
    try:
        await c.connect(10)  # its pings do not ask for the warm-up
        assert _children(g.pid) == [] and not pokes.exists()
        await c._call("ping", 5, warm=True)  # as a restore's first ping asks
        assert _lines_soon(pokes, 1) == 1
        await c._call("ping", 5, warm=True)  # one run at a time: this one is on
        await c.settle(None)
        assert _lines_soon(pokes, 2, timeout=0.5) == 1
        release.touch()
        await wait_until(lambda: _children(g.pid) == [])  # ended and reaped
        release.unlink()
        with pytest.raises(AgentError) as ei:
            await c._call("ping", 5, warm="yes")
        assert ei.value.errno == "EINVAL" and "warm" in str(ei.value)
        with pytest.raises(AgentError):
            await c._call("settle", 5, epoch_ns=time.time_ns(), hostname="bad name!",
                          machine_id="0" * 32, entropy="AAAA")
        await c.settle(None, warm=False)
        assert _lines_soon(pokes, 2, timeout=0.5) == 1
        await c.settle(("clone-4", "0123456789abcdef0123456789abcdef", os.urandom(64)))
        assert _lines_soon(pokes, 2) == 2
        release.touch()
        await wait_until(lambda: _children(g.pid) == [])
        order = [k for k in g.system.order if k in ("clock", "poke", "hostname")]
        # the first ping's poke, the settle while it ran (a poke, no run), the last settle's
        assert order == ["poke", "poke", "clock", "poke", "clock", "clock", "poke", "hostname"]
    finally:
        await c.close()
        g.close()
        shutil.rmtree(base, ignore_errors=True)


async def test_agentd_settles_in_a_restores_first_ping(agentd_binary: Path) -> None:
    """agentd 0.5.2: a ping may carry a settle (a restore's first request, sent once the guest
    runs): the clock, the warm-up's poke, then the identity, in one round trip; checked whole
    before anything changes. An agent that ignores the field (older ones) answers the ping
    only, which ``ping_settle`` reports as None (test_restore_settle)."""
    base = Path(tempfile.mkdtemp(prefix="tka-"))
    pokes = base / "pokes"
    program = base / "program"
    program.write_text(f"#!/bin/sh\necho started >> {pokes}\n")
    program.chmod(0o755)
    g = _agentd_guest(base, agentd_binary, warm_program=str(program))
    c = g.client()
    try:
        await c.open(10)
        before = time.time_ns()
        settled = await c.ping_settle(("clone-5", "0123456789abcdef0123456789abcdef",
                                       b"e" * 64), warm=True)
        assert settled is not None and settled["took_s"] >= 0
        # its clock as it answered, against the host's at arrival (one clock here)
        assert 0 <= settled["behind_s"] < 5
        assert await c.version() == tuple(int(x) for x in agentd.version().split("."))
        assert [k for k in g.system.order if k in ("clock", "poke", "hostname", "entropy")] \
            == ["clock", "poke", "hostname", "entropy"]
        assert g.system.clock[0] >= before and g.system.hostnames == ["clone-5"]
        assert g.system.entropy == [b"e" * 64]
        assert (g.root / "etc" / "machine-id").read_text() == \
            "0123456789abcdef0123456789abcdef\n"
        assert _lines_soon(pokes, 1) == 1
        await wait_until(lambda: _children(g.pid) == [])
        # the clock only (a resumed session keeps its identity), no warm-up asked for
        assert await c.ping_settle(None, warm=False) is not None
        assert g.system.order.count("clock") == 2 and g.system.hostnames == ["clone-5"]
        assert g.system.order.count("poke") == 1
        calls = list(g.system.order)
        for settle, field in [(5, "settle"), ({}, "epoch_ns"),
                              ({"epoch_ns": time.time_ns(), "hostname": "bad name!",
                                "machine_id": "0" * 32, "entropy": "AAAA"}, "hostname")]:
            with pytest.raises(AgentError) as ei:
                await c._call("ping", 5, warm=True, settle=settle)
            assert ei.value.errno == "EINVAL" and field in str(ei.value)
        assert g.system.order == calls  # refused whole: no clock, no poke, no identity
    finally:
        await c.close()
        g.close()
        shutil.rmtree(base, ignore_errors=True)


# -- output kept while no host is connected (raw socket: the host client forgets old ids) -------


class _RawHost:
    """One connection to the agent's socket, speaking the protocol's lines directly."""

    def __init__(self, sock: Path) -> None:
        import json

        self.json = json
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(str(sock))
        self.buf = b""
        self.s.sendall(b"\n")  # a host starts each connection with an empty line

    def send(self, **req: object) -> None:
        self.s.sendall(self.json.dumps(req).encode() + b"\n")

    def recv(self, timeout: float = 10) -> dict:
        self.s.settimeout(timeout)
        while b"\n" not in self.buf:
            data = self.s.recv(1 << 16)
            assert data, "agent closed the connection"
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return self.json.loads(line)

    def close(self) -> None:
        self.s.close()


@agentd_only
def test_output_made_without_a_host_is_kept_and_sent_to_the_next(vm: Guest, tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    progress = tmp_path / "progress"
    size = 10 << 20
    h = _RawHost(vm.sock)
    program = (
        "import os, sys, time\n"
        "time.sleep(0.3)\n"
        "chunk = b'x' * 4096\n"
        f"for i in range({size} // 4096):\n"
        "    os.write(1, chunk)\n"
        f"    open({str(progress)!r}, 'w').write(str((i + 1) * 4096))\n"
        "sys.stderr.write('end\\n')\n"
        f"open({str(marker)!r}, 'w').close()\n")
    h.send(id=1, op="exec", argv=["python3", "-c", program])
    assert h.recv()["ok"] is True
    h.close()  # gone before the output is made
    time.sleep(2.5)
    # Bounded: the agent keeps 4 MiB (plus a pipe's and a read's worth), then stops reading,
    # so the producer blocks.
    assert not marker.exists()
    written = int(progress.read_text())
    assert (4 << 20) <= written <= (4 << 20) + (512 << 10)
    time.sleep(0.5)
    assert int(progress.read_text()) == written
    h = _RawHost(vm.sock)
    t0 = time.monotonic()
    h.send(id=2, op="ping")
    got = {"stdout": 0, "stderr": b""}
    exit_msg = None
    ping_at = None
    while exit_msg is None or ping_at is None:
        m = h.recv()
        if m["id"] == 2:
            assert m["ok"] is True
            ping_at = time.monotonic() - t0
        elif m.get("event") in ("stdout", "stderr"):
            data = base64.b64decode(m["data"])
            if m["event"] == "stdout":
                got["stdout"] += len(data)
            else:
                got["stderr"] += data
        elif m.get("event") == "exit":
            exit_msg = m
    h.close()
    assert ping_at < 2
    assert got["stdout"] == size and got["stderr"] == b"end\n"
    assert exit_msg["exit_code"] == 0
    assert marker.exists()


@agentd_only
def test_a_new_host_is_answered_while_old_output_waits(vm: Guest, tmp_path: Path) -> None:
    # A process whose output the agent holds (the host left) does not hold up anyone else.
    h = _RawHost(vm.sock)
    h.send(id=1, op="exec", argv=["sh", "-c", "sleep 0.2; head -c 8000000 /dev/zero; sleep 30"])
    assert h.recv()["ok"] is True
    h.close()
    time.sleep(1)
    h = _RawHost(vm.sock)
    try:
        t0 = time.monotonic()
        for rid, req in enumerate([{"op": "ping"}, {"op": "sync"},
                                   {"op": "exec", "argv": ["true"]}], start=10):
            h.send(id=rid, **req)
        seen: dict[int, dict] = {}
        while len([k for k in seen if k >= 10 and "event" not in seen[k]]) < 3:
            m = h.recv()
            if "event" not in m:
                seen[m["id"]] = m
        assert all(seen[k]["ok"] for k in (10, 11, 12))
        assert time.monotonic() - t0 < 3
        h.send(id=13, op="kill", target=1)
        while True:
            m = h.recv()
            if m["id"] == 1 and m.get("event") == "exit":
                assert m["exit_code"] == 137
                break
    finally:
        h.close()

"""The processes a host starts are its own until they are gone (reliability, issue 9).

- ``vm_process_owner``: a process is ours only when it is a program we start (QEMU, passt) and
  carries the token of a VM under our run root; ``our_processes`` reads that from /proc (here a
  fake /proc tree).
- ``Machine.kill`` waits until QEMU and its helper are gone, and raises when one survives; a
  machine attached by pid never signals a process without its token.
- ``LocalHost``: recovery kills the processes no VM owns and waits for them; a terminate whose
  process outlives SIGKILL fails and keeps the VM (with its files) until a retry; the watcher
  fails a session whose network broke.

Processes that stand for QEMU and passt are ``sh`` blocked in its builtin ``read``, started
under the programs' names with the same token options as the real command lines.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest

from tenkibox.config import Layout
from tenkibox.engine import machine as machine_mod
from tenkibox.engine import net
from tenkibox.engine.agent import AgentClient
from tenkibox.engine.machine import (
    Machine,
    MachineConfig,
    MachineError,
    MachineFiles,
    RunState,
    pid_alive,
    read_argv,
    vm_process_owner,
)
from tenkibox.errors import ConflictError
from tenkibox.host import local as local_mod
from tenkibox.host.api import MachineShape
from tenkibox.host.local import LocalHost, our_processes
from tenkibox.host.vm import VM, VMRecord

RUN = Path("/dev/shm/tenki-0123456789")
QMP = f"unix:{RUN}/ses_a/qmp.sock,server=on,wait=off"
PID = f"{RUN}/ses_b/passt.pid"


# -- the matcher --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "owner"), [
    # what engine.machine and engine.net start
    (["qemu-system-x86_64", "-name", "ses_a", "-qmp", QMP], "ses_a"),
    (["qemu-system-aarch64", "-qmp", QMP, "-incoming", "defer"], "ses_a"),
    (["passt", "--foreground", "--fd", "4", "--pid", PID, "--no-map-gw"], "ses_b"),
    (["passt.avx2", "--pid", PID], "ses_b"),  # Debian's passt re-executes as passt.avx2
    (["/usr/bin/passt", "--pid", PID], "ses_b"),
    # other programs naming our files are not ours, whatever they mention
    (["tail", "-f", f"{RUN}/ses_a/qemu.log"], None),
    (["python3", "-qmp", QMP], None),
    (["sh", "-c", f"rm -rf {RUN}/ses_a"], None),
    (["nsenter", "--net=/run/netns/tenki-0123456789-ses_a", "--", "qemu-system-x86_64",
      "-qmp", QMP], None),  # nsenter executes QEMU: its command line is then QEMU's own
    # our programs without our token
    (["qemu-system-x86_64", "-qmp", "unix:/dev/shm/tenki-another/ses_a/qmp.sock"], None),
    (["qemu-system-x86_64", "-qmp", f"unix:{RUN}x/ses_a/qmp.sock"], None),  # a longer root
    (["qemu-system-x86_64", "-qmp", f"unix:{RUN}/ses_a/other.sock"], None),
    (["qemu-system-x86_64", "-name", f"{RUN}/ses_a/qmp.sock"], None),
    (["qemu-system-x86_64", "-qmp"], None),
    (["passt", "--foreground", "--fd", "4"], None),  # started before helpers carried one
    (["passt", "--pid", f"{RUN}/ses_b/other.pid"], None),
    (["passt", "--pid", f"{RUN}/passt.pid"], None),
    ([], None),
])
def test_owner_is_told_by_program_and_token(argv: list[str], owner: str | None) -> None:
    assert vm_process_owner(argv, RUN) == owner


def _fake_proc(root: Path, procs: dict[int, tuple[list[str], str]]) -> Path:
    for pid, (argv, state) in procs.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "stat").write_text(f"{pid} (x) {state} 1 {pid} {pid} 0 -1\n")
    (root / "self").mkdir()
    return root


def test_our_processes_reads_proc(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", {
        10: (["qemu-system-x86_64", "-qmp", QMP], "S"),
        11: (["passt", "--pid", PID], "S"),
        12: (["qemu-system-x86_64", "-qmp", QMP], "Z"),  # exited, not reaped: gone
        13: (["tail", "-f", f"{RUN}/ses_a/qemu.log"], "S"),
        14: ([], "S"),  # a kernel thread
        15: (["qemu-system-x86_64", "-qmp", "unix:/dev/shm/tenki-other/ses_a/qmp.sock"], "R"),
    })
    found = our_processes(RUN, proc)
    assert {pid: owner for pid, (owner, _) in found.items()} == {10: "ses_a", 11: "ses_b"}
    assert found[11][1] == f"passt --pid {PID}"


# -- processes standing for QEMU and passt ----------------------------------------------------


Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    started: list[subprocess.Popen[bytes]] = []

    def run(program: str, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([program, "-c", "read x", *args], executable="/bin/sh",
                             stdin=subprocess.PIPE, start_new_session=True)
        started.append(p)
        # right after the exec, /proc shows an empty command line for a moment
        deadline = time.monotonic() + 5
        while not read_argv(p.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        return p

    yield run
    for p in started:
        p.kill()
        p.wait()


def _qemu_args(run_dir: Path) -> tuple[str, ...]:
    return ("-qmp", f"unix:{run_dir}/qmp.sock,server=on,wait=off")


def _passt_args(run_dir: Path) -> tuple[str, ...]:
    return ("--pid", str(run_dir / net.PASST_PID))


CFG = MachineConfig(cpu=1, memory_mb=64, accel="tcg", kernel="/k", initrd="/i", cmdline="")


def _machine(run_dir: Path, qemu: subprocess.Popen[bytes] | None = None, *,
             pid: int | None = None, net_pid: int | None = None) -> Machine:
    """A machine launched as ``qemu`` (our child), or attached to ``pid`` (after a restart)."""
    m = Machine(run_dir.name, MachineFiles(run_dir), CFG)
    m._proc = qemu
    m.pid = qemu.pid if qemu is not None else pid
    m.net_pid = net_pid
    m.state = RunState.RUNNING
    return m


def _never_dies(mp: pytest.MonkeyPatch) -> list[int]:
    """SIGKILL has no effect (a process stuck in the kernel); returns the pids signalled."""
    signalled: list[int] = []
    mp.setattr(machine_mod, "KILL_WAIT_S", 0.2)
    mp.setattr(machine_mod.os, "kill", lambda pid, sig: signalled.append(pid))
    return signalled


# -- Machine.kill -------------------------------------------------------------------------------


async def test_kill_returns_once_qemu_and_its_helper_are_gone(tmp_path: Path,
                                                              spawn: Spawn) -> None:
    run_dir = tmp_path / "ses_k"
    qemu = spawn("qemu-system-x86_64", *_qemu_args(run_dir))
    passt = spawn("passt", *_passt_args(run_dir))  # a helper found again by its pid
    m = _machine(run_dir, qemu, net_pid=passt.pid)
    assert m.alive() and m.net_alive()
    await m.kill()
    assert qemu.poll() is not None  # reaped
    assert not pid_alive(passt.pid)
    assert m.state == RunState.STOPPED
    await m.kill()  # again: nothing left to do


async def test_kill_raises_while_a_process_survives(tmp_path: Path, spawn: Spawn) -> None:
    run_dir = tmp_path / "ses_s"
    qemu = spawn("qemu-system-x86_64", *_qemu_args(run_dir))
    m = _machine(run_dir, qemu)
    with pytest.MonkeyPatch.context() as mp:
        signalled = _never_dies(mp)
        with pytest.raises(MachineError, match=rf"QEMU \(pid {qemu.pid}\) still running "
                                               "0.2s after SIGKILL"):
            await m.kill()
    assert signalled == [qemu.pid]
    assert m.alive() and m.state == RunState.RUNNING  # not stopped: the caller keeps it
    await m.kill()
    assert qemu.poll() is not None and m.state == RunState.STOPPED


async def test_an_attached_machine_never_signals_a_pid_without_its_token(
        tmp_path: Path, spawn: Spawn) -> None:
    run_dir = tmp_path / "ses_t"
    # the pids of machine.json now belong to others: a program that is not QEMU, and a QEMU
    # of another VM
    stranger = spawn("qemu-system-x86_64", *_qemu_args(tmp_path / "ses_other"))
    other = spawn("sleepy", *_qemu_args(run_dir))
    m = _machine(run_dir, pid=stranger.pid, net_pid=other.pid)
    assert not m.alive() and not m.net_alive()
    await m.kill()
    assert stranger.poll() is None and other.poll() is None
    # its own QEMU, found again by pid, is killed
    own = spawn("qemu-system-x86_64", *_qemu_args(run_dir))
    m = _machine(run_dir, pid=own.pid)
    assert m.alive()
    await m.kill()
    assert not pid_alive(own.pid)


# -- LocalHost ----------------------------------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHost:
    monkeypatch.setenv("TENKI_RUN_ROOT", str(tmp_path / "shm"))
    monkeypatch.setenv("TENKI_NET", "passt")  # no namespaces: HostNetwork builds nothing
    return LocalHost(Layout(tmp_path / "home"), "tcg")


def _vm(host: LocalHost, session_id: str, machine: Machine) -> VM:
    shape = MachineShape(cpu=1, memory_mb=64, cmdline="", kernel="k", initrd="i")
    files = host.paths.files(session_id)
    files.run_dir.mkdir(parents=True, exist_ok=True)
    files.console.write_text("a file of the VM\n")
    return VM(VMRecord(session_id, shape, []), machine, AgentClient(files.agent),
              host.paths.disk_dir(session_id))


def test_recovery_kills_strays_by_token_and_waits_for_them(host: LocalHost,
                                                           spawn: Spawn) -> None:
    run = host.paths.layout.run
    stray_qemu = spawn("qemu-system-x86_64", *_qemu_args(run / "ses_gone"))
    stray_passt = spawn("passt", *_passt_args(run / "ses_gone"))
    bystander = spawn("tail", f"{run}/ses_gone/qemu.log", *_qemu_args(run / "ses_gone"))
    live_qemu = spawn("qemu-system-x86_64", *_qemu_args(run / "ses_live"))
    host.vms["ses_live"] = _vm(host, "ses_live", _machine(run / "ses_live", pid=live_qemu.pid))
    assert host._kill_strays() == 2
    # gone when it returns (exited; these are the test's children, so zombies until reaped)
    assert not pid_alive(stray_qemu.pid) and not pid_alive(stray_passt.pid)
    assert bystander.poll() is None and live_qemu.poll() is None


async def test_recovery_finds_a_vm_it_already_holds_without_attaching_again(
        host: LocalHost, spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker recovered its VMs at its start; a control plane starting later asks again.
    Attaching a second time would wait forever on QEMU's monitor (one client): a VM held is
    found as it is, and its process is not a stray."""
    run = host.paths.layout.run
    live_qemu = spawn("qemu-system-x86_64", *_qemu_args(run / "ses_live"))
    host.vms["ses_live"] = _vm(host, "ses_live", _machine(run / "ses_live", pid=live_qemu.pid))

    async def no_attach(session_id: str) -> VM:
        raise AssertionError(f"attached again to {session_id}")

    monkeypatch.setattr(host, "_attach", no_attach)
    got = await host.recover({"ses_live": []})
    assert got.found == ["ses_live"] and not got.lost and got.strays_killed == 0
    assert live_qemu.poll() is None and host.vms["ses_live"].machine.pid == live_qemu.pid


def test_recovery_waits_for_a_slow_death_and_gives_up_in_bounded_time(
        host: LocalHost, spawn: Spawn, caplog: pytest.LogCaptureFixture) -> None:
    run = host.paths.layout.run
    slow = spawn("qemu-system-x86_64", *_qemu_args(run / "ses_slow"))
    real_kill = os.kill
    # (os.kill is patched only inside these blocks: the fixture's clean-up needs the real one)
    with pytest.MonkeyPatch.context() as mp:
        # the process takes 0.3 s to die (a QEMU freeing a large guest RAM)
        mp.setattr(local_mod.os, "kill",
                   lambda pid, sig: threading.Timer(0.3, real_kill, (pid, sig)).start())
        started = time.monotonic()
        assert host._kill_strays() == 1
        assert time.monotonic() - started >= 0.3 and not pid_alive(slow.pid)
    # one that never dies: given up after STRAY_WAIT_S, and said so
    stuck = spawn("qemu-system-x86_64", *_qemu_args(run / "ses_stuck"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local_mod.os, "kill", lambda pid, sig: None)
        mp.setattr(local_mod, "STRAY_WAIT_S", 0.3)
        started = time.monotonic()
        assert host._kill_strays() == 1
        assert 0.3 <= time.monotonic() - started < 5
    assert stuck.poll() is None
    assert f"pid {stuck.pid} still runs" in caplog.text


async def test_a_terminate_whose_qemu_survives_fails_and_keeps_the_vm(
        host: LocalHost, spawn: Spawn) -> None:
    sid = "ses_stuck"
    run_dir = host.paths.run_dir(sid)
    qemu = spawn("qemu-system-x86_64", *_qemu_args(run_dir))
    host.vms[sid] = _vm(host, sid, _machine(run_dir, qemu))
    with pytest.MonkeyPatch.context() as mp:
        _never_dies(mp)
        with pytest.raises(MachineError, match="still running"):
            await host.terminate(sid, [])
    # still ours: its files stay, no other VM may take the session, nothing calls it unowned
    assert sid in host._stuck and not host.has_vm(sid)
    assert run_dir.exists() and str(run_dir) not in host.unowned_files(set())
    with pytest.raises(ConflictError):
        host._slot(sid, 1)
    # the retry (the control plane's sweeper) finds it, and this time the kill works
    await host.terminate(sid, [])
    assert qemu.poll() is not None
    assert sid not in host._stuck and not run_dir.exists()
    await host.terminate(sid, [])  # idempotent


class BrokenNetwork:
    """The host's network of one VM says a part of it is gone."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.torn_down: list[str] = []

    async def broken(self, session_id: str) -> str | None:
        return self.reason

    async def teardown(self, session_id: str) -> None:
        self.torn_down.append(session_id)


@pytest.mark.parametrize("first_kill_fails", [False, True])
async def test_the_watcher_fails_a_session_whose_network_broke(
        host: LocalHost, spawn: Spawn, monkeypatch: pytest.MonkeyPatch,
        first_kill_fails: bool) -> None:
    sid = "ses_net"
    run_dir = host.paths.run_dir(sid)
    qemu = spawn("qemu-system-x86_64", *_qemu_args(run_dir))
    vm = _vm(host, sid, _machine(run_dir, qemu))
    reason = "the host's nftables table of the VM's network (tenki_x_ses_net) was removed"
    network = BrokenNetwork(reason)
    monkeypatch.setattr(host, "network", network)
    monkeypatch.setattr(local_mod, "WATCH_INTERVAL_S", 0.02)
    signals: list[int] = []
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        signals.append(pid)
        if len(signals) > 1 or not first_kill_fails:
            real_kill(pid, sig)

    host.vms[sid] = vm
    host._watchers[sid] = asyncio.create_task(host._watch(vm))
    with pytest.MonkeyPatch.context() as mp:
        # with first_kill_fails the first SIGKILL is lost: the watcher tries again
        mp.setattr(machine_mod, "KILL_WAIT_S", 0.2)
        mp.setattr(machine_mod.os, "kill", kill)
        gone = await asyncio.wait_for(anext(host.watch()), 10)
    assert gone.session_id == sid
    assert gone.reason == f"{reason}; the VM was stopped"
    # reported only once the VM's process is gone and its network and files removed
    assert not pid_alive(qemu.pid)
    assert network.torn_down == [sid] and not run_dir.exists()
    assert not host.has_vm(sid) and sid not in host._stuck
    assert signals == [qemu.pid] * (2 if first_kill_fails else 1)


# -- the real passt -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_passt_writes_its_pid_file_carries_the_token_and_exits_with_its_peer() -> None:
    """The token is a real option of passt (as root it runs as nobody, and still writes its
    pid file); a helper whose QEMU never started exits when the server's end closes."""
    root = Path(tempfile.mkdtemp(prefix="tenki-test-", dir="/dev/shm"))
    try:
        root.chmod(0o755)  # as a run root is made (mkdir under the default umask)
        run_dir = root / "ses_passt"
        run_dir.mkdir(mode=0o755)
        backend = net.start(run_dir, "passt")
        helper = backend.helper
        assert helper is not None
        try:
            pid_file = run_dir / net.PASST_PID
            deadline = time.monotonic() + 10
            while not pid_file.read_text().strip() and time.monotonic() < deadline:
                assert helper.poll() is None, (run_dir / "passt.log").read_text()
                time.sleep(0.02)
            assert int(pid_file.read_text()) == helper.pid
            assert vm_process_owner(read_argv(helper.pid), root) == "ses_passt"
            assert our_processes(root) == {helper.pid: ("ses_passt", ANY)}
            backend.after_launch()  # the server's end of the socket pair closes
            assert helper.wait(10) == 0
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
    finally:
        shutil.rmtree(root)

"""How a host has TCG run a new VM's vCPUs (``engine.machine.tcg_threads``): it counts the vCPUs
of every other VM it has that is busy or being started, so that a burst of restores sees each
other from the request on, a start that failed no longer counts, and an idle VM (its QEMU's CPU
time, read from /proc for real processes here) does not count."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tenkibox.config import Layout
from tenkibox.engine.agent import AgentClient
from tenkibox.engine.machine import Machine, MachineConfig, cpu_seconds
from tenkibox.errors import ValidationError
from tenkibox.host.api import MachineShape
from tenkibox.host.local import LocalHost
from tenkibox.host.vm import VM, VMRecord


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHost:
    monkeypatch.setenv("TENKI_RUN_ROOT", str(tmp_path / "shm"))
    monkeypatch.setenv("TENKI_NET", "passt")  # no namespaces: HostNetwork builds nothing
    monkeypatch.delenv("TENKI_TCG_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})  # four cores
    return LocalHost(Layout(tmp_path / "home"), "tcg")


def _running(host: LocalHost, session_id: str, vcpus: int) -> None:
    shape = MachineShape(cpu=vcpus, memory_mb=64, cmdline="", kernel="k", initrd="i")
    files = host.paths.files(session_id)
    cfg = MachineConfig(cpu=vcpus, memory_mb=64, accel="tcg", kernel="k", initrd="i", cmdline="")
    host.vms[session_id] = VM(VMRecord(session_id, shape, []), Machine(session_id, files, cfg),
                              AgentClient(files.agent), host.paths.disk_dir(session_id))


def test_vcpus_running_and_being_started_count(host: LocalHost) -> None:
    _running(host, "ses_a", 2)
    host._slot("ses_b", 2)
    assert host._tcg_threads("ses_b") == "multi"  # 2 + 2 on four cores
    host._slot("ses_c", 2)
    assert host._tcg_threads("ses_c") == "single"  # b is counted before it has a VM
    host._slot("ses_d", 1)
    assert host._tcg_threads("ses_d") == "multi"  # one vCPU is one thread either way


async def test_a_start_that_failed_no_longer_counts(host: LocalHost) -> None:
    _running(host, "ses_a", 2)
    host._slot("ses_b", 2)

    async def fails() -> VM:
        raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError):
        await host._start("ses_b", fails())
    host._slot("ses_c", 2)
    assert host._tcg_threads("ses_c") == "multi"


def test_a_bad_setting_is_refused_when_the_host_starts(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_RUN_ROOT", str(tmp_path / "shm"))
    monkeypatch.setenv("TENKI_NET", "passt")
    monkeypatch.setenv("TENKI_TCG_THREADS", "two")
    with pytest.raises(ValidationError, match="TENKI_TCG_THREADS"):
        LocalHost(Layout(tmp_path / "home"), "tcg")


def _starts(host: LocalHost, session_id: str, vcpus: int) -> str:
    """The mode a VM being started now gets (its slot is let go of afterwards)."""
    host._slot(session_id, vcpus)
    try:
        return str(host._tcg_threads(session_id))
    finally:
        host._starting.pop(session_id)
        host._starting_vcpus.pop(session_id)


def test_an_idle_vm_does_not_count_and_a_busy_one_does(host: LocalHost) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(["sleep", "60"])
    try:
        for sid, proc in (("ses_busy", busy), ("ses_idle", idle)):
            _running(host, sid, 2)
            host.vms[sid].machine.pid = proc.pid
        # not sampled twice yet: each counts, as a VM just started does
        assert _starts(host, "ses_new", 2) == "single"  # 2 + 2 + 2 on four cores
        for _ in range(2):
            for sid, proc in (("ses_busy", busy), ("ses_idle", idle)):
                host.vms[sid].sample_cpu(time.monotonic(), cpu_seconds(proc.pid))
            time.sleep(0.4)
        assert host.vms["ses_busy"].busy and not host.vms["ses_idle"].busy
        assert _starts(host, "ses_new", 2) == "multi"  # the busy one's 2 + 2
        # a QEMU whose time cannot be read any more is not known to be idle
        host.vms["ses_idle"].sample_cpu(time.monotonic(), None)
        assert _starts(host, "ses_new", 2) == "single"
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()

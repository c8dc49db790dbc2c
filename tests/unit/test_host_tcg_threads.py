"""How a host has TCG run a new VM's vCPUs (``engine.machine.tcg_threads``): it counts the vCPUs
of every other VM it has, running or being started, so that a burst of restores sees each
other from the request on, and a start that failed no longer counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenkibox.config import Layout
from tenkibox.engine.agent import AgentClient
from tenkibox.engine.machine import Machine, MachineConfig
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

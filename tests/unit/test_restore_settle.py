"""The end of a restore (``restore._load_state`` then ``restore._settle``): the device state
loaded, the guest resumed, its
agent reached, then its clock and identity set, with the real guest agent on a unix socket in
place of the VM (QEMU's part is a stand-in; tests/integration runs the real one).

What must hold whichever agent the snapshot carries: the clock is set, the identity is new
(unless the session is resumed: same guest), and the steps say what happened. The first
request, once the guest runs, is a ping carrying the settle: ``agentd`` (from 0.5.2, run here as
it is built) settles in it, one request in all. An older agent answers the ping only: from
0.4.0 it then gets one request (``settle``); an older one, baked into an older snapshot, gets
``set_time`` and ``reidentify``, which are all it knows."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support import agentd
from support import pyagent as guest
from support.guest_system import SandboxSystem

from tenkibox.engine.agent import AgentClient
from tenkibox.host import restore
from tenkibox.steps import Steps


class RecordingAgent(guest.Agent):
    """The agent as it is, keeping the requests it was sent."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.requests: list[str] = []

    def dispatch(self, line: bytes) -> None:
        self.requests.append(line.decode())
        super().dispatch(line)


class OldAgent(RecordingAgent):
    """An agent 0.3.0, as baked into snapshots taken before ``settle`` existed."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        del self.ops["settle"]

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {**super().op_ping(req), "version": "0.3.0"}


class WarmPingAgent(RecordingAgent):
    """An agent that reports 0.5.1: it starts its warm-up on a ping with ``warm``."""

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {**super().op_ping(req), "version": "0.5.1"}


class Machine:
    """QEMU's part: alive, and a resume that lets the guest run."""

    def __init__(self, events: list[str], console: Path | None = None) -> None:
        self.events = events
        # the serial console's end is quoted when the agent never answers
        self.files = SimpleNamespace(console=console or Path("/nonexistent/console.log"))

    def alive(self) -> bool:
        return True

    async def resume(self) -> None:
        self.events.append("resume")

    async def vcpu_report(self) -> str:
        return "QEMU running; vCPU 0 in the guest kernel at ffffffff81000000, halted"


@pytest.fixture(params=["agentd", "0.4.0", "0.3.0"])
def guest_agent(request: pytest.FixtureRequest,
                ) -> Iterator[tuple[guest.Agent | None, SandboxSystem | agentd.Calls, Path]]:
    """The agent on ``<base>/agent.sock`` (None for agentd, a process of its own), what it
    did to the machine, and ``base``."""
    base = Path(tempfile.mkdtemp(prefix="tkr-"))  # short: unix socket paths <= 108 bytes
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n")
    if request.param == "agentd":
        proc = agentd.start(request.getfixturevalue("agentd_binary"), base / "agent.sock", root)
        try:
            yield None, agentd.Calls(root), base
        finally:
            agentd.stop(proc)
            shutil.rmtree(base, ignore_errors=True)
        return
    system = SandboxSystem(str(root))
    cls = {"0.4.0": RecordingAgent, "0.3.0": OldAgent, "0.5.1": WarmPingAgent}[request.param]
    agent = cls(guest.ListenPort(str(base / "agent.sock")), system)
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    try:
        yield agent, system, base
    finally:
        agent.stop()
        thread.join(5)
        shutil.rmtree(base, ignore_errors=True)


def _spec(keep_identity: bool) -> Any:
    return SimpleNamespace(session_id="ses_x", hostname="tenki-clone", keep_identity=keep_identity,
                           manifest=SimpleNamespace(state="s" * 64))


async def _resume(base: Path, spec: Any, machine: Machine, client: AgentClient, steps: Steps,
                  **kw: Any) -> None:
    """A restore's end, as ``restore.prepare`` then ``restore.finish`` run it."""
    opening = await restore._load_state(_ctx(base), spec, machine, client,  # type: ignore[arg-type]
                                        steps)
    await restore._settle(spec, machine, client, opening, steps, **kw)  # type: ignore[arg-type]


def _ctx(base: Path) -> Any:
    files = SimpleNamespace(run_dir=base)
    state = base / "state.stored"
    state.write_bytes(b"QEVM device state")
    return SimpleNamespace(layout=SimpleNamespace(files=lambda sid: files),
                           store=SimpleNamespace(local_path=lambda d: state))


@pytest.mark.parametrize("keep_identity", [False, True])
async def test_clock_and_identity_are_set_before_it_returns(
        guest_agent: tuple[guest.Agent | None, SandboxSystem | agentd.Calls, Path],
        keep_identity: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    agent, system, base = guest_agent
    events: list[str] = []

    async def load_state(machine: Any, source: Path) -> None:
        # the agent's connection is made while the state loads: it is open (or opening) here
        await asyncio.sleep(0.05)
        events.append("load-state")

    monkeypatch.setattr(restore, "load_state", load_state)
    # here the agent answers at once: its clock is never left behind (see the next test)
    monkeypatch.setattr(restore, "CLOCK_BEHIND_MAX_S", 60.0)
    client = AgentClient(base / "agent.sock", default_timeout=10)
    steps = Steps(restore.log, "ses_x", plan="restore")
    before = time.time_ns()
    try:
        await _resume(base, _spec(keep_identity), Machine(events),  # type: ignore[arg-type]
                              client, steps)
    finally:
        await client.close()
    assert events == ["load-state", "resume"]
    assert len(system.clock) == 1 and system.clock[0] >= before
    etc = base / "root" / "etc"
    if keep_identity:  # a resumed session is the same guest
        assert system.hostnames == [] and not (etc / "machine-id").exists()
    else:
        assert system.hostnames == ["tenki-clone"] and len(system.entropy) == 1
        assert len((etc / "machine-id").read_text().strip()) == 32
        assert (etc / "hostname").read_text() == "tenki-clone\n"
    done = set(steps.timings)
    if agent is None:  # agentd: all of it in the first request
        assert done == {"load-state", "resume", "agent"}
    elif isinstance(agent, OldAgent):
        assert done == {"load-state", "resume", "agent", "clock"} | (
            set() if keep_identity else {"identity"})
        # nothing it does not know was sent (an unknown op would fail the restore)
        assert not any('"op":"settle"' in r for r in agent.requests)
    else:
        assert done == {"load-state", "resume", "agent", "settle"}
    if agent is not None:  # the settle was offered in the ping, which it ignored
        first = json.loads(agent.requests[0])
        assert first["op"] == "ping" and first["settle"]["epoch_ns"] >= before
        assert ("hostname" in first["settle"]) is not keep_identity


@pytest.mark.parametrize("guest_agent", ["agentd"], indirect=True)
@pytest.mark.parametrize("behind_max_s", [60.0, -1.0])
async def test_a_clock_read_late_in_the_first_ping_is_set_again(
        guest_agent: tuple[guest.Agent | None, SandboxSystem | agentd.Calls, Path],
        behind_max_s: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """agentd's answer says its clock as it left: behind the host's by more than
    ``CLOCK_BEHIND_MAX_S`` (a guest that just woke read the request late; -1 here: always),
    the clock is set again at once, in a step of its own; else not."""
    _, calls, base = guest_agent
    assert isinstance(calls, agentd.Calls)

    async def load_state(machine: Any, source: Path) -> None:
        return None

    monkeypatch.setattr(restore, "load_state", load_state)
    monkeypatch.setattr(restore, "CLOCK_BEHIND_MAX_S", behind_max_s)
    client = AgentClient(base / "agent.sock", default_timeout=10)
    steps = Steps(restore.log, "ses_x", plan="restore")
    try:
        await _resume(base, _spec(False), Machine([]),  # type: ignore[arg-type]
                              client, steps)
    finally:
        await client.close()
    again = behind_max_s < 0
    assert set(steps.timings) == {"load-state", "resume", "agent"} | ({"clock"} if again else set())
    assert len(calls.clock) == (2 if again else 1) and calls.clock == sorted(calls.clock)
    assert calls.hostnames == ["tenki-clone"]  # the identity once


async def test_a_guest_that_never_answers_fails_and_leaves_nothing_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # no agent on the socket: the agent step fails (the restore then fails the session), and
    # the connection attempt started during load-state is not left running
    async def load_state(machine: Any, source: Path) -> None:
        return None

    monkeypatch.setattr(restore, "load_state", load_state)
    monkeypatch.setattr(restore, "RESTORE_AGENT_TIMEOUT_S", 0.3)
    client = AgentClient(tmp_path / "nobody.sock", default_timeout=1)
    tasks_before = asyncio.all_tasks()
    steps = Steps(restore.log, "ses_x", plan="restore")
    (tmp_path / "console.log").write_text("guest kernel panic")
    with pytest.raises(restore.TenkiError,
                       match=r"did not answer.*console: guest kernel panic; QEMU running; "
                             r"vCPU 0 in the guest kernel"):
        await _resume(tmp_path, _spec(False),
                              Machine([], tmp_path / "console.log"),  # type: ignore[arg-type]
                              client, steps)
    assert steps.current == "agent"
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - tasks_before == set()


@pytest.mark.parametrize("guest_agent", ["0.4.0", "0.5.1"], indirect=True)
@pytest.mark.parametrize("warm", [True, False])
async def test_the_restore_says_whether_the_guest_warms_its_exec_path(
        guest_agent: tuple[guest.Agent | None, SandboxSystem | agentd.Calls, Path], warm: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pings ask for the warm-up; an agent from 0.5.1 starts it then, so its settle says
    not to (an older one ignores the ping's field and warms during the settle)."""
    agent, _, base = guest_agent
    assert isinstance(agent, RecordingAgent)

    async def load_state(machine: Any, source: Path) -> None:
        return None

    monkeypatch.setattr(restore, "load_state", load_state)
    client = AgentClient(base / "agent.sock", default_timeout=10)
    try:
        await _resume(base, _spec(False), Machine([]),  # type: ignore[arg-type]
                              client, Steps(restore.log, "ses_x", plan="restore"), warm=warm)
    finally:
        await client.close()
    requests = list(map(json.loads, agent.requests))
    pings = [r for r in requests if r.get("op") == "ping"]
    settles = [r for r in requests if r.get("op") == "settle"]
    assert pings and all(r.get("warm", False) is warm for r in pings)
    assert len(settles) == 1
    assert settles[0]["warm"] is (warm and not isinstance(agent, WarmPingAgent))


def test_a_guest_warms_its_exec_path_only_where_it_has_the_cores_for_it() -> None:
    assert restore.warm_exec_path("tcg", "multi")
    assert restore.warm_exec_path("tcg", None)  # no choice made: QEMU's default, multi
    assert not restore.warm_exec_path("tcg", "single")  # the host's cores are taken
    assert not restore.warm_exec_path("kvm", None)  # nothing to translate

"""``wait_switchover``: the downtime is raised for a guest that does not converge, counted from
the end of the first pass over RAM (which reads every page: slow for a large guest whose RAM
file was never read, however little it writes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tenkibox.engine import migration
from tenkibox.engine.machine import RunState


class ScriptedMachine:
    """QMP answers by elapsed time: ``script`` is a list of (until_s, query-migrate answer)."""

    def __init__(self, script: list[tuple[float, dict[str, Any]]]) -> None:
        self.script, self.started = script, time.monotonic()
        self.raised: list[float] = []  # when the downtime was raised, seconds from the start
        self.state = RunState.RUNNING

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        now = time.monotonic() - self.started
        if cmd == "migrate-set-parameters":
            self.raised.append(now)
            return {}
        assert cmd == "query-migrate"
        for until, answer in self.script:
            if now < until:
                return answer
        return {"status": "pre-switchover"}


def _active(syncs: int) -> dict[str, Any]:
    return {"status": "active", "ram": {"dirty-sync-count": syncs}}


@pytest.fixture(autouse=True)
def short_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "CONVERGE_S", 0.2)


def test_a_long_first_pass_is_not_forced() -> None:
    m = ScriptedMachine([(0.5, _active(1)), (0.6, _active(2))])
    asyncio.run(migration.wait_switchover(m, timeout=10))  # type: ignore[arg-type]
    assert m.raised == [] and m.state == RunState.PAUSED


def test_a_guest_that_does_not_converge_after_the_first_pass_is_stopped_anyway() -> None:
    m = ScriptedMachine([(0.3, _active(1)), (1.0, _active(5))])
    asyncio.run(migration.wait_switchover(m, timeout=10))  # type: ignore[arg-type]
    assert len(m.raised) == 1 and m.raised[0] >= 0.3 + 0.2

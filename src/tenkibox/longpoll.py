"""Long polls: answer as soon as a record leaves a state, or as it is when the time is up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: A single HTTP long poll never holds a request longer than this; clients poll again.
MAX_POLL_S = 60.0
#: A wait reads the record again at least this often, woken or not (a safety net: changes
#: wake their record's waits, other control-plane processes' through PostgreSQL's NOTIFY)
REREAD_S = 1.0


class Changes:
    """Which waits each record's change wakes.

    A wait watches one record (a session, a snapshot, a build), by a key naming it. A change
    wakes the waits on its record only: when every change woke every wait, each of N clones
    restored at once re-read its record at each step of the N-1 others (N² reads, a quarter of
    the server's work in a burst of ten). ``announce(None)`` wakes them all: a change whose
    records are not known (a bulk delete, a notification from an older process, a reconnect).

    Runs on one event loop: a wait registers in the same step as the read before it, so a
    change announced after that read always wakes it."""

    def __init__(self) -> None:
        self._waits: dict[str, set[asyncio.Future[None]]] = {}

    def announce(self, key: str | None = None) -> None:
        """Wake the waits on ``key``'s record (all waits when None)."""
        if key is None:
            groups = list(self._waits.values())
        else:
            group = self._waits.get(key)
            groups = [group] if group else []
        for group in groups:
            for fut in group:
                if not fut.done():
                    fut.set_result(None)

    async def wait(self, key: str, timeout_s: float) -> bool:
        """Until ``key``'s record changes (True) or ``timeout_s`` passes (False)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        group = self._waits.setdefault(key, set())
        group.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, max(0.0, timeout_s))
            return fut.done() and not fut.cancelled()
        finally:
            group.discard(fut)
            if not group and self._waits.get(key) is group:
                del self._waits[key]

    def watched(self) -> int:
        """How many waits are registered (what a test checks is left after them)."""
        return sum(len(g) for g in self._waits.values())


async def until(changes: Changes, key: str, read: Callable[[], T], done: Callable[[T], bool],
                timeout_s: float, *, cap_s: float | None = MAX_POLL_S) -> T:
    """Re-read ``key``'s record each time it changes (and at least every ``REREAD_S``).
    ``cap_s`` bounds an HTTP long poll; the server's own waits pass None."""
    loop = asyncio.get_running_loop()
    limit = timeout_s if cap_s is None else min(timeout_s, cap_s)
    deadline = loop.time() + max(0.0, limit)
    while True:
        value = read()
        left = deadline - loop.time()
        if done(value) or left <= 0:
            return value
        await changes.wait(key, min(left, REREAD_S))

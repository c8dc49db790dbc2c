"""Long polls: answer as soon as a record leaves a state, or as it is when the time is up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: A single HTTP long poll never holds a request longer than this; clients poll again.
MAX_POLL_S = 60.0
#: A wait reads the record again at least this often, notified or not (a safety net: changes
#: notify ``changed``, other control-plane processes' through PostgreSQL's NOTIFY)
REREAD_S = 1.0


async def until(changed: asyncio.Condition, read: Callable[[], T], done: Callable[[T], bool],
                timeout_s: float, *, cap_s: float | None = MAX_POLL_S) -> T:
    """Re-read on every notification of ``changed`` (and at least every ``REREAD_S``). ``cap_s``
    bounds an HTTP long poll; the server's own waits pass None."""
    loop = asyncio.get_running_loop()
    limit = timeout_s if cap_s is None else min(timeout_s, cap_s)
    deadline = loop.time() + max(0.0, limit)
    while True:
        value = read()
        left = deadline - loop.time()
        if done(value) or left <= 0:
            return value
        async with changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, REREAD_S))

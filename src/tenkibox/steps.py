"""Ordered, named, timed steps (boot, capture, restore), logged as they finish.

Firecracker's SDK runs its start-up as a list of named handlers; this is the same idea, small:
every step is logged with its duration, and the timings are kept for the caller (benchmarks,
the CLI's ``--json`` output, failure reasons that say which step broke).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Steps:
    def __init__(self, logger: logging.Logger, subject: str) -> None:
        self._log = logger
        self.subject = subject
        self.timings: dict[str, float] = {}
        self.current: str | None = None
        self._t0 = time.monotonic()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.current = name
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self._log.warning("%s: step %s failed after %.3fs", self.subject, name,
                              time.monotonic() - start)
            raise
        took = time.monotonic() - start
        self.timings[name] = self.timings.get(name, 0.0) + took
        self._log.info("%s: %s %.3fs", self.subject, name, took)
        self.current = None

    @property
    def total(self) -> float:
        return time.monotonic() - self._t0

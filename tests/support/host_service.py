"""A host served over HTTP in the test's own event loop: ``host.service`` on a real socket
(uvicorn on 127.0.0.1, a free port), for a ``RemoteHost`` to call.

httpx's ASGI transport collects a whole response before it answers, so streams are only
streamed over a socket; uvicorn runs as a task of the running loop, next to the host it serves
(a ``FakeHost`` is touched on one loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn

from tenkibox.host.api import HostAPI
from tenkibox.host.journal import MountJournal
from tenkibox.host.remote import RemoteHost
from tenkibox.host.service import create_host_app
from tenkibox.serving import KEEP_ALIVE_S

SECRET = "test-host-secret"


@dataclass
class Served:
    url: str
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


async def serve(host: HostAPI, secret: str = SECRET, port: int = 0,
                journal: MountJournal | None = None) -> Served:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    app = create_host_app(host, secret, journal=journal)
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1, timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    # uvicorn takes SIGINT/SIGTERM in serve() (and raises them again after): not in a test
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]), name="host service")
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    return Served(f"http://127.0.0.1:{sock.getsockname()[1]}", server, task)


@contextlib.asynccontextmanager
async def remote_of(host: HostAPI, journal: MountJournal | None = None
                    ) -> AsyncIterator[RemoteHost]:
    """``host`` behind the service (noting mounts in ``journal``), and a refreshed
    ``RemoteHost`` calling it."""
    secret = SECRET
    served = await serve(host, secret, journal=journal)
    remote = RemoteHost(served.url, secret, host_id="h-test")
    try:
        await remote.refresh()
        yield remote
    finally:
        await remote.aclose()
        await served.stop()


#: ``TENKI_TEST_HOST=remote``: the control planes of ``InProcessServer`` call their fake host
#: through the wire (``RemoteHost`` -> ``host.service`` -> ``FakeHost``), as a control plane
#: calls a host worker
ENV_TEST_HOST = "TENKI_TEST_HOST"
#: how often the cache of a test's ``RemoteHost`` is refreshed (a fleet does it each heartbeat)
TEST_REFRESH_S = 0.1


def remote_requested() -> bool:
    return os.environ.get(ENV_TEST_HOST, "").lower() == "remote"


class Wired:
    """A host behind the wire for a control plane: ``remote`` is what the plane calls."""

    def __init__(self, served: Served, remote: RemoteHost) -> None:
        self.served = served
        self.remote = remote
        self._refresher = asyncio.create_task(self._refresh(), name="remote host refresh")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(TEST_REFRESH_S)
            with contextlib.suppress(Exception):
                await self.remote.refresh()

    async def close(self) -> None:
        self._refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._refresher
        await self.remote.aclose()
        await self.served.stop()


async def wire(host: HostAPI) -> Wired:
    served = await serve(host)
    remote = RemoteHost(served.url, SECRET, host_id="fake")
    await remote.refresh()
    return Wired(served, remote)

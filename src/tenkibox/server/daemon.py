"""``tenki serve``: run the API server for one data directory.

One server per data directory (an exclusive lock); it listens on 127.0.0.1 by default and
announces itself in ``$TENKI_HOME/server.json`` (url, pid, version) once it accepts
connections, which is how the CLI and the SDK find it. VMs keep running when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import uvicorn

from .._version import __version__
from ..api.app import create_app
from ..config import layout as make_layout
from ..errors import ConflictError
from .runtime import ServerRuntime

log = logging.getLogger("tenkibox.server")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def serve(host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
          home: Path | None = None, database_url: str | None = None) -> None:
    layout = make_layout(home).ensure()
    logging.basicConfig(level=os.environ.get("TENKI_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = open(layout.home / "server.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise ConflictError(f"a tenki server already runs for {layout.home}") from exc
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every keep-alive request waits ~40 ms for the delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    asyncio.run(_run(layout, sock, host, bound, api_key, database_url))


async def _run(layout, sock: socket.socket, host: str, port: int,  # type: ignore[no-untyped-def]
               api_key: str | None, database_url: str | None) -> None:
    rt = ServerRuntime(layout, api_key=api_key, database_url=database_url)
    await rt.start()
    app = create_app(rt.plane, layout=rt.layout, accel=rt.accel, api_key=api_key,
                     request_stop=rt.request_stop)
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)

    async def stop_when_asked() -> None:
        await rt.stop_requested.wait()
        await asyncio.sleep(0.05)  # the shutdown request gets its answer first
        server.should_exit = True
    info = {"url": f"http://{host}:{port}", "pid": os.getpid(), "version": __version__,
            "started_at": datetime.now(UTC).isoformat()}

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        _write_atomic(layout.server_file, json.dumps(info))
        log.info("tenki server %s listening on %s (home %s)", __version__, info["url"],
                 layout.home)

    announcer = asyncio.create_task(announce())
    stopper = asyncio.create_task(stop_when_asked())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
        stopper.cancel()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(layout.server_file.read_text()).get("pid") == os.getpid():
                layout.server_file.unlink()
        await rt.stop()

"""``tenki serve``: run the API server for one data directory.

One server per data directory (an exclusive lock); it listens on 127.0.0.1 by default and
announces itself in ``$TENKI_HOME/server.json`` (url, pid, version) once it accepts
connections, which is how the CLI and the SDK find it. VMs keep running when it stops.

Every call needs an API key, on every address (there is no anonymous mode); the local admin
key is in ``$TENKI_HOME/admin.key``. ``tls_cert``/``tls_key`` serve HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path

import uvicorn

from .._version import __version__
from ..api.app import create_app
from ..artifacts.s3 import S3Location
from ..config import layout as make_layout
from ..errors import ValidationError
from ..preview import PreviewSettings, tls_context
from ..serving import KEEP_ALIVE_S, claim_home, tcp_listener
from ..urls import is_loopback, local_url
from .runtime import ServerRuntime

log = logging.getLogger("tenkibox.server")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def serve(host: str = "127.0.0.1", port: int = 0, home: Path | None = None,
          database_url: str | None = None, tls_cert: Path | None = None,
          tls_key: Path | None = None, grpc_port: int | None = 0,
          grpc_advertise: str | None = None, preview_host: str | None = None,
          preview_bind: str | None = None, artifacts: str | None = None,
          s3_endpoint: str | None = None, artifact_cache_bytes: int | None = None,
          local_host: bool = True) -> None:
    """``grpc_port``: where Tenki's gRPC wire listens (0: any free port; None: not at all);
    ``grpc_advertise``: the data plane URL told to clients (default: the local address).
    ``preview_bind``: the address the listeners of exposed ports bind (default: ``host``);
    ``preview_host``: the host their URLs name (default: the local address of that).
    ``artifacts``: ``s3://BUCKET[/PREFIX]`` to keep artifacts in a bucket on ``s3_endpoint``
    (credentials: botocore's chain, e.g. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), the
    data directory's ``artifacts/`` being a local cache of at most ``artifact_cache_bytes``;
    None: the data directory holds them (see docs/multi-host.md). ``local_host`` False: a pure
    control plane, without an embedded host."""
    location = S3Location.from_options(artifacts, s3_endpoint)
    if (tls_cert is None) != (tls_key is None):
        raise ValidationError("give both --tls-cert and --tls-key, or neither",
                              field="tls_cert" if tls_cert is None else "tls_key")
    for path, field in ((tls_cert, "tls_cert"), (tls_key, "tls_key")):
        if path is not None and not os.access(path, os.R_OK):
            raise ValidationError(f"cannot read {path}", field=field)
    layout = make_layout(home)
    lock = claim_home(layout)  # noqa: F841  (held until the process exits)
    sock = tcp_listener(host, port)
    bound = sock.getsockname()[1]
    tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    preview = PreviewSettings(
        bind=preview_bind or host or "0.0.0.0", public_host=preview_host or None,
        tls=tls_context(str(tls[0]), str(tls[1])) if tls else None)
    asyncio.run(_run(layout, sock, host, bound, database_url, tls, grpc_port, grpc_advertise,
                     preview, location, artifact_cache_bytes, local_host))


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: SIGTERM and SIGINT stop ``tenki serve`` as
    a shutdown request does, through ``ServerRuntime.stop`` (the VMs keep running; the spares,
    which no record names, are stopped). uvicorn's own handlers raise the signal again once it
    stops serving, which ended the process before that."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _run(layout, sock: socket.socket, host: str, port: int,  # type: ignore[no-untyped-def]
               database_url: str | None, tls: tuple[Path, Path] | None,
               grpc_port: int | None, grpc_advertise: str | None,
               preview: PreviewSettings, artifacts: S3Location | None = None,
               artifact_cache_bytes: int | None = None, local_host: bool = True) -> None:
    rt = ServerRuntime(layout, database_url=database_url, preview=preview, artifacts=artifacts,
                       artifact_cache_bytes=artifact_cache_bytes, local_host=local_host)
    await rt.start()
    wire = None
    if grpc_port is not None:
        from ..rpc.credentials import Credentials
        from ..rpc.server import Wire
        rest_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        wire = Wire(rt.plane, Credentials.from_file(layout.home / "dataplane.key"), host,
                    grpc_port, rest=(rest_host, port), tls=tls, advertise=grpc_advertise)
        await wire.start()
    app = create_app(rt.plane, layout=rt.layout, accel=rt.accel, request_stop=rt.request_stop,
                     grpc_endpoint=wire.endpoint if wire else None)
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=3, timeout_keep_alive=KEEP_ALIVE_S,
                            ssl_certfile=str(tls[0]) if tls else None,
                            ssl_keyfile=str(tls[1]) if tls else None)
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, rt.request_stop)

    async def stop_when_asked() -> None:
        await rt.stop_requested.wait()
        await asyncio.sleep(0.05)  # the shutdown request gets its answer first
        server.should_exit = True
    info = {"url": local_url(host, port, "https" if tls else "http"), "pid": os.getpid(),
            "version": __version__, "started_at": datetime.now(UTC).isoformat(),
            "grpc_endpoint": wire.endpoint if wire else None}

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        _write_atomic(layout.server_file, json.dumps(info))
        log.info("tenki server %s listening on %s:%d%s (home %s)", __version__, host, port,
                 " with TLS" if tls else "", layout.home)
        if wire:
            log.info("official Tenki SDKs and tenki clients alike: TENKI_API_ENDPOINT=%s",
                     wire.endpoint)
        names = {w.id: w.name for w in rt.plane.workspaces.query()}
        usable = ", ".join(f"{names.get(w, w)} ({w})" for w in rt.plane.keys.workspaces_with_keys())
        log.info("every call needs an API key; keys of these workspaces can use it: %s; the "
                 "local admin key is in %s", usable or "none", layout.admin_key_file)
        log.info("exposed ports (tenki sandbox port expose) listen on %s; their URLs name %s",
                 preview.bind, rt.plane.preview.url_host)
        if not is_loopback(host):
            log.warning("listening on %s, reachable from other machines%s", host,
                        "" if tls else " without TLS (keys travel in clear text: give "
                        "--tls-cert and --tls-key)")

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
        if wire:
            await wire.stop()
        await rt.stop()

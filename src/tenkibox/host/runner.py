"""``tenki host run``: one machine's host worker, in the foreground.

A ``LocalHost`` over the data directory (its artifacts local or in a bucket, as ``tenki serve``),
its API served by uvicorn (``host.service``, callers need the secret made here at start), and a
``HostWorker`` that registers with the control plane and heartbeats. SIGTERM or SIGINT stops it
cleanly; the VMs keep running (``LocalHost.shutdown``, as across a ``tenki serve`` restart) and
the next worker on the data directory recovers those the control plane still places here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import signal
import socket
import subprocess

import uvicorn

from ..artifacts.s3 import S3Location
from ..config import Layout
from ..errors import ValidationError
from ..serving import KEEP_ALIVE_S, claim_home, tcp_listener
from .journal import MountJournal
from .local import LocalHost
from .service import create_host_app
from .worker import ControlClient, HostWorker, Machine

log = logging.getLogger("tenkibox.host.worker")

DEFAULT_PORT = 7070


def parse_listen(listen: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``ADDR`` or ``:PORT`` (an IPv6 address in brackets: ``[::]:7070``)."""
    host, sep, port = listen.rpartition(":")
    if not sep or (listen.count(":") > 1 and not listen.startswith("[")):
        host, port = listen, str(DEFAULT_PORT)
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise ValidationError(f"not ADDRESS:PORT: {listen!r}", field="listen") from None
    if not 0 <= number <= 65535:
        raise ValidationError(f"port out of range: {listen!r}", field="listen")
    return host, number


def _global_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback and link-local, as ``ip`` lists them
    (its own order: the first interface first)."""
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True,
                             text=True, timeout=5, check=False).stdout
        links = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    found = []
    for link in links:
        for addr in link.get("addr_info") or []:
            ip = ipaddress.ip_address(addr.get("local", "0.0.0.0"))
            if not ip.is_loopback and not ip.is_link_local and not ip.is_unspecified:
                found.append(str(ip))
    return found


def default_advertise(host: str, port: int) -> str:
    """Where the control plane reaches this worker: the listen address if it is one, else the
    first address of this machine that is not loopback."""
    if host not in ("0.0.0.0", "::", ""):
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"
    addresses = _global_addresses()
    if not addresses:
        log.warning("no address but loopback found: advertising 127.0.0.1 (give --advertise)")
    return f"http://{addresses[0] if addresses else '127.0.0.1'}:{port}"


def run(layout: Layout, *, control: str, token: str, listen: str, advertise: str | None,
        artifacts: S3Location | None, artifact_cache_bytes: int | None,
        host_id: str | None) -> None:
    """Run the worker until SIGTERM/SIGINT (raises ``ConflictError`` if another server or
    worker holds the data directory)."""
    # the same lock as ``tenki serve``: one owner of a data directory's VMs at a time
    lock = claim_home(layout)  # noqa: F841  (held until the process exits)
    host, port = parse_listen(listen)
    try:
        sock = tcp_listener(host, port)
    except OSError as exc:
        raise ValidationError(f"cannot listen on {host}:{port}: {exc.strerror}",
                              field="listen") from exc
    port = sock.getsockname()[1]
    address = advertise or default_advertise(host, port)
    asyncio.run(_main(layout, sock, control=control, token=token, address=address,
                      artifacts=artifacts, artifact_cache_bytes=artifact_cache_bytes,
                      host_id=host_id))


async def _main(layout: Layout, sock: socket.socket, *, control: str, token: str, address: str,
                artifacts: S3Location | None, artifact_cache_bytes: int | None,
                host_id: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = LocalHost.open(layout, artifacts=artifacts, artifact_cache_bytes=artifact_cache_bytes)
    accel = host.ctx.accel
    secret = secrets.token_urlsafe(32)
    journal = MountJournal(layout.home / "mounts.json")
    config = uvicorn.Config(create_host_app(host, secret, journal=journal), log_level="warning",
                            lifespan="off", timeout_graceful_shutdown=3,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    # the worker stops on its own signal handlers, and then lets go of the VMs: uvicorn's
    # would raise the signal again once it has stopped, ending the process before that
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="host API")
    client = ControlClient(control, token)
    worker = HostWorker(host, client, address=address, secret=secret,
                        machine=Machine.probe(accel, layout.home),
                        id_file=layout.home / "host-id", host_id=host_id, journal=journal)
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
        log.info("host API on %s (advertised as %s); control plane %s", sock.getsockname(),
                 address, control)
        if await worker.start(stop):
            heartbeats = asyncio.create_task(worker.run(stop), name="heartbeats")
            await stop.wait()
            await heartbeats
        log.info("stopping: the VMs keep running")
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await client.aclose()
        await host.shutdown()

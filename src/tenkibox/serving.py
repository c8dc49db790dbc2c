"""What a long-running tenki process (``tenki serve``, ``tenki host run``) does before it
serves: own its data directory, set up logging, open its listening socket."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from typing import IO

from .config import Layout
from .errors import ConflictError

#: how long the servers keep an idle connection open. Longer than any of our clients keeps one
#: for reuse (httpx: 5 s), so that a server never closes a connection just as a client sends
#: its next request on it: that request (a POST restore, say) would fail with a ReadError,
#: and was the race of equal 5 s defaults on both sides.
KEEP_ALIVE_S = 30


def claim_home(layout: Layout) -> IO[str]:
    """Make ``layout``'s data directory (0700: keys, database, VMs' files), log to stderr
    (``TENKI_LOG_LEVEL``), and take its exclusive lock: one owner of a data directory's VMs at a
    time, a server or a host worker (``ConflictError`` if another holds it). Keep the returned
    file open as long as the process serves: closing it releases the lock."""
    layout.ensure()
    with contextlib.suppress(OSError):
        os.chmod(layout.home, 0o700)
    logging.basicConfig(level=os.environ.get("TENKI_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = open(layout.home / "server.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise ConflictError(f"a tenki server or host worker already runs for {layout.home}") \
            from exc
    return lock


def tcp_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: any free port), for uvicorn to listen on."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it every keep-alive request waits ~40 ms for the delayed ACK
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock

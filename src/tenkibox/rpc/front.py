"""One public address for both wires: the official SDKs' gRPC and our REST API.

Users point the official SDKs at ``TENKI_API_ENDPOINT``, and our CLI and SDK read the same
variable, so the address must answer both. Each connection to the front is sorted by its first
bytes (an HTTP/2 client preface is gRPC; anything else is HTTP/1.1, i.e. REST) or, with TLS,
by the protocol ALPN chose, and then piped to the gRPC server or to the REST server, both of
which listen on loopback. The pipe holds at most one read (``CHUNK``) per direction and waits
for the other side to drain, so a slow reader slows its writer instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CHUNK = 256 * 1024
FIRST_BYTES_TIMEOUT_S = 30.0


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(CHUNK):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError, ssl.SSLError):
        pass


class Front:
    """Accepts on ``sock``; ``grpc`` and ``rest`` are the loopback (host, port) behind it;
    ``rest_tls``: the REST server itself speaks TLS (then so does the hop to it)."""

    def __init__(self, sock: socket.socket, *, grpc: tuple[str, int], rest: tuple[str, int],
                 tls: ssl.SSLContext | None = None, rest_tls: bool = False) -> None:
        self.sock = sock
        self.grpc = grpc
        self.rest = rest
        self.tls = tls
        self._rest_ssl: ssl.SSLContext | None = None
        if rest_tls:  # our own server on loopback: its certificate names the public host
            self._rest_ssl = ssl.create_default_context()
            self._rest_ssl.check_hostname = False
            self._rest_ssl.verify_mode = ssl.CERT_NONE
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=self.sock, ssl=self.tls,
                                                  limit=CHUNK)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): the connection's end; asyncio's stream callback logs a cancelled task
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b""
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            is_grpc = tls.selected_alpn_protocol() == "h2"
        else:
            try:
                while len(head) < len(PREFACE) and PREFACE.startswith(head):
                    chunk = await asyncio.wait_for(reader.read(len(PREFACE) - len(head)),
                                                   FIRST_BYTES_TIMEOUT_S)
                    if not chunk:
                        return
                    head += chunk
            except (TimeoutError, ConnectionError, OSError):
                return
            is_grpc = head == PREFACE
        host, port = self.grpc if is_grpc else self.rest
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, port, limit=CHUNK, ssl=None if is_grpc else self._rest_ssl)
        except OSError as exc:
            log.warning("front: cannot reach the %s server at %s:%d: %s",
                        "gRPC" if is_grpc else "REST", host, port, exc)
            return
        try:
            up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The front's TLS: both protocols offered, so ALPN says which wire a client speaks."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx

"""The preview proxy: one TCP listener per exposed guest port, on the server's preview address.

``PortControl`` (control/ports.py) owns the records and tells the proxy what to serve:
``open(exposure)`` starts a listener (port 0: any free one; after a restart the one the record
names, when it is free) and answers the port it got; ``close(exposure_id)`` stops it and cuts
every connection it carries; ``update`` replaces what the listener knows (a new expiry).

Per connection: the request head is read (at most ``HEAD_MAX_BYTES``, within
``HEAD_TIMEOUT_S``), the caller is authenticated (``http.credentials``: the exposure's token in
the query, its cookie or ``X-Tenki-Token``, or an API key of the session's workspace), the
credential is removed from the request, and only then is the guest's port reached
(``host.port_address``) and bytes relayed both ways: each direction reads at most
``CHUNK_BYTES`` and waits for the other side to take them before it reads more (backpressure),
so a connection holds a bounded amount of memory, and WebSocket upgrades and keep-alive work
unchanged. Later requests on the connection lose their credentials too (``RequestFramer``).
A refusal is a short plain-text answer (401, 404, 408, 431, 502, 503), never a traceback, and
nothing reaches the guest before the caller is authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from ..errors import ConflictError, TenkiError
from . import http

log = logging.getLogger(__name__)

#: time a client has to send its first request head
HEAD_TIMEOUT_S = 10.0
#: time the guest's port has to accept the connection
CONNECT_TIMEOUT_S = 10.0
#: the most each direction of a connection reads at once (and so holds)
CHUNK_BYTES = 64 * 1024
#: connections one exposure serves at once; more are answered 503
MAX_CONNECTIONS = 256


@dataclass(frozen=True)
class Exposure:
    """What a listener needs to know of its exposure (a copy of the record's fields)."""

    id: str
    session_id: str
    workspace_id: str
    port: int  # the guest's
    token: str
    expires_at: datetime | None = None

    def expired(self, at: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (at or datetime.now(UTC))


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The previews' TLS (the server's certificate): HTTP/1.1 only."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class PortHost(Protocol):
    async def port_address(self, session_id: str, port: int) -> tuple[str, int]: ...


class KeyCheck(Protocol):
    async def authenticate(self, authorization: str | None) -> Any:
        """The caller of an ``Authorization`` value (with ``workspace_id``), or a TenkiError."""
        ...


@dataclass(frozen=True)
class PreviewSettings:
    """``bind``: the address listeners bind (``tenki serve --host`` by default);
    ``public_host``: the host written into URLs (default: how this machine reaches ``bind``);
    ``tls``: serve the previews over TLS (``https://`` URLs)."""

    bind: str = "127.0.0.1"
    public_host: str | None = None
    tls: ssl.SSLContext | None = None


@dataclass(eq=False)
class _Conn:
    task: asyncio.Task[Any] | None
    client: asyncio.StreamWriter
    guest: asyncio.StreamWriter | None = None

    def cut(self) -> None:
        for writer in (self.client, self.guest):
            if writer is not None:
                writer.transport.abort()
        if self.task is not None and not self.task.done():
            self.task.cancel()


@dataclass(eq=False)
class _Listener:
    exposure: Exposure
    server: asyncio.Server | None = None
    port: int = 0
    conns: set[_Conn] = field(default_factory=set)


class PreviewProxy:
    def __init__(self, host: PortHost, keys: KeyCheck,
                 settings: PreviewSettings | None = None) -> None:
        self.host = host
        self.keys = keys
        self.settings = settings or PreviewSettings()
        self._listeners: dict[str, _Listener] = {}

    # -- addresses ---------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.settings.tls is not None else "http"

    @property
    def url_host(self) -> str:
        """The host URLs name: ``public_host``, else how this machine reaches ``bind`` (a
        wildcard address on loopback)."""
        host = self.settings.public_host or {"": "127.0.0.1", "0.0.0.0": "127.0.0.1",
                                             "::": "::1"}.get(self.settings.bind,
                                                              self.settings.bind)
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    def address(self, host_port: int) -> str:
        """``host:port`` of a listener, as URLs name it."""
        return f"{self.url_host}:{host_port}"

    def url(self, host_port: int, token: str) -> str:
        return f"{self.scheme}://{self.address(host_port)}/?{http.QUERY_PARAM}={token}"

    # -- listeners ---------------------------------------------------------------------------
    async def open(self, exposure: Exposure, port: int = 0) -> int:
        """Listen for ``exposure``: on ``port`` if it is given and free, else on any free port;
        the port it listens on. ConflictError if no listener can be opened."""
        await self.close(exposure.id)
        listener = _Listener(exposure)
        sock = self._bind(port) if port else None
        if sock is None:
            sock = self._bind(0)
            if sock is None:
                raise ConflictError(f"cannot open a preview listener on {self.settings.bind}")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(listener, reader, writer)

        try:
            listener.server = await asyncio.start_server(
                serve, sock=sock, limit=http.HEAD_MAX_BYTES, ssl=self.settings.tls)
        except BaseException:
            sock.close()
            raise
        listener.port = int(sock.getsockname()[1])
        self._listeners[exposure.id] = listener
        log.info("preview of %s port %d listening on %s", exposure.session_id, exposure.port,
                 self.address(listener.port))
        return listener.port

    def _bind(self, port: int) -> socket.socket | None:
        bind = self.settings.bind or "0.0.0.0"
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.info("preview listener on %s:%d: %s", bind, port, exc.strerror or exc)
            return None
        return sock

    def update(self, exposure: Exposure) -> None:
        """New facts about a listening exposure (its expiry)."""
        listener = self._listeners.get(exposure.id)
        if listener is not None:
            listener.exposure = exposure

    def listening(self, exposure_id: str) -> int | None:
        """The port ``exposure_id`` listens on, or None."""
        listener = self._listeners.get(exposure_id)
        return listener.port if listener is not None else None

    def connections(self, exposure_id: str) -> int:
        listener = self._listeners.get(exposure_id)
        return len(listener.conns) if listener is not None else 0

    async def close(self, exposure_id: str) -> None:
        """Stop listening for ``exposure_id`` and cut every connection it carries."""
        listener = self._listeners.pop(exposure_id, None)
        if listener is None:
            return
        if listener.server is not None:
            listener.server.close()
        conns = list(listener.conns)
        for conn in conns:
            conn.cut()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if listener.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.server.wait_closed(), 5.0)

    async def close_all(self) -> None:
        for exposure_id in list(self._listeners):
            await self.close(exposure_id)

    # -- one connection ----------------------------------------------------------------------
    async def _serve(self, listener: _Listener, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        conn = _Conn(asyncio.current_task(), writer)
        if self._listeners.get(listener.exposure.id) is not listener:
            writer.transport.abort()  # closed while this connection was being accepted
            return
        if len(listener.conns) >= MAX_CONNECTIONS:
            await _refuse(writer, 503, "too many connections to this preview; try again")
            writer.close()
            return
        listener.conns.add(conn)
        try:
            await self._handle(listener, conn, reader, writer)
        except asyncio.CancelledError:
            pass  # cut: unexposed, expired, paused or terminated (or the server stops)
        except (ConnectionError, OSError, http.FramingError) as exc:
            log.debug("preview connection ended: %s", exc)
        except Exception:  # never a traceback to the client; the log has it
            log.exception("preview connection of %s failed", listener.exposure.session_id)
        finally:
            listener.conns.discard(conn)
            for w in (conn.guest, writer):
                if w is not None:
                    w.close()

    async def _handle(self, listener: _Listener, conn: _Conn, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except TimeoutError:
            await _refuse(writer, 408, "no complete request head in time")
            return
        except asyncio.LimitOverrunError:
            await _refuse(writer, 431, f"request head over {http.HEAD_MAX_BYTES} bytes")
            return
        except asyncio.IncompleteReadError:
            return  # the client went away
        exposure = listener.exposure
        if exposure.expired():
            await _refuse(writer, 404, "this preview URL expired")
            return
        try:
            head = http.parse_request_head(raw)
        except http.HeadError as exc:
            await _refuse(writer, exc.status, str(exc))
            return
        creds = http.credentials(head)
        by_query = await self._authenticate(exposure, creds)
        if by_query is None:
            await _refuse(writer, 401, "unauthorized: this preview needs the token of its URL "
                          f"(?{http.QUERY_PARAM}=...) or an API key of the sandbox's workspace "
                          "(Authorization: Bearer tk_...)",
                          headers=(("WWW-Authenticate", 'Bearer realm="tenki preview"'),))
            return
        framer = http.RequestFramer()
        first = framer.start(head)
        try:
            address = await self.host.port_address(exposure.session_id, exposure.port)
        except TenkiError as exc:
            await _refuse(writer, 502, f"the sandbox cannot be reached: {_short(exc.message)}")
            return
        except Exception:
            log.exception("port_address of %s port %d failed", exposure.session_id,
                          exposure.port)
            await _refuse(writer, 502, "the sandbox cannot be reached")
            return
        try:
            g_reader, g_writer = await asyncio.wait_for(
                asyncio.open_connection(address[0], address[1], limit=CHUNK_BYTES),
                CONNECT_TIMEOUT_S)
        except TimeoutError:
            await _refuse(writer, 502, f"port {exposure.port} of the sandbox did not answer")
            return
        except OSError as exc:
            what = ("nothing listens on" if isinstance(exc, ConnectionRefusedError)
                    else "cannot connect to")
            await _refuse(writer, 502, f"{what} port {exposure.port} in the sandbox")
            return
        conn.guest = g_writer
        inject = (http.CookieInjector(http.set_cookie(listener.port, exposure.token))
                  if by_query else None)
        await _relay(reader, writer, g_reader, g_writer, framer, first, inject)

    async def _authenticate(self, exposure: Exposure, creds: http.Credentials) -> bool | None:
        """None: refused. Else whether the exposure's token came in the query (then the answer
        sets the cookie)."""
        want = exposure.token.encode()
        for i, token in enumerate(creds.tokens):
            if hmac.compare_digest(token.encode("utf-8", "replace"), want):
                return creds.from_query and i == 0
        if creds.api_key is not None:
            try:
                caller = await self.keys.authenticate(f"Bearer {creds.api_key}")
            except TenkiError:
                return None
            if getattr(caller, "workspace_id", None) == exposure.workspace_id:
                return False
        return None


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


async def _refuse(writer: asyncio.StreamWriter, status: int, text: str,
                  headers: tuple[tuple[str, str], ...] = ()) -> None:
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        writer.write(http.answer(status, text, headers=headers))
        await asyncio.wait_for(writer.drain(), 5.0)


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 g_reader: asyncio.StreamReader, g_writer: asyncio.StreamWriter,
                 framer: http.RequestFramer, first: bytes,
                 inject: http.CookieInjector | None) -> None:
    """Both directions until the guest's side ends (or either fails). The client's end of
    input is passed on (half-close) and the guest's answer still flows back."""

    async def up() -> None:
        g_writer.write(first)
        await g_writer.drain()
        while data := await reader.read(CHUNK_BYTES):
            out = framer.feed(data)
            if out:
                g_writer.write(out)
                await g_writer.drain()
        if g_writer.can_write_eof():
            g_writer.write_eof()

    async def down() -> None:
        while data := await g_reader.read(CHUNK_BYTES):
            if inject is not None:
                data = inject.feed(data)
            if data:
                writer.write(data)
                await writer.drain()
        if inject is not None and (rest := inject.flush()):
            writer.write(rest)
        await writer.drain()

    up_task = asyncio.ensure_future(up())
    down_task = asyncio.ensure_future(down())
    try:
        pending = {up_task, down_task}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            if down_task in done:
                break  # the guest's side ended: so does the connection
    finally:
        for t in (up_task, down_task):
            t.cancel()
        await asyncio.gather(up_task, down_task, return_exceptions=True)

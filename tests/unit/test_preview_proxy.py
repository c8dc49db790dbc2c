"""The preview proxy on its own (``tenkibox.preview.proxy``): a stub host and key check, a guest
port served on the same event loop, and clients over real sockets. What the component tests
(tests/component/test_ports.py) do not reach: TLS, a listener port that is taken, the
connection cap, the head's time limit, a guest that resets."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tenkibox.errors import AuthenticationError, ConflictError
from tenkibox.preview import proxy as proxy_mod
from tenkibox.preview.proxy import Exposure, PreviewProxy, PreviewSettings, tls_context

TOKEN = "t" * 43


class StubHost:
    def __init__(self, address: tuple[str, int] | None) -> None:
        self.address = address

    async def port_address(self, session_id: str, port: int) -> tuple[str, int]:
        if self.address is None:
            raise ConflictError(f"session {session_id} has no running VM")
        return self.address


class StubKeys:
    async def authenticate(self, authorization: str | None) -> Any:
        raise AuthenticationError("unknown API key")


def exposure() -> Exposure:
    return Exposure("prt_1", "ses_1", "ws_1", 8080, TOKEN)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    await writer.drain()
    writer.close()


async def request(port: int, raw: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def get(token: str = TOKEN) -> bytes:
    return f"GET /?tenki_token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


async def with_guest(handler: Handler,
                     body: Callable[[asyncio.AbstractServer, tuple[str, int]], Awaitable[None]],
                     ) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        await body(server, server.sockets[0].getsockname()[:2])
    finally:
        server.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                    str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_previews_over_tls(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate

    async def body(_: Any, address: tuple[str, int]) -> None:
        proxy = PreviewProxy(StubHost(address), StubKeys(), PreviewSettings(
            bind="127.0.0.1", public_host="box.example.org",
            tls=tls_context(str(cert), str(key))))
        port = await proxy.open(exposure())
        assert proxy.url(port, TOKEN) == f"https://box.example.org:{port}/?tenki_token={TOKEN}"
        trusted = ssl.create_default_context(cafile=str(cert))
        answer = await request(port, get(), trusted)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\nSet-Cookie: tenki_port_token_")
        assert answer.endswith(b"hello")
        # cleartext to a TLS listener gets nothing through
        plain = await request(port, get())
        assert b"hello" not in plain
        await proxy.close_all()

    run(lambda: with_guest(hello, body))


def test_a_taken_port_gives_another_one_and_an_ipv6_url_is_bracketed() -> None:
    async def body() -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proxy = PreviewProxy(StubHost(None), StubKeys())
        got = await proxy.open(exposure(), port)
        assert got not in (0, port) and proxy.listening("prt_1") == got
        await proxy.close("prt_1")
        assert proxy.listening("prt_1") is None
        taken.close()
        assert await proxy.open(exposure(), port) == port  # free again: the same port
        await proxy.close_all()
        assert PreviewProxy(StubHost(None), StubKeys(), PreviewSettings(bind="::")).url(
            5, "x") == "http://[::1]:5/?tenki_token=x"
        assert PreviewProxy(StubHost(None), StubKeys(), PreviewSettings(bind="0.0.0.0")).url(
            5, "x") == "http://127.0.0.1:5/?tenki_token=x"

    run(body)


def test_a_vm_that_is_gone_is_a_502_and_a_guest_reset_ends_the_connection() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    async def body(_: Any, address: tuple[str, int]) -> None:
        host = StubHost(None)
        proxy = PreviewProxy(host, StubKeys())
        port = await proxy.open(exposure())
        answer = await request(port, get())
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway")
        assert b"the sandbox cannot be reached: session ses_1 has no running VM" in answer
        host.address = address
        assert await request(port, get()) == b""  # reset by the guest: closed, no answer
        assert (await request(port, get("wrong"))).startswith(b"HTTP/1.1 401")
        await proxy.close_all()

    run(lambda: with_guest(reset, body))


def test_connections_past_the_cap_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_mod, "MAX_CONNECTIONS", 1)
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        await hello_after(writer)

    async def body(_: Any, address: tuple[str, int]) -> None:
        proxy = PreviewProxy(StubHost(address), StubKeys())
        port = await proxy.open(exposure())
        first = asyncio.ensure_future(request(port, get()))
        while proxy.connections("prt_1") == 0:
            await asyncio.sleep(0.01)
        assert (await request(port, get())).startswith(b"HTTP/1.1 503")
        release.set()
        assert (await first).endswith(b"hello")
        await proxy.close_all()

    run(lambda: with_guest(slow, body))


async def hello_after(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    await writer.drain()
    writer.close()


def test_a_head_that_does_not_come_in_time_is_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_mod, "HEAD_TIMEOUT_S", 0.2)

    async def body(_: Any, address: tuple[str, int]) -> None:
        proxy = PreviewProxy(StubHost(address), StubKeys())
        port = await proxy.open(exposure())
        answer = await request(port, b"GET / HTTP/1.1\r\n")  # and nothing more
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
        await proxy.close_all()

    run(lambda: with_guest(hello, body))

"""Exposed ports and the preview proxy (issue 14, part 3): the real app, control plane and proxy
over the fake host, with a local TCP server of this test standing in for the guest's port
(``FakeHost.guest_ports``). Requests go to the preview URLs over real sockets.

Until sessions can be created with inbound access (the egress-policy work), a test turns it on
by writing the session's ``network`` the way a create will (``allow_inbound`` below), on the
record and on the fake host's VM.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
import tenki_sandbox.errors as sdk_errors
from click.testing import CliRunner, Result
from support.fake_host import FakeHost
from support.helpers import eventually
from support.server import ADMIN_KEY, AUTH, InProcessServer
from tenki import Sandbox

from tenkibox import AsyncClient, Client, PortExposure, errors
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.control.ports import MAX_PER_SESSION
from tenkibox.host.api import NetworkSpec
from tenkibox.rpc import proto
from tenkibox.store.tables import PortExposureRow, SessionRow

GUEST_PORT = 8080

# -- a stand-in for a port of the guest -----------------------------------------------------------


class Guest:
    """HTTP/1.1 with keep-alive, a thread per connection. ``GET /hold`` answers a head and the
    start of a long body, then holds the connection until the other side goes away
    (``held_closed``); a request with ``Upgrade`` gets 101 and then every byte back upper-cased.
    ``GET /big`` answers ``BIG`` bytes as fast as it may (``sent`` counts them); ``POST /sink``
    reads nothing of its body until ``drain`` is set. Anything else: 200 "guest saw PATH".
    Every request is recorded (``requests``)."""

    BIG = 64 << 20

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.held_closed = threading.Event()
        self.sent = 0
        self.drain = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="stand-in guest").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn, conn.makefile("rb") as f:
            try:
                while self._one(conn, f, n):
                    pass
            except OSError:
                pass

    def _one(self, conn: socket.socket, f: Any, n: int) -> bool:
        line = f.readline()
        if not line:
            return False
        headers = []
        while (h := f.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode("latin-1").partition(":")
            headers.append((k.strip(), v.strip()))
        lower = {k.lower(): v for k, v in headers}
        method, target, _ = line.decode("latin-1").split(" ", 2)
        if target == "/sink":
            self.drain.wait(30)
        body = f.read(int(lower.get("content-length", 0)))
        self.requests.append({"method": method, "target": target, "headers": headers,
                              "body": body, "connection": n})
        if "upgrade" in lower:
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            while data := f.read1(4096):
                conn.sendall(data.upper())
            return False
        if target == "/big":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.BIG)
            chunk = b"x" * 65536
            for _ in range(self.BIG // len(chunk)):
                conn.sendall(chunk)
                self.sent += len(chunk)
            return True
        if target.startswith("/hold"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial")
            try:
                f.read1(1)  # returns b"" (or raises) once the proxy cut the connection
            finally:
                self.held_closed.set()
            return False
        answer = f"guest saw {method} {target}".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        return True

    def headers_of(self, i: int) -> dict[str, str]:
        return {k.lower(): v for k, v in self.requests[i]["headers"]}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def allow_inbound(server: InProcessServer, session_id: str) -> None:
    """What a create with inbound access does: the record's network says so, and so does the
    host's VM."""
    spec = NetworkSpec(inbound=True)
    server.run(server.plane.records.update(SessionRow, session_id, network=spec.to_json()))

    def on_host() -> None:
        server.host.vm(session_id).network = spec

    server.call(on_host)


def open_session(server: InProcessServer, client: Client, guest: Guest | None = None,
                 *, inbound: bool = True) -> str:
    s = client.create_and_wait(timeout=5)
    if inbound:
        allow_inbound(server, s.id)
    if guest is not None:
        server.host.guest_ports[(s.id, GUEST_PORT)] = guest.address
    return s.id


# -- requests to a preview URL --------------------------------------------------------------------


def parts(url: str) -> tuple[str, str]:
    """(``http://host:port``, ``tenki_token=...``)."""
    origin, _, query = url.partition("/?")
    return origin, query


def at(url: str, path: str, token: bool = True) -> str:
    origin, query = parts(url)
    return origin + path + (("&" if "?" in path else "?") + query if token else "")


def raw_connect(url: str) -> socket.socket:
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=5)


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def held(url: str) -> socket.socket:
    """A connection through the proxy that the guest holds open mid-answer."""
    sock = raw_connect(url)
    sock.sendall(f"GET {at(url, '/hold')[len(parts(url)[0]):]} HTTP/1.1\r\nHost: x\r\n\r\n"
                 .encode())
    data = b""
    while b"partial" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    return sock


def cut(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the proxy ends the connection within ``timeout`` (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def answered(url: str) -> int | None:
    """The status of a GET of ``url``; None when nothing listens there any more: refused, or
    reset before any answer (a connection that reached the listener's backlog as it closed:
    seen once in a CI run right after a sweep)."""
    try:
        return httpx.get(url, timeout=5).status_code
    except (httpx.ConnectError, httpx.ReadError):
        return None


# -- the URL and its credentials ------------------------------------------------------------------


def test_the_url_with_its_token_reaches_the_guest(inproc: InProcessServer, client: Client,
                                                  guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    exposed = client.expose_port(sid, GUEST_PORT)
    u = urlsplit(exposed.url)
    assert (u.scheme, u.hostname, u.path) == ("http", "127.0.0.1", "/")
    assert u.query.startswith("tenki_token=") and len(u.query) > len("tenki_token=") + 40
    assert (exposed.session_id, exposed.port, exposed.expires_at) == (sid, GUEST_PORT, None)
    [row] = inproc.plane.records.all(PortExposureRow)
    assert (row.host_port, row.port, row.workspace_id) == (u.port, GUEST_PORT,
                                                            inproc.default_workspace)
    assert u.query == f"tenki_token={row.token}"

    r = httpx.get(exposed.url, timeout=5)
    assert (r.status_code, r.text) == (200, "guest saw GET /")
    r = httpx.get(at(exposed.url, "/app/page?x=1"), timeout=5)
    assert r.text == "guest saw GET /app/page?x=1"  # the token is not forwarded
    assert [q["target"] for q in guest.requests] == ["/", "/app/page?x=1"]
    # listed, the same; another session's token does not open this one
    assert client.list_ports(sid) == [exposed]
    assert client.sessions.list_ports(sid) == [exposed]


def test_without_the_token_or_with_a_wrong_one_nothing_reaches_the_guest(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    origin, _ = parts(url)
    for attempt in (origin + "/", origin + "/?tenki_token=wrong", origin + "/?tenki_token=",
                    at(url, "/").replace("tenki_token=", "tenki_token=x")):
        r = httpx.get(attempt, timeout=5)
        assert r.status_code == 401, attempt
        assert r.headers["content-type"].startswith("text/plain")
        assert "token" in r.text and "Traceback" not in r.text
        assert "set-cookie" not in r.headers
    r = httpx.get(origin + "/", headers={"X-Tenki-Token": "nope", "Cookie":
                                         "tenki_port_token=nope"}, timeout=5)
    assert r.status_code == 401
    assert guest.connections == 0 and guest.requests == []


def test_a_workspace_key_lets_requests_in_and_never_reaches_the_guest(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    exposed = client.expose_port(sid, GUEST_PORT)
    origin, query = parts(exposed.url)
    r = httpx.get(origin + "/k", headers={**AUTH, "X-Other": "kept"}, timeout=5)
    assert (r.status_code, r.text) == (200, "guest saw GET /k")
    seen = guest.headers_of(0)
    assert "authorization" not in seen and seen["x-other"] == "kept"
    assert "set-cookie" not in r.headers  # no token came in the query
    # the token as a header: in, and removed
    token = query.removeprefix("tenki_token=")
    r = httpx.get(origin + "/h", headers={"X-Tenki-Token": token}, timeout=5)
    assert r.status_code == 200 and "x-tenki-token" not in guest.headers_of(1)
    # a key of another workspace, a revoked or an unknown key: 401, and nothing reached it
    ws = client.create_workspace("other")
    other = client.create_api_key(ws.id, name="other")
    for key in (other.key, "tk_" + "x" * 43):
        r = httpx.get(origin + "/", headers={"Authorization": f"Bearer {key}"}, timeout=5)
        assert r.status_code == 401
    assert len(guest.requests) == 2
    # that workspace does not see the session's ports either
    with Client(endpoint=inproc.url, api_key=other.key) as stranger:
        with pytest.raises(errors.SessionNotFoundError):
            stranger.list_ports(sid)
        with pytest.raises(errors.SessionNotFoundError):
            stranger.expose_port(sid, 9000)


def test_a_browser_gets_a_cookie_and_its_later_requests_pass(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    exposed = client.expose_port(sid, GUEST_PORT)
    origin, query = parts(exposed.url)
    host_port = urlsplit(exposed.url).port
    token = query.removeprefix("tenki_token=")
    with httpx.Client(timeout=5) as browser:
        browser.cookies.set("theme", "dark")
        r = browser.get(exposed.url)
        assert r.status_code == 200
        assert r.headers["set-cookie"] == (f"tenki_port_token_{host_port}={token}; HttpOnly; "
                                           "SameSite=Lax; Path=/")
        r = browser.get(origin + "/next")  # no token: the cookie carries it
        assert (r.status_code, r.text) == (200, "guest saw GET /next")
        assert "set-cookie" not in r.headers
    assert [q["target"] for q in guest.requests] == ["/", "/next"]
    for i in (0, 1):
        assert guest.headers_of(i).get("cookie") == "theme=dark"
    # the cookie name of the brief's spelling is taken as well
    r = httpx.get(origin + "/plain", headers={"Cookie": f"tenki_port_token={token}; a=b"},
                  timeout=5)
    assert r.status_code == 200 and guest.headers_of(2)["cookie"] == "a=b"


def test_later_requests_on_a_kept_alive_connection_lose_their_credentials(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    _, query = parts(url)
    token = query.removeprefix("tenki_token=")
    sock = raw_connect(url)
    sock.sendall(f"POST /one?{query} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
                 f"GET /two HTTP/1.1\r\nHost: x\r\nX-Tenki-Token: {token}\r\n"
                 f"Authorization: Bearer {ADMIN_KEY}\r\nCookie: tenki_port_token={token}\r\n"
                 "\r\n".encode())
    got = b""
    while got.count(b"guest saw") < 2:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    sock.close()
    assert b"guest saw POST /one" in got and b"guest saw GET /two" in got
    assert [(q["target"], q["body"], q["connection"]) for q in guest.requests] == [
        ("/one", b"body", 1), ("/two", b"", 1)]
    second = guest.headers_of(1)
    assert not {"x-tenki-token", "authorization", "cookie"} & set(second)


def test_a_websocket_style_upgrade_is_relayed_both_ways(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    _, query = parts(url)
    sock = raw_connect(url)
    sock.sendall(f"GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
                 "Connection: Upgrade\r\n\r\n".encode())
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Set-Cookie: tenki_port_token_" in head  # a browser's next requests get in
    for word in (b"ping", b"more bytes"):
        sock.sendall(word)
        got = b""
        while len(got) < len(word):
            got += sock.recv(4096)
        assert got == word.upper()
    sock.close()
    assert guest.requests[0]["target"] == "/ws"


def test_a_client_that_does_not_read_holds_the_guest_back(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    """Backpressure: the proxy holds a bounded amount; the rest waits in the guest."""
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    sock = raw_connect(url)
    sock.sendall(f"GET /big?{parts(url)[1]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert read_head(sock).startswith(b"HTTP/1.1 200 OK")
    time.sleep(1.0)  # the client reads nothing: only socket buffers and the proxy's fill
    assert guest.sent < Guest.BIG // 2, guest.sent
    received = 0
    while received < Guest.BIG - 65536:  # (the head's read took the body's first bytes)
        chunk = sock.recv(1 << 20)
        assert chunk
        received += len(chunk)
    assert guest.sent == Guest.BIG
    sock.close()


def test_a_guest_that_does_not_read_holds_the_client_back(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    sock = raw_connect(url)
    sock.sendall(f"POST /sink?{parts(url)[1]} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {Guest.BIG}\r\n\r\n".encode())
    sent = 0
    sock.settimeout(1.0)
    chunk = b"y" * 65536
    try:
        while sent < Guest.BIG:
            sent += sock.send(chunk)
    except TimeoutError:
        pass  # the proxy stopped taking bytes: the guest has not read them
    assert sent < Guest.BIG // 2, sent
    guest.drain.set()
    sock.settimeout(10)
    while sent < Guest.BIG:
        sent += sock.send(chunk[:min(len(chunk), Guest.BIG - sent)])
    assert read_head(sock).startswith(b"HTTP/1.1 200 OK")
    assert guest.requests[0]["body"] == b"y" * Guest.BIG
    sock.close()


def test_a_guest_port_that_refuses_is_a_502(inproc: InProcessServer, client: Client) -> None:
    sid = open_session(inproc, client)  # no stand-in: nothing listens there
    url = client.expose_port(sid, 9999).url
    r = httpx.get(url, timeout=5)
    assert r.status_code == 502 and "nothing listens on port 9999" in r.text
    assert "set-cookie" not in r.headers


def test_a_malformed_or_oversized_request_gets_a_short_answer(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    for request, status in ((b"GARBAGE\r\n\r\n", b"400"),
                            (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431")):
        sock = raw_connect(url)
        sock.sendall(request)
        assert read_head(sock).startswith(b"HTTP/1.1 " + status)
        sock.close()
    assert guest.connections == 0


# -- the ends of an exposure -----------------------------------------------------------------------


def test_unexpose_stops_the_url_and_cuts_live_connections(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    sock = held(url)
    client.unexpose_port(sid, GUEST_PORT)
    assert cut(sock)
    assert guest.held_closed.wait(5)
    assert answered(url) is None
    assert client.list_ports(sid) == []
    assert inproc.plane.records.all(PortExposureRow) == []
    with pytest.raises(errors.NotFoundError, match=f"port {GUEST_PORT} of session {sid} is "
                       "not exposed"):
        client.unexpose_port(sid, GUEST_PORT)
    # exposed again: a new URL (a new token), which works
    again = client.expose_port(sid, GUEST_PORT)
    assert again.url != url and answered(again.url) == 200


def test_expiry_stops_the_url_and_cuts_live_connections(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    exposed = client.expose_port(sid, GUEST_PORT, ttl=1.5)
    assert exposed.expires_at is not None
    sock = held(exposed.url)
    assert cut(sock, timeout=6)  # the sweeper (every second) closes it
    assert answered(exposed.url) is None
    assert client.list_ports(sid) == []


def test_an_expired_exposure_is_refused_before_the_sweep(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT, ttl="1h").url

    async def expire_now() -> None:  # as if the hour had passed, before any sweep
        import dataclasses
        from datetime import UTC, datetime
        [row] = inproc.plane.records.all(PortExposureRow)
        past = datetime.now(UTC)
        inproc.plane.preview.update(dataclasses.replace(
            inproc.plane.preview._listeners[row.id].exposure, expires_at=past))

    inproc.run(expire_now())
    r = httpx.get(url, timeout=5)
    assert r.status_code == 404 and "expired" in r.text
    assert guest.connections == 0


def test_exposing_again_answers_the_same_url_and_moves_the_expiry(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    first = client.expose_port(sid, GUEST_PORT)
    same = client.expose_port(sid, GUEST_PORT)
    assert same == first
    later = client.expose_port(sid, GUEST_PORT, ttl="2h")
    assert later.url == first.url and later.expires_at is not None
    assert 7100 < (later.expires_at - later.created_at).total_seconds() < 7300
    assert client.list_ports(sid) == [later]
    assert answered(first.url) == 200


@pytest.fixture
def no_sweep(inproc: InProcessServer) -> None:
    """The sweeper leaves exposures alone: what closes them is the session's own code."""

    async def nothing() -> None:
        return None

    inproc.plane.ports.sweep = nothing  # type: ignore[method-assign]


def closed_at_once(inproc: InProcessServer, *urls: str) -> None:
    assert inproc.plane.records.all(PortExposureRow) == []
    assert inproc.plane.preview._listeners == {}
    for url in urls:
        assert answered(url) is None


@pytest.mark.usefixtures("no_sweep")
def test_pause_closes_exposures_and_a_resume_does_not_bring_them_back(
        inproc: InProcessServer, client: Client, guest: Guest, fake_host: FakeHost) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    sock = held(url)
    gate = fake_host.block("capture")
    assert client.pause(sid, wait=False).state.value == "PAUSING"
    closed_at_once(inproc, url)  # as soon as it is PAUSING, before the capture
    assert cut(sock)
    with pytest.raises(errors.ConflictError, match="being paused"):
        client.expose_port(sid, GUEST_PORT)
    gate.release()
    assert client.wait_session_ready(sid).state.value == "PAUSED"
    with pytest.raises(errors.ConflictError, match="paused"):
        client.expose_port(sid, GUEST_PORT)
    client.resume(sid)
    assert client.list_ports(sid) == [] and answered(url) is None


@pytest.mark.usefixtures("no_sweep")
def test_terminate_closes_exposures(inproc: InProcessServer, client: Client,
                                    guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    other = client.expose_port(sid, 9001).url
    sock = held(url)
    client.terminate(sid)
    closed_at_once(inproc, url, other)
    assert cut(sock)
    assert guest.held_closed.wait(5)
    with pytest.raises(errors.ConflictError, match="TERMINATED"):
        client.expose_port(sid, GUEST_PORT)


def test_expiry_of_the_session_closes_its_exposures(inproc: InProcessServer, client: Client,
                                                    guest: Guest) -> None:
    s = client.create_and_wait(max_duration=1.5, timeout=5)
    allow_inbound(inproc, s.id)
    inproc.host.guest_ports[(s.id, GUEST_PORT)] = guest.address
    url = client.expose_port(s.id, GUEST_PORT).url
    sock = held(url)
    assert cut(sock, timeout=6)
    assert client.get(s.id).state.value == "TERMINATED"
    closed_at_once(inproc, url)


@pytest.mark.usefixtures("no_sweep")
def test_a_vm_that_dies_closes_its_exposures(inproc: InProcessServer, client: Client,
                                             guest: Guest, fake_host: FakeHost) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    sock = held(url)
    fake_host.kill_vm(sid, "QEMU died")
    assert cut(sock)
    eventually(lambda: inproc.plane.records.all(PortExposureRow) == [], what="closed")
    assert client.get(sid).state.value == "FAILED"
    closed_at_once(inproc, url)


def test_the_sweeper_closes_exposures_of_a_session_that_stopped_running(
        inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    # the record ends without the session's code (as a path that forgot to close them would)
    inproc.run(inproc.plane.records.transition(SessionRow, sid, "FAILED",
                                               state_reason="test"))
    eventually(lambda: inproc.plane.records.all(PortExposureRow) == [], timeout=5,
               what="the sweep")
    assert answered(url) is None


def test_a_clone_does_not_inherit_exposures(inproc: InProcessServer, client: Client,
                                            guest: Guest) -> None:
    sid = open_session(inproc, client, guest)
    url = client.expose_port(sid, GUEST_PORT).url
    snap = client.get(sid).snapshot("with a port")
    clone = client.restore_snapshot(snap.id, timeout=5)
    assert clone.id != sid and clone.state.value == "READY"
    assert clone.list_ports() == []
    assert [p.url for p in client.list_ports(sid)] == [url] and answered(url) == 200
    assert {r.session_id for r in inproc.plane.records.all(PortExposureRow)} == {sid}


def test_a_server_restart_keeps_a_live_exposure_working(make_inproc: Callable[..., InProcessServer],
                                                        guest: Guest) -> None:
    host = FakeHost()
    first = make_inproc(host=host)
    with Client(endpoint=first.url) as c:
        sid = open_session(first, c, guest)
        url = c.expose_port(sid, GUEST_PORT).url
        gone = c.expose_port(sid, 9002, ttl=0.5).url
    assert answered(url) == 200
    home = first.home
    first.stop()
    assert answered(url) is None  # the listeners stopped with the server
    time.sleep(0.6)  # the second exposure expires meanwhile
    second = make_inproc(home=home, host=host)
    assert answered(url) == 200  # the same URL: its port was free
    assert answered(gone) is None
    with Client(endpoint=second.url) as c:
        assert [p.url for p in c.list_ports(sid)] == [url]


# -- refusals --------------------------------------------------------------------------------------


def test_inbound_disabled_is_refused_everywhere(inproc: InProcessServer, client: Client,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sid = open_session(inproc, client, inbound=False)
    r = httpx.post(f"{inproc.url}/v1/sessions/{sid}/ports", json={"port": 8080}, headers=AUTH)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "Conflict"
    assert "inbound access is disabled" in r.json()["error"]["message"]
    with pytest.raises(errors.ConflictError, match="inbound access is disabled"):
        client.expose_port(sid, 8080)
    result = cli_run(inproc, tmp_path, monkeypatch, "sandbox", "port", "expose", "--session",
                     sid, "--port", "8080")
    assert result.exit_code == 1 and "inbound access is disabled" in result.output
    assert inproc.plane.records.all(PortExposureRow) == []


def test_at_most_16_ports_per_session(inproc: InProcessServer, client: Client) -> None:
    sid = open_session(inproc, client)
    for port in range(3000, 3000 + MAX_PER_SESSION):
        client.expose_port(sid, port)
    with pytest.raises(errors.QuotaExceededError, match="maximum exposed ports") as caught:
        client.expose_port(sid, 4000)
    assert caught.value.details == {"quota": "max_exposed_ports", "limit": 16, "in_use": 16}
    r = httpx.post(f"{inproc.url}/v1/sessions/{sid}/ports", json={"port": 4000}, headers=AUTH)
    assert r.status_code == 429
    assert client.expose_port(sid, 3000).port == 3000  # an exposed one is answered
    assert len(client.list_ports(sid)) == MAX_PER_SESSION
    assert len(inproc.plane.preview._listeners) == MAX_PER_SESSION  # no listener leaked
    client.unexpose_port(sid, 3001)
    assert client.expose_port(sid, 4000).port == 4000


@pytest.mark.parametrize("port", [0, -1, 65536, "80"])
def test_a_port_out_of_range_is_refused_naming_port(inproc: InProcessServer, client: Client,
                                                    port: Any) -> None:
    sid = open_session(inproc, client)
    r = httpx.post(f"{inproc.url}/v1/sessions/{sid}/ports", json={"port": port}, headers=AUTH)
    if port == "80":  # JSON "80" is coerced by the model as other int fields are
        assert r.status_code == 201
        return
    assert r.status_code == 422 and r.json()["error"]["field"] == "port"
    r = httpx.delete(f"{inproc.url}/v1/sessions/{sid}/ports/{port}", headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["field"] == "port"
    with pytest.raises(errors.ValidationError) as caught:
        client.expose_port(sid, port)
    assert caught.value.field == "port"


def test_a_session_that_is_not_running_cannot_expose(inproc: InProcessServer,
                                                     client: Client) -> None:
    sid = open_session(inproc, client)
    client.pause(sid)
    r = httpx.post(f"{inproc.url}/v1/sessions/{sid}/ports", json={"port": 80}, headers=AUTH)
    assert r.status_code == 409 and "PAUSED" in r.json()["error"]["message"]
    r = httpx.post(f"{inproc.url}/v1/sessions/ses_nope0000000000/ports", json={"port": 80},
                   headers=AUTH)
    assert r.status_code == 404


def test_expose_and_unexpose_are_audited(inproc: InProcessServer, client: Client) -> None:
    sid = open_session(inproc, client)
    client.expose_port(sid, 8080)
    client.unexpose_port(sid, 8080)
    entries = [(e.action, e.object_id, e.outcome) for e in client.list_audit(limit=5)]
    assert ("exposePort", sid, "ok") in entries and ("unexposePort", sid, "ok") in entries


def test_the_async_sdk(inproc: InProcessServer, client: Client, guest: Guest) -> None:
    sid = open_session(inproc, client, guest)

    async def flow() -> tuple[Any, ...]:
        async with AsyncClient(endpoint=inproc.url) as ac:
            s = await ac.get(sid)
            exposed = await s.expose_port(GUEST_PORT, ttl="10m")
            listed = await ac.sessions.list_ports(sid)
            status = (await asyncio.to_thread(httpx.get, exposed.url, timeout=5)).status_code
            await ac.unexpose_port(sid, GUEST_PORT)
            return exposed, listed, status, await s.list_ports()

    exposed, listed, status, after = asyncio.run(flow())
    assert isinstance(exposed, PortExposure) and exposed.expires_at is not None
    assert listed == [exposed] and status == 200 and after == []


# -- the CLI ---------------------------------------------------------------------------------------


def cli_run(server: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            *args: str) -> Result:
    monkeypatch.setenv("TENKI_API_ENDPOINT", server.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("TENKI_API_KEY", server.api_key)
    return CliRunner().invoke(cli, list(args), obj=CliState())


def test_the_cli_exposes_lists_and_unexposes(inproc: InProcessServer, client: Client,
                                             guest: Guest, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sid = open_session(inproc, client, guest)

    def run(*args: str) -> Result:
        return cli_run(inproc, tmp_path, monkeypatch, "sandbox", "port", *args)

    r = run("expose", "--session", sid, "--port", str(GUEST_PORT), "--ttl", "1h")
    assert r.exit_code == 0, r.output
    url = r.output.strip()
    assert answered(url) == 200
    r = run("list", "--session", sid, "--json")
    [item] = json.loads(r.output)
    assert (item["port"], item["url"], item["session_id"]) == (GUEST_PORT, url, sid)
    assert item["expires_at"] is not None
    r = run("list", "--session", sid)
    assert r.exit_code == 0 and url in r.output and "PORT" in r.output
    r = run("expose", "--session", sid, "--port", "70000")
    assert r.exit_code == 2 and "--port" in r.output
    r = run("unexpose", "--session", sid, "--port", str(GUEST_PORT))
    assert r.exit_code == 0 and f"port {GUEST_PORT} of {sid} unexposed" in r.output
    assert answered(url) is None
    r = run("unexpose", "--session", sid, "--port", str(GUEST_PORT))
    assert r.exit_code == 1 and "not exposed" in r.output
    r = run("list", "--session", sid)
    assert "no exposed ports" in r.output


# -- Tenki's wire and the official SDK -------------------------------------------------------------


@pytest.fixture
def wire(make_inproc: Callable[..., InProcessServer], guest: Guest,
         monkeypatch: pytest.MonkeyPatch) -> InProcessServer:
    server = make_inproc(grpc=True)
    monkeypatch.setenv("TENKI_API_ENDPOINT", server.grpc_endpoint)
    monkeypatch.setenv("TENKI_API_KEY", ADMIN_KEY)
    monkeypatch.delenv("TENKI_AUTH_TOKEN", raising=False)
    return server


def test_the_official_sdk_exposes_lists_and_unexposes(wire: InProcessServer,
                                                      guest: Guest) -> None:
    sb = Sandbox.create(name="ports")
    try:
        allow_inbound(wire, sb.id)
        wire.host.guest_ports[(sb.id, GUEST_PORT)] = guest.address
        exposed = sb.expose_port(GUEST_PORT)
        assert exposed.port == GUEST_PORT and exposed.expires_at is None
        assert httpx.get(exposed.url, timeout=5).text == "guest saw GET /"
        timed = sb.expose_port(9100, ttl=600)
        assert timed.expires_at is not None
        listed = sb.list_exposed_ports()
        assert [(p.port, p.url) for p in listed] == [(GUEST_PORT, exposed.url),
                                                     (9100, timed.url)]
        assert listed[1].expires_at == timed.expires_at
        sb.unexpose_port(GUEST_PORT)
        assert answered(exposed.url) is None
        with pytest.raises(sdk_errors.SessionNotFoundError, match="not exposed"):
            sb.unexpose_port(GUEST_PORT)
        with pytest.raises(sdk_errors.SandboxError, match="slug"):
            sb.expose_port(9200, slug="my-app")
        for _ in range(MAX_PER_SESSION - 1):
            sb.expose_port(9300 + _)
        with pytest.raises(sdk_errors.PortLimitExceededError):
            sb.expose_port(9999)
        audited = {(e.action, e.method, e.object_id, e.outcome)
                   for e in wire.plane.audit.query(None, limit=100)}
        assert ("ExposePort", "GRPC", sb.id, "ok") in audited
        assert ("UnexposePort", "GRPC", sb.id, "ok") in audited
        assert ("ExposePort", "GRPC", sb.id, "QuotaExceeded") in audited
    finally:
        sb.terminate()


def test_the_wire_refuses_inbound_disabled_and_bad_ports(wire: InProcessServer) -> None:
    sb = Sandbox.create(name="closed", allow_inbound=False)
    try:
        with pytest.raises(sdk_errors.InboundDisabledError, match="inbound access is disabled"):
            sb.expose_port(8080)
        channel = grpc.insecure_channel(wire.grpc_endpoint.removeprefix("http://"))
        call = channel.unary_unary("/tenki.sandbox.v1.SandboxService/ExposePort",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda raw: raw)
        auth = (("authorization", f"Bearer {ADMIN_KEY}"),)
        with pytest.raises(grpc.RpcError) as caught:
            call(proto.message("ExposePortRequest")(session_id=sb.id, port=8080),
                 metadata=auth, timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        allow_inbound(wire, sb.id)
        for bad in (0, 70000):
            with pytest.raises(grpc.RpcError) as caught:
                call(proto.message("ExposePortRequest")(session_id=sb.id, port=bad),
                     metadata=auth, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith("port:")
        raw = call(proto.message("ExposePortRequest")(session_id=sb.id, port=8080),
                   metadata=auth, timeout=10)
        out = proto.message("ExposePortResponse").FromString(raw)
        assert out.port == 8080 and out.preview_url.startswith("http://")
        assert out.host_address == urlsplit(out.preview_url).netloc
        channel.close()
    finally:
        sb.terminate()

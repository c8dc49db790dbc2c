"""The preview proxy's HTTP (``tenkibox.preview.http``): request heads, credentials and their
removal, the request stream of a keep-alive connection, and the cookie on the first answer."""

from __future__ import annotations

import pytest

from tenkibox.preview import http
from tenkibox.preview.http import (
    CookieInjector,
    FramingError,
    HeadError,
    RequestFramer,
    credentials,
    parse_request_head,
    serialize,
    strip_credentials,
)

TOKEN = "s3cr3t-Token_value"
KEY = "tk_" + "k" * 43


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def forwarded(raw: bytes) -> bytes:
    return serialize(strip_credentials(parse_request_head(raw)))


# -- parsing ----------------------------------------------------------------------------------


def test_a_request_head_is_parsed_in_order() -> None:
    h = parse_request_head(head("GET /a?b=1 HTTP/1.1", "Host: x:1", "Accept: */*", "X-A:  v "))
    assert (h.method, h.target, h.version) == ("GET", "/a?b=1", "HTTP/1.1")
    assert h.headers == (("Host", "x:1"), ("Accept", "*/*"), ("X-A", "v"))
    assert h.values("host") == ["x:1"]


def test_serialize_gives_back_a_head_without_credentials_unchanged() -> None:
    raw = head("POST /p?q=a%20b&r HTTP/1.1", "Host: h", "Content-Length: 3", "Cookie: a=1")
    assert forwarded(raw) == raw


@pytest.mark.parametrize("raw, status", [
    (head("GET / HTTP/2.0", "Host: h"), 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (head("GET /", "Host: h"), 400),
    (head("GET  / HTTP/1.1", "Host: h"), 400),
    (head("GET / HTTP/1.1", " folded: x"), 400),
    (head("GET / HTTP/1.1", "Bad Name: x"), 400),
    (head("GET / HTTP/1.1", "X: a\x00b"), 400),
    (head("GET /\x01 HTTP/1.1"), 400),
    (head("G(T / HTTP/1.1"), 400),
    (head("POST / HTTP/1.1", "Content-Length: 3", "Transfer-Encoding: chunked"), 400),
    (head("POST / HTTP/1.1", "Content-Length: 3", "Content-Length: 4"), 400),
    (head("POST / HTTP/1.1", "Content-Length: -3"), 400),
    (head("POST / HTTP/1.1", "Transfer-Encoding: gzip"), 400),
    (head("POST / HTTP/1.1", "Transfer-Encoding: chunked, chunked"), 400),
    (head("GET / HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade", "Content-Length: 2"),
     400),
])
def test_what_cannot_be_forwarded_is_refused(raw: bytes, status: int) -> None:
    with pytest.raises(HeadError) as caught:
        parse_request_head(raw)
    assert caught.value.status == status


def test_a_head_over_the_limit_is_431() -> None:
    raw = head("GET / HTTP/1.1", "X: " + "a" * http.HEAD_MAX_BYTES)
    with pytest.raises(HeadError) as caught:
        parse_request_head(raw)
    assert caught.value.status == 431


def test_body_framing() -> None:
    assert http.body_framing(parse_request_head(head("GET / HTTP/1.1"))) == http.Framing()
    assert http.body_framing(parse_request_head(
        head("POST / HTTP/1.1", "Content-Length: 12", "content-length: 12"))).length == 12
    assert http.body_framing(parse_request_head(
        head("POST / HTTP/1.1", "Transfer-Encoding: gzip, chunked"))).chunked
    ws = parse_request_head(head("GET /ws HTTP/1.1", "Upgrade: websocket",
                                 "Connection: keep-alive, Upgrade"))
    assert http.body_framing(ws).raw
    # an Upgrade header that Connection does not name is no upgrade
    assert not http.body_framing(parse_request_head(
        head("GET / HTTP/1.1", "Upgrade: websocket"))).raw


# -- credentials ------------------------------------------------------------------------------


def test_the_query_token_is_found_and_removed_keeping_the_other_parameters() -> None:
    raw = head(f"GET /app?x=1&tenki_token={TOKEN}&y=%2F HTTP/1.1", "Host: h")
    creds = credentials(parse_request_head(raw))
    assert creds.tokens == (TOKEN,) and creds.from_query and creds.api_key is None
    assert forwarded(raw) == head("GET /app?x=1&y=%2F HTTP/1.1", "Host: h")
    assert forwarded(head(f"GET /?tenki_token={TOKEN} HTTP/1.1")) == head("GET / HTTP/1.1")
    # percent-encoded name and value
    raw = head(f"GET /p?tenki%5Ftoken={TOKEN}&z HTTP/1.1")
    assert credentials(parse_request_head(raw)).tokens == (TOKEN,)
    assert forwarded(raw) == head("GET /p?z HTTP/1.1")


def test_every_token_cookie_is_removed_and_the_others_kept() -> None:
    raw = head("GET / HTTP/1.1", f"Cookie: a=1; tenki_port_token_40001={TOKEN}; b=2",
               "Cookie: tenki_port_token=other", "Cookie: tenki_port_token_9=x")
    creds = credentials(parse_request_head(raw))
    assert creds.tokens == (TOKEN, "other", "x") and not creds.from_query
    assert forwarded(raw) == head("GET / HTTP/1.1", "Cookie: a=1; b=2")
    # a cookie whose name merely starts alike is not ours
    raw = head("GET / HTTP/1.1", "Cookie: tenki_port_tokenX=1")
    assert credentials(parse_request_head(raw)).tokens == ()
    assert forwarded(raw) == raw


def test_the_token_header_and_a_bearer_key_are_removed() -> None:
    raw = head("GET / HTTP/1.1", f"X-Tenki-Token: {TOKEN}", f"Authorization: Bearer {KEY}",
               "Accept: x")
    creds = credentials(parse_request_head(raw))
    assert creds.tokens == (TOKEN,) and creds.api_key == KEY
    assert forwarded(raw) == head("GET / HTTP/1.1", "Accept: x")
    # the guest's own authorization schemes pass
    raw = head("GET / HTTP/1.1", "Authorization: Basic dXNlcjpwdw==")
    assert credentials(parse_request_head(raw)).api_key is None
    assert forwarded(raw) == raw
    raw = head("GET / HTTP/1.1", "Authorization: Bearer some-jwt")
    assert forwarded(raw) == raw
    # an invalid tenki key is still a tenki key: it never reaches the guest
    assert forwarded(head("GET / HTTP/1.1", "authorization: bearer tk_wrong")) == \
        head("GET / HTTP/1.1")


def test_nothing_presented() -> None:
    assert not credentials(parse_request_head(head("GET /?a=tenki_token HTTP/1.1"))).any


# -- the request stream -----------------------------------------------------------------------


def feed_all(framer: RequestFramer, data: bytes, step: int) -> bytes:
    return b"".join(framer.feed(data[i:i + step]) for i in range(0, len(data), step))


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_later_requests_of_a_connection_lose_their_credentials(step: int) -> None:
    framer = RequestFramer()
    first = parse_request_head(head(f"POST /a?tenki_token={TOKEN} HTTP/1.1", "Content-Length: 5"))
    assert framer.start(first) == head("POST /a HTTP/1.1", "Content-Length: 5")
    stream = (b"hello"
              + head("POST /b HTTP/1.1", "Transfer-Encoding: chunked",
                     f"Cookie: tenki_port_token_1={TOKEN}; k=v")
              + b"4;ext=1\r\nwxyz\r\n0\r\nX-Trailer: t\r\n\r\n"
              + head("GET /c HTTP/1.1", f"Authorization: Bearer {KEY}", f"X-Tenki-Token: {TOKEN}"))
    want = (b"hello"
            + head("POST /b HTTP/1.1", "Transfer-Encoding: chunked", "Cookie: k=v")
            + b"4;ext=1\r\nwxyz\r\n0\r\nX-Trailer: t\r\n\r\n"
            + head("GET /c HTTP/1.1"))
    assert feed_all(framer, stream, step) == want
    assert framer.requests == 3


def test_a_body_that_looks_like_a_head_is_not_rewritten() -> None:
    framer = RequestFramer()
    body = head("GET /x HTTP/1.1", f"X-Tenki-Token: {TOKEN}")
    framer.start(parse_request_head(head("POST / HTTP/1.1", f"Content-Length: {len(body)}")))
    assert framer.feed(body) == body


def test_after_an_upgrade_bytes_pass_unread() -> None:
    framer = RequestFramer()
    framer.start(parse_request_head(head("GET /ws HTTP/1.1", "Upgrade: websocket",
                                         "Connection: Upgrade")))
    assert framer.raw
    frames = b"\x81\x05hello" + head("GET / HTTP/1.1", "X-Tenki-Token: t")
    assert framer.feed(frames) == frames


def test_a_malformed_later_request_ends_the_connection() -> None:
    framer = RequestFramer()
    framer.start(parse_request_head(head("GET / HTTP/1.1")))
    with pytest.raises(FramingError):
        framer.feed(head("GET / HTTP/1.1", "Content-Length: 1", "Content-Length: 2"))


def test_a_malformed_chunk_size_ends_the_connection() -> None:
    framer = RequestFramer()
    framer.start(parse_request_head(head("POST / HTTP/1.1", "Transfer-Encoding: chunked")))
    with pytest.raises(FramingError):
        framer.feed(b"zz\r\n")


def test_a_stream_holds_at_most_one_head() -> None:
    framer = RequestFramer()
    framer.start(parse_request_head(head("GET / HTTP/1.1")))
    with pytest.raises(FramingError):
        for _ in range(http.HEAD_MAX_BYTES // 1000 + 2):
            framer.feed(b"X" * 1000)


def test_a_missing_chunk_terminator_is_refused() -> None:
    framer = RequestFramer()
    framer.start(parse_request_head(head("POST / HTTP/1.1", "Transfer-Encoding: chunked")))
    with pytest.raises(FramingError):
        framer.feed(b"2\r\nabXY")


# -- the first answer -------------------------------------------------------------------------


COOKIE = http.set_cookie(40001, TOKEN)


def test_the_cookie_is_set_on_the_first_answer_only() -> None:
    inj = CookieInjector(COOKIE)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    out = b"".join(inj.feed(answer[i:i + 5]) for i in range(0, len(answer), 5))
    assert out == (b"HTTP/1.1 200 OK\r\nSet-Cookie: tenki_port_token_40001=" + TOKEN.encode()
                   + b"; HttpOnly; SameSite=Lax; Path=/\r\nContent-Length: 2\r\n\r\nok")
    assert inj.feed(answer) == answer


def test_interim_answers_pass_and_the_final_one_gets_the_cookie() -> None:
    inj = CookieInjector(COOKIE)
    out = inj.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
                   b"Upgrade: websocket\r\n\r\n\x81\x02hi")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
                          b"Set-Cookie: tenki_port_token_40001=")
    assert out.endswith(b"Upgrade: websocket\r\n\r\n\x81\x02hi")


def test_what_is_not_an_http_answer_passes_untouched() -> None:
    inj = CookieInjector(COOKIE)
    assert inj.feed(b"SSH-2.0-x\r\n") == b"SSH-2.0-x\r\n"
    inj = CookieInjector(COOKIE)
    assert inj.feed(b"HTTP/1.1 200 OK\r\nX: y") == b""  # held: the head is not complete
    assert inj.flush() == b"HTTP/1.1 200 OK\r\nX: y"
    inj = CookieInjector(COOKIE)
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * http.HEAD_MAX_BYTES
    assert inj.feed(big) == big and inj.done


def test_the_proxys_own_answers() -> None:
    raw = http.answer(401, "no", headers=(("WWW-Authenticate", "Bearer"),))
    head_part, _, body = raw.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"Content-Length: 3" in head_part and b"Connection: close" in head_part
    assert b"WWW-Authenticate: Bearer" in head_part and body == b"no\n"

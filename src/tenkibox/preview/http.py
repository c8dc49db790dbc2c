"""HTTP/1.x as the preview proxy needs it: pure functions on bytes, no I/O.

The proxy reads a request head, finds the caller's credential in it, and forwards the request to
the guest without that credential; every later request of a keep-alive connection is rewritten
the same way (``RequestFramer`` follows the request stream: heads, then bodies framed by
``Content-Length`` or chunked encoding, until an upgrade leaves HTTP). Answers flow back
unchanged, except that the first one may get the cookie that lets a browser's later requests in
(``CookieInjector``).

Credentials (any one lets the request in):

- ``tenki_token=TOKEN`` in the query (the exposure's own token, as the preview URL carries it);
- a cookie ``tenki_port_token`` or ``tenki_port_token_<listener port>`` (set by the proxy on
  the answer to a request that used the query token: cookies are shared by every port of a
  host, so each listener sets its own name and two previews open in one browser both work);
- the header ``X-Tenki-Token: TOKEN``;
- ``Authorization: Bearer tk_…``: an API key of the session's workspace.

All of them are removed before the guest sees the request (every ``tenki_port_token*`` cookie,
not only this listener's, and any ``Bearer tk_…`` authorization, valid or not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import unquote_plus

#: the longest request or response head read (request line and headers)
HEAD_MAX_BYTES = 64 * 1024
#: the longest chunk-size line of a chunked body
CHUNK_LINE_MAX_BYTES = 4096

QUERY_PARAM = "tenki_token"
COOKIE_NAME = "tenki_port_token"
HEADER_NAME = "x-tenki-token"
KEY_PREFIX = "tk_"

_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_VERSIONS = ("HTTP/1.0", "HTTP/1.1")
_TERMINATOR = b"\r\n\r\n"


class HeadError(ValueError):
    """A request that cannot be proxied; ``status`` is the answer it gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    #: (name as sent, value) in order; names compare case-insensitively
    headers: tuple[tuple[str, str], ...] = ()

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_token(self, name: str, token: str) -> bool:
        """Whether the comma-separated header ``name`` lists ``token`` (``Connection``)."""
        token = token.lower()
        return any(t.strip().lower() == token for v in self.values(name) for t in v.split(","))


@dataclass(frozen=True)
class Credentials:
    """What a request presented; ``any`` is whether it presented anything at all."""

    tokens: tuple[str, ...] = ()  # query, cookie and header tokens, in that order
    api_key: str | None = None  # a ``Bearer tk_…`` authorization, as sent
    from_query: bool = False

    @property
    def any(self) -> bool:
        return bool(self.tokens or self.api_key)


# -- parsing ----------------------------------------------------------------------------------


def head_end(buf: bytes | bytearray) -> int:
    """The length of the head at the start of ``buf`` (its blank line included), or -1."""
    at = buf.find(_TERMINATOR)
    return at + len(_TERMINATOR) if at >= 0 else -1


def parse_request_head(raw: bytes) -> RequestHead:
    """A request head (up to and including its blank line). ``HeadError`` if it is not one
    this proxy forwards: not HTTP/1.0 or 1.1, folded or malformed header lines, control
    characters, or a body whose length cannot be told (see ``body_framing``)."""
    if len(raw) > HEAD_MAX_BYTES:
        raise HeadError(f"request head over {HEAD_MAX_BYTES} bytes", 431)
    text = raw.decode("latin-1")
    if not text.endswith("\r\n\r\n"):
        raise HeadError("incomplete request head")
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HeadError("malformed request line")
    method, target, version = parts
    if version not in _VERSIONS:
        raise HeadError(f"unsupported protocol {version[:16]!r} (HTTP/1.0 or HTTP/1.1 only)",
                        505 if version.startswith("HTTP/") else 400)
    if not _TOKEN_CHARS.match(method):
        raise HeadError("malformed method")
    if _has_controls(target) or " " in target:
        raise HeadError("malformed request target")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line or line[0] in " \t":
            raise HeadError("folded or empty header line")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_CHARS.match(name):
            raise HeadError("malformed header line")
        value = value.strip(" \t")
        if _has_controls(value, tab=True):
            raise HeadError(f"control character in header {name[:64]}")
        headers.append((name, value))
    head = RequestHead(method, target, version, tuple(headers))
    body_framing(head)  # refuse what cannot be framed now, before anything is forwarded
    return head


def _has_controls(text: str, tab: bool = False) -> bool:
    return any((ord(c) < 0x20 and not (tab and c == "\t")) or ord(c) == 0x7F for c in text)


# -- bodies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How the body after a request head ends: ``length`` bytes, chunked, or never (the
    connection leaves HTTP: an upgrade, or CONNECT)."""

    length: int = 0
    chunked: bool = False
    raw: bool = False


def body_framing(head: RequestHead) -> Framing:
    """RFC 9112 §6: ``Transfer-Encoding`` chunked, else ``Content-Length``, else none. Both
    at once, an encoding other than chunked last, or differing lengths are refused (they are
    how requests are smuggled past a proxy)."""
    codings = [c.strip().lower() for v in head.values("transfer-encoding") for c in v.split(",")]
    lengths = {v.strip() for v in head.values("content-length")}
    if codings:
        if lengths:
            raise HeadError("both Transfer-Encoding and Content-Length")
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise HeadError("a request's Transfer-Encoding must end with chunked")
        if head.version == "HTTP/1.0":
            raise HeadError("Transfer-Encoding in an HTTP/1.0 request")
        return Framing(chunked=True)
    length = 0
    if lengths:
        if len(lengths) != 1:
            raise HeadError("differing Content-Length values")
        text = lengths.pop()
        if not text.isdigit() or len(text) > 18:
            raise HeadError("malformed Content-Length")
        length = int(text)
    upgrade = bool(head.values("upgrade")) and head.has_token("connection", "upgrade")
    if head.method == "CONNECT" or upgrade:
        if length:
            raise HeadError("a body on an upgrade request")
        return Framing(raw=True)
    return Framing(length=length)


# -- credentials ------------------------------------------------------------------------------


def _split_target(target: str) -> tuple[str, str | None]:
    path, sep, query = target.partition("?")
    return path, query if sep else None


def _query_pairs(query: str) -> list[str]:
    return query.split("&") if query else []


def _param_name(pair: str) -> str:
    return unquote_plus(pair.partition("=")[0])


def _cookie_pairs(value: str) -> list[str]:
    return [p.strip() for p in value.split(";") if p.strip()]


def _is_token_cookie(pair: str) -> bool:
    name = pair.partition("=")[0].strip()
    return name == COOKIE_NAME or name.startswith(COOKIE_NAME + "_")


def _bearer_key(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token.startswith(KEY_PREFIX):
        return token
    return None


def credentials(head: RequestHead) -> Credentials:
    tokens: list[str] = []
    _, query = _split_target(head.target)
    from_query = False
    for pair in _query_pairs(query or ""):
        if _param_name(pair) == QUERY_PARAM:
            tokens.append(unquote_plus(pair.partition("=")[2]))
            from_query = True
    for value in head.values("cookie"):
        tokens += [p.partition("=")[2].strip().strip('"') for p in _cookie_pairs(value)
                   if _is_token_cookie(p)]
    tokens += head.values(HEADER_NAME)
    key = next((k for k in map(_bearer_key, head.values("authorization")) if k), None)
    return Credentials(tuple(tokens), key, from_query)


def strip_credentials(head: RequestHead) -> RequestHead:
    """``head`` without anything that names a credential of the proxy: the query parameter,
    every ``tenki_port_token*`` cookie, ``X-Tenki-Token`` and ``Authorization: Bearer tk_…``.
    Everything else stays as sent, in order (other query parameters keep their encoding)."""
    path, query = _split_target(head.target)
    target = head.target
    if query is not None:
        kept = [p for p in _query_pairs(query) if _param_name(p) != QUERY_PARAM]
        if len(kept) != len(_query_pairs(query)):
            target = path + ("?" + "&".join(kept) if kept else "")
    headers: list[tuple[str, str]] = []
    for name, value in head.headers:
        low = name.lower()
        if low == HEADER_NAME or (low == "authorization" and _bearer_key(value)):
            continue
        if low == "cookie":
            pairs = _cookie_pairs(value)
            kept = [p for p in pairs if not _is_token_cookie(p)]
            if not kept:
                continue
            if len(kept) != len(pairs):
                value = "; ".join(kept)
        headers.append((name, value))
    return replace(head, target=target, headers=tuple(headers))


def serialize(head: RequestHead) -> bytes:
    lines = [f"{head.method} {head.target} {head.version}"]
    lines += [f"{k}: {v}" for k, v in head.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- answers of the proxy itself --------------------------------------------------------------

_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


def answer(status: int, text: str, *, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete plain-text answer that closes the connection."""
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
             "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
             "Connection: close", "Cache-Control: no-store", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def cookie_name(host_port: int) -> str:
    return f"{COOKIE_NAME}_{host_port}"


def set_cookie(host_port: int, token: str) -> str:
    return f"{cookie_name(host_port)}={token}; HttpOnly; SameSite=Lax; Path=/"


# -- the request stream -----------------------------------------------------------------------


class FramingError(ValueError):
    """The client's byte stream stopped being HTTP this proxy can follow."""


@dataclass
class RequestFramer:
    """Follows the requests a client sends on one connection and rewrites each head
    (``strip_credentials``); bodies pass through as they are, in the pieces they came in.
    Holds at most one incomplete head (``HEAD_MAX_BYTES``) or chunk-size line.

    ``feed`` returns the bytes to forward. After a request that leaves HTTP (an upgrade,
    CONNECT), everything passes through unread."""

    _buf: bytearray = field(default_factory=bytearray)
    _state: str = "head"  # head | body | chunk-size | chunk-data | chunk-end | trailers | raw
    _left: int = 0
    requests: int = 0

    def start(self, head: RequestHead) -> bytes:
        """The first request, already parsed (and authenticated) by the caller."""
        return self._begin(head)

    @property
    def raw(self) -> bool:
        return self._state == "raw"

    def _begin(self, head: RequestHead) -> bytes:
        framing = body_framing(head)
        self.requests += 1
        if framing.raw:
            self._state = "raw"
        elif framing.chunked:
            self._state = "chunk-size"
        elif framing.length:
            self._state, self._left = "body", framing.length
        else:
            self._state = "head"
        return serialize(strip_credentials(head))

    def feed(self, data: bytes) -> bytes:
        if self._state == "raw":
            return data
        out = bytearray()
        self._buf += data
        while self._buf:
            if self._state == "raw":
                out += self._buf
                self._buf.clear()
            elif self._state == "head":
                end = head_end(self._buf)
                if end < 0:
                    if len(self._buf) > HEAD_MAX_BYTES:
                        raise FramingError(f"request head over {HEAD_MAX_BYTES} bytes")
                    break
                raw = bytes(self._buf[:end])
                del self._buf[:end]
                try:
                    out += self._begin(parse_request_head(raw))
                except HeadError as exc:
                    raise FramingError(str(exc)) from exc
            elif self._state in ("body", "chunk-data"):
                n = min(self._left, len(self._buf))
                out += self._buf[:n]
                del self._buf[:n]
                self._left -= n
                if self._left == 0:
                    self._state = "head" if self._state == "body" else "chunk-end"
            elif self._state == "chunk-end":
                if len(self._buf) < 2:
                    break
                if self._buf[:2] != b"\r\n":
                    raise FramingError("malformed chunked body")
                out += b"\r\n"
                del self._buf[:2]
                self._state = "chunk-size"
            else:  # chunk-size or trailers: one line at a time
                at = self._buf.find(b"\r\n")
                if at < 0:
                    if len(self._buf) > CHUNK_LINE_MAX_BYTES:
                        raise FramingError("chunk line too long")
                    break
                line = bytes(self._buf[:at])
                out += self._buf[:at + 2]
                del self._buf[:at + 2]
                if self._state == "trailers":
                    if not line:
                        self._state = "head"
                    continue
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or not all(
                        c in b"0123456789abcdefABCDEF" for c in size_text):
                    raise FramingError("malformed chunk size")
                self._left = int(size_text, 16)
                self._state = "chunk-data" if self._left else "trailers"
        return bytes(out)


# -- the first answer -------------------------------------------------------------------------


class CookieInjector:
    """Adds a ``Set-Cookie`` header to the first final answer of a connection (1xx answers
    other than 101 pass through first). Holds at most ``HEAD_MAX_BYTES``; an answer whose head
    is longer, or not HTTP, passes through untouched."""

    def __init__(self, header: str) -> None:
        self.header = header
        self._buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buf += data
        out = bytearray()
        while not self.done:
            end = head_end(self._buf)
            if end < 0:
                if len(self._buf) > HEAD_MAX_BYTES or not self._buf.startswith(
                        b"HTTP/"[:len(self._buf)]):
                    self.done = True
                    out += self._buf
                    self._buf.clear()
                break
            head = bytes(self._buf[:end])
            del self._buf[:end]
            status_line, _, rest = head.partition(b"\r\n")
            parts = status_line.split(b" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if 100 <= status < 200 and status != 101:
                out += head  # an interim answer: the cookie goes on the final one
                continue
            if status:
                head = status_line + b"\r\nSet-Cookie: " + self.header.encode("latin-1") \
                    + b"\r\n" + rest
            out += head + self._buf
            self._buf.clear()
            self.done = True
        return bytes(out)

    def flush(self) -> bytes:
        """What is held when the guest's stream ends."""
        out = bytes(self._buf)
        self._buf.clear()
        self.done = True
        return out

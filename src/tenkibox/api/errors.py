"""One error format for every answer of the API, and the request hygiene around it.

Every error body is ``{"error": {"code": ..., "message": ..., "field": ...}}``
(``TenkiError.to_body``), whatever failed:

* a ``TenkiError`` raised by a route: its own code and status;
* request validation (pydantic, FastAPI): 422 ``ValidationError`` naming the field as a dotted
  path (``env.FOO``, ``argv.3``, ``volumes.0.path``); malformed JSON and invalid UTF-8 in a body
  name the field ``body``;
* Starlette's HTTP errors: 404 ``NotFound`` (unknown route), 405 ``MethodNotAllowed``,
  413 ``PayloadTooLarge``, ...;
* anything unexpected: 500 ``Internal`` with a short message (the traceback goes to the log).

Two pure-ASGI middlewares run before routing: :class:`BodyLimitMiddleware` (413 for a request
body over its limit, without buffering) and :class:`ParamCheckMiddleware` (422 for a query or
path parameter with NUL, invalid UTF-8, or over 4096 characters). ``install_error_handlers``
installs all of it; the limits are in ``tenkibox.limits`` (``docs/limits.md``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import limits, units
from ..errors import (
    AuthenticationError,
    ConflictError,
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    TenkiError,
    ValidationError,
)

log = logging.getLogger("tenkibox.api")

#: Requests whose body is a streamed upload, not JSON: (method, path regex). Only a request with a
#: JSON content type gets the JSON limit there; any other gets ``max_upload_bytes``.
UPLOAD_ROUTES: tuple[tuple[str, str], ...] = (("PUT", r"/v1/sessions/[^/]+/files"),)
#: Requests with their own body limit instead of the JSON one: (method, path regex, bytes).
ROUTE_BODY_LIMITS: tuple[tuple[str, str, int], ...] = (
    ("POST", r"/v1/sessions/[^/]+/processes", limits.EXEC_BODY_MAX_BYTES),
    ("POST", r"/v1/sessions/[^/]+/processes/[^/]+/stdin", limits.STDIN_WRITE_MAX_BYTES),
)

_LOCATIONS = ("body", "query", "path", "header", "cookie")
_FIELD_PART_MAX = 64
_PATH_IN_MESSAGE_MAX = 200


# -- rendering ------------------------------------------------------------------------------------


def error_response(err: TenkiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def field_of(loc: Sequence[Any]) -> str:
    """A pydantic/FastAPI error location as a dotted field: ``("body", "env", "FOO")`` ->
    ``env.FOO``; ``("query", "path")`` -> ``path``; the body itself -> ``body``."""
    parts = list(loc)
    where = parts.pop(0) if parts and parts[0] in _LOCATIONS else None
    out = []
    for p in parts:
        text = str(p)
        if text == "[key]":  # a dict key's own error: the key already names it
            continue
        if len(text) > _FIELD_PART_MAX:
            text = text[: _FIELD_PART_MAX - 3] + "..."
        out.append(text)
    return ".".join(out) or (str(where) if where else "body")


def validation_error(exc: RequestValidationError) -> ValidationError:
    """The first problem of a failed request validation, as a ``ValidationError``."""
    errs = exc.errors()
    first: dict[str, Any] = dict(errs[0]) if errs else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc") or ())
    kind = first.get("type")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        reason = str(ctx.get("error") or "cannot parse")
        pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
        where = f" at character {pos}" if pos is not None else ""
        return ValidationError(f"invalid JSON: {reason}{where}", field="body")
    msg = str(first.get("msg") or "invalid value")
    for lead in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(lead)
    if kind == "missing":
        msg = "is required"
    field = field_of(loc)
    if field == "body" and isinstance(first.get("input"), bytes | bytearray):
        msg = "expected a JSON object (Content-Type: application/json)"
    return ValidationError(msg, field=field)


def _route_text(request: Request) -> str:
    path = request.url.path
    if len(path) > _PATH_IN_MESSAGE_MAX:
        path = path[: _PATH_IN_MESSAGE_MAX - 3] + "..."
    return f"{request.method} {path}"


def _code_of(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Internal" if status >= 500 else "BadRequest"
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", phrase) if w)


def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's ``HTTPException`` (routing, body parsing) in the one format."""
    status = exc.status_code
    default = _phrase(status)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != default else None
    headers = dict(exc.headers) if exc.headers else None
    err: TenkiError | None = None
    if status == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        err = ValidationError("invalid UTF-8", field="body")
    elif status == 400 and exc.detail == "There was an error parsing the body":
        err = ValidationError("cannot parse the request body", field="body")
    elif status == 404:
        err = NotFoundError(detail or f"no such route: {_route_text(request)}")
    elif status == 405:
        err = MethodNotAllowedError(detail or f"method not allowed: {_route_text(request)}")
    elif status == 413:
        err = PayloadTooLargeError(detail or "request body too large")
    elif status == 401:
        err = AuthenticationError(detail or "unauthorized")
    elif status == 409:
        err = ConflictError(detail or "conflict")
    elif status == 422:
        err = ValidationError(detail or "invalid request")
    if err is not None:
        return error_response(err, headers)
    body = {"error": {"code": _code_of(status), "message": detail or default or f"HTTP {status}"}}
    return JSONResponse(body, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def install_error_handlers(
    app: FastAPI,
    *,
    max_json_bytes: int | None = limits.JSON_BODY_MAX_BYTES,
    max_upload_bytes: int | None = limits.UPLOAD_MAX_BYTES,
) -> None:
    """Render every error of ``app`` in the one format and add the request hygiene middlewares.

    Call it once, right after creating the app (middlewares cannot be added once it serves).
    """

    async def _tenki(_req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TenkiError)
        return error_response(exc)

    async def _validation(_req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def _http(req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return http_error(req, exc)

    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", _route_text(req), exc_info=exc)
        err = InternalError(f"internal server error ({type(exc).__name__}); see the server log")
        return error_response(err)

    app.add_exception_handler(TenkiError, _tenki)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(
        BodyLimitMiddleware, max_json_bytes=max_json_bytes, max_upload_bytes=max_upload_bytes
    )
    app.add_middleware(ParamCheckMiddleware)


# -- ASGI helpers ---------------------------------------------------------------------------------


async def _send_error(err: TenkiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(err)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


# -- body limit -----------------------------------------------------------------------------------


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes its limit. An ``HTTPException`` so
    that FastAPI's body parsing re-raises it and the handler above renders the 413."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class BodyLimitMiddleware:
    """Reject a request body over its limit with 413 ``PayloadTooLarge``, without buffering.

    A declared ``Content-Length`` over the limit is answered at once (the body is not read);
    otherwise the bytes are counted as the app receives them (chunked bodies too) and the
    request fails as soon as they pass the limit. Limits (None = unlimited):

    * an upload route (``PUT /v1/sessions/{id}/files``) whose content type is not JSON:
      ``max_upload_bytes``;
    * a route of ``route_limits``: its own limit;
    * any other request: ``max_json_bytes``.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_json_bytes: int | None = limits.JSON_BODY_MAX_BYTES,
        max_upload_bytes: int | None = limits.UPLOAD_MAX_BYTES,
        *,
        upload_routes: Iterable[tuple[str, str]] = UPLOAD_ROUTES,
        route_limits: Iterable[tuple[str, str, int | None]] = ROUTE_BODY_LIMITS,
    ) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes
        self._uploads = [(m.upper(), re.compile(p)) for m, p in upload_routes]
        self._routes = [(m.upper(), re.compile(p), n) for m, p, n in route_limits]

    def limit_for(self, scope: Scope) -> int | None:
        method = str(scope.get("method", "")).upper()
        path = _route_path(scope)
        json_body = _is_json(_header(scope, b"content-type"))
        if not json_body:
            for m, rx in self._uploads:
                if m == method and rx.fullmatch(path):
                    return self.max_upload_bytes
        for m, rx, n in self._routes:
            if m == method and rx.fullmatch(path):
                return n
        return self.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        if limit is None:
            await self.app(scope, receive, send)
            return
        message = (
            f"request body too large: at most {limit} bytes ({units.format_size(limit)}) "
            f"for {scope.get('method', '')} {_route_path(scope)[:_PATH_IN_MESSAGE_MAX]}"
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _send_error(PayloadTooLargeError(message), scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(message)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _send_error(PayloadTooLargeError(message), scope, receive, send)


# -- query and path parameters --------------------------------------------------------------------


def _bytes_problem(raw: bytes) -> str | None:
    if b"\0" in raw:
        return "must not contain NUL characters"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    return None


class ParamCheckMiddleware:
    """422 ``ValidationError`` naming the parameter for a query or path parameter that holds
    NUL, is not UTF-8 once percent-decoded, or is longer than ``max_param_chars``.

    (Servers decode invalid UTF-8 in URLs to U+FFFD and pass NUL through, so the routes would
    otherwise see altered or dangerous values.)
    """

    def __init__(self, app: ASGIApp, max_param_chars: int = limits.PARAM_MAX_CHARS) -> None:
        self.app = app
        self.max_param_chars = max_param_chars

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.query_problem(scope.get("query_string") or b"")
            if problem is None:
                problem = self.path_problem(scope)
            if problem is not None:
                name, msg = problem
                await _send_error(ValidationError(msg, field=name), scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _too_long(self, value: str) -> str | None:
        if len(value) > self.max_param_chars:
            return f"must be at most {self.max_param_chars} characters, got {len(value)}"
        return None

    def query_problem(self, qs: bytes) -> tuple[str, str] | None:
        if len(qs) <= self.max_param_chars and b"%" not in qs and qs.isascii():
            return None
        for part in qs.split(b"&"):
            if not part:
                continue
            raw_key, _, raw_value = part.partition(b"=")
            key = unquote_to_bytes(raw_key.replace(b"+", b" "))
            value = unquote_to_bytes(raw_value.replace(b"+", b" "))
            name = key.decode("utf-8", "backslashreplace").replace("\0", "\\x00")
            if len(name) > _FIELD_PART_MAX:
                name = name[: _FIELD_PART_MAX - 3] + "..."
            if (p := _bytes_problem(key)) is not None:
                return name, f"parameter name: {p}"
            if (p := _bytes_problem(value)) is not None:
                return name, p
            if (p := self._too_long(value.decode("utf-8"))) is not None:
                return name, p
        return None

    def path_problem(self, scope: Scope) -> tuple[str, str] | None:
        path: str = scope.get("path", "")
        raw = scope.get("raw_path")
        if not isinstance(raw, bytes):
            raw = path.encode("utf-8", "surrogateescape")
        if len(path) <= self.max_param_chars and b"%" not in raw and raw.isascii():
            return None
        decoded = unquote_to_bytes(raw)
        bad_utf8 = _bytes_problem(decoded.replace(b"\0", b"")) is not None
        if not bad_utf8 and b"\0" not in decoded and len(path) <= self.max_param_chars:
            return None
        params = self._path_params(scope)
        for name, value in params.items():
            if not isinstance(value, str):
                continue
            if "\0" in value:
                return name, "must not contain NUL characters"
            if bad_utf8 and "\ufffd" in value:
                return name, "invalid UTF-8"
            if (p := self._too_long(value)) is not None:
                return name, p
        if bad_utf8 or b"\0" in decoded:
            # in no parameter of a known route (a literal part, or an unknown route)
            return "url", "invalid UTF-8" if bad_utf8 else "must not contain NUL characters"
        return None

    @staticmethod
    def _path_params(scope: Scope) -> dict[str, Any]:
        """The path parameters of the route the request will reach (none if no route)."""
        return route_of(scope)[1]


def route_of(scope: Scope) -> tuple[Any, dict[str, Any]]:
    """The route a request will reach and its path parameters, before routing ran (None and
    {} when no route has this path and method)."""
    router = getattr(scope.get("app"), "router", None)
    partial: tuple[Any, dict[str, Any]] = (None, {})
    for route in _leaf_routes(getattr(router, "routes", ())):
        try:
            match, child = route.matches(scope)
        except Exception:  # a route type that cannot match this scope
            continue
        params = child.get("path_params")
        found = (route, dict(params) if isinstance(params, dict) else {})
        if match == Match.FULL:
            return found
        if match == Match.PARTIAL and partial[0] is None:
            partial = found
    return partial if partial[0] is None else (None, partial[1])


def _leaf_routes(routes: Iterable[Any], depth: int = 0) -> Iterator[Any]:
    """The routes of a router, those of included routers inlined (FastAPI keeps an included
    ``APIRouter`` as one route holding ``original_router``, whose routes have full paths)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None and depth < 8:
            yield from _leaf_routes(getattr(inner, "routes", ()), depth + 1)
        else:
            yield route

"""Who is calling, and the record of what they changed.

``AccessMiddleware`` runs before anything else of the app, for every request: no key, or a key
that is unknown, revoked or expired, answers 401 before any route (so no route can forget it,
and an unknown path answers like a known one). The caller's ``Principal`` is then in the
request's scope for the routes (``deps.Caller``, ``deps.Admin``). Every mutating call (POST,
PUT, PATCH, DELETE), refused or not, is written to the audit trail once it is answered: the
workspace, the key's prefix, the operation, the object's id and the outcome.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..control.keys import Principal
from ..control.plane import ControlPlane
from ..errors import ERROR_TABLE, PermissionDeniedError, TenkiError
from .errors import _header, error_response, route_of

log = logging.getLogger("tenkibox.api")

SCOPE_KEY = "tenki.principal"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: path parameters that name the object of a call, in order of preference
_OBJECT_PARAMS = ("process_id", "volume_id", "snapshot_id", "session_id", "build_id",
                  "template_id", "key_id", "workspace_id", "host_id")
#: calls whose success is not audited: a host worker's heartbeat, every few seconds per host,
#: would bury the trail (a refused one is audited, as a registration always is)
_ROUTINE = frozenset({"hostHeartbeat"})
#: a create's answer is read for the new object's id up to this size
_BODY_PEEK_BYTES = 64 * 1024
#: refused mutating calls without a valid key are audited up to this many a minute: anyone can
#: send them, and the trail must not become a way to fill the disk
UNAUTHENTICATED_AUDITS_PER_MINUTE = 120

__all__ = ["AccessMiddleware", "Principal", "admin", "principal"]


def principal(request: Request) -> Principal:
    """The caller (set by ``AccessMiddleware``, which answered 401 if there was none)."""
    found = request.scope.get(SCOPE_KEY)
    if not isinstance(found, Principal):  # the middleware is not installed: refuse
        raise PermissionDeniedError("no caller: the access middleware is missing")
    return found


def admin(request: Request) -> Principal:
    caller = principal(request)
    if not caller.admin:
        raise PermissionDeniedError(
            f"this call needs an admin key; key {caller.key_prefix}… ({caller.key_id}) is a "
            f"key of workspace {caller.workspace_id}")
    return caller


class AccessMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._window = 0  # the minute being counted
        self._refused = 0  # refused calls audited in it
        self._dropped = 0  # refused calls not audited in it

    def _audit_refusal(self) -> bool:
        """Whether this refused call is audited (a bounded number a minute)."""
        minute = int(time.monotonic() // 60)
        if minute != self._window:
            if self._dropped:
                log.warning("%d refused calls without a valid key were not audited (over %d a "
                            "minute)", self._dropped, UNAUTHENTICATED_AUDITS_PER_MINUTE)
            self._window, self._refused, self._dropped = minute, 0, 0
        if self._refused >= UNAUTHENTICATED_AUDITS_PER_MINUTE:
            self._dropped += 1
            return False
        self._refused += 1
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        plane: ControlPlane = scope["app"].state.plane
        method = scope.get("method", "GET")
        try:
            caller = await plane.keys.authenticate(_header(scope, b"authorization"))
        except TenkiError as exc:
            if method in MUTATING and self._audit_refusal():
                route, params = route_of(scope)  # routing has not run: find the operation
                await _audit(plane, {**scope, "route": route, "path_params": params}, None,
                             exc.status, exc.code, None)
            # RFC 9110: a 401 names the scheme it expects
            await error_response(exc, headers={"WWW-Authenticate": 'Bearer realm="tenki"'})(
                scope, receive, send)
            return
        scope[SCOPE_KEY] = caller
        if method not in MUTATING:
            await self.app(scope, receive, send)
            return
        answer: dict[str, Any] = {"status": 500, "body": b"", "json": False}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                ctype = dict(message.get("headers") or ()).get(b"content-type", b"")
                answer["json"] = ctype.startswith(b"application/json")
            elif message["type"] == "http.response.body" and answer["json"]:
                if len(answer["body"]) < _BODY_PEEK_BYTES:
                    answer["body"] += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await _audit(plane, scope, caller, answer["status"], None, answer)


async def _audit(plane: ControlPlane, scope: Scope, caller: Principal | None, status: int,
                 code: str | None, answer: dict[str, Any] | None) -> None:
    route = scope.get("route")
    action = getattr(route, "operation_id", None) or getattr(route, "name", None) \
        or f"{scope.get('method')} {scope.get('path')}"
    params = scope.get("path_params") or {}
    object_id = next((str(params[p]) for p in _OBJECT_PARAMS if params.get(p)), None)
    body = _json(answer["body"]) if answer and answer["json"] else None
    if isinstance(body, dict):
        if object_id is None and isinstance(body.get("id"), str):
            object_id = body["id"]
        err = body.get("error")
        if code is None and isinstance(err, dict) and err.get("code") in ERROR_TABLE:
            code = str(err["code"])
    outcome = "ok" if 200 <= status < 400 else (code or f"HTTP {status}")
    if outcome == "ok" and action in _ROUTINE:
        return
    try:
        await plane.audit.record(
            workspace_id=caller.workspace_id if caller else None,
            key_prefix=caller.key_prefix if caller else None, action=str(action),
            method=str(scope.get("method")), path=str(scope.get("path")), object_id=object_id,
            status=status, outcome=outcome)
    except Exception:  # the answer is sent: a failed audit write is logged, not raised
        log.exception("could not write the audit record of %s %s", scope.get("method"),
                      scope.get("path"))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None

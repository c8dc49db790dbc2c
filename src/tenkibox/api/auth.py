"""Who is calling: every route depends on ``principal``, which yields a ``Principal`` or
answers 401. Today there is one optional server key (``tenki serve --api-key``); workspaces and
per-workspace keys fill this in later without touching a route."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from ..errors import AuthenticationError


@dataclass(frozen=True)
class Principal:
    workspace_id: str | None
    admin: bool


LOCAL = Principal(workspace_id=None, admin=True)


async def principal(request: Request) -> Principal:
    expected: str | None = request.app.state.api_key
    if expected is None:
        return LOCAL
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthenticationError("missing or wrong API key (expected the header "
                                  "Authorization: Bearer <key>)")
    return LOCAL

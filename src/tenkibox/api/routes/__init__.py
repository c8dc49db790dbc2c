"""One router per resource; each route is a thin call into the control plane."""

from __future__ import annotations

from typing import Any

from ...models import ErrorBody

#: The error responses a route may give, for the OpenAPI contract (the body is ``ErrorBody``).
_TEXT = {400: "Bad request", 401: "Missing or wrong API key", 404: "Not found",
         409: "Conflict with the resource's state", 413: "Body too large",
         422: "Invalid input (the field is named)", 500: "Internal error"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": _TEXT[c]}
            for c in sorted({401, 404, 413, 422, 500, *codes})}

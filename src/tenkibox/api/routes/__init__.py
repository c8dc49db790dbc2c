"""One router per resource; each route is a thin call into the control plane."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ...models import ErrorBody

#: The error responses a route may give, for the OpenAPI contract (the body is ``ErrorBody``).
_TEXT = {400: "Bad request", 401: "Missing, unknown, revoked or expired API key",
         403: "The key may not make this call (admin only)", 404: "Not found",
         409: "Conflict with the resource's state", 413: "Body too large",
         422: "Invalid input (the field is named)",
         429: "A workspace quota is exceeded (named, with its limit and use)",
         500: "Internal error", 503: "The host has no capacity for it now (retryable)"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": _TEXT[c]}
            for c in sorted({401, 404, 413, 422, 500, *codes})}


#: Models of streamed items (one NDJSON line each), named by ``stream_of``. FastAPI collects only
#: the models it validates into the OpenAPI components; ``api.app`` adds these.
STREAM_ITEM_MODELS: dict[str, type[BaseModel]] = {}


def stream_of(model: type[BaseModel]) -> dict[str, Any]:
    """The media type object of a stream whose every line is a ``model`` (the ``schema`` of a
    sequential media type describes one item, as for event streams before OpenAPI 3.2)."""
    STREAM_ITEM_MODELS[model.__name__] = model
    return {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}

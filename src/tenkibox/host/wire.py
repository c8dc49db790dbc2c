"""What both ends of the host wire agree on (``service`` serves a ``HostAPI``, ``remote``
calls it): the route prefix, how errors travel, and the NDJSON framing of streams.

Errors travel as ``TenkiError.to_body`` (``{"error": {"code", "message", "field"}}``) with the
status of ``errors.ERROR_TABLE``. Two host errors are subclasses that the public wire folds into
their parent's code, but the control plane tells them apart (a damaged snapshot becomes FAILED,
a damaged image refuses boots): they add ``"type"`` to the body so that the remote side raises
the same subclass again.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CommandError, InternalError, TenkiError, error_from_body
from .api import ImageDamagedError, SnapshotDamagedError

PREFIX = "/host/v1"

#: error subclasses whose code is their parent's, by the name that travels in ``"type"``
SUBTYPES: dict[str, type[TenkiError]] = {
    "SnapshotDamaged": SnapshotDamagedError,
    "ImageDamaged": ImageDamagedError,
}

#: an empty NDJSON line a long-lived stream sends while it has nothing to say, so that a
#: connection that died silently (a partition) is noticed by the reader's timeout
KEEPALIVE = b"{}\n"


def error_body(exc: TenkiError) -> dict[str, Any]:
    body = exc.to_body()
    for name, cls in SUBTYPES.items():
        if type(exc) is cls:
            body["error"]["type"] = name
    return body


def error_from_wire(status: int, body: Any) -> TenkiError:
    """The typed error a host answered (the inverse of ``error_body``)."""
    err = body.get("error") if isinstance(body, dict) else None
    sub = SUBTYPES.get(str(err.get("type"))) if isinstance(err, dict) else None
    if sub is not None and isinstance(err, dict):
        exc = sub.__new__(sub)
        TenkiError.__init__(exc, str(err.get("message") or f"HTTP {status}"),
                            field=err.get("field"), details=err.get("details"))
        return exc
    out = error_from_body(status, body)
    return InternalError(out.message) if isinstance(out, CommandError) else out


def ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

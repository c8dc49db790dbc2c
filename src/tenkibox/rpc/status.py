"""One table: each of our errors as the gRPC status the official SDKs understand.

The SDKs pick their exception from the status code *and words of the message* (NOT_FOUND with
"snapshot" is SnapshotNotFound, FAILED_PRECONDITION with "terminated" is SessionTerminated, …),
so our messages are written to be read that way: "session <id> not found", "snapshot <id> not
found", "volume <id> not found"; a wrong state says the state ("session … is TERMINATED, not
running"). ``status_of`` walks the class hierarchy, so a new subclass inherits its parent's row.
"""

from __future__ import annotations

import grpc

from .. import errors as e

#: (our error class, gRPC code). The first row whose class matches wins.
TABLE: tuple[tuple[type[e.TenkiError], grpc.StatusCode], ...] = (
    (e.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    # the request is well formed; this server cannot do it as it runs (not root, no nftables)
    (e.NetworkPolicyUnsupportedError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.PayloadTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.MethodNotAllowedError, grpc.StatusCode.UNIMPLEMENTED),
    (e.SnapshotFailedError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.CapacityUnavailableError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.WaitTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (e.HostUnreachableError, grpc.StatusCode.UNAVAILABLE),
    (e.SessionFailedError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.CommandError, grpc.StatusCode.INTERNAL),
    (e.InternalError, grpc.StatusCode.INTERNAL),
)


def status_of(exc: e.TenkiError) -> tuple[grpc.StatusCode, str]:
    """The code and the one-line message for ``exc``."""
    message = str(exc)
    field = getattr(exc, "field", None)
    if isinstance(exc, e.ValidationError) and field and not message.startswith(str(field)):
        message = f"{field}: {message}"
    if isinstance(exc, e.CapacityUnavailableError) and "capacity" not in message.lower():
        message = f"no capacity: {message}"
    for cls, code in TABLE:
        if isinstance(exc, cls):
            return code, message
    return grpc.StatusCode.INTERNAL, message

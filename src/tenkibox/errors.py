"""The one exception hierarchy of tenki, shared by the server, the SDK and the CLI.

    TenkiError
    ├── ValidationError          422  bad input; ``.field`` names the offending field
    │   └── NetworkPolicyUnsupportedError  a network policy this host cannot enforce
    ├── NotFoundError            404
    │   ├── SessionNotFoundError      "session ses_x not found"
    │   ├── SnapshotNotFoundError     (the spec's ErrSnapshotNotFound)
    │   ├── VolumeNotFoundError
    │   ├── ImageNotFoundError
    │   ├── WorkspaceNotFoundError
    │   ├── ApiKeyNotFoundError
    │   ├── TemplateNotFoundError
    │   └── HostNotFoundError         a host id no host registered (or one removed)
    ├── MethodNotAllowedError    405  the route exists, not with this HTTP method
    ├── ConflictError            409  the resource is in a state that forbids the call
    ├── PayloadTooLargeError     413  the request body is over its limit (docs/limits.md)
    ├── SnapshotFailedError      409  (the spec's ErrSnapshotFailed) capture or restore failed
    ├── SessionFailedError       500  the VM could not be started or died
    ├── AuthenticationError      401  no key, or one that is unknown, revoked or expired
    ├── PermissionDeniedError    403  the key is valid but may not make this call (admin only)
    ├── QuotaExceededError       429  a workspace quota: "quota exceeded: NAME=LIMIT, in use N"
    ├── CapacityUnavailableError 503  the host cannot take the session now (retryable)
    ├── HostUnreachableError     503  the control plane cannot reach the host of a session
    ├── WaitTimeoutError              a client-side wait ran out (the work goes on)
    ├── ConnectionError               the server cannot be reached
    ├── CommandError                  ``ExecResult.check()`` on a non-zero exit
    └── InternalError            500  anything else, with the server's message

``ERROR_TABLE`` maps each wire code to its HTTP status and class; the server renders errors with
it and the SDK raises from it, so both sides agree by construction.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class TenkiError(Exception):
    """Root of every error tenki raises."""

    code: ClassVar[str] = "Internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, field: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class ValidationError(TenkiError):
    code = "ValidationError"
    status = 422

    def __init__(self, message: str, *, field: str | None = None, details: Any = None) -> None:
        if field and not message.startswith(field):
            message = f"{field}: {message}"
        super().__init__(message, field=field, details=details)


class NetworkPolicyUnsupportedError(ValidationError):
    """A create asks for a network policy (no outbound, an allow-list, inbound) on a host that
    cannot enforce one (the server needs root and nftables); ``.field`` names what asked."""

    code = "NetworkPolicyUnsupported"


class NotFoundError(TenkiError):
    code = "NotFound"
    status = 404


class SessionNotFoundError(NotFoundError):
    code = "SessionNotFound"


class SnapshotNotFoundError(NotFoundError):
    code = "SnapshotNotFound"


class VolumeNotFoundError(NotFoundError):
    code = "VolumeNotFound"


class ImageNotFoundError(NotFoundError):
    code = "ImageNotFound"


class WorkspaceNotFoundError(NotFoundError):
    code = "WorkspaceNotFound"


class ApiKeyNotFoundError(NotFoundError):
    code = "ApiKeyNotFound"


class TemplateNotFoundError(NotFoundError):
    code = "TemplateNotFound"


class HostNotFoundError(NotFoundError):
    code = "HostNotFound"


class MethodNotAllowedError(TenkiError):
    code = "MethodNotAllowed"
    status = 405


class ConflictError(TenkiError):
    code = "Conflict"
    status = 409


class PayloadTooLargeError(TenkiError):
    code = "PayloadTooLarge"
    status = 413


class SnapshotFailedError(TenkiError):
    code = "SnapshotFailed"
    status = 409


class SessionFailedError(TenkiError):
    code = "SessionFailed"
    status = 500


class AuthenticationError(TenkiError):
    code = "Unauthorized"
    status = 401


class PermissionDeniedError(TenkiError):
    code = "PermissionDenied"
    status = 403


class QuotaExceededError(TenkiError):
    """``details``: ``{"quota": NAME, "limit": N, "in_use": N}``."""

    code = "QuotaExceeded"
    status = 429


class CapacityUnavailableError(TenkiError):
    """The host has no room for the session now; retrying later may succeed."""

    code = "CapacityUnavailable"
    status = 503
    retryable: ClassVar[bool] = True


class HostUnreachableError(TenkiError):
    """A host worker did not answer (connection refused or reset, a timeout): the call may or
    may not have happened there; the host's heartbeats decide whether it is lost."""

    code = "HostUnreachable"
    status = 503
    retryable: ClassVar[bool] = True


class WaitTimeoutError(TenkiError):
    code = "WaitTimeout"
    status = 408


class ConnectionError(TenkiError):  # the SDK's name; shadows the builtin on purpose
    code = "Unavailable"
    status = 503


class CommandError(TenkiError):
    """A command exited non-zero and the caller asked for ``check()``; ``.result`` has it all."""

    code = "CommandFailed"
    status = 500

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class InternalError(TenkiError):
    code = "Internal"
    status = 500


ERROR_TABLE: dict[str, type[TenkiError]] = {
    cls.code: cls
    for cls in (
        ValidationError,
        NetworkPolicyUnsupportedError,
        NotFoundError,
        SessionNotFoundError,
        SnapshotNotFoundError,
        VolumeNotFoundError,
        ImageNotFoundError,
        WorkspaceNotFoundError,
        ApiKeyNotFoundError,
        TemplateNotFoundError,
        HostNotFoundError,
        MethodNotAllowedError,
        ConflictError,
        PayloadTooLargeError,
        SnapshotFailedError,
        SessionFailedError,
        AuthenticationError,
        PermissionDeniedError,
        QuotaExceededError,
        CapacityUnavailableError,
        HostUnreachableError,
        WaitTimeoutError,
        ConnectionError,
        CommandError,
        InternalError,
    )
}


#: Every ``error.code`` on the wire (``models.ErrorInfo.code``), built from the table so the
#: OpenAPI contract lists each code by construction. A ``StrEnum``: a member is its code
#: (``ErrorCode.NotFound == "NotFound"``, ``str()`` and JSON give the code itself). mypy
#: cannot see members made from a comprehension; nothing names one, so the ignore is harmless.
ErrorCode = StrEnum("ErrorCode", [(code, code) for code in ERROR_TABLE])  # type: ignore[misc]
ErrorCode.__doc__ = ("The code of an error, naming its class and HTTP status (WaitTimeout, "
                     "Unavailable and CommandFailed are raised by the SDK only).")


def error_from_body(status: int, body: Any) -> TenkiError:
    """Rebuild the typed error from a server response (the inverse of ``to_body``)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return InternalError(f"server answered HTTP {status}: {str(body)[:200]}")
    cls = ERROR_TABLE.get(str(err.get("code")), InternalError)
    message = str(err.get("message") or f"HTTP {status}")
    if cls is CommandError:
        return InternalError(message)
    exc = cls.__new__(cls)
    TenkiError.__init__(exc, message, field=err.get("field"), details=err.get("details"))
    return exc

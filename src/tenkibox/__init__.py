"""tenki: self-hosted sandbox VMs with memory snapshots.

    from tenkibox import Client

    with Client() as client:
        with client.create_and_wait(name="box") as session:
            print(session.shell("echo hi").check().stdout)

``tenkibox.Session`` is the SDK's session handle; the wire record it wraps is
``tenkibox.SessionRecord`` (``tenkibox.models.Session``).
"""

from __future__ import annotations

from . import errors, models
from ._version import __version__
from .client import (
    AsyncClient,
    AsyncFiles,
    AsyncProcess,
    AsyncSession,
    Client,
    ExecResult,
    Files,
    Process,
    Session,
)
from .errors import (
    ApiKeyNotFoundError,
    AuthenticationError,
    CapacityUnavailableError,
    CommandError,
    ConflictError,
    ConnectionError,
    ImageNotFoundError,
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    SessionFailedError,
    SessionNotFoundError,
    SnapshotFailedError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
    TenkiError,
    ValidationError,
    VolumeNotFoundError,
    WaitTimeoutError,
    WorkspaceNotFoundError,
)
from .models import (
    ErrorBody,
    ErrorInfo,
    ExecRequest,
    FileWritten,
    Image,
    PortExposure,
    ProcessEvent,
    ProcessInfo,
    ServerInfo,
    SessionCreate,
    SessionState,
    Snapshot,
    SnapshotCreate,
    SnapshotState,
    Volume,
    VolumeAttach,
    VolumeAttachment,
    VolumeCreate,
    VolumeMount,
    VolumeState,
)
from .models import Session as SessionRecord

__all__ = [
    "ApiKeyNotFoundError",
    "AsyncClient",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncSession",
    "AuthenticationError",
    "CapacityUnavailableError",
    "Client",
    "CommandError",
    "ConflictError",
    "ConnectionError",
    "ErrorBody",
    "ErrorInfo",
    "ExecRequest",
    "ExecResult",
    "FileWritten",
    "Files",
    "Image",
    "ImageNotFoundError",
    "InternalError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PortExposure",
    "Process",
    "ProcessEvent",
    "ProcessInfo",
    "QuotaExceededError",
    "ServerInfo",
    "Session",
    "SessionCreate",
    "SessionFailedError",
    "SessionNotFoundError",
    "SessionRecord",
    "SessionState",
    "Snapshot",
    "SnapshotCreate",
    "SnapshotFailedError",
    "SnapshotNotFoundError",
    "SnapshotState",
    "TemplateNotFoundError",
    "TenkiError",
    "ValidationError",
    "Volume",
    "VolumeAttach",
    "VolumeAttachment",
    "VolumeCreate",
    "VolumeMount",
    "VolumeNotFoundError",
    "VolumeState",
    "WaitTimeoutError",
    "WorkspaceNotFoundError",
    "__version__",
    "errors",
    "models",
]

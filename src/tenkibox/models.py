"""Wire models: the one contract between the server, the SDK and the CLI.

Every request body and response record of the REST API is defined here and nowhere else.
Times are UTC ``datetime``s (RFC 3339 on the wire); durations are seconds (float); sizes bytes.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CPU_MIN, CPU_MAX = 1, 16
MEMORY_MB_MIN, MEMORY_MB_MAX = 512, 65536
DEFAULT_CPU = 2
DEFAULT_MEMORY_MB = 4096
DEFAULT_IMAGE_ID = "sandbox"
VOLUME_MIN_BYTES = 1 << 20
VOLUME_MAX_BYTES = 100 << 30

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class SessionState(str, Enum):
    CREATING = "CREATING"
    READY = "READY"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"


#: States in which the VM exists and can be driven.
LIVE_SESSION_STATES = frozenset({SessionState.READY, SessionState.RUNNING})
FINAL_SESSION_STATES = frozenset({SessionState.TERMINATED, SessionState.FAILED})


class SnapshotState(str, Enum):
    CREATING = "CREATING"
    READY = "READY"
    FAILED = "FAILED"
    DELETING = "DELETING"
    DELETED = "DELETED"


class VolumeState(str, Enum):
    AVAILABLE = "AVAILABLE"
    IN_USE = "IN_USE"
    DELETING = "DELETING"
    DELETED = "DELETED"


class VolumeMount(_Model):
    """A volume to attach at create time: ``VOL:/mount/path[:ro]`` on the CLI."""

    volume_id: str
    path: str
    read_only: bool = False

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must be an absolute path")
        if v == "/" or "\0" in v or "/../" in v + "/":
            raise ValueError("must be an absolute path below /, without '..'")
        return v.rstrip("/")


class VolumeAttachment(_Model):
    volume_id: str
    path: str
    read_only: bool = False


class SessionCreate(_Model):
    name: str | None = Field(default=None, max_length=128)
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX)
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX)
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    max_duration_s: float | None = Field(default=None, gt=0)
    snapshot_id: str | None = None
    base_image_id: str | None = None
    volumes: list[VolumeMount] = Field(default_factory=list)

    @field_validator("env")
    @classmethod
    def _env_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _ENV_KEY.match(key):
                raise ValueError(f"invalid variable name {key!r}")
        return v


class Session(_Model):
    id: str
    name: str | None = None
    state: SessionState
    state_reason: str | None = None
    cpu: int
    memory_mb: int
    base_image_id: str
    snapshot_id: str | None = None
    env_keys: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    volumes: list[VolumeAttachment] = Field(default_factory=list)
    created_at: datetime
    ready_at: datetime | None = None
    expires_at: datetime | None = None
    terminated_at: datetime | None = None


class SnapshotCreate(_Model):
    session_id: str
    name: str | None = Field(default=None, max_length=128)
    expires_at: datetime | None = None
    workspace_id: str | None = None


class Snapshot(_Model):
    id: str
    session_id: str
    workspace_id: str | None = None
    name: str | None = None
    state: SnapshotState
    state_reason: str | None = None
    size_bytes: int = 0
    compressed_bytes: int = 0
    memory_bytes: int = 0
    base_image_id: str
    cpu: int
    memory_mb: int
    created_at: datetime
    ready_at: datetime | None = None
    expires_at: datetime | None = None
    deleted_at: datetime | None = None


class ExecRequest(_Model):
    """Start a process. Give ``argv``, or ``command`` for ``/bin/sh -c``."""

    argv: list[str] | None = None
    command: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    stdin: bool = False
    stdin_data: str | None = Field(default=None, description="base64 bytes written then closed")


class ProcessInfo(_Model):
    process_id: str
    session_id: str
    pid: int | None = None


class ProcessEvent(_Model):
    """One line of a process's NDJSON event stream."""

    type: Literal["stdout", "stderr", "exit", "error"]
    data: str | None = Field(default=None, description="base64 bytes, for stdout/stderr")
    exit_code: int | None = None
    timed_out: bool = False
    message: str | None = None


class FileWritten(_Model):
    path: str
    size_bytes: int


class Image(_Model):
    id: str
    size_bytes: int
    created_at: datetime
    kernel: str | None = None
    packages: list[str] = Field(default_factory=list)


class VolumeCreate(_Model):
    name: str = Field(max_length=128)
    size_bytes: int = Field(ge=VOLUME_MIN_BYTES, le=VOLUME_MAX_BYTES)


class VolumeAttach(_Model):
    volume_id: str
    path: str
    read_only: bool = False

    _absolute = field_validator("path")(VolumeMount._absolute.__func__)  # type: ignore[attr-defined]


class Volume(_Model):
    id: str
    name: str
    size_bytes: int
    state: VolumeState
    session_id: str | None = None
    path: str | None = None
    read_only: bool = False
    created_at: datetime


class ServerInfo(_Model):
    version: str
    pid: int
    home: str
    accelerator: str


class ErrorInfo(_Model):
    code: str
    message: str
    field: str | None = None


class ErrorBody(_Model):
    error: ErrorInfo

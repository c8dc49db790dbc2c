"""Database tables (SQLAlchemy 2 ORM). Schema changes go through migrations/versions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stored naive in UTC (SQLite has no time zones), handed out aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    cpu: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    base_image_id: Mapped[str] = mapped_column(String(64))
    snapshot_id: Mapped[str | None] = mapped_column(String(40))
    template_id: Mapped[str | None] = mapped_column(String(40))
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    volumes: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    machine: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    disk_chain: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: egress policy and inbound (``host.api.NetworkSpec`` JSON; None: the defaults)
    network: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: the host that runs (or last ran) its VM: written before the host is asked to boot, so
    #: the record alone decides which host owns the VM (fencing)
    host_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    terminated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PortExposureRow(Base):
    """A port of a session's guest reachable through the host's preview proxy."""

    __tablename__ = "port_exposures"
    __table_args__ = (UniqueConstraint("session_id", "port",
                                       name="uq_port_exposures_session_port"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(40), index=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    port: Mapped[int] = mapped_column(Integer)
    #: the unguessable part of the URL (a capability for this one port, revoked with it)
    token: Mapped[str] = mapped_column(String(64))
    #: the host's listening port that serves this exposure (None until it listens)
    host_port: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SnapshotRow(Base):
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(40), index=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    #: a template's golden snapshot: the template owns it (not listed, not deleted by users)
    template_id: Mapped[str | None] = mapped_column(String(40))
    #: USER, PAUSE (owned by its session while it is paused) or TEMPLATE (``models.SnapshotType``)
    type: Mapped[str] = mapped_column(String(16), default="USER")
    name: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    compressed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    base_image_id: Mapped[str] = mapped_column(String(64))
    cpu: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    machine: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    disk_chain: Mapped[list[str]] = mapped_column(JSON, default=list)
    files: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class VolumeRow(Base):
    __tablename__ = "volumes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    session_id: Mapped[str | None] = mapped_column(String(40))
    path: Mapped[str | None] = mapped_column(Text)
    read_only: Mapped[int] = mapped_column(Integer, default=0)
    #: the host holding its file (a volume never moves; its sessions are placed there)
    host_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class HostRow(Base):
    """A machine that runs VMs for the control plane (``control/hosts.py`` owns it): the
    embedded host ``local`` (no address), or a host worker that registered and heartbeats."""

    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: where the control plane calls the worker (None: the embedded host, in-process)
    address: Mapped[str | None] = mapped_column(Text)
    #: the bearer token the worker accepts from the control plane (never shown)
    secret: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_total_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_reserve_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    overcommit: Mapped[float] = mapped_column(Float, default=1.0)
    disk_total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    accelerator: Mapped[str] = mapped_column(String(16), default="tcg")
    qemu_version: Mapped[str] = mapped_column(String(64), default="")
    cpu_model: Mapped[str] = mapped_column(String(128), default="")
    network_enforced: Mapped[bool] = mapped_column(Boolean, default=False)
    #: the last heartbeat's figures
    memory_used_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    tmpfs_used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    tmpfs_total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WorkspaceRow(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    quotas: Mapped[dict[str, int | None]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKeyRow(Base):
    """Only the SHA-256 of the secret is kept; a call is matched by that hash."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(40), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    workspace_id: Mapped[str | None] = mapped_column(String(40), index=True)
    key_prefix: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    object_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(64))


class TemplateRow(Base):
    __tablename__ = "templates"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    build_env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BuildRow(Base):
    __tablename__ = "template_builds"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    template_id: Mapped[str] = mapped_column(String(40), index=True)
    workspace_id: Mapped[str] = mapped_column(String(40), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    failed_step: Mapped[str | None] = mapped_column(String(32))
    log: Mapped[str] = mapped_column(Text, default="")
    session_id: Mapped[str | None] = mapped_column(String(40))
    snapshot_id: Mapped[str | None] = mapped_column(String(40))
    #: what it was made from: the template's fields (hash) and its base (image digest, base
    #: template build or snapshot id)
    spec_hash: Mapped[str | None] = mapped_column(String(64))
    base_ref: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

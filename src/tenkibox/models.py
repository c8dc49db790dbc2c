"""Wire models: the one contract between the server, the SDK and the CLI.

Every request body and response record of the REST API is defined here and nowhere else.
Times are UTC ``datetime``s (RFC 3339 on the wire); durations are seconds (float); sizes bytes.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import limits
from .control import egress as _egress

CPU_MIN, CPU_MAX = 1, 16
MEMORY_MB_MIN, MEMORY_MB_MAX = 512, 65536
DEFAULT_CPU = 2
DEFAULT_MEMORY_MB = 4096
DEFAULT_IMAGE_ID = "sandbox"
VOLUME_MIN_BYTES = 1 << 20
VOLUME_MAX_BYTES = 100 << 30

_ENV_KEY = limits.ENV_KEY_RE


# -- field types with limits (see tenkibox.limits and docs/limits.md) ---------------------------
#
# Every string of a request model is bounded and free of NUL; each failure is a ValueError
# that pydantic reports with the field's location (the server answers 422 naming the field).

_C0_ALLOWED = frozenset("\t\n")


def _short(text: str, n: int = 40) -> str:
    """``repr`` of user input, cut to a readable length for an error message."""
    return repr(text if len(text) <= n else text[:n] + "...")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _no_nul(v: str) -> str:
    """No NUL, and valid Unicode (JSON can carry lone surrogates such as ``"\\ud800"``)."""
    if "\0" in v:
        raise ValueError("must not contain NUL characters")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (found a lone surrogate)") from None
    return v


def _no_controls(v: str, allowed: frozenset[str] = _C0_ALLOWED) -> str:
    """No C0 control characters (but ``allowed``: tab and newline), DEL or C1 controls."""
    for ch in v:
        o = ord(ch)
        if (o < 0x20 and ch not in allowed) or 0x7F <= o <= 0x9F:
            raise ValueError(f"must not contain control characters (found {ch!r})")
    return v


def _max_bytes(n: int) -> Callable[[str], str]:
    def check(v: str) -> str:
        size = _utf8_len(v)
        if size > n:
            raise ValueError(f"must be at most {n} bytes (UTF-8), got {size}")
        return v

    return check


def _check_id(v: str) -> str:
    if len(v) > limits.ID_MAX_CHARS:
        raise ValueError(f"must be at most {limits.ID_MAX_CHARS} characters, got {len(v)}")
    if not limits.ID_RE.match(v):
        raise ValueError(
            f"invalid id {_short(v)} (letters, digits, '_', '.', '-'; starting with a letter "
            "or digit)"
        )
    return v


def _map_limits(key_check: Callable[[str], str] | None = None) -> Callable[[Any], Any]:
    """Checks a map before its values are validated: entry count first (cheap), then keys."""

    def check(v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # pydantic reports the type
        if len(v) > limits.MAP_MAX_ENTRIES:
            raise ValueError(f"must have at most {limits.MAP_MAX_ENTRIES} entries, got {len(v)}")
        for key in v:
            if not isinstance(key, str):
                continue
            if not key:
                raise ValueError("keys must not be empty")
            if len(key) > limits.KEY_MAX_CHARS:
                raise ValueError(
                    f"key {_short(key)} is longer than {limits.KEY_MAX_CHARS} characters"
                )
            try:
                _no_nul(key)
                _no_controls(key, allowed=frozenset())
                if key_check is not None:
                    key_check(key)
            except ValueError as exc:
                raise ValueError(f"key {_short(key)}: {exc}") from None
        return v

    return check


def _env_key(key: str) -> str:
    if not _ENV_KEY.match(key):
        raise ValueError("invalid variable name (letters, digits and _, not starting with a digit)")
    return key


def _argv_total(v: list[str] | None) -> list[str] | None:
    if v is not None:
        total = sum(_utf8_len(a) for a in v)
        if total > limits.ARGV_MAX_TOTAL_BYTES:
            raise ValueError(
                f"must be at most {limits.ARGV_MAX_TOTAL_BYTES} bytes in all (UTF-8), got {total}"
            )
    return v


def _base64(v: str) -> str:
    if len(v) > limits.STDIN_DATA_MAX_CHARS:
        raise ValueError(
            f"must be at most {limits.STDIN_DATA_MAX_BYTES} bytes once decoded "
            f"({limits.STDIN_DATA_MAX_CHARS} base64 characters), got {len(v)} characters"
        )
    if not v.isascii():
        raise ValueError("invalid base64: only ASCII characters are allowed")
    try:
        binascii.a2b_base64(v.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {str(exc).lower()}") from None
    return v


def _absolute_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError("must be an absolute path")
    if v == "/" or "/../" in v + "/":
        raise ValueError("must be an absolute path below /, without '..'")
    return v.rstrip("/")


#: A session, snapshot or volume name: 1..64 characters, no NUL or control characters.
Name = Annotated[
    str,
    Field(min_length=limits.NAME_MIN_CHARS, max_length=limits.NAME_MAX_CHARS),
    AfterValidator(_no_nul),
    AfterValidator(_no_controls),
]
#: ``session_id``, ``snapshot_id``, ``volume_id``, ``base_image_id``, ``workspace_id``.
Id = Annotated[str, AfterValidator(_check_id)]
#: A value of ``metadata`` or ``env``: at most 8 KiB, no NUL.
MapValue = Annotated[
    str, AfterValidator(_no_nul), AfterValidator(_max_bytes(limits.VALUE_MAX_BYTES))
]
#: ``metadata``: at most 64 entries; keys 1..128 characters without control characters (not
#: even tab or newline).
Metadata = Annotated[dict[str, MapValue], BeforeValidator(_map_limits())]
#: ``env``: at most 64 entries; keys are variable names of at most 128 characters.
Env = Annotated[dict[str, MapValue], BeforeValidator(_map_limits(_env_key))]
#: One argument of ``argv``: at most 128 KiB, no NUL.
Arg = Annotated[str, AfterValidator(_no_nul), AfterValidator(_max_bytes(limits.ARG_MAX_BYTES))]
#: ``argv``: at most 1024 arguments, at most 1 MiB in all.
Argv = Annotated[list[Arg], Field(max_length=limits.ARGV_MAX_ITEMS), AfterValidator(_argv_total)]
#: ``command`` (for ``/bin/sh -c``): at most 128 KiB, no NUL.
Command = Annotated[
    str, AfterValidator(_no_nul), AfterValidator(_max_bytes(limits.COMMAND_MAX_BYTES))
]
#: A path in the guest (``cwd``): at most 4096 bytes, no NUL.
GuestPath = Annotated[
    str, AfterValidator(_no_nul), AfterValidator(_max_bytes(limits.PATH_MAX_BYTES))
]
#: A mount point: a :data:`GuestPath` that is absolute, below ``/``, without ``..``.
MountPath = Annotated[GuestPath, AfterValidator(_absolute_path)]
#: ``stdin_data``: base64, at most 8 MiB once decoded.
Base64Data = Annotated[str, AfterValidator(_base64)]
#: Seconds: positive and finite, at most ten years.
Duration = Annotated[float, Field(gt=0, le=limits.DURATION_MAX_S, allow_inf_nan=False)]


def _at_most(n: int, what: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, list):
            _egress.count(v, n, what)
        return v

    return check


#: One entry of ``egress.allow_domains`` (``control.egress.domain``): ``pypi.org``,
#: ``*.example.org``; lower-cased, a trailing dot dropped.
AllowDomain = Annotated[str, AfterValidator(_egress.domain)]
#: One entry of ``egress.allow_cidrs`` (``control.egress.cidr``): an IPv4 network.
AllowCidr = Annotated[str, AfterValidator(_egress.cidr)]


class _Model(BaseModel):
    """A request: unknown fields are refused (a typo is named, not ignored)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class _Answer(BaseModel):
    """An answer: fields a newer server adds are ignored, so older clients keep working."""

    model_config = ConfigDict(extra="ignore", use_enum_values=False)


class SessionState(str, Enum):
    CREATING = "CREATING"
    READY = "READY"
    RUNNING = "RUNNING"
    PAUSING = "PAUSING"
    PAUSED = "PAUSED"
    RESUMING = "RESUMING"
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


class SnapshotType(str, Enum):
    """USER: taken by a user; PAUSE: a paused session's memory and disk (owned by that session,
    released when it is resumed or terminated); TEMPLATE: a template's or an image's golden
    snapshot (owned by the server)."""

    USER = "USER"
    PAUSE = "PAUSE"
    TEMPLATE = "TEMPLATE"


class VolumeState(str, Enum):
    AVAILABLE = "AVAILABLE"
    IN_USE = "IN_USE"
    DELETING = "DELETING"
    DELETED = "DELETED"


class VolumeMount(_Model):
    """A volume to attach at create time: ``VOL:/mount/path[:ro]`` on the CLI."""

    volume_id: Id
    path: MountPath
    read_only: bool = False


class VolumeAttachment(_Answer):
    volume_id: str
    path: str
    read_only: bool = False


class EgressAllowList(_Model):
    """Where a session may open connections: only these names and networks (DNS included: a
    name outside the list does not resolve), and nothing else. Rules: ``control/egress.py``."""

    allow_domains: Annotated[
        list[AllowDomain], BeforeValidator(_at_most(limits.EGRESS_DOMAINS_MAX, "names")),
        AfterValidator(_egress.dedupe),
    ] = Field(default_factory=list, description=(
        f"at most {limits.EGRESS_DOMAINS_MAX}: exact names (pypi.org) or *. wildcards "
        "(*.example.org: any name below it); lower-cased"))
    allow_cidrs: Annotated[
        list[AllowCidr], BeforeValidator(_at_most(limits.EGRESS_CIDRS_MAX, "networks")),
        AfterValidator(_egress.dedupe),
    ] = Field(default_factory=list, description=(
        f"at most {limits.EGRESS_CIDRS_MAX} IPv4 networks (10.0.0.0/8; an address alone is "
        "/32); no host bits set, no IPv6"))


class SessionEgress(_Answer):
    """A session's egress policy, fixed at create: ``outbound`` false, no connection out at
    all; else with neither list any public address (never the host's, other guests', private,
    loopback or link-local ones), with a list only what it names."""

    outbound: bool = True
    allow_domains: list[str] = Field(default_factory=list)
    allow_cidrs: list[str] = Field(default_factory=list)


class SessionCreate(_Model):
    name: Name | None = None
    template_id: Id | None = Field(
        default=None, description="restore the template's latest READY build (golden snapshot)")
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX)
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX)
    env: Env = Field(default_factory=dict)
    metadata: Metadata = Field(default_factory=dict)
    max_duration_s: Duration | None = None
    snapshot_id: Id | None = None
    base_image_id: Id | None = None
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=limits.VOLUME_MOUNTS_MAX)
    cold_boot: bool = Field(
        default=False, description="boot the image instead of restoring its golden snapshot")
    allow_inbound: bool = Field(
        default=False, description="ports of the session may be exposed (needs a host that "
        "enforces network policies)")
    allow_outbound: bool = Field(
        default=True, description="false: the session opens no connection out at all")
    egress: EgressAllowList | None = Field(
        default=None, description="an outbound allow-list (with allow_outbound true); a "
        "restore or a template's session gets the policy of its own create, not its source's")

    @field_validator("egress")
    @classmethod
    def _egress_needs_outbound(cls, v: EgressAllowList | None,
                               info: ValidationInfo) -> EgressAllowList | None:
        if v is not None:
            why = _egress.contradiction(info.data.get("allow_outbound", True),
                                        v.allow_domains, v.allow_cidrs)
            if why:
                raise ValueError(why)
        return v


class Session(_Answer):
    id: str
    workspace_id: str
    name: str | None = None
    template_id: str | None = None
    state: SessionState
    state_reason: str | None = None
    cpu: int
    memory_mb: int
    base_image_id: str
    snapshot_id: str | None = None
    env_keys: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    volumes: list[VolumeAttachment] = Field(default_factory=list)
    allow_inbound: bool = False
    egress: SessionEgress = Field(default_factory=SessionEgress)
    created_at: datetime
    ready_at: datetime | None = None
    expires_at: datetime | None = None
    terminated_at: datetime | None = None


class SessionUpdate(_Model):
    """Fields left out stay as they are. ``metadata`` replaces the whole map."""

    name: Name | None = None
    metadata: Metadata | None = None


class SessionExtend(_Model):
    seconds: Duration = Field(description="added to the session's expiry (from now if it has "
                              "none, so an unbounded session gets one)")


PORT_MIN, PORT_MAX = 1, 65535


class PortExpose(_Model):
    port: int = Field(ge=PORT_MIN, le=PORT_MAX, description="the guest's TCP port")
    ttl_s: Duration | None = Field(
        default=None, description="seconds until the exposure ends (none: until it is "
        "unexposed or the session stops running); exposing an exposed port again with a ttl "
        "moves its expiry")


class PortExposure(_Answer):
    """A port of a session's guest reachable through the server's preview proxy. ``url``
    carries the port's token (``?tenki_token=``); an API key of the workspace
    (``Authorization: Bearer tk_...``) also lets a request in."""

    session_id: str
    port: int
    url: str
    expires_at: datetime | None = None
    created_at: datetime


class SnapshotCreate(_Model):
    session_id: Id
    name: Name | None = None
    expires_at: datetime | None = None
    workspace_id: Id | None = Field(
        default=None, description="set from the API key; if given, it must be the key's")


class SnapshotUpdate(_Model):
    """Fields left out stay as they are; ``expires_at: null`` removes the expiry."""

    name: Name | None = None
    expires_at: datetime | None = None


class Snapshot(_Answer):
    id: str
    session_id: str
    workspace_id: str | None = None
    name: str | None = None
    type: SnapshotType = SnapshotType.USER
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

    argv: Argv | None = None
    command: Command | None = None
    env: Env = Field(default_factory=dict)
    cwd: GuestPath | None = None
    timeout_s: Duration | None = None
    stdin: bool = False
    stdin_data: Base64Data | None = Field(
        default=None, description="base64 bytes written then closed"
    )
    user: Literal["root", "tenki"] = Field(
        default="root", description="who runs it: root, or the guest user tenki (HOME "
        "/home/tenki, where it also starts unless cwd says otherwise)")


class ProcessInfo(_Answer):
    process_id: str
    session_id: str
    pid: int | None = None


class ProcessEvent(_Answer):
    """One line of a process's NDJSON event stream: ``stdout``/``stderr`` events, then one
    ``exit`` or ``error`` (the output is no longer available, or some was lost: ``message`` says
    why, with the bytes delivered before and, when known, lost, and the exit code)."""

    type: Literal["stdout", "stderr", "exit", "error"]
    data: str | None = Field(default=None, description="base64 bytes, for stdout/stderr")
    exit_code: int | None = None
    timed_out: bool = False
    message: str | None = None
    delivered_bytes: int | None = Field(
        default=None, description="error: output bytes delivered before the stream ended")
    lost_bytes: int | None = Field(
        default=None, description="error: output bytes lost (not delivered) before that")


class FileWritten(_Answer):
    path: str
    size_bytes: int


class Image(_Answer):
    id: str
    size_bytes: int
    created_at: datetime
    kernel: str | None = None
    packages: list[str] = Field(default_factory=list)


class VolumeCreate(_Model):
    name: Name
    size_bytes: int = Field(ge=VOLUME_MIN_BYTES, le=VOLUME_MAX_BYTES)


class VolumeUpdate(_Model):
    name: Name


class VolumeAttach(_Model):
    volume_id: Id
    path: MountPath
    read_only: bool = False


class Volume(_Answer):
    id: str
    workspace_id: str
    name: str
    size_bytes: int
    state: VolumeState
    session_id: str | None = None
    path: str | None = None
    read_only: bool = False
    created_at: datetime


class ServerInfo(_Answer):
    version: str
    pid: int
    home: str
    accelerator: str
    grpc_endpoint: str | None = Field(
        default=None, description="Tenki's gRPC wire (the official SDKs' TENKI_API_ENDPOINT)")


class ErrorInfo(_Answer):
    code: str
    message: str
    field: str | None = None
    details: Any = Field(
        default=None, description="facts of some errors: a quota's name, limit and use; a "
        "host's promised and capacity memory; what a workspace still holds")


class ErrorBody(_Answer):
    error: ErrorInfo


class DamagedSnapshot(_Answer):
    snapshot_id: str
    problems: list[str]


class StoreReport(_Answer):
    """``tenki admin verify``: every stored artifact re-read against its digest."""

    ok: bool
    checked: int = Field(description="artifacts checked (each read in full)")
    damaged: list[DamagedSnapshot] = Field(default_factory=list)
    bad_artifacts: dict[str, str] = Field(default_factory=dict,
                                          description="digest -> what is wrong with it")
    unowned: list[str] = Field(default_factory=list, description="files no record owns")
    repaired: bool = False


# -- workspaces, API keys, audit, host capacity -------------------------------------------------

#: The quotas a workspace can have; a missing or null value is no limit.
QUOTA_NAMES = ("max_concurrent_sessions", "max_memory_mib", "max_snapshots", "max_volumes",
               "max_stored_bytes")


class Quotas(_Model):
    """Per-workspace limits; ``None`` is no limit."""

    max_concurrent_sessions: int | None = Field(default=None, ge=0, le=1_000_000)
    max_memory_mib: int | None = Field(default=None, ge=0, le=1 << 40)
    max_snapshots: int | None = Field(default=None, ge=0, le=1_000_000_000)
    max_volumes: int | None = Field(default=None, ge=0, le=1_000_000_000)
    max_stored_bytes: int | None = Field(default=None, ge=0, le=1 << 62)


class Workspace(_Answer):
    id: str
    name: str
    quotas: Quotas = Field(default_factory=Quotas)
    created_at: datetime
    updated_at: datetime


class WorkspaceCreate(_Model):
    name: Name
    quotas: Quotas = Field(default_factory=Quotas)


class WorkspaceUpdate(_Model):
    """Only the fields given change; in ``quotas``, only the quotas given (null removes one)."""

    name: Name | None = None
    quotas: Quotas | None = None


class Usage(_Answer):
    """What a workspace holds now, against its quotas (same names, without ``max_``)."""

    workspace_id: str
    concurrent_sessions: int
    memory_mib: int
    snapshots: int
    volumes: int
    stored_bytes: int
    quotas: Quotas


class ApiKeyCreate(_Model):
    workspace_id: Id
    name: Name | None = None
    expires_at: datetime | None = None
    admin: bool = Field(default=False, description="may manage workspaces, keys and the server")


class ApiKey(_Answer):
    """A key's record; the secret itself is shown once, by ``ApiKeyCreated``."""

    id: str
    workspace_id: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str | None = None
    admin: bool = False
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="the secret (tk_...): shown only in this answer")


class AuditEntry(_Answer):
    id: int
    at: datetime
    workspace_id: str | None = None
    key_prefix: str | None = None
    action: str = Field(description="the operation, e.g. createSession")
    method: str
    path: str
    object_id: str | None = None
    status: int = Field(description="the HTTP status of the answer")
    outcome: str = Field(description="ok, or the error code")


class HostStatus(_Answer):
    """This machine's capacity, as the admission check counts it."""

    host_id: str
    memory_total_mib: int = Field(description="RAM of the host (or as configured)")
    memory_reserve_mib: int = Field(description="kept for the host itself")
    overcommit: float = Field(description="promised guest memory is divided by this")
    memory_capacity_mib: int = Field(description="(total - reserve) * overcommit")
    memory_promised_mib: int = Field(description="sum of the live guests' memory")
    memory_used_mib: int = Field(description="what the guests' processes really hold (PSS)")
    sessions: int
    cpus: int
    accelerator: str
    network_enforced: bool = Field(
        default=False, description="whether this host enforces egress policies and exposes "
        "ports (root and nftables: guest networks in namespaces); otherwise only the default "
        "policy is accepted")
    tmpfs_used_bytes: int = Field(
        default=0, description="bytes in use on the tmpfs of the VMs' run directories (guest "
        "RAM of booted VMs, capture staging; other users of that tmpfs count too)")
    tmpfs_total_bytes: int = Field(default=0, description="the size of that tmpfs")


# -- templates ------------------------------------------------------------------------------------

#: a setup script: at most 1 MiB
SETUP_SCRIPT_MAX_BYTES = 1 << 20
Script = Annotated[str, AfterValidator(_no_nul), AfterValidator(_max_bytes(SETUP_SCRIPT_MAX_BYTES))]
Tag = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_controls)]


class ReadyCheck(_Model):
    """When the started command is ready: exactly one of ``port`` (a TCP port on the guest's
    localhost accepts), ``http_url`` (a URL on the guest answers ``http_status``) or
    ``command`` (exits 0); tried until ``timeout_s``."""

    port: int | None = Field(default=None, ge=1, le=65535)
    http_url: Annotated[str, Field(max_length=2048)] | None = None
    http_status: int = Field(default=200, ge=100, le=599)
    command: Command | None = None
    timeout_s: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _exactly_one(self) -> ReadyCheck:
        given = [k for k in ("port", "http_url", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of port, http_url, command; got "
                             + (", ".join(given) or "none"))
        return self


class TemplateBase(_Model):
    """What a build starts from: an image (default ``sandbox``), another template's latest
    READY build, or a snapshot."""

    image: Id | None = None
    template_id: Id | None = None
    snapshot_id: Id | None = None


#: a package name for apt, pip or npm: no blanks, no shell syntax, not an option
Package = Annotated[str, Field(min_length=1, max_length=214,
                               pattern=r"^[A-Za-z0-9@][A-Za-z0-9@._+:/<>=!~^*-]*$")]


class AptStep(_Model):
    packages: list[Package] = Field(min_length=1, max_length=256)


class PipStep(_Model):
    packages: list[Package] = Field(min_length=1, max_length=256)


class NpmStep(_Model):
    packages: list[Package] = Field(min_length=1, max_length=256)


class WriteFileStep(_Model):
    path: MountPath
    content: Script
    mode: int = Field(default=0o644, ge=0, le=0o7777)


class MkdirStep(_Model):
    path: MountPath


class Step(_Model):
    """One step of a template spec: exactly one of ``run``, ``apt``, ``pip``, ``npm``,
    ``write_file``, ``mkdir``; optionally named."""

    name: Name | None = None
    run: Command | None = None
    apt: AptStep | None = None
    pip: PipStep | None = None
    npm: NpmStep | None = None
    write_file: WriteFileStep | None = None
    mkdir: MkdirStep | None = None

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(STEP_KINDS)}; got "
                             + (", ".join(given) or "none"))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


STEP_KINDS = ("run", "apt", "pip", "npm", "write_file", "mkdir")


class Runtime(_Model):
    start_cmd: Command | None = None
    ready_when: ReadyCheck | None = None
    env: Env = Field(default_factory=dict)


class Resources(_Model):
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX)
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX)


class TemplateSpec(_Model):
    """A declarative template (``tenki sandbox template create --spec FILE``, JSON or YAML):
    the steps become the setup script, ``runtime`` the start command, its readiness check and
    env. Unknown fields are refused, naming their path."""

    spec_version: Literal["tenki.template.v1"]
    base: TemplateBase = Field(default_factory=TemplateBase)
    env: Env = Field(default_factory=dict)
    build_env: Env = Field(default_factory=dict)
    steps: list[Step] = Field(default_factory=list, max_length=256)
    runtime: Runtime = Field(default_factory=Runtime)
    resources: Resources = Field(default_factory=Resources)
    tags: list[Tag] = Field(default_factory=list, max_length=32)


class TemplateCreate(_Model):
    name: Name
    spec: TemplateSpec | None = Field(
        default=None, description="a declarative spec instead of the fields below")
    base: TemplateBase = Field(default_factory=TemplateBase)
    setup_script: Script | None = None
    start_cmd: Command | None = None
    ready_when: ReadyCheck | None = None
    env: Env = Field(default_factory=dict)
    build_env: Env = Field(default_factory=dict,
                           description="for the build only (secrets): never in a session")
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX)
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX)
    tags: list[Tag] = Field(default_factory=list, max_length=32)


class TemplateUpdate(_Model):
    """Only the fields given change; a build picks the change up. ``name``, ``cpu`` and
    ``memory_mb`` cannot be removed (null is refused); null removes any other field."""

    name: Name | None = None
    base: TemplateBase | None = None
    setup_script: Script | None = None
    start_cmd: Command | None = None
    ready_when: ReadyCheck | None = None
    env: Env | None = None
    build_env: Env | None = None
    cpu: int | None = Field(default=None, ge=CPU_MIN, le=CPU_MAX)
    memory_mb: int | None = Field(default=None, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX)
    tags: list[Tag] | None = Field(default=None, max_length=32)

    @model_validator(mode="after")
    def _required_stay(self) -> TemplateUpdate:
        for name in ("name", "cpu", "memory_mb"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be removed (null); give a value")
        return self


class BuildState(str, Enum):
    PENDING = "PENDING"
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"


class TemplateBuild(_Answer):
    id: str
    template_id: str
    workspace_id: str
    version: int
    state: BuildState
    error: str | None = Field(default=None, description="FAILED: the step and the reason")
    failed_step: str | None = None
    log_tail: str = ""
    log_bytes: int = 0
    snapshot_id: str | None = Field(default=None, description="READY: the golden snapshot")
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None


class Template(_Answer):
    id: str
    workspace_id: str
    name: str
    base: TemplateBase
    setup_script: str | None = None
    start_cmd: str | None = None
    ready_when: ReadyCheck | None = None
    env: dict[str, str] = Field(default_factory=dict)
    build_env_keys: list[str] = Field(default_factory=list)
    cpu: int
    memory_mb: int
    tags: list[str] = Field(default_factory=list)
    latest_build: TemplateBuild | None = Field(
        default=None, description="the latest READY build (what a session starts from)")
    spec: TemplateSpec | None = Field(
        default=None, description="the declarative spec it was created from, if any (an "
        "update of its fields drops it)")
    created_at: datetime
    updated_at: datetime

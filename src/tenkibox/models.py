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
from .errors import ErrorCode

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
    """CREATING (booting or restoring) -> READY, RUNNING while a process runs; PAUSING ->
    PAUSED (no VM, its memory and disk kept in a PAUSE snapshot) -> RESUMING -> READY;
    TERMINATING -> TERMINATED; FAILED when the VM could not start or died (``state_reason``
    says why)."""

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
    """CREATING (being captured) -> READY (every artifact stored and verified) or FAILED;
    deleted (or expired): DELETING -> DELETED."""

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
    """AVAILABLE <-> IN_USE (attached to a session); deleted: DELETING -> DELETED."""

    AVAILABLE = "AVAILABLE"
    IN_USE = "IN_USE"
    DELETING = "DELETING"
    DELETED = "DELETED"


_MOUNT_PATH = "absolute, below /, without '..', at most 4096 bytes; a trailing / is dropped"


class VolumeMount(_Model):
    """A volume to attach at create time: ``VOL:/mount/path[:ro]`` on the CLI."""

    volume_id: Id = Field(description="the volume to attach (AVAILABLE, of the same workspace)")
    path: MountPath = Field(description=f"where it is mounted in the guest: {_MOUNT_PATH}")
    read_only: bool = Field(default=False, description="mount it read-only")


class VolumeAttachment(_Answer):
    volume_id: str = Field(description="the attached volume")
    path: str = Field(description="its mount point in the guest")
    read_only: bool = Field(default=False, description="whether it is mounted read-only")


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

    outbound: bool = Field(default=True,
                           description="false: the session opens no connection out at all")
    allow_domains: list[str] = Field(
        default_factory=list, description="the names (exact, or *. wildcards) it may connect "
        "to; both lists empty: any public address")
    allow_cidrs: list[str] = Field(
        default_factory=list, description="the IPv4 networks it may connect to; both lists "
        "empty: any public address")


_CPU = f"virtual CPUs, {CPU_MIN}..{CPU_MAX}"
_MEMORY = f"guest memory in MiB, {MEMORY_MB_MIN}..{MEMORY_MB_MAX}"
_ENV = (f"environment variables: at most {limits.MAP_MAX_ENTRIES}; names match "
        f"{limits.ENV_KEY_PATTERN} (at most {limits.KEY_MAX_CHARS} characters), values at most "
        f"{limits.VALUE_MAX_BYTES} bytes")
_METADATA = (f"the caller's labels: at most {limits.MAP_MAX_ENTRIES} entries; keys 1.."
             f"{limits.KEY_MAX_CHARS} characters without control characters, values at most "
             f"{limits.VALUE_MAX_BYTES} bytes")
_NAME = (f"{limits.NAME_MIN_CHARS}..{limits.NAME_MAX_CHARS} characters, no control characters "
         "but tab and newline")


class SessionCreate(_Model):
    name: Name | None = Field(default=None, description=f"a label: {_NAME}; need not be unique")
    template_id: Id | None = Field(
        default=None, description="restore the template's latest READY build (golden snapshot)")
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX,
                     description=f"{_CPU}; a restore keeps its snapshot's (another is refused)")
    memory_mb: int = Field(
        default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX,
        description=f"{_MEMORY}; a restore keeps its snapshot's (another is refused)")
    env: Env = Field(default_factory=dict, description=(
        f"{_ENV}; for every process of the session (a restore adds them to its source's)"))
    metadata: Metadata = Field(default_factory=dict, description=_METADATA)
    max_duration_s: Duration | None = Field(
        default=None, description="seconds from creation until the session is terminated "
        "(none: no limit); finite, > 0, at most ten years")
    snapshot_id: Id | None = Field(
        default=None, description="restore this READY snapshot (its image, shape, memory and "
        "disk) instead of booting an image")
    base_image_id: Id | None = Field(
        default=None, description=f"the image to boot (default {DEFAULT_IMAGE_ID}); a restore "
        "uses its snapshot's")
    volumes: list[VolumeMount] = Field(
        default_factory=list, max_length=limits.VOLUME_MOUNTS_MAX,
        description=f"volumes to attach, at most {limits.VOLUME_MOUNTS_MAX}")
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
    host_id: Id | None = Field(
        default=None, description="run it on this host (an ACTIVE one with room for it; "
        "admin keys, for tests and operators); none: the control plane places it")

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
    id: str = Field(description="the session's id (ses_...)")
    workspace_id: str = Field(description="the workspace it belongs to")
    name: str | None = Field(default=None, description="its label, if it has one")
    template_id: str | None = Field(
        default=None, description="the template whose golden snapshot it was restored from")
    state: SessionState = Field(description="where it is in its lifecycle")
    state_reason: str | None = Field(
        default=None, description="why it is in this state (a failure, a termination's cause, "
        "a note while it boots)")
    cpu: int = Field(description="virtual CPUs")
    memory_mb: int = Field(description="guest memory in MiB")
    base_image_id: str = Field(description="the image its disk derives from")
    snapshot_id: str | None = Field(
        default=None, description="the snapshot it was restored from (none for a boot or a "
        "template's session)")
    env_keys: list[str] = Field(
        default_factory=list, description="names of its environment variables, sorted (the "
        "values are not returned)")
    metadata: dict[str, str] = Field(default_factory=dict, description="the caller's labels")
    volumes: list[VolumeAttachment] = Field(
        default_factory=list, description="the volumes attached now (none once it has ended)")
    allow_inbound: bool = Field(default=False, description="whether its ports may be exposed")
    egress: SessionEgress = Field(default_factory=SessionEgress,
                                  description="its outbound network policy")
    created_at: datetime = Field(description="when it was created")
    ready_at: datetime | None = Field(
        default=None, description="when it first became READY (its boot or restore done)")
    expires_at: datetime | None = Field(
        default=None, description="when it will be terminated (none: no limit)")
    terminated_at: datetime | None = Field(default=None,
                                           description="when it ended (TERMINATED or FAILED)")
    host_id: str | None = Field(
        default=None, description="the host that runs (or last ran) its VM")


class SessionUpdate(_Model):
    """Fields left out stay as they are. ``metadata`` replaces the whole map."""

    name: Name | None = Field(default=None, description=f"the new label: {_NAME}")
    metadata: Metadata | None = Field(default=None,
                                      description=f"replaces all labels: {_METADATA}")


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

    session_id: str = Field(description="the session whose guest port it is")
    port: int = Field(description="the guest's TCP port")
    url: str = Field(description="the preview proxy's URL for it, with its token")
    expires_at: datetime | None = Field(
        default=None, description="when the exposure ends (none: when unexposed or the session "
        "stops running)")
    created_at: datetime = Field(description="when it was exposed")


class SnapshotCreate(_Model):
    session_id: Id = Field(description="the session to capture (READY or RUNNING)")
    name: Name | None = Field(default=None, description=f"a label: {_NAME}")
    expires_at: datetime | None = Field(
        default=None, description="when it is deleted (in the future; none: kept until deleted)")
    workspace_id: Id | None = Field(
        default=None, description="set from the API key; if given, it must be the key's")


class SnapshotUpdate(_Model):
    """Fields left out stay as they are; ``expires_at: null`` removes the expiry."""

    name: Name | None = Field(default=None, description=f"the new label: {_NAME}")
    expires_at: datetime | None = Field(
        default=None, description="when it is deleted (in the future); null: never")


class Snapshot(_Answer):
    id: str = Field(description="the snapshot's id (snap_...)")
    session_id: str = Field(description="the session it was captured from")
    workspace_id: str | None = Field(default=None, description="the workspace it belongs to")
    name: str | None = Field(default=None, description="its label, if it has one")
    type: SnapshotType = Field(default=SnapshotType.USER,
                               description="who took it, and so who owns it")
    state: SnapshotState = Field(description="where it is in its lifecycle")
    state_reason: str | None = Field(default=None,
                                     description="why it is FAILED (or other notes)")
    size_bytes: int = Field(
        default=0, description="bytes captured: the guest's RAM data, device state and the "
        "disk layers over the base image (0 until READY)")
    compressed_bytes: int = Field(
        default=0, description="bytes this capture newly stored, RAM compressed (0 until "
        "READY): a snapshot of a lineage (a second snapshot of a session, or of a session "
        "restored from a snapshot) stores only the memory pages and disk blocks that changed "
        "and references the rest by digest; what counts against max_stored_bytes")
    unique_bytes: int = Field(
        default=0, description="bytes deleting it would free now: what it stores or references "
        "that no other snapshot and no running session needs (0 unless READY); a parent's "
        "shares with its children are freed only with the last of them")
    memory_bytes: int = Field(default=0, description="the guest's memory size in bytes")
    base_image_id: str = Field(description="the image the session's disk derives from")
    cpu: int = Field(description="virtual CPUs of the session (a restore keeps them)")
    memory_mb: int = Field(description="guest memory in MiB (a restore keeps it)")
    created_at: datetime = Field(description="when the capture began")
    ready_at: datetime | None = Field(default=None, description="when it became READY")
    expires_at: datetime | None = Field(
        default=None, description="when it will be deleted (none: kept until deleted)")
    deleted_at: datetime | None = Field(default=None, description="when it was deleted")


class ExecRequest(_Model):
    """Start a process. Give ``argv``, or ``command`` for ``/bin/sh -c``."""

    argv: Argv | None = Field(
        default=None, description=f"the program and its arguments: at most "
        f"{limits.ARGV_MAX_ITEMS}, each at most {limits.ARG_MAX_BYTES} bytes, at most "
        f"{limits.ARGV_MAX_TOTAL_BYTES} bytes in all")
    command: Command | None = Field(
        default=None, description=f"a shell command for /bin/sh -c, instead of argv; at most "
        f"{limits.COMMAND_MAX_BYTES} bytes")
    env: Env = Field(default_factory=dict,
                     description=f"{_ENV}; added to the session's")
    cwd: GuestPath | None = Field(
        default=None, description=f"working directory in the guest, at most "
        f"{limits.PATH_MAX_BYTES} bytes")
    timeout_s: Duration | None = Field(
        default=None, description="seconds until the process is killed (exit code 124, "
        "timed_out set); none: no limit")
    stdin: bool = Field(
        default=False, description="keep stdin open for writes (the stdin route) until closed; "
        "false: stdin is /dev/null")
    stdin_data: Base64Data | None = Field(
        default=None, description=f"base64 bytes written to stdin then closed; at most "
        f"{limits.STDIN_DATA_MAX_BYTES} bytes once decoded"
    )
    user: Literal["root", "tenki"] = Field(
        default="root", description="who runs it: root, or the guest user tenki (HOME "
        "/home/tenki, where it also starts unless cwd says otherwise)")


class ProcessInfo(_Answer):
    process_id: str = Field(description="the process's id, for its events, stdin and kill")
    session_id: str = Field(description="the session it runs in")
    pid: int | None = Field(default=None, description="its process id in the guest")


#: The kinds of ``ProcessEvent``. A ``Literal`` rather than an ``Enum``: the OpenAPI enum is the
#: same, and the SDK keeps handing out plain strings (``("stdout", data)``) as it always did.
ProcessEventKind = Literal["stdout", "stderr", "exit", "error"]


class ProcessEvent(_Answer):
    """One line of a process's NDJSON event stream: ``stdout``/``stderr`` events, then one
    ``exit`` or ``error`` (the output is no longer available, or some was lost: ``message`` says
    why, with the bytes delivered before and, when known, lost, and the exit code)."""

    type: ProcessEventKind = Field(
        description="stdout or stderr: output in data; exit: the process exited; error: the "
        "stream ended without a complete output (message says why)")
    data: str | None = Field(default=None, description="base64 bytes, for stdout/stderr")
    exit_code: int | None = Field(
        default=None, description="exit (and error, when known): the exit status; 128+N when "
        "killed by signal N, 124 when its timeout killed it")
    timed_out: bool = Field(default=False,
                            description="exit: the process was killed by its timeout_s")
    message: str | None = Field(default=None, description="error: what went wrong")
    delivered_bytes: int | None = Field(
        default=None, description="error: output bytes delivered before the stream ended")
    lost_bytes: int | None = Field(
        default=None, description="error: output bytes lost (not delivered) before that")


class FileWritten(_Answer):
    path: str = Field(description="the file written in the guest")
    size_bytes: int = Field(description="bytes written")


class Image(_Answer):
    id: str = Field(description="the image's id (base_image_id of a session)")
    size_bytes: int = Field(description="bytes of its disk, kernel and initrd files")
    created_at: datetime = Field(description="when it was built")
    kernel: str | None = Field(default=None, description="the guest kernel's version")
    packages: list[str] = Field(
        default_factory=list, description="notable packages it holds, as name=version")


_VOLUME_SIZE = f"{VOLUME_MIN_BYTES}..{VOLUME_MAX_BYTES} bytes (1 MiB..100 GiB)"


class VolumeCreate(_Model):
    name: Name = Field(description=f"a label: {_NAME}")
    size_bytes: int = Field(ge=VOLUME_MIN_BYTES, le=VOLUME_MAX_BYTES,
                            description=f"its capacity: {_VOLUME_SIZE}")


class VolumeUpdate(_Model):
    name: Name = Field(description=f"the new label: {_NAME}")


class VolumeAttach(_Model):
    volume_id: Id = Field(description="the volume to attach (AVAILABLE, of the same workspace)")
    path: MountPath = Field(description=f"where it is mounted in the guest: {_MOUNT_PATH}")
    read_only: bool = Field(default=False, description="mount it read-only")


class Volume(_Answer):
    id: str = Field(description="the volume's id (vol_...)")
    workspace_id: str = Field(description="the workspace it belongs to")
    name: str = Field(description="its label")
    size_bytes: int = Field(description="its capacity in bytes")
    state: VolumeState = Field(description="where it is in its lifecycle")
    session_id: str | None = Field(default=None,
                                   description="IN_USE: the session it is attached to")
    path: str | None = Field(default=None, description="IN_USE: its mount point in the guest")
    read_only: bool = Field(default=False, description="IN_USE: whether it is mounted read-only")
    created_at: datetime = Field(description="when it was created")
    host_id: str | None = Field(
        default=None, description="the host holding it (its sessions run there)")


class ServerInfo(_Answer):
    version: str = Field(description="the server's tenki version")
    pid: int = Field(description="the server's process id on its host")
    home: str | None = Field(default=None,
                             description="the server's data directory on its host (admin keys)")
    accelerator: str = Field(description="how guests run: kvm, or tcg (emulation, slow)")
    grpc_endpoint: str | None = Field(
        default=None, description="Tenki's gRPC wire (the official SDKs' TENKI_API_ENDPOINT)")


class ErrorInfo(_Answer):
    code: ErrorCode = Field(description="what kind of error: one of the codes of the error "
                            "table, each with its own HTTP status")
    message: str = Field(description="what went wrong, for people; starts with the field when "
                         "there is one")
    field: str | None = Field(
        default=None, description="the offending input, as a dotted path (env.FOO, argv.3, "
        "volumes.0.path; body for the body as a whole)")
    details: Any = Field(
        default=None, description="facts of some errors: a quota's name, limit and use; a "
        "host's promised and capacity memory; what a workspace still holds")


class ErrorBody(_Answer):
    """Every error answer of the API, whatever its status."""

    error: ErrorInfo = Field(description="the error")


class DamagedSnapshot(_Answer):
    snapshot_id: str = Field(description="the snapshot with damaged artifacts")
    problems: list[str] = Field(description="what is wrong, one line per artifact")


class UnownedFile(_Answer):
    """Something stored that no record owns: ``artifact`` (name: its digest), ``temporary``
    (a crashed write's file; name: its path in the data directory) or ``vm`` (the files of a VM
    no session holds; name: the session id)."""

    kind: str = Field(description="artifact, temporary or vm")
    name: str = Field(description="a digest, a path in the data directory, or a session id")


class DamagedImage(_Answer):
    """A built image whose stored files are damaged: no boot of it succeeds until it is
    rebuilt (``tenki image build --force``)."""

    image_id: str = Field(description="the image whose stored files are damaged")
    problems: list[str] = Field(description="what is wrong, one line per file")


class DamagedSession(_Answer):
    """A live session whose VM runs on a damaged stored file: no snapshot of it is sealed."""

    session_id: str = Field(description="the session whose VM runs on damaged files")
    problems: list[str] = Field(description="what is wrong, one line per file (which layer, "
                                "kernel, initrd or RAM image)")


class StoreReport(_Answer):
    """``tenki admin verify``: every stored artifact in use re-read against its digest."""

    ok: bool = Field(description="nothing was found damaged, rebuilt or unowned")
    checked: int = Field(description="artifacts checked (each read in full): every kept "
                         "snapshot's, the built images', and what the live sessions' VMs run on")
    damaged: list[DamagedSnapshot] = Field(
        default_factory=list, description="snapshots that cannot be restored as stored")
    damaged_images: list[DamagedImage] = Field(
        default_factory=list, description="built images that cannot be booted as stored "
        "(reported only: rebuild them)")
    damaged_sessions: list[DamagedSession] = Field(
        default_factory=list, description="live sessions whose VM runs on a damaged stored "
        "file (reported only: no snapshot of them is sealed)")
    bad_artifacts: dict[str, str] = Field(default_factory=dict,
                                          description="digest -> what is wrong with it")
    damaged_caches: dict[str, str] = Field(
        default_factory=dict, description="RAM image digest -> what is wrong with its unpacked "
        "cache (no restore maps it before a rebuild; rebuilt only with repair)")
    rebuilt: list[str] = Field(default_factory=list,
                               description="RAM image digests whose damaged cache was rebuilt")
    unowned: list[UnownedFile] = Field(default_factory=list,
                                       description="files no record owns (as found)")
    removed: list[UnownedFile] = Field(
        default_factory=list, description="those of the unowned files that repair removed")
    repaired: bool = Field(
        default=False, description="repair was asked for: damaged snapshots are marked FAILED, "
        "damaged RAM caches rebuilt and the unowned files no one can claim removed")


# -- workspaces, API keys, audit, host capacity -------------------------------------------------

#: The quotas a workspace can have; a missing or null value is no limit.
QUOTA_NAMES = ("max_concurrent_sessions", "max_memory_mib", "max_snapshots", "max_volumes",
               "max_stored_bytes")


class Quotas(_Model):
    """Per-workspace limits; ``None`` is no limit."""

    max_concurrent_sessions: int | None = Field(
        default=None, ge=0, le=1_000_000, description="sessions that hold a VM or are getting "
        "one (not PAUSED, not ended), 0..1000000; null: no limit")
    max_memory_mib: int | None = Field(
        default=None, ge=0, le=1 << 40, description="the sum of those sessions' memory_mb, "
        f"0..{1 << 40}; null: no limit")
    max_snapshots: int | None = Field(
        default=None, ge=0, le=1_000_000_000, description="CREATING or READY snapshots (PAUSE "
        "snapshots not counted), 0..1000000000; null: no limit")
    max_volumes: int | None = Field(
        default=None, ge=0, le=1_000_000_000, description="volumes not yet deleted, "
        "0..1000000000; null: no limit")
    max_stored_bytes: int | None = Field(
        default=None, ge=0, le=1 << 62, description="snapshots' compressed_bytes plus volumes' "
        f"size_bytes, 0..{1 << 62}; null: no limit")


class Workspace(_Answer):
    id: str = Field(description="the workspace's id")
    name: str = Field(description="its name, unique on the server")
    quotas: Quotas = Field(default_factory=Quotas, description="its limits")
    created_at: datetime = Field(description="when it was created")
    updated_at: datetime = Field(description="when its name or quotas last changed")


class WorkspaceCreate(_Model):
    name: Name = Field(description=f"a name unique on the server: {_NAME}")
    quotas: Quotas = Field(default_factory=Quotas, description="its limits (none by default)")


class WorkspaceUpdate(_Model):
    """Only the fields given change; in ``quotas``, only the quotas given (null removes one)."""

    name: Name | None = Field(default=None, description=f"a new name, unique: {_NAME}")
    quotas: Quotas | None = Field(
        default=None, description="the quotas to change; the others stay (null removes one)")


class Usage(_Answer):
    """What a workspace holds now, against its quotas (same names, without ``max_``)."""

    workspace_id: str = Field(description="the workspace")
    concurrent_sessions: int = Field(description="sessions that hold a VM or are getting one")
    memory_mib: int = Field(description="the sum of those sessions' memory_mb")
    snapshots: int = Field(description="CREATING or READY snapshots, PAUSE ones not counted")
    volumes: int = Field(description="volumes not yet deleted")
    stored_bytes: int = Field(
        description="snapshots' compressed_bytes (PAUSE ones included) plus volumes' size_bytes")
    quotas: Quotas = Field(description="the workspace's limits")


class ApiKeyCreate(_Model):
    workspace_id: Id = Field(description="the workspace the key acts in")
    name: Name | None = Field(default=None, description=f"a label: {_NAME}")
    expires_at: datetime | None = Field(
        default=None, description="when the key stops working (none: until revoked)")
    admin: bool = Field(default=False, description="may manage workspaces, keys and the server")


class ApiKey(_Answer):
    """A key's record; the secret itself is shown once, by ``ApiKeyCreated``."""

    id: str = Field(description="the key's id (for revoking it)")
    workspace_id: str = Field(description="the workspace it acts in")
    prefix: str = Field(description="the key's first characters, to recognise it")
    name: str | None = Field(default=None, description="its label, if it has one")
    admin: bool = Field(default=False,
                        description="may manage workspaces, keys and the server")
    created_at: datetime = Field(description="when it was created")
    last_used_at: datetime | None = Field(
        default=None, description="when it last let a request in (written at most once a "
        "minute)")
    expires_at: datetime | None = Field(
        default=None, description="when it stops working (none: until revoked)")
    revoked_at: datetime | None = Field(default=None, description="when it was revoked")


class ApiKeyCreated(ApiKey):
    key: str = Field(description="the secret (tk_...): shown only in this answer")


class AuditEntry(_Answer):
    id: int = Field(description="the entry's number, increasing (for before_id)")
    at: datetime = Field(description="when the call was answered")
    workspace_id: str | None = Field(default=None,
                                     description="the caller's workspace (none: no valid key)")
    key_prefix: str | None = Field(default=None,
                                   description="the first characters of the caller's key")
    action: str = Field(description="the operation, e.g. createSession")
    method: str = Field(description="the HTTP method")
    path: str = Field(description="the request's path")
    object_id: str | None = Field(
        default=None, description="the object it was about (from the path, or the created one)")
    status: int = Field(description="the HTTP status of the answer")
    outcome: str = Field(description="ok, or the error code")


class SpareInfo(_Answer):
    """A restore prepared ahead on a host (a paused VM, not a session): the next create that
    restores ``snapshot_id`` there gets ``session_id`` and only resumes it."""

    session_id: str = Field(description="the id the restore that claims it will have")
    snapshot_id: str = Field(description="the snapshot it restores")
    host_id: str = Field(description="the host that holds it")


class HostStatus(_Answer):
    """The capacity of the control plane's hosts together (with one host, that host's), as
    the admission check counts it; each host's: ``HostInfo``."""

    host_id: str = Field(description="the host's id")
    memory_total_mib: int = Field(description="RAM of the host (or as configured)")
    memory_reserve_mib: int = Field(description="kept for the host itself")
    overcommit: float = Field(description="promised guest memory is divided by this")
    memory_capacity_mib: int = Field(description="(total - reserve) * overcommit")
    memory_promised_mib: int = Field(description="sum of the live guests' memory")
    memory_used_mib: int = Field(description="what the guests' processes really hold (PSS)")
    sessions: int = Field(description="sessions that hold a VM or are getting one")
    cpus: int = Field(description="CPUs of the host")
    accelerator: str = Field(description="how guests run: kvm, or tcg (emulation, slow)")
    network_enforced: bool = Field(
        default=False, description="whether this host enforces egress policies and exposes "
        "ports (root and nftables: guest networks in namespaces); otherwise only the default "
        "policy is accepted")
    tmpfs_used_bytes: int = Field(
        default=0, description="bytes in use on the tmpfs of the VMs' run directories (guest "
        "RAM of booted VMs, capture staging; other users of that tmpfs count too)")
    tmpfs_total_bytes: int = Field(default=0, description="the size of that tmpfs")
    spares: list[SpareInfo] = Field(
        default_factory=list, description="restores prepared ahead (paused VMs that no session "
        "record names until a create claims one; stopped after some minutes unclaimed)")


class HostState(str, Enum):
    """ACTIVE (takes new sessions) <-> DRAINING (no new sessions; those it runs go on);
    LOST: no heartbeat in time (its sessions were terminated, "host lost"); a LOST host that
    registers again is ACTIVE."""

    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    LOST = "LOST"


class HostInfo(_Answer):
    """A host of the control plane: the embedded one (``local``) or a registered worker."""

    host_id: str = Field(description="the host's id (local: the control plane's own)")
    address: str | None = Field(
        default=None, description="where the control plane calls the host worker (none: the "
        "embedded host)")
    state: HostState = Field(description="ACTIVE, DRAINING or LOST")
    state_reason: str | None = Field(default=None, description="why it is in this state")
    cpus: int = Field(description="CPUs of the host")
    memory_total_mib: int = Field(description="RAM of the host (or as configured)")
    memory_reserve_mib: int = Field(description="kept for the host itself")
    overcommit: float = Field(description="promised guest memory is divided by this")
    memory_capacity_mib: int = Field(description="(total - reserve) * overcommit")
    memory_promised_mib: int = Field(
        description="sum of the memory of the sessions placed on it that hold a VM")
    memory_used_mib: int = Field(default=0, description="what its guests really hold (PSS)")
    disk_total_bytes: int = Field(default=0, description="size of its data directory's disk")
    disk_free_bytes: int = Field(default=0, description="free bytes on that disk")
    accelerator: str = Field(description="how guests run: kvm, or tcg (emulation)")
    qemu_version: str = Field(default="", description="the QEMU version it runs")
    cpu_model: str = Field(default="", description="the guest CPU model it offers")
    network_enforced: bool = Field(
        default=False, description="whether it enforces egress policies and exposes ports")
    sessions: int = Field(description="sessions placed on it that hold a VM or are getting one")
    registered_at: datetime = Field(description="when it (last) registered")
    last_heartbeat_at: datetime | None = Field(
        default=None, description="its last heartbeat (none: the embedded host, which needs "
        "none)")


class HostRegister(_Model):
    """A host worker's registration (``tenki host run``): who it is and where it listens."""

    host_id: Id | None = Field(
        default=None, description="its id from an earlier registration (none: a new host; the "
        "control plane assigns one)")
    address: str = Field(min_length=1, max_length=2048,
                         description="the base URL the control plane calls it at")
    secret: str = Field(min_length=16, max_length=512,
                        description="the bearer token it accepts from the control plane")
    cpus: int = Field(ge=1, description="its CPUs")
    memory_total_mib: int = Field(ge=0, description="its RAM (or as configured)")
    memory_reserve_mib: int = Field(ge=0, description="RAM kept for the host itself")
    overcommit: float = Field(gt=0, description="promised guest memory is divided by this")
    disk_total_bytes: int = Field(default=0, ge=0, description="size of its data disk")
    disk_free_bytes: int = Field(default=0, ge=0, description="free bytes on its data disk")
    accelerator: Literal["tcg", "kvm"] = Field(description="how its guests run")
    qemu_version: str = Field(default="", max_length=64, description="its QEMU version")
    cpu_model: str = Field(default="", max_length=128,
                           description="the guest CPU model it offers")
    network_enforced: bool = Field(
        default=False, description="whether it enforces egress policies and exposes ports")
    vms: list[str] = Field(default_factory=list, max_length=10000,
                           description="the session ids of the VMs it runs now")


class HostRegistered(HostInfo):
    heartbeat_interval_s: float = Field(description="heartbeat this often")
    owned: list[str] = Field(
        default_factory=list, description="the sessions the records place on it and consider "
        "live: it stops every other VM (fencing)")


class HostHeartbeat(_Model):
    vms: list[str] = Field(default_factory=list, max_length=10000,
                           description="the session ids of the VMs it runs now")
    memory_used_mib: int = Field(default=0, ge=0, description="what its guests really hold")
    tmpfs_used_bytes: int = Field(default=0, ge=0,
                                  description="bytes in use on its run directories' tmpfs")
    tmpfs_total_bytes: int = Field(default=0, ge=0, description="the size of that tmpfs")
    disk_free_bytes: int = Field(default=0, ge=0, description="free bytes on its data disk")


class HostHeartbeatAnswer(_Answer):
    state: HostState = Field(description="the host's state in the records")
    owned: list[str] = Field(
        default_factory=list, description="the sessions the records place on it and consider "
        "live: it stops every other VM (fencing)")


# -- templates ------------------------------------------------------------------------------------

#: a setup script: at most 1 MiB
SETUP_SCRIPT_MAX_BYTES = 1 << 20
Script = Annotated[str, AfterValidator(_no_nul), AfterValidator(_max_bytes(SETUP_SCRIPT_MAX_BYTES))]
Tag = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_controls)]
def _no_controls_at_all(v: str) -> str:
    return _no_controls(v, allowed=frozenset())


#: a readiness URL: handed to the guest as an argument (so no NUL) and sent as a request line
#: (so no control character at all: a tab or newline has no place in a URL)
ReadyUrl = Annotated[str, Field(max_length=2048), AfterValidator(_no_nul),
                     AfterValidator(_no_controls_at_all)]
TAGS_MAX = 32
STEPS_MAX = 256
PACKAGES_MAX = 256


class ReadyCheck(_Model):
    """When the started command is ready: exactly one of ``port`` (a TCP port on the guest's
    localhost accepts), ``http_url`` (a URL on the guest answers ``http_status``) or
    ``command`` (exits 0); tried until ``timeout_s``."""

    port: int | None = Field(default=None, ge=1, le=65535,
                             description="ready once this TCP port of 127.0.0.1 accepts")
    http_url: ReadyUrl | None = Field(
        default=None, description="ready once this URL, fetched in the guest, answers "
        "http_status; at most 2048 characters, no control characters")
    http_status: int = Field(default=200, ge=100, le=599,
                             description="the HTTP status http_url must answer, 100..599")
    command: Command | None = Field(
        default=None, description=f"ready once this shell command exits 0; at most "
        f"{limits.COMMAND_MAX_BYTES} bytes")
    timeout_s: float = Field(default=60.0, gt=0, le=3600,
                             description="seconds to keep trying (> 0, at most 3600)")

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

    image: Id | None = Field(default=None,
                             description=f"boot this image (default {DEFAULT_IMAGE_ID})")
    template_id: Id | None = Field(
        default=None, description="restore this template's latest READY build")
    snapshot_id: Id | None = Field(default=None, description="restore this READY snapshot")


#: a package name for apt, pip or npm: no blanks, no shell syntax, not an option
Package = Annotated[str, Field(min_length=1, max_length=214,
                               pattern=r"^[A-Za-z0-9@][A-Za-z0-9@._+:/<>=!~^*-]*$")]
_PACKAGES = (f"1..{PACKAGES_MAX} names, each 1..214 characters (letters, digits and "
             "@._+:/<>=!~^*-, not starting with a symbol but @)")


class AptStep(_Model):
    packages: list[Package] = Field(min_length=1, max_length=PACKAGES_MAX,
                                    description=f"Debian packages to install: {_PACKAGES}")


class PipStep(_Model):
    packages: list[Package] = Field(
        min_length=1, max_length=PACKAGES_MAX,
        description=f"Python packages (requirement specifiers) to install: {_PACKAGES}")


class NpmStep(_Model):
    packages: list[Package] = Field(min_length=1, max_length=PACKAGES_MAX,
                                    description=f"npm packages to install globally: {_PACKAGES}")


class WriteFileStep(_Model):
    path: MountPath = Field(description=f"the file to write: {_MOUNT_PATH}")
    content: Script = Field(
        description=f"its text, at most {SETUP_SCRIPT_MAX_BYTES} bytes")
    mode: int = Field(default=0o644, ge=0, le=0o7777,
                      description="its permission bits (an integer: 420 is 0o644)")


class MkdirStep(_Model):
    path: MountPath = Field(
        description=f"the directory to make, with missing parents: {_MOUNT_PATH}")


class Step(_Model):
    """One step of a template spec: exactly one of ``run``, ``apt``, ``pip``, ``npm``,
    ``write_file``, ``mkdir``; optionally named."""

    name: Name | None = Field(default=None, description=f"a label for the build log: {_NAME}")
    run: Command | None = Field(
        default=None, description=f"a shell command, at most {limits.COMMAND_MAX_BYTES} bytes")
    apt: AptStep | None = Field(default=None, description="install Debian packages")
    pip: PipStep | None = Field(default=None, description="install Python packages")
    npm: NpmStep | None = Field(default=None, description="install npm packages")
    write_file: WriteFileStep | None = Field(default=None, description="write a file")
    mkdir: MkdirStep | None = Field(default=None, description="make a directory")

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
    start_cmd: Command | None = Field(
        default=None, description="a shell command started after the steps, left running in "
        f"the golden snapshot; at most {limits.COMMAND_MAX_BYTES} bytes")
    ready_when: ReadyCheck | None = Field(
        default=None, description="when start_cmd is ready (the snapshot is taken then)")
    env: Env = Field(default_factory=dict,
                     description=f"{_ENV}; added to the spec's env for sessions")


class Resources(_Model):
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX, description=_CPU)
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX,
                           description=_MEMORY)


_TAGS = f"at most {TAGS_MAX} tags, each 1..64 characters without control characters but " \
    "tab and newline"
_SETUP_SCRIPT = (f"a shell script (/bin/sh -se) run as the guest user tenki in its home; at most "
                 f"{SETUP_SCRIPT_MAX_BYTES} bytes")
_START_CMD = (f"a shell command started after setup, left running in the golden snapshot; at "
              f"most {limits.COMMAND_MAX_BYTES} bytes")


class TemplateSpec(_Model):
    """A declarative template (``tenki sandbox template create --spec FILE``, JSON or YAML):
    the steps become the setup script, ``runtime`` the start command, its readiness check and
    env. Unknown fields are refused, naming their path."""

    spec_version: Literal["tenki.template.v1"] = Field(description="the spec format's version")
    base: TemplateBase = Field(default_factory=TemplateBase,
                               description="what the build starts from")
    env: Env = Field(default_factory=dict,
                     description=f"{_ENV}; for the build and every session")
    build_env: Env = Field(default_factory=dict,
                           description="for the build only (secrets): never in a session")
    steps: list[Step] = Field(
        default_factory=list, max_length=STEPS_MAX,
        description=f"at most {STEPS_MAX}, run in order; the first that fails fails the build")
    runtime: Runtime = Field(default_factory=Runtime,
                             description="what runs in the golden snapshot")
    resources: Resources = Field(default_factory=Resources,
                                 description="the build's and its sessions' shape")
    tags: list[Tag] = Field(default_factory=list, max_length=TAGS_MAX, description=_TAGS)


class TemplateCreate(_Model):
    name: Name = Field(description=f"unique in the workspace: {_NAME}")
    spec: TemplateSpec | None = Field(
        default=None, description="a declarative spec instead of the fields below")
    base: TemplateBase = Field(default_factory=TemplateBase,
                               description="what a build starts from (at most one of its fields)")
    setup_script: Script | None = Field(default=None, description=_SETUP_SCRIPT)
    start_cmd: Command | None = Field(default=None, description=_START_CMD)
    ready_when: ReadyCheck | None = Field(
        default=None, description="when start_cmd is ready (the snapshot is taken then)")
    env: Env = Field(default_factory=dict,
                     description=f"{_ENV}; for the build and every session")
    build_env: Env = Field(default_factory=dict,
                           description="for the build only (secrets): never in a session")
    cpu: int = Field(default=DEFAULT_CPU, ge=CPU_MIN, le=CPU_MAX,
                     description=f"{_CPU}, of the build and its sessions")
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX,
                           description=f"{_MEMORY}, of the build and its sessions")
    tags: list[Tag] = Field(default_factory=list, max_length=TAGS_MAX, description=_TAGS)


class TemplateUpdate(_Model):
    """Only the fields given change; a build picks the change up. ``name``, ``cpu`` and
    ``memory_mb`` cannot be removed (null is refused); null removes any other field."""

    name: Name | None = Field(default=None, description=f"unique in the workspace: {_NAME}")
    base: TemplateBase | None = Field(default=None, description="what a build starts from")
    setup_script: Script | None = Field(default=None, description=_SETUP_SCRIPT)
    start_cmd: Command | None = Field(default=None, description=_START_CMD)
    ready_when: ReadyCheck | None = Field(default=None, description="when start_cmd is ready")
    env: Env | None = Field(default=None,
                            description=f"{_ENV}; for the build and every session")
    build_env: Env | None = Field(
        default=None, description="for the build only (secrets): never in a session")
    cpu: int | None = Field(default=None, ge=CPU_MIN, le=CPU_MAX, description=_CPU)
    memory_mb: int | None = Field(default=None, ge=MEMORY_MB_MIN, le=MEMORY_MB_MAX,
                                  description=_MEMORY)
    tags: list[Tag] | None = Field(default=None, max_length=TAGS_MAX, description=_TAGS)

    @model_validator(mode="after")
    def _required_stay(self) -> TemplateUpdate:
        for name in ("name", "cpu", "memory_mb"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be removed (null); give a value")
        return self


class BuildState(str, Enum):
    """PENDING -> BUILDING -> READY (its golden snapshot is READY), or FAILED (a step failed,
    or the server stopped)."""

    PENDING = "PENDING"
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"


class TemplateBuild(_Answer):
    id: str = Field(description="the build's id")
    template_id: str = Field(description="the template built")
    workspace_id: str = Field(description="the workspace it belongs to")
    version: int = Field(description="the build's number in its template, from 1")
    state: BuildState = Field(description="where it is in its lifecycle")
    error: str | None = Field(default=None, description="FAILED: the step and the reason")
    failed_step: str | None = Field(
        default=None, description="FAILED: the step it failed in (boot, setup, start, ready, "
        "capture; server: the server stopped)")
    log_tail: str = Field(default="", description="the last 4096 characters of its log")
    log_bytes: int = Field(default=0, description="bytes of its log as stored (UTF-8)")
    snapshot_id: str | None = Field(default=None, description="READY: the golden snapshot")
    created_at: datetime = Field(description="when it was asked for")
    started_at: datetime | None = Field(default=None, description="when it began BUILDING")
    completed_at: datetime | None = Field(default=None,
                                          description="when it became READY or FAILED")


class Template(_Answer):
    id: str = Field(description="the template's id")
    workspace_id: str = Field(description="the workspace it belongs to")
    name: str = Field(description="its name, unique in the workspace")
    base: TemplateBase = Field(description="what a build starts from")
    setup_script: str | None = Field(default=None, description="the build's setup script")
    start_cmd: str | None = Field(
        default=None, description="the command left running in the golden snapshot")
    ready_when: ReadyCheck | None = Field(default=None, description="when start_cmd is ready")
    env: dict[str, str] = Field(default_factory=dict,
                                description="environment of the build and every session")
    build_env_keys: list[str] = Field(
        default_factory=list, description="names of the build-only variables, sorted (the "
        "values are never returned)")
    cpu: int = Field(description="virtual CPUs of the build and its sessions")
    memory_mb: int = Field(description="guest memory in MiB of the build and its sessions")
    tags: list[str] = Field(default_factory=list, description="its tags")
    latest_build: TemplateBuild | None = Field(
        default=None, description="the latest READY build (what a session starts from)")
    spec: TemplateSpec | None = Field(
        default=None, description="the declarative spec it was created from, if any (an "
        "update of its fields drops it)")
    created_at: datetime = Field(description="when it was created")
    updated_at: datetime = Field(description="when its fields last changed")

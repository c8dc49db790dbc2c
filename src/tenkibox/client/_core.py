"""The I/O-free core shared by :class:`Client` and :class:`AsyncClient`.

Everything here is pure: it builds requests (:class:`Call`), parses responses into the wire models
of :mod:`tenkibox.models`, maps error bodies to the exception classes of :mod:`tenkibox.errors`,
decodes the NDJSON event stream of a process and runs the multi-step flows (create-and-wait,
snapshot-and-wait) as generators of calls. The sync and async clients only send the calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import httpx
import pydantic

from .. import errors, models, units

T = TypeVar("T")
M = TypeVar("M", bound=pydantic.BaseModel)

#: Seconds allowed for one HTTP request (connect, send, read), unless the caller says otherwise.
DEFAULT_TIMEOUT = 30.0
#: Seconds ``create_and_wait`` / ``restore_snapshot`` wait for a session to leave CREATING.
DEFAULT_CREATE_TIMEOUT = 180.0
#: Seconds ``create_snapshot_and_wait`` / ``wait_snapshot_ready`` wait for READY.
DEFAULT_SNAPSHOT_TIMEOUT = 300.0
#: Seconds ``build_template_and_wait`` / ``wait_build`` wait for a template build to end.
DEFAULT_BUILD_TIMEOUT = 900.0
#: Longest single long-poll request of a wait loop (seconds); a wait is a chain of these.
LONG_POLL_S = 30.0

Stream = Literal["stdout", "stderr"]


# --------------------------------------------------------------------------------------------
# Requests and responses


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | int | float] | None = None
    json: Any = None
    content: bytes | None = None
    #: seconds added to the client's request timeout (long polls wait on the server)
    extra_timeout: float = 0.0


def seg(value: str) -> str:
    """Quote one path segment (an id) so that it cannot change the route."""
    return urllib.parse.quote(str(value), safe="")


def request_timeout(base: float | None, call: Call[Any]) -> float | None:
    """The timeout of one request in seconds, ``None`` for no limit."""
    if base is None:
        return None
    return base + call.extra_timeout


def stream_timeout(base: float | None) -> httpx.Timeout:
    """A streamed response may stay silent for as long as the process does: no read limit."""
    return httpx.Timeout(base, read=None)


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


def error_from_response(resp: httpx.Response) -> errors.TenkiError:
    """The typed error of a non-2xx answer (the response must have been read)."""
    status = resp.status_code
    body = _body(resp)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return errors.error_from_body(status, body)
    # Not our error envelope (a proxy, or a framework default): fall back on the status.
    detail = body.get("detail") if isinstance(body, dict) else None
    where = f"{resp.request.method} {resp.request.url.path}"
    if status == 422 and isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query", "path")]
        return errors.ValidationError(
            str(first.get("msg", "invalid input")), field=".".join(loc) or None
        )
    text = detail if isinstance(detail, str) else (str(body)[:200] if body else "")
    suffix = f": {text}" if text else ""
    if status == 401:
        return errors.AuthenticationError(f"unauthorized ({where}){suffix}; set TENKI_API_KEY")
    if status == 404:
        return errors.NotFoundError(f"not found ({where}){suffix}")
    if status == 409:
        return errors.ConflictError(f"conflict ({where}){suffix}")
    if status in (400, 422):
        return errors.ValidationError(f"bad request ({where}){suffix}")
    if status in (502, 503, 504):
        return errors.ConnectionError(f"server unavailable, HTTP {status} ({where}){suffix}")
    return errors.InternalError(f"server answered HTTP {status} ({where}){suffix}")


def transport_error(exc: httpx.HTTPError, endpoint: str) -> errors.TenkiError:
    """Translate an httpx transport failure; the caller chains it with ``from exc``."""
    if isinstance(exc, httpx.TimeoutException):
        return errors.ConnectionError(
            f"the tenki server at {endpoint} did not answer in time ({exc})"
        )
    if isinstance(exc, httpx.ConnectError):
        return errors.ConnectionError(f"cannot reach the tenki server at {endpoint}: {exc}")
    return errors.ConnectionError(f"connection to the tenki server at {endpoint} failed: {exc!r}")


def parse_response(call: Call[T], resp: httpx.Response) -> T:
    """Raise the mapped error of a failed answer, else parse it (``resp`` has been read)."""
    if not resp.is_success:
        raise error_from_response(resp)
    try:
        return call.parse(resp)
    except (pydantic.ValidationError, ValueError) as exc:
        raise errors.InternalError(
            f"unexpected answer to {call.method} {call.path}: {_one_line(exc)}"
        ) from exc


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    def parse(resp: httpx.Response) -> M:
        return cls.model_validate(resp.json())

    return parse


def _model_list(cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = pydantic.TypeAdapter(list[cls])  # type: ignore[valid-type]

    def parse(resp: httpx.Response) -> list[M]:
        return adapter.validate_python(resp.json())  # type: ignore[no-any-return]

    return parse


def _raw(resp: httpx.Response) -> bytes:
    return resp.content


def _none(resp: httpx.Response) -> None:
    return None


# --------------------------------------------------------------------------------------------
# Input building (local validation, pydantic errors become tenkibox ValidationErrors)


def validation_error(exc: pydantic.ValidationError, prefix: str = "") -> errors.ValidationError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    for lead in ("Value error, ", "Assertion failed, "):
        if msg.startswith(lead):
            msg = msg[len(lead) :]
    msg = msg[:1].lower() + msg[1:]
    where = ".".join(p for p in (prefix, loc) if p) or None
    return errors.ValidationError(msg, field=where)


def build(cls: type[M], prefix: str = "", /, **values: Any) -> M:
    """``cls(**values)`` with only the given values set (so the server applies its defaults)."""
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except pydantic.ValidationError as exc:
        raise validation_error(exc, prefix) from None


def parse_volume_spec(spec: str, *, field: str = "volumes") -> models.VolumeMount:
    """``"vol_x:/path"`` or ``"vol_x:/path:ro"`` (also ``:rw``) -> :class:`VolumeMount`."""
    volume_id, sep, rest = spec.partition(":")
    read_only = False
    if rest.endswith(":ro") or rest.endswith(":rw"):
        read_only = rest.endswith(":ro")
        rest = rest[:-3]
    if not sep or not volume_id or not rest:
        raise errors.ValidationError(f"expected VOLUME:/path[:ro], got {spec!r}", field=field)
    return build(models.VolumeMount, field, volume_id=volume_id, path=rest, read_only=read_only)


def volume_mounts(
    volumes: Iterable[models.VolumeMount | str] | None,
) -> list[models.VolumeMount] | None:
    if volumes is None:
        return None
    if isinstance(volumes, str | models.VolumeMount):
        volumes = [volumes]
    out: list[models.VolumeMount] = []
    for v in volumes:
        out.append(v if isinstance(v, models.VolumeMount) else parse_volume_spec(v))
    return out


def seconds(value: float | str | None, *, field: str) -> float | None:
    """A duration argument: seconds (int/float) or a string such as ``"30m"``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise errors.ValidationError(
            f"expected seconds or a duration such as 30m, got {value!r}", field=field
        )
    if isinstance(value, str):
        return units.parse_duration(value, field=field)
    if math.isnan(value) or value <= 0:
        raise errors.ValidationError(f"must be positive, got {value!r}", field=field)
    return float(value)


def size_bytes(value: int | str, *, field: str = "size") -> int:
    """A size argument: bytes (int) or a string such as ``"1GiB"``."""
    if isinstance(value, bool):
        raise errors.ValidationError(
            f"expected bytes or a size such as 1GiB, got {value!r}", field=field
        )
    if isinstance(value, int):
        return value
    return units.parse_size(value, field=field)


def session_create(
    *,
    name: str | None = None,
    snapshot_id: str | None = None,
    cpu: int | None = None,
    memory_mb: int | None = None,
    env: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    volumes: Iterable[models.VolumeMount | str] | None = None,
    max_duration: float | str | None = None,
    base_image_id: str | None = None,
    template_id: str | None = None,
    cold_boot: bool = False,
    allow_outbound: bool = True,
    allow_inbound: bool = False,
    allow_domains: Iterable[str] | None = None,
    allow_cidrs: Iterable[str] | None = None,
    host_id: str | None = None,
) -> models.SessionCreate:
    for flag, value in (("allow_outbound", allow_outbound), ("allow_inbound", allow_inbound)):
        if not isinstance(value, bool):
            raise errors.ValidationError(f"expected True or False, got {value!r}", field=flag)
    domains = _names(allow_domains)
    cidrs = _names(allow_cidrs)
    return build(
        models.SessionCreate,
        name=name,
        snapshot_id=snapshot_id,
        template_id=template_id,
        cold_boot=cold_boot or None,
        # only what differs from the server's defaults is sent
        allow_outbound=False if not allow_outbound else None,
        allow_inbound=True if allow_inbound else None,
        egress={"allow_domains": domains, "allow_cidrs": cidrs} if domains or cidrs else None,
        cpu=cpu,
        memory_mb=memory_mb,
        env=dict(env) if env is not None else None,
        metadata=dict(metadata) if metadata is not None else None,
        volumes=volume_mounts(volumes),
        max_duration_s=seconds(max_duration, field="max_duration"),
        base_image_id=base_image_id,
        host_id=host_id,
    )


def _names(values: Iterable[str] | None) -> list[str]:
    """A list argument of strings (one string alone is one item, not its characters)."""
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return list(values)


def session_update(
    name: str | None = None, metadata: Mapping[str, str] | None = None
) -> models.SessionUpdate:
    """The body of ``PATCH /v1/sessions/{id}``: only what is given (``metadata`` replaces the
    whole map; ``{}`` empties it)."""
    return build(models.SessionUpdate, name=name, metadata=_map(metadata, "metadata"))


def port_expose(port: int, ttl: float | str | None = None) -> models.PortExpose:
    """The body of ``POST /v1/sessions/{id}/ports``: the guest port and, optionally, how long
    it stays exposed (seconds, or a duration such as ``"1h"``)."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise errors.ValidationError(f"expected a port number, got {port!r}", field="port")
    return build(models.PortExpose, port=port, ttl_s=seconds(ttl, field="ttl"))


def guest_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not (
            models.PORT_MIN <= port <= models.PORT_MAX):
        raise errors.ValidationError(
            f"must be {models.PORT_MIN}..{models.PORT_MAX}, got {port!r}", field="port")
    return port


def session_extend(value: float | str) -> models.SessionExtend:
    """The body of ``POST /v1/sessions/{id}/extend``: seconds, or a duration such as ``"1h"``."""
    if value is None:
        raise errors.ValidationError("give the seconds to add, e.g. 3600 or '1h'",
                                     field="seconds")
    return build(models.SessionExtend, seconds=seconds(value, field="seconds"))


def snapshot_update(
    name: str | None = None,
    expires: datetime | str | None = None,
    clear_expiry: bool = False,
) -> models.SnapshotUpdate:
    """The body of ``PATCH /v1/snapshots/{id}``: only what is given; ``clear_expiry`` sends
    ``expires_at: null`` (the snapshot no longer expires), which an ``expires`` of None (not
    given) does not."""
    if not isinstance(clear_expiry, bool):
        raise errors.ValidationError(f"expected True or False, got {clear_expiry!r}",
                                     field="clear_expiry")
    if clear_expiry and expires is not None:
        raise errors.ValidationError("give expires_at or clear_expiry, not both",
                                     field="clear_expiry")
    values: dict[str, Any] = {}
    if name is not None:
        values["name"] = name
    if clear_expiry:
        values["expires_at"] = None
    elif expires is not None:
        values["expires_at"] = expires_at(expires)
    try:
        return models.SnapshotUpdate(**values)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


# -- templates --------------------------------------------------------------------------------

#: The fields of ``create_template`` / ``update_template`` (besides the name).
TEMPLATE_FIELDS = (
    "name",
    "base_image",
    "from_template",
    "from_snapshot",
    "setup_script",
    "start_cmd",
    "ready_when",
    "env",
    "build_env",
    "cpu",
    "memory_mb",
    "tags",
)
_BASE_FIELDS = {"base_image": "image", "from_template": "template_id",
                "from_snapshot": "snapshot_id"}
_READY_KINDS = ("port", "http_url", "command")
#: ``update_template``: fields that cannot be removed (only changed)
_REQUIRED_FIELDS = ("name", "cpu", "memory_mb")

ReadyWhen = models.ReadyCheck | Mapping[str, Any]


def ready_check(value: ReadyWhen | None, *, field: str = "ready_when") -> models.ReadyCheck | None:
    """A :class:`ReadyCheck`, or a mapping of its fields (``{"port": 8080}``); exactly one of
    ``port``, ``http_url`` and ``command``."""
    if value is None:
        return None
    if isinstance(value, models.ReadyCheck):
        check = value
    elif isinstance(value, Mapping):
        check = build(models.ReadyCheck, field, **dict(value))
    else:
        raise errors.ValidationError(
            f"expected a ReadyCheck or a mapping such as {{'port': 8080}}, got {value!r}",
            field=field,
        )
    given = [k for k in _READY_KINDS if getattr(check, k) is not None]
    if len(given) != 1:
        got = f"got {', '.join(given)}" if given else "got none"
        raise errors.ValidationError(
            f"give exactly one of port, http_url, command; {got}", field=field
        )
    return check


def template_base(values: Mapping[str, str | None]) -> models.TemplateBase | None:
    """``base_image`` / ``from_template`` / ``from_snapshot`` (at most one) -> the base; None
    when none is given (the server's default image)."""
    given = {k: v for k, v in values.items() if k in _BASE_FIELDS and v is not None}
    if len(given) > 1:
        raise errors.ValidationError(
            f"give one of base_image, from_template, from_snapshot; got {', '.join(given)}",
            field="base",
        )
    if not given:
        return None
    key, value = next(iter(given.items()))
    return build(models.TemplateBase, "base", **{_BASE_FIELDS[key]: value})


def _tags(value: Iterable[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable):
        raise errors.ValidationError(f"expected a list of strings, got {value!r}", field="tags")
    return list(value)


def _map(value: Mapping[str, str] | None, field: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise errors.ValidationError(f"expected a mapping of strings, got {value!r}", field=field)
    return dict(value)


#: pydantic's words for the commonest problems of a spec, in the spec's own words
_SPEC_WORDS = {"too_short": "must not be empty", "extra_forbidden": "unknown field",
               "missing": "is required"}


def spec_path(loc: Iterable[Any]) -> str:
    """``("steps", 3, "apt", "packages")`` -> ``steps[3].apt.packages``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def template_spec(data: Any) -> models.TemplateSpec:
    """A spec (a mapping, as read from JSON or YAML) checked; the error names the field path
    and the reason (``steps[3].apt.packages: must not be empty``)."""
    if isinstance(data, models.TemplateSpec):
        return data
    if not isinstance(data, Mapping):
        raise errors.ValidationError(f"must be a mapping, got {type(data).__name__}",
                                     field="spec")
    try:
        return models.TemplateSpec.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        msg = _SPEC_WORDS.get(str(first.get("type")), str(first.get("msg", "invalid value")))
        for lead in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(lead)
        msg = msg[:1].lower() + msg[1:]
        path = spec_path(first.get("loc", ()))
        raise errors.ValidationError(f"{path}: {msg}", field=path or "spec") from None


def template_create(name: str, **values: Any) -> models.TemplateCreate:
    """The body of ``POST /v1/templates``; ``values`` are :data:`TEMPLATE_FIELDS`, or ``spec``
    (a :class:`~tenkibox.models.TemplateSpec` or a mapping) alone."""
    if values.get("spec") is not None:
        others = sorted(k for k, v in values.items() if k != "spec" and v is not None)
        if others:
            raise errors.ValidationError(f"give a spec or the fields, not both (also given: "
                                         f"{', '.join(others)})", field="spec")
        return models.TemplateCreate(name=name, spec=template_spec(values["spec"]))
    values.pop("spec", None)
    unknown = sorted(set(values) - set(TEMPLATE_FIELDS))
    if unknown:
        raise errors.ValidationError(f"unknown field {unknown[0]!r}", field=unknown[0])
    return build(
        models.TemplateCreate,
        name=name,
        base=template_base(values),
        setup_script=values.get("setup_script"),
        start_cmd=values.get("start_cmd"),
        ready_when=ready_check(values.get("ready_when")),
        env=_map(values.get("env"), "env"),
        build_env=_map(values.get("build_env"), "build_env"),
        cpu=values.get("cpu"),
        memory_mb=values.get("memory_mb"),
        tags=_tags(values.get("tags")),
    )


def template_update(fields: Mapping[str, Any]) -> models.TemplateUpdate:
    """The body of ``PATCH /v1/templates/{id}``: only the fields given, where None removes
    ``setup_script``, ``start_cmd``, ``ready_when``, ``env``, ``build_env`` or ``tags``, and a
    base given as None (only) goes back to the default image."""
    unknown = sorted(set(fields) - set(TEMPLATE_FIELDS))
    if unknown:
        raise errors.ValidationError(
            f"unknown field {unknown[0]!r} (valid: {', '.join(TEMPLATE_FIELDS)})",
            field=unknown[0],
        )
    for name in _REQUIRED_FIELDS:
        if name in fields and fields[name] is None:
            raise errors.ValidationError("cannot be removed, only changed", field=name)
    values: dict[str, Any] = {}
    if any(k in fields for k in _BASE_FIELDS):
        values["base"] = template_base(fields)
    converters: dict[str, Callable[[Any], Any]] = {
        "ready_when": ready_check,
        "env": lambda v: _map(v, "env"),
        "build_env": lambda v: _map(v, "build_env"),
        "tags": _tags,
    }
    for name, value in fields.items():
        if name in _BASE_FIELDS:
            continue
        convert = converters.get(name)
        values[name] = convert(value) if convert is not None and value is not None else value
    try:
        return models.TemplateUpdate(**values)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def build_offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise errors.ValidationError(
            f"must be a character offset >= 0, got {offset!r}", field="offset"
        )
    return offset


QuotaValues = Mapping[str, int | None] | models.Quotas


def quotas(value: QuotaValues | None, *, field: str = "quotas") -> models.Quotas | None:
    """Quotas by name (``{"max_volumes": 10}``, None: no limit) or a :class:`Quotas`.

    Only the names given are set on the result, so that an update sends just those (an
    explicit None removes that limit).
    """
    if value is None or isinstance(value, models.Quotas):
        return value
    if not isinstance(value, Mapping):
        raise errors.ValidationError(
            f"expected a mapping of quota names to limits, got {value!r}", field=field
        )
    for name, limit in value.items():
        if name not in models.QUOTA_NAMES:
            raise errors.ValidationError(
                f"unknown quota {name!r} (valid: {', '.join(models.QUOTA_NAMES)})", field=field
            )
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise errors.ValidationError(
                f"expected an integer or None (no limit), got {limit!r}", field=f"{field}.{name}"
            )
    try:
        return models.Quotas(**dict(value))
    except pydantic.ValidationError as exc:
        raise validation_error(exc, field) from None


def workspace_create(name: str, quota_values: QuotaValues | None) -> models.WorkspaceCreate:
    return build(models.WorkspaceCreate, name=name, quotas=quotas(quota_values))


def workspace_update(
    name: str | None, quota_values: QuotaValues | None
) -> models.WorkspaceUpdate:
    return build(models.WorkspaceUpdate, name=name, quotas=quotas(quota_values))


def api_key_create(
    workspace_id: str,
    name: str | None,
    expires: datetime | str | None,
    admin: bool,
) -> models.ApiKeyCreate:
    if not isinstance(admin, bool):
        raise errors.ValidationError(f"expected True or False, got {admin!r}", field="admin")
    return build(
        models.ApiKeyCreate,
        workspace_id=workspace_id,
        name=name,
        expires_at=expires_at(expires),
        admin=admin or None,
    )


#: ``GET /v1/audit``: entries per page.
AUDIT_LIMIT_MIN, AUDIT_LIMIT_MAX, AUDIT_LIMIT_DEFAULT = 1, 1000, 100


def audit_params(
    workspace_id: str | None, limit: int, before_id: int | None
) -> dict[str, str | int]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not (
        AUDIT_LIMIT_MIN <= limit <= AUDIT_LIMIT_MAX
    ):
        raise errors.ValidationError(
            f"must be an integer between {AUDIT_LIMIT_MIN} and {AUDIT_LIMIT_MAX}, got {limit!r}",
            field="limit",
        )
    params: dict[str, str | int] = {"limit": limit}
    if workspace_id is not None:
        params["workspace_id"] = workspace_id
    if before_id is not None:
        if isinstance(before_id, bool) or not isinstance(before_id, int):
            raise errors.ValidationError(
                f"expected an audit entry id (integer), got {before_id!r}", field="before_id"
            )
        params["before_id"] = before_id
    return params


def to_bytes(data: str | bytes | bytearray | memoryview) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str | None) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.InternalError(f"malformed base64 data from server: {exc}") from exc


def exec_request(
    argv: tuple[str, ...] | list[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    stdin: str | bytes | bool | None = None,
) -> models.ExecRequest:
    """``stdin``: data (written then closed), ``True`` (keep a pipe open), or None/False."""
    if not argv:
        raise errors.ValidationError("give the program to run", field="argv")
    data = None if stdin is None or isinstance(stdin, bool) else b64encode(to_bytes(stdin))
    return build(
        models.ExecRequest,
        argv=[str(a) for a in argv],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        timeout_s=timeout,
        stdin=bool(stdin is True or data is not None) or None,
        stdin_data=data,
    )


def expires_at(value: datetime | str | None, *, field: str = "expires_at") -> datetime | None:
    """An expiry: an aware ``datetime`` or an RFC 3339 string; naive times are taken as UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise errors.ValidationError(
                f"cannot parse {value!r} as an RFC 3339 time (example: 2026-03-20T12:00:00Z)",
                field=field,
            ) from None
    if not isinstance(value, datetime):
        raise errors.ValidationError(
            f"expected a datetime or an RFC 3339 string, got {value!r}", field=field
        )
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def format_duration(secs: float) -> str:
    """``600`` -> ``"10m"``, ``5400`` -> ``"1h30m"``, ``2.5`` -> ``"2.5s"``."""
    if secs < 60:
        return f"{secs:g}s" if secs != int(secs) else f"{int(secs)}s"
    total = round(secs)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""]
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Calls, one per REST endpoint (docs/api.md)


def health() -> Call[models.ServerInfo]:
    return Call("GET", "/v1/health", _model(models.ServerInfo))


def shutdown_server() -> Call[None]:
    return Call("POST", "/v1/server/shutdown", _none)


def verify_store(repair: bool) -> Call[models.StoreReport]:
    return Call("POST", "/v1/admin/verify", _model(models.StoreReport),
                params={"repair": "true" if repair else "false"})


def create_session(body: models.SessionCreate) -> Call[models.Session]:
    return Call(
        "POST",
        "/v1/sessions",
        _model(models.Session),
        json=body.model_dump(mode="json", exclude_unset=True),
    )


def list_sessions(state: models.SessionState | str | None = None) -> Call[list[models.Session]]:
    params = None
    if state is not None:
        try:
            params = {"state": models.SessionState(state).value}
        except ValueError:
            names = ", ".join(s.value for s in models.SessionState)
            raise errors.ValidationError(
                f"expected one of {names}, got {state!r}", field="state"
            ) from None
    return Call("GET", "/v1/sessions", _model_list(models.Session), params=params)


def get_session(session_id: str) -> Call[models.Session]:
    return Call("GET", f"/v1/sessions/{seg(session_id)}", _model(models.Session))


def wait_session(session_id: str, timeout_s: float) -> Call[models.Session]:
    return Call(
        "GET",
        f"/v1/sessions/{seg(session_id)}/wait",
        _model(models.Session),
        params={"timeout_s": round(timeout_s, 3)},
        extra_timeout=timeout_s,
    )


def terminate_session(session_id: str) -> Call[models.Session]:
    return Call("DELETE", f"/v1/sessions/{seg(session_id)}", _model(models.Session))


def update_session(session_id: str, body: models.SessionUpdate) -> Call[models.Session]:
    """``PATCH``: only the fields set on ``body`` are sent."""
    return Call("PATCH", f"/v1/sessions/{seg(session_id)}", _model(models.Session),
                json=body.model_dump(mode="json", exclude_unset=True))


def extend_session(session_id: str, body: models.SessionExtend) -> Call[models.Session]:
    return Call("POST", f"/v1/sessions/{seg(session_id)}/extend", _model(models.Session),
                json=body.model_dump(mode="json"))


def pause_session(session_id: str) -> Call[models.Session]:
    return Call("POST", f"/v1/sessions/{seg(session_id)}/pause", _model(models.Session))


def resume_session(session_id: str) -> Call[models.Session]:
    return Call("POST", f"/v1/sessions/{seg(session_id)}/resume", _model(models.Session))


def expose_port(session_id: str, body: models.PortExpose) -> Call[models.PortExposure]:
    return Call("POST", f"/v1/sessions/{seg(session_id)}/ports", _model(models.PortExposure),
                json=body.model_dump(mode="json", exclude_unset=True))


def list_ports(session_id: str) -> Call[list[models.PortExposure]]:
    return Call("GET", f"/v1/sessions/{seg(session_id)}/ports",
                _model_list(models.PortExposure))


def unexpose_port(session_id: str, port: int) -> Call[None]:
    return Call("DELETE", f"/v1/sessions/{seg(session_id)}/ports/{guest_port(port)}", _none)


def start_process(session_id: str, body: models.ExecRequest) -> Call[models.ProcessInfo]:
    return Call(
        "POST",
        f"/v1/sessions/{seg(session_id)}/processes",
        _model(models.ProcessInfo),
        json=body.model_dump(mode="json", exclude_unset=True),
    )


def events_path(session_id: str, process_id: str) -> str:
    return f"/v1/sessions/{seg(session_id)}/processes/{seg(process_id)}/events"


def write_stdin(session_id: str, process_id: str, data: bytes) -> Call[None]:
    path = f"/v1/sessions/{seg(session_id)}/processes/{seg(process_id)}/stdin"
    return Call("POST", path, _none, content=data)


def close_stdin(session_id: str, process_id: str) -> Call[None]:
    path = f"/v1/sessions/{seg(session_id)}/processes/{seg(process_id)}/stdin/close"
    return Call("POST", path, _none)


def kill_process(session_id: str, process_id: str, signal: int = 9) -> Call[None]:
    path = f"/v1/sessions/{seg(session_id)}/processes/{seg(process_id)}/kill"
    return Call("POST", path, _none, params={"signal": int(signal)})


def read_file(session_id: str, path: str) -> Call[bytes]:
    return Call("GET", f"/v1/sessions/{seg(session_id)}/files", _raw, params={"path": path})


def write_file(
    session_id: str, path: str, data: bytes, mode: int = 0o644
) -> Call[models.FileWritten]:
    if not 0 <= mode <= 0o7777:
        raise errors.ValidationError(
            f"must be a permission mode such as 0o644, got {mode!r}", field="mode"
        )
    return Call(
        "PUT",
        f"/v1/sessions/{seg(session_id)}/files",
        _model(models.FileWritten),
        params={"path": path, "mode": mode},
        content=data,
    )


def attach_volume(session_id: str, body: models.VolumeAttach) -> Call[models.Session]:
    return Call(
        "POST",
        f"/v1/sessions/{seg(session_id)}/volumes",
        _model(models.Session),
        json=body.model_dump(mode="json"),
    )


def detach_volume(session_id: str, volume_id: str) -> Call[models.Session]:
    path = f"/v1/sessions/{seg(session_id)}/volumes/{seg(volume_id)}"
    return Call("DELETE", path, _model(models.Session))


def create_snapshot(body: models.SnapshotCreate) -> Call[models.Snapshot]:
    return Call(
        "POST",
        "/v1/snapshots",
        _model(models.Snapshot),
        json=body.model_dump(mode="json", exclude_unset=True),
    )


def list_snapshots(session_id: str | None = None) -> Call[list[models.Snapshot]]:
    params = {"session_id": session_id} if session_id else None
    return Call("GET", "/v1/snapshots", _model_list(models.Snapshot), params=params)


def get_snapshot(snapshot_id: str) -> Call[models.Snapshot]:
    return Call("GET", f"/v1/snapshots/{seg(snapshot_id)}", _model(models.Snapshot))


def wait_snapshot(snapshot_id: str, timeout_s: float) -> Call[models.Snapshot]:
    return Call(
        "GET",
        f"/v1/snapshots/{seg(snapshot_id)}/wait",
        _model(models.Snapshot),
        params={"timeout_s": round(timeout_s, 3)},
        extra_timeout=timeout_s,
    )


def update_snapshot(snapshot_id: str, body: models.SnapshotUpdate) -> Call[models.Snapshot]:
    """``PATCH``: only the fields set on ``body`` are sent (``expires_at`` None is a null:
    the expiry is removed)."""
    return Call("PATCH", f"/v1/snapshots/{seg(snapshot_id)}", _model(models.Snapshot),
                json=body.model_dump(mode="json", exclude_unset=True))


def delete_snapshot(snapshot_id: str) -> Call[models.Snapshot]:
    return Call("DELETE", f"/v1/snapshots/{seg(snapshot_id)}", _model(models.Snapshot))


def list_images() -> Call[list[models.Image]]:
    return Call("GET", "/v1/images", _model_list(models.Image))


def create_volume(body: models.VolumeCreate) -> Call[models.Volume]:
    return Call("POST", "/v1/volumes", _model(models.Volume), json=body.model_dump(mode="json"))


def list_volumes() -> Call[list[models.Volume]]:
    return Call("GET", "/v1/volumes", _model_list(models.Volume))


def get_volume(volume_id: str) -> Call[models.Volume]:
    return Call("GET", f"/v1/volumes/{seg(volume_id)}", _model(models.Volume))


def delete_volume(volume_id: str) -> Call[models.Volume]:
    return Call("DELETE", f"/v1/volumes/{seg(volume_id)}", _model(models.Volume))


def create_workspace(body: models.WorkspaceCreate) -> Call[models.Workspace]:
    return Call("POST", "/v1/workspaces", _model(models.Workspace),
                json=body.model_dump(mode="json", exclude_unset=True))


def list_workspaces() -> Call[list[models.Workspace]]:
    return Call("GET", "/v1/workspaces", _model_list(models.Workspace))


def get_workspace(workspace_id: str) -> Call[models.Workspace]:
    return Call("GET", f"/v1/workspaces/{seg(workspace_id)}", _model(models.Workspace))


def update_workspace(workspace_id: str, body: models.WorkspaceUpdate) -> Call[models.Workspace]:
    """``PATCH``: only the fields set on ``body`` are sent (a quota set to None is a null)."""
    return Call("PATCH", f"/v1/workspaces/{seg(workspace_id)}", _model(models.Workspace),
                json=body.model_dump(mode="json", exclude_unset=True))


def delete_workspace(workspace_id: str) -> Call[models.Workspace]:
    return Call("DELETE", f"/v1/workspaces/{seg(workspace_id)}", _model(models.Workspace))


def workspace_usage(workspace_id: str) -> Call[models.Usage]:
    return Call("GET", f"/v1/workspaces/{seg(workspace_id)}/usage", _model(models.Usage))


def create_api_key(body: models.ApiKeyCreate) -> Call[models.ApiKeyCreated]:
    return Call("POST", "/v1/api-keys", _model(models.ApiKeyCreated),
                json=body.model_dump(mode="json", exclude_unset=True))


def list_api_keys(workspace_id: str | None = None) -> Call[list[models.ApiKey]]:
    params = {"workspace_id": workspace_id} if workspace_id is not None else None
    return Call("GET", "/v1/api-keys", _model_list(models.ApiKey), params=params)


def revoke_api_key(key_id: str) -> Call[models.ApiKey]:
    return Call("DELETE", f"/v1/api-keys/{seg(key_id)}", _model(models.ApiKey))


def list_audit(
    workspace_id: str | None = None,
    limit: int = AUDIT_LIMIT_DEFAULT,
    before_id: int | None = None,
) -> Call[list[models.AuditEntry]]:
    return Call("GET", "/v1/audit", _model_list(models.AuditEntry),
                params=audit_params(workspace_id, limit, before_id))


def host_status() -> Call[models.HostStatus]:
    return Call("GET", "/v1/host", _model(models.HostStatus))


def list_hosts() -> Call[list[models.HostInfo]]:
    return Call("GET", "/v1/hosts", _model_list(models.HostInfo))


def get_host(host_id: str) -> Call[models.HostInfo]:
    return Call("GET", f"/v1/hosts/{seg(host_id)}", _model(models.HostInfo))


def drain_host(host_id: str) -> Call[models.HostInfo]:
    return Call("POST", f"/v1/hosts/{seg(host_id)}/drain", _model(models.HostInfo))


def undrain_host(host_id: str) -> Call[models.HostInfo]:
    return Call("POST", f"/v1/hosts/{seg(host_id)}/undrain", _model(models.HostInfo))


def remove_host(host_id: str, force: bool = False) -> Call[None]:
    if not isinstance(force, bool):
        raise errors.ValidationError(f"expected True or False, got {force!r}", field="force")
    return Call("DELETE", f"/v1/hosts/{seg(host_id)}", _none,
                params={"force": "true"} if force else None)


def create_template(body: models.TemplateCreate) -> Call[models.Template]:
    return Call("POST", "/v1/templates", _model(models.Template),
                json=body.model_dump(mode="json", exclude_unset=True))


def list_templates() -> Call[list[models.Template]]:
    return Call("GET", "/v1/templates", _model_list(models.Template))


def get_template(template_id: str) -> Call[models.Template]:
    return Call("GET", f"/v1/templates/{seg(template_id)}", _model(models.Template))


def update_template(template_id: str, body: models.TemplateUpdate) -> Call[models.Template]:
    """``PATCH``: only the fields set on ``body`` are sent (None is a null: removed)."""
    return Call("PATCH", f"/v1/templates/{seg(template_id)}", _model(models.Template),
                json=body.model_dump(mode="json", exclude_unset=True))


def delete_template(template_id: str, force: bool = False) -> Call[models.Template]:
    if not isinstance(force, bool):
        raise errors.ValidationError(f"expected True or False, got {force!r}", field="force")
    return Call("DELETE", f"/v1/templates/{seg(template_id)}", _model(models.Template),
                params={"force": "true"} if force else None)


def build_template(template_id: str) -> Call[models.TemplateBuild]:
    return Call("POST", f"/v1/templates/{seg(template_id)}/builds", _model(models.TemplateBuild))


def list_builds(template_id: str) -> Call[list[models.TemplateBuild]]:
    return Call("GET", f"/v1/templates/{seg(template_id)}/builds",
                _model_list(models.TemplateBuild))


def get_build(template_id: str, build_id: str) -> Call[models.TemplateBuild]:
    return Call("GET", f"/v1/templates/{seg(template_id)}/builds/{seg(build_id)}",
                _model(models.TemplateBuild))


def wait_build(template_id: str, build_id: str, timeout_s: float) -> Call[models.TemplateBuild]:
    return Call(
        "GET",
        f"/v1/templates/{seg(template_id)}/builds/{seg(build_id)}/wait",
        _model(models.TemplateBuild),
        params={"timeout_s": round(timeout_s, 3)},
        extra_timeout=timeout_s,
    )


def build_log_path(template_id: str, build_id: str) -> str:
    return f"/v1/templates/{seg(template_id)}/builds/{seg(build_id)}/log"


# --------------------------------------------------------------------------------------------
# Flows: multi-step operations as generators of calls, driven by either client.
# Each ``yield call`` receives the parsed answer; the generator's return value is the result.

Flow = Generator[Call[Any], Any, T]


def _check_timeout(timeout: float | None, *, field: str = "timeout") -> None:
    if timeout is not None and (math.isnan(timeout) or timeout < 0):
        raise errors.ValidationError(f"must be >= 0 seconds or None, got {timeout!r}", field=field)


def _still(
    kind: str, ident: str, state: str, timeout: float, record: pydantic.BaseModel
) -> errors.WaitTimeoutError:
    return errors.WaitTimeoutError(
        f"{kind} {ident} is still {state} after {format_duration(timeout)}; "
        "it continues in the background",
        details=record.model_dump(mode="json"),
    )


_SESSION_BUSY = (
    models.SessionState.CREATING,
    models.SessionState.PAUSING,
    models.SessionState.RESUMING,
)
_SESSION_OVER = (
    models.SessionState.FAILED,
    models.SessionState.TERMINATING,
    models.SessionState.TERMINATED,
)


def session_paused(record: models.Session) -> models.Session | None:
    """The end of a pause wait: the PAUSED record, None to keep waiting; raise when the pause
    failed (the session runs on: SnapshotFailedError) or the session ended."""
    state = record.state
    if state in _SESSION_BUSY:
        return None
    reason = record.state_reason or "no reason given"
    if state in _SESSION_OVER:
        raise errors.SessionFailedError(
            f"session {record.id} is {state.value}: {reason}",
            details=record.model_dump(mode="json"),
        )
    if state != models.SessionState.PAUSED and reason.startswith("pause failed"):
        raise errors.SnapshotFailedError(
            f"session {record.id} was not paused (it is {state.value}): {reason}",
            details=record.model_dump(mode="json"),
        )
    return record


def session_ready(record: models.Session) -> models.Session | None:
    """The record when the wait is over, None to keep waiting; raise when it failed."""
    state = record.state
    if state in _SESSION_BUSY:
        return None
    if state in (
        models.SessionState.FAILED,
        models.SessionState.TERMINATING,
        models.SessionState.TERMINATED,
    ):
        reason = record.state_reason or "no reason given"
        raise errors.SessionFailedError(
            f"session {record.id} is {state.value}: {reason}",
            details=record.model_dump(mode="json"),
        )
    return record


def wait_session_flow(
    session_id: str,
    timeout: float | None,
    record: models.Session | None = None,
    done: Callable[[models.Session], models.Session | None] = session_ready,
) -> Flow[models.Session]:
    _check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if record is not None and done(record) is not None:
            return record
        remaining = LONG_POLL_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0 and record is not None:
            raise _still("session", session_id, record.state.value, timeout or 0.0, record)
        record = yield wait_session(session_id, max(0.0, min(LONG_POLL_S, remaining)))


def pause_flow(session_id: str, wait: bool, timeout: float | None) -> Flow[models.Session]:
    """Pause; with ``wait``, until PAUSED (SnapshotFailedError if the capture failed and the
    session runs on; WaitTimeoutError after ``timeout`` seconds, the pause goes on)."""
    _check_timeout(timeout)
    record = yield pause_session(session_id)
    if not wait:
        return record
    return (yield from wait_session_flow(session_id, timeout, record, session_paused))


def resume_flow(session_id: str, wait: bool, timeout: float | None) -> Flow[models.Session]:
    """Resume; with ``wait``, until it runs (SessionFailedError if the restore failed)."""
    _check_timeout(timeout)
    record = yield resume_session(session_id)
    if not wait:
        return record
    return (yield from wait_session_flow(session_id, timeout, record))


def create_and_wait_flow(body: models.SessionCreate, timeout: float | None) -> Flow[models.Session]:
    _check_timeout(timeout)
    record = yield create_session(body)
    return (yield from wait_session_flow(record.id, timeout, record))


def snapshot_ready(record: models.Snapshot) -> models.Snapshot | None:
    state = record.state
    if state == models.SnapshotState.CREATING:
        return None
    if state == models.SnapshotState.READY:
        return record
    reason = record.state_reason or (
        "no reason given" if state == models.SnapshotState.FAILED else "it is being deleted"
    )
    raise errors.SnapshotFailedError(
        f"snapshot {record.id} is {state.value}: {reason}", details=record.model_dump(mode="json")
    )


def wait_snapshot_flow(
    snapshot_id: str, timeout: float | None, record: models.Snapshot | None = None
) -> Flow[models.Snapshot]:
    _check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if record is not None and snapshot_ready(record) is not None:
            return record
        remaining = LONG_POLL_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0 and record is not None:
            raise _still("snapshot", snapshot_id, record.state.value, timeout or 0.0, record)
        record = yield wait_snapshot(snapshot_id, max(0.0, min(LONG_POLL_S, remaining)))


def create_snapshot_flow(
    body: models.SnapshotCreate, wait: bool, timeout: float | None
) -> Flow[models.Snapshot]:
    _check_timeout(timeout)
    record = yield create_snapshot(body)
    if not wait:
        return record
    return (yield from wait_snapshot_flow(record.id, timeout, record))


def build_ended(record: models.TemplateBuild) -> bool:
    return record.state in (models.BuildState.READY, models.BuildState.FAILED)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def wait_build_flow(
    template_id: str,
    build_id: str,
    timeout: float | None,
    record: models.TemplateBuild | None = None,
    *,
    deadline: float | None = None,
) -> Flow[models.TemplateBuild]:
    """Long polls until the build is READY or FAILED (returned either way); WaitTimeoutError
    after ``timeout`` seconds (or at ``deadline``, a ``time.monotonic()``, when given)."""
    _check_timeout(timeout)
    if deadline is None:
        deadline = _deadline(timeout)
    while True:
        if record is not None and build_ended(record):
            return record
        remaining = LONG_POLL_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0 and record is not None:
            raise _still("build", build_id, record.state.value, timeout or 0.0, record)
        record = yield wait_build(template_id, build_id, max(0.0, min(LONG_POLL_S, remaining)))


class BuildFollower:
    """Following a build's log until the build ends (or the time is up), across reconnects:
    each connection asks for the log from the characters already seen."""

    def __init__(self, build: models.TemplateBuild, timeout: float | None) -> None:
        _check_timeout(timeout)
        self.build = build
        self.timeout = timeout
        self.deadline = _deadline(timeout)
        self.offset = 0
        #: the server closed the stream: the build has ended
        self.ended = False

    @property
    def path(self) -> str:
        return build_log_path(self.build.template_id, self.build.id)

    @property
    def params(self) -> dict[str, int]:
        return {"offset": self.offset}

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    @property
    def reading(self) -> bool:
        """Read (again): the build has not ended and there is time left."""
        return not self.ended and not self.expired

    def stream_timeout(self, base: float | None) -> httpx.Timeout:
        """A silent stream is re-opened after at most LONG_POLL_S (a dead connection is
        noticed), and never read past the deadline."""
        left = self.remaining()
        read = LONG_POLL_S if left is None else max(0.01, min(LONG_POLL_S, left))
        return httpx.Timeout(base, read=read)

    def feed(self, text: str) -> None:
        self.offset += len(text)

    def finish(self) -> Flow[models.TemplateBuild]:
        """The build's final record (WaitTimeoutError when the time ran out first)."""
        b = self.build
        if self.ended:  # it has ended: one answer at once (a grace if the clock ran out)
            record = yield wait_build(b.template_id, b.id, 5.0)
            return (yield from wait_build_flow(b.template_id, b.id, self.timeout, record,
                                               deadline=time.monotonic()))
        return (yield from wait_build_flow(b.template_id, b.id, self.timeout,
                                           deadline=self.deadline or time.monotonic()))


def read_timed_out(exc: BaseException) -> bool:
    """A transport error that is only a read bound passing (a following stream's, set to the
    wait's deadline): the follower opens it again or reports the wait's own timeout."""
    return isinstance(exc.__cause__, httpx.ReadTimeout)


def snapshot_create(
    session_id: str, name: str | None, expires: datetime | str | None
) -> models.SnapshotCreate:
    return build(
        models.SnapshotCreate,
        session_id=session_id,
        name=name,
        expires_at=expires_at(expires),
    )


# --------------------------------------------------------------------------------------------
# Processes: the NDJSON event stream and the result


class EventDecoder:
    """Incremental NDJSON decoder: ``feed(chunk)`` returns the complete events in it."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[models.ProcessEvent]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [ev for ev in (self._line(line) for line in lines) if ev is not None]

    def close(self) -> list[models.ProcessEvent]:
        rest, self._buf = self._buf, b""
        ev = self._line(rest)
        return [ev] if ev is not None else []

    @staticmethod
    def _line(line: bytes) -> models.ProcessEvent | None:
        line = line.strip()
        if not line:
            return None
        try:
            return models.ProcessEvent.model_validate(json.loads(line))
        except (ValueError, pydantic.ValidationError) as exc:
            raise errors.InternalError(
                f"malformed process event from server: {line[:200]!r} ({_one_line(exc)})"
            ) from exc


def parse_events(data: bytes) -> list[models.ProcessEvent]:
    """All events of a complete NDJSON document."""
    dec = EventDecoder()
    return dec.feed(data) + dec.close()


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a finished command.

    ``stdout``/``stderr`` are the output as text (UTF-8, undecodable bytes replaced);
    ``stdout_bytes``/``stderr_bytes`` the raw bytes. ``exit_code`` is the command's status
    (128+N when killed by signal N; 124 when its timeout killed it, with ``timed_out`` set).
    """

    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    timed_out: bool = False
    argv: tuple[str, ...] = ()
    process_id: str | None = None

    @cached_property
    def stdout(self) -> str:
        """Standard output as text (UTF-8, undecodable bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @cached_property
    def stderr(self) -> str:
        """Standard error as text (UTF-8, undecodable bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.exit_code == 0 and not self.timed_out

    def check(self) -> ExecResult:
        """Return ``self`` when the command exited 0, else raise :class:`CommandError`."""
        if self.ok:
            return self
        what = " ".join(self.argv) or "command"
        if self.timed_out:
            why = "timed out"
        else:
            why = f"exited with code {self.exit_code}"
        tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        msg = f"{what[:200]} {why}" + (f": {tail[0][:300]}" if tail else "")
        raise errors.CommandError(msg, result=self)

    def __repr__(self) -> str:
        return (
            f"ExecResult(exit_code={self.exit_code}, timed_out={self.timed_out}, "
            f"stdout={self.stdout_bytes[:80]!r}, stderr={self.stderr_bytes[:80]!r})"
        )


@dataclass
class OutputCollector:
    """Folds process events into output and an exit status."""

    process_id: str
    argv: tuple[str, ...] = ()
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit_code: int | None = None
    timed_out: bool = False

    @property
    def done(self) -> bool:
        return self.exit_code is not None

    def apply(self, event: models.ProcessEvent) -> tuple[Stream, bytes] | None:
        """Record one event; returns ``(stream, data)`` for output, None otherwise."""
        if event.type == "stdout" or event.type == "stderr":
            data = b64decode(event.data)
            (self.stdout if event.type == "stdout" else self.stderr).extend(data)
            return (event.type, data)
        if event.type == "exit":
            self.exit_code = (
                124
                if event.exit_code is None and event.timed_out
                else (event.exit_code if event.exit_code is not None else -1)
            )
            self.timed_out = event.timed_out
            return None
        raise errors.InternalError(
            f"process {self.process_id} failed: {event.message or 'unknown error'}"
        )

    def ended(self) -> None:
        """The stream ended: it must have carried the exit event."""
        if self.exit_code is None:
            raise errors.ConnectionError(
                f"the event stream of process {self.process_id} ended before the process exited"
            )

    def result(self) -> ExecResult:
        self.ended()
        assert self.exit_code is not None
        return ExecResult(
            exit_code=self.exit_code,
            stdout_bytes=bytes(self.stdout),
            stderr_bytes=bytes(self.stderr),
            timed_out=self.timed_out,
            argv=self.argv,
            process_id=self.process_id,
        )


def shell_argv(command: str) -> tuple[str, ...]:
    return ("/bin/sh", "-c", command)


class ProcessState:
    """The client-side state of one process's event stream, shared by both clients.

    Decoded output waits in a queue until it is taken with :meth:`pop`, so that a consumer that
    stops iterating half-way loses nothing: the next iteration (or ``wait()``) continues.
    """

    def __init__(self, process_id: str, argv: tuple[str, ...] = ()) -> None:
        self._decoder = EventDecoder()
        self.collector = OutputCollector(process_id, argv)
        self._pending: deque[tuple[Stream, bytes]] = deque()

    def feed(self, chunk: bytes) -> None:
        for event in self._decoder.feed(chunk):
            self._push(event)

    def end(self) -> None:
        """The stream ended; raises when it carried no exit event."""
        for event in self._decoder.close():
            self._push(event)
        self.collector.ended()

    def _push(self, event: models.ProcessEvent) -> None:
        if self.collector.done:
            return
        out = self.collector.apply(event)
        if out is not None and out[1]:
            self._pending.append(out)

    def pop(self) -> tuple[Stream, bytes] | None:
        return self._pending.popleft() if self._pending else None

    @property
    def exited(self) -> bool:
        """The exit event has been read (output may still be queued)."""
        return self.collector.done

    @property
    def finished(self) -> bool:
        """Exited and all output taken."""
        return self.collector.done and not self._pending


P = ParamSpec("P")
R = TypeVar("R")


class alias(Generic[P, R]):
    """``sessions.create = alias(Client.create)``: the namespace spelling of a client method.

    Reading the attribute on a namespace instance returns the client's bound method itself, so
    both spellings share one implementation, signature and docstring.
    """

    def __init__(self, func: Callable[Concatenate[Any, P], R]) -> None:
        self._name = func.__name__
        self.__doc__ = func.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> alias[P, R]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[P, R]: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj._client, self._name)  # type: ignore[attr-defined]

"""``tenki.sandbox.v1.SandboxService``: the official SDKs' control plane over our own.

Every method takes the wire request, the caller (``Principal``, from the API key) and the
gRPC context, and answers through the control plane exactly as the REST routes do: the same
checks, the same records, the same errors (translated once, by ``status.TABLE``). Methods that
are not here answer UNIMPLEMENTED naming themselves (``server.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pydantic

from .. import longpoll
from ..control import egress
from ..control.keys import Principal
from ..control.plane import ControlPlane
from ..control.records import key_of
from ..errors import ConflictError, PermissionDeniedError, TenkiError, ValidationError
from ..models import (
    Session,
    SessionCreate,
    SessionExtend,
    SessionUpdate,
    SnapshotCreate,
    SnapshotUpdate,
    VolumeAttach,
    VolumeCreate,
    VolumeMount,
    VolumeUpdate,
)
from ..store.tables import SessionRow
from . import convert, proto
from .credentials import Credentials

#: states a session passes through on its own; a wait ends at any other
MOVING = frozenset({"CREATING", "PAUSING", "RESUMING", "TERMINATING"})
FINAL = frozenset({"TERMINATED", "FAILED"})
PAGE_DEFAULT, PAGE_MAX = 50, 100
WAIT_MAX_S = 3600.0
#: our model's field names as the wire spells them, for error messages
WIRE_FIELDS = {"cpu": "cpu_cores", "max_duration_s": "max_duration", "path": "mount_path",
               "read_only": "readonly"}


def M(name: str) -> Any:
    return proto.message(name)


def model(cls: type[pydantic.BaseModel], **fields: Any) -> Any:
    """Our request model from wire fields; a refusal names the wire's field."""
    try:
        return cls(**fields)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        field = ".".join(WIRE_FIELDS.get(p, p) for p in loc) or None
        raise ValidationError(err.get("msg", "invalid"), field=field) from exc


def page(items: list[Any], size: int, token: str) -> tuple[list[Any], str]:
    if size < 0 or size > PAGE_MAX:
        raise ValidationError(f"must be 0..{PAGE_MAX}, got {size}", field="page_size")
    try:
        start = int(token) if token else 0
    except ValueError as exc:
        raise ValidationError("not a page token of this server", field="page_token") from exc
    size = size or PAGE_DEFAULT
    chunk = items[start:start + size]
    return chunk, str(start + size) if start + size < len(items) else ""


#: CreateSession fields this server acts on (or that change nothing here: ``sticky``, as no
#: session is ever stopped for idling). Any other field set is refused, naming it, rather than
#: ignored: a sandbox must not silently lack what its creator asked for.
CREATE_FIELDS = frozenset({
    "owner_id", "owner_type", "allow_inbound", "allow_outbound", "egress", "max_duration",
    "cpu_cores", "memory_mb", "metadata", "env", "name", "volumes", "snapshot_id",
    "workspace_id", "disk_size_gb", "tags", "wait_ready", "wait_for_runtime",
    "template_spec_id", "sticky",
})


def _refuse_unsupported(req: Any) -> None:
    for field, _value in req.ListFields():
        if field.name not in CREATE_FIELDS:
            raise ValidationError("is not supported by this tenki server", field=field.name)


def network_fields(req: Any, enforced: bool) -> tuple[dict[str, Any], list[str]]:
    """CreateSession's network fields as our ``SessionCreate`` fields, and warnings.

    - ``egress`` (33): its lists checked by ``control/egress.py`` (INVALID_ARGUMENT naming
      ``egress.allow_domains.N``). With ``allow_outbound`` false they are ignored, as the
      SDKs document ("ignored when allow_outbound is false"): no outbound at all is stricter
      than any list; the answer says so in a warning.
    - ``allow_inbound`` (3): the SDKs send true unless told otherwise. On a host that cannot
      enforce network policies (so cannot expose ports) the session is made without inbound,
      shown as ``inbound_enabled: false`` and said in a warning, instead of refusing every
      SDK's default create. Anything that would restrict the guest (``allow_outbound`` false,
      an allow-list) is never dropped: on such a host it is refused (FAILED_PRECONDITION).
    Unset optional fields take our defaults (outbound on, inbound off)."""
    fields: dict[str, Any] = {}
    warnings: list[str] = []
    outbound = req.allow_outbound if req.HasField("allow_outbound") else True
    fields["allow_outbound"] = outbound
    if req.HasField("egress"):
        domains = egress.domains(list(req.egress.allow_domains), "egress.allow_domains")
        cidrs = egress.cidrs(list(req.egress.allow_cidrs), "egress.allow_cidrs")
        if outbound and (domains or cidrs):
            fields["egress"] = {"allow_domains": domains, "allow_cidrs": cidrs}
        elif domains or cidrs:
            warnings.append("egress allow-lists were ignored: allow_outbound is false, so the "
                            "sandbox opens no outbound connection at all")
    if req.HasField("allow_inbound") and req.allow_inbound:
        if enforced:
            fields["allow_inbound"] = True
        else:
            warnings.append("allow_inbound was asked, but this host cannot enforce network "
                            "policies (the server needs root and nftables): the sandbox has "
                            "no inbound access (inbound_enabled false)")
    return fields, warnings


class SandboxService:
    def __init__(self, plane: ControlPlane, credentials: Credentials, endpoint: str) -> None:
        self.plane = plane
        self.credentials = credentials
        self.endpoint = endpoint  # the data plane's address, as clients reach it

    # -- helpers -----------------------------------------------------------------------------
    def _ws(self, caller: Principal, asked: str = "") -> str:
        if asked and asked != caller.workspace_id and not caller.admin:
            raise PermissionDeniedError(f"workspace {asked} is not the API key's workspace")
        return asked or caller.workspace_id

    def _route(self, msg: Any, s: Session) -> None:
        """Endpoint, credential and route status, on a CreateSession/WaitSession answer."""
        msg.session.CopyFrom(convert.session(s))
        if s.state.value in FINAL:
            return
        msg.data_plane_endpoint = self.endpoint
        self._credential(msg.credential, s)
        running = s.state.value in ("READY", "RUNNING")
        msg.route_status = proto.enum_value(
            "DataPlaneRouteStatus",
            "DATA_PLANE_ROUTE_STATUS_VERIFIED" if running else "DATA_PLANE_ROUTE_STATUS_NOT_READY")

    def _credential(self, into: Any, s: Session) -> None:
        grant = self.credentials.issue(s.id, s.workspace_id)
        into.credential = self.credentials.encode(grant)
        into.expires_at.FromSeconds(int(grant.expires_at))

    async def _next(self, session_id: str, ws: str, before: str, timeout_s: float) -> Session:
        """The session once its state is no longer ``before`` (or as it is after the time)."""
        return await longpoll.until(self.plane.records.changes, key_of(SessionRow, session_id),
                                    lambda: self.plane.sessions.get(session_id, ws),
                                    lambda x: x.state.value != before, timeout_s, cap_s=None)

    async def _settle(self, session_id: str, ws: str, timeout_s: float) -> Session:
        s = self.plane.sessions.get(session_id, ws)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while s.state.value in MOVING and loop.time() < deadline:
            s = await self._next(session_id, ws, s.state.value, deadline - loop.time())
        return s

    # -- sessions ----------------------------------------------------------------------------
    async def CreateSession(self, req: Any, caller: Principal, ctx: Any) -> Any:
        _refuse_unsupported(req)
        ws = self._ws(caller, req.workspace_id if req.HasField("workspace_id") else "")
        fields: dict[str, Any] = {"env": dict(req.env), "metadata": dict(req.metadata)}
        if req.name:
            fields["name"] = req.name
        if req.tags:
            fields["metadata"][convert.TAGS_KEY] = ",".join(t.lower() for t in req.tags)
        if req.HasField("cpu_cores"):
            fields["cpu"] = req.cpu_cores
        if req.HasField("memory_mb"):
            fields["memory_mb"] = req.memory_mb
        if req.HasField("snapshot_id") and req.snapshot_id:
            fields["snapshot_id"] = req.snapshot_id
        if req.template_spec_id:
            fields["template_id"] = req.template_spec_id
        if req.HasField("max_duration") and req.max_duration.ToTimedelta():
            fields["max_duration_s"] = req.max_duration.ToTimedelta().total_seconds()
        fields["volumes"] = [model(VolumeMount, volume_id=v.volume_id, path=v.mount_path,
                                   read_only=v.readonly) for v in req.volumes]
        network, warnings = network_fields(req, self.plane.sessions.network_enforced)
        fields.update(network)
        body = model(SessionCreate, **fields)
        s = await self.plane.create_session(body, ws)
        if req.wait_ready or req.wait_for_runtime:
            s = await self._settle(s.id, ws, WAIT_MAX_S)
        out = M("CreateSessionResponse")()
        self._route(out, s)
        for text in warnings:
            out.warnings.add(message=text)
        if req.HasField("disk_size_gb") and req.disk_size_gb != convert.DISK_SIZE_GB:
            # answered, not refused (the TypeScript SDK asks for 5 by default), and not hidden
            out.warnings.add(message=f"disk_size_gb {req.disk_size_gb} was asked; sessions on "
                             f"this server have the image's {convert.DISK_SIZE_GB} GB disk")
        return out

    async def WaitSession(self, req: Any, caller: Principal,
                          ctx: Any) -> AsyncIterator[Any]:
        ws = caller.workspace_id
        s = self.plane.sessions.get(req.session_id, ws)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_MAX_S
        while True:
            out = M("WaitSessionResponse")()
            self._route(out, s)
            yield out
            if s.state.value not in MOVING or loop.time() >= deadline:
                return
            s = await self._next(req.session_id, ws, s.state.value, deadline - loop.time())

    async def GetSession(self, req: Any, caller: Principal, ctx: Any) -> Any:
        return M("GetSessionResponse")(
            session=convert.session(self.plane.sessions.get(req.session_id, caller.workspace_id)))

    def _sessions(self, ws: str, include_terminated: bool, tags: list[str],
                  states: set[str]) -> list[Any]:
        rows = self.plane.sessions.query(ws)
        out = []
        for s in reversed(rows):  # newest first
            if not include_terminated and not states and s.state.value in FINAL:
                continue
            if states and s.state.value not in states:
                continue
            if tags and not set(tags) <= set(convert.tags_of(s.metadata)):
                continue
            out.append(convert.session(s))
        return out

    async def ListSessions(self, req: Any, caller: Principal, ctx: Any) -> Any:
        items = self._sessions(caller.workspace_id, req.include_terminated, list(req.tags), set())
        chunk, token = page(items, req.page_size, req.page_token)
        return M("ListSessionsResponse")(sessions=chunk, next_page_token=token)

    async def ListWorkspaceSandboxes(self, req: Any, caller: Principal,
                                     ctx: Any) -> Any:
        ws = self._ws(caller, req.workspace_id)
        states: set[str] = set()
        for wire in ([req.state] if req.state else []) + list(req.states):
            states |= convert.session_states_of(wire)
        items = self._sessions(ws, req.include_terminated, list(req.tags), states)
        if req.search:
            needle = req.search.lower()
            items = [s for s in items if needle in s.name.lower() or needle in s.id]
        chunk, token = page(items, req.page_size, req.page_token)
        return M("ListWorkspaceSandboxesResponse")(sessions=chunk, next_page_token=token)

    async def UpdateSession(self, req: Any, caller: Principal, ctx: Any) -> Any:
        ws = caller.workspace_id
        current = self.plane.sessions.get(req.session_id, ws)
        fields: dict[str, Any] = {}
        if req.HasField("name"):
            fields["name"] = req.name or None
        if req.tags or req.clear_tags:
            meta = dict(current.metadata)
            meta.pop(convert.TAGS_KEY, None)
            if req.tags and not req.clear_tags:
                meta[convert.TAGS_KEY] = ",".join(t.lower() for t in req.tags)
            fields["metadata"] = meta
        s = await self.plane.sessions.update(req.session_id, model(SessionUpdate, **fields), ws)
        if req.HasField("max_duration") and req.max_duration.ToTimedelta().total_seconds() > 0:
            # a new limit counted from the session's start, as the product's max_duration is
            wanted = s.created_at + req.max_duration.ToTimedelta()
            if s.expires_at is None or wanted > s.expires_at:
                more = (wanted - (s.expires_at or datetime.now(UTC))).total_seconds()
                s = await self.plane.sessions.extend(req.session_id, max(more, 1.0), ws)
        return M("UpdateSessionResponse")(session=convert.session(s))

    async def ExtendSession(self, req: Any, caller: Principal, ctx: Any) -> Any:
        seconds = req.additional_duration.ToTimedelta().total_seconds()
        body = model(SessionExtend, seconds=seconds)
        s = await self.plane.sessions.extend(req.session_id, body.seconds, caller.workspace_id)
        return M("ExtendSessionResponse")(session=convert.session(s))

    async def TerminateSession(self, req: Any, caller: Principal,
                               ctx: Any) -> Any:
        s = await self.plane.sessions.terminate(req.session_id, ws=caller.workspace_id)
        return M("TerminateSessionResponse")(session=convert.session(s))

    async def TerminateSessions(self, req: Any, caller: Principal,
                                ctx: Any) -> Any:
        if not 1 <= len(req.session_ids) <= 100:
            raise ValidationError("give 1..100 session ids", field="session_ids")
        out = M("TerminateSessionsResponse")()
        for sid in req.session_ids:
            try:
                s = await self.plane.sessions.terminate(sid, ws=caller.workspace_id)
                out.sessions.append(convert.session(s))
            except TenkiError as exc:
                out.failures.add(session_id=sid, message=str(exc))
        return out

    async def CreateSessionCredential(self, req: Any, caller: Principal,
                                      ctx: Any) -> Any:
        s = self.plane.sessions.get(req.session_id, caller.workspace_id)
        if s.state.value in FINAL:
            raise ConflictError(f"session {s.id} is {s.state.value}"
                                + (" (terminated)" if s.state.value == "FAILED" else ""))
        out = M("CreateSessionCredentialResponse")()
        self._credential(out.credential, s)
        out.data_plane_endpoint = self.endpoint
        out.route_status = proto.enum_value(
            "DataPlaneRouteStatus", "DATA_PLANE_ROUTE_STATUS_VERIFIED"
            if s.state.value in ("READY", "RUNNING") else "DATA_PLANE_ROUTE_STATUS_NOT_READY")
        return out

    async def PauseSession(self, req: Any, caller: Principal, ctx: Any) -> Any:
        s = await self.plane.sessions.pause(req.session_id, caller.workspace_id,
                                            wait=not getattr(req, "async"))
        return M("PauseSessionResponse")(session=convert.session(s))

    async def ResumeSession(self, req: Any, caller: Principal, ctx: Any) -> Any:
        s = await self.plane.sessions.resume(req.session_id, caller.workspace_id, wait=True)
        return M("ResumeSessionResponse")(session=convert.session(s))

    # -- exposed ports -----------------------------------------------------------------------
    async def ExposePort(self, req: Any, caller: Principal, ctx: Any) -> Any:
        """The preview URL of a guest port (``host_address``: the listener's ``host:port``).
        Slugs and wildcard domains are not served here: a slug is refused, not ignored."""
        if req.HasField("slug") and req.slug:
            raise ValidationError("is not supported by this tenki server (previews are served "
                                  "on a port of their own, with a token)", field="slug")
        expires_at = req.expires_at.ToDatetime(tzinfo=UTC) if req.HasField("expires_at") \
            else None
        exposed = await self.plane.ports.expose(req.session_id, req.port, caller.workspace_id,
                                                expires_at=expires_at)
        out = M("ExposePortResponse")(host_address=urlsplit(exposed.url).netloc,
                                      port=exposed.port, preview_url=exposed.url)
        convert.stamp(out, "expires_at", exposed.expires_at)
        return out

    async def UnexposePort(self, req: Any, caller: Principal, ctx: Any) -> Any:
        await self.plane.ports.unexpose(req.session_id, req.port, caller.workspace_id)
        return M("UnexposePortResponse")()

    async def ListExposedPorts(self, req: Any, caller: Principal, ctx: Any) -> Any:
        out = M("ListExposedPortsResponse")()
        for exposed in self.plane.ports.list(req.session_id, caller.workspace_id):
            item = out.ports.add(port=exposed.port, preview_url=exposed.url)
            convert.stamp(item, "expires_at", exposed.expires_at)
        return out

    # -- snapshots ---------------------------------------------------------------------------
    async def CreateSnapshot(self, req: Any, caller: Principal,
                             ctx: Any) -> Any:
        fields: dict[str, Any] = {"session_id": req.session_id}
        if req.HasField("name") and req.name:
            fields["name"] = req.name
        if req.HasField("expires_at"):
            fields["expires_at"] = req.expires_at.ToDatetime(tzinfo=UTC)
        snap = await self.plane.snapshots.create(model(SnapshotCreate, **fields),
                                                 caller.workspace_id)
        if not getattr(req, "async"):  # the TypeScript SDK expects the finished snapshot
            snap = await self.plane.snapshots.wait(snap.id, WAIT_MAX_S, caller.workspace_id,
                                                   long_poll=False)
        return M("CreateSnapshotResponse")(snapshot=convert.snapshot(snap))

    async def GetSnapshot(self, req: Any, caller: Principal, ctx: Any) -> Any:
        snap = self.plane.snapshots.get(req.snapshot_id, caller.workspace_id)
        return M("GetSnapshotResponse")(snapshot=convert.snapshot(snap))

    def _snapshots(self, ws: str, session_id: str | None = None) -> list[Any]:
        snaps = self.plane.snapshots.query(ws, session_id)
        return [convert.snapshot(s) for s in reversed(snaps)]

    async def ListSnapshots(self, req: Any, caller: Principal, ctx: Any) -> Any:
        chunk, token = page(self._snapshots(caller.workspace_id), req.page_size, req.page_token)
        return M("ListSnapshotsResponse")(snapshots=chunk, next_page_token=token)

    async def ListWorkspaceSnapshots(self, req: Any, caller: Principal,
                                     ctx: Any) -> Any:
        ws = self._ws(caller, req.workspace_id)
        chunk, token = page(self._snapshots(ws), req.page_size, req.page_token)
        return M("ListWorkspaceSnapshotsResponse")(snapshots=chunk, next_page_token=token)

    async def ListSessionSnapshots(self, req: Any, caller: Principal,
                                   ctx: Any) -> Any:
        self.plane.sessions.get(req.session_id, caller.workspace_id)  # not found: say so
        chunk, token = page(self._snapshots(caller.workspace_id, req.session_id),
                            req.page_size, req.page_token)
        return M("ListSessionSnapshotsResponse")(snapshots=chunk, next_page_token=token)

    async def UpdateSnapshot(self, req: Any, caller: Principal, ctx: Any) -> Any:
        if req.tags or req.clear_tags:
            raise ValidationError("snapshots have no tags on this server", field="tags")
        fields: dict[str, Any] = {}
        if req.HasField("name"):
            fields["name"] = req.name or None
        if req.clear_expires_at:
            fields["expires_at"] = None
        elif req.HasField("expires_at"):
            fields["expires_at"] = req.expires_at.ToDatetime(tzinfo=UTC)
        snap = await self.plane.snapshots.update(req.snapshot_id, model(SnapshotUpdate, **fields),
                                                 caller.workspace_id)
        return M("UpdateSnapshotResponse")(snapshot=convert.snapshot(snap))

    async def DeleteSnapshot(self, req: Any, caller: Principal,
                             ctx: Any) -> Any:
        snap = await self.plane.snapshots.delete(req.snapshot_id, caller.workspace_id)
        return M("DeleteSnapshotResponse")(snapshot=convert.snapshot(snap))

    # -- volumes -----------------------------------------------------------------------------
    async def CreateVolume(self, req: Any, caller: Principal, ctx: Any) -> Any:
        ws = self._ws(caller, req.workspace_id)
        vol = await self.plane.volumes.create(
            model(VolumeCreate, name=req.name, size_bytes=req.size_bytes), ws)
        return M("CreateVolumeResponse")(volume=convert.volume(vol))

    async def GetVolume(self, req: Any, caller: Principal, ctx: Any) -> Any:
        vol = self.plane.volumes.get(req.volume_id, caller.workspace_id)
        out = M("GetVolumeResponse")(volume=convert.volume(vol))
        if vol.session_id:
            out.active_attachments.append(convert.attachment(vol))
        return out

    async def ListVolumes(self, req: Any, caller: Principal, ctx: Any) -> Any:
        ws = self._ws(caller, req.workspace_id)
        vols = [v for v in reversed(self.plane.volumes.query(ws)) if v.state.value != "DELETED"]
        if req.search:
            vols = [v for v in vols if req.search.lower() in v.name.lower()]
        if req.states:
            wanted = {proto.pool().FindEnumTypeByName(f"{proto.PACKAGE}.VolumeState")
                      .values_by_number[n].name.removeprefix("VOLUME_STATE_") for n in req.states}
            vols = [v for v in vols if v.state.value in wanted]
        chunk, token = page([convert.volume(v) for v in vols], req.page_size, req.page_token)
        return M("ListVolumesResponse")(volumes=chunk, next_page_token=token)

    async def UpdateVolume(self, req: Any, caller: Principal, ctx: Any) -> Any:
        if req.tags or req.clear_tags:
            raise ValidationError("volumes have no tags on this server", field="tags")
        if req.HasField("name"):
            vol = await self.plane.volumes.rename(req.volume_id, model(VolumeUpdate, name=req.name),
                                                  caller.workspace_id)
        else:
            vol = self.plane.volumes.get(req.volume_id, caller.workspace_id)
        return M("UpdateVolumeResponse")(volume=convert.volume(vol))

    async def DeleteVolume(self, req: Any, caller: Principal, ctx: Any) -> Any:
        await self.plane.volumes.delete(req.volume_id, caller.workspace_id)
        return M("DeleteVolumeResponse")()

    async def AttachVolume(self, req: Any, caller: Principal, ctx: Any) -> Any:
        body = model(VolumeAttach, volume_id=req.volume.volume_id, path=req.volume.mount_path,
                     read_only=req.volume.readonly)
        await self.plane.volumes.attach(req.session_id, body, caller.workspace_id)
        vol = self.plane.volumes.get(body.volume_id, caller.workspace_id)
        return M("AttachVolumeResponse")(attachment=convert.attachment(vol))

    async def DetachVolume(self, req: Any, caller: Principal, ctx: Any) -> Any:
        await self.plane.volumes.detach(req.session_id, req.volume_id, caller.workspace_id)
        return M("DetachVolumeResponse")()

    async def GetWorkspaceSandboxUsage(self, req: Any, caller: Principal,
                                       ctx: Any) -> Any:
        ws = self._ws(caller, req.workspace_id)
        usage = self.plane.workspaces.usage(ws)
        quotas = usage.quotas
        count = proto.enum_value("SandboxUsageUnit", "SANDBOX_USAGE_UNIT_COUNT")
        size = proto.enum_value("SandboxUsageUnit", "SANDBOX_USAGE_UNIT_BYTES")
        out = M("GetWorkspaceSandboxUsageResponse")()
        for key, label, unit, current, limit in (
                ("max_concurrent_sessions", "Concurrent sandboxes", count,
                 usage.concurrent_sessions, quotas.max_concurrent_sessions),
                ("max_memory_mib", "Memory of running sandboxes (MiB)", count, usage.memory_mib,
                 quotas.max_memory_mib),
                ("max_snapshots", "Snapshots", count, usage.snapshots, quotas.max_snapshots),
                ("max_volumes", "Volumes", count, usage.volumes, quotas.max_volumes),
                ("max_stored_bytes", "Stored snapshot and volume bytes", size,
                 usage.stored_bytes, quotas.max_stored_bytes)):
            item = out.limits.add(key=key, label=label, unit=unit, current=current)
            if limit is not None:
                item.max = limit
        return out

    # -- who ---------------------------------------------------------------------------------
    async def WhoAmI(self, req: Any, caller: Principal, ctx: Any) -> Any:
        ws = self.plane.workspaces.get(caller.workspace_id)
        out = M("WhoAmIResponse")(owner_type="SERVICE", owner_id=caller.key_id)
        out.workspaces.add(workspace_id=ws.id, name=ws.name)
        return out


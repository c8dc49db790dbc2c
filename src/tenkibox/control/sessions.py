"""Sessions: their records and every change of their state (see ``states`` for the table).

A create writes a CREATING record and starts one task that asks the host to boot or restore;
the task ends the record READY or FAILED. Terminate wins over that task: it moves the record to
TERMINATING first (compare-and-set, so one terminate acts and the others wait for it), cancels
the task (the host stops whatever it launched), asks the host to stop the VM, and only then
writes TERMINATED. Pause and resume are ``pausing.PauseControl``'s (their tasks are start tasks
here: a terminate cancels them the same way). A session that stops running (pause, terminate,
its VM's death) closes its exposed ports (``ports.PortControl.close_session``) right after its
record left READY/RUNNING.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .. import longpoll
from ..errors import (
    ConflictError,
    NotFoundError,
    SnapshotFailedError,
    TenkiError,
    ValidationError,
)
from ..host.api import (
    BootSpec,
    ExecSpec,
    HostAPI,
    Manifest,
    NetworkSpec,
    ProcessEvent,
    ProcessRef,
    RestoreSpec,
    SnapshotDamagedError,
)
from ..ids import hostname_for, new_id
from ..models import (
    DEFAULT_IMAGE_ID,
    ExecRequest,
    Session,
    SessionCreate,
    SessionState,
    SessionUpdate,
)
from ..store.tables import SessionRow, SnapshotRow
from . import admission, network, workdir
from .network import network_of
from .pausing import PauseControl
from .records import Records, key_of
from .spares import Spares
from .states import FINAL, LIVE, PAUSE_STATES, IllegalTransitionError
from .volumes import VolumeControl

if TYPE_CHECKING:
    from .fleet import Fleet
    from .ports import PortControl
    from .snapshots import SnapshotControl

log = logging.getLogger(__name__)

S = SessionState

#: states in which a session's name, metadata and expiry may still change
_NOT_OVER = frozenset(s.value for s in S) - FINAL - {S.TERMINATING.value}


def now() -> datetime:
    return datetime.now(UTC)


#: states a wait waits through
_BUSY = frozenset({S.CREATING.value, S.PAUSING.value, S.RESUMING.value})
_PAUSE_WORDS = {S.PAUSING.value: "is being paused (PAUSING)",
                S.PAUSED.value: "is paused (PAUSED): resume it first",
                S.RESUMING.value: "is being resumed (RESUMING): wait until it is READY"}


def not_running(row: SessionRow) -> ConflictError:
    """The 409 of a call that needs the session's VM."""
    if row.state in _PAUSE_WORDS:
        return ConflictError(f"session {row.id} {_PAUSE_WORDS[row.state]}")
    reason = f" ({row.state_reason})" if row.state_reason else ""
    return ConflictError(f"session {row.id} is {row.state}{reason}, not running")


class SessionControl:
    def __init__(self, records: Records, host: Fleet, volumes: VolumeControl,
                 snapshots: SnapshotControl, ports: PortControl, spares: Spares) -> None:
        self.records = records
        self.host = host
        #: restores prepared ahead: a create of a snapshot may take one's session id
        self.spares = spares
        self.volumes = volumes
        #: exposed ports: closed when the session stops running
        self.ports = ports
        #: pause and resume (they capture and release PAUSE snapshots)
        self.pausing = PauseControl(self, snapshots)
        #: the task bringing a session's VM up or down: its create, pause or resume
        self._starts: dict[str, asyncio.Task[Any]] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}  # the terminate at work, per session
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- reads -------------------------------------------------------------------------------
    def row(self, session_id: str, ws: str | None = None) -> SessionRow:
        """``ws``: the caller's workspace (a session of another one is not found)."""
        return self.records.get(SessionRow, session_id, ws=ws)

    def to_model(self, row: SessionRow) -> Session:
        return Session(
            id=row.id, workspace_id=row.workspace_id, name=row.name,
            template_id=row.template_id, state=SessionState(row.state),
            state_reason=row.state_reason, cpu=row.cpu, memory_mb=row.memory_mb,
            base_image_id=row.base_image_id, snapshot_id=row.snapshot_id,
            env_keys=sorted(row.env or {}), metadata=row.meta or {},
            volumes=self.volumes.attachments(row.id) if row.state not in FINAL else [],
            **network.answer(network_of(row)),
            created_at=row.created_at, ready_at=row.ready_at, expires_at=row.expires_at,
            terminated_at=row.terminated_at, host_id=row.host_id)

    def get(self, session_id: str, ws: str | None = None) -> Session:
        return self.to_model(self.row(session_id, ws))

    def query(self, ws: str, state: str | None = None) -> list[Session]:
        rows = self.records.all(SessionRow, SessionRow.workspace_id == ws)
        if state:
            rows = [r for r in rows if r.state == state.upper()]
        rows.sort(key=lambda r: r.created_at)
        return [self.to_model(r) for r in rows]

    async def wait(self, session_id: str, timeout_s: float, ws: str | None = None) -> Session:
        """As soon as the session is out of CREATING, PAUSING and RESUMING."""
        row = await longpoll.until(self.records.changes, key_of(SessionRow, session_id),
                                   lambda: self.row(session_id, ws),
                                   lambda r: r.state not in _BUSY, timeout_s)
        return self.to_model(row)

    def live_row(self, session_id: str, ws: str | None = None) -> SessionRow:
        row = self.row(session_id, ws)
        if row.state not in LIVE or not self.host.runs(row):
            raise not_running(row)
        return row

    # -- create ------------------------------------------------------------------------------
    def network(self, req: SessionCreate) -> NetworkSpec:
        """The network a create asks for (``network.asked``), refused with
        ``NetworkPolicyUnsupportedError`` when this host cannot enforce it."""
        spec = network.asked(req)
        network.refuse_unenforceable(self.host, spec)
        return spec

    @property
    def network_enforced(self) -> bool:
        """Whether this host enforces network policies (else only the default policy runs)."""
        return bool(self.host.network_enforced)

    async def create(self, req: SessionCreate, ws: str, *,
                     template_id: str | None = None, golden: str | None = None,
                     system: bool = False, note: str | None = None) -> Session:
        """``ws``: the caller's workspace; the session belongs to it, and so must the snapshot
        and volumes it names. A session from a template is a restore of the template's golden
        snapshot (``req.snapshot_id``, resolved by ``TemplateControl``), recorded with
        ``template_id``. ``golden``: restore this golden snapshot of the image instead of
        booting (``GoldenControl``), falling back to a boot if that fails. ``system``: a
        session of the server's own (a golden build): the host's capacity applies, no quota.
        The session's network is its request's (:meth:`network`), never its source's."""
        net = self.network(req)
        image_id = req.base_image_id or DEFAULT_IMAGE_ID
        snap: SnapshotRow | None = None
        if golden:
            snap = self.records.get(SnapshotRow, golden)
        elif req.snapshot_id:
            snap = self.records.get(SnapshotRow, req.snapshot_id, ws=ws)
            if snap.state != "READY":
                why = f": {snap.state_reason}" if snap.state_reason else ""
                raise SnapshotFailedError(
                    f"snapshot {snap.id} is {snap.state}{why}; only a READY snapshot "
                    "can be restored")
            image_id = snap.base_image_id
            if snap.type == "PAUSE":
                owner = self.records.find(SessionRow, snap.session_id)
                if owner is not None and owner.state in PAUSE_STATES:
                    raise ConflictError(
                        f"snapshot {snap.id} holds paused session {owner.id} ({owner.state}); "
                        f"resume that session instead")
        fields = req.model_fields_set if not golden else set()
        if snap and "cpu" in fields and req.cpu != snap.cpu:
            raise ValidationError(f"a restore keeps the snapshot's {snap.cpu} vCPUs",
                                  field="cpu")
        if snap and "memory_mb" in fields and req.memory_mb != snap.memory_mb:
            raise ValidationError(f"a restore keeps the snapshot's {snap.memory_mb} MiB",
                                  field="memory_mb")
        self.volumes.check_create(req, ws)
        found = await self.host.candidates(
            pin=req.host_id, volume_ids=[m.volume_id for m in req.volumes],
            digests=list(Manifest.from_json(snap.files).digests()) if snap is not None else None,
            network=net)
        env = dict(req.env)
        manifest = None
        if snap is not None:
            # a restore carries on the captured session, environment included
            source = self.records.find(SessionRow, snap.session_id)
            env = {**((source.env or {}) if source else {}), **env}
            manifest = Manifest.from_json(snap.files)
            if golden is None:  # (GoldenControl checked its own)
                await self._refuse_if_damaged(snap.id, manifest)
        # a spare prepared for this restore: its session id is this session's
        spare = self.spares.take(snap.id, net) if snap is not None else None
        if spare is not None:
            found = replace(found, spare=spare.host_id)
        created = now()
        row = SessionRow(
            id=spare.session_id if spare else new_id("session"), workspace_id=ws,
            name=req.name, state=S.CREATING.value,
            template_id=template_id, state_reason=note,
            cpu=snap.cpu if snap else req.cpu, memory_mb=snap.memory_mb if snap else req.memory_mb,
            base_image_id=image_id, snapshot_id=snap.id if snap and not golden else None,
            env=env,
            meta=dict(req.metadata), volumes=[],
            # a restore's artifacts are named before the host reads them (so no GC takes them)
            machine={**manifest.shape.to_json(), "ram": manifest.ram, "state": manifest.state,
                     "ram_chain": manifest.rams}
            if manifest else None,
            disk_chain=list(manifest.layers) if manifest else [], network=net.to_json(),
            created_at=created,
            expires_at=created + timedelta(seconds=req.max_duration_s)
            if req.max_duration_s else None)


        async def insert(host_id: str) -> None:
            # the host is named on the record before it is asked to boot: the record decides
            # who owns the VM (a host that no longer owns it stops it: fencing)
            row.host_id = host_id
            capacity = self.host.capacity_of(host_id)
            check = (admission.host_memory(row.memory_mb, capacity, host_id) if system
                     else admission.session(ws, row.memory_mb, capacity, host_id))
            await self.records.insert(row, check=check)

        try:
            await self.host.place(found, row.memory_mb, insert)
        except BaseException:
            if spare is not None:
                self.spares.release(spare)
            raise
        if spare is not None and row.host_id != spare.host_id:
            self.spares.release(spare)  # its host was full
        source_id = snap.id if snap is not None else None
        self._starts[row.id] = self._spawn(self._start(row.id, req, manifest, source_id),
                                           f"start {row.id}")
        return self.to_model(row)

    async def _refuse_if_damaged(self, snapshot_id: str, manifest: Manifest) -> None:
        """A restore of a snapshot whose stored artifacts are missing or corrupt is refused
        before any session exists (cheap: a file is re-read only if it changed since it was
        last hashed), and the snapshot becomes FAILED naming what is damaged."""
        bad = await self.host.verify_artifacts(manifest.digests(), deep=False)
        if not bad:
            return
        reason = f"snapshot {snapshot_id} cannot be restored: {next(iter(bad.values()))}"
        with contextlib.suppress(IllegalTransitionError):
            await self.records.transition(SnapshotRow, snapshot_id, "FAILED", expected=["READY"],
                                          state_reason=f"damaged in storage: {reason}")
        await self.spares.drop_snapshot(snapshot_id)  # none of it is restored again
        raise SnapshotFailedError(reason)

    async def _while_live(self, session_id: str, call: Any) -> Any:
        """Run a host call on a session's VM; if the VM went away meanwhile (a terminate or
        its death won the race), the caller hears that, not the broken connection."""
        try:
            return await call
        except TenkiError as exc:
            if isinstance(exc, (ConflictError, ValidationError, NotFoundError)):
                raise
            row = self.row(session_id)
            if row.state not in LIVE or not self.host.runs(row):
                raise not_running(row) from exc
            raise

    async def _start(self, session_id: str, req: SessionCreate, manifest: Manifest | None,
                     source_id: str | None) -> None:
        row = self.row(session_id)
        try:
            if manifest is not None and source_id is not None:
                started = await self._restore_or_boot(row, manifest, source_id)
            else:
                started = await self.host.boot(BootSpec(
                    session_id, row.cpu, row.memory_mb, row.base_image_id,
                    hostname_for(session_id), network=network_of(row)))
            vm_fields: dict[str, Any] = {
                "machine": {**started.shape.to_json(), "ram": started.ram,
                            "ram_chain": list(started.ram_chain)},
                "disk_chain": list(started.layers)}
            warning = None
            if req.volumes:
                # the record names what the VM runs on before its volumes go in (each attach
                # is a step that may fail or be cut short)
                await self.records.update(SessionRow, session_id, when_state=[S.CREATING],
                                          **vm_fields)
                vm_fields = {}
                # attached before READY: a command run at once must see the mounts
                warning = await self.volumes.attach_at_start(session_id, req.volumes)
            # without volumes, one write: what the VM runs on and READY together (a wait is
            # answered by it at once, not woken first by a write that changes no state)
            await self.records.transition(SessionRow, session_id, S.READY,
                                          expected=[S.CREATING], state_reason=warning,
                                          ready_at=now(), **vm_fields)
            if manifest is not None and source_id is not None and started.ram == manifest.ram \
                    and row.host_id is not None:
                # restored (a golden one that failed booted instead): the next restore of
                # this snapshot gets a spare
                self.spares.after_restore(source_id, manifest, network_of(row), row.host_id)
        except asyncio.CancelledError:
            raise  # a terminate: it finishes the record
        except IllegalTransitionError:
            return  # terminated meanwhile: the terminate stops the VM
        except Exception as exc:
            reason = exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}"
            log.warning("session %s failed to start: %s", session_id, reason)
            if isinstance(exc, SnapshotDamagedError) and row.snapshot_id:
                # no restore of it can succeed: the snapshot must not stay READY
                with contextlib.suppress(IllegalTransitionError):
                    await self.records.transition(SnapshotRow, row.snapshot_id, "FAILED",
                                                  expected=["READY"],
                                                  state_reason=f"damaged in storage: {reason}")
            try:
                await self.records.transition(SessionRow, session_id, S.FAILED,
                                              expected=[S.CREATING], state_reason=reason,
                                              terminated_at=now())
            except IllegalTransitionError:
                return
            await self.volumes.release_session(session_id)
        finally:
            self._starts.pop(session_id, None)

    async def _restore_or_boot(self, row: SessionRow, manifest: Manifest,
                               source_id: str) -> Any:
        """Restore ``source_id``; for a golden snapshot (the record names no snapshot), a
        restore that fails is not the user's problem: the golden snapshot becomes FAILED and
        the session boots instead."""
        spec = RestoreSpec(row.id, source_id, manifest, hostname_for(row.id),
                           network=network_of(row))
        if row.snapshot_id is not None:
            return await self.host.restore(spec)
        try:
            return await self.host.restore(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("session %s: golden snapshot %s did not restore (%s); booting instead",
                        row.id, source_id, exc)
            with contextlib.suppress(IllegalTransitionError, TenkiError):
                await self.records.transition(SnapshotRow, source_id, "FAILED",
                                              expected=["READY"],
                                              state_reason=f"restore failed: {exc}")
            await self.records.update(SessionRow, row.id, when_state=[S.CREATING],
                                      machine=None, disk_chain=[])
            return await self.host.boot(BootSpec(row.id, row.cpu, row.memory_mb,
                                                 row.base_image_id, hostname_for(row.id),
                                                 network=network_of(row)))

    # -- pause and resume ----------------------------------------------------------------------
    async def pause(self, session_id: str, ws: str | None = None, *,
                    wait: bool = True) -> Session:
        """Capture the session into a PAUSE snapshot and stop its VM: READY/RUNNING ->
        PAUSING -> PAUSED. Idempotent (a PAUSED session is answered as it is; a pause in
        flight is joined). ``wait=False``: returns once PAUSING is written (the work goes on in
        a task). ``wait=True``: returns the PAUSED session, or raises ``SnapshotFailedError``
        (the capture failed: the session runs on, READY, the reason in ``state_reason``),
        ``SessionFailedError`` (its VM was lost) or ``ConflictError`` (terminated meanwhile,
        or not running)."""
        return await self.pausing.pause(session_id, ws, wait)

    async def resume(self, session_id: str, ws: str | None = None, *,
                     wait: bool = True) -> Session:
        """Restore the PAUSE snapshot under the same session id: PAUSED -> RESUMING -> READY
        (the workspace's quotas and the host's capacity are checked again: ``QuotaExceeded``,
        ``CapacityUnavailable``, and the session stays PAUSED). Idempotent (a READY/RUNNING
        session is answered as it is; a resume in flight is joined). ``wait=False``: returns
        once RESUMING is written. ``wait=True``: returns the READY session, or raises
        ``SessionFailedError`` (the restore failed: the session is FAILED with the reason) or
        ``ConflictError``."""
        return await self.pausing.resume(session_id, ws, wait)

    # -- name, metadata, expiry ----------------------------------------------------------------
    async def update(self, session_id: str, req: SessionUpdate, ws: str | None = None) -> Session:
        """Rename, or replace the metadata of, a session that is not over."""
        self.row(session_id, ws)  # not found (or another workspace's): say so
        values: dict[str, Any] = {}
        if "name" in req.model_fields_set:
            values["name"] = req.name
        if req.metadata is not None:
            values["meta"] = dict(req.metadata)
        if values and not await self.records.update(SessionRow, session_id,
                                                    when_state=_NOT_OVER, **values):
            raise ConflictError(f"session {session_id} is {self.row(session_id).state}; "
                                "it can no longer be changed")
        return self.get(session_id, ws)

    async def extend(self, session_id: str, seconds: float, ws: str | None = None) -> Session:
        """Move the expiry ``seconds`` later (from now, for a session without one or past it).
        Compare-and-set on the expiry read, so two extends at once both count."""
        for _ in range(20):
            row = self.row(session_id, ws)
            if row.state not in _NOT_OVER:
                break
            base = row.expires_at if row.expires_at and row.expires_at > now() else now()
            if await self.records.update(SessionRow, session_id, when_state=_NOT_OVER,
                                         when={"expires_at": row.expires_at},
                                         expires_at=base + timedelta(seconds=seconds)):
                return self.get(session_id, ws)
        raise ConflictError(f"session {session_id} is {self.row(session_id).state}; "
                            "it can no longer be extended")

    # -- terminate ---------------------------------------------------------------------------
    async def terminate(self, session_id: str, reason: str | None = None,
                        ws: str | None = None) -> Session:
        row = self.row(session_id, ws)
        if row.state in FINAL:
            return self.to_model(row)
        # one terminate per session does the work (a task, so that no caller going away cuts
        # it short); the others wait for it, and share its failure
        work = self._stopping.get(session_id) or self._stop(session_id, reason)
        await asyncio.shield(work)
        return self.get(session_id)

    def _stop(self, session_id: str, reason: str | None) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._spawn(self._terminate(session_id, reason),
                                               f"terminate {session_id}")
        self._stopping[session_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._stopping.get(session_id) is t:
                del self._stopping[session_id]
            if not t.cancelled():
                t.exception()  # retrieved: the callers that waited for it got it

        task.add_done_callback(done)
        return task

    async def _terminate(self, session_id: str, reason: str | None) -> None:
        try:
            await self.records.transition(SessionRow, session_id, S.TERMINATING,
                                          state_reason=reason)
        except IllegalTransitionError:
            row = self.row(session_id)
            if row.state != S.TERMINATING.value:
                return  # it ended meanwhile (its VM died): that is the answer
            # an earlier terminate failed half-way (its host call raised): this one is the
            # retry, and does the work again (host.terminate is idempotent)
            reason = row.state_reason
        await self._finish_terminate(session_id, reason)

    async def _finish_terminate(self, session_id: str, reason: str | None) -> None:
        start = self._starts.get(session_id)
        if start is not None and not start.done():
            start.cancel()
            await asyncio.wait({start})
        await self.ports.close_session(session_id, "the session was terminated")
        await self.host.terminate(session_id, self.volumes.mounts_of(session_id))
        await self.volumes.release_session(session_id)
        await self.pausing.release_all(session_id, "the session was terminated")
        await self.records.transition(SessionRow, session_id, S.TERMINATED,
                                      expected=[S.TERMINATING], state_reason=reason,
                                      terminated_at=now())

    async def end_unreachable(self, session_id: str, reason: str) -> bool:
        """The session's host is gone (lost, or removed by force): the record ends TERMINATED
        with ``reason`` without asking that host anything (it does not answer; if it comes
        back, its VM is no longer owned and it stops it). What the session held here goes:
        its start task, exposed ports, volumes, PAUSE snapshots. Returns whether this call
        ended it."""
        try:
            await self.records.transition(SessionRow, session_id, S.TERMINATING,
                                          state_reason=reason)
        except IllegalTransitionError as exc:
            if exc.current != S.TERMINATING.value:
                return False  # over already
            # a terminate whose host call could not reach the host: finished here
        start = self._starts.get(session_id)
        if start is not None and not start.done():
            start.cancel()
            await asyncio.wait({start})
        await self.ports.close_session(session_id, reason)
        await self.volumes.release_session(session_id)
        await self.pausing.release_all(session_id, reason)
        try:
            await self.records.transition(SessionRow, session_id, S.TERMINATED,
                                          expected=[S.TERMINATING], state_reason=reason,
                                          terminated_at=now())
        except IllegalTransitionError:
            return False  # a terminate running at once finished it
        return True

    async def vm_gone(self, session_id: str, reason: str) -> None:
        """The host says the VM stopped on its own."""
        try:
            await self.records.transition(SessionRow, session_id, S.FAILED,
                                          expected=[S.READY, S.RUNNING, S.CREATING,
                                                    S.RESUMING],
                                          state_reason=reason, terminated_at=now())
        except (IllegalTransitionError, TenkiError):
            return
        await self.ports.close_session(session_id, f"the VM stopped: {reason}")
        await self.volumes.release_session(session_id)

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a (re)start: find the VMs of live sessions again; settle everything else."""
        live: dict[str, Any] = {}
        for row in self.records.all(SessionRow):
            # a pause cut short may have left its VM running: found again, it runs on
            if row.state in LIVE or row.state == S.PAUSING.value:
                live[row.id] = self.volumes.mounts_of(row.id)
        for row in self.records.all(SessionRow):
            if row.state == S.CREATING.value:
                await self.records.transition(
                    SessionRow, row.id, S.FAILED, expected=[S.CREATING], terminated_at=now(),
                    state_reason="the server stopped before the session was ready")
                await self.volumes.release_session(row.id)
        found = await self.host.recover(live)
        for sid, why in found.lost.items():
            log.warning("session %s: %s", sid, why)
            if self.row(sid).state == S.PAUSING.value:
                await self.pausing.recover_pausing(sid, vm_found=False)
                continue
            await self.records.transition(SessionRow, sid, S.TERMINATING, state_reason=why)
        for row in self.records.all(SessionRow):
            if row.state == S.TERMINATING.value:
                await self.host.terminate(row.id, [])
                await self.volumes.release_session(row.id)
                await self.pausing.release_all(row.id, "the session was terminated")
                await self.records.transition(SessionRow, row.id, S.TERMINATED,
                                              terminated_at=now())
            elif row.state == S.PAUSING.value:
                await self.pausing.recover_pausing(row.id, vm_found=True)
            elif row.state == S.RESUMING.value:
                self.pausing.recover_resuming(row.id)
            elif row.state == S.RUNNING.value:
                # no process of an earlier server is followed any more
                await self.records.transition(SessionRow, row.id, S.READY, expected=[S.RUNNING])
        if found.strays_killed:
            log.warning("killed %d processes that no session owned", found.strays_killed)

    async def stop_unowned_vms(self) -> list[str]:
        """Stop every VM of the host whose session is over: a session ends only after its VM
        stopped, so such a VM outlived a write or a host call that failed half-way, and would
        hold its memory until the next restart (recovery stops it then; this, every GC
        period). Returns the sessions whose VM was stopped."""
        stopped = []
        for session_id in self.host.list_vms():
            row = self.records.find(SessionRow, session_id)
            # a record is inserted before its VM starts: none means it was removed under it
            if row is not None and row.state not in FINAL:
                continue
            log.warning("session %s: its VM runs but the session is %s; stopping the VM",
                        session_id, row.state if row is not None else "gone")
            try:
                await self.host.terminate(session_id, [])
            except Exception as exc:  # the next period tries again
                log.warning("session %s: stopping its VM failed: %s", session_id, exc)
                continue
            stopped.append(session_id)
        return stopped

    async def follow_host(self) -> None:
        """Consume the host's reports of VMs that died (runs for the server's life)."""
        async for gone in self.host.watch():
            await self.vm_gone(gone.session_id, gone.reason)

    # -- exec and files ------------------------------------------------------------------------
    async def start_process(self, session_id: str, req: ExecRequest,
                            ws: str | None = None) -> ProcessRef:
        row = self.live_row(session_id, ws)
        if bool(req.argv) == bool(req.command):
            raise ValidationError("give exactly one of argv or command", field="argv")
        argv = list(req.argv) if req.argv else ["/bin/sh", "-c", req.command or ""]
        stdin_data = None
        if req.stdin_data is not None:
            try:
                stdin_data = base64.b64decode(req.stdin_data, validate=True)
            except binascii.Error as exc:
                raise ValidationError(f"not base64: {exc}", field="stdin_data") from exc
        env, cwd, uid = {**(row.env or {}), **req.env}, req.cwd, None
        if req.user == workdir.USER:  # the guest user, as the official SDKs' commands run
            env, cwd, uid = {**workdir.USER_ENV, **env}, cwd or workdir.WORKDIR, workdir.UID
        host = self.host.host_for(row)  # the member running the VM: the process is its
        ref: ProcessRef = await self._while_live(session_id, host.start_process(
            session_id, ExecSpec(argv=argv, env=env, cwd=cwd, timeout_s=req.timeout_s,
                                 stdin=req.stdin or stdin_data is not None, user=uid)))
        if stdin_data is not None:
            await self._while_live(session_id, host.process_stdin(
                session_id, ref.process_id, stdin_data))
            await self._while_live(session_id, host.process_close_stdin(
                session_id, ref.process_id))
        try:
            await self.records.transition(SessionRow, session_id, S.RUNNING, expected=[S.READY])
        except IllegalTransitionError:
            pass  # already RUNNING (another process), or ending
        self._spawn(self._settle(host, session_id, ref.process_id), f"settle {ref.process_id}")
        return ref

    async def _settle(self, host: HostAPI, session_id: str, process_id: str) -> None:
        """READY again once the session's last process ended (on ``host``, whose VM ran it)."""
        await host.process_exit(session_id, process_id)
        if host.running_processes(session_id) == 0:
            try:
                await self.records.transition(SessionRow, session_id, S.READY,
                                              expected=[S.RUNNING])
            except (IllegalTransitionError, TenkiError):
                pass

    def process_events(self, session_id: str, process_id: str,
                       ws: str | None = None) -> AsyncGenerator[ProcessEvent, None]:
        return self.host.host_for(self.row(session_id, ws)).process_events(session_id, process_id)

    async def process_stdin(self, session_id: str, process_id: str, data: bytes,
                            ws: str | None = None) -> None:
        self.row(session_id, ws)
        await self.host.process_stdin(session_id, process_id, data)

    async def process_close_stdin(self, session_id: str, process_id: str,
                                  ws: str | None = None) -> None:
        self.row(session_id, ws)
        await self.host.process_close_stdin(session_id, process_id)

    async def process_kill(self, session_id: str, process_id: str, signal: int,
                           ws: str | None = None) -> None:
        self.row(session_id, ws)
        await self.host.process_kill(session_id, process_id, signal)

    async def read_file(self, session_id: str, path: str,
                        ws: str | None = None) -> AsyncGenerator[bytes, None]:
        self.live_row(session_id, ws)
        return self._read_while_live(session_id, self.host.read_file(session_id, path))

    async def _read_while_live(self, session_id: str,
                               chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                chunk = await self._while_live(session_id, anext(chunks, None))
                if chunk is None:
                    return
                yield chunk
        finally:
            await chunks.aclose()

    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int, ws: str | None = None) -> int:
        self.live_row(session_id, ws)
        written: int = await self._while_live(
            session_id, self.host.write_file(session_id, path, chunks, mode))
        return written

    # -- expiry ----------------------------------------------------------------------------------
    async def sweep_expired(self) -> None:
        t = now()
        for row in self.records.all(SessionRow):
            try:
                if row.expires_at and row.expires_at <= t and (
                        row.state in LIVE or row.state == S.PAUSED.value):
                    log.info("session %s: max duration reached", row.id)
                    await self.terminate(row.id, "max duration reached")
                elif row.state == S.TERMINATING.value and row.id not in self._stopping:
                    # a terminate that failed half-way (its host call raised): try again
                    log.info("session %s: terminating again", row.id)
                    await self.terminate(row.id)
            except Exception as exc:  # one session's failure holds up no other
                log.warning("session %s: terminate failed (tried again at the next sweep): %s",
                            row.id, exc)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()

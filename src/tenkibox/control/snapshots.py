"""Snapshots: records, the capture job, delete, expiry, and what the stored artifacts are for.

A create writes a CREATING record and starts one job that asks the host to capture; the host
answers with a manifest of digests once every artifact is stored and verified, and only then
does the record become READY (with the manifest). Anything else ends it FAILED with the reason
and the step. A restore is a session create (``SessionControl.create``) that reads the manifest.

Artifacts are shared by content (the base image by every snapshot, a lineage's older layers by
the younger snapshots), so deleting a snapshot marks it DELETED and lets the garbage collector
remove what nothing references any more: no live session, no other snapshot.

Types (``SnapshotType``): USER (``create``), TEMPLATE (a template's or an image's golden snapshot,
``template_id`` set: owned by it), PAUSE (``begin_pause``: a paused session's memory and disk,
owned by that session: no user deletes it while the session is paused; ``release`` removes it
once the session is resumed or terminated).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from .. import longpoll
from ..errors import ConflictError, TenkiError, ValidationError
from ..host.api import COLLECT_GRACE_S, CaptureSpec, HostAPI, Manifest, Unowned
from ..ids import new_id
from ..models import Snapshot, SnapshotCreate, SnapshotState, SnapshotType, SnapshotUpdate
from ..store.tables import SessionRow, SnapshotRow
from . import admission
from .records import Records, key_of
from .spares import Spares
from .states import FINAL, LIVE, PAUSE_STATES, IllegalTransitionError
from .volumes import VolumeControl

log = logging.getLogger(__name__)

P = SnapshotState
T = SnapshotType


def now() -> datetime:
    return datetime.now(UTC)


def to_model(row: SnapshotRow, unique_bytes: int = 0) -> Snapshot:
    return Snapshot(
        id=row.id, session_id=row.session_id, workspace_id=row.workspace_id, name=row.name,
        type=SnapshotType(row.type or T.USER.value), state=SnapshotState(row.state),
        state_reason=row.state_reason,
        size_bytes=row.size_bytes or 0, compressed_bytes=row.compressed_bytes or 0,
        unique_bytes=unique_bytes,
        memory_bytes=row.memory_bytes or 0, base_image_id=row.base_image_id, cpu=row.cpu,
        memory_mb=row.memory_mb, created_at=row.created_at, ready_at=row.ready_at,
        expires_at=row.expires_at, deleted_at=row.deleted_at)


def unique_bytes(row: SnapshotRow, holders: dict[str, set[str]]) -> int:
    """What deleting ``row`` would free now: the stored bytes of the artifacts its manifest
    names that no other kept snapshot and no live session holds (``holders``). Computed from
    the records alone (the sizes the capture wrote into the manifest): the control plane never
    reads the store. 0 unless READY; a manifest from before lineages records no sizes."""
    if row.state != P.READY.value or not row.files:
        return 0
    m = Manifest.from_json(row.files)
    return sum(n for d, n in m.stored.items() if holders.get(d, set()) <= {row.id})


class SnapshotControl:
    def __init__(self, records: Records, host: HostAPI, volumes: VolumeControl,
                 spares: Spares) -> None:
        self.records = records
        self.host = host
        self.volumes = volumes
        #: restores of snapshots prepared ahead: stopped with their snapshot
        self.spares = spares
        self._tasks: set[asyncio.Task[Any]] = set()
        self._capturing: dict[str, asyncio.Lock] = {}

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reads -------------------------------------------------------------------------------
    def row(self, snapshot_id: str, ws: str | None = None) -> SnapshotRow:
        """``ws``: the caller's workspace (a snapshot of another one is not found)."""
        return self.records.get(SnapshotRow, snapshot_id, ws=ws)

    def get(self, snapshot_id: str, ws: str | None = None) -> Snapshot:
        return self._model(self.row(snapshot_id, ws))

    def _model(self, row: SnapshotRow) -> Snapshot:
        return self._models([row])[0]

    def _models(self, rows: list[SnapshotRow]) -> list[Snapshot]:
        """The answers, with ``unique_bytes`` computed over every record at once."""
        if not any(r.state == P.READY.value and r.files for r in rows):
            return [to_model(r) for r in rows]
        holders = self._holders()
        return [to_model(r, unique_bytes(r, holders)) for r in rows]

    def _holders(self) -> dict[str, set[str]]:
        """digest -> the records that keep it stored: every snapshot not DELETED (whatever
        its workspace: a lineage may cross them through a golden snapshot) and every live
        session (the artifacts its VM was restored from)."""
        out: dict[str, set[str]] = {}
        for s in self.records.all(SessionRow):
            if s.state in FINAL:
                continue
            machine = s.machine or {}
            for d in [*(s.disk_chain or []), machine.get("ram"), machine.get("state"),
                      *(machine.get("ram_chain") or [])]:
                if d:
                    out.setdefault(d, set()).add(s.id)
        for snap in self.records.all(SnapshotRow):
            if snap.state != P.DELETED.value and snap.files:
                for d in Manifest.from_json(snap.files).digests():
                    out.setdefault(d, set()).add(snap.id)
        return out

    def query(self, ws: str, session_id: str | None = None) -> list[Snapshot]:
        # a template's golden snapshots are the template's, not listed among the user's
        rows = [r for r in self.records.all(SnapshotRow, SnapshotRow.workspace_id == ws)
                if r.state != P.DELETED.value and r.template_id is None]
        if session_id:
            rows = [r for r in rows if r.session_id == session_id]
        rows.sort(key=lambda r: r.created_at)
        return self._models(rows)

    async def wait(self, snapshot_id: str, timeout_s: float, ws: str | None = None, *,
                   long_poll: bool = True) -> Snapshot:
        """The snapshot once it left CREATING, or as it is when the time is up.
        ``long_poll``: an HTTP long poll (capped, the client asks again); False for a caller
        that holds its call open for the whole wait (the wire's blocking CreateSnapshot)."""
        row = await longpoll.until(self.records.changes, key_of(SnapshotRow, snapshot_id),
                                   lambda: self.row(snapshot_id, ws),
                                   lambda r: r.state != P.CREATING.value, timeout_s,
                                   **({} if long_poll else {"cap_s": None}))
        return self._model(row)

    # -- create ------------------------------------------------------------------------------
    async def create(self, req: SnapshotCreate, ws: str, *,
                     template_id: str | None = None, system: bool = False) -> Snapshot:
        """``ws``: the caller's workspace, which the session must belong to; the snapshot
        belongs to it too (a ``workspace_id`` in the request must name it)."""
        srow = self.records.get(SessionRow, req.session_id, ws=ws)
        if req.workspace_id is not None and req.workspace_id != ws:
            raise ValidationError(f"is set from the API key, whose workspace is {ws}; got "
                                  f"{req.workspace_id}", field="workspace_id")
        if req.expires_at is not None:
            expires = req.expires_at if req.expires_at.tzinfo else req.expires_at.replace(
                tzinfo=UTC)
            if expires <= now():
                raise ValidationError(f"must be in the future, got {req.expires_at.isoformat()}",
                                      field="expires_at")
        if srow.state not in LIVE or not self.host.has_vm(srow.id):
            raise ConflictError(f"session {srow.id} is {srow.state}; only a running session "
                                "can be snapshotted")
        row = SnapshotRow(
            id=new_id("snapshot"), session_id=srow.id, workspace_id=ws, template_id=template_id,
            type=(T.TEMPLATE if template_id is not None else T.USER).value,
            name=req.name, state=P.CREATING.value, base_image_id=srow.base_image_id,
            cpu=srow.cpu, memory_mb=srow.memory_mb, memory_bytes=srow.memory_mb << 20,
            machine=None, disk_chain=[], files={}, timings={}, created_at=now(),
            expires_at=req.expires_at)
        # the server's own (golden) snapshots count against no workspace
        await self.records.insert(row, check=None if system else admission.snapshot(ws))
        self._spawn(self._capture(row.id, srow.id, srow.base_image_id), f"capture {row.id}")
        return to_model(row)

    async def _capture(self, snapshot_id: str, session_id: str, base_image_id: str) -> None:
        with contextlib.suppress(Exception):  # the record says how it ended
            await self.capture(snapshot_id, session_id, base_image_id)

    async def capture(self, snapshot_id: str, session_id: str, base_image_id: str, *,
                      leave_paused: bool = False) -> None:
        """Capture the CREATING record ``snapshot_id``: READY with its manifest, or FAILED
        with the reason (and the error raised). ``leave_paused``: a pause (``CaptureSpec``)."""
        try:
            # two snapshots of one session are taken one after the other
            async with self._capturing.setdefault(session_id, asyncio.Lock()):
                mounts = self.volumes.mounts_of(session_id)
                got = await self.host.capture(CaptureSpec(
                    session_id, snapshot_id, base_image_id, mounts, leave_paused=leave_paused))
            m = got.manifest
            # written before anything else yields to the loop: until the record names the
            # manifest, only the host's note of the capture in flight keeps it from the GC
            await self.records.transition(
                SnapshotRow, snapshot_id, P.READY, expected=[P.CREATING], ready_at=now(),
                files=m.to_json(), disk_chain=list(m.layers), machine=m.shape.to_json(),
                size_bytes=got.size_bytes, compressed_bytes=got.stored_bytes,
                timings=got.timings)
            # the VM runs on over the layers this capture froze: its session's record names
            # them, so a snapshot's ``unique_bytes`` never counts disk a running session needs
            # (the host keeps them for it anyway)
            await self.records.update(SessionRow, session_id, when_state=LIVE, notify=False,
                                      disk_chain=list(m.layers))
            if got.lost_volumes:
                await self.volumes.lost(session_id, got.lost_volumes)
            log.info("%s: READY (paused %.3fs)", snapshot_id, got.paused_s)
        except Exception as exc:
            reason = exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}"
            log.warning("%s: capture failed: %s", snapshot_id, reason)
            srow = self.records.find(SessionRow, session_id)
            if srow is not None and (srow.state in FINAL or srow.state == "TERMINATING"):
                # what the user did (or what happened to the VM) says more than the QMP error
                # its stop caused; that error stays in the server's log
                why = srow.state_reason or srow.state.lower()
                reason = f"the session ended during the capture ({why})"
            try:
                await self.records.transition(SnapshotRow, snapshot_id, P.FAILED,
                                              expected=[P.CREATING],
                                              state_reason=f"capture failed: {reason}")
            except IllegalTransitionError:
                pass
            # what it stored before failing is unreferenced now, but younger than the grace
            self._spawn(self._collect_after_grace(), f"collect after {snapshot_id}")
            raise

    # -- the PAUSE snapshots of paused sessions ----------------------------------------------
    async def begin_pause(self, srow: SessionRow) -> SnapshotRow:
        """The CREATING record of a pause of ``srow`` (no snapshot quota: it is not the
        user's; its stored bytes count as any snapshot's). The caller runs ``capture``."""
        row = SnapshotRow(
            id=new_id("snapshot"), session_id=srow.id, workspace_id=srow.workspace_id,
            template_id=None, type=T.PAUSE.value, name=f"pause of {srow.id}"[:64],
            state=P.CREATING.value, base_image_id=srow.base_image_id, cpu=srow.cpu,
            memory_mb=srow.memory_mb, memory_bytes=srow.memory_mb << 20, machine=None,
            disk_chain=[], files={}, timings={}, created_at=now(), expires_at=None)
        await self.records.insert(row)
        return row

    def pause_snapshots(self, session_id: str, *states: str) -> list[SnapshotRow]:
        """The PAUSE snapshots of a session in ``states`` (every kept one by default), oldest
        first."""
        wanted = set(states or (P.CREATING.value, P.READY.value, P.FAILED.value))
        rows = [r for r in self.records.all(SnapshotRow, SnapshotRow.session_id == session_id)
                if r.type == T.PAUSE.value and r.state in wanted]
        rows.sort(key=lambda r: r.created_at)
        return rows

    async def release(self, snapshot_id: str, reason: str) -> None:
        """The owning session lets its PAUSE snapshot go (resumed, terminated, or the pause
        failed): one still CREATING becomes FAILED (its capture is over: the caller's), then
        it is deleted. Idempotent."""
        with contextlib.suppress(IllegalTransitionError):
            await self.records.transition(SnapshotRow, snapshot_id, P.FAILED,
                                          expected=[P.CREATING], state_reason=reason)
        row = self.row(snapshot_id)
        if row.state in (P.READY.value, P.FAILED.value):
            await self.delete(snapshot_id, owner=row.session_id)

    # -- delete and expiry ---------------------------------------------------------------------
    async def update(self, snapshot_id: str, req: SnapshotUpdate,
                     ws: str | None = None) -> Snapshot:
        """Rename, or change the expiry of, a user's snapshot that is not being deleted."""
        row = self.row(snapshot_id, ws)
        if (row.type or T.USER.value) != T.USER.value:
            raise ConflictError(f"snapshot {snapshot_id} is a {row.type} snapshot; its owner "
                                "manages it")
        values: dict[str, Any] = {}
        if "name" in req.model_fields_set:
            values["name"] = req.name
        if "expires_at" in req.model_fields_set:
            expires = req.expires_at
            if expires is not None:
                expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
                if expires <= now():
                    raise ValidationError(f"must be in the future, got {expires.isoformat()}",
                                          field="expires_at")
            values["expires_at"] = expires
        if values and not await self.records.update(
                SnapshotRow, snapshot_id, when_state=[P.CREATING, P.READY, P.FAILED], **values):
            raise ConflictError(f"snapshot {snapshot_id} is {self.row(snapshot_id).state}; "
                                "it can no longer be changed")
        return self.get(snapshot_id, ws)

    async def delete(self, snapshot_id: str, ws: str | None = None, *,
                     owner: str | None = None) -> Snapshot:
        """``owner``: the template deleting its own golden snapshot, or the session releasing
        its PAUSE snapshot (nobody else may, while that session is paused)."""
        row = self.row(snapshot_id, ws)
        if row.template_id is not None and row.template_id != owner:
            raise ConflictError(f"snapshot {snapshot_id} is the golden snapshot of template "
                                f"{row.template_id}; it goes with the template's next build "
                                "or its deletion")
        if row.type == T.PAUSE.value and owner != row.session_id:
            srow = self.records.find(SessionRow, row.session_id)
            if srow is not None and srow.state in PAUSE_STATES:
                raise ConflictError(
                    f"snapshot {snapshot_id} holds the memory and disk of session "
                    f"{row.session_id}, which is {srow.state}; it is released when the session "
                    "is resumed or terminated")
        if row.state in (P.DELETED.value, P.DELETING.value):
            return to_model(row)
        if row.state == P.CREATING.value:
            raise ConflictError(f"snapshot {snapshot_id} is CREATING; delete it once it is "
                                "READY or FAILED")
        try:
            await self.records.transition(SnapshotRow, snapshot_id, P.DELETING)
        except IllegalTransitionError:
            return self.get(snapshot_id)  # a concurrent delete won
        self._spawn(self._delete_in_background(snapshot_id), f"delete {snapshot_id}")
        return self.get(snapshot_id)

    async def _finish_delete(self, snapshot_id: str) -> None:
        from ..steps import fault_point

        fault_point("delete", "mark")
        try:
            await self.records.transition(SnapshotRow, snapshot_id, P.DELETED,
                                          expected=[P.DELETING], deleted_at=now())
        except IllegalTransitionError as exc:
            if exc.current != P.DELETED.value:
                raise
            return  # another finisher (recovery, or a second release) got there first
        fault_point("delete", "remove-files")
        await self.collect_garbage()

    async def _delete_in_background(self, snapshot_id: str) -> None:
        # its spares use its files: stopped before they are collected
        await self.spares.drop_snapshot(snapshot_id)
        await self._finish_delete(snapshot_id)
        await self._collect_after_grace()

    async def _collect_after_grace(self) -> None:
        """A file stored (or rewritten: its ctime moved) within the GC's grace is spared by a
        collection; the sweeper collects only every ~30 s (GC_EVERY_TICKS), so once more when
        the grace is over: a deleted snapshot's files, or a failed capture's, go within
        seconds."""
        await asyncio.sleep(COLLECT_GRACE_S + 0.5)
        await self.collect_garbage()

    async def sweep_expired(self) -> None:
        t = now()
        for row in self.records.all(SnapshotRow):
            if row.expires_at and row.expires_at <= t and row.state in (P.READY.value,
                                                                        P.FAILED.value):
                log.info("%s: expired at %s", row.id, row.expires_at.isoformat())
                await self.delete(row.id)

    # -- artifacts -------------------------------------------------------------------------------
    def referenced(self) -> dict[str, str]:
        """digest -> what needs it: every artifact a live session or a kept snapshot uses."""
        refs: dict[str, str] = {}
        for s in self.records.all(SessionRow):
            if s.state in FINAL:
                continue
            machine = s.machine or {}
            # "state": the device state a restore in progress is still to load
            for d in [*(s.disk_chain or []), machine.get("kernel"), machine.get("initrd"),
                      machine.get("ram"), machine.get("state"),
                      *(machine.get("ram_chain") or [])]:
                if d:
                    refs.setdefault(d, f"session {s.id}")
        for snap in self.records.all(SnapshotRow):
            if snap.state != P.DELETED.value and snap.files:
                for d, kind in Manifest.from_json(snap.files).digests().items():
                    refs.setdefault(d, f"snapshot {snap.id} ({kind})")
        return refs

    async def collect_garbage(self) -> int:
        return await self.host.collect_garbage(set(self.referenced()))

    async def verify(self, repair: bool) -> dict[str, Any]:
        """Check every stored artifact in use against its digest, reading all of it: every kept
        snapshot's, the built images', and what the live sessions' VMs run on; then the host's
        derived RAM caches, and what no record owns. With ``repair``: snapshots whose artifacts
        are damaged become FAILED (naming the artifact), damaged RAM caches are rebuilt, and
        unowned files are removed (those the report lists as ``removed``). A damaged image or
        running VM is only reported: a boot refuses the image, a capture the VM's layer."""
        in_use = self.host.local_artifacts()
        # digest -> its kind in the messages: an image's own names its files best
        digests = {use.digest: use.kind for use in reversed(in_use)}
        by_snapshot: dict[str, dict[str, str]] = {}
        for snap in self.records.all(SnapshotRow):
            if snap.state == P.READY.value and snap.files:
                d = Manifest.from_json(snap.files).digests()
                by_snapshot[snap.id] = d
                for digest, kind in d.items():
                    digests.setdefault(digest, kind)
        bad = await self.host.verify_artifacts(digests, deep=True)
        damaged = []
        for sid, d in by_snapshot.items():
            problems = [bad[x] for x in d if x in bad]
            if problems:
                damaged.append({"snapshot_id": sid, "problems": problems})
                if repair:
                    await self.records.transition(
                        SnapshotRow, sid, P.FAILED, expected=[P.READY],
                        state_reason=f"damaged in storage: {problems[0]}")
        images: dict[str, list[str]] = {}
        sessions: dict[str, list[str]] = {}
        for use in in_use:
            if use.digest not in bad:
                continue
            owner = (images.setdefault(use.image_id, []) if use.image_id is not None
                     else sessions.setdefault(use.session_id or "", []))
            said = bad[use.digest]
            named = said.startswith(f"{use.kind} {use.digest[:12]} ")
            owner.append(said if named else f"{use.kind}: {said}")
        caches = await self.host.scrub_caches(repair)
        referenced = set(self.referenced())
        unowned = self.host.unowned_files(referenced)
        removed: list[Unowned] = []
        if repair and unowned:
            live = {s.id for s in self.records.all(SessionRow) if s.state not in FINAL}
            removed = await self.host.remove_unowned(unowned, referenced, live)
        return {"ok": not bad and not caches.damaged and not caches.rebuilt and not unowned,
                "checked": len(digests), "damaged": damaged,
                "damaged_images": [{"image_id": i, "problems": p} for i, p in images.items()],
                "damaged_sessions": [{"session_id": i, "problems": p}
                                     for i, p in sessions.items()],
                "bad_artifacts": bad, "damaged_caches": caches.damaged,
                "rebuilt": caches.rebuilt,
                "unowned": [{"kind": u.kind, "name": u.name} for u in unowned],
                "removed": [{"kind": u.kind, "name": u.name} for u in removed],
                "repaired": repair}

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a restart: a capture cut short is FAILED; a deletion cut short finishes."""
        for row in self.records.all(SnapshotRow):
            if row.state == P.CREATING.value:
                await self.records.transition(SnapshotRow, row.id, P.FAILED,
                                              state_reason="the server stopped during the capture")
            elif row.state == P.DELETING.value:
                await self._finish_delete(row.id)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()

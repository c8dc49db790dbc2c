"""Pause and resume of a session (the states and their recovery: ``states``).

A pause moves the record READY/RUNNING -> PAUSING (compare-and-set: of two pauses one acts, the
other waits for it) and starts one task: it captures the session into a PAUSE snapshot
(``SnapshotControl.capture``, the guest left paused once captured), stops the VM (its memory
goes back to the host) and writes PAUSED. A failed capture leaves the VM running: the record
goes back to READY (RUNNING if a process still runs) with the reason, and the failed snapshot is
released. A resume moves PAUSED -> RESUMING, checking the workspace's quotas and the host's
capacity in the same transaction (a paused session counts against neither), and starts one task:
it restores the PAUSE snapshot under the same session id (the guest keeps its identity and its
network policy, ``control/network.py``; its clock is set), plugs its volumes in again (they stay
attached to it while it is paused; they are not in the snapshot), writes READY and releases the
snapshot; a failed restore ends the session FAILED (the snapshot is kept: it can be restored as
a new session, or deleted). A session whose policy this host cannot enforce (not root, no
nftables) is not resumed: ``NetworkPolicyUnsupportedError``, and it stays PAUSED (a resume tried
again after a restart fails it instead, keeping the snapshot).

The tasks are the session's start task (``SessionControl._starts``): a terminate cancels them
and finishes the record, and releases the PAUSE snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import ConflictError, SessionFailedError, SnapshotFailedError, TenkiError
from ..host.api import Manifest, RestoreSpec, SnapshotDamagedError
from ..ids import hostname_for
from ..models import Session, SessionState, SnapshotState
from ..store.tables import SessionRow, SnapshotRow
from . import admission
from .network import network_of, refuse_unenforceable
from .states import LIVE, IllegalTransitionError

if TYPE_CHECKING:
    from .sessions import SessionControl
    from .snapshots import SnapshotControl

log = logging.getLogger(__name__)

S = SessionState
P = SnapshotState
SYSTEM = "system"  # the server's own sessions (golden builds): the host's capacity, no quota
#: how long a caller that finds a pause or resume in flight without its task waits for it
SETTLE_TIMEOUT_S = 3600.0


def now() -> datetime:
    return datetime.now(UTC)


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}"


def _machine(m: Manifest) -> dict[str, Any]:
    return {**m.shape.to_json(), "ram": m.ram, "state": m.state, "ram_chain": m.rams}


class PauseControl:
    def __init__(self, sessions: SessionControl, snapshots: SnapshotControl) -> None:
        self.sessions = sessions
        self.snapshots = snapshots
        self.records = sessions.records
        self.host = sessions.host
        self._entry: dict[str, asyncio.Lock] = {}

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._entry.setdefault(session_id, asyncio.Lock())

    def _begin(self, session_id: str, coro: Any, what: str) -> None:
        task: asyncio.Task[Any] = self.sessions._spawn(coro, f"{what} {session_id}")
        self.sessions._starts[session_id] = task

        def done(t: asyncio.Task[Any]) -> None:
            if self.sessions._starts.get(session_id) is t:
                del self.sessions._starts[session_id]

        task.add_done_callback(done)

    async def _outcome(self, session_id: str, busy: S, what: str) -> TenkiError | None:
        """Wait for the pause or resume in flight: its error, or None."""
        task = self.sessions._starts.get(session_id)
        if task is not None:
            await asyncio.wait({task})  # a caller that goes away cuts nothing short
            if task.cancelled():
                row = self.sessions.row(session_id)
                return ConflictError(f"session {session_id} is {row.state}: it was terminated "
                                     f"during the {what}")
            result: TenkiError | None = task.result()
            return result
        row = await self.records.settled(SessionRow, session_id, SETTLE_TIMEOUT_S, busy=busy.value)
        want = S.PAUSED.value if busy == S.PAUSING else S.READY.value
        if row.state == want or (want == S.READY.value and row.state in LIVE):
            return None
        why = f": {row.state_reason}" if row.state_reason else ""
        if row.state == S.FAILED.value:
            return SessionFailedError(f"session {session_id} is FAILED{why}")
        if busy == S.PAUSING and row.state in LIVE:
            return SnapshotFailedError(f"session {session_id} was not paused (it runs on){why}")
        return ConflictError(f"session {session_id} is {row.state}{why}")

    # -- pause -------------------------------------------------------------------------------
    async def pause(self, session_id: str, ws: str | None, wait: bool) -> Session:
        async with self._lock(session_id):
            row = self.sessions.row(session_id, ws)
            if row.state == S.PAUSED.value:
                return self.sessions.to_model(row)
            if row.state != S.PAUSING.value:
                if row.state not in LIVE or not self.host.has_vm(session_id):
                    why = f" ({row.state_reason})" if row.state_reason else ""
                    raise ConflictError(f"session {session_id} is {row.state}{why}; only a "
                                        "running session can be paused")
                try:
                    await self.records.transition(SessionRow, session_id, S.PAUSING,
                                                  expected=[S.READY, S.RUNNING],
                                                  state_reason=None)
                except IllegalTransitionError as exc:
                    raise ConflictError(f"session {session_id} is {exc.current}; only a "
                                        "running session can be paused") from exc
                # its exposed ports close now (not kept for the resume: it gets new URLs)
                await self.sessions.ports.close_session(session_id, "the session is being "
                                                        "paused")
                self._begin(session_id, self._pause(session_id), "pause")
        if wait:
            error = await self._outcome(session_id, S.PAUSING, "pause")
            if error is not None:
                raise error
        return self.sessions.get(session_id)

    async def _pause(self, session_id: str) -> TenkiError | None:
        row = self.sessions.row(session_id)
        snap: SnapshotRow | None = None
        try:
            snap = await self.snapshots.begin_pause(row)
            await self.snapshots.capture(snap.id, session_id, row.base_image_id,
                                         leave_paused=True)
        except asyncio.CancelledError:  # a terminate: it finishes the record
            if snap is not None:
                await asyncio.shield(self._drop(snap.id, "the session was terminated during "
                                                "the pause"))
            raise
        except Exception as exc:
            reason = _reason(exc)
            log.warning("session %s: pause failed: %s", session_id, reason)
            if snap is not None:
                await self._drop(snap.id, "the pause failed")
            return await self._pause_failed(session_id, reason)
        note = None
        try:
            await self.host.terminate(session_id, [])  # its memory goes back to the host
        except Exception as exc:  # a resume stops it again first (host.terminate is idempotent)
            note = f"the VM was not stopped cleanly: {_reason(exc)}"
            log.warning("session %s: %s", session_id, note)
        done = self.records.get(SnapshotRow, snap.id)
        m = Manifest.from_json(done.files)
        try:
            await self.records.transition(SessionRow, session_id, S.PAUSED, expected=[S.PAUSING],
                                          state_reason=note, machine=_machine(m),
                                          disk_chain=list(m.layers))
        except IllegalTransitionError as exc:
            return ConflictError(f"session {session_id} is {exc.current}: it was not paused")
        log.info("session %s: PAUSED (snapshot %s)", session_id, snap.id)
        return None

    async def _pause_failed(self, session_id: str, reason: str) -> TenkiError:
        if self.host.has_vm(session_id):  # the guest runs on (the host resumed it)
            back = S.RUNNING if self.host.running_processes(session_id) else S.READY
            try:
                await self.records.transition(SessionRow, session_id, back,
                                              expected=[S.PAUSING],
                                              state_reason=f"pause failed: {reason}")
            except IllegalTransitionError as exc:
                return ConflictError(f"session {session_id} is {exc.current}: it was not "
                                     f"paused ({reason})")
            return SnapshotFailedError(f"session {session_id} was not paused (it runs on): "
                                       f"{reason}")
        why = f"the VM was lost during the pause: {reason}"
        try:
            await self.records.transition(SessionRow, session_id, S.FAILED,
                                          expected=[S.PAUSING], state_reason=why,
                                          terminated_at=now())
        except IllegalTransitionError as exc:
            return ConflictError(f"session {session_id} is {exc.current}: it was not paused "
                                 f"({reason})")
        await self.sessions.volumes.release_session(session_id)
        return SessionFailedError(f"session {session_id} is FAILED: {why}")

    async def _drop(self, snapshot_id: str, reason: str) -> None:
        try:
            await self.snapshots.release(snapshot_id, reason)
        except Exception as exc:  # left for the user (or the next release) to delete
            log.warning("%s: not released: %s", snapshot_id, _reason(exc))

    async def release_all(self, session_id: str, reason: str) -> None:
        """The session ended (terminated): its PAUSE snapshots go."""
        for snap in self.snapshots.pause_snapshots(session_id):
            await self._drop(snap.id, reason)

    # -- resume ------------------------------------------------------------------------------
    async def resume(self, session_id: str, ws: str | None, wait: bool) -> Session:
        async with self._lock(session_id):
            row = self.sessions.row(session_id, ws)
            if row.state in LIVE:
                return self.sessions.to_model(row)
            if row.state == S.PAUSING.value:
                raise ConflictError(f"session {session_id} is being paused (PAUSING); resume "
                                    "it once it is PAUSED")
            if row.state != S.RESUMING.value:
                if row.state != S.PAUSED.value:
                    why = f" ({row.state_reason})" if row.state_reason else ""
                    raise ConflictError(f"session {session_id} is {row.state}{why}; only a "
                                        "PAUSED session can be resumed")
                # its policy is enforced again by this host, or it does not run (a server
                # restarted without root or nftables keeps it PAUSED)
                refuse_unenforceable(self.host, network_of(row),
                                     f"session {session_id} cannot be resumed: ")
                # a paused session counts against nothing: the resume is placed and admitted
                # again (on any host: its PAUSE snapshot's artifacts are in the shared store,
                # and the host that caches them comes first; its volumes' host if it has any)
                ready = self.snapshots.pause_snapshots(session_id, P.READY.value)
                found = await self.host.candidates(
                    volume_ids=[m.volume_id for m in self.sessions.volumes.mounts_of(
                        session_id)],
                    digests=list(Manifest.from_json(ready[-1].files).digests())
                    if ready else None, network=network_of(row))

                async def move(host_id: str) -> None:
                    capacity = self.host.capacity_of(host_id)
                    check = (admission.host_memory(row.memory_mb, capacity, host_id)
                             if row.workspace_id == SYSTEM else
                             admission.session(row.workspace_id, row.memory_mb, capacity,
                                               host_id))
                    # the new host is named before it is asked to restore (fencing)
                    await self.records.transition(SessionRow, session_id, S.RESUMING,
                                                  expected=[S.PAUSED], check=check,
                                                  host_id=host_id)

                try:
                    await self.host.place(found, row.memory_mb, move)
                except IllegalTransitionError as exc:
                    raise ConflictError(f"session {session_id} is {exc.current}; only a "
                                        "PAUSED session can be resumed") from exc
                self._begin(session_id, self._resume(session_id), "resume")
        if wait:
            error = await self._outcome(session_id, S.RESUMING, "resume")
            if error is not None:
                raise error
        return self.sessions.get(session_id)

    async def _resume(self, session_id: str) -> TenkiError | None:
        snap: SnapshotRow | None = None
        try:
            ready = self.snapshots.pause_snapshots(session_id, P.READY.value)
            if not ready:
                others = self.snapshots.pause_snapshots(session_id, P.FAILED.value)
                why = f" ({others[-1].id}: {others[-1].state_reason})" if others else ""
                raise SnapshotFailedError(f"no READY PAUSE snapshot to resume from{why}")
            snap = ready[-1]
            manifest = Manifest.from_json(snap.files)
            net = network_of(self.sessions.row(session_id))
            # checked by ``resume`` already; again for a resume tried again after a restart
            refuse_unenforceable(self.host, net)
            if self.host.has_vm(session_id):  # a VM a pause did not stop: fully gone first
                await self.host.terminate(session_id, [])
            started = await self.host.restore(RestoreSpec(
                session_id, snap.id, manifest, hostname_for(session_id),
                keep_identity=True, network=net))
            await self.records.update(SessionRow, session_id, when_state=[S.RESUMING],
                                      machine={**started.shape.to_json(), "ram": started.ram,
                                               "ram_chain": list(started.ram_chain)},
                                      disk_chain=list(started.layers))
            # its volumes stayed attached (IN_USE) while paused: plugged in again
            warning = await self.sessions.volumes.reattach(session_id)
            await self.records.transition(SessionRow, session_id, S.READY,
                                          expected=[S.RESUMING], state_reason=warning)
        except asyncio.CancelledError:
            raise  # a terminate: it finishes the record (the host stops what it launched)
        except IllegalTransitionError as exc:  # the VM died meanwhile, or a terminate won
            return ConflictError(f"session {session_id} is {exc.current}: it was not resumed")
        except Exception as exc:
            reason = _reason(exc)
            log.warning("session %s: resume failed: %s", session_id, reason)
            if isinstance(exc, SnapshotDamagedError) and snap is not None:
                with contextlib.suppress(IllegalTransitionError):
                    await self.records.transition(SnapshotRow, snap.id, P.FAILED,
                                                  expected=[P.READY],
                                                  state_reason=f"damaged in storage: {reason}")
            try:
                await self.records.transition(SessionRow, session_id, S.FAILED,
                                              expected=[S.RESUMING],
                                              state_reason=f"resume failed: {reason}",
                                              terminated_at=now())
            except IllegalTransitionError as moved:
                return ConflictError(f"session {session_id} is {moved.current}: it was not "
                                     f"resumed ({reason})")
            await self.sessions.volumes.release_session(session_id)
            return SessionFailedError(f"session {session_id} is FAILED: resume failed: {reason}")
        log.info("session %s: resumed from %s", session_id, snap.id)
        await self._drop(snap.id, "the session was resumed")
        return None

    # -- recovery ----------------------------------------------------------------------------
    async def recover_pausing(self, session_id: str, vm_found: bool) -> None:
        """A pause cut short by a server crash (see ``states``)."""
        snaps = self.snapshots.pause_snapshots(session_id)
        if vm_found:
            for snap in snaps:  # the session runs on: a half-made or unused snapshot goes
                await self._drop(snap.id, "the server stopped during the pause")
            await self.records.transition(
                SessionRow, session_id, S.READY, expected=[S.PAUSING],
                state_reason="pause failed: the server stopped during the pause; the session "
                             "runs on")
            return
        ready = [s for s in snaps if s.state == P.READY.value]
        for snap in snaps:
            if snap not in ready:
                await self._drop(snap.id, "the server stopped during the pause")
        if ready:
            m = Manifest.from_json(ready[-1].files)
            await self.records.transition(SessionRow, session_id, S.PAUSED,
                                          expected=[S.PAUSING], machine=_machine(m),
                                          disk_chain=list(m.layers))
            return
        await self.records.transition(
            SessionRow, session_id, S.FAILED, expected=[S.PAUSING], terminated_at=now(),
            state_reason="the server stopped during the pause; the VM and its capture are lost")
        await self.sessions.volumes.release_session(session_id)

    def recover_resuming(self, session_id: str) -> None:
        """A resume cut short by a server crash: tried again (the host killed what the
        crashed restore left); it fails the session if no READY PAUSE snapshot is left."""
        log.info("session %s: resuming again after a server restart", session_id)
        self._begin(session_id, self._resume(session_id), "resume")

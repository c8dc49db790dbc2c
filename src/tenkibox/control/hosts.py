"""Hosts: their records (``HostRow``, the only writer), membership of the fleet, host loss.

A host worker (``tenki host run``) registers (``register``: a new host gets an id, a known one
is updated, a LOST one becomes ACTIVE again) and heartbeats (``heartbeat``); both answer the
sessions the records place on it and consider live (``owned``): the worker stops every other VM
it runs (fencing: the record decides, never the host). The embedded host of a single-machine
server is the host ``local`` (no address, no heartbeat: it cannot be lost).

Every sweep (``sweep``, the control plane's loop): a host silent for ``TENKI_HOST_LOST_AFTER_S``
(default 15 s) becomes LOST, leaves the fleet, and its live sessions end TERMINATED "host lost"
(their snapshots stay: the artifacts are in the shared store). Silence counts only while this
process could hear it: from its first sweep on (a control plane started again must not lose
every host whose beats failed while none listened), and beyond the time its loop was recently
held (``watch_loop``: a heartbeat that arrived then waited unread). Members are connected for the
hosts another control-plane process registered, or that ran before this process started; and
every heartbeat interval the members that cache their answers are refreshed.

A member is made from a registration by ``connect(host_id, address, secret)`` (the runtime's:
a ``RemoteHost``; tests: fakes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..errors import ConflictError, NotFoundError, TenkiError, ValidationError
from ..host.api import HostAPI
from ..host.capacity import HostCapacity
from ..models import HostHeartbeat, HostHeartbeatAnswer, HostInfo, HostRegister, HostRegistered
from ..models import HostState as H
from ..store.tables import HostRow, SessionRow
from .fleet import LOCAL, Fleet
from .records import Records
from .states import LIVE, IllegalTransitionError
from .workspaces import HOLDING_SESSION

if TYPE_CHECKING:
    from .sessions import SessionControl

log = logging.getLogger(__name__)

#: a registration's worker made into a member of the fleet
#: (host id, address, secret, the capacity it registered with) -> the member: the capacity
#: places sessions before the member's first status answer
Connect = Callable[[str, str, str, HostCapacity], HostAPI]

#: states of a session on a host that end when the host is lost (a PAUSED one has no VM: it is
#: resumed wherever there is room)
_ON_HOST = frozenset(s for s in HOLDING_SESSION)


#: how often ``watch_loop`` samples how late this process's event loop runs a timer
LAG_PROBE_S = 0.25


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError(f"{name} must be a number of seconds, got {raw!r}",
                              field=name) from None
    if value <= 0:
        raise ValidationError(f"{name} must be positive, got {raw!r}", field=name)
    return value


def now() -> datetime:
    return datetime.now(UTC)


def _capacity(row: HostRow) -> HostCapacity:
    return HostCapacity(row.id, row.memory_total_mib, row.memory_reserve_mib, row.overcommit,
                        row.cpus, row.accelerator)


class HostControl:
    def __init__(self, records: Records, fleet: Fleet, sessions: SessionControl,
                 connect: Connect | None = None) -> None:
        """``connect``: makes a member from a registration (None: registrations are refused,
        as a server with only its embedded host has no way to call a worker)."""
        self.records = records
        self.fleet = fleet
        self.sessions = sessions
        self.connect = connect
        #: a host silent this long is LOST
        self.lost_after_s = _env_seconds("TENKI_HOST_LOST_AFTER_S", 15.0)
        #: what a worker is told to heartbeat at: several beats fit in the lost delay
        self.heartbeat_interval_s = _env_seconds("TENKI_HOST_HEARTBEAT_S",
                                                 min(3.0, self.lost_after_s / 5))
        self._last_refresh = 0.0
        #: when this process began to hear heartbeats (its first sweep): a host's silence
        #: counts only from then (the beats sent while no control plane listened failed)
        self._hearing_since: datetime | None = None
        #: (when, how late) of the loop's recent timer wake-ups (``watch_loop``), and its last
        #: wake-up: a held loop leaves heartbeats unread, and its silence is not the hosts'
        self._lags: collections.deque[tuple[float, float]] = collections.deque()
        self._probed_at: float | None = None
        self._warned_held_at = 0.0
        #: host id -> (address, secret) its member was made with: a host that registered
        #: again elsewhere with others is connected again
        self._made_with: dict[str, tuple[str, str]] = {}

    # -- reads -------------------------------------------------------------------------------------
    def row(self, host_id: str) -> HostRow:
        return self.records.get(HostRow, host_id)

    def owned(self, host_id: str) -> list[str]:
        """The sessions the records place on ``host_id`` that hold (or are getting, or
        giving up) a VM there: the ones its worker keeps."""
        return sorted(r.id for r in self.records.all(
            SessionRow, SessionRow.host_id == host_id, SessionRow.state.in_(_ON_HOST)))

    def info(self, row: HostRow) -> HostInfo:
        placed = self.records.all(SessionRow, SessionRow.host_id == row.id,
                                  SessionRow.state.in_(HOLDING_SESSION))
        member = self.fleet.members.get(row.id)
        used = row.memory_used_mib
        if member is not None and row.address is None:
            used = member.memory_used_mib()  # the embedded host answers at once
        capacity = int((row.memory_total_mib - row.memory_reserve_mib) * row.overcommit)
        return HostInfo(
            host_id=row.id, address=row.address, state=H(row.state),
            state_reason=row.state_reason, cpus=row.cpus,
            memory_total_mib=row.memory_total_mib, memory_reserve_mib=row.memory_reserve_mib,
            overcommit=row.overcommit, memory_capacity_mib=max(0, capacity),
            memory_promised_mib=sum(r.memory_mb for r in placed), memory_used_mib=used,
            disk_total_bytes=row.disk_total_bytes, disk_free_bytes=row.disk_free_bytes,
            accelerator=row.accelerator, qemu_version=row.qemu_version,
            cpu_model=row.cpu_model, network_enforced=row.network_enforced,
            sessions=len(placed), registered_at=row.registered_at,
            last_heartbeat_at=row.last_heartbeat_at)

    def get(self, host_id: str) -> HostInfo:
        return self.info(self.row(host_id))

    def query(self) -> list[HostInfo]:
        rows = sorted(self.records.all(HostRow), key=lambda r: (r.id != LOCAL, r.id))
        return [self.info(r) for r in rows]

    # -- the embedded host and the members at start ------------------------------------------------
    async def start(self) -> None:
        """Record the embedded host (if this server has one), and connect the registered
        hosts that are not LOST (they run on while a control plane restarts)."""
        local = self.fleet.members.get(LOCAL)
        if local is not None:
            await self._record_local(local)
        await self._sync_members()

    async def _record_local(self, host: HostAPI) -> None:
        cap = host.capacity
        values: dict[str, Any] = dict(
            address=None, secret=None, cpus=cap.cpus, memory_total_mib=cap.memory_total_mib,
            memory_reserve_mib=cap.memory_reserve_mib, overcommit=cap.overcommit,
            accelerator=cap.accelerator, network_enforced=bool(host.network_enforced),
            registered_at=now())
        if self.records.find(HostRow, LOCAL) is not None:
            # its figures may change between starts (configuration); a drain is kept
            await self.records.update(HostRow, LOCAL, **values)
            return
        with contextlib.suppress(Exception):  # another process starting at once made it
            await self.records.insert(HostRow(id=LOCAL, state=H.ACTIVE.value, disk_total_bytes=0,
                                              disk_free_bytes=0, qemu_version="", cpu_model="",
                                              memory_used_mib=0, tmpfs_used_bytes=0,
                                              tmpfs_total_bytes=0, **values))

    async def _sync_members(self) -> None:
        """Members for the hosts the records list as ACTIVE or DRAINING (registered with
        another control-plane process, or before this one started); none for LOST or removed
        ones."""
        rows = {r.id: r for r in self.records.all(HostRow)}
        for host_id in list(self.fleet.members):
            row = rows.get(host_id)
            if host_id != LOCAL and (row is None or row.state == H.LOST.value):
                await self.fleet.close_member(self.fleet.discard(host_id))
        if self.connect is None:
            return
        for row in rows.values():
            if row.address is None or row.state == H.LOST.value:
                continue
            made_with = (row.address, row.secret or "")
            if row.id in self.fleet.members and self._made_with.get(row.id) == made_with:
                continue
            try:
                member = self.connect(row.id, *made_with, _capacity(row))
            except Exception as exc:  # tried again at the next sweep
                log.warning("host %s: cannot connect to %s: %s", row.id, row.address, exc)
                continue
            self._made_with[row.id] = made_with
            await self.fleet.close_member(self.fleet.add(row.id, member))

    # -- registration and heartbeats ---------------------------------------------------------------
    async def register(self, req: HostRegister) -> HostRegistered:
        if self.connect is None:
            raise ConflictError("this control plane takes no host workers (it runs its "
                                "embedded host only)")
        host_id = req.host_id or f"host-{secrets.token_hex(6)}"
        if host_id == LOCAL:
            raise ValidationError(f"{LOCAL} is the embedded host's id", field="host_id")
        t = now()
        values: dict[str, Any] = dict(
            address=req.address, secret=req.secret, cpus=req.cpus,
            memory_total_mib=req.memory_total_mib, memory_reserve_mib=req.memory_reserve_mib,
            overcommit=req.overcommit, disk_total_bytes=req.disk_total_bytes,
            disk_free_bytes=req.disk_free_bytes, accelerator=req.accelerator,
            qemu_version=req.qemu_version, cpu_model=req.cpu_model,
            network_enforced=req.network_enforced, registered_at=t, last_heartbeat_at=t)
        try:
            member = self.connect(host_id, req.address, req.secret,
                                  HostCapacity(host_id, req.memory_total_mib,
                                               req.memory_reserve_mib, req.overcommit, req.cpus,
                                               req.accelerator))
        except TenkiError:
            raise
        except Exception as exc:
            raise ValidationError(f"cannot use {req.address!r}: {exc}", field="address") from exc
        # the member joins and its record is written with no await between (the write's
        # transaction runs before its first one): no sweep sees one without the other
        self._made_with[host_id] = (req.address, req.secret)
        replaced = self.fleet.add(host_id, member)
        row = self.records.find(HostRow, host_id)
        if row is None:
            await self.records.insert(HostRow(id=host_id, state=H.ACTIVE.value,
                                              memory_used_mib=0, tmpfs_used_bytes=0,
                                              tmpfs_total_bytes=0, **values))
            log.info("host %s registered at %s", host_id, req.address)
        else:
            try:  # back from LOST in the same write as its new figures
                await self.records.transition(HostRow, host_id, H.ACTIVE, expected=[H.LOST],
                                              state_reason="registered again after it was "
                                              "lost", **values)
            except IllegalTransitionError:
                await self.records.update(HostRow, host_id, **values)
            await self._vms_gone(host_id, set(req.vms), t)
            log.info("host %s registered again at %s", host_id, req.address)
        await self.fleet.close_member(replaced)
        info = self.get(host_id)
        return HostRegistered(**info.model_dump(), heartbeat_interval_s=self.heartbeat_interval_s,
                              owned=self.owned(host_id))

    async def _vms_gone(self, host_id: str, vms: set[str], at: datetime) -> None:
        """A known host registers again (its worker restarted, or the machine did): a running
        session placed on it whose VM it no longer runs is FAILED. Only sessions READY for
        longer than a heartbeat interval: one whose boot just ended may be missing from a list
        made a moment before."""
        since = at - timedelta(seconds=self.heartbeat_interval_s)
        for row in self.records.all(SessionRow, SessionRow.host_id == host_id,
                                    SessionRow.state.in_(sorted(LIVE))):
            if row.id not in vms and row.ready_at is not None and row.ready_at < since:
                log.warning("session %s: host %s registered again without its VM", row.id,
                            host_id)
                await self.sessions.vm_gone(row.id, f"its VM was gone when host {host_id} "
                                            "registered again")

    async def heartbeat(self, host_id: str, req: HostHeartbeat) -> HostHeartbeatAnswer:
        """404 (``NotFound``) for a host the records do not know, or one LOST: either way its
        worker registers again (its sessions were ended; it is told which it owns then)."""
        row = self.records.find(HostRow, host_id)
        if row is None or row.address is None:
            raise NotFoundError(f"host {host_id} is not registered: register again")
        if row.state == H.LOST.value:
            raise NotFoundError(f"host {host_id} was lost ({row.state_reason}): register again")
        await self.records.update(
            HostRow, host_id, when_state=[H.ACTIVE, H.DRAINING], notify=False,
            last_heartbeat_at=now(), memory_used_mib=req.memory_used_mib,
            tmpfs_used_bytes=req.tmpfs_used_bytes, tmpfs_total_bytes=req.tmpfs_total_bytes,
            disk_free_bytes=req.disk_free_bytes)
        return HostHeartbeatAnswer(state=H(self.row(host_id).state), owned=self.owned(host_id))

    # -- drain and remove --------------------------------------------------------------------------
    async def drain(self, host_id: str) -> HostInfo:
        """No new sessions on it; the ones it runs go on. Idempotent."""
        row = self.row(host_id)
        if row.state != H.DRAINING.value:
            try:
                await self.records.transition(HostRow, host_id, H.DRAINING, expected=[H.ACTIVE])
            except IllegalTransitionError as exc:
                if exc.current != H.DRAINING.value:
                    raise ConflictError(f"host {host_id} is {exc.current}; only an ACTIVE host "
                                        "can be drained") from exc
        return self.get(host_id)

    async def undrain(self, host_id: str) -> HostInfo:
        """New sessions may go to it again. Idempotent."""
        row = self.row(host_id)
        if row.state != H.ACTIVE.value:
            try:
                await self.records.transition(HostRow, host_id, H.ACTIVE,
                                              expected=[H.DRAINING], state_reason=None)
            except IllegalTransitionError as exc:
                if exc.current != H.ACTIVE.value:
                    raise ConflictError(f"host {host_id} is {exc.current}; only a DRAINING "
                                        "host can be undrained (a LOST one registers "
                                        "again)") from exc
        return self.get(host_id)

    async def remove(self, host_id: str, *, force: bool = False) -> None:
        """Forget a host. Refused (409) while sessions are placed on it, unless ``force``:
        then they are terminated first ("host removed"; through the host if it answers)."""
        if host_id == LOCAL:
            raise ConflictError(f"{LOCAL} is this server's embedded host; it cannot be removed "
                                "(run `tenki serve --no-local-host` for a control plane "
                                "without one)")
        row = self.row(host_id)
        placed = self.owned(host_id)
        if placed and not force:
            raise ConflictError(
                f"host {host_id} has {len(placed)} live sessions ({', '.join(placed[:5])}"
                f"{', ...' if len(placed) > 5 else ''}); terminate them, drain the host and "
                "wait, or remove it with force", details={"sessions": placed})
        reachable = row.state != H.LOST.value and host_id in self.fleet.members
        for session_id in placed:
            if reachable:
                try:
                    await self.sessions.terminate(session_id, "host removed")
                    continue
                except TenkiError as exc:
                    log.warning("session %s: terminate on host %s failed (%s); ended without "
                                "it", session_id, host_id, exc.message)
            await self.sessions.end_unreachable(session_id, "host removed")
        await self.fleet.close_member(self.fleet.discard(host_id))
        await self.records.remove(HostRow, host_id)
        log.info("host %s removed", host_id)

    # -- the sweep ---------------------------------------------------------------------------------
    async def watch_loop(self) -> None:
        """Sample how late this process's event loop wakes a timer, every ``LAG_PROBE_S`` (a
        loop kept busy by synchronous work, or a process starved of CPU, reads a heartbeat
        that arrived only that much later)."""
        while True:
            asleep = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            self._probed_at = time.monotonic()
            self._lags.append((self._probed_at, self._probed_at - asleep - LAG_PROBE_S))

    def held_s(self) -> float:
        """How long a heartbeat may lately have waited unread here: the largest lateness of the
        loop within the host-loss delay, or, if larger, how long the probe has been kept from
        running now (the loop was held until this very call)."""
        t = time.monotonic()
        while self._lags and self._lags[0][0] < t - self.lost_after_s:
            self._lags.popleft()
        held = max((lag for _, lag in self._lags), default=0.0)
        if self._probed_at is not None:
            held = max(held, t - self._probed_at - LAG_PROBE_S)
        return max(0.0, held)

    async def sweep(self) -> None:
        """Lost hosts (and their sessions), members to connect, members to refresh."""
        if self._hearing_since is None:
            self._hearing_since = now()
        held = self.held_s()
        plain = now() - timedelta(seconds=self.lost_after_s)
        cutoff = plain - timedelta(seconds=held)
        for row in self.records.all(HostRow):
            if row.address is None:
                continue  # the embedded host: in this process, never silent
            if row.state != H.LOST.value:
                last = max(row.last_heartbeat_at or row.registered_at, self._hearing_since)
                if last >= cutoff:
                    if last < plain and time.monotonic() - self._warned_held_at > 60:
                        self._warned_held_at = time.monotonic()
                        log.warning("host %s is silent for more than %g s, but this control "
                                    "plane's loop was held up to %.1f s lately (its heartbeats "
                                    "may wait unread): not lost yet", row.id,
                                    self.lost_after_s, held)
                    continue
                try:
                    # only if no heartbeat came since it was read (nor a registration)
                    await self.records.transition(
                        HostRow, row.id, H.LOST, expected=[H.ACTIVE, H.DRAINING],
                        when={"last_heartbeat_at": row.last_heartbeat_at,
                              "registered_at": row.registered_at},
                        state_reason=f"no heartbeat for {self.lost_after_s:g} s (last at "
                        f"{last.isoformat(timespec='seconds')})")
                except IllegalTransitionError:
                    continue  # it beat meanwhile, or another control-plane process judged it
                log.warning("host %s is LOST: no heartbeat for %g s", row.id, self.lost_after_s)
                await self.fleet.close_member(self.fleet.discard(row.id))
            # every sweep, not only at the move: a process that moved it may have stopped
            # before it ended every session
            await self.end_sessions(row.id, "host lost")
        await self._sync_members()
        if time.monotonic() - self._last_refresh >= self.heartbeat_interval_s:
            self._last_refresh = time.monotonic()
            await self.fleet.refresh()

    async def end_sessions(self, host_id: str, reason: str) -> list[str]:
        """End every live session placed on ``host_id`` (lost): TERMINATED with ``reason``."""
        ended = []
        for session_id in self.owned(host_id):
            try:
                if await self.sessions.end_unreachable(session_id, reason):
                    ended.append(session_id)
            except Exception as exc:  # tried again at the next sweep
                log.warning("session %s: could not be ended (%s)", session_id, exc)
        if ended:
            log.warning("host %s: %d sessions ended (%s)", host_id, len(ended), reason)
        return ended

"""``Fleet``: the control plane's one ``HostAPI`` over every member host, and placement.

The control modules call ``self.host.*`` as they did with one host; the fleet sends each call to
the member it concerns:

- a session's calls go to the host its record names (``sessions.host_id``: written before that
  host is asked to boot, so the record, not a member's say-so, decides who owns a VM);
- a volume's calls go to the host its record names (a volume never moves);
- the rest (garbage collection, verification, listings) combine every member.

Placement (``candidates`` then ``by_room``): a pinned host, or the hosts of a session's volumes,
or every ACTIVE member, the ones that already hold more of a snapshot's artifacts first, then
the ones with more room. The admission check of the chosen host runs in the transaction that
writes its id on the record (``control/admission.py``); a host found full there is skipped for
the next one.

A single-machine server is a fleet of one member, ``local`` (the embedded host): every answer
is then that host's, unchanged. The records of hosts (``HostRow``) belong to
``control/hosts.py``; the fleet only reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from sqlalchemy import func, select

from ..errors import (
    CapacityUnavailableError,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from ..host.api import (
    BootSpec,
    CacheScrub,
    Captured,
    CaptureSpec,
    ExecSpec,
    HostAPI,
    InUse,
    NetworkSpec,
    ProcessEvent,
    ProcessRef,
    Recovered,
    RestoreSpec,
    SpareHost,
    Started,
    Unowned,
    VMGone,
    VolumeMountSpec,
)
from ..host.capacity import HostCapacity
from ..host.tmpfs import TmpfsUse
from ..models import HostState, Image
from ..store.tables import HostRow, SessionRow, VolumeRow
from .network import needs_enforcement, refuse_unenforceable
from .workspaces import HOLDING_SESSION

if TYPE_CHECKING:
    from .records import Records

log = logging.getLogger(__name__)

#: how much of a host's capacity, as a share, caching a snapshot's artifacts is worth in its
#: placement (a fetch from the bucket costs ~1 s and the bytes; an overloaded host costs more)
CACHE_PREFERENCE = 0.1
T = TypeVar("T")

#: the embedded host of a single-machine server (and of records written before hosts existed)
LOCAL = "local"


@runtime_checkable
class Refreshable(Protocol):
    """A member whose answers come from a cache it refreshes (a remote host): the control
    plane refreshes it every heartbeat interval."""

    async def refresh(self) -> None: ...


@runtime_checkable
class Closable(Protocol):
    """A member holding connections, closed when it leaves the fleet."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Candidates:
    """Where a new session may go (``Fleet.candidates``)."""

    hosts: list[str]
    #: host id -> bytes of the snapshot's artifacts it holds (a restore among several hosts)
    cached: dict[str, int] = field(default_factory=dict)
    #: chosen by the caller (a pin, or its volumes' host): a full host is a conflict there
    pinned: bool = False
    #: the host holding a spare for this restore (``control/spares.py``): tried first
    spare: str | None = None


class Fleet:
    """Implements ``HostAPI`` over ``members`` (host id -> host)."""

    def __init__(self, members: dict[str, HostAPI] | None = None) -> None:
        self._members: dict[str, HostAPI] = dict(members or {})
        self._records: Records | None = None
        #: VMs gone on any member, for ``watch``; one pump task per member while watched
        self._gone: asyncio.Queue[VMGone] = asyncio.Queue()
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._watching = False

    def bind(self, records: Records) -> None:
        """The records the fleet reads placements from (the control plane's)."""
        self._records = records

    @property
    def records(self) -> Records:
        assert self._records is not None, "Fleet.bind(records) first"
        return self._records

    # -- members ---------------------------------------------------------------------------------
    @property
    def members(self) -> dict[str, HostAPI]:
        return dict(self._members)

    def member(self, host_id: str) -> HostAPI:
        host = self._members.get(host_id)
        if host is None:
            raise ConflictError(f"host {host_id} is not connected to this control plane")
        return host

    def add(self, host_id: str, host: HostAPI) -> HostAPI | None:
        """Make ``host`` the member ``host_id``; returns the member it replaced (to close)."""
        old = self._members.get(host_id)
        self._members[host_id] = host
        self._stop_pump(host_id)
        if self._watching:
            self._pump(host_id, host)
        return old if old is not host else None

    def discard(self, host_id: str) -> HostAPI | None:
        """Take the member out (lost or removed); returns it (to close)."""
        self._stop_pump(host_id)
        return self._members.pop(host_id, None)

    async def close_member(self, host: HostAPI | None) -> None:
        if isinstance(host, Closable):
            with contextlib.suppress(Exception):
                await host.aclose()

    async def refresh(self) -> None:
        """Refresh every member that caches its answers (remote hosts); one failing (an
        unreachable host: the lost sweep judges it by its heartbeats) holds up no other."""
        for host_id, host in list(self._members.items()):
            if isinstance(host, Refreshable):
                try:
                    await host.refresh()
                except Exception as exc:
                    log.debug("host %s: refresh failed: %s", host_id, exc)

    # -- where things are ------------------------------------------------------------------------
    def host_of(self, session_id: str) -> str | None:
        """The host the session's record names (None: no record)."""
        row = self.records.find(SessionRow, session_id)
        if row is None:
            return None
        return row.host_id or LOCAL

    def volume_host(self, volume_id: str) -> str | None:
        row = self.records.find(VolumeRow, volume_id)
        if row is None:
            return None
        return row.host_id or LOCAL

    def _for_session(self, session_id: str) -> HostAPI:
        host_id = self.host_of(session_id)
        if host_id is None:
            raise ConflictError(f"session {session_id} has no record: no host runs it")
        return self.member(host_id)

    # A caller that holds the session's record already (an exec reads it to check the session
    # runs) asks by it: the same answer as by id, without reading the record again.
    def host_for(self, row: SessionRow) -> HostAPI:
        """The member the record ``row`` names (``ConflictError``: not connected here)."""
        return self.member(row.host_id or LOCAL)

    def runs(self, row: SessionRow) -> bool:
        """``has_vm`` by a record already read: the VM is on the member it names."""
        host = self._members.get(row.host_id or LOCAL)
        return host is not None and host.has_vm(row.id)

    def _for_volume(self, volume_id: str) -> HostAPI:
        host_id = self.volume_host(volume_id)
        if host_id is None:
            raise ConflictError(f"volume {volume_id} has no record: no host holds it")
        return self.member(host_id)

    # -- placement ---------------------------------------------------------------------------------
    def _hosts(self) -> dict[str, HostRow]:
        return {r.id: r for r in self.records.all(HostRow)}

    def active(self) -> list[str]:
        """Members that take new sessions (ACTIVE in the records, connected here)."""
        rows = self._hosts()
        return sorted(h for h in self._members
                      if h in rows and rows[h].state == HostState.ACTIVE.value)

    def _usable(self, host_id: str, rows: dict[str, HostRow], field: str) -> None:
        row = rows.get(host_id)
        if row is None:
            raise ValidationError(f"host {host_id} is not a host of this control plane",
                                  field=field)
        if row.state != HostState.ACTIVE.value:
            why = f" ({row.state_reason})" if row.state_reason else ""
            raise ConflictError(f"host {host_id} is {row.state}{why}: it takes no new sessions",
                                details={"host_id": host_id, "state": row.state})
        if host_id not in self._members:
            raise ConflictError(f"host {host_id} is not connected to this control plane",
                                details={"host_id": host_id})

    async def candidates(self, *, pin: str | None = None, volume_ids: list[str] | None = None,
                         digests: list[str] | None = None,
                         network: NetworkSpec | None = None) -> Candidates:
        """The hosts a session may go to: ``pin`` alone (a ValidationError naming ``host_id``
        if no such host exists, a ConflictError if it takes no sessions), else the host of its
        volumes alone, else every ACTIVE member, with the bytes of ``digests`` (a restore's
        artifacts) each already holds. ``by_room`` orders them."""
        rows = self._hosts()
        if network is not None and not needs_enforcement(network):
            network = None  # the default policy runs anywhere
        if pin is not None:
            self._usable(pin, rows, "host_id")
        holders = {self.volume_host(v) or LOCAL for v in volume_ids or []}
        if len(holders) > 1:
            raise ValidationError(
                f"the volumes are on different hosts ({', '.join(sorted(holders))}); a session "
                "runs on the host of its volumes", field="volumes")
        if holders:
            (holder,) = holders
            if pin is not None and pin != holder:
                raise ValidationError(f"its volumes are on host {holder}, not {pin}; a session "
                                      "runs on the host of its volumes", field="host_id")
            self._usable(holder, rows, "volumes")
            if network is not None:
                refuse_unenforceable(self._members[holder], network,
                                     f"host {holder} (its volumes' host): ")
            return Candidates([holder], pinned=pin is not None)
        if pin is not None:
            if network is not None:
                refuse_unenforceable(self._members[pin], network, f"host {pin}: ")
            return Candidates([pin], pinned=True)
        hosts = self.active()
        if network is not None and hosts:
            enforcing = [h for h in hosts if self._members[h].network_enforced]
            if not enforcing:  # the policy of the create is refused, naming its field
                refuse_unenforceable(self._members[hosts[0]], network,
                                     "no ACTIVE host can enforce it: ")
            hosts = enforcing or hosts
        if not hosts:
            raise CapacityUnavailableError(
                "capacity unavailable: no ACTIVE host to run the session (register a host with "
                "`tenki host run`)", details={"hosts": 0})
        cached: dict[str, int] = {}
        if digests and len(hosts) > 1:
            cached = dict(zip(hosts, await asyncio.gather(
                *(self._cached(h, digests) for h in hosts)), strict=True))
        return Candidates(hosts, cached=cached)

    async def _cached(self, host_id: str, digests: list[str]) -> int:
        host = self._members.get(host_id)
        if host is None:
            return 0
        try:
            return await host.cached_bytes(digests)
        except Exception as exc:  # a preference only: an unanswering host just ranks last
            log.debug("host %s: cached_bytes failed: %s", host_id, exc)
            return -1

    def by_room(self, found: Candidates) -> list[str]:
        """The candidates best first, by the share of their guest memory capacity still free,
        plus ``CACHE_PREFERENCE`` for the host caching most of the snapshot's artifacts (in
        proportion for the others): a host that has the files wins unless another has at least
        that much more of its capacity free, so a burst of restores of one snapshot starts on
        the host that has it and spreads once that host is fuller than the rest. Read without
        awaiting right before the insert it orders, so creates made at once by one process see
        each other's records."""
        # a candidate may have left the fleet while the create awaited (lost meanwhile)
        hosts = [h for h in found.hosts if h in self._members]
        if found.spare in hosts:
            # its restore is mostly done: worth more than room or cached files
            return [found.spare, *self.by_room(replace(found, hosts=[
                h for h in hosts if h != found.spare], spare=None))]
        if len(hosts) < 2:
            return hosts
        with self.records.store.tx() as orm:
            promised = {h: int(m) for h, m in orm.execute(
                select(SessionRow.host_id, func.coalesce(func.sum(SessionRow.memory_mb), 0))
                .where(SessionRow.state.in_(HOLDING_SESSION), SessionRow.host_id.in_(hosts))
                .group_by(SessionRow.host_id)).all()}
        capacity = {h: self.capacity_of(h).memory_capacity_mib for h in hosts}
        room = {h: capacity[h] - promised.get(h, 0) for h in hosts}
        most = max((found.cached.get(h, 0) for h in hosts), default=0)

        def score(h: str) -> float:
            free = room[h] / capacity[h] if capacity[h] > 0 else 0.0
            cached = max(found.cached.get(h, 0), 0) / most if most > 0 else 0.0
            return free + CACHE_PREFERENCE * cached

        return sorted(hosts, key=lambda h: (-score(h), -room[h], h))

    async def place(self, found: Candidates, memory_mb: int,
                    write: Callable[[str], Awaitable[T]]) -> T:
        """``write(host_id)`` (the record naming the host, with that host's admission check)
        on the best candidate with room: one found full in the check's transaction is skipped
        for the next, as is one that left the fleet since the candidates were chosen. A pinned
        host that is full or gone is a conflict (the caller chose it)."""
        order = self.by_room(found)
        last: CapacityUnavailableError | None = None
        for host_id in order:
            if host_id not in self._members:
                continue  # lost while the write before awaited
            try:
                return await write(host_id)
            except CapacityUnavailableError as exc:
                last = exc
        if last is None:  # every candidate left the fleet since it was chosen
            if found.pinned:
                self.member(found.hosts[0])  # the conflict naming it
            raise CapacityUnavailableError(
                "capacity unavailable: the hosts chosen for the session left the fleet "
                f"({', '.join(found.hosts)}); retry", details={"hosts": found.hosts})
        if found.pinned:
            raise ConflictError(last.message, details=last.details)
        if len(order) > 1:
            raise CapacityUnavailableError(
                f"capacity unavailable: none of the {len(order)} ACTIVE hosts has room for a "
                f"{memory_mb} MiB session (retry when sessions end)",
                details={"hosts": order, "requested_mib": memory_mb})
        raise last

    def capacity_of(self, host_id: str) -> HostCapacity:
        return self.member(host_id).capacity

    def place_volume(self) -> str:
        """The host for a new volume: the ACTIVE member holding the fewest volumes."""
        hosts = self.active()
        if not hosts:
            raise CapacityUnavailableError(
                "capacity unavailable: no ACTIVE host to hold the volume", details={"hosts": 0})
        counts: dict[str, int] = {h: 0 for h in hosts}
        for row in self.records.all(VolumeRow, VolumeRow.state != "DELETED"):
            h = row.host_id or LOCAL
            if h in counts:
                counts[h] += 1
        return min(hosts, key=lambda h: (counts[h], h))

    # -- HostAPI: capacity and status (combined) ---------------------------------------------------
    @property
    def capacity(self) -> HostCapacity:
        """One member's own; several: their sum (an overcommit that gives the summed
        capacity)."""
        caps = [h.capacity for h in self._members.values()]
        if len(caps) == 1:
            return caps[0]
        total = sum(c.memory_total_mib for c in caps)
        reserve = sum(c.memory_reserve_mib for c in caps)
        room = sum(c.memory_capacity_mib for c in caps)
        accels = {c.accelerator for c in caps}
        return HostCapacity(
            host_id="fleet", memory_total_mib=total, memory_reserve_mib=reserve,
            overcommit=room / (total - reserve) if total > reserve else 1.0,
            cpus=sum(c.cpus for c in caps),
            accelerator=accels.pop() if len(accels) == 1 else "mixed" if accels else "none")

    def list_vms(self) -> list[str]:
        return sorted({s for h in self._members.values() for s in h.list_vms()})

    def memory_used_mib(self) -> int:
        return sum(h.memory_used_mib() for h in self._members.values())

    def tmpfs_use(self) -> TmpfsUse:
        uses = [h.tmpfs_use() for h in self._members.values()]
        if len(uses) == 1:
            return uses[0]
        return TmpfsUse(sum(u.used_bytes for u in uses), sum(u.total_bytes for u in uses),
                        sum(u.free_bytes for u in uses))

    @property
    def network_enforced(self) -> bool:
        """Some member enforces network policies (placement then puts a session with a
        policy on one that does; with no member, nothing is refused on this ground)."""
        return not self._members or any(h.network_enforced for h in self._members.values())

    # -- HostAPI: a session's VM ---------------------------------------------------------------
    async def boot(self, spec: BootSpec) -> Started:
        return await self._for_session(spec.session_id).boot(spec)

    async def restore(self, spec: RestoreSpec) -> Started:
        return await self._for_session(spec.session_id).restore(spec)

    def spares_on(self, host_id: str) -> SpareHost | None:
        """Member ``host_id``, if it prepares restores ahead (``host/spares.py``)."""
        host = self._members.get(host_id)
        return host if isinstance(host, SpareHost) else None

    async def capture(self, spec: CaptureSpec) -> Captured:
        return await self._for_session(spec.session_id).capture(spec)

    async def terminate(self, session_id: str, volumes: list[VolumeMountSpec]) -> None:
        """Stop the session's VM on the host its record names, and on any other member that
        still runs one for it (a host it ran on before, or a record gone): a terminate means
        no VM of it anywhere."""
        named = self.host_of(session_id)
        for host_id, host in list(self._members.items()):
            if host_id == named:
                await host.terminate(session_id, volumes)
            elif host.has_vm(session_id):
                await host.terminate(session_id, [])

    def has_vm(self, session_id: str) -> bool:
        """Only the host the record names counts: a VM elsewhere is not the session's."""
        row = self.records.find(SessionRow, session_id)
        return row is not None and self.runs(row)

    async def recover(self, live: dict[str, list[VolumeMountSpec]]) -> Recovered:
        """Each member recovers the live sessions placed on it. A member that cannot answer
        (an unreachable worker) leaves its sessions as they are: the lost sweep decides."""
        by_host: dict[str, dict[str, list[VolumeMountSpec]]] = {h: {} for h in self._members}
        lost: dict[str, str] = {}
        for session_id, mounts in live.items():
            host_id = self.host_of(session_id) or LOCAL
            if host_id in by_host:
                by_host[host_id][session_id] = mounts
        found: list[str] = []
        strays = 0
        for host_id, subset in by_host.items():
            try:
                got = await self._members[host_id].recover(subset)
            except Exception as exc:  # one unreachable worker stops no control plane start
                log.warning("host %s: recovery failed (%s); its sessions are left to its "
                            "heartbeats", host_id, exc)
                continue
            found += got.found
            lost.update(got.lost)
            strays += got.strays_killed
        return Recovered(found, lost, strays)

    async def watch(self) -> AsyncIterator[VMGone]:
        """The VMs gone on every member, each reported only while the record still names
        that member (a VM fenced off a host the session left is not the session's death)."""
        self._watching = True
        for host_id, host in self._members.items():
            if host_id not in self._pumps:
                self._pump(host_id, host)
        try:
            while True:
                gone = await self._gone.get()
                yield gone
        finally:
            self._watching = False
            for host_id in list(self._pumps):
                self._stop_pump(host_id)

    def _pump(self, host_id: str, host: HostAPI) -> None:
        async def pump() -> None:
            async for gone in host.watch():
                if self.host_of(gone.session_id) in (host_id, None):
                    self._gone.put_nowait(gone)
                else:
                    log.info("host %s: VM of %s gone; the session is on another host",
                             host_id, gone.session_id)

        self._pumps[host_id] = asyncio.create_task(pump(), name=f"watch {host_id}")

    def _stop_pump(self, host_id: str) -> None:
        task = self._pumps.pop(host_id, None)
        if task is not None:
            task.cancel()

    async def port_address(self, session_id: str, port: int) -> tuple[str, int]:
        return await self._for_session(session_id).port_address(session_id, port)

    # -- HostAPI: images ---------------------------------------------------------------------------
    async def image_digest(self, image_id: str) -> str:
        """From the first member that answers for the image (the members build the same
        images); one that cannot answer is skipped."""
        error: Exception | None = None
        for host_id in self._ordered():
            try:
                return await self._members[host_id].image_digest(image_id)
            except NotFoundError as exc:
                error = exc
            except Exception as exc:
                log.warning("host %s: image %s: %s", host_id, image_id, exc)
                error = error if isinstance(error, NotFoundError) else exc
        if error is not None:
            raise error
        raise CapacityUnavailableError(
            "capacity unavailable: no ACTIVE host to run the session (register a host with "
            "`tenki host run`)", details={"hosts": 0})

    async def list_images(self) -> list[Image]:
        seen: dict[str, Image] = {}
        for host_id in self._ordered():
            try:
                images = await self._members[host_id].list_images()
            except Exception as exc:  # the others' images are still listed
                log.warning("host %s: images not listed: %s", host_id, exc)
                continue
            for image in images:
                seen.setdefault(image.id, image)
        return [seen[i] for i in sorted(seen)]

    def _ordered(self) -> list[str]:
        """Members, ACTIVE ones first (the embedded host first among equals)."""
        active = set(self.active())
        return sorted(self._members, key=lambda h: (h not in active, h != LOCAL, h))

    # -- HostAPI: volumes --------------------------------------------------------------------------
    async def create_volume(self, volume_id: str, size_bytes: int) -> None:
        """On the host its record names (``VolumeControl`` places it first)."""
        await self._for_volume(volume_id).create_volume(volume_id, size_bytes)

    async def create_volume_on(self, host_id: str, volume_id: str, size_bytes: int) -> None:
        """A new volume's file on ``host_id`` (its record is written once the file exists)."""
        await self.member(host_id).create_volume(volume_id, size_bytes)

    async def delete_volume(self, volume_id: str) -> None:
        """On its host; a file no record names (recovery's clean-up) on every member."""
        host_id = self.volume_host(volume_id)
        if host_id is not None:
            await self.member(host_id).delete_volume(volume_id)
            return
        for host in list(self._members.values()):
            await host.delete_volume(volume_id)

    async def attach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        await self._for_session(session_id).attach_volume(session_id, mount)

    async def detach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        await self._for_session(session_id).detach_volume(session_id, mount)

    async def volume_files(self) -> list[str]:
        """Every member's volume files that its own records do not place elsewhere."""
        out: set[str] = set()
        for host_id, host in list(self._members.items()):
            for vid in await host.volume_files():
                if self.volume_host(vid) in (host_id, None):
                    out.add(vid)
        return sorted(out)

    # -- HostAPI: processes and files (the session's host) ------------------------------------
    async def start_process(self, session_id: str, spec: ExecSpec) -> ProcessRef:
        return await self._for_session(session_id).start_process(session_id, spec)

    def process_events(self, session_id: str,
                       process_id: str) -> AsyncGenerator[ProcessEvent, None]:
        return self._for_session(session_id).process_events(session_id, process_id)

    async def process_stdin(self, session_id: str, process_id: str, data: bytes) -> None:
        await self._for_session(session_id).process_stdin(session_id, process_id, data)

    async def process_close_stdin(self, session_id: str, process_id: str) -> None:
        await self._for_session(session_id).process_close_stdin(session_id, process_id)

    async def process_kill(self, session_id: str, process_id: str, signal: int) -> None:
        await self._for_session(session_id).process_kill(session_id, process_id, signal)

    async def process_exit(self, session_id: str, process_id: str) -> int | None:
        return await self._for_session(session_id).process_exit(session_id, process_id)

    def running_processes(self, session_id: str) -> int:
        host_id = self.host_of(session_id)
        host = self._members.get(host_id) if host_id is not None else None
        return host.running_processes(session_id) if host is not None else 0

    def read_file(self, session_id: str, path: str) -> AsyncGenerator[bytes, None]:
        return self._for_session(session_id).read_file(session_id, path)

    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int) -> int:
        return await self._for_session(session_id).write_file(session_id, path, chunks, mode)

    # -- HostAPI: stored artifacts (every member) --------------------------------------------
    def referenced_locally(self) -> set[str]:
        return {d for h in self._members.values() for d in h.referenced_locally()}

    async def collect_garbage(self, referenced: set[str], grace_s: float | None = None) -> int:
        """Each member collects keeping every member's own references too: members may share
        one bucket, where a file one host's VM runs on is the others' to keep as well."""
        keep = referenced | self.referenced_locally()
        freed = 0
        for host_id, host in list(self._members.items()):
            try:
                freed += await host.collect_garbage(keep, grace_s)
            except Exception as exc:  # the next period tries again
                log.warning("host %s: garbage collection failed: %s", host_id, exc)
        return freed

    def unowned_files(self, referenced: set[str]) -> list[Unowned]:
        keep = referenced | self.referenced_locally()
        seen: dict[tuple[str, str], Unowned] = {}
        for host in self._members.values():
            for entry in host.unowned_files(keep):
                seen.setdefault((entry.kind, entry.name), entry)
        return list(seen.values())

    async def remove_unowned(self, found: list[Unowned], referenced: set[str],
                             live_sessions: set[str]) -> list[Unowned]:
        """Each member removes what of ``found`` it holds and no one can claim."""
        keep = referenced | self.referenced_locally()
        removed: dict[tuple[str, str], Unowned] = {}
        for host in list(self._members.values()):
            for entry in await host.remove_unowned(found, keep, live_sessions):
                removed.setdefault((entry.kind, entry.name), entry)
        return list(removed.values())

    async def verify_artifacts(self, digests: dict[str, str], *, deep: bool) -> dict[str, str]:
        """Damaged only where no member has a good copy: members are asked in turn, each about
        what the earlier found damaged (with one bucket, the first answers for all). A member
        that cannot answer counts for nothing, and if none answers the call fails: an
        unreachable host never makes a snapshot look damaged."""
        bad = dict(digests)
        problems: dict[str, str] = {}
        answered = False
        error: Exception | None = None
        for host_id in self._ordered():
            if not bad:
                break
            try:
                found = await self._members[host_id].verify_artifacts(bad, deep=deep)
            except Exception as exc:
                log.warning("host %s: verification failed: %s", host_id, exc)
                error = exc
                continue
            if not answered:
                problems = dict(found)
            answered = True
            bad = {d: k for d, k in bad.items() if d in found}
        if not answered:
            if error is not None:
                raise error
            return {}  # no host: nothing stored can be checked, or is used
        return {d: problems.get(d, f"{k} {d[:12]} is missing") for d, k in bad.items()}

    def local_artifacts(self) -> list[InUse]:
        return [u for h in self._members.values() for u in h.local_artifacts()]

    async def scrub_caches(self, repair: bool) -> CacheScrub:
        out = CacheScrub()
        for host in list(self._members.values()):
            got = await host.scrub_caches(repair)
            out.damaged.update(got.damaged)
            out.rebuilt += got.rebuilt
        return out

    async def cached_bytes(self, digests: list[str]) -> int:
        """The most any member holds."""
        got = [await self._cached(h, digests) for h in self._members]
        return max(got, default=0)

    async def shutdown(self) -> None:
        for host_id in list(self._pumps):
            self._stop_pump(host_id)

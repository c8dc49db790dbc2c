"""The control plane of one server: records, the resource controls, who may call (workspaces,
keys, the audit trail), background loops.

It is given its hosts: a ``Fleet`` (``control/fleet.py``) of members, or one ``HostAPI``, made
the fleet's one member ``local`` (a single-machine server); it never reaches into a host beyond
that interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from ..errors import ValidationError
from ..host.api import HostAPI
from ..models import HostStatus, Image, Session, SessionCreate, SpareInfo
from ..preview import PreviewProxy, PreviewSettings
from ..store.db import Store
from ..store.tables import SessionRow
from .audit import AuditLog
from .fleet import LOCAL, Fleet
from .golden import GoldenControl, enabled
from .hosts import Connect, HostControl
from .keys import KeyControl
from .ports import PortControl
from .records import Records
from .sessions import SessionControl
from .snapshots import SnapshotControl
from .spares import Spares
from .templates import TemplateControl
from .volumes import VolumeControl
from .workspaces import HOLDING_SESSION, WorkspaceControl

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
GC_EVERY_TICKS = 30
AUDIT_PRUNE_EVERY_TICKS = 3600
#: every stored artifact is re-read against its digest at least this often (bit rot that keeps
#: a file's stat is found within one period); damaged snapshots become FAILED, naming the file
SCRUB_INTERVAL_S = float(os.environ.get("TENKI_SCRUB_INTERVAL_S", 6 * 3600))


class ControlPlane:
    def __init__(self, store: Store, host: HostAPI | Fleet, *,
                 preview: PreviewSettings | None = None, connect: Connect | None = None) -> None:
        """``preview``: where the preview proxy of exposed ports listens and what its URLs
        say (default: loopback); ``connect``: makes a member of a registered host worker
        (None: no workers register)."""
        self.store = store
        self.records = Records(store)
        self.fleet = host if isinstance(host, Fleet) else Fleet({LOCAL: host})
        self.fleet.bind(self.records)
        #: every call for a VM, volume or artifact goes through the fleet to its member
        self.host = host = self.fleet
        self.workspaces = WorkspaceControl(self.records)
        self.keys = KeyControl(self.records)
        self.audit = AuditLog(self.records)
        self.volumes = VolumeControl(self.records, host)
        #: restores prepared ahead (notes of the hosts' spares)
        self.spares = Spares(self.fleet)
        self.snapshots = SnapshotControl(self.records, host, self.volumes, self.spares)
        #: the listeners of exposed ports (no socket until ``ports`` opens one)
        self.preview = PreviewProxy(host, self.keys, preview)
        self.ports = PortControl(self.records, host, self.preview)
        self.sessions = SessionControl(self.records, host, self.volumes, self.snapshots,
                                       self.ports, self.spares)
        self.templates = TemplateControl(self.records, self.sessions, self.snapshots)
        self.golden = GoldenControl(self.records, self.sessions, self.snapshots)
        self.hosts = HostControl(self.records, self.fleet, self.sessions, connect)
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Recover (sessions, then snapshots, then volumes), then run the background loops."""
        await self.records.listen()  # PostgreSQL: other control planes' changes wake waits
        # records in flight belong to the processes running them: they are settled only by a
        # control plane that starts alone (on SQLite always; see docs/multi-host.md)
        alone = self.records.store.hold_presence()
        await self.workspaces.ensure_default()
        await self.hosts.start()  # the members, before recovery asks them for their VMs
        if alone:
            await self.sessions.recover()
            await self.snapshots.recover()
            await self.volumes.recover()
            await self.templates.recover()
            await self.golden.recover()
            await self.ports.recover()  # after the sessions: only running ones keep their ports
        else:
            log.warning("other control planes run on %s: records in flight are theirs, not "
                        "settled at this start", self.records.store.url)
        # alone, nothing is in flight yet: whatever no record references goes now; with other
        # control planes, their captures may be putting files their records do not name yet
        # (on hosts shared through the fleet): the usual grace spares those
        await self.host.collect_garbage(set(self.snapshots.referenced()),
                                        grace_s=0 if alone else None)
        self._loops = [asyncio.create_task(self._sweep(), name="sweeper"),
                       asyncio.create_task(self.hosts.watch_loop(), name="loop lag"),
                       asyncio.create_task(self.sessions.follow_host(), name="host events")]

    async def _sweep(self) -> None:
        ticks = 0
        last_scrub = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            ticks += 1
            try:
                await self.hosts.sweep()
                await self.sessions.sweep_expired()
                await self.ports.sweep()
                await self.snapshots.sweep_expired()
                if ticks % GC_EVERY_TICKS == 0:
                    await self.sessions.stop_unowned_vms()
                    await self.snapshots.collect_garbage()
                if ticks % AUDIT_PRUNE_EVERY_TICKS == 1:
                    await self.audit.prune()
                if time.monotonic() - last_scrub >= SCRUB_INTERVAL_S:
                    last_scrub = time.monotonic()
                    report = await self.snapshots.verify(repair=True)
                    for what, key in (("snapshot", "damaged"), ("image", "damaged_images"),
                                      ("session", "damaged_sessions")):
                        for bad in report[key]:
                            log.error("scrub: %s %s is damaged: %s", what,
                                      bad[f"{what}_id"], "; ".join(bad["problems"]))
                    for problem in report["damaged_caches"].values():
                        log.error("scrub: %s", problem)
                    for digest in report["rebuilt"]:
                        log.warning("scrub: RAM cache %s was damaged and was rebuilt",
                                    digest[:12])
                    for entry in report["removed"]:
                        log.info("scrub: removed %s %s (no record owned it)", entry["kind"],
                                 entry["name"])
            except Exception:  # a sweep must never kill the loop
                log.exception("sweep failed")

    async def create_session(self, req: SessionCreate, ws: str) -> Session:
        """A session: booted, restored from a snapshot, or from a template (a restore of its
        latest READY build's golden snapshot)."""
        self.sessions.network(req)  # a policy this host cannot enforce: refused before anything
        if req.template_id is None:
            if req.snapshot_id is None and not req.cold_boot:
                golden = await self.golden.find(req)
                if golden is not None:
                    return await self.sessions.create(req, ws, golden=golden)
                if enabled():
                    return await self.sessions.create(req, ws, note=(
                        "booting: the golden snapshot of this image and size is being made; "
                        "the next creates restore it"))
            return await self.sessions.create(req, ws)
        if req.snapshot_id is not None:
            raise ValidationError("give snapshot_id or template_id, not both",
                                  field="template_id")
        template_id, snapshot_id = self.templates.golden_snapshot(req.template_id, ws)
        return await self.sessions.create(req.model_copy(update={"snapshot_id": snapshot_id}),
                                          ws, template_id=template_id)

    async def list_images(self) -> list[Image]:
        """The guest images a session may boot (``base_image_id``): the host's."""
        return await self.host.list_images()

    def host_status(self) -> HostStatus:
        cap = self.host.capacity
        live = [r for r in self.records.all(SessionRow) if r.state in HOLDING_SESSION]
        tmpfs = self.host.tmpfs_use()
        return HostStatus(
            host_id=cap.host_id, memory_total_mib=cap.memory_total_mib,
            memory_reserve_mib=cap.memory_reserve_mib, overcommit=cap.overcommit,
            memory_capacity_mib=cap.memory_capacity_mib,
            memory_promised_mib=sum(r.memory_mb for r in live),
            memory_used_mib=self.host.memory_used_mib(), sessions=len(live), cpus=cap.cpus,
            accelerator=cap.accelerator, network_enforced=self.host.network_enforced,
            tmpfs_used_bytes=tmpfs.used_bytes, tmpfs_total_bytes=tmpfs.total_bytes,
            spares=[SpareInfo(session_id=n.session_id, snapshot_id=n.snapshot_id,
                              host_id=n.host_id) for n in self.spares.listing()])

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.records.stop_listening()
        await self.golden.shutdown()
        await self.templates.shutdown()
        await self.snapshots.shutdown()
        await self.sessions.shutdown()
        await self.spares.shutdown()
        await self.ports.shutdown()
        await self.fleet.shutdown()

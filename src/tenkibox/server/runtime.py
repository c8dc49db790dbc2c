"""Everything one server process holds: the store, this machine's host (unless it is a pure
control plane), the control plane with its fleet of hosts."""

from __future__ import annotations

import asyncio
import logging

from ..artifacts.s3 import S3Location
from ..config import Layout
from ..control.fleet import LOCAL, Fleet
from ..control.plane import ControlPlane
from ..host.api import HostAPI
from ..host.capacity import HostCapacity
from ..host.local import LocalHost
from ..preview import PreviewSettings
from ..store.db import Store, open_store

log = logging.getLogger(__name__)


class ServerRuntime:
    def __init__(self, layout: Layout, *, database_url: str | None = None,
                 preview: PreviewSettings | None = None, artifacts: S3Location | None = None,
                 artifact_cache_bytes: int | None = None, local_host: bool = True) -> None:
        """``preview``: the preview proxy's address and URLs (exposed ports); ``artifacts``:
        a bucket for the artifacts (None: the data directory's ``artifacts/``), with a local
        cache of at most ``artifact_cache_bytes``; ``local_host`` False: no embedded host
        (a pure control plane: only registered host workers run sessions)."""
        self.layout = layout.ensure()
        self.store: Store = open_store(layout.home, database_url)
        log.info("records in %s", self.store.url)
        self.host: LocalHost | None = None
        #: how this server's own guests run (``/v1/server``); none without an embedded host
        self.accel = "none"
        if local_host:
            self.host = LocalHost.open(layout, artifacts=artifacts,
                                       artifact_cache_bytes=artifact_cache_bytes)
            self.accel = self.host.ctx.accel
        else:
            log.info("a pure control plane: sessions run on registered host workers only")
        fleet = Fleet({LOCAL: self.host} if self.host is not None else {})
        self.plane = ControlPlane(self.store, fleet, preview=preview, connect=connect_remote)
        #: set when a client asked the server to stop (``POST /v1/server/shutdown``)
        self.stop_requested = asyncio.Event()

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def start(self) -> None:
        await self.plane.start()
        default = await self.plane.workspaces.ensure_default()
        await self.plane.keys.ensure_local_admin(self.layout.admin_key_file, default.id)

    async def stop(self) -> None:
        await self.plane.stop()
        for host_id, member in self.plane.fleet.members.items():
            if host_id != LOCAL:
                await self.plane.fleet.close_member(member)
        if self.host is not None:
            await self.host.shutdown()
        self.store.close()


def connect_remote(host_id: str, address: str, secret: str, capacity: HostCapacity) -> HostAPI:
    """A registered host worker as a member of the fleet (``host/remote.py``, imported here
    only: the control plane proper knows hosts by ``HostAPI`` alone)."""
    from ..host.remote import RemoteHost  # type: ignore[import-not-found,unused-ignore]

    host: HostAPI = RemoteHost(address, secret, host_id=host_id, capacity=capacity)
    return host

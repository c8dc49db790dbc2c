"""Everything one server process holds: the store, this machine's host, the control plane."""

from __future__ import annotations

import asyncio
import logging

from ..artifacts.s3 import S3Location
from ..config import Layout
from ..control.plane import ControlPlane
from ..engine.accel import detect_accel
from ..host.local import LocalHost
from ..preview import PreviewSettings
from ..store.db import Store, open_store

log = logging.getLogger(__name__)


class ServerRuntime:
    def __init__(self, layout: Layout, *, database_url: str | None = None,
                 preview: PreviewSettings | None = None, artifacts: S3Location | None = None,
                 artifact_cache_bytes: int | None = None) -> None:
        """``preview``: the preview proxy's address and URLs (exposed ports); ``artifacts``:
        a bucket for the artifacts (None: the data directory's ``artifacts/``), with a local
        cache of at most ``artifact_cache_bytes``."""
        self.layout = layout.ensure()
        self.store: Store = open_store(layout.home, database_url)
        log.info("records in %s", self.store.url)
        self.accel, self.accel_reason = detect_accel(layout.home / "accel.json")
        log.info("accelerator: %s (%s)", self.accel, self.accel_reason)
        self.host = LocalHost(layout, self.accel, artifacts=artifacts,
                              artifact_cache_bytes=artifact_cache_bytes)
        if artifacts is not None:
            log.info("artifacts: %s (local cache in %s)", artifacts.describe(),
                     self.host.paths.artifacts)
        self.plane = ControlPlane(self.store, self.host, preview=preview)
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
        await self.host.shutdown()
        self.store.close()

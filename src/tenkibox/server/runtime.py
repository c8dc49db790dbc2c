"""Everything one server process holds: store, services, background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..config import Layout
from ..engine.accel import detect_accel
from ..sessions.service import SessionService
from ..snapshots.service import SnapshotService
from ..store.db import Store, open_store
from ..volumes.service import VolumeService

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


class ServerRuntime:
    def __init__(self, layout: Layout, *, api_key: str | None = None,
                 database_url: str | None = None) -> None:
        self.layout = layout.ensure()
        self.api_key = api_key
        self.store: Store = open_store(layout.home, database_url)
        self.accel, self.accel_reason = detect_accel(layout.home / "accel.json")
        log.info("accelerator: %s (%s)", self.accel, self.accel_reason)
        self.sessions = SessionService(layout, self.store, self.accel)
        self.snapshots = SnapshotService(layout, self.store, self.sessions)
        self.volumes = VolumeService(layout, self.store, self.sessions)
        self.snapshots.volume_hooks = self.volumes
        self._sweeper: asyncio.Task[None] | None = None
        self._stop_hook: Callable[[], None] | None = None

    async def start(self) -> None:
        await self.sessions.recover()
        await self.snapshots.recover()
        await self.volumes.recover()
        self._sweeper = asyncio.create_task(self._sweep(), name="sweeper")

    async def _sweep(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            ticks += 1
            try:
                await self.sessions.sweep_expired()
                await self.snapshots.sweep_expired()
                if ticks % 300 == 0:
                    await asyncio.to_thread(self.snapshots.collect_garbage)
            except Exception:  # a sweep must never kill the loop
                log.exception("sweep failed")

    def on_stop(self, hook: Callable[[], None]) -> None:
        self._stop_hook = hook

    def request_stop(self) -> None:
        if self._stop_hook:
            asyncio.get_running_loop().call_later(0.05, self._stop_hook)

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
        await self.snapshots.shutdown()
        await self.sessions.shutdown()
        self.store.close()

"""Small helpers of the component tests: rows in any state (and seeding a store with them), and
waiting for a condition."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tenkibox.host.api import MachineShape, Manifest
from tenkibox.ids import new_id
from tenkibox.store.db import Store
from tenkibox.store.tables import Base, BuildRow, SessionRow, SnapshotRow, VolumeRow

from .fake_host import INITRD, KERNEL, digest, image_digest

T = TypeVar("T")


def now() -> datetime:
    return datetime.now(UTC)


def seed(store: Store, *rows: Base) -> None:
    """Write ``rows`` as they are, in any state, as a crashed server could have left them. Only
    tests do this: the server writes rows through ``control.records.Records`` alone."""
    with store.tx() as orm:
        orm.add_all(rows)


def session_row(state: str, **kw: Any) -> SessionRow:
    values: dict[str, Any] = dict(
        id=new_id("session"), name=None, state=state, state_reason=None, cpu=2, memory_mb=4096,
        base_image_id="sandbox", snapshot_id=None, env={}, meta={}, volumes=[], machine=None,
        disk_chain=[], created_at=now() - timedelta(minutes=1),
        host_id="local")  # as every record since migration 0008 names its host
    values.update(kw)
    return SessionRow(**values)


def fake_manifest(owner: str = "x", image_id: str = "sandbox") -> Manifest:
    shape = MachineShape(cpu=2, memory_mb=4096, cmdline="console=ttyS0 fake", kernel=KERNEL,
                         initrd=INITRD)
    return Manifest(shape, [image_digest(image_id), digest("layer", owner)],
                    digest("ram", owner), digest("state", owner), image_id)


def snapshot_row(state: str, session_id: str = "ses_gone", *, manifest: Manifest | None = None,
                 **kw: Any) -> SnapshotRow:
    values: dict[str, Any] = dict(
        id=new_id("snapshot"), session_id=session_id, workspace_id=None, name=None, state=state,
        state_reason=None, base_image_id="sandbox", cpu=2, memory_mb=4096,
        machine=manifest.shape.to_json() if manifest else None,
        disk_chain=list(manifest.layers) if manifest else [],
        files=manifest.to_json() if manifest else {}, timings={},
        created_at=now() - timedelta(minutes=1))
    values.update(kw)
    return SnapshotRow(**values)


def volume_row(state: str, session_id: str | None = None, path: str | None = None,
               **kw: Any) -> VolumeRow:
    values: dict[str, Any] = dict(
        id=new_id("volume"), name="v", size_bytes=1 << 20, state=state, session_id=session_id,
        path=path, read_only=0, created_at=now() - timedelta(minutes=1))
    values.update(kw)
    return VolumeRow(**values)


def build_row(state: str, template_id: str = "tpl_gone", **kw: Any) -> BuildRow:
    values: dict[str, Any] = dict(
        id=new_id("build"), template_id=template_id, workspace_id="ws_default", version=1,
        state=state, error=None, failed_step=None, log="", session_id=None, snapshot_id=None,
        created_at=now() - timedelta(minutes=1))
    values.update(kw)
    return BuildRow(**values)


def eventually(fn: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.01,
               what: str = "the condition") -> T:
    """Call ``fn`` until it returns something truthy (from a thread); that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout}s (last: {value!r})")
        time.sleep(interval)


async def eventually_async(fn: Callable[[], T | None], timeout: float = 5.0,
                           what: str = "the condition") -> T:
    """``eventually`` for a coroutine on the loop that does the work."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout}s (last: {value!r})")
        await asyncio.sleep(0.005)


def fd_open(fd: int) -> bool:
    """Whether descriptor ``fd`` of this process is open."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

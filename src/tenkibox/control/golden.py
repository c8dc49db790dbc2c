"""Golden snapshots: every plain create is a restore.

A plain create (no snapshot, no template) restores the **golden snapshot** of its image at its
size (vCPUs, MiB): a snapshot of that image freshly booted, made by the server on first use of
the size (that first create boots, and says so in its record's ``state_reason`` while it is
CREATING). A restore gives every session its own identity (hostname, machine-id, entropy,
clock), so sessions from one golden snapshot share nothing but the read-only pages.

- The key is ``image@disk-digest/cpu x MiB/machine layout``: a rebuilt image has a new disk
  digest, and a new layout of the VM itself (``LAYOUT``) changes the key too, so their old
  golden snapshots are never used again (and are evicted).
- At most ``GOLDEN_MAX`` are kept (least recently used evicted); builds run one at a time, as
  sessions of the server's own (workspace ``system``: no quota, the host's capacity applies).
- A golden snapshot that fails to restore becomes FAILED and the create boots instead.
- ``TENKI_GOLDEN=off`` turns it off (every plain create boots), as does ``cold_boot`` on a
  create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from ..errors import TenkiError
from ..host.api import Manifest
from ..models import DEFAULT_IMAGE_ID, SessionCreate, SnapshotCreate
from ..store.tables import SessionRow, SnapshotRow
from .records import Records
from .sessions import SessionControl
from .snapshots import SnapshotControl
from .states import FINAL, IllegalTransitionError

log = logging.getLogger(__name__)

SYSTEM = "system"  # the workspace of the server's own sessions and golden snapshots
PREFIX = "golden:"  # SnapshotRow.template_id of a golden snapshot: "golden:<key>"
#: what a session restored from a golden snapshot inherits of the VM it was taken from, beyond
#: its size: "m2" since new VMs' RAM under TCG is padded (``engine.machine.TCG_RAM_PAD``), which
#: a session needs to be saved live; one restored from an older golden snapshot would not be
LAYOUT = "m2"
GOLDEN_MAX = int(os.environ.get("TENKI_GOLDEN_MAX", 8))
BUILD_TIMEOUT_S = 900.0


def enabled() -> bool:
    return os.environ.get("TENKI_GOLDEN", "on").lower() not in ("off", "0", "false", "no")


class GoldenControl:
    def __init__(self, records: Records, sessions: SessionControl,
                 snapshots: SnapshotControl) -> None:
        self.records = records
        self.sessions = sessions
        self.snapshots = snapshots
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._one_at_a_time = asyncio.Lock()
        self._used: dict[str, float] = {}  # snapshot id -> when a create last used it

    async def key(self, req: SessionCreate) -> str:
        image = req.base_image_id or DEFAULT_IMAGE_ID
        disk = await self.sessions.host.image_digest(image)
        return f"{image}@{disk[:16]}/{req.cpu}x{req.memory_mb}/{LAYOUT}"

    def _ready(self) -> list[SnapshotRow]:
        return [r for r in self.records.all(SnapshotRow, SnapshotRow.workspace_id == SYSTEM)
                if r.state == "READY" and (r.template_id or "").startswith(PREFIX)]

    async def find(self, req: SessionCreate) -> str | None:
        """The golden snapshot for this create, or None (then one is built for the next)."""
        if not enabled() or req.cold_boot or req.snapshot_id or req.template_id:
            return None
        key = await self.key(req)
        for row in self._ready():
            if row.template_id != PREFIX + key:
                continue
            bad = await self.sessions.host.verify_artifacts(
                Manifest.from_json(row.files).digests(), deep=False)
            if bad:
                # no reason to refuse a create: it boots, and a new golden snapshot is made
                log.error("golden snapshot %s is damaged: %s", row.id,
                          "; ".join(bad.values()))
                with contextlib.suppress(IllegalTransitionError):
                    await self.records.transition(
                        SnapshotRow, row.id, "FAILED", expected=["READY"],
                        state_reason=f"damaged in storage: {next(iter(bad.values()))}")
                break
            self._used[row.id] = time.monotonic()
            return row.id
        self._build_soon(key, req)
        return None

    def _build_soon(self, key: str, req: SessionCreate) -> None:
        if key in self._builds:
            return
        shape = SessionCreate(cpu=req.cpu, memory_mb=req.memory_mb,
                              base_image_id=req.base_image_id)
        task = asyncio.ensure_future(self._build(key, shape))
        task.set_name(f"golden {key}")
        self._builds[key] = task
        task.add_done_callback(lambda _t: self._builds.pop(key, None))

    async def _build(self, key: str, shape: SessionCreate) -> None:
        async with self._one_at_a_time:
            if any(r.template_id == PREFIX + key for r in self._ready()):
                return
            started = time.monotonic()
            session_id = None
            try:
                s = await self.sessions.create(shape.model_copy(update={"name": "golden"}),
                                               SYSTEM, system=True)
                session_id = s.id
                row = await self.records.settled(SessionRow, s.id, BUILD_TIMEOUT_S)
                if row.state not in ("READY", "RUNNING"):
                    raise RuntimeError(f"the build session is {row.state}: {row.state_reason}")
                snap = await self.snapshots.create(
                    SnapshotCreate(session_id=s.id, name=f"golden {key}"[:64]), SYSTEM,
                    template_id=PREFIX + key, system=True)
                done = await self.records.settled(SnapshotRow, snap.id, BUILD_TIMEOUT_S)
                if done.state != "READY":
                    raise RuntimeError(f"the capture is {done.state}: {done.state_reason}")
                log.info("golden snapshot %s of %s ready in %.1fs", snap.id, key,
                         time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("golden snapshot of %s not made: %s", key, exc)
            finally:
                if session_id is not None:
                    with contextlib.suppress(TenkiError):
                        await self.sessions.terminate(session_id, "golden snapshot taken")
            await self._evict(key)

    async def _evict(self, fresh: str) -> None:
        """Drop golden snapshots of an image that was rebuilt (same image, another disk
        digest) or of an older ``LAYOUT``, and the least recently used beyond ``GOLDEN_MAX``."""
        image, digest = _parts(fresh)
        rows = self._ready()
        stale = [r for r in rows
                 if (_parts(_key(r))[0] == image and _parts(_key(r))[1] != digest)
                 or not _key(r).endswith(f"/{LAYOUT}")]
        keep = sorted((r for r in rows if r not in stale),
                      key=lambda r: self._used.get(r.id, 0.0), reverse=True)
        for row in stale + keep[GOLDEN_MAX:]:
            log.info("golden snapshot %s (%s) evicted", row.id, _key(row))
            with contextlib.suppress(TenkiError):
                await self.snapshots.delete(row.id, owner=row.template_id)
            self._used.pop(row.id, None)

    async def recover(self) -> None:
        """Build sessions of a server that stopped go (their golden snapshot was not made)."""
        for row in self.records.all(SessionRow, SessionRow.workspace_id == SYSTEM):
            if row.state not in FINAL:
                with contextlib.suppress(TenkiError):
                    await self.sessions.terminate(row.id, "the server stopped during a golden "
                                                  "snapshot build")

    async def shutdown(self) -> None:
        for task in list(self._builds.values()):
            task.cancel()
        for task in list(self._builds.values()):
            with contextlib.suppress(BaseException):
                await task

    def building(self) -> list[str]:
        return sorted(self._builds)


def _key(row: SnapshotRow) -> str:
    return (row.template_id or "")[len(PREFIX):]


def _parts(key: str) -> tuple[str, str]:
    """``image@digest/size[/layout]`` -> (image, digest)."""
    image, _, rest = key.partition("@")
    return image, rest.split("/", 1)[0]

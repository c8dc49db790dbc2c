"""Snapshots: records, their state machine, the capture job, restore, delete and expiry.

States never lie::

    CREATING ──all stored, checksummed, fsynced──> READY ──delete/expiry──> DELETING ──> DELETED
        └──any step failed (reason kept)──> FAILED ──delete/expiry──> DELETING ──> DELETED

A snapshot directory (``$TENKI_HOME/snapshots/snp_x``) holds ``ram.zst`` (guest RAM, zero chunks
skipped, zstd), ``state.bin`` (device state) and ``manifest.json``. Its disk is a chain of
immutable qcow2 layers in the layer store, shared with the session it came from and with
sessions restored from it; a layer file goes away only when nothing references it, so deleting a
snapshot never breaks a session restored from it, and terminating the source never breaks the
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .. import longpoll
from ..config import Layout
from ..engine import disks
from ..engine.machine import MachineConfig
from ..errors import (
    ConflictError,
    SnapshotFailedError,
    SnapshotNotFoundError,
    TenkiError,
    ValidationError,
)
from ..ids import new_id
from ..models import Snapshot, SnapshotCreate, SnapshotState
from ..sessions.service import Runtime, SessionService, hostname_for
from ..steps import Steps
from ..store.db import Store
from ..store.tables import SessionRow, SnapshotRow
from . import ramfile
from .capture import capture, convert_stream
from .restore import checked_digest, remember_digest, restore, verify_files

log = logging.getLogger(__name__)


class VolumeHooks(Protocol):
    async def unplug_for_capture(self, rt: Runtime) -> list[Any]: ...
    async def replug_after_capture(self, rt: Runtime, unplugged: list[Any]) -> None: ...


class NoVolumes:
    async def unplug_for_capture(self, rt: Runtime) -> list[Any]:
        return []

    async def replug_after_capture(self, rt: Runtime, unplugged: list[Any]) -> None:
        return None


def now() -> datetime:
    return datetime.now(UTC)


def to_model(row: SnapshotRow) -> Snapshot:
    return Snapshot(
        id=row.id, session_id=row.session_id, workspace_id=row.workspace_id, name=row.name,
        state=SnapshotState(row.state), state_reason=row.state_reason,
        size_bytes=row.size_bytes or 0, compressed_bytes=row.compressed_bytes or 0,
        memory_bytes=row.memory_bytes or 0, base_image_id=row.base_image_id, cpu=row.cpu,
        memory_mb=row.memory_mb, created_at=row.created_at, ready_at=row.ready_at,
        expires_at=row.expires_at, deleted_at=row.deleted_at,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class SnapshotService:
    def __init__(self, layout: Layout, store: Store, sessions: SessionService) -> None:
        self.layout = layout
        self.store = store
        self.sessions = sessions
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._readers: dict[str, int] = {}
        self.volume_hooks: VolumeHooks = NoVolumes()
        sessions.restorer = self._restore_session
        sessions.on_gone.append(self._after_session_gone)

    # -- records ----------------------------------------------------------------------------
    def row(self, snapshot_id: str) -> SnapshotRow:
        row = self.store.get_snapshot(snapshot_id)
        if row is None:
            raise SnapshotNotFoundError(f"snapshot {snapshot_id} not found")
        return row

    def get(self, snapshot_id: str) -> Snapshot:
        return to_model(self.row(snapshot_id))

    def query(self, session_id: str | None = None) -> list[Snapshot]:
        rows = [r for r in self.store.all(SnapshotRow) if r.state != SnapshotState.DELETED.value]
        if session_id:
            rows = [r for r in rows if r.session_id == session_id]
        rows.sort(key=lambda r: r.created_at)
        return [to_model(r) for r in rows]

    async def _set(self, snapshot_id: str, state: SnapshotState, reason: str | None = None,
                   **values: Any) -> None:
        self.store.update(SnapshotRow, snapshot_id, state=state.value, state_reason=reason,
                          **values)
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, snapshot_id: str, timeout_s: float) -> Snapshot:
        row = await longpoll.until(self._changed, lambda: self.row(snapshot_id),
                                   lambda r: r.state != SnapshotState.CREATING.value, timeout_s)
        return to_model(row)

    # -- create -----------------------------------------------------------------------------
    async def create(self, req: SnapshotCreate) -> Snapshot:
        if req.expires_at is not None:
            expires = req.expires_at if req.expires_at.tzinfo else req.expires_at.replace(
                tzinfo=UTC)
            if expires <= now():
                raise ValidationError(f"must be in the future, got {req.expires_at.isoformat()}",
                                      field="expires_at")
        srow = self.sessions.row(req.session_id)
        rt = self.sessions.runtimes.get(srow.id)
        if srow.state not in ("READY", "RUNNING") or rt is None:
            raise ConflictError(f"session {srow.id} is {srow.state}; only a running session "
                                "can be snapshotted")
        row = SnapshotRow(
            id=new_id("snapshot"), session_id=srow.id, workspace_id=req.workspace_id,
            name=req.name, state=SnapshotState.CREATING.value, base_image_id=srow.base_image_id,
            cpu=srow.cpu, memory_mb=srow.memory_mb, memory_bytes=srow.memory_mb << 20,
            machine=srow.machine, disk_chain=[], files={}, timings={}, created_at=now(),
            expires_at=req.expires_at,
        )
        self.store.add(row)
        task = asyncio.ensure_future(self._capture_job(row.id, rt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return to_model(row)

    async def _capture_job(self, snapshot_id: str, rt: Runtime) -> None:
        steps = Steps(log, snapshot_id)
        sdir = self.layout.snapshot_dir(snapshot_id)
        staging = rt.machine.files.run_dir / f"{snapshot_id}.ram"
        try:
            # one capture at a time per session; terminate waits for it too
            async with rt.lock:
                if self.sessions.runtimes.get(rt.session_id) is not rt:
                    raise ConflictError(f"session {rt.session_id} ended before the capture")
                sdir.mkdir(parents=True, exist_ok=True)
                new_top = self.layout.layers / f"{new_id('snapshot').replace('snp_', 'lyr_')}.qcow2"
                # volumes are never part of a snapshot: unplugged for the capture, then back
                unplugged = await self.volume_hooks.unplug_for_capture(rt)
                try:
                    got = await capture(rt.machine, steps, new_top=new_top,
                                        state_file=sdir / "state.bin", ram_staging=staging,
                                        node_name=f"top-{snapshot_id}")
                finally:
                    # whatever happened, the session's record follows QEMU's real disk chain
                    with contextlib.suppress(TenkiError):
                        chain = await self.sessions._chain_from_qemu(rt.machine)
                        if chain:
                            self.store.update(SessionRow, rt.session_id, disk_chain=chain)
                    await self.volume_hooks.replug_after_capture(rt, unplugged)
            log.info("%s: guest paused %.3fs", snapshot_id, got.paused_s)
            srow = self.store.get_session(rt.session_id)
            assert srow is not None and srow.machine is not None
            chain = list(srow.disk_chain[:-1])
            cfg = MachineConfig.from_json(srow.machine)
            if got.stream is not None:
                try:
                    # short: the scratch VM's socket paths must fit in 108 bytes
                    work = self.layout.run / f"cv-{snapshot_id.removeprefix('snp_')}"
                    await convert_stream(cfg, [Path(p) for p in chain], got.stream, work,
                                         staging, sdir / "state.bin", steps)
                finally:
                    with contextlib.suppress(OSError):
                        got.stream.unlink()
            await asyncio.to_thread(self._seal, snapshot_id, sdir, staging, chain, cfg, steps)
            steps.timings["paused"] = got.paused_s
            self.store.update(SnapshotRow, snapshot_id, timings=steps.timings)
            await self._set(snapshot_id, SnapshotState.READY, None, ready_at=now())
            log.info("%s: READY in %.3fs", snapshot_id, steps.total)
        except Exception as exc:
            reason = exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}"
            where = f" (at {steps.current})" if steps.current else ""
            log.warning("%s: capture failed%s: %s", snapshot_id, where, reason)
            shutil.rmtree(sdir, ignore_errors=True)
            await self._set(snapshot_id, SnapshotState.FAILED, f"capture failed{where}: {reason}",
                            timings=steps.timings)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink()

    def _seal(self, snapshot_id: str, sdir: Path, staging: Path, chain: list[str],
              cfg: MachineConfig, steps: Steps) -> None:
        """Compress, checksum and fsync everything; only then may the snapshot be READY."""
        with steps.step("compress-ram"):
            ram_raw, ram_stored, ram_sha = ramfile.pack(staging, sdir / "ram.zst")
            remember_digest(sdir / "ram.zst", ram_sha)
        manifest: dict[str, Any] = {}
        with steps.step("checksum"):
            state = sdir / "state.bin"
            _fsync_file(state)
            manifest[str(sdir / "ram.zst")] = {"kind": "ram", "sha256": ram_sha,
                                              "bytes": ram_stored}
            manifest[str(state)] = {"kind": "state", "sha256": checked_digest(state),
                                    "bytes": state.stat().st_size}
            for i, layer in enumerate(chain):
                kind = "base" if i == 0 else "layer"
                manifest[layer] = {"kind": kind, "sha256": checked_digest(Path(layer)),
                                   "bytes": Path(layer).stat().st_size}
            for kind in ("kernel", "initrd"):
                path = getattr(cfg, kind)
                manifest[path] = {"kind": kind, "sha256": checked_digest(Path(path)),
                                  "bytes": Path(path).stat().st_size}
        with steps.step("sync"):
            for layer in chain[1:]:
                _fsync_file(Path(layer))
            tmp = sdir / "manifest.json.tmp"
            tmp.write_text(json.dumps({"id": snapshot_id, "chain": chain, "files": manifest}))
            _fsync_file(tmp)
            os.replace(tmp, sdir / "manifest.json")
            _fsync_dir(sdir)
            _fsync_dir(self.layout.layers)
        layers = [v for v in manifest.values() if v["kind"] == "layer"]
        size = ram_raw + manifest[str(sdir / "state.bin")]["bytes"] + sum(
            v["bytes"] for v in layers)
        stored = ram_stored + manifest[str(sdir / "state.bin")]["bytes"] + sum(
            disks.allocated_bytes(Path(p)) for p, v in manifest.items() if v["kind"] == "layer")
        self.store.update(SnapshotRow, snapshot_id, disk_chain=chain, files=manifest,
                          size_bytes=size, compressed_bytes=stored)

    # -- restore ----------------------------------------------------------------------------
    async def _restore_session(self, srow: SessionRow, sessions: SessionService) -> Runtime:
        snap = self.row(srow.snapshot_id or "")
        if snap.state != SnapshotState.READY.value:
            raise SnapshotFailedError(f"snapshot {snap.id} is {snap.state}; only a READY "
                                      "snapshot can be restored")
        assert snap.machine is not None
        cfg = replace(MachineConfig.from_json(snap.machine), accel=sessions.accel,
                      ram_base=str(self.ram_cache(snap.id)))
        new_top = self.layout.layers / f"{new_id('session').replace('ses_', 'lyr_')}.qcow2"
        self.store.update(SessionRow, srow.id, machine=cfg.to_json(),
                          disk_chain=[*snap.disk_chain, str(new_top)])
        sdir = self.layout.snapshot_dir(snap.id)
        steps = Steps(log, f"{srow.id} from {snap.id}")
        machine_id, entropy = sessions.new_secret_identity()
        self._readers[snap.id] = self._readers.get(snap.id, 0) + 1
        try:
            machine, agent = await restore(
                snapshot_id=snap.id, session_id=srow.id, cfg=cfg, chain=list(snap.disk_chain),
                manifest=snap.files, ram_file=sdir / "ram.zst", state_file=sdir / "state.bin",
                files=sessions.files(srow.id), new_top=new_top, steps=steps,
                agent_timeout=30.0, identity=(hostname_for(srow.id), machine_id, entropy))
        finally:
            self._readers[snap.id] -= 1
            async with self._changed:
                self._changed.notify_all()
        log.info("%s: restored from %s in %.3fs", srow.id, snap.id, steps.total)
        return Runtime(srow.id, machine, agent)

    # -- delete and expiry ----------------------------------------------------------------------
    async def delete(self, snapshot_id: str) -> Snapshot:
        row = self.row(snapshot_id)
        if row.state in (SnapshotState.DELETED.value, SnapshotState.DELETING.value):
            return to_model(row)
        if row.state == SnapshotState.CREATING.value:
            raise ConflictError(f"snapshot {snapshot_id} is CREATING; delete it once it is "
                                "READY or FAILED")
        await self._set(snapshot_id, SnapshotState.DELETING, None)
        task = asyncio.ensure_future(self._delete_job(snapshot_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return to_model(self.row(snapshot_id))

    async def _delete_job(self, snapshot_id: str) -> None:
        async with self._changed:
            while self._readers.get(snapshot_id, 0) > 0:
                await self._changed.wait()
        shutil.rmtree(self.layout.snapshot_dir(snapshot_id), ignore_errors=True)
        await self._set(snapshot_id, SnapshotState.DELETED, None, deleted_at=now())
        await asyncio.to_thread(self.collect_garbage)

    async def sweep_expired(self) -> None:
        t = now()
        for row in self.store.all(SnapshotRow):
            if row.expires_at and row.expires_at <= t and row.state in (
                    SnapshotState.READY.value, SnapshotState.FAILED.value):
                log.info("%s: expired at %s", row.id, row.expires_at.isoformat())
                await self.delete(row.id)

    def referenced_files(self) -> set[str]:
        refs: set[str] = set()
        final = ("TERMINATED", "FAILED")
        for s in self.store.all(SessionRow):
            if s.state not in final:
                refs.update(s.disk_chain or [])
                if s.machine:
                    refs.update((s.machine["kernel"], s.machine["initrd"]))
        for snap in self.store.all(SnapshotRow):
            if snap.state != SnapshotState.DELETED.value:
                refs.update(snap.disk_chain or [])
                refs.update((snap.files or {}).keys())
        return refs

    def ram_cache(self, snapshot_id: str) -> Path:
        """The unpacked RAM of a snapshot, mapped copy-on-write by the sessions restored from it.

        On the data disk, not tmpfs: its pages are clean page cache, shared by the clones and
        evictable under memory pressure (a private mapping never writes back).
        """
        return self.layout.home / "ram-cache" / f"{snapshot_id}.ram"

    def _collect_ram_caches(self) -> int:
        """A cache goes when its snapshot is gone and no live session maps it."""
        cache_dir = self.layout.home / "ram-cache"
        if not cache_dir.exists():
            return 0
        mapped = {(s.machine or {}).get("ram_base") for s in self.store.all(SessionRow)
                  if s.state not in ("TERMINATED", "FAILED")}
        freed = 0
        for cache in cache_dir.glob("snp_*.ram"):
            snap = self.store.get_snapshot(cache.stem)
            if str(cache) in mapped or (snap and snap.state != SnapshotState.DELETED.value):
                continue
            freed += disks.allocated_bytes(cache)
            with contextlib.suppress(OSError):
                cache.unlink()
        return freed

    def collect_garbage(self) -> int:
        images = {p.stat().st_ino for p in self.layout.images.rglob("*") if p.is_file()}
        freed = disks.collect_garbage(self.layout.layers, self.referenced_files(), images)
        freed += self._collect_ram_caches()
        if freed:
            log.info("freed %d bytes of unreferenced layers", freed)
        return freed

    async def _after_session_gone(self, session_id: str) -> None:
        await asyncio.to_thread(self.collect_garbage)

    # -- recovery ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """After a restart: a capture cut short is FAILED; a deletion cut short finishes."""
        for scratch in self.layout.run.glob("cv-*"):  # conversions cut short by the crash
            await asyncio.to_thread(_kill_scratch, scratch)
        for row in self.store.all(SnapshotRow):
            if row.state == SnapshotState.CREATING.value:
                sealed = self.layout.snapshot_dir(row.id) / "manifest.json"
                if row.files and sealed.exists():
                    try:
                        await asyncio.to_thread(verify_files, row.id, row.files)
                        await self._set(row.id, SnapshotState.READY, None, ready_at=now())
                        continue
                    except TenkiError as exc:
                        log.warning("%s: sealed but unusable: %s", row.id, exc.message)
                reason = "the server stopped during the capture"
                shutil.rmtree(self.layout.snapshot_dir(row.id), ignore_errors=True)
                await self._set(row.id, SnapshotState.FAILED, reason)
            elif row.state == SnapshotState.DELETING.value:
                await self._delete_job(row.id)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _kill_scratch(work_dir: Path) -> None:
    import signal

    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads((work_dir / "machine.json").read_text())
        for pid in (info.get("pid"), info.get("net_pid")):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    shutil.rmtree(work_dir, ignore_errors=True)

"""Sessions: their state machine, their VMs, and what runs in them.

State machine (``models.SessionState``)::

    CREATING ──boot/restore ok──> READY <──> RUNNING (a user process is executing)
        │                           │
        └──failed──> FAILED         └──terminate / expiry / VM died──> TERMINATING ──> TERMINATED

The service owns one ``Runtime`` per live session (its ``Machine``, ``AgentClient`` and lock).
Records live in the store; everything here survives a server restart through ``recover()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import longpoll
from ..config import Layout
from ..engine import disks
from ..engine.agent import AgentClient, AgentError, connect_agent
from ..engine.machine import (
    LaunchOptions,
    Machine,
    MachineConfig,
    MachineError,
    MachineFiles,
    is_system_disk,
)
from ..errors import (
    ConflictError,
    InternalError,
    NotFoundError,
    SessionNotFoundError,
    SnapshotFailedError,
    TenkiError,
    ValidationError,
)
from ..ids import new_id
from ..models import (
    DEFAULT_IMAGE_ID,
    FINAL_SESSION_STATES,
    ExecRequest,
    Session,
    SessionCreate,
    SessionState,
    VolumeAttachment,
)
from ..steps import Steps
from ..store.db import Store
from ..store.tables import SessionRow
from .processes import ProcessHandle, ProcessTable

log = logging.getLogger(__name__)

BOOT_AGENT_TIMEOUT_S = 180.0
RESTORE_AGENT_TIMEOUT_S = 30.0
WATCH_INTERVAL_S = 0.5


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Runtime:
    """What the server holds for one session whose VM exists."""

    session_id: str
    machine: Machine
    agent: AgentClient
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None


# A restore hook, provided by the snapshot service: (session row, runtime files) -> Runtime
Restorer = Callable[[SessionRow, "SessionService"], Awaitable[Runtime]]


def to_model(row: SessionRow) -> Session:
    return Session(
        id=row.id, name=row.name, state=SessionState(row.state), state_reason=row.state_reason,
        cpu=row.cpu, memory_mb=row.memory_mb, base_image_id=row.base_image_id,
        snapshot_id=row.snapshot_id, env_keys=sorted(row.env or {}), metadata=row.meta or {},
        volumes=[VolumeAttachment(**v) for v in (row.volumes or [])],
        created_at=row.created_at, ready_at=row.ready_at, expires_at=row.expires_at,
        terminated_at=row.terminated_at,
    )


def hostname_for(session_id: str) -> str:
    return f"tenki-{session_id.split('_', 1)[-1][:8]}"


class SessionService:
    def __init__(self, layout: Layout, store: Store, accel: str) -> None:
        self.layout = layout
        self.store = store
        self.accel = accel
        self.runtimes: dict[str, Runtime] = {}
        self.processes = ProcessTable()
        self.restorer: Restorer | None = None
        # set by the volume service: validate a create's volumes; attach them before READY
        self.volume_checks: list[Callable[[SessionCreate], None]] = []
        self.volume_attacher: Callable[[str, SessionCreate], Awaitable[None]] | None = None
        self.on_gone: list[Callable[[str], Awaitable[None]]] = []
        # called with a live runtime just before its VM is stopped on purpose (flush volumes)
        self.before_stop: list[Callable[[str], Awaitable[None]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Condition()

    # -- helpers ----------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def row(self, session_id: str) -> SessionRow:
        row = self.store.get_session(session_id)
        if row is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        return row

    def files(self, session_id: str) -> MachineFiles:
        return MachineFiles(self.layout.session_run_dir(session_id))

    async def set_state(self, session_id: str, state: SessionState, reason: str | None = None,
                        **values: Any) -> None:
        self.store.update(SessionRow, session_id, state=state.value, state_reason=reason, **values)
        await self._notify()

    def live(self, session_id: str) -> Runtime:
        """The runtime of a session that can be driven, or a clear error why not."""
        row = self.row(session_id)
        rt = self.runtimes.get(session_id)
        if row.state not in (SessionState.READY.value, SessionState.RUNNING.value) or rt is None:
            reason = f" ({row.state_reason})" if row.state_reason else ""
            raise ConflictError(f"session {session_id} is {row.state}{reason}, not running")
        return rt

    # -- create -----------------------------------------------------------------------------
    async def create(self, req: SessionCreate) -> Session:
        image_id = req.base_image_id or DEFAULT_IMAGE_ID
        snapshot = None
        if req.snapshot_id:
            snapshot = self.store.get_snapshot(req.snapshot_id)
            if snapshot is None:
                from ..errors import SnapshotNotFoundError

                raise SnapshotNotFoundError(f"snapshot {req.snapshot_id} not found")
            if snapshot.state != "READY":
                why = f": {snapshot.state_reason}" if snapshot.state_reason else ""
                raise SnapshotFailedError(
                    f"snapshot {snapshot.id} is {snapshot.state}{why}; only a READY snapshot "
                    "can be restored")
            image_id = snapshot.base_image_id
        fields = req.model_fields_set
        cpu = snapshot.cpu if snapshot else req.cpu
        memory_mb = snapshot.memory_mb if snapshot else req.memory_mb
        if snapshot and "cpu" in fields and req.cpu != snapshot.cpu:
            raise ValidationError(f"a restore keeps the snapshot's {snapshot.cpu} vCPUs",
                                  field="cpu")
        if snapshot and "memory_mb" in fields and req.memory_mb != snapshot.memory_mb:
            raise ValidationError(f"a restore keeps the snapshot's {snapshot.memory_mb} MiB",
                                  field="memory_mb")
        for hook in self.volume_checks:
            hook(req)
        env = dict(req.env)
        if snapshot is not None:
            # a restore carries on the captured session, environment included
            source = self.store.get_session(snapshot.session_id)
            env = {**((source.env or {}) if source else {}), **env}
        created = now()
        row = SessionRow(
            id=new_id("session"), name=req.name, state=SessionState.CREATING.value, cpu=cpu,
            memory_mb=memory_mb, base_image_id=image_id,
            snapshot_id=snapshot.id if snapshot else None, env=env,
            meta=dict(req.metadata), volumes=[], disk_chain=[], created_at=created,
            expires_at=created + timedelta(seconds=req.max_duration_s)
            if req.max_duration_s else None,
        )
        self.store.add(row)
        self._spawn(self._start(row.id, req), f"start {row.id}")
        return to_model(row)


    async def _start(self, session_id: str, req: SessionCreate) -> None:
        row = self.row(session_id)
        try:
            if row.snapshot_id:
                assert self.restorer is not None
                rt = await self.restorer(row, self)
            else:
                rt = await self._boot(row)
        except Exception as exc:
            reason = exc.message if isinstance(exc, TenkiError) else f"{type(exc).__name__}: {exc}"
            log.warning("session %s failed to start: %s", session_id, reason)
            await self._discard(session_id)
            await self.set_state(session_id, SessionState.FAILED, reason, terminated_at=now())
            await self._gone(session_id)
            return
        self.runtimes[session_id] = rt
        rt.watcher = self._spawn(self._watch(session_id), f"watch {session_id}")
        fresh = self.row(session_id)
        if fresh.state != SessionState.CREATING.value:  # terminated while it was starting
            await self.terminate(session_id)
            return
        warning: str | None = None
        if req.volumes and self.volume_attacher is not None:
            # attached before READY: a command run at once must see the mounts
            try:
                await self.volume_attacher(session_id, req)
            except TenkiError as exc:
                log.warning("session %s: volume attach failed: %s", session_id, exc)
                warning = f"volume attach failed: {exc.message}"
        await self.set_state(session_id, SessionState.READY, warning, ready_at=now())

    def image_files(self, image_id: str) -> tuple[Path, Path, Path, str]:
        """Stable layer-store paths of an image's disk, kernel and initrd (built if missing)."""
        from ..images import builder

        image = builder.ensure_image(self.layout, image_id)
        paths = builder.image_paths(self.layout, image_id)
        stamp = f"{image_id}-{int(image.created_at.timestamp())}"
        store = self.layout.layers
        disk = disks.link_into(store, paths.disk, f"base-{stamp}.qcow2")
        kernel = disks.link_into(store, paths.kernel, f"vmlinuz-{stamp}")
        initrd = disks.link_into(store, paths.initrd, f"initrd-{stamp}")
        return disk, kernel, initrd, builder.BOOT_CMDLINE

    async def _boot(self, row: SessionRow) -> Runtime:
        steps = Steps(log, row.id)
        with steps.step("image"):
            base, kernel, initrd, cmdline = await asyncio.to_thread(
                self.image_files, row.base_image_id)
        cfg = MachineConfig(cpu=row.cpu, memory_mb=row.memory_mb, accel=self.accel,
                            kernel=str(kernel), initrd=str(initrd),
                            cmdline=f"{cmdline} tenki.hostname={hostname_for(row.id)}")
        top = self.layout.layers / f"{new_id('session').replace('ses_', 'lyr_')}.qcow2"
        chain = [str(base), str(top)]
        self.store.update(SessionRow, row.id, machine=cfg.to_json(), disk_chain=chain)
        with steps.step("overlay"):
            await asyncio.to_thread(disks.create_overlay, top, base)
        machine = Machine(row.id, self.files(row.id), cfg)
        agent = AgentClient(machine.files.agent)
        try:
            with steps.step("launch"):
                await machine.launch(LaunchOptions(disk_chain=[Path(p) for p in chain]))
            with steps.step("agent"):
                await connect_agent(machine, agent, BOOT_AGENT_TIMEOUT_S)
            with steps.step("clock"):
                await agent.set_time(time.time_ns())
        except BaseException:
            await agent.close()
            await machine.kill()
            raise
        return Runtime(row.id, machine, agent)

    # -- watching and recovery -----------------------------------------------------------------
    async def _watch(self, session_id: str) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            rt = self.runtimes.get(session_id)
            if rt is None:
                return
            if not rt.machine.alive():
                row = self.store.get_session(session_id)
                if row and row.state not in (SessionState.TERMINATING.value,
                                             *(s.value for s in FINAL_SESSION_STATES)):
                    reason = f"the VM stopped unexpectedly: {rt.machine.exit_reason()}"
                    log.warning("session %s: %s", session_id, reason)
                    await self._discard(session_id)
                    await self.set_state(session_id, SessionState.FAILED, reason,
                                         terminated_at=now())
                    await self._gone(session_id)
                return

    async def recover(self) -> None:
        """After a server (re)start: find the VMs of live sessions again, or say why not."""
        for row in self.store.all(SessionRow):
            if row.state in (s.value for s in FINAL_SESSION_STATES):
                continue
            cfg = MachineConfig.from_json(row.machine) if row.machine else None
            if cfg is None or row.state == SessionState.TERMINATING.value:
                await self._finish_dead(row, "the server stopped before the VM was started")
                continue
            machine = Machine(row.id, self.files(row.id), cfg)
            agent = AgentClient(machine.files.agent)
            try:
                await machine.attach()
                if await machine.status() != "running":
                    # a capture was cut short by a crash: the guest must not stay frozen
                    await machine.resume()
                await agent.connect(15.0)
            except (TenkiError, OSError) as exc:
                await agent.close()
                await machine.kill()
                msg = exc.message if isinstance(exc, TenkiError) else str(exc)
                await self._finish_dead(row, f"VM not found after server restart ({msg})")
                continue
            _node, top = await machine.top_node()
            if row.disk_chain and row.disk_chain[-1] != top:
                chain = await self._chain_from_qemu(machine)
                self.store.update(SessionRow, row.id, disk_chain=chain)
            rt = Runtime(row.id, machine, agent)
            self.runtimes[row.id] = rt
            rt.watcher = self._spawn(self._watch(row.id), f"watch {row.id}")
            if row.state == SessionState.CREATING.value:
                await self.set_state(row.id, SessionState.READY, None, ready_at=now())
            elif row.state == SessionState.RUNNING.value:
                await self.set_state(row.id, SessionState.READY, None)
            log.info("session %s: VM (pid %s) found again", row.id, machine.pid)

    async def _chain_from_qemu(self, machine: Machine) -> list[str]:
        for dev in await machine.execute("query-block"):
            if is_system_disk(dev):
                chain: list[str] = []
                image = dev["inserted"]["image"]
                while image:
                    chain.append(image["filename"])
                    image = image.get("backing-image")
                return list(reversed(chain))
        return []

    async def _finish_dead(self, row: SessionRow, reason: str) -> None:
        log.warning("session %s: %s", row.id, reason)
        shutil.rmtree(self.layout.session_run_dir(row.id), ignore_errors=True)
        state = SessionState.FAILED if row.state == SessionState.CREATING.value \
            else SessionState.TERMINATED
        await self.set_state(row.id, state, reason, terminated_at=now())
        await self._gone(row.id)

    # -- terminate ----------------------------------------------------------------------------
    async def terminate(self, session_id: str, reason: str | None = None) -> Session:
        row = self.row(session_id)
        if row.state in (s.value for s in FINAL_SESSION_STATES):
            return to_model(row)
        rt = self.runtimes.get(session_id)
        if row.state == SessionState.CREATING.value and rt is None:
            # the start task sees TERMINATING and cleans up when it finishes
            await self.set_state(session_id, SessionState.TERMINATING, reason)
            return to_model(self.row(session_id))
        if rt is not None:
            for hook in self.before_stop:
                try:
                    await hook(session_id)
                except Exception:  # a hook must never keep a session from ending
                    log.exception("session %s: before-stop hook failed", session_id)
        await self.set_state(session_id, SessionState.TERMINATING, reason)
        if rt is not None:
            async with rt.lock:
                await self._discard(session_id)
        await self.set_state(session_id, SessionState.TERMINATED, reason, terminated_at=now())
        await self._gone(session_id)
        return to_model(self.row(session_id))

    async def _gone(self, session_id: str) -> None:
        for hook in self.on_gone:
            try:
                await hook(session_id)
            except Exception:
                log.exception("session %s: on-gone hook failed", session_id)

    async def _discard(self, session_id: str) -> None:
        """Stop the VM and remove its volatile files; idempotent."""
        rt = self.runtimes.pop(session_id, None)
        for proc in self.processes.for_session(session_id):
            await proc.cancel()
        self.processes.drop_session(session_id)
        if rt is not None:
            if rt.watcher is not None and rt.watcher is not asyncio.current_task():
                rt.watcher.cancel()
            await rt.agent.close()
            await rt.machine.quit(timeout=3.0)
        shutil.rmtree(self.layout.session_run_dir(session_id), ignore_errors=True)

    # -- queries ----------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        return to_model(self.row(session_id))

    def query(self, state: str | None = None) -> list[Session]:
        rows = self.store.all(SessionRow)
        if state:
            rows = [r for r in rows if r.state == state.upper()]
        rows.sort(key=lambda r: r.created_at)
        return [to_model(r) for r in rows]

    async def wait(self, session_id: str, timeout_s: float) -> Session:
        row = await longpoll.until(self._changed, lambda: self.row(session_id),
                                   lambda r: r.state != SessionState.CREATING.value, timeout_s)
        return to_model(row)

    # -- exec and files -------------------------------------------------------------------------
    async def start_process(self, session_id: str, req: ExecRequest) -> ProcessHandle:
        if bool(req.argv) == bool(req.command):
            raise ValidationError("give exactly one of argv or command", field="argv")
        rt = self.live(session_id)
        row = self.row(session_id)
        argv = list(req.argv) if req.argv else ["/bin/sh", "-c", req.command or ""]
        env = {**(row.env or {}), **req.env}
        stdin = req.stdin or req.stdin_data is not None
        try:
            agent_proc = await rt.agent.exec(argv, env=env, cwd=req.cwd, timeout_s=req.timeout_s,
                                             stdin=stdin)
        except AgentError as exc:
            if exc.errno in ("ENOENT", "EACCES", "ENOTDIR"):
                raise ValidationError(exc.message, field="argv" if exc.errno != "ENOTDIR"
                                      else "cwd") from exc
            raise
        handle = ProcessHandle(session_id, agent_proc)
        handle.start()
        self.processes.add(handle)
        if req.stdin_data is not None:
            import base64

            await agent_proc.write_stdin(base64.b64decode(req.stdin_data))
            await agent_proc.close_stdin()
        if row.state == SessionState.READY.value:
            await self.set_state(session_id, SessionState.RUNNING, None)
        self._spawn(self._settle(session_id, handle), f"settle {handle.id}")
        return handle

    async def _settle(self, session_id: str, handle: ProcessHandle) -> None:
        async for _ in handle.stream():
            pass
        row = self.store.get_session(session_id)
        if row and row.state == SessionState.RUNNING.value \
                and self.processes.running(session_id) == 0:
            await self.set_state(session_id, SessionState.READY, None)

    def process(self, session_id: str, process_id: str) -> ProcessHandle:
        self.row(session_id)
        proc = self.processes.get(process_id)
        if proc is None or proc.session_id != session_id:
            raise NotFoundError(f"process {process_id} not found in session {session_id}")
        return proc

    async def read_file(self, session_id: str, path: str) -> bytes:
        _check_path(path)
        rt = self.live(session_id)
        try:
            return await rt.agent.read_file(path)
        except AgentError as exc:
            raise _file_error(exc, session_id, path) from exc

    async def write_file(self, session_id: str, path: str, data: bytes, mode: int) -> int:
        _check_path(path)
        rt = self.live(session_id)
        try:
            return await rt.agent.write_file(path, data, mode)
        except AgentError as exc:
            raise _file_error(exc, session_id, path) from exc

    # -- expiry ---------------------------------------------------------------------------------
    async def sweep_expired(self) -> None:
        t = now()
        for row in self.store.all(SessionRow):
            if row.expires_at and row.expires_at <= t and row.state in (
                    SessionState.READY.value, SessionState.RUNNING.value):
                log.info("session %s: max duration reached", row.id)
                await self.terminate(row.id, "max duration reached")

    async def shutdown(self) -> None:
        """Server stop: detach from VMs (they keep running) and stop background work."""
        for task in list(self._tasks):
            task.cancel()
        for rt in self.runtimes.values():
            await rt.agent.close()
            await rt.machine.disconnect()
        self.runtimes.clear()

    def new_secret_identity(self) -> tuple[str, bytes]:
        return secrets.token_hex(16), os.urandom(64)


def _check_path(path: str) -> None:
    if not path or not path.startswith("/"):
        raise ValidationError(f"must be an absolute path, got {path!r}", field="path")


def _file_error(exc: AgentError, session_id: str, path: str) -> TenkiError:
    if exc.errno == "ENOENT":
        return NotFoundError(f"file {path} not found in session {session_id}")
    if exc.errno in ("EISDIR", "ENOTDIR", "EACCES", "EPERM", "EROFS", "ENOSPC"):
        return ValidationError(f"{path}: {exc.message}", field="path")
    return InternalError(f"{path}: {exc.message}")


__all__ = ["MachineError", "Runtime", "SessionService", "hostname_for", "to_model"]

"""``FakeHost``: the host layer (``tenkibox.host.api.HostAPI``) with no VMs behind it.

It stands in for ``LocalHost`` under the real control plane, so that everything above the host
(control plane, records, REST app, SDK, CLI) runs for real in tests that take milliseconds:

- VMs are entries of ``fake.vms``; boot and restore answer ``Started`` with made-up digests
  (a restore the manifest's), capture a ``Captured`` whose manifest names new fake artifacts.
  Artifacts are digests in ``fake.artifacts`` (garbage collection and verification act on it);
  a capture keeps a copy of the session's files, which a restore of it gets back.
- Files are an in-memory dict per VM (and per volume, under its mount path).
- Processes run a tiny interpreter (``echo``, ``cat``, ``sleep``, ``true``, ``false``, ``env``
  and ``sh -c "echo hi; echo oops >&2; cat; exit 3"``; add more in ``fake.programs``). They are
  wrapped in the real ``host.processes.ProcessHandle``, so their event streams have exactly the
  real shapes and the real one-reader rules.
- Faults: ``fake.fail_next("boot", InternalError("..."))`` makes the next call of an operation
  raise; ``gate = fake.block("capture")`` holds every call of it until ``gate.release()``
  (``gate.wait_entered()`` waits until a call is held); ``fake.kill_vm(session_id, reason)``
  makes a VM die on its own (``watch()`` reports it).
- A pause's capture (``leave_paused``) marks the VM ``frozen``; ``fake.restores`` keeps every
  restore's spec (a resume has ``keep_identity``).
- ``fake.calls`` lists every operation with its main argument, in order.

The fake's own state is touched on the event loop that drives it; ``kill_vm`` and the gates may
be used from another thread (the test's, when the server runs in a background thread).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import itertools
import shlex
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tenkibox.artifacts.store import GC_GRACE_S
from tenkibox.engine.agent import AgentError
from tenkibox.errors import (
    ConflictError,
    InternalError,
    NotFoundError,
    ValidationError,
)
from tenkibox.host.api import (
    BootSpec,
    CacheScrub,
    Captured,
    CaptureSpec,
    ExecSpec,
    InUse,
    MachineShape,
    Manifest,
    NetworkSpec,
    ProcessEvent,
    ProcessRef,
    Recovered,
    RestoreSpec,
    SnapshotDamagedError,
    Started,
    Unowned,
    VMGone,
    VolumeMountSpec,
)
from tenkibox.host.capacity import HostCapacity
from tenkibox.host.processes import ProcessHandle, ProcessLostError, ProcessTable
from tenkibox.host.tmpfs import TmpfsUse
from tenkibox.models import Image

#: Operations that ``fail_next`` and ``block`` accept.
OPERATIONS = frozenset({
    "boot", "restore", "prepare_spare", "capture", "terminate", "recover",
    "create_volume", "delete_volume", "attach_volume", "detach_volume",
    "start_process", "read_file", "write_file",
})
CHUNK = 64 << 10


def digest(*parts: object) -> str:
    """A made-up artifact digest (64 hex digits, like a real one)."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


KERNEL = digest("fake", "kernel")
INITRD = digest("fake", "initrd")


def image_digest(image_id: str) -> str:
    return digest("fake", "image", image_id)


# -- faults -------------------------------------------------------------------------------------


class Gate:
    """Holds the calls of one operation until released (thread-safe)."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.entered = threading.Event()  # set once a call is held here
        self.held = 0  # calls that were held (in total)
        self._released = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    async def wait(self) -> None:
        with self._lock:
            if self._released:
                return
            event = asyncio.Event()
            self._waiters.append((asyncio.get_running_loop(), event))
            self.held += 1
        self.entered.set()
        await event.wait()

    def release(self) -> None:
        with self._lock:
            self._released = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def wait_entered(self, timeout: float = 5.0) -> None:
        """Block (a thread) until a call is held here."""
        if not self.entered.wait(timeout):
            raise AssertionError(f"no {self.op} call reached the gate in {timeout}s")

    async def until_entered(self, timeout: float = 5.0) -> None:
        """Wait (a coroutine) until a call is held here."""
        deadline = time.monotonic() + timeout
        while not self.entered.is_set():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {self.op} call reached the gate in {timeout}s")
            await asyncio.sleep(0.002)


# -- processes ------------------------------------------------------------------------------------


class FakeIO:
    """What a program sees: its argv, environment, standard streams and the session's files."""

    def __init__(self, proc: FakeAgentProcess, argv: list[str], *, to_stderr: bool = False):
        self.proc = proc
        self.argv = argv
        self.env = proc.spec.env
        self.cwd = proc.spec.cwd
        self.to_stderr = to_stderr

    def with_argv(self, argv: list[str], *, to_stderr: bool = False) -> FakeIO:
        return FakeIO(self.proc, argv, to_stderr=self.to_stderr or to_stderr)

    def out(self, data: bytes | str) -> None:
        self.proc.emit("stderr" if self.to_stderr else "stdout", data)

    def err(self, data: bytes | str) -> None:
        self.proc.emit("stderr", data)

    async def read_stdin(self) -> bytes | None:
        """The next chunk of standard input, None at its end (at once without stdin)."""
        return await self.proc.read_stdin()

    def read_file(self, path: str) -> bytes:
        return self.proc.host.file(self.proc.session_id, path)


#: A program: gets its ``FakeIO``, returns its exit code.
Program = Callable[[FakeIO], Awaitable[int]]


async def _echo(io: FakeIO) -> int:
    args = io.argv[1:]
    newline = not (args and args[0] == "-n")
    io.out(" ".join(args[0 if newline else 1:]) + ("\n" if newline else ""))
    return 0


async def _cat(io: FakeIO) -> int:
    if len(io.argv) == 1:
        while (chunk := await io.read_stdin()) is not None:
            io.out(chunk)
        return 0
    code = 0
    for path in io.argv[1:]:
        try:
            io.out(io.read_file(path))
        except NotFoundError:
            io.err(f"cat: {path}: No such file or directory\n")
            code = 1
    return code


async def _true(io: FakeIO) -> int:
    return 0


async def _false(io: FakeIO) -> int:
    return 1


async def _sleep(io: FakeIO) -> int:
    await asyncio.sleep(float(io.argv[1]) if len(io.argv) > 1 else 0)
    return 0


async def _env(io: FakeIO) -> int:
    io.out("".join(f"{k}={v}\n" for k, v in sorted(io.env.items())))
    return 0


async def _sh(io: FakeIO) -> int:
    """``sh -c SCRIPT``: commands separated by ``;`` or newlines, each an ``exit [N]`` or a
    program, optionally with ``>&2`` at the end."""
    flags = [i for i, a in enumerate(io.argv[1:], 1) if a.startswith("-") and a.endswith("c")]
    script = io.argv[flags[0] + 1] if flags and flags[0] + 1 < len(io.argv) else ""
    status = 0
    for part in script.replace("\n", ";").split(";"):
        words = shlex.split(part)
        if not words:
            continue
        to_err = words[-1] == ">&2"
        if to_err:
            words = words[:-1]
        if words[0] == "exit":
            return int(words[1]) if len(words) > 1 else status
        program = io.proc.host.program(words[0])
        if program is None:
            io.err(f"sh: {words[0]}: not found\n")
            status = 127
            continue
        status = await program(io.with_argv(words, to_stderr=to_err))
    return status


async def _runuser(io: FakeIO) -> int:
    """``runuser -u USER -- PROGRAM ARGS...`` (or ``setpriv ... -- PROGRAM ARGS...``): runs
    PROGRAM (there is one user here)."""
    argv = io.argv[io.argv.index("--") + 1:] if "--" in io.argv else []
    program = io.proc.host.program(argv[0]) if argv else None
    if program is None:
        io.err(f"runuser: {argv[0] if argv else '(nothing)'}: not found\n")
        return 127
    return await program(io.with_argv(argv))


async def _chown(io: FakeIO) -> int:
    """``chown OWNER -- PATH``: there is one user here, so nothing changes."""
    return 0


def builtin_programs() -> dict[str, Program]:
    return {"echo": _echo, "cat": _cat, "true": _true, "false": _false, "sleep": _sleep,
            "env": _env, "sh": _sh, "bash": _sh, "runuser": _runuser,
            "setpriv": _runuser, "chown": _chown}


class FakeAgentProcess:
    """A program running as a task, with the interface of ``engine.agent.AgentProcess`` that
    ``ProcessHandle`` uses (``AgentProcessLike``)."""

    def __init__(self, host: FakeHost, session_id: str, spec: ExecSpec, program: Program,
                 pid: int) -> None:
        self.host = host
        self.session_id = session_id
        self.spec = spec
        self.pid = pid
        self._items: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._exit.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._stdin: asyncio.Queue[bytes | None] | None = asyncio.Queue() if spec.stdin else None
        self._stdin_open = spec.stdin
        self._signal: int | None = None
        self._task = asyncio.create_task(self._run(program), name=f"fake process {pid}")

    def emit(self, stream: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if raw and not self._exit.done():
            self._items.put_nowait({"event": stream, "data": raw})

    async def read_stdin(self) -> bytes | None:
        if self._stdin is None:
            return None
        chunk = await self._stdin.get()
        if chunk is None:
            self._stdin.put_nowait(None)  # end of input stays the end
        return chunk

    async def _run(self, program: Program) -> None:
        timed_out = False
        try:
            io = FakeIO(self, list(self.spec.argv))
            try:
                code = await asyncio.wait_for(program(io), self.spec.timeout_s)
            except TimeoutError:
                code, timed_out = 124, True
        except asyncio.CancelledError:
            if self._signal is None:  # the VM went away: the process is lost
                self._exit.set_exception(AgentError("the agent connection was lost"))
                self._items.put_nowait({"event": "lost-connection"})
                raise
            code = 128 + self._signal
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # killed: it ends with an exit, not cancelled
        except Exception as exc:  # a program's bug is a test's bug: make it visible
            self.emit("stderr", f"fake host: {type(exc).__name__}: {exc}\n")
            code = 70
        event = {"event": "exit", "exit_code": code, "timed_out": timed_out}
        self._items.put_nowait(event)
        self._exit.set_result(event)

    # -- AgentProcessLike ---------------------------------------------------------------------
    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self._items.get()
            if item["event"] == "lost-connection":
                raise AgentError("the agent connection was lost")
            yield item
            if item["event"] == "exit":
                return

    async def wait_exit(self) -> dict[str, Any]:
        return dict(await asyncio.shield(self._exit))

    async def write_stdin(self, data: bytes, *, timeout: float | None = None) -> None:
        if self._stdin is None or not self._stdin_open or self._exit.done():
            raise AgentError("stdin is closed", errno="EPIPE")
        self._stdin.put_nowait(bytes(data))

    async def close_stdin(self, *, timeout: float | None = None) -> None:
        if self._stdin is not None and self._stdin_open:
            self._stdin_open = False
            self._stdin.put_nowait(None)

    async def kill(self, signal: int = 9, *, timeout: float | None = None) -> None:
        if self._exit.done() or self._signal is not None:
            return
        self._signal = signal
        self._task.cancel()

    def lose(self) -> None:
        """The VM is gone."""
        if not self._task.done():
            self._task.cancel()


# -- the host -------------------------------------------------------------------------------------


@dataclass
class FakeVM:
    session_id: str
    shape: MachineShape
    layers: list[str]
    ram: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    mounts: dict[str, VolumeMountSpec] = field(default_factory=dict)  # guest path -> mount
    procs: list[FakeAgentProcess] = field(default_factory=list)
    captures: int = 0
    #: a capture for a pause left the guest paused (``CaptureSpec.leave_paused``)
    frozen: bool = False
    network: NetworkSpec = field(default_factory=NetworkSpec)
    #: the RAM chain its memory derives from (a capture stores a delta over it)
    lineage: list[str] = field(default_factory=list)


@dataclass
class SavedState:
    """What a capture keeps for a restore (here: the files)."""

    files: dict[str, bytes]


class FakeHost:
    #: what a capture reports (RAM data + device state + disk layers; stored, compressed)
    capture_size_bytes = 300 << 20
    capture_stored_bytes = 120 << 20
    #: stored bytes of what a capture produces, as the manifest records them
    full_ram_stored = 100 << 20  # a RAM image without a parent
    delta_ram_stored = 2 << 20  # a delta over the VM's lineage
    state_stored = 1 << 20
    layer_stored = 10 << 20

    def __init__(self, *, memory_total_mib: int = 1 << 20, memory_reserve_mib: int = 0,
                 overcommit: float = 1.0, host_id: str = "fake") -> None:
        #: what the admission check counts with (ample unless a test gives less)
        self.capacity = HostCapacity(host_id, memory_total_mib, memory_reserve_mib, overcommit,
                                     cpus=2, accelerator="tcg")
        self.vms: dict[str, FakeVM] = {}
        self.starting: set[str] = set()
        self.volumes: dict[str, int] = {}  # volume id -> size
        self.volume_data: dict[str, dict[str, bytes]] = {}  # volume id -> path -> bytes
        self.artifacts: dict[str, float] = {}  # digest -> monotonic time stored
        self.stored_sizes: dict[str, int] = {}  # digest -> stored bytes (a manifest says)
        self.corrupt: set[str] = set()  # digests that verification reports damaged
        #: RAM cache digests a scrub finds damaged (rebuilt, so no longer damaged, by repair)
        self.damaged_caches: set[str] = set()
        #: session ids of VMs whose files ``unowned_files`` lists; those also in ``busy_vms``
        #: are still used by a process, so ``remove_unowned`` leaves them
        self.orphan_vms: set[str] = set()
        self.busy_vms: set[str] = set()
        self.saved: dict[str, SavedState] = {}  # manifest.state -> what a restore gets
        self.image_ids: set[str] = set()  # the images booted
        #: the images built on this host (``list_images``)
        self.images: set[str] = {"sandbox"}
        self.programs: dict[str, Program] = builtin_programs()
        self.processes = ProcessTable()
        self.calls: list[tuple[str, str]] = []
        #: (session id, guest port) -> a local address standing in for that port of the guest
        self.guest_ports: dict[tuple[str, int], tuple[str, int]] = {}
        #: every restore's spec, in order (``keep_identity`` tells a resume from a clone)
        self.restores: list[RestoreSpec] = []
        #: processes of ours that no session owns, killed at the next ``recover``
        self.strays = 0
        #: session id -> the restore a spare was prepared for (``prepare_spare``); the session
        #: ids whose restore claimed theirs, and of the spares dropped, in order
        self.spares: dict[str, RestoreSpec] = {}
        self.claimed: list[str] = []
        self.dropped_spares: list[str] = []
        #: volumes that the next capture fails to plug back (the guest loses them)
        self.lose_at_capture: set[str] = set()
        self._faults: dict[str, collections.deque[BaseException | type[BaseException]]] = {}
        self._gates: dict[str, Gate] = {}
        self._lock = threading.Lock()
        self._gone: asyncio.Queue[VMGone] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counter = itertools.count(1)
        self._pids = itertools.count(100)

    # -- faults -------------------------------------------------------------------------------
    def fail_next(self, op: str, exc: BaseException | type[BaseException],
                  times: int = 1) -> None:
        """The next ``times`` calls of ``op`` raise ``exc`` (after any gate of ``op``)."""
        self._check_op(op)
        with self._lock:
            self._faults.setdefault(op, collections.deque()).extend([exc] * times)

    def block(self, op: str) -> Gate:
        """Hold every call of ``op`` until ``gate.release()``."""
        self._check_op(op)
        gate = Gate(op)
        with self._lock:
            old = self._gates.get(op)
            self._gates[op] = gate
        if old is not None:
            old.release()
        return gate

    def release_all(self) -> None:
        with self._lock:
            gates = list(self._gates.values())
        for gate in gates:
            gate.release()

    @staticmethod
    def _check_op(op: str) -> None:
        if op not in OPERATIONS:
            raise ValueError(f"unknown host operation {op!r} (one of {sorted(OPERATIONS)})")

    async def _enter(self, op: str, key: str) -> None:
        self._bind()
        self.calls.append((op, key))
        with self._lock:
            gate = self._gates.get(op)
        if gate is not None:
            await gate.wait()
        with self._lock:
            queue = self._faults.get(op)
            exc = queue.popleft() if queue else None
        if exc is not None:
            raise exc() if isinstance(exc, type) else exc

    def calls_to(self, op: str) -> list[str]:
        return [key for name, key in self.calls if name == op]

    # -- the loop -----------------------------------------------------------------------------
    def _bind(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._gone = asyncio.Queue()

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop that drives this host (from any thread)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is self._loop or self._loop.is_closed():
            return fn()
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    # -- inspection and set-up for tests ---------------------------------------------------------
    def vm(self, session_id: str) -> FakeVM:
        vm = self.vms.get(session_id)
        if vm is None:
            raise ConflictError(f"session {session_id} has no running VM")
        return vm

    def program(self, name: str) -> Program | None:
        return self.programs.get(name) or self.programs.get(name.rsplit("/", 1)[-1])

    def seed_vm(self, session_id: str, cpu: int = 2, memory_mb: int = 4096,
                image_id: str = "sandbox") -> FakeVM:
        """A VM that runs already (as one that outlived a server restart)."""
        vm = FakeVM(session_id, self._shape(cpu, memory_mb, session_id),
                    [self._store(image_digest(image_id))], None)
        self.vms[session_id] = vm
        return vm

    def kill_vm(self, session_id: str, reason: str = "the VM stopped unexpectedly") -> None:
        """The VM dies on its own: it is gone, and ``watch()`` reports it."""

        def kill() -> None:
            vm = self.vms.pop(session_id, None)
            if vm is None:
                raise KeyError(f"no VM for {session_id}")
            self._drop_processes(session_id, vm)
            self._bind_queue().put_nowait(VMGone(session_id, reason))

        self._on_loop(kill)

    def age_artifacts(self, seconds: float = GC_GRACE_S) -> None:
        """Make every stored artifact ``seconds`` older (past the GC's grace by default)."""
        for d in self.artifacts:
            self.artifacts[d] -= seconds

    def file(self, session_id: str, path: str) -> bytes:
        store, key, _ = self._where(self.vm(session_id), path)
        if key not in store:
            raise NotFoundError(f"{path}: no such file or directory (session {session_id})")
        return store[key]

    def _bind_queue(self) -> asyncio.Queue[VMGone]:
        if self._gone is None:
            self._gone = asyncio.Queue()
        return self._gone

    # -- helpers ------------------------------------------------------------------------------
    def _store(self, d: str) -> str:
        self.artifacts.setdefault(d, time.monotonic())
        return d

    def _new_digest(self, kind: str, owner: str) -> str:
        return self._store(digest("fake", kind, owner, next(self._counter), time.time_ns()))

    def _shape(self, cpu: int, memory_mb: int, hostname: str) -> MachineShape:
        return MachineShape(cpu=cpu, memory_mb=memory_mb, kernel=self._store(KERNEL),
                            initrd=self._store(INITRD),
                            cmdline=f"console=ttyS0 fake tenki.hostname={hostname}")

    def _slot(self, session_id: str) -> None:
        if session_id in self.vms or session_id in self.starting:
            raise ConflictError(f"session {session_id} already has a VM on this host")
        self.starting.add(session_id)

    def _drop_processes(self, session_id: str, vm: FakeVM) -> None:
        for proc in vm.procs:
            proc.lose()
        self.processes.drop_session(session_id)

    def _where(self, vm: FakeVM, path: str) -> tuple[dict[str, bytes], str,
                                                     VolumeMountSpec | None]:
        for mpath in sorted(vm.mounts, key=len, reverse=True):
            if path == mpath or path.startswith(mpath + "/"):
                mount = vm.mounts[mpath]
                data = self.volume_data.setdefault(mount.volume_id, {})
                return data, path[len(mpath):] or "/", mount
        return vm.files, path, None

    # -- HostAPI: start and stop ---------------------------------------------------------------
    async def boot(self, spec: BootSpec) -> Started:
        self._slot(spec.session_id)
        try:
            await self._enter("boot", spec.session_id)
            self.image_ids.add(spec.image_id)
            vm = FakeVM(spec.session_id, self._shape(spec.cpu, spec.memory_mb, spec.hostname),
                        [self._store(image_digest(spec.image_id))], None,
                        network=spec.network)
        finally:
            self.starting.discard(spec.session_id)
        self.vms[spec.session_id] = vm
        return Started(vm.shape, list(vm.layers), None, {"boot": 0.001})

    async def prepare_spare(self, spec: RestoreSpec) -> None:
        await self._enter("prepare_spare", spec.session_id)
        if spec.session_id in self.vms or spec.session_id in self.starting \
                or spec.session_id in self.spares:
            raise ConflictError(f"session {spec.session_id} already has a VM on this host")
        self.spares[spec.session_id] = spec

    async def drop_spare(self, session_id: str) -> None:
        if self.spares.pop(session_id, None) is not None:
            self.dropped_spares.append(session_id)

    async def restore(self, spec: RestoreSpec) -> Started:
        spare = self.spares.pop(spec.session_id, None)
        if spare is not None and spare.to_json() == spec.to_json():
            self.claimed.append(spec.session_id)
        self._slot(spec.session_id)
        m = spec.manifest
        try:
            await self._enter("restore", spec.session_id)
            self.restores.append(spec)
            for d, kind in m.digests().items():
                if d not in self.artifacts or d in self.corrupt:
                    what = "is missing" if d not in self.artifacts else "is damaged"
                    raise SnapshotDamagedError(f"snapshot {spec.snapshot_id} cannot be "
                                               f"restored: {kind} {d[:12]} {what}")
            saved = self.saved.get(m.state, SavedState({}))
            vm = FakeVM(spec.session_id, m.shape, list(m.layers), m.ram, dict(saved.files),
                        network=spec.network, lineage=m.rams)
        finally:
            self.starting.discard(spec.session_id)
        self.vms[spec.session_id] = vm
        return Started(m.shape, list(m.layers), m.ram, {"restore": 0.001}, m.rams)

    async def terminate(self, session_id: str, volumes: list[VolumeMountSpec]) -> None:
        await self.drop_spare(session_id)
        await self._enter("terminate", session_id)
        vm = self.vms.pop(session_id, None)
        for handle in self.processes.for_session(session_id):
            await handle.cancel()
        if vm is not None:
            self._drop_processes(session_id, vm)

    async def recover(self, live: dict[str, list[VolumeMountSpec]]) -> Recovered:
        await self._enter("recover", ",".join(sorted(live)))
        found: list[str] = []
        lost: dict[str, str] = {}
        for session_id, mounts in live.items():
            vm = self.vms.get(session_id)
            if vm is None:
                lost[session_id] = "VM not found after server restart (no VM on the fake host)"
                continue
            vm.mounts = {m.path: m for m in mounts if m.volume_id in self.volumes}
            found.append(session_id)
        killed = self.strays
        self.strays = 0
        for session_id in [s for s in self.vms if s not in live]:
            self._drop_processes(session_id, self.vms.pop(session_id))
            killed += 1
        return Recovered(found, lost, killed)

    async def watch(self) -> AsyncIterator[VMGone]:
        self._bind()
        queue = self._bind_queue()
        while True:
            yield await queue.get()

    def has_vm(self, session_id: str) -> bool:
        return session_id in self.vms

    def list_vms(self) -> list[str]:
        return sorted(self.vms)

    # -- HostAPI: network -----------------------------------------------------------------------
    #: this fake enforces nothing, but says it can (as a root host with nftables would)
    network_enforced = True

    async def port_address(self, session_id: str, port: int) -> tuple[str, int]:
        """Where a test's own server stands in for the guest's ``port``
        (``self.guest_ports[(session_id, port)]``); a real host answers for any port."""
        vm = self.vm(session_id)
        if not vm.network.inbound:
            raise ConflictError(f"session {session_id}: inbound access is disabled")
        return self.guest_ports.get((session_id, port), ("127.0.0.1", 9))

    async def image_digest(self, image_id: str) -> str:
        return image_digest(image_id)

    async def list_images(self) -> list[Image]:
        return [Image(id=i, size_bytes=268 << 20, created_at=datetime(2026, 1, 1, tzinfo=UTC))
                for i in sorted(self.images)]

    def memory_used_mib(self) -> int:
        """A fake guest holds a quarter of its memory (an idle guest touches little)."""
        return sum(vm.shape.memory_mb for vm in self.vms.values()) // 4

    #: the size of the fake's tmpfs
    tmpfs_total_bytes = 8 << 30

    def tmpfs_use(self) -> TmpfsUse:
        """Booted guests' RAM is on tmpfs: a fake one holds what ``memory_used_mib`` says."""
        used = self.memory_used_mib() << 20
        return TmpfsUse(used, self.tmpfs_total_bytes, self.tmpfs_total_bytes - used)

    # -- HostAPI: capture -----------------------------------------------------------------------
    async def capture(self, spec: CaptureSpec) -> Captured:
        self.vm(spec.session_id)
        await self._enter("capture", spec.session_id)
        vm = self.vms.get(spec.session_id)
        if vm is None:
            raise ConflictError(f"session {spec.session_id} ended before the capture")
        vm.captures += 1
        # the session's own disk layer is frozen into the chain; it goes on writing a new one
        vm.layers = [*vm.layers, self._new_digest("layer", spec.session_id)]
        self.stored_sizes.setdefault(vm.layers[-1], self.layer_stored)
        # a delta over the lineage while every image of it is stored (as the real host)
        parent = vm.lineage if all(d in self.artifacts for d in vm.lineage) else []
        ram = self._new_digest("ram", spec.snapshot_id)
        self.stored_sizes[ram] = self.delta_ram_stored if parent else self.full_ram_stored
        state = self._new_digest("state", spec.snapshot_id)
        self.stored_sizes[state] = self.state_stored
        chain = [*parent, ram]
        vm.lineage = chain
        manifest = Manifest(vm.shape, list(vm.layers), ram, state, spec.base_image_id, chain,
                            {d: self.stored_sizes.get(d, 0)
                             for d in [*chain, state, *vm.layers[1:]]})
        self.saved[manifest.state] = SavedState(dict(vm.files))
        vm.frozen = spec.leave_paused
        lost = sorted(m.volume_id for m in spec.volumes if m.volume_id in self.lose_at_capture)
        vm.mounts = {p: m for p, m in vm.mounts.items() if m.volume_id not in lost}
        self.lose_at_capture.clear()
        return Captured(manifest, self.capture_size_bytes, self.capture_stored_bytes,
                        paused_s=0.001, timings={"pause": 0.001}, lost_volumes=lost)

    # -- HostAPI: volumes -----------------------------------------------------------------------
    async def create_volume(self, volume_id: str, size_bytes: int) -> None:
        await self._enter("create_volume", volume_id)
        self.volumes[volume_id] = size_bytes
        self.volume_data[volume_id] = {}

    async def delete_volume(self, volume_id: str) -> None:
        await self._enter("delete_volume", volume_id)
        self.volumes.pop(volume_id, None)
        self.volume_data.pop(volume_id, None)

    async def attach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        self.vm(session_id)
        await self._enter("attach_volume", mount.volume_id)
        vm = self.vms.get(session_id)
        if vm is None:
            raise ConflictError(f"session {session_id} ended during the attach")
        if mount.volume_id not in self.volumes:
            raise InternalError(f"the file of volume {mount.volume_id} is missing")
        if mount.path in vm.mounts:
            raise ValidationError(f"{mount.path} is already a mount point", field="path")
        vm.mounts[mount.path] = mount

    async def detach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        self.vm(session_id)
        await self._enter("detach_volume", mount.volume_id)
        self.vm(session_id).mounts.pop(mount.path, None)

    async def volume_files(self) -> list[str]:
        return sorted(self.volumes)

    # -- HostAPI: processes ---------------------------------------------------------------------
    async def start_process(self, session_id: str, spec: ExecSpec) -> ProcessRef:
        vm = self.vm(session_id)
        await self._enter("start_process", session_id)
        program = self.program(spec.argv[0]) if spec.argv else None
        if program is None:
            name = spec.argv[0] if spec.argv else ""
            raise ValidationError(f"{name}: No such file or directory", field="argv")
        proc = FakeAgentProcess(self, session_id, spec, program, next(self._pids))
        vm.procs.append(proc)
        handle = ProcessHandle(session_id, proc)
        handle.start()
        self.processes.add(handle)
        return ProcessRef(handle.id, handle.pid)

    def _process(self, session_id: str, process_id: str) -> ProcessHandle:
        handle = self.processes.get(process_id)
        if handle is None or handle.session_id != session_id:
            raise NotFoundError(f"process {process_id} not found in session {session_id}")
        return handle

    def process_events(self, session_id: str,
                       process_id: str) -> AsyncGenerator[ProcessEvent, None]:
        return self._process(session_id, process_id).stream()

    async def process_stdin(self, session_id: str, process_id: str, data: bytes) -> None:
        await self._process(session_id, process_id).agent_proc.write_stdin(data)

    async def process_close_stdin(self, session_id: str, process_id: str) -> None:
        await self._process(session_id, process_id).agent_proc.close_stdin()

    async def process_kill(self, session_id: str, process_id: str, signal: int) -> None:
        await self._process(session_id, process_id).agent_proc.kill(signal)

    async def process_exit(self, session_id: str, process_id: str) -> int | None:
        handle = self._process(session_id, process_id)
        try:
            end = await handle.wait_exit()
        except ProcessLostError:
            return None
        return int(end["exit_code"])

    def running_processes(self, session_id: str) -> int:
        return self.processes.running(session_id)

    # -- HostAPI: files -------------------------------------------------------------------------
    async def read_file(self, session_id: str, path: str) -> AsyncGenerator[bytes, None]:
        self.vm(session_id)
        await self._enter("read_file", path)
        data = self.file(session_id, path)
        for i in range(0, len(data), CHUNK):
            yield data[i:i + CHUNK]

    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int) -> int:
        vm = self.vm(session_id)
        await self._enter("write_file", path)
        parts = [bytes(chunk) async for chunk in chunks]
        store, key, mount = self._where(vm, path)
        if mount is not None and mount.read_only:
            raise ValidationError(f"{path}: Read-only file system", field="path")
        if path.endswith("/"):
            raise ValidationError(f"{path}: Is a directory", field="path")
        store[key] = b"".join(parts)
        return len(store[key])

    # -- HostAPI: artifacts ---------------------------------------------------------------------
    def referenced_locally(self) -> set[str]:
        refs = {image_digest(i) for i in self.image_ids}
        for vm in self.vms.values():
            refs.update(vm.layers)
            refs.update((vm.shape.kernel, vm.shape.initrd))
            if vm.ram:
                refs.add(vm.ram)
        return refs

    async def collect_garbage(self, referenced: set[str], grace_s: float | None = None) -> int:
        keep = referenced | self.referenced_locally()
        grace = GC_GRACE_S if grace_s is None else grace_s
        now = time.monotonic()
        gone = [d for d, at in self.artifacts.items() if d not in keep and now - at >= grace]
        for d in gone:
            del self.artifacts[d]
        return len(gone)

    def unowned_files(self, referenced: set[str]) -> list[Unowned]:
        keep = referenced | self.referenced_locally()
        now = time.monotonic()
        return [Unowned("artifact", d) for d, at in self.artifacts.items()
                if d not in keep and now - at >= GC_GRACE_S] + [
            Unowned("vm", sid) for sid in sorted(self.orphan_vms)]

    async def remove_unowned(self, found: list[Unowned], referenced: set[str],
                             live_sessions: set[str]) -> list[Unowned]:
        keep = referenced | self.referenced_locally()
        removed = []
        for entry in found:
            if entry.kind == "artifact" and entry.name in self.artifacts \
                    and entry.name not in keep:
                del self.artifacts[entry.name]
                removed.append(entry)
            elif entry.kind == "vm" and entry.name in self.orphan_vms and \
                    entry.name not in self.busy_vms | live_sessions:
                self.orphan_vms.discard(entry.name)
                removed.append(entry)
        return removed

    def local_artifacts(self) -> list[InUse]:
        out = [InUse(image_digest(i), "disk", image_id=i) for i in sorted(self.image_ids)]
        for vm in self.vms.values():
            uses = {**{d: f"disk layer {n}" for n, d in enumerate(vm.layers)},
                    vm.shape.kernel: "kernel", vm.shape.initrd: "initrd",
                    **({vm.ram: "RAM image"} if vm.ram else {})}
            out += [InUse(d, kind, session_id=vm.session_id) for d, kind in uses.items()]
        return out

    async def scrub_caches(self, repair: bool) -> CacheScrub:
        found = CacheScrub()
        for d in sorted(self.damaged_caches):
            if repair:
                found.rebuilt.append(d)
            else:
                found.damaged[d] = f"RAM cache {d[:12]} does not match its RAM image"
        if repair:
            self.damaged_caches.clear()
        return found

    async def verify_artifacts(self, digests: dict[str, str], *, deep: bool) -> dict[str, str]:
        bad: dict[str, str] = {}
        for d, kind in digests.items():
            if d not in self.artifacts:
                bad[d] = f"{kind} {d[:12]} is missing"
            elif d in self.corrupt:
                bad[d] = f"{kind} {d[:12]} does not match its digest"
        return bad

    async def cached_bytes(self, digests: list[str]) -> int:
        """The fake's store is its cache: what it holds of ``digests`` (1 byte for a digest
        whose size no manifest gave)."""
        return sum(self.stored_sizes.get(d, 1) for d in set(digests) if d in self.artifacts)

    async def shutdown(self) -> None:
        """Server stop (not part of ``HostAPI``, as ``LocalHost.shutdown``): the VMs keep
        running, nothing follows their processes any more, and a later server (on another
        loop) may adopt them. Gates stay as they are."""
        for session_id, vm in self.vms.items():
            for handle in self.processes.for_session(session_id):
                await handle.cancel()
            self._drop_processes(session_id, vm)
        self._loop, self._gone = None, None

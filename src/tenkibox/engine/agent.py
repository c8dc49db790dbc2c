"""Host side of the guest agent channel (docs/agent-protocol.md), on asyncio.

One ``AgentClient`` owns one VM's agent socket (the QEMU chardev, ``server=on,wait=off``) and
multiplexes every request over it: a single reader task routes answers to waiting calls and
process events to their ``AgentProcess`` by id.

Connection loss fails the calls in flight with ``AgentError("agent connection lost")``; running
processes are kept, because the agent keeps their output and sends it to the next connection
(``connect()`` again). ``close()`` ends them for good.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..errors import InternalError, SessionFailedError, TenkiError, WaitTimeoutError
from .machine import Machine

CHUNK = 1 << 20  # the agent's limit per read_file/write_file/stdin request
LINE_LIMIT = 64 << 20
DEFAULT_TIMEOUT = 60.0
CONNECT_RETRY_S = 0.02
PING_INTERVAL_S = 1.0
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")


class AgentError(InternalError):
    """The agent answered with an error, did not answer, or the channel is down.

    ``errno`` is the guest's errno name ("ENOENT", "EACCES", ...) when the guest gave one.
    """

    def __init__(self, message: str, *, errno: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class AgentTimeoutError(AgentError, WaitTimeoutError):
    """No answer in time (also what ``connect()`` raises when the agent never answers)."""


class AgentProcess:
    """A process started by ``AgentClient.exec``; its events arrive in order, ending with exit."""

    def __init__(self, client: AgentClient, rid: int) -> None:
        self._client = client
        self.id = rid
        self.pid = 0
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Nobody may ever await the exit future; keep a failure from being reported as unretrieved.
        self._exit.add_done_callback(lambda f: f.cancelled() or f.exception())

    def __repr__(self) -> str:
        return f"<AgentProcess id={self.id} pid={self.pid} exited={self._exit.done()}>"

    @property
    def exited(self) -> bool:
        return self._exit.done() and not self._exit.cancelled() and not self._exit.exception()

    @property
    def exit_code(self) -> int | None:
        return int(self._exit.result()["exit_code"]) if self.exited else None

    @property
    def timed_out(self) -> bool:
        return bool(self._exit.result().get("timed_out")) if self.exited else False

    def _feed(self, msg: dict[str, Any]) -> None:
        kind = msg.get("event")
        if kind in ("stdout", "stderr"):
            try:
                data = base64.b64decode(msg.get("data") or "")
            except ValueError:
                return
            self._queue.put_nowait({"event": kind, "data": data})
        elif kind == "exit":
            event = {
                "event": "exit",
                "exit_code": int(msg.get("exit_code", -1)),
                "timed_out": bool(msg.get("timed_out")),
            }
            self._queue.put_nowait(event)
            if not self._exit.done():
                self._exit.set_result(event)

    def _fail(self, exc: BaseException) -> None:
        if not self._exit.done():
            self._queue.put_nowait(exc)
            self._exit.set_exception(exc)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """``{"event": "stdout"|"stderr", "data": bytes}`` ..., then
        ``{"event": "exit", "exit_code": int, "timed_out": bool}``. Consume it once."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item["event"] == "exit":
                return

    async def wait(self) -> int:
        """The exit code (124 on timeout, 128+S when killed by signal S)."""
        event = await asyncio.shield(self._exit)
        return int(event["exit_code"])

    async def write_stdin(self, data: bytes, *, timeout: float | None = None) -> None:
        view = memoryview(data)
        while view:
            chunk, view = view[:CHUNK], view[CHUNK:]
            await self._client._call(
                "stdin", timeout, target=self.id, data=base64.b64encode(chunk).decode())

    async def close_stdin(self, *, timeout: float | None = None) -> None:
        await self._client._call("stdin_close", timeout, target=self.id)

    async def kill(self, signal: int = 9, *, timeout: float | None = None) -> None:
        """Signal the process's group; a no-op once it has exited."""
        if self._exit.done():
            return
        try:
            await self._client._call("kill", timeout, target=self.id, signal=signal)
        except AgentError as e:
            # ESRCH: it exited meanwhile and its exit event is on its way.
            if e.errno != "ESRCH":
                raise


class AgentClient:
    def __init__(self, socket_path: Path, *, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = Path(socket_path)
        self.default_timeout = default_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._procs: dict[int, AgentProcess] = {}
        # Ids start at a random point: a restarted host must not reuse the ids of processes the
        # agent is still reporting on for its predecessor.
        self._ids = itertools.count(secrets.randbelow(1 << 40) + 1)

    def __repr__(self) -> str:
        return f"<AgentClient {self.socket_path} connected={self.connected}>"

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    # -- connection ------------------------------------------------------------------------

    async def connect(self, timeout: float) -> None:
        """Connect (waiting for the socket to appear) and return once a ping is answered.

        Raises ``AgentTimeoutError`` (a ``WaitTimeoutError``) after ``timeout`` seconds, or
        ``AgentError`` if the connection keeps being refused or dropped at the deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._drop("agent connection replaced")
        last_error: BaseException | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if last_error is not None and not isinstance(last_error, AgentTimeoutError):
                    raise AgentTimeoutError(
                        f"agent at {self.socket_path} not reachable within {timeout:g}s: "
                        f"{last_error}") from last_error
                raise AgentTimeoutError(f"agent did not answer within {timeout:g}s")
            if not self.connected:
                try:
                    await self._open()
                except OSError as e:  # not there yet, or QEMU not listening yet
                    last_error = e
                    await asyncio.sleep(min(CONNECT_RETRY_S, max(remaining, 0)))
                    continue
            try:
                # Unanswered pings queue up in the socket while the guest boots; the agent
                # answers them all once it runs, and any answer will do.
                await self.ping(timeout=min(PING_INTERVAL_S, remaining))
                return
            except AgentTimeoutError as e:
                last_error = e
            except AgentError as e:
                last_error = e
                await asyncio.sleep(min(CONNECT_RETRY_S, max(deadline - loop.time(), 0)))

    async def _open(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=LINE_LIMIT)
        self._reader, self._writer = reader, writer
        self._read_task = asyncio.create_task(self._read_loop(reader, writer))
        # Terminates whatever torn line a previous host left in the agent's buffer.
        writer.write(b"\n")
        await writer.drain()

    async def disconnect(self) -> None:
        """Drop the connection; processes stay known and resume on the next ``connect()``."""
        await self._drop("agent connection closed")

    async def close(self) -> None:
        """Drop the connection and end every process stream with ``AgentError``."""
        await self._drop("agent connection closed")
        procs, self._procs = self._procs, {}
        for proc in procs.values():
            proc._fail(AgentError("agent connection closed"))

    async def _drop(self, reason: str) -> None:
        task, writer = self._read_task, self._writer
        self._read_task, self._reader, self._writer = None, None, None
        self._fail_pending(reason)
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(AgentError(reason))

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the limit: skip it, the stream goes on
                    continue
                if not line or not line.endswith(b"\n"):
                    return
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue  # e.g. a torn line from before a reconnect
                if isinstance(msg, dict):
                    self._route(msg)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if self._writer is writer:
                self._reader, self._writer, self._read_task = None, None, None
                writer.close()
                self._fail_pending("agent connection lost")

    def _route(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if not isinstance(rid, int):
            return
        if "event" in msg:
            proc = self._procs.get(rid)
            if proc is not None:
                proc._feed(msg)
                if msg.get("event") == "exit":
                    self._procs.pop(rid, None)
            return
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    # -- requests --------------------------------------------------------------------------

    async def _call(self, op: str, timeout: float | None, *, rid: int | None = None,
                    **args: Any) -> dict[str, Any]:
        timeout = self.default_timeout if timeout is None else timeout
        writer = self._writer
        if writer is None or writer.is_closing():
            raise AgentError("agent not connected")
        rid = next(self._ids) if rid is None else rid
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        line = json.dumps({"id": rid, "op": op, **args}, separators=(",", ":")).encode() + b"\n"
        try:
            async with asyncio.timeout(timeout):
                try:
                    async with self._write_lock:
                        writer.write(line)
                        await writer.drain()
                except (OSError, ConnectionError) as e:
                    raise AgentError("agent connection lost") from e
                msg = await fut
        except TimeoutError:
            raise AgentTimeoutError(f"agent did not answer {op} within {timeout:g}s") from None
        finally:
            if self._pending.get(rid) is fut:
                del self._pending[rid]
        if not msg.get("ok"):
            errno = msg.get("errno")
            raise AgentError(f"{op} failed: {msg.get('error') or 'unknown error'}",
                             errno=errno if isinstance(errno, str) else None)
        return msg

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self._call("ping", timeout)
        return {k: msg.get(k) for k in ("boot_id", "pid", "uptime_s", "version")}

    async def exec(self, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_s: float | None = None, stdin: bool = False,
                   timeout: float | None = None) -> AgentProcess:
        """Start a process; ``timeout_s`` bounds the process (the agent kills its group, exit
        124), ``timeout`` bounds the wait for the agent's answer."""
        rid = next(self._ids)
        proc = AgentProcess(self, rid)
        # Registered before the request goes out: events can follow the answer immediately.
        self._procs[rid] = proc
        args: dict[str, Any] = {"argv": list(argv), "stdin": stdin}
        if env:
            args["env"] = env
        if cwd is not None:
            args["cwd"] = cwd
        if timeout_s is not None:
            args["timeout_s"] = timeout_s
        try:
            msg = await self._call("exec", timeout, rid=rid, **args)
        except BaseException:
            self._procs.pop(rid, None)
            raise
        proc.pid = int(msg.get("pid") or 0)
        return proc

    async def read_file(self, path: str, *, timeout: float | None = None) -> bytes:
        out = bytearray()
        while True:
            msg = await self._call("read_file", timeout, path=path, offset=len(out), length=CHUNK)
            out += base64.b64decode(msg.get("data") or "")
            if msg.get("eof") or not msg.get("data"):
                return bytes(out)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644, *,
                         timeout: float | None = None) -> int:
        """Write (replace) a file, creating parents; returns its size."""
        offset, size = 0, 0
        view = memoryview(data)
        while True:
            chunk = view[offset:offset + CHUNK]
            msg = await self._call(
                "write_file", timeout, path=path, data=base64.b64encode(chunk).decode(),
                offset=offset, truncate=offset == 0, mode=mode)
            size = int(msg.get("size", 0))
            offset += len(chunk)
            if offset >= len(data):
                return size

    async def set_time(self, epoch_ns: int | None = None, *, timeout: float | None = None) -> float:
        """Set the guest clock (default: the host's now); returns how far off it was (s)."""
        # The agent sets the clock on its reader thread, about a millisecond after this read.
        now = time.time_ns() if epoch_ns is None else epoch_ns
        msg = await self._call("set_time", timeout, epoch_ns=now)
        return float(msg.get("delta_s", 0.0))

    async def reidentify(self, hostname: str, machine_id: str, entropy: bytes, *,
                         timeout: float | None = None) -> None:
        if not _MACHINE_ID.match(machine_id):
            raise AgentError("machine_id must be 32 lowercase hex digits", errno="EINVAL")
        await self._call("reidentify", timeout, hostname=hostname, machine_id=machine_id,
                         entropy=base64.b64encode(entropy).decode())

    async def sync(self, *, timeout: float | None = None) -> None:
        await self._call("sync", timeout)

    async def mount(self, serial: str, path: str, read_only: bool, mkfs: bool, *,
                    timeout: float | None = None) -> str:
        """Mount the virtio disk with this serial at ``path``; returns the guest device."""
        msg = await self._call("mount", timeout, serial=serial, path=path, read_only=read_only,
                               mkfs=mkfs)
        return str(msg.get("device"))

    async def umount(self, path: str, *, timeout: float | None = None) -> None:
        await self._call("umount", timeout, path=path)


async def connect_agent(machine: Machine, agent: AgentClient, timeout: float) -> None:
    """Connect to a VM's agent, failing fast with QEMU's own words if QEMU dies meanwhile,
    and with the end of the serial console if the guest never answers."""
    task = asyncio.ensure_future(agent.connect(timeout))
    while not task.done():
        if not machine.alive():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise SessionFailedError(machine.exit_reason())
        await asyncio.wait({task}, timeout=0.1)
    try:
        task.result()
    except TenkiError as exc:
        tail = ""
        with contextlib.suppress(OSError):
            tail = machine.files.console.read_text(errors="replace")[-800:].strip()
        raise SessionFailedError(f"guest agent did not answer: {exc.message}"
                                 + (f"; console: {tail}" if tail else "")) from exc

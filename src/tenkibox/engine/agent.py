"""Host side of the guest agent channel (docs/agent-protocol.md), on asyncio.

One ``AgentClient`` owns one VM's agent socket (the QEMU chardev, ``server=on,wait=off``) and
multiplexes every request over it: a single reader task routes answers to waiting calls and
process events to their ``AgentProcess`` by id.

Connection loss fails the calls in flight with ``AgentError("agent connection lost")``; running
processes are kept, because the agent keeps their output and sends it to the next connection
(``connect()`` again). ``close()`` ends them for good.

Memory is bounded per request: files are read and written in chunks of at most ``CHUNK``
(``read_file_chunks``, ``write_file_chunks``), and process output is flow-controlled (the host
acknowledges what its consumer took; the agent stops reading a process's pipes while more than a
window is unacknowledged), so an ``AgentProcess`` holds at most about ``2 * window`` of output.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import (
    InternalError,
    SessionFailedError,
    TenkiError,
    ValidationError,
    WaitTimeoutError,
)
from .machine import Machine

CHUNK = 1 << 20  # the agent's limit per read_file/write_file/stdin request
READ_FILE_LIMIT = 16 << 20  # read_file() (whole file in memory) refuses larger files
# Flow control of process output (docs/agent-protocol.md): the window the host asks for, and how
# much consumed output is acknowledged at once (at most a quarter of the window).
CREDIT_WINDOW = 2 << 20
ACK_BATCH = 256 << 10
# Output an AgentProcess queues for its consumer. With flow control it stays below ~2 windows
# (the agent holds the rest); an agent without it (an old one, inside an old memory snapshot)
# sends as fast as the process writes, and output beyond this is dropped and reported as a
# ``{"event": "lost", "bytes": N}`` event, never silently.
QUEUE_LIMIT = 8 << 20
LINE_LIMIT = 64 << 20
DEFAULT_TIMEOUT = 60.0
CONNECT_RETRY_S = 0.02
PING_INTERVAL_S = 1.0
SETTLE_SINCE = (0, 4, 0)  # the first agent with the ``settle`` request
#: the first agent that starts its warm-up on a ``ping`` with ``warm`` (older ones ignore it)
WARM_PING_SINCE = (0, 5, 1)
#: the first agent that settles inside a ``ping`` (``ping_settle``; older ones ignore the field)
PING_SETTLE_SINCE = (0, 5, 2)
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


def _parse_version(raw: object) -> tuple[int, ...]:
    """``"0.3.0"`` -> ``(0, 3, 0)``; an agent too old to say, or garbage, is ``(0,)``."""
    try:
        return tuple(int(p) for p in str(raw or "0").split("."))
    except ValueError:
        return (0,)


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
    """A process started by ``AgentClient.exec``; its events arrive in order, ending with exit.

    Output is flow-controlled when the agent supports it (``window`` > 0): what the consumer of
    ``events()`` takes is acknowledged to the agent, and the agent does not read the process's
    pipes while more than ``window`` bytes are unacknowledged, so a process whose output nobody
    reads blocks on its pipe. Without it (an older agent), output beyond ``QUEUE_LIMIT`` queued
    bytes is dropped and reported in order as ``{"event": "lost", "bytes": N}``.
    """

    def __init__(self, client: AgentClient, rid: int) -> None:
        self._client = client
        self.id = rid
        self.pid = 0
        self.window = 0  # the agent's flow-control window; 0: the agent has none
        self.lost_bytes = 0  # output dropped at QUEUE_LIMIT (reported by "lost" events)
        self._items: collections.deque[dict[str, Any] | BaseException] = collections.deque()
        self._ready = asyncio.Event()
        self._queued = 0  # output bytes in _items
        self._unacked = 0  # output taken by the consumer (or dropped), not yet acknowledged
        self._reading = False
        self._exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Nobody may ever await the exit future; keep a failure from being reported as unretrieved.
        self._exit.add_done_callback(lambda f: f.cancelled() or f.exception())

    def __repr__(self) -> str:
        return (f"<AgentProcess id={self.id} pid={self.pid} window={self.window} "
                f"queued={self._queued} exited={self._exit.done()}>")

    @property
    def flow_control(self) -> bool:
        return self.window > 0

    @property
    def queued_bytes(self) -> int:
        """Output received from the agent that the consumer has not taken yet."""
        return self._queued

    @property
    def exited(self) -> bool:
        return self._exit.done() and not self._exit.cancelled() and not self._exit.exception()

    @property
    def exit_code(self) -> int | None:
        return int(self._exit.result()["exit_code"]) if self.exited else None

    @property
    def timed_out(self) -> bool:
        return bool(self._exit.result().get("timed_out")) if self.exited else False

    def _started(self, msg: dict[str, Any]) -> None:
        """The answer to the exec (routed here before ``exec()`` resumes, so before any event
        of this process is taken)."""
        if msg.get("ok"):
            self.pid = int(msg.get("pid") or 0)
            window = msg.get("window")
            if isinstance(window, int) and not isinstance(window, bool) and window > 0:
                self.window = window

    def _push(self, item: dict[str, Any] | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    def _feed(self, msg: dict[str, Any]) -> None:
        kind = msg.get("event")
        if kind in ("stdout", "stderr"):
            try:
                data = base64.b64decode(msg.get("data") or "")
            except ValueError:
                return
            if self._queued + len(data) > QUEUE_LIMIT:
                self._drop(len(data))
                return
            self._queued += len(data)
            self._push({"event": kind, "data": data})
        elif kind == "exit":
            event = {
                "event": "exit",
                "exit_code": int(msg.get("exit_code", -1)),
                "timed_out": bool(msg.get("timed_out")),
            }
            self._push(event)
            if not self._exit.done():
                self._exit.set_result(event)

    def _drop(self, nbytes: int) -> None:
        self.lost_bytes += nbytes
        last = self._items[-1] if self._items else None
        if isinstance(last, dict) and last.get("event") == "lost":
            last["bytes"] += nbytes
        else:
            self._push({"event": "lost", "bytes": nbytes})
        self._taken(nbytes)  # with flow control (a misbehaving agent): keep the window open

    def _taken(self, nbytes: int) -> None:
        if not self.window:
            return
        self._unacked += nbytes
        if self._unacked >= min(ACK_BATCH, max(self.window // 4, 1)):
            self._client._ack(self.id, self._unacked)
            self._unacked = 0

    def _fail(self, exc: BaseException) -> None:
        if not self._exit.done():
            self._push(exc)
            self._exit.set_exception(exc)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """``{"event": "stdout"|"stderr", "data": bytes}`` ..., then
        ``{"event": "exit", "exit_code": int, "timed_out": bool}``; raises ``AgentError`` when
        the process is lost (``AgentClient.close()``). Without flow control, output dropped at
        ``QUEUE_LIMIT`` appears in its place as ``{"event": "lost", "bytes": N}``.

        One consumer only. An event counts as consumed (and is acknowledged to the agent, in
        batches) when it is handed to the consumer; stop taking events and the process is held.
        """
        if self._reading:
            raise AgentError(f"the events of process {self.id} are already being read")
        self._reading = True
        while True:
            while not self._items:
                self._ready.clear()
                await self._ready.wait()
            item = self._items.popleft()
            if isinstance(item, BaseException):
                raise item
            kind = item["event"]
            if kind in ("stdout", "stderr"):
                self._queued -= len(item["data"])
                self._taken(len(item["data"]))
            yield item
            if kind == "exit":
                return

    async def wait(self) -> int:
        """The exit code (124 on timeout, 128+S when killed by signal S).

        If nobody reads ``events()``, this reads and discards the output (so that flow control
        does not hold the process); to keep the output, read ``events()`` instead, or use
        ``wait_exit()``, which does not read it.
        """
        if not self._reading:
            async for _ in self.events():
                pass
        event = await asyncio.shield(self._exit)
        return int(event["exit_code"])

    async def wait_exit(self) -> dict[str, Any]:
        """``{"event": "exit", "exit_code": int, "timed_out": bool}`` once the agent reported
        the exit (which it does after the last output was sent, so a process whose unread output
        exceeds the flow-control window has not exited yet). Does not touch the output; raises
        ``AgentError`` if the process is lost."""
        return dict(await asyncio.shield(self._exit))

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
        self._background: set[asyncio.Task[Any]] = set()
        self._version: tuple[int, ...] | None = None  # the agent's, once asked (ping)
        self._held_acks: dict[int, int] | None = None  # inside ``quiet()``
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
                pong = await self.ping(timeout=min(PING_INTERVAL_S, remaining))
                # The ping says which agent answers: version() needs no request of its own
                # later (the first exec as another user would otherwise pay one).
                self._version = _parse_version(pong.get("version"))
                return
            except AgentTimeoutError as e:
                last_error = e
            except AgentError as e:
                last_error = e
                await asyncio.sleep(min(CONNECT_RETRY_S, max(deadline - loop.time(), 0)))

    async def open(self, timeout: float) -> None:
        """Connect, waiting for the socket to appear, with no request: for a restored guest,
        whose agent runs already and is asked once the guest does (``ping_settle``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._drop("agent connection replaced")
        while True:
            try:
                await self._open()
                return
            except OSError as e:  # not there yet, or QEMU not listening yet
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AgentTimeoutError(f"agent at {self.socket_path} not reachable within "
                                            f"{timeout:g}s: {e}") from e
                await asyncio.sleep(min(CONNECT_RETRY_S, remaining))

    async def _open(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=LINE_LIMIT)
        self._reader, self._writer = reader, writer
        self._read_task = asyncio.create_task(self._read_loop(reader, writer))
        # The first newline ends whatever torn line a previous host left in the agent's buffer;
        # the empty line then tells the agent that a new host starts (docs/agent-protocol.md).
        writer.write(b"\n\n")
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
            elif msg.get("event") in ("stdout", "stderr"):
                # Nobody here wants it (a process of a previous host, e.g. one running since
                # before a snapshot): acknowledge it so that flow control does not hold it.
                data = msg.get("data")
                if isinstance(data, str) and data:
                    self._ack(rid, len(data) * 3 // 4 - data[-2:].count("="))
            return
        proc = self._procs.get(rid)
        if proc is not None:
            proc._started(msg)
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _ack(self, target: int, nbytes: int) -> None:
        """Fire and forget (the agent does not answer acks); dropped when not connected, as the
        agent forgives what was in flight when a host goes."""
        if self._held_acks is not None and nbytes > 0:
            self._held_acks[target] = self._held_acks.get(target, 0) + nbytes
            return
        writer = self._writer
        if writer is None or writer.is_closing() or nbytes <= 0:
            return
        # One whole line per write() call: it cannot interleave with a request's line.
        writer.write(json.dumps({"id": 0, "op": "ack", "target": target, "bytes": nbytes},
                                separators=(",", ":")).encode() + b"\n")

    @contextlib.asynccontextmanager
    async def quiet(self, drain_s: float = 1.0) -> AsyncIterator[None]:
        """Nothing is sent to the agent inside: requests wait for the way out, and output
        acknowledgements are added up and sent then. What was written before is handed to
        the socket first (for up to ``drain_s``). For a capture that copies the guest's memory
        while its vCPUs are stopped: QEMU still moves what the socket holds into the guest's
        buffers then, which changes the memory under the copy."""
        async with self._write_lock:
            self._held_acks = {}
            try:
                writer = self._writer
                if writer is not None and not writer.is_closing():
                    deadline = time.monotonic() + drain_s
                    while (writer.transport.get_write_buffer_size()
                           and time.monotonic() < deadline):
                        await asyncio.sleep(0.001)
                yield
            finally:
                held, self._held_acks = self._held_acks, None
                for target, nbytes in held.items():
                    self._ack(target, nbytes)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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

    async def version(self) -> tuple[int, ...]:
        """The agent's version (asked once: a connection is to one agent; a restored guest's
        agent is the one of its snapshot, which may be older than the image's)."""
        if self._version is None:
            self._version = _parse_version((await self.ping()).get("version"))
        return self._version

    async def exec(self, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_s: float | None = None, stdin: bool = False,
                   timeout: float | None = None, flow_control: bool = True,
                   user: int | None = None) -> AgentProcess:
        """Start a process; ``timeout_s`` bounds the process (the agent kills its group, exit
        124), ``timeout`` bounds the wait for the agent's answer. ``user``: the uid it runs as
        (agents from 0.3.0; an older one would ignore it: ask ``version()`` first).

        Read its output with ``events()`` (or let ``wait()`` discard it): with flow control
        (asked for unless ``flow_control`` is False; ``proc.window`` says whether the agent
        agreed) the process blocks on its pipe while its unread output exceeds the window."""
        rid = next(self._ids)
        proc = AgentProcess(self, rid)
        # Registered before the request goes out: events can follow the answer immediately.
        self._procs[rid] = proc
        # ``credit``: flow control (an older agent ignores it and answers without a window).
        args: dict[str, Any] = {"argv": list(argv), "stdin": stdin}
        if flow_control:
            args.update(credit=True, window=CREDIT_WINDOW)
        if env:
            args["env"] = env
        if cwd is not None:
            args["cwd"] = cwd
        if timeout_s is not None:
            args["timeout_s"] = timeout_s
        if user is not None:
            args["user"] = user
        try:
            msg = await self._call("exec", timeout, rid=rid, **args)
        except BaseException:
            self._procs.pop(rid, None)
            raise
        proc._started(msg)
        return proc

    async def read_file_chunks(self, path: str, *, chunk: int = CHUNK,
                               timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        """The file's content in non-empty chunks of at most ``chunk`` bytes (capped at
        ``CHUNK``); an empty file yields nothing.

        One request per chunk, the next one only when the consumer asks for it: stop iterating
        (or close the iterator) and reading stops. Files without a size (/proc, character
        devices) are read until a short read, so /dev/zero never ends. Errors (``AgentError``
        with ``errno``: ENOENT, EISDIR, ...) are raised where they happen, the first one by the
        first ``__anext__`` (``read_file_stream`` raises it before returning the iterator)."""
        async for data, _size in self._read_chunks(path, chunk, timeout):
            yield data

    async def _read_chunks(self, path: str, chunk: int,
                           timeout: float | None) -> AsyncGenerator[tuple[bytes, int], None]:
        chunk = max(1, min(chunk, CHUNK))
        offset = 0
        while True:
            msg = await self._call("read_file", timeout, path=path, offset=offset, length=chunk)
            data = base64.b64decode(msg.get("data") or "")
            eof = bool(msg.get("eof"))
            size = int(msg.get("size") or 0)
            del msg
            if data:
                offset += len(data)
                yield data, size
            if eof or not data:
                return

    async def read_file_stream(self, path: str, *, chunk: int = CHUNK,
                               timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        """``read_file_chunks`` with the first chunk already read, so that a missing file or a
        directory raises here, before an HTTP response has started. Close the iterator (or
        iterate it to the end) when done."""
        chunks = self.read_file_chunks(path, chunk=chunk, timeout=timeout)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""

        async def stream() -> AsyncGenerator[bytes, None]:
            try:
                if first:
                    yield first
                async for data in chunks:
                    yield data
            finally:
                await chunks.aclose()

        return stream()

    async def read_file(self, path: str, *, max_bytes: int = READ_FILE_LIMIT,
                        timeout: float | None = None) -> bytes:
        """The whole file, for small files: over ``max_bytes`` raises ``ValidationError``
        (field ``path``) without reading further; stream bigger ones with
        ``read_file_chunks``."""
        out = bytearray()
        chunks = self._read_chunks(path, CHUNK, timeout)
        try:
            async for data, size in chunks:
                if size > max_bytes or len(out) + len(data) > max_bytes:
                    raise ValidationError(
                        f"file larger than {max_bytes} bytes; use a stream", field="path")
                out += data
        finally:
            await chunks.aclose()
        return bytes(out)

    async def write_file_chunks(self, path: str, chunks: AsyncIterable[bytes],
                                mode: int = 0o644, *, timeout: float | None = None) -> int:
        """Write (replace) a file from ``chunks``, creating parents; returns its size.

        The data goes to a temporary file beside the destination (``.NAME.tenki-XXXX.part``),
        which is renamed into place once ``chunks`` ended: readers see the old file or the new
        one, and a failed or aborted upload (an exception from ``chunks``, cancellation, a lost
        agent) leaves the destination as it was and the temporary file removed (best effort:
        not if the agent is gone). A symlink at ``path`` is followed: the file it points to is
        replaced (a new file: new inode, owner root, mode ``mode``). Chunks are coalesced or
        split to ``CHUNK`` per request; at most about one ``CHUNK`` is held. Devices, FIFOs and
        files under /proc, /sys and /dev are written in place (no temporary file can be made
        there), and so is everything by an older agent without temporary files."""
        state: dict[str, Any] = {"first": True, "offset": 0, "size": 0, "tmp": None,
                                 "target": path}

        async def put(data: bytes | bytearray | memoryview) -> None:
            b64 = base64.b64encode(data).decode()
            if state["first"]:
                msg = await self._call("write_file", timeout, path=path, data=b64, offset=0,
                                       truncate=True, mode=mode, tmp=True)
                state["first"] = False
                if isinstance(msg.get("tmp"), str):
                    state["tmp"] = msg["tmp"]
                    state["target"] = str(msg.get("target") or path)
            else:
                msg = await self._call("write_file", timeout, path=state["tmp"] or path,
                                       data=b64, offset=state["offset"], truncate=False,
                                       mode=mode)
            state["offset"] += len(data)
            state["size"] = int(msg.get("size", 0))

        try:
            buf = bytearray()
            async for piece in chunks:
                view = memoryview(piece).cast("B")
                while view:
                    if not buf and len(view) >= CHUNK:
                        await put(view[:CHUNK])
                        view = view[CHUNK:]
                        continue
                    take = CHUNK - len(buf)
                    buf += view[:take]
                    view = view[take:]
                    if len(buf) >= CHUNK:
                        await put(buf)
                        buf.clear()
            if buf or state["first"]:
                await put(buf)
            if state["tmp"] is None:
                return int(state["size"])
            msg = await self._call("rename", timeout, src=state["tmp"], dst=state["target"])
            state["tmp"] = None
            return int(msg.get("size", state["offset"]))
        except BaseException:
            if state["tmp"] is not None:
                # Not awaited: this may be a cancellation (the client went away).
                self._spawn(self._remove_quietly(state["tmp"]))
            raise

    async def _remove_quietly(self, path: str) -> None:
        with contextlib.suppress(AgentError):
            await self._call("remove", 10.0, path=path)

    async def remove(self, path: str, *, timeout: float | None = None) -> bool:
        """Remove a file (not a directory); False if it did not exist."""
        msg = await self._call("remove", timeout, path=path)
        return bool(msg.get("existed"))

    async def write_file(self, path: str, data: bytes, mode: int = 0o644, *,
                         timeout: float | None = None) -> int:
        """Write (replace) a file, creating parents; returns its size (``write_file_chunks``
        with one chunk)."""

        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.write_file_chunks(path, one(), mode, timeout=timeout)

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

    async def settle(self, identity: tuple[str, str, bytes] | None,
                     epoch_ns: int | None = None, *, warm: bool = True,
                     timeout: float | None = None) -> dict[str, float]:
        """A restored clone's clock (default: the host's now) and, unless ``identity`` is None,
        its ``(hostname, machine_id, entropy)``, in one request (agents from ``SETTLE_SINCE``;
        ask ``version()`` first, older ones have only ``set_time`` and ``reidentify``).
        ``warm``: whether the guest warms its exec path meanwhile (its warm-up, agents from
        0.4.1; older ones ignore the field and always do; from ``WARM_PING_SINCE`` the ping
        starts it instead).
        Returns ``delta_s`` (how far the clock was off) and ``took_s`` (the agent's own time;
        the rest of the round trip is the channel's)."""
        msg = await self._call("settle", timeout, warm=warm, **_settle_args(identity, epoch_ns))
        return {"delta_s": float(msg.get("delta_s", 0.0)),
                "took_s": float(msg.get("took_s", 0.0))}

    async def ping_settle(self, identity: tuple[str, str, bytes] | None, *, warm: bool,
                          timeout: float | None = None) -> dict[str, float] | None:
        """A restored clone's first request: a ``ping`` that carries the ``settle`` (clock
        now, and ``identity`` as ``settle``'s) and, with ``warm``, the start of the guest's
        warm-up (agents from ``WARM_PING_SINCE``; older ones ignore it). An agent from
        ``PING_SETTLE_SINCE`` settles in it: returns ``settle``'s answer, and ``behind_s``: how
        far the guest's clock, as it answered, was behind the host's when the answer came (the
        time the request waited to be read, plus the way back). An older one answers the ping
        only (None): its settle is still to do, as after ``connect``. Either way the agent's
        version is known after it."""
        args: dict[str, Any] = {"settle": _settle_args(identity, None)}
        if warm:
            args["warm"] = True
        msg = await self._call("ping", timeout, **args)
        received = time.time_ns()
        self._version = _parse_version(msg.get("version"))
        if not msg.get("settled"):
            return None
        clock = msg.get("clock_ns")
        return {"delta_s": float(msg.get("delta_s", 0.0)),
                "took_s": float(msg.get("took_s", 0.0)),
                "behind_s": (received - clock) / 1e9 if isinstance(clock, int) else 0.0}

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


def _settle_args(identity: tuple[str, str, bytes] | None,
                 epoch_ns: int | None) -> dict[str, Any]:
    """A settle's fields: ``epoch_ns`` (default: the host's now, taken last) and the identity."""
    args: dict[str, Any] = {}
    if identity is not None:
        hostname, machine_id, entropy = identity
        if not _MACHINE_ID.match(machine_id):
            raise AgentError("machine_id must be 32 lowercase hex digits", errno="EINVAL")
        args.update(hostname=hostname, machine_id=machine_id,
                    entropy=base64.b64encode(entropy).decode())
    args["epoch_ns"] = time.time_ns() if epoch_ns is None else epoch_ns
    return args


async def connect_agent(machine: Machine, agent: AgentClient, timeout: float) -> None:
    """Connect to a VM's agent (``guest_answer``)."""
    await guest_answer(machine, agent.connect(timeout))


async def guest_answer(machine: Machine, request: Awaitable[T]) -> T:
    """``request`` to the VM's agent (or the wait for its socket), failing fast with QEMU's
    own words if QEMU dies meanwhile, and with the end of the serial console and where the
    vCPUs are if the guest never answers."""
    task = asyncio.ensure_future(request)
    while not task.done():
        if not machine.alive():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise SessionFailedError(machine.exit_reason())
        await asyncio.wait({task}, timeout=0.1)
    try:
        return task.result()
    except TenkiError as exc:
        tail = ""
        with contextlib.suppress(OSError):
            tail = machine.files.console.read_text(errors="replace")[-800:].strip()
        state = await machine.vcpu_report()
        raise SessionFailedError(f"guest agent did not answer: {exc.message}"
                                 + (f"; console: {tail}" if tail else "; the console is empty")
                                 + (f"; {state}" if state else "")) from exc

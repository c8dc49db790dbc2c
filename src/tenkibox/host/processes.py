"""Processes started in a session, with their output held (bounded) for the one reader of it.

A ``ProcessHandle`` pulls a process's events from the agent (``AgentProcess.events()``) into a
buffer of at most ``BUFFER_BYTES`` (plus one event). When the buffer is full it stops pulling:
the agent's flow-control credits are then not returned and the process blocks on its pipe in
the guest, as a writer does whose reader is slow. Nothing is dropped silently:

- Output has exactly one reader: ``stream()``, the event stream of ``GET .../events``. It can be
  opened after ``POST .../processes`` returned and gets every byte from the start (what the
  process wrote meanwhile is held, bounded, and the process waits for the reader past that).
  A second ``stream()`` while one is active, or once the output was delivered, raises
  ``ConflictError``; a reader that leaves before the end leaves the rest of the output to be
  discarded (the process goes on, its output counted in ``discarded_bytes``).
- If the agent connection is lost (the session ends), the stream ends, after everything received
  until then, with an ``error`` event saying how many bytes were delivered and that the rest is
  lost.
- An agent without flow control (an old one, inside an old memory snapshot) sends output as fast
  as the process writes it; ``AgentProcess`` drops what goes beyond its queue limit and reports
  it (a ``lost`` event). The stream then delivers the output up to the first gap and ends with an
  ``error`` event (instead of ``exit``) saying exactly how many bytes were lost, with the exit
  code.

``stream()`` yields ``host.api.ProcessEvent``: ``stdout``/``stderr`` with the bytes, then one
``exit`` (``exit_code``, ``timed_out``) or ``error`` (``message``, ``delivered_bytes``,
``lost_bytes`` and, when known, ``exit_code``, ``timed_out``).

The process's end is known without reading its output: ``wait_exit()`` / ``exit_future``
(``done`` is true once it resolved). A process whose unread output exceeds the buffers (this
handle's plus the agent's window, ~4 MiB) is blocked on its pipe until the output is read, so
it has not exited yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, Protocol

from ..errors import ConflictError, InternalError
from ..ids import new_id
from .api import ProcessEvent

BUFFER_BYTES = 2 << 20
KEEP_FINISHED_S = 600.0


class AgentProcessLike(Protocol):
    """What a handle needs of ``engine.agent.AgentProcess`` (and what the routes use)."""

    pid: int

    def events(self) -> AsyncIterator[dict[str, Any]]: ...

    async def wait_exit(self) -> dict[str, Any]: ...

    async def write_stdin(self, data: bytes, *, timeout: float | None = None) -> None: ...

    async def close_stdin(self, *, timeout: float | None = None) -> None: ...

    async def kill(self, signal: int = 9, *, timeout: float | None = None) -> None: ...


class ProcessLostError(InternalError):
    """The process's end is unknown: the agent connection was lost or the handle cancelled."""


class ProcessHandle:
    def __init__(self, session_id: str, agent_proc: AgentProcessLike, *,
                 buffer_bytes: int = BUFFER_BYTES) -> None:
        self.id = new_id("process")
        self.session_id = session_id
        self.agent_proc = agent_proc
        self.pid: int | None = getattr(agent_proc, "pid", None)
        self.buffer_bytes = buffer_bytes
        self.finished_at: float | None = None  # monotonic time the exit (or loss) became known
        self.received_bytes = 0  # output taken from the agent
        self.delivered_bytes = 0  # output handed to the reader
        self.discarded_bytes = 0  # output nobody could read (the reader left early)
        self.lost_bytes = 0  # output lost before it reached this handle (old agent), or after
        self.exit_future: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self.exit_future.add_done_callback(self._exited)
        self._buf: collections.deque[tuple[Literal["stdout", "stderr"], bytes]] = (
            collections.deque())
        self._buffered = 0
        self._end: dict[str, Any] | None = None  # the pump's last word, delivered after _buf
        self._gap = False  # output was lost: deliver the prefix only, then the error
        self._reader = "none"  # none | active | done | gone
        self._data = asyncio.Event()  # set: _buf or _end changed (for the reader)
        self._room = asyncio.Event()  # set: the reader took something (for the pump)
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return (f"<ProcessHandle {self.id} pid={self.pid} buffered={self._buffered} "
                f"reader={self._reader} done={self.done}>")

    # -- state ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """The process exited (or was lost); its output may still be waiting for the reader."""
        return self.exit_future.done()

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def exit_code(self) -> int | None:
        fut = self.exit_future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            return int(fut.result()["exit_code"])
        return None

    async def wait_exit(self) -> dict[str, Any]:
        """``{"exit_code": int, "timed_out": bool}`` once the process exited, whether or not
        its output was read; raises ``ProcessLostError`` if that cannot be known any more (the
        agent connection was lost, the handle cancelled)."""
        return dict(await asyncio.shield(self.exit_future))

    def _exited(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        self.finished_at = time.monotonic()
        if not fut.cancelled():
            fut.exception()  # retrieved: nobody has to await it

    def _set_exit(self, exit_code: int, timed_out: bool) -> None:
        if not self.exit_future.done():
            self.exit_future.set_result({"exit_code": exit_code, "timed_out": timed_out})

    def _set_lost(self, message: str) -> None:
        if not self.exit_future.done():
            self.exit_future.set_exception(ProcessLostError(message))

    # -- pulling from the agent -------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pump(), name=f"pump {self.id}"),
            asyncio.create_task(self._watch_exit(), name=f"exit {self.id}"),
        ]

    async def _watch_exit(self) -> None:
        # The agent's exit event may wait in its queue behind unread output: learn it directly.
        try:
            ev = await self.agent_proc.wait_exit()
        except Exception as exc:
            self._set_lost(f"process lost: {exc}")
        else:
            self._set_exit(int(ev.get("exit_code", -1)), bool(ev.get("timed_out")))

    async def _pump(self) -> None:
        events = self.agent_proc.events()
        try:
            while True:
                # Pull only with room: a full buffer holds the agent's credits back.
                while self._buffered >= self.buffer_bytes and self._reader != "gone":
                    self._room.clear()
                    await self._room.wait()
                try:
                    ev = await anext(events)
                except StopAsyncIteration:
                    self._finish({"type": "error", "reason": "the agent ended the process's "
                                  "event stream without an exit"})
                    self._set_lost("the process's event stream ended without an exit")
                    return
                kind = ev.get("event")
                if kind in ("stdout", "stderr"):
                    data: bytes = ev.get("data") or b""
                    self.received_bytes += len(data)
                    if self._gap:
                        self.lost_bytes += len(data)
                    elif self._reader == "gone":
                        self.discarded_bytes += len(data)
                    elif data:
                        self._buf.append((kind, data))
                        self._buffered += len(data)
                        self._data.set()
                elif kind == "lost":
                    self.lost_bytes += int(ev.get("bytes") or 0)
                    self._gap = True
                elif kind == "exit":
                    code, timed_out = int(ev.get("exit_code", -1)), bool(ev.get("timed_out"))
                    self._set_exit(code, timed_out)
                    if self.lost_bytes:
                        self._finish({"type": "error", "reason": "lost", "exit_code": code,
                                      "timed_out": timed_out})
                    else:
                        self._finish({"type": "exit", "exit_code": code, "timed_out": timed_out})
                    return
        except asyncio.CancelledError:
            self._finish({"type": "error", "reason": "the process's output is no longer "
                          "available (its session ended)"})
            self._set_lost("process handle cancelled")
            raise
        except Exception as exc:  # the agent connection is gone: say so in the stream
            self._finish({"type": "error", "reason": f"process lost: {exc}"})
            self._set_lost(f"process lost: {exc}")
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()

    def _finish(self, end: dict[str, Any]) -> None:
        if self._end is None:
            self._end = end
            self._data.set()

    # -- the reader -------------------------------------------------------------------------

    def stream(self) -> AsyncGenerator[ProcessEvent, None]:
        """The process's events, from its first byte, for the one reader there may be.

        Raises ``ConflictError`` here (not at the first iteration, so that a route can answer
        409 before it starts a response) when another reader is active or was. Close the
        returned generator (or iterate it to the end); one left after taking nothing lets the
        next reader in."""
        if self._reader == "active":
            raise ConflictError(f"process {self.id}: its output is already being read by "
                                "another client (a process's output can be read once)")
        if self._reader in ("done", "gone"):
            what = ("was already read to the end" if self._reader == "done" else
                    f"was already partly read by another client ({self.delivered_bytes} bytes)")
            raise ConflictError(f"process {self.id}: its output {what} and cannot be read "
                                "again")
        self._reader = "active"
        return self._stream()

    async def _stream(self) -> AsyncGenerator[ProcessEvent, None]:
        took, finished = False, False
        try:
            while True:
                if self._buf:
                    kind, data = self._buf.popleft()
                    self._buffered -= len(data)
                    self.delivered_bytes += len(data)
                    self._room.set()
                    took = True
                    yield ProcessEvent(kind, data)
                    continue
                if self._end is not None:
                    took = True
                    yield self._terminal(self._end)
                    finished = True
                    return
                self._data.clear()
                await self._data.wait()
        finally:
            if finished:
                self._reader = "done"
            elif not took:
                self._reader = "none"
            else:
                # Nobody can read the rest: discard it rather than hold the process forever.
                self._reader = "gone"
                self.discarded_bytes += self._buffered
                self._buf.clear()
                self._buffered = 0
                self._room.set()

    def _terminal(self, end: dict[str, Any]) -> ProcessEvent:
        if end["type"] == "exit":
            return ProcessEvent("exit", exit_code=end["exit_code"], timed_out=end["timed_out"])
        delivered = self.delivered_bytes
        if end["reason"] == "lost":
            code = end["exit_code"]
            return ProcessEvent(
                "error",
                message=(f"{self.lost_bytes} bytes of output were lost: the guest agent has "
                         "no flow control (an older agent) and the output was not read fast "
                         f"enough; {delivered} bytes were delivered before the loss; the "
                         f"process exited with code {code}"),
                delivered_bytes=delivered, lost_bytes=self.lost_bytes, exit_code=code,
                timed_out=end["timed_out"])
        message = (f"{end['reason']}; {delivered} bytes of output were delivered, any output "
                   "after that is lost")
        if self.lost_bytes:
            message += f" (and {self.lost_bytes} bytes were lost before)"
        return ProcessEvent("error", message=message, delivered_bytes=delivered,
                            lost_bytes=self.lost_bytes)

    # -- ending -----------------------------------------------------------------------------

    def _cancel_tasks(self) -> list[asyncio.Task[None]]:
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if not self.exit_future.done():
            self._set_lost("process handle cancelled")
        self._finish({"type": "error", "reason": "the process's output is no longer available "
                      "(its session ended)"})
        return tasks

    async def cancel(self) -> None:
        """Stop following the process (it is not killed). A reader gets what was buffered,
        then an ``error`` event."""
        for t in self._cancel_tasks():
            with contextlib.suppress(BaseException):
                await t


class ProcessTable:
    def __init__(self) -> None:
        self._procs: dict[str, ProcessHandle] = {}

    def add(self, handle: ProcessHandle) -> None:
        self._prune()
        self._procs[handle.id] = handle

    def get(self, process_id: str) -> ProcessHandle | None:
        return self._procs.get(process_id)

    def running(self, session_id: str) -> int:
        return sum(1 for p in self._procs.values() if p.session_id == session_id and not p.done)

    def for_session(self, session_id: str) -> list[ProcessHandle]:
        return [p for p in self._procs.values() if p.session_id == session_id]

    def drop_session(self, session_id: str) -> None:
        for pid in [k for k, p in self._procs.items() if p.session_id == session_id]:
            self._procs.pop(pid)._cancel_tasks()

    def _prune(self) -> None:
        # Finished long ago: whatever output was not read by now goes with the handle.
        now = time.monotonic()
        for pid in [k for k, p in self._procs.items()
                    if p.finished_at and now - p.finished_at > KEEP_FINISHED_S]:
            self._procs.pop(pid)._cancel_tasks()

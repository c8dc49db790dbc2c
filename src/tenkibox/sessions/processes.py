"""Processes started in a session, with their output kept for whoever reads it.

The agent streams a process's output once; the server keeps it (bounded) so that a client can
open the event stream after ``POST processes`` returned, and read it again, without losing a byte.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from ..ids import new_id

MAX_BUFFERED_BYTES = 64 << 20
KEEP_FINISHED_S = 600.0


class ProcessHandle:
    def __init__(self, session_id: str, agent_proc: Any) -> None:
        self.id = new_id("process")
        self.session_id = session_id
        self.agent_proc = agent_proc
        self.pid: int | None = getattr(agent_proc, "pid", None)
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.finished_at: float | None = None
        self._buffered = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"pump {self.id}")

    async def _pump(self) -> None:
        try:
            async for ev in self.agent_proc.events():
                kind = ev.get("event")
                if kind in ("stdout", "stderr"):
                    data: bytes = ev.get("data", b"")
                    self._buffered += len(data)
                    if self._buffered > MAX_BUFFERED_BYTES:
                        continue  # the reader is far behind; drop rather than exhaust memory
                    await self._add({"type": kind, "data": base64.b64encode(data).decode()})
                elif kind == "exit":
                    await self._add({"type": "exit", "exit_code": ev.get("exit_code"),
                                     "timed_out": bool(ev.get("timed_out"))})
                    break
        except Exception as exc:  # the agent connection died: say so in the stream
            await self._add({"type": "error", "message": f"process lost: {exc}"})
        finally:
            self.done = True
            self.finished_at = time.monotonic()
            async with self._changed:
                self._changed.notify_all()

    async def _add(self, event: dict[str, Any]) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        i = 0
        while True:
            async with self._changed:
                while i >= len(self.events) and not self.done:
                    await self._changed.wait()
                batch = self.events[i:]
            for ev in batch:
                yield ev
            i += len(batch)
            if self.done and i >= len(self.events):
                return

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


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
            del self._procs[pid]

    def _prune(self) -> None:
        now = time.monotonic()
        for pid in [k for k, p in self._procs.items()
                    if p.finished_at and now - p.finished_at > KEEP_FINISHED_S]:
            del self._procs[pid]

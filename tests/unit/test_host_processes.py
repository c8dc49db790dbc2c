"""ProcessHandle / ProcessTable: bounded output buffering with one reader, against a fake agent
process (and once against the real agent over a unix socket, for the flow control end to end)."""

from __future__ import annotations

import asyncio
import base64
import shutil
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import pyagent as guest

from tenkibox.engine.agent import AgentClient, AgentError
from tenkibox.errors import ConflictError
from tenkibox.host.api import ProcessEvent
from tenkibox.host.processes import (
    BUFFER_BYTES,
    ProcessHandle,
    ProcessLostError,
    ProcessTable,
)


class FakeAgentProc:
    """Produces output as fast as it is pulled (a producer that never waits), counting what it
    handed out; its exit is known to ``wait_exit`` as soon as ``exit()`` is called, like the
    agent's exit event that arrives while output is still queued."""

    def __init__(self, output: Iterable[tuple[str, bytes] | dict[str, Any]], *,
                 exit_code: int = 0, fail: BaseException | None = None,
                 exit_early: bool = False) -> None:
        self.pid = 4242
        self.output = output
        self.exit_code = exit_code
        self.fail = fail
        self.taken = 0  # output bytes handed to the consumer of events()
        self.finished = False  # all output handed out
        self._exit: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._exit.add_done_callback(lambda f: f.cancelled() or f.exception())
        if exit_early:
            self.exit()

    def exit(self) -> None:
        if not self._exit.done():
            self._exit.set_result({"event": "exit", "exit_code": self.exit_code,
                                   "timed_out": False})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        for item in self.output:
            if isinstance(item, dict):
                yield item
                continue
            kind, data = item
            self.taken += len(data)
            yield {"event": kind, "data": data}
        self.finished = True
        if self.fail is not None:
            if not self._exit.done():
                self._exit.set_exception(self.fail)
            raise self.fail
        self.exit()
        yield {"event": "exit", "exit_code": self.exit_code, "timed_out": False}

    async def wait_exit(self) -> dict[str, Any]:
        return dict(await asyncio.shield(self._exit))

    async def write_stdin(self, data: bytes, *, timeout: float | None = None) -> None:
        pass

    async def close_stdin(self, *, timeout: float | None = None) -> None:
        pass

    async def kill(self, signal: int = 9, *, timeout: float | None = None) -> None:
        pass


def numbered(count: int, size: int) -> Iterator[tuple[str, bytes]]:
    """``count`` chunks of ``size`` bytes, each starting with its number; every third on
    stderr."""
    filler = b"\xab" * (size - 8)
    for i in range(count):
        yield ("stderr" if i % 3 == 2 else "stdout"), struct.pack(">Q", i) + filler


async def drain(handle: ProcessHandle) -> tuple[bytes, ProcessEvent]:
    out = bytearray()
    async for ev in handle.stream():
        if ev.type in ("stdout", "stderr"):
            out += ev.data
        else:
            return bytes(out), ev
    raise AssertionError("stream ended without a final event")


async def settle(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def test_500mb_through_a_slow_reader_stays_bounded_and_in_order() -> None:
    size = 256 << 10
    count = (500 << 20) // size
    fake = FakeAgentProc(numbered(count, size))
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    bound = BUFFER_BYTES + size  # the buffer, plus the one event pulled while below it
    expect, delivered, peak = 0, 0, 0
    async for ev in handle.stream():
        held = fake.taken - handle.delivered_bytes
        assert handle.buffered_bytes == held <= bound
        peak = max(peak, held)
        if ev.type == "exit":
            assert ev == ProcessEvent("exit", exit_code=0, timed_out=False)
            break
        seq = struct.unpack(">Q", ev.data[:8])[0]
        assert seq == expect
        assert ev.type == ("stderr" if seq % 3 == 2 else "stdout")
        expect += 1
        delivered += len(ev.data)
        if expect % 16 == 0:
            await asyncio.sleep(0.001)  # slower than the producer
    else:
        raise AssertionError("no exit event")
    assert expect == count
    assert delivered == handle.delivered_bytes == fake.taken == count * size
    assert peak >= BUFFER_BYTES - size  # the producer really was ahead (the buffer was full)
    assert handle.done and handle.exit_code == 0


async def test_full_buffer_stops_pulling() -> None:
    size = 64 << 10
    fake = FakeAgentProc(numbered(200, size))
    handle = ProcessHandle("ses_x", fake, buffer_bytes=1 << 20)
    handle.start()
    await settle(lambda: handle.buffered_bytes >= 1 << 20)
    await asyncio.sleep(0.05)
    assert fake.taken == handle.buffered_bytes <= (1 << 20) + size
    assert not fake.finished and not handle.done
    out, ev = await drain(handle)
    assert len(out) == 200 * size and ev.type == "exit"


async def test_late_reader_gets_everything() -> None:
    fake = FakeAgentProc(numbered(40, 1000), exit_code=3)
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    assert await asyncio.wait_for(handle.wait_exit(), 5) == {"exit_code": 3, "timed_out": False}
    await asyncio.sleep(0.05)
    out, ev = await drain(handle)
    assert out == b"".join(data for _, data in numbered(40, 1000))
    assert ev == ProcessEvent("exit", exit_code=3, timed_out=False)


async def test_exit_is_known_without_reading_the_output() -> None:
    table = ProcessTable()
    fake = FakeAgentProc(numbered(10, 1000), exit_code=5, exit_early=True)
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    table.add(handle)
    assert await asyncio.wait_for(handle.wait_exit(), 5) == {"exit_code": 5, "timed_out": False}
    assert handle.done and handle.exit_code == 5 and handle.finished_at is not None
    assert table.running("ses_x") == 0
    # The output was not consumed by that: the reader still gets it all.
    out, ev = await drain(handle)
    assert len(out) == 10_000 and ev.exit_code == 5


async def test_one_reader_only() -> None:
    fake = FakeAgentProc(numbered(50, 1000))
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    first = handle.stream()
    assert (await anext(first)).type == "stdout"
    with pytest.raises(ConflictError, match="already being read"):
        handle.stream()
    rest = [ev async for ev in first]
    assert rest[-1].type == "exit" and len(rest) == 50
    with pytest.raises(ConflictError, match="read to the end"):
        handle.stream()


async def test_a_reader_that_takes_nothing_lets_the_next_one_in() -> None:
    fake = FakeAgentProc(numbered(5, 1000))
    handle = ProcessHandle("ses_x", fake)
    first = handle.stream()
    reader = asyncio.create_task(anext(first))
    await asyncio.sleep(0.01)
    reader.cancel()  # the client went away before any output (not started yet)
    with pytest.raises(asyncio.CancelledError):
        await reader
    handle.start()
    out, ev = await drain(handle)
    assert len(out) == 5000 and ev.type == "exit"


async def test_a_reader_that_leaves_early_frees_the_process() -> None:
    size = 64 << 10
    fake = FakeAgentProc(numbered(100, size))
    handle = ProcessHandle("ses_x", fake, buffer_bytes=256 << 10)
    handle.start()
    stream = handle.stream()
    await anext(stream)
    await stream.aclose()  # the HTTP client disconnected
    # The rest is discarded (and counted), so the process is not held forever.
    assert await asyncio.wait_for(handle.wait_exit(), 5) == {"exit_code": 0, "timed_out": False}
    await settle(lambda: fake.finished)
    assert handle.delivered_bytes == size
    assert handle.discarded_bytes == 99 * size
    assert handle.buffered_bytes == 0
    with pytest.raises(ConflictError, match="partly read"):
        handle.stream()


async def test_connection_loss_reports_delivered_bytes() -> None:
    fake = FakeAgentProc(numbered(3, 1000), fail=AgentError("agent connection closed"))
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    out, ev = await drain(handle)
    assert len(out) == 3000
    assert ev.type == "error"
    assert ev.delivered_bytes == 3000
    assert ev.message is not None and "agent connection closed" in ev.message
    assert "3000 bytes of output were delivered" in ev.message
    assert "lost" in ev.message
    with pytest.raises(ProcessLostError):
        await handle.wait_exit()
    assert handle.done and handle.exit_code is None


async def test_old_agent_losing_output_ends_with_an_error() -> None:
    chunks = list(numbered(6, 1000))
    output: list[tuple[str, bytes] | dict[str, Any]] = [
        *chunks[:2], {"event": "lost", "bytes": 5000}, *chunks[2:]]
    fake = FakeAgentProc(output, exit_code=0)
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    events = [ev async for ev in handle.stream()]
    assert [ev.type for ev in events] == ["stdout", "stdout", "error"]
    err = events[-1]
    # The prefix up to the gap; then the exact loss: the dropped 5000 and the 4000 after it.
    assert (err.delivered_bytes, err.lost_bytes, err.exit_code) == (2000, 9000, 0)
    assert err.message is not None and "9000 bytes of output were lost" in err.message
    assert "exited with code 0" in err.message
    # on the wire: every field of the loss, the output's bytes in base64
    assert err.to_json() == {"type": "error", "message": err.message, "delivered_bytes": 2000,
                             "lost_bytes": 9000, "exit_code": 0, "timed_out": False}
    assert events[0].to_json() == {"type": "stdout",
                                   "data": base64.b64encode(events[0].data).decode()}
    assert await handle.wait_exit() == {"exit_code": 0, "timed_out": False}


async def test_cancel_ends_the_stream_with_an_error() -> None:
    async def endless() -> AsyncIterator[dict[str, Any]]:
        yield {"event": "stdout", "data": b"hello"}
        await asyncio.sleep(3600)
        yield {}  # pragma: no cover

    fake = FakeAgentProc([])
    fake.events = endless  # type: ignore[method-assign]
    handle = ProcessHandle("ses_x", fake)
    handle.start()
    stream = handle.stream()
    assert (await anext(stream)).data == b"hello"
    await handle.cancel()
    ev = await anext(stream)
    assert ev.type == "error" and ev.message is not None and "no longer available" in ev.message
    assert set(ev.to_json()) == {"type", "message", "delivered_bytes", "lost_bytes"}
    with pytest.raises(ProcessLostError):
        await handle.wait_exit()


async def test_table() -> None:
    table = ProcessTable()
    running = ProcessHandle("ses_a", FakeAgentProc(numbered(400, 64 << 10)))
    finished = ProcessHandle("ses_a", FakeAgentProc([], exit_early=True))
    other = ProcessHandle("ses_b", FakeAgentProc([], exit_early=True))
    for h in (running, finished, other):
        h.start()
        table.add(h)
    await finished.wait_exit()
    await other.wait_exit()
    assert table.get(running.id) is running and table.get("prc_nope") is None
    assert table.running("ses_a") == 1 and table.running("ses_b") == 0
    assert set(table.for_session("ses_a")) == {running, finished}
    table.drop_session("ses_a")
    assert table.for_session("ses_a") == [] and table.get(other.id) is other
    await asyncio.sleep(0)
    assert running.done  # its pump was stopped with the session


# -- end to end with the real agent -------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[AgentClient]:
    base = Path(tempfile.mkdtemp(prefix="tkp-"))
    sock = base / "agent.sock"
    agent = guest.Agent(guest.ListenPort(str(sock)), guest.System(str(base)))
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    c = AgentClient(sock, default_timeout=10)
    await c.connect(timeout=10)
    c.test_agent = agent  # type: ignore[attr-defined]
    yield c
    await c.close()
    agent.stop()
    thread.join(5)
    shutil.rmtree(base, ignore_errors=True)


async def test_real_agent_process_is_held_while_nobody_reads(client: AgentClient) -> None:
    total = 32 << 20
    proc = await client.exec(["head", "-c", str(total), "/dev/zero"])
    handle = ProcessHandle("ses_x", proc)
    handle.start()
    await asyncio.sleep(1.0)  # nobody reads
    assert handle.buffered_bytes <= BUFFER_BYTES + guest.PIPE_READ
    assert proc.queued_bytes <= proc.window + 2 * guest.PIPE_READ
    assert not handle.done  # blocked on its pipe in the guest, not buffered on the host
    gp = client.test_agent.procs[proc.id]  # type: ignore[attr-defined]
    assert gp.popen.poll() is None
    received = 0
    async for ev in handle.stream():
        if ev.type == "exit":
            assert ev.exit_code == 0
            break
        received += len(ev.data)
        assert handle.buffered_bytes <= BUFFER_BYTES + guest.PIPE_READ
    assert received == total
    assert await handle.wait_exit() == {"exit_code": 0, "timed_out": False}

"""Waits on records (``longpoll.Changes``, ``Records.changes``) on a real SQLite store: a change
wakes the waits on its own record, not every wait of the server.

Why it matters: every client waiting for its session (a long poll per clone) used to re-read
its record at each change of any record, so N clones restored at once cost N² reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.helpers import seed, session_row
from support.server import open_test_store

from tenkibox import longpoll
from tenkibox.control.records import Records, key_of
from tenkibox.store.db import Store
from tenkibox.store.tables import PortExposureRow, SessionRow


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_test_store(tmp_path)
    yield s
    s.close()


async def test_a_change_wakes_the_waits_on_its_record_only(store: Store) -> None:
    records = Records(store)
    mine, other = session_row("CREATING"), session_row("CREATING")
    seed(store, mine)
    seed(store, other)
    wait = asyncio.create_task(records.changes.wait(key_of(SessionRow, mine.id), 30))
    wait_other = asyncio.create_task(records.changes.wait(key_of(SessionRow, other.id), 30))
    await asyncio.sleep(0)
    await records.transition(SessionRow, other.id, "READY")
    await records.update(SessionRow, other.id, name="renamed")
    assert await asyncio.wait_for(wait_other, 5) is True
    await asyncio.sleep(0.05)
    assert not wait.done()
    await records.update(SessionRow, mine.id, name="mine")
    assert await asyncio.wait_for(wait, 5) is True
    assert records.changes.watched() == 0


async def test_concurrent_long_polls_read_their_record_once_per_change_of_it(
        store: Store) -> None:
    """Ten sessions, a long poll on each (as ten clones restored at once), each session moved
    twice: every poll reads its record once, then once per change of it. With every change
    waking every poll, each read 1 + 20 times."""
    records = Records(store)
    rows = [session_row("CREATING") for _ in range(10)]
    for row in rows:
        seed(store, row)
    reads = dict.fromkeys((r.id for r in rows), 0)

    def reader(sid: str):  # type: ignore[no-untyped-def]
        def read() -> SessionRow:
            reads[sid] += 1
            return records.get(SessionRow, sid)
        return read

    polls = [asyncio.create_task(longpoll.until(
        records.changes, key_of(SessionRow, r.id), reader(r.id),
        lambda r: r.state == "READY", 30)) for r in rows]
    await asyncio.sleep(0)
    for row in rows:
        await records.update(SessionRow, row.id, name="step one")  # not done yet: read again
        await asyncio.sleep(0.01)  # the polls woken have run
        await records.transition(SessionRow, row.id, "READY")
        await asyncio.sleep(0.01)
    answers = await asyncio.wait_for(asyncio.gather(*polls), 10)
    assert [a.state for a in answers] == ["READY"] * 10
    assert max(reads.values()) <= 3, reads
    assert records.changes.watched() == 0


async def test_a_change_of_unknown_records_wakes_every_wait(store: Store) -> None:
    """A bulk delete does not say which records went: every wait reads again."""
    records = Records(store)
    rows = [session_row("CREATING") for _ in range(3)]
    for row in rows:
        seed(store, row)
    waits = [asyncio.create_task(records.changes.wait(key_of(SessionRow, r.id), 30))
             for r in rows]
    await asyncio.sleep(0)
    assert await records.remove_where(PortExposureRow) == 0  # nothing went: nothing to wake
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waits)
    ended = session_row("TERMINATED")
    seed(store, ended)
    assert await records.remove_where(SessionRow, SessionRow.state == "TERMINATED") == 1
    assert await asyncio.wait_for(asyncio.gather(*waits), 5) == [True] * 3


async def test_waits_that_time_out_or_are_cancelled_leave_nothing_behind() -> None:
    changes = longpoll.Changes()
    assert await changes.wait("sessions:a", 0.01) is False
    task = asyncio.create_task(changes.wait("sessions:b", 30))
    await asyncio.sleep(0)
    assert changes.watched() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert changes.watched() == 0
    changes.announce("sessions:b")  # nobody waits: nothing happens
    changes.announce()


async def test_a_long_poll_still_reads_again_on_its_own(store: Store,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net: a change nobody announced (another process without notifications) is
    seen at the next re-read."""
    monkeypatch.setattr(longpoll, "REREAD_S", 0.05)
    records = Records(store)
    row = session_row("CREATING")
    seed(store, row)
    poll = asyncio.create_task(longpoll.until(
        records.changes, key_of(SessionRow, row.id), lambda: records.get(SessionRow, row.id),
        lambda r: r.state == "READY", 10))
    await asyncio.sleep(0.01)
    quiet = Records(store)  # a second writer whose changes this process is not told about
    await quiet.transition(SessionRow, row.id, "READY")
    assert (await asyncio.wait_for(poll, 5)).state == "READY"

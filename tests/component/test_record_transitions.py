"""``Records.transition`` on a real SQLite store: the tables of ``control.states`` are the law.

Every pair (from, to) of every resource is tried: the pairs of the table are accepted, every
other pair is refused with ``IllegalTransitionError`` (a 409 ``ConflictError``) and leaves the
record as it was. Two actors moving one record at once (threads, each with its own loop, over one
database): exactly one wins, every round, when neither move is allowed after the other (two
terminates, attach against delete) or when both say which state they saw (``expected``, as the
control plane does: the boot's READY and a terminate may both happen, one after the other).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from support.helpers import build_row, session_row, snapshot_row, volume_row
from support.server import open_test_store

from tenkibox.control.audit import AuditLog
from tenkibox.control.keys import KeyControl
from tenkibox.control.records import Records
from tenkibox.control.states import TRANSITIONS, IllegalTransitionError, sources
from tenkibox.errors import ConflictError, SessionNotFoundError
from tenkibox.models import BuildState, SessionState, SnapshotState, VolumeState
from tenkibox.store.db import Store
from tenkibox.store.tables import ApiKeyRow, AuditRow, BuildRow, SessionRow, SnapshotRow, VolumeRow

ROWS: dict[str, Any] = {"session": (SessionRow, session_row),
                        "snapshot": (SnapshotRow, snapshot_row),
                        "volume": (VolumeRow, volume_row),
                        "build": (BuildRow, build_row)}
#: a column each transition may write along with the state (volumes have no state_reason,
#: builds say why in ``error``)
NOTE = {"session": "state_reason", "snapshot": "state_reason", "volume": "name",
        "build": "error"}
STATES: dict[str, list[str]] = {"session": [s.value for s in SessionState],
                                "snapshot": [s.value for s in SnapshotState],
                                "volume": [s.value for s in VolumeState],
                                "build": [s.value for s in BuildState]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = open_test_store(Path(tmp_path_factory.mktemp("records")))
    yield s
    s.close()


def _pairs() -> list[tuple[str, str, str]]:
    return [(kind, a, b) for kind, states in STATES.items()
            for a, b in itertools.product(states, states)]


def test_the_tables_name_every_state() -> None:
    for kind, states in STATES.items():
        table = TRANSITIONS[kind]
        assert sorted(str(getattr(s, "value", s)) for s in table) == sorted(states), kind
        for targets in table.values():
            assert {str(getattr(t, "value", t)) for t in targets} <= set(states), kind


@pytest.mark.parametrize("kind, source, target", _pairs(),
                         ids=[f"{k}:{a}->{b}" for k, a, b in _pairs()])
async def test_every_pair(store: Store, kind: str, source: str, target: str) -> None:
    cls, make = ROWS[kind]
    records = Records(store)
    row = make(source)
    await records.insert(row)
    note = {NOTE[kind]: "why"}
    before = getattr(row, NOTE[kind])
    allowed = target in TRANSITIONS[kind][source]
    assert allowed == (source in sources(kind, target))
    if allowed:
        moved = await records.transition(cls, row.id, target, **note)
        assert moved.state == target and getattr(moved, NOTE[kind]) == "why"
    else:
        with pytest.raises(IllegalTransitionError) as info:
            await records.transition(cls, row.id, target, **note)
        assert isinstance(info.value, ConflictError) and info.value.status == 409
        assert (info.value.current, info.value.target) == (source, target)
        assert info.value.message == f"{kind} {row.id} is {source}; it cannot become {target}"
        after = records.get(cls, row.id)
        assert (after.state, getattr(after, NOTE[kind])) == (source, before)  # untouched


async def test_terminated_never_becomes_ready_again(store: Store) -> None:
    records = Records(store)
    row = session_row("TERMINATED")
    await records.insert(row)
    with pytest.raises(IllegalTransitionError, match="is TERMINATED; it cannot become READY"):
        await records.transition(SessionRow, row.id, SessionState.READY)


async def test_expected_narrows_the_table(store: Store) -> None:
    records = Records(store)
    row = session_row("READY")
    await records.insert(row)
    # READY -> FAILED is in the table, but this caller only moves a CREATING record
    with pytest.raises(IllegalTransitionError):
        await records.transition(SessionRow, row.id, "FAILED", expected=["CREATING"])
    assert records.get(SessionRow, row.id).state == "READY"
    assert (await records.transition(SessionRow, row.id, "FAILED", expected=["READY"])).state \
        == "FAILED"


async def test_unknown_state_and_missing_record(store: Store) -> None:
    records = Records(store)
    row = session_row("READY")
    await records.insert(row)
    with pytest.raises(ValueError, match="not a session state"):
        await records.transition(SessionRow, row.id, "EXPLODED")
    with pytest.raises(SessionNotFoundError):
        await records.transition(SessionRow, "ses_missing", "TERMINATING")
    with pytest.raises(ValueError, match="transition"):
        await records.update(SessionRow, row.id, state="FAILED")


async def test_update_guarded_by_state(store: Store) -> None:
    records = Records(store)
    row = session_row("TERMINATED")
    await records.insert(row)
    assert not await records.update(SessionRow, row.id, when_state=["CREATING"], name="late")
    assert records.get(SessionRow, row.id).name is None
    assert await records.update(SessionRow, row.id, name="now")


ROUNDS = 30


@pytest.mark.parametrize("kind, source, targets, seen", [
    ("session", "READY", ("TERMINATING", "TERMINATING"), False),  # two terminates
    ("session", "CREATING", ("TERMINATING", "TERMINATING"), False),
    ("session", "CREATING", ("READY", "TERMINATING"), True),  # boot done vs terminate
    ("session", "CREATING", ("READY", "FAILED"), True),  # boot done vs VM died
    ("session", "RUNNING", ("READY", "FAILED"), True),  # process ended vs VM died
    ("session", "RUNNING", ("FAILED", "TERMINATING"), True),  # VM died vs terminate
    ("session", "READY", ("PAUSING", "TERMINATING"), True),  # pause vs terminate
    ("session", "PAUSING", ("PAUSED", "TERMINATING"), True),  # pause done vs terminate
    ("snapshot", "READY", ("DELETING", "DELETING"), False),  # two deletes
    ("snapshot", "CREATING", ("READY", "FAILED"), True),  # sealed vs failed
    ("snapshot", "READY", ("DELETING", "FAILED"), True),  # delete vs found damaged (scrub)
    ("build", "BUILDING", ("READY", "FAILED"), True),  # golden snapshot READY vs cancelled
    ("volume", "AVAILABLE", ("IN_USE", "DELETING"), False),  # attach vs delete
    ("volume", "AVAILABLE", ("IN_USE", "IN_USE"), False),  # two attaches
    ("volume", "DELETING", ("DELETED", "DELETED"), False),  # two deletes finishing
])
def test_two_concurrent_transitions_one_wins(store: Store, kind: str, source: str,
                                             targets: tuple[str, str], seen: bool) -> None:
    """Two threads, each with its own loop and ``Records``, over one database, released at once
    by a barrier for every round: exactly one transition is written, the other is refused."""
    cls, make = ROWS[kind]
    expected = [source] if seen else None
    rows = [make(source) for _ in range(ROUNDS)]
    with store.tx() as orm:
        orm.add_all(rows)
    barrier = threading.Barrier(2, timeout=30)
    results: list[list[tuple[str, str]]] = [[] for _ in rows]

    def worker(target: str, tag: str) -> None:
        records = Records(store)
        loop = asyncio.new_event_loop()
        try:
            for i, row in enumerate(rows):
                barrier.wait()
                try:
                    loop.run_until_complete(records.transition(
                        cls, row.id, target, expected=expected, **{NOTE[kind]: tag}))
                    results[i].append(("won", tag))
                except IllegalTransitionError:
                    results[i].append(("refused", tag))
                except Exception as exc:  # e.g. "database is locked": a bug of its own
                    results[i].append((f"error {type(exc).__name__}: {exc}", tag))
        finally:
            loop.close()

    threads = [threading.Thread(target=worker, args=(t, f"{t}#{i}"))
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    records = Records(store)
    for row, result in zip(rows, results, strict=True):
        assert sorted(r for r, _ in result) == ["refused", "won"], result
        winner = next(tag for r, tag in result if r == "won")
        final = records.get(cls, row.id)
        assert (final.state, getattr(final, NOTE[kind])) == (winner.split("#")[0], winner)


async def test_two_concurrent_transitions_in_one_loop(store: Store) -> None:
    records = Records(store)
    for _ in range(ROUNDS):
        row = session_row("CREATING")
        await records.insert(row)
        got = await asyncio.gather(
            records.transition(SessionRow, row.id, "TERMINATING", state_reason="a"),
            records.transition(SessionRow, row.id, "TERMINATING", state_reason="b"),
            return_exceptions=True)
        won = [g for g in got if isinstance(g, SessionRow)]
        refused = [g for g in got if isinstance(g, IllegalTransitionError)]
        assert len(won) == 1 and len(refused) == 1, got


# -- deletes -------------------------------------------------------------------------------------


async def test_a_record_with_a_life_cycle_is_deleted_only_once_it_ended(store: Store) -> None:
    records = Records(store)
    live, ended = session_row("READY"), session_row("TERMINATED")
    building, failed = build_row("BUILDING"), build_row("FAILED")
    for row in (live, ended, building, failed):
        await records.insert(row)
    assert await records.remove_where(SessionRow, SessionRow.id.in_([live.id, ended.id])) == 1
    assert records.find(SessionRow, live.id) is not None
    assert records.find(SessionRow, ended.id) is None
    assert not await records.remove(BuildRow, building.id)  # a build in progress stays
    assert records.get(BuildRow, building.id).state == "BUILDING"
    assert await records.remove(BuildRow, failed.id)
    assert records.find(BuildRow, failed.id) is None


async def test_audit_prune_deletes_only_what_outlived_the_retention(store: Store) -> None:
    records = Records(store)
    audit = AuditLog(records, retention_days=1)
    tag = f"prune-{id(audit)}"  # the module's store is shared: count this test's entries only
    for _ in range(2):
        await audit.record(workspace_id=tag, key_prefix=None, action="old", method="POST",
                           path="/x", object_id=None, status=200, outcome="ok")
    await audit.record(workspace_id=tag, key_prefix=None, action="new", method="POST",
                       path="/x", object_id=None, status=200, outcome="ok")
    old = [e.id for e in audit.query(tag) if e.action == "old"]
    with store.tx() as orm:  # two entries written three days ago
        for entry in orm.scalars(select(AuditRow).where(AuditRow.id.in_(old))):
            entry.at = datetime.now(UTC) - timedelta(days=3)
    assert await audit.prune() == 2
    assert [e.action for e in audit.query(tag)] == ["new"]
    assert await audit.prune() == 0


async def test_a_key_is_revoked_once(store: Store) -> None:
    records = Records(store)
    keys = KeyControl(records)
    row = ApiKeyRow(id="key_revokedonce0000", workspace_id="ws_default", key_hash="h" * 64,
                    prefix="tk_x", name=None, admin=False, created_at=datetime.now(UTC))
    await records.insert(row)
    first = (await keys.revoke(row.id)).revoked_at
    assert first is not None
    assert (await keys.revoke(row.id)).revoked_at == first  # the second changes nothing

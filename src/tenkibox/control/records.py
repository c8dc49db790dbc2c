"""Reads and writes of records: the one place rows are written (no other module of the server
runs an INSERT, UPDATE or DELETE).

Every state change is ``transition``: one ``UPDATE … WHERE id = :id AND state IN (:allowed)``
whose allowed states come from the table in ``states``; zero rows updated means the record was
elsewhere (or gone), and the caller gets ``IllegalTransitionError`` or the not-found error. Other
fields change through ``update``, optionally guarded by the state the caller saw.

Several control-plane processes may share one PostgreSQL (READ COMMITTED): the conditional
UPDATE's row count decides every race, as in one process. A write with a ``check`` (a count and
the insert or move it allows: quotas, capacity, one build at a time, a workspace's emptiness)
first takes one transaction-scoped advisory lock, so that such checks run one at a time across
all processes (SQLite has a single writer already).

Waits (long polls, the server's own) watch one record in ``changes`` (``longpoll.Changes``): each
committed change wakes the waits on its record. On PostgreSQL every change also sends
``NOTIFY tenki_records`` in its transaction (delivered at commit) with the record's key, and
``listen`` (started by the control plane) turns the notifications of every process into the
same wake-ups: a wait on one control-plane process wakes when another changes the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session as OrmSession

from .. import longpoll
from ..errors import (
    ApiKeyNotFoundError,
    HostNotFoundError,
    NotFoundError,
    SessionNotFoundError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
    VolumeNotFoundError,
    WorkspaceNotFoundError,
)
from ..store.db import ADMISSION_LOCK, Store
from ..store.tables import (
    ApiKeyRow,
    AuditRow,
    Base,
    BuildRow,
    HostRow,
    PortExposureRow,
    SessionRow,
    SnapshotRow,
    TemplateRow,
    VolumeRow,
    WorkspaceRow,
)
from .states import TRANSITIONS, IllegalTransitionError, sources

log = logging.getLogger(__name__)

#: the PostgreSQL channel of record changes; the payload is the record's key (``key_of``), empty
#: for a change of records not known one by one (and from processes older than keyed waits):
#: every wait re-reads
CHANNEL = "tenki_records"
#: the listener connection's application_name (pg_stat_activity)
LISTENER_NAME = "tenki-listener"

R = TypeVar("R", SessionRow, SnapshotRow, VolumeRow, WorkspaceRow, ApiKeyRow, TemplateRow,
            BuildRow, PortExposureRow, HostRow)

_KIND: dict[type[Base], str] = {SessionRow: "session", SnapshotRow: "snapshot",
                                VolumeRow: "volume", WorkspaceRow: "workspace",
                                ApiKeyRow: "API key", TemplateRow: "template", BuildRow: "build",
                                HostRow: "host"}
_MISSING: dict[str, type[NotFoundError]] = {"session": SessionNotFoundError,
                                            "snapshot": SnapshotNotFoundError,
                                            "volume": VolumeNotFoundError,
                                            "workspace": WorkspaceNotFoundError,
                                            "API key": ApiKeyNotFoundError,
                                            "template": TemplateNotFoundError,
                                            "build": TemplateNotFoundError,
                                            "host": HostNotFoundError}
#: kinds with a state machine but no final state: their records end by being removed (a host:
#: its sessions ended or were moved off first, ``HostControl.remove``)
_REMOVED_OUTRIGHT = frozenset({"host"})


def _missing(kind: str, key: str) -> NotFoundError:
    """What a read or a change of a record that is not there raises."""
    return _MISSING[kind](f"{kind} {key} not found")


def key_of(cls: type[Base], key: object) -> str:
    """The name of one record in ``Records.changes`` and in notifications."""
    return f"{cls.__tablename__}:{key}"


def _value(state: Any) -> str:
    return str(state.value if hasattr(state, "value") else state)


class Records:
    def __init__(self, store: Store) -> None:
        self.store = store
        #: woken after every committed change of a record (long polls wait on it); on
        #: PostgreSQL also after another process's (``listen``)
        self.changes = longpoll.Changes()
        #: set while the PostgreSQL listener is connected and listening
        self.listening = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    # -- change notifications across processes (PostgreSQL) ----------------------------------
    def _announce(self, orm: OrmSession, key: str | None) -> None:
        """Queue ``NOTIFY`` of ``key`` (None: any record) in ``orm``'s transaction: sent at its
        commit, never on rollback."""
        if self.store.postgres:
            orm.execute(text("SELECT pg_notify(:c, :k)"), {"c": CHANNEL, "k": key or ""})

    async def listen(self) -> None:
        """On PostgreSQL, start relaying other processes' changes to ``changes`` (until
        ``stop_listening``); returns once listening (or after 10 s, still trying). On SQLite
        nothing: one process owns the database."""
        if not self.store.postgres or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen(), name="records listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), 10)

    async def stop_listening(self) -> None:
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.listening.clear()

    async def _listen(self) -> None:
        import psycopg  # the PostgreSQL driver (the server extra)

        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.store.libpq_url, autocommit=True, connect_timeout=10,
                    application_name=LISTENER_NAME)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    delay = 0.5
                    self.changes.announce()  # what changed while (re)connecting: read again
                    async for note in conn.notifies():
                        self.changes.announce(note.payload or None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.listening.is_set():
                    log.warning("change notifications from %s lost (%s); reconnecting",
                                self.store.url, str(exc).splitlines()[0] if str(exc) else
                                type(exc).__name__)
                self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _checked(self, orm: OrmSession, check: Callable[[OrmSession], None] | None) -> None:
        """Run ``check`` in ``orm``'s transaction; on PostgreSQL under the admission lock (held
        until the transaction ends: the check and the write it allows are one step for every
        control-plane process)."""
        if check is None:
            return
        if self.store.postgres:
            orm.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK})
        check(orm)

    # -- reads -------------------------------------------------------------------------------
    def find(self, cls: type[R], key: str) -> R | None:
        with self.store.tx() as orm:
            return orm.get(cls, key)

    def get(self, cls: type[R], key: str, *, ws: str | None = None) -> R:
        """The record ``key``; with ``ws``, only if it belongs to that workspace: another
        workspace's record answers exactly like one that does not exist (ids cannot be
        probed)."""
        row = self.find(cls, key)
        if row is None or (ws is not None and getattr(row, "workspace_id", ws) != ws):
            kind = _KIND[cls]
            raise _missing(kind, key)
        return row

    def all(self, cls: type[R], *where: Any) -> list[R]:
        with self.store.tx() as orm:
            stmt = select(cls).where(*where) if where else select(cls)
            return list(orm.scalars(stmt))

    async def settled(self, cls: type[R], key: str, timeout_s: float,
                      busy: str = "CREATING") -> R:
        """The record once it left ``busy`` (or as it is after ``timeout_s``): the server's
        own waits for the boot, restore or capture it started (no long-poll cap)."""
        return await longpoll.until(self.changes, key_of(cls, key), lambda: self.get(cls, key),
                                    lambda r: getattr(r, "state", None) != busy, timeout_s,
                                    cap_s=None)

    # -- writes ------------------------------------------------------------------------------
    async def insert(self, row: Base, *, check: Callable[[OrmSession], None] | None = None,
                     notify: bool = True) -> None:
        """Add ``row``; ``check`` runs first in the same transaction (quotas, capacity) and
        refuses by raising, so that a count and the insert it allows cannot be split."""
        key = key_of(type(row), getattr(row, "id", None))
        with self.store.tx() as orm:
            self._checked(orm, check)
            orm.add(row)
            if notify:
                self._announce(orm, key)
        if notify:
            self.changes.announce(key)

    async def remove(self, cls: type[R], key: str, *,
                     check: Callable[[OrmSession], None] | None = None) -> bool:
        """Delete a record outright (see ``remove_where``)."""
        return await self.remove_where(cls, cls.id == key, check=check) == 1

    async def remove_where(self, cls: type[R] | type[AuditRow], *where: Any,
                           notify: bool = True,
                           check: Callable[[OrmSession], None] | None = None) -> int:
        """Delete the records of ``cls`` matching ``where``; returns how many went. Records
        without a life cycle (workspaces, templates, exposed ports, audit entries) go as they
        are; one with a state machine only from a final state (a build with its template): it
        ends by its transitions, never by a delete from the middle of its life."""
        kind = _KIND.get(cls)
        if kind in TRANSITIONS and kind not in _REMOVED_OUTRIGHT:
            final = sorted(_value(s) for s, tos in TRANSITIONS[kind].items() if not tos)
            table: Any = cls
            where = (*where, table.state.in_(final))
        with self.store.tx() as orm:
            self._checked(orm, check)
            result = orm.execute(delete(cls).where(*where)
                                 .execution_options(synchronize_session=False))
            gone = int(result.rowcount)  # type: ignore[attr-defined]
            if gone and notify:
                self._announce(orm, None)  # which ones went is not known here
        if gone and notify:
            self.changes.announce()
        return gone

    async def transition(self, cls: type[R], key: str, target: Any, *,
                         expected: Iterable[Any] | None = None,
                         check: Callable[[OrmSession], None] | None = None,
                         when: dict[str, Any] | None = None,
                         **values: Any) -> R:
        """Move a record to ``target`` (compare-and-set); returns the updated row. ``check``
        runs first in the same transaction and refuses by raising (quotas, as ``insert``);
        ``when``: only while those fields still hold those values (as ``update``; a record
        moved or changed meanwhile raises ``IllegalTransitionError``)."""
        kind = _KIND[cls]
        target = _value(target)
        if target not in TRANSITIONS[kind]:
            raise ValueError(f"{target} is not a {kind} state")
        allowed = sources(kind, target)
        if expected is not None:
            allowed = allowed & {_value(s) for s in expected}
        table: Any = cls
        stmt = update(cls).where(table.id == key, table.state.in_(sorted(allowed)))
        for field, was in (when or {}).items():
            column = getattr(table, field)
            stmt = stmt.where(column.is_(None) if was is None else column == was)
        with self.store.tx() as orm:
            self._checked(orm, check)
            result = orm.execute(stmt.values(state=target, **values)
                                 .execution_options(synchronize_session=False))
            moved = result.rowcount == 1  # type: ignore[attr-defined]
            if moved:
                self._announce(orm, key_of(cls, key))
            # read in the same transaction: the row as this change left it (or, refused, as
            # it was), without a second one (an exec moves its session twice)
            row = orm.get(cls, key, populate_existing=True)
        if row is None:
            raise _missing(kind, key)
        if not moved:
            current: Any = row
            raise IllegalTransitionError(kind, key, current.state, target)
        self.changes.announce(key_of(cls, key))
        return row

    async def update(self, cls: type[R], key: str, *, when_state: Iterable[Any] | None = None,
                     when: dict[str, Any] | None = None, notify: bool = True,
                     **values: Any) -> bool:
        """Change fields other than ``state``; with ``when_state``, only while the record is in
        one of those states; with ``when``, only while those fields still hold those values
        (compare-and-set of a read-modify-write). Returns whether a row changed."""
        if "state" in values:
            raise ValueError("state changes go through transition()")
        table: Any = cls
        stmt = update(cls).where(table.id == key)
        if when_state is not None:
            stmt = stmt.where(table.state.in_(sorted(_value(s) for s in when_state)))
        for field, expected in (when or {}).items():
            column = getattr(table, field)
            stmt = stmt.where(column.is_(None) if expected is None else column == expected)
        with self.store.tx() as orm:
            result = orm.execute(stmt.values(**values)
                                 .execution_options(synchronize_session=False))
            changed = result.rowcount == 1  # type: ignore[attr-defined]
            if changed and notify:
                self._announce(orm, key_of(cls, key))
        if changed and notify:
            self.changes.announce(key_of(cls, key))
        return changed

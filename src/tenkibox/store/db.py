"""The database: SQLite in the data directory by default, PostgreSQL (``postgresql://…``, the
psycopg 3 driver) for a control plane of several processes; any other SQLAlchemy URL as it is.

``open_store`` brings the schema up to date with the project's migrations before anything reads
it, so a newer server can open an older data directory. A URL that cannot be used or a database
that cannot be reached is a ``DatabaseError``: one line, the password never in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from ..errors import TenkiError
from .tables import Base, SessionRow, SnapshotRow, VolumeRow

MIGRATIONS = Path(__file__).with_name("migrations")
#: PostgreSQL advisory lock keys (transaction-scoped): migrations, admission checks
MIGRATION_LOCK = 0x74656E6B69_01
ADMISSION_LOCK = 0x74656E6B69_02
#: (session-scoped, shared) held by every live control-plane process, see ``hold_presence``
PRESENCE_LOCK = 0x74656E6B69_03


class DatabaseError(TenkiError):
    """The database URL is unusable or the database unreachable (the server cannot start)."""

    code = "Unavailable"
    status = 503


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` (as PostgreSQL's tools write them) name the psycopg 3
    driver; every other URL is SQLAlchemy's own."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """``url`` with its password masked (for logs and errors)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show its scheme only
        return url.split("://", 1)[0] + "://…" if "://" in url else "(not a URL)"


def _scrub(message: str, url: str) -> str:
    try:
        password = make_url(url).password
    except Exception:
        password = None
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    return first.replace(str(password), "***") if password else first


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def migrate(engine: Engine) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # several control-plane processes may start at once: one migrates, the others
            # wait for it (the lock ends with the transaction)
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    def __init__(self, url: str) -> None:
        url = normalize_url(url)
        shown = safe_url(url)
        try:
            parsed = make_url(url)
        except sa_exc.ArgumentError as exc:
            raise DatabaseError(f"database URL {shown}: not a database URL "
                                "(sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB)"
                                ) from exc
        self.dialect = parsed.get_backend_name()
        #: (PostgreSQL) the URL for libpq itself (the change listener's own connection)
        self.libpq_url = parsed.set(drivername=self.dialect).render_as_string(
            hide_password=False)
        #: the URL with its password masked (what logs and errors show)
        self.url = shown
        kw: dict[str, Any] = {}
        if self.dialect == "postgresql":
            # READ COMMITTED (the default) is the design: every write is a conditional UPDATE
            # whose row count decides; pre-ping: a restarted database does not fail a request
            kw.update(pool_pre_ping=True, isolation_level="READ COMMITTED",
                      connect_args={"connect_timeout": 10})
        try:
            self.engine = create_engine(url, future=True, **kw)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as exc:
            raise DatabaseError(f"database URL {shown}: {_scrub(str(exc), url)}") from exc
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            migrate(self.engine)
        except sa_exc.OperationalError as exc:
            self.engine.dispose()
            raise DatabaseError(f"database {shown} unreachable: "
                                f"{_scrub(str(exc.orig or exc), url)}") from exc
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        self._presence: Any = None

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    def hold_presence(self) -> bool:
        """Mark this process as a live control plane of the database until ``close`` (on
        PostgreSQL a shared advisory lock held by a connection of its own, gone with the
        process); whether no other was live, i.e. whether records left by a crash are this
        process's to settle. SQLite: one process owns the database (the server's lock file)."""
        if not self.postgres:
            return True
        if self._presence is not None:
            return True
        import psycopg  # the PostgreSQL driver (the server extra)

        try:
            conn = psycopg.connect(self.libpq_url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"database {self.url} unreachable: "
                                f"{_scrub(str(exc), self.libpq_url)}") from exc
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (PRESENCE_LOCK,)).fetchone()
        alone = bool(row and row[0])
        # shared from now on (taken while the exclusive one is held when alone: no gap)
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (PRESENCE_LOCK,))
        if alone:
            conn.execute("SELECT pg_advisory_unlock(%s)", (PRESENCE_LOCK,))
        self._presence = conn
        return alone

    @contextmanager
    def tx(self) -> Iterator[OrmSession]:
        """One transaction: committed on success, rolled back on error."""
        with self._factory() as orm, orm.begin():
            yield orm

    # Reads only: rows are written by ``control.records.Records`` alone (compare-and-set state
    # changes); tests seed theirs with ``tests/support/helpers.seed``.
    def get_session(self, sid: str) -> SessionRow | None:
        with self._factory() as orm:
            return orm.get(SessionRow, sid)

    def get_snapshot(self, sid: str) -> SnapshotRow | None:
        with self._factory() as orm:
            return orm.get(SnapshotRow, sid)

    def get_volume(self, vid: str) -> VolumeRow | None:
        with self._factory() as orm:
            return orm.get(VolumeRow, vid)

    def all(self, cls: type[Any], *where: Any) -> list[Any]:
        with self._factory() as orm:
            stmt = select(cls).where(*where) if where else select(cls)
            return list(orm.scalars(stmt))

    def close(self) -> None:
        presence, self._presence = self._presence, None
        if presence is not None:
            with contextlib.suppress(Exception):
                presence.close()
        self.engine.dispose()


def open_store(home: Path, url: str | None = None) -> Store:
    return Store(url or f"sqlite:///{home / 'tenki.db'}")


__all__ = ["Base", "DatabaseError", "SessionRow", "SnapshotRow", "Store", "VolumeRow",
           "normalize_url", "open_store", "safe_url"]

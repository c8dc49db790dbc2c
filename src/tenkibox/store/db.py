"""The database: SQLite in the data directory by default, any SQLAlchemy URL otherwise.

``open_store`` brings the schema up to date with the project's migrations before anything reads
it, so a newer server can open an older data directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from .tables import Base, SessionRow, SnapshotRow, VolumeRow

MIGRATIONS = Path(__file__).with_name("migrations")


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
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

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
        self.engine.dispose()


def open_store(home: Path, url: str | None = None) -> Store:
    return Store(url or f"sqlite:///{home / 'tenki.db'}")


__all__ = ["Base", "SessionRow", "SnapshotRow", "Store", "VolumeRow", "open_store"]

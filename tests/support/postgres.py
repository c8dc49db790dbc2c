"""A real PostgreSQL for the tests: ``scripts/postgres up`` in a temporary directory (its own
port on 127.0.0.1 and its own socket), ``down --purge`` at the end of the run.

- ``cluster()``: the run's cluster, started on first use (the ``postgres`` fixture of
  tests/conftest.py and ``open_test_store`` under ``TENKI_TEST_DATABASE=postgresql`` share it);
  ``stop_cluster()`` stops it and removes its directory (also at exit).
- ``PostgresCluster.fresh_database()``: a new, fully migrated database (a copy of a migrated
  template database: ``CREATE DATABASE … TEMPLATE``), its URL.

No test that needs PostgreSQL skips: without PostgreSQL's server binaries ``cluster()`` raises
``PostgresMissing`` with what to install.
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres"
#: ``TENKI_TEST_DATABASE=postgresql``: the tests' stores (``open_test_store``) on PostgreSQL
ENV_TEST_DATABASE = "TENKI_TEST_DATABASE"


class PostgresMissing(RuntimeError):
    pass


def on_postgres() -> bool:
    """Whether this run puts the tests' stores on PostgreSQL (else SQLite, the default)."""
    value = os.environ.get(ENV_TEST_DATABASE, "sqlite").lower()
    if value not in ("sqlite", "postgresql", "postgres"):
        raise RuntimeError(f"{ENV_TEST_DATABASE}={value}: sqlite or postgresql")
    return value != "sqlite"


class PostgresCluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._template: str | None = None
        #: databases made by ``fresh_database``, oldest first (``drop`` removes them)
        self.created: list[str] = []
        self.url = self._script("up", "--db", "tenki")
        self._admin = create_engine(self.sqlalchemy_url("postgres"),
                                    isolation_level="AUTOCOMMIT", pool_size=1)

    def _script(self, *args: str) -> str:
        # tests do not lose power: no fsync (as the SQLite tests' synchronous=OFF)
        env = {**os.environ, "TENKI_PG_OPTIONS": "-c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off"}
        out = subprocess.run([str(SCRIPT), args[0], "--dir", str(self.directory), *args[1:]],
                             capture_output=True, text=True, timeout=120, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"scripts/postgres {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout.strip()

    def plain_url(self, database: str) -> str:
        """``postgresql://tenki:…@127.0.0.1:port/<database>`` (as a user gives it)."""
        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def sqlalchemy_url(self, database: str) -> str:
        return make_url(self.plain_url(database)).set(drivername="postgresql+psycopg") \
            .render_as_string(hide_password=False)

    @property
    def password(self) -> str:
        return str(make_url(self.url).password)

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        name = name or f"t_{secrets.token_hex(6)}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'
                              + (f' TEMPLATE "{template}"' if template else "")))
        self.created.append(name)
        return name

    def fresh_database(self) -> str:
        """A new database with every migration applied; its URL (``postgresql://…``)."""
        from tenkibox.store.db import Store
        with self._lock:
            if self._template is None:
                tpl = self.create_database("tenki_template")
                self.created.remove(tpl)
                Store(self.plain_url(tpl)).close()
                self._template = tpl
            name = self.create_database(template=self._template)
        return self.plain_url(name)

    def drop(self, names: list[str], *, force: bool = True) -> None:
        """Drop ``names``; without ``force`` a database still in use stays (for later)."""
        with self._admin.connect() as conn:
            if not force:  # (a DROP of a database in use would wait 5 s before it fails)
                busy = set(conn.execute(text(
                    "SELECT DISTINCT datname FROM pg_stat_activity WHERE datname IS NOT NULL"
                )).scalars())
                names = [n for n in names if n not in busy]
            for name in names:
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'
                                      + (" WITH (FORCE)" if force else "")))
                except OperationalError:
                    if force:
                        raise
                    continue
                if name in self.created:
                    self.created.remove(name)

    def stop(self) -> None:
        self._admin.dispose()
        self._script("down", "--purge")
        shutil.rmtree(self.directory, ignore_errors=True)


_cluster: PostgresCluster | None = None
_cluster_lock = threading.Lock()


def _binaries_present() -> bool:
    pg_bin = os.environ.get("PG_BIN")
    dirs = [pg_bin] if pg_bin else glob.glob("/usr/lib/postgresql/*/bin")
    return any(os.access(os.path.join(d, "initdb"), os.X_OK) for d in dirs)


def cluster() -> PostgresCluster:
    """The run's PostgreSQL, started on first use."""
    global _cluster
    with _cluster_lock:
        if _cluster is None:
            if not _binaries_present():
                raise PostgresMissing(
                    "these tests need a real PostgreSQL and its server binaries are not "
                    "installed: apt-get install postgresql (scripts/setup does), or set PG_BIN "
                    "to the directory holding initdb and pg_ctl")
            # /tmp, not pytest's tmp_path: as root the server runs as the user "postgres",
            # which must reach the directory (pytest's are closed to other users)
            directory = Path(tempfile.mkdtemp(prefix="tenki-test-pg-", dir="/tmp"))
            try:
                _cluster = PostgresCluster(directory)
            except BaseException:
                subprocess.run([str(SCRIPT), "down", "--dir", str(directory), "--purge"],
                               capture_output=True, timeout=120)
                shutil.rmtree(directory, ignore_errors=True)
                raise
            atexit.register(stop_cluster)
            _watch(directory)
        return _cluster


def _watch(directory: Path) -> None:
    """A watchdog of its own session: once this process is gone, however it ended (kill -9
    included, when atexit never runs), the cluster is stopped and its directory removed."""
    script = (f'while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; '
              f'[ -d "{directory}" ] && "{SCRIPT}" down --dir "{directory}" --purge; '
              f'rm -rf "{directory}"')
    subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def stop_cluster() -> None:
    global _cluster
    with _cluster_lock:
        if _cluster is not None:
            _cluster.stop()
            _cluster = None

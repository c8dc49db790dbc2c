"""The control plane on a real PostgreSQL (``scripts/postgres``, the ``postgres`` fixture): the
migrations from an empty database, ``tenki serve --database``, compare-and-set between two
control-plane processes (two engines), the main flows over the API, a restart keeping records,
and waits woken by another process's change. Always run (never skipped); the whole component
suite runs on PostgreSQL too with ``TENKI_TEST_DATABASE=postgresql``."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import inspect, text, update
from support.fake_host import FakeHost
from support.helpers import now, seed, session_row
from support.postgres import SCRIPT, PostgresCluster
from support.server import ADMIN_KEY, AUTH, InProcessServer, write_admin_key

from tenkibox import Client, longpoll
from tenkibox.config import Layout
from tenkibox.control import admission
from tenkibox.control.records import LISTENER_NAME, Records, key_of
from tenkibox.control.states import IllegalTransitionError
from tenkibox.control.workspaces import WorkspaceControl
from tenkibox.errors import CapacityUnavailableError
from tenkibox.host.capacity import HostCapacity
from tenkibox.models import Quotas, WorkspaceUpdate
from tenkibox.store.db import DatabaseError, Store, normalize_url, safe_url
from tenkibox.store.tables import SessionRow, WorkspaceRow

T = TypeVar("T")
MakeServer = Callable[..., InProcessServer]


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
                "templates", "template_builds", "port_exposures", "hosts",
                 "alembic_version"} <= names
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() \
                == "0008"
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
                                           # not the machine's /dev/shm: nothing left there
                                           "TENKI_RUN_ROOT": str(home / "run"),
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


# -- compare-and-set between two control-plane processes -------------------------------------


@pytest.fixture
def two_planes(postgres: PostgresCluster) -> Iterator[tuple[Store, Store]]:
    """Two stores (two engines, two pools) on one fresh database: what two control-plane
    processes behind one address hold."""
    url = postgres.fresh_database()
    a, b = Store(url), Store(url)
    yield a, b
    a.close()
    b.close()


def _race(stores: tuple[Store, ...], work: Callable[[Records, int], Awaitable[T]],
          ) -> list[T | BaseException]:
    """``work(records, i)`` in one thread per store (each with its own loop and ``Records``),
    released at once; each result or error."""
    barrier = threading.Barrier(len(stores), timeout=30)
    results: list[T | BaseException] = [RuntimeError("no result")] * len(stores)

    def worker(i: int) -> None:
        records = Records(stores[i])

        async def go() -> T:
            barrier.wait()
            return await work(records, i)
        try:
            results[i] = asyncio.run(go())
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("target_a, target_b, expected", [
    ("TERMINATING", "TERMINATING", None), ("PAUSING", "PAUSING", None),
    ("TERMINATING", "PAUSING", ["READY"])])
def test_two_processes_race_one_wins(two_planes: tuple[Store, Store], target_a: str,
                                     target_b: str, expected: list[str] | None) -> None:
    """60 rounds: both processes move the same READY session at once (each move forbids the
    other, or both say they saw READY, as the control plane does); exactly one wins every
    round, the other gets IllegalTransitionError (409)."""
    a, _ = two_planes
    targets = (target_a, target_b)
    wins = [0, 0]
    for _round in range(60):
        row = session_row("READY")
        seed(a, row)

        async def move(records: Records, i: int, sid: str = row.id) -> str:
            moved = await records.transition(SessionRow, sid, targets[i], expected=expected,
                                             state_reason=f"by {i}")
            return moved.state
        results = _race(two_planes, move)
        won = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        assert len(won) == 1, results
        loser = results[1 - won[0]]
        assert isinstance(loser, IllegalTransitionError), loser
        wins[won[0]] += 1
        final = a.get_session(row.id)
        assert final is not None
        assert (final.state, final.state_reason) == (targets[won[0]], f"by {won[0]}")
    assert sum(wins) == 60


def test_two_processes_admission_never_overcommits(two_planes: tuple[Store, Store]) -> None:
    """30 rounds: creates of two workspaces through two processes race for a host's last
    place. The host's memory check spans workspaces (no workspace row lock covers it): the
    check and the insert are one step across processes (the admission lock), so exactly one
    is admitted every round."""
    a, _ = two_planes
    capacity = HostCapacity("h1", memory_total_mib=10 * 1024, memory_reserve_mib=0,
                            overcommit=1.0, cpus=2, accelerator="tcg")
    ws = [WorkspaceRow(id=f"ws_{i}{secrets.token_hex(4)}", name=f"w{i}{secrets.token_hex(4)}",
                       quotas={}, created_at=now(), updated_at=now()) for i in range(2)]
    seed(a, *ws)

    async def create(records: Records, i: int) -> bool:
        try:
            await records.insert(session_row("CREATING", workspace_id=ws[i].id,
                                             memory_mb=1024),
                                 check=admission.session(ws[i].id, 1024, capacity,
                                                         "local"))
            return True
        except CapacityUnavailableError:
            return False
    for _round in range(30):
        with a.tx() as orm:  # the previous round's sessions end (as a test seeds rows)
            orm.execute(update(SessionRow).values(state="TERMINATED"))
        seed(a, *[session_row("CREATING", workspace_id=ws[0].id, memory_mb=1024)
                  for _ in range(9)])
        results = _race(two_planes, create)
        assert sorted(results, key=str) == [False, True], results
    held = [r for r in a.all(SessionRow) if r.state == "CREATING"]
    assert len(held) == 10


async def test_update_when_is_compare_and_set(two_planes: tuple[Store, Store]) -> None:
    """Workspace quota edits through two processes: read-modify-write guarded by updated_at,
    no edit lost."""
    a, b = two_planes
    ws = WorkspaceRow(id="ws_" + secrets.token_hex(6), name="q" + secrets.token_hex(4),
                      quotas={}, created_at=now(), updated_at=now())
    seed(a, ws)
    names = ["max_concurrent_sessions", "max_memory_mib", "max_snapshots", "max_volumes"]

    async def edit(records: Records, i: int) -> None:
        control = WorkspaceControl(records)
        for name in names[i * 2:i * 2 + 2]:
            await control.update(ws.id, WorkspaceUpdate(quotas=Quotas(**{name: 5 + i})))
    results = _race(two_planes, edit)
    assert results == [None, None]
    row = b.all(WorkspaceRow, WorkspaceRow.id == ws.id)[0]
    assert set(row.quotas) == set(names)


# -- the control plane over the API on PostgreSQL ----------------------------------------------


def test_main_flows(postgres: PostgresCluster, make_inproc: MakeServer) -> None:
    """Create a session, snapshot it, restore it, terminate, delete the snapshot: the records
    are PostgreSQL's (read back through another engine)."""
    url = postgres.fresh_database()
    server = make_inproc(database_url=url)
    with Client(endpoint=server.url) as c:
        s = c.create_and_wait(cpu=1, memory_mb=512)
        assert s.state == "READY"
        snap = c.create_snapshot_and_wait(s.id, "base")
        assert snap.state == "READY"
        restored = c.create_and_wait(snapshot_id=snap.id)
        assert restored.state == "READY" and server.host.restores[-1].session_id == restored.id
        c.terminate(s.id)
        c.terminate(restored.id)
        assert c.delete_snapshot(snap.id).state in ("DELETING", "DELETED")
    health = httpx.get(f"{server.url}/v1/health", headers=AUTH, timeout=10)
    assert health.status_code == 200 and postgres.password not in health.text
    other = Store(url)
    try:
        states = {r.id: r.state for r in other.all(SessionRow)}
        assert states[s.id] == states[restored.id] == "TERMINATED"
        got = other.get_snapshot(snap.id)
        assert got is not None and got.state in ("DELETING", "DELETED")
    finally:
        other.close()


def test_restart_keeps_records(postgres: PostgresCluster, make_inproc: MakeServer) -> None:
    """A control plane killed and started again on the same PostgreSQL: sessions and snapshots
    are there, the running session runs on, and it can be snapshotted again."""
    url = postgres.fresh_database()
    host = FakeHost()
    first = make_inproc(host=host, database_url=url)
    with Client(endpoint=first.url) as c:
        s = c.create_and_wait()
        snap = c.create_snapshot_and_wait(s.id, "kept")
    first.crash()
    host.release_all()
    second = make_inproc(home=first.home, host=host, database_url=url)
    with Client(endpoint=second.url) as c:
        assert c.get(s.id).state == "READY"
        assert c.get_snapshot(snap.id).state == "READY"
        assert c.create_snapshot_and_wait(s.id, "again").state == "READY"


# -- change notifications through PostgreSQL -----------------------------------------------------


async def test_listen_wakes_waits_of_another_process(two_planes: tuple[Store, Store]) -> None:
    """A wait on process A (on the record alone, no re-read) wakes when process B changes
    that record: B's NOTIFY names it, A's listener wakes its waits. B's change of another
    record does not wake it."""
    a, b = two_planes
    ra, rb = Records(a), Records(b)
    await ra.listen()
    try:
        assert ra.listening.is_set()
        row, other = session_row("READY"), session_row("READY")
        seed(a, row)
        seed(a, other)
        wait = asyncio.create_task(ra.changes.wait(key_of(SessionRow, row.id), 30))
        wait_other = asyncio.create_task(ra.changes.wait(key_of(SessionRow, other.id), 30))
        await asyncio.sleep(0.2)
        assert not wait.done()
        await rb.transition(SessionRow, other.id, "TERMINATING")
        assert await asyncio.wait_for(wait_other, 5) is True
        assert not wait.done()
        await rb.transition(SessionRow, row.id, "TERMINATING")
        assert await asyncio.wait_for(wait, 5) is True
    finally:
        await ra.stop_listening()
    assert not ra.listening.is_set()


async def test_listener_reconnects(two_planes: tuple[Store, Store]) -> None:
    """The listener's connection killed (a database restart, a proxy): it connects again, and
    the changes made meanwhile wake the waits (they read again at the reconnect)."""
    a, b = two_planes
    ra, rb = Records(a), Records(b)
    await ra.listen()
    try:
        with b.engine.connect() as conn:
            killed = conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "application_name = :n AND datname = current_database()"),
                {"n": LISTENER_NAME}).scalars().all()
        assert killed == [True]
        for _ in range(100):
            if not ra.listening.is_set():
                break
            await asyncio.sleep(0.05)
        assert not ra.listening.is_set()
        await asyncio.wait_for(ra.listening.wait(), 10)
        row = session_row("READY")
        seed(a, row)
        wait = asyncio.create_task(ra.changes.wait(key_of(SessionRow, row.id), 30))
        await asyncio.sleep(0)
        await rb.transition(SessionRow, row.id, "TERMINATING")
        assert await asyncio.wait_for(wait, 5) is True
    finally:
        await ra.stop_listening()


def test_long_poll_on_one_server_wakes_on_another(postgres: PostgresCluster,
                                                  make_inproc: MakeServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two control-plane processes (two apps) on one database: a long poll on B answers as
    soon as A moves the session, though B re-reads only every 60 s on its own."""
    monkeypatch.setattr(longpoll, "REREAD_S", 60.0)
    url = postgres.fresh_database()
    a = make_inproc(database_url=url)
    b = make_inproc(database_url=url)
    gate = a.host.block("boot")
    with Client(endpoint=a.url) as ca:
        sid = ca.create().id
    gate.wait_entered()
    answer: dict[str, Any] = {}

    def poll() -> None:
        with httpx.Client(timeout=40) as h:
            r = h.get(f"{b.url}/v1/sessions/{sid}/wait", params={"timeout_s": 30},
                      headers=AUTH)
            answer["state"] = r.json()["state"]
            answer["at"] = time.monotonic()
    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    assert not answer  # B's wait holds: the session is CREATING
    released = time.monotonic()
    gate.release()
    t.join(30)
    assert answer["state"] == "READY"
    assert answer["at"] - released < 5  # not B's 60 s re-read: A's notification


def test_second_control_plane_leaves_the_first_ones_records(
        postgres: PostgresCluster, make_inproc: MakeServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """A control plane started while another runs on the database does not settle records in
    flight (they are the running one's: its VMs, its captures); one started alone does."""
    url = postgres.fresh_database()
    a = make_inproc(database_url=url)
    with Client(endpoint=a.url) as c:
        running = c.create_and_wait().id
        gate = a.host.block("boot")
        creating = c.create().id
    gate.wait_entered()
    b = make_inproc(database_url=url)  # its host has none of A's VMs
    with Client(endpoint=b.url) as c:
        assert c.get(running).state == "READY"
        assert c.get(creating).state == "CREATING"
    said = [r.getMessage() for r in caplog.records if "other control planes" in r.getMessage()]
    assert said and "***" in said[0] and postgres.password not in " ".join(said)
    gate.release()
    with Client(endpoint=a.url) as c:
        assert c.wait_session_ready(creating, timeout=10).state == "READY"
    a.crash()
    b.crash()
    c_ = make_inproc(home=a.home, host=a.host, database_url=url)  # alone again: recovery
    with Client(endpoint=c_.url) as c:
        assert c.get(running).state == "READY"  # its VM was found on its host
    store = Store(url)
    try:
        assert store.hold_presence() is False  # c_ is live
    finally:
        store.close()


def test_audit_paging_beyond_32_bit_ids(postgres: PostgresCluster,
                                        make_inproc: MakeServer) -> None:
    """Audit ids are PostgreSQL integers: a before_id beyond them pages from the newest (found
    by the schemathesis suite on PostgreSQL: it was a 500)."""
    server = make_inproc(database_url=postgres.fresh_database())
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as h:
        h.post("/v1/volumes", json={"name": "v", "size": "1MiB"})
        newest = h.get("/v1/audit").json()
        r = h.get("/v1/audit", params={"before_id": 3108285212117})
        assert r.status_code == 200 and r.json() == newest and newest


def test_two_tenki_serve_processes_share_the_records(postgres: PostgresCluster,
                                                     tmp_path: Path) -> None:
    """Two real ``tenki serve --database postgresql://…`` processes started at once (one
    migrates, the other waits; both register the same local admin key): a record made through
    one is read through the other; the password is in no log."""
    url = postgres.plain_url(postgres.create_database())
    homes = [tmp_path / "a", tmp_path / "b"]
    procs = []
    code = "from tenkibox.cli.main import main; main()"
    for home in homes:
        write_admin_key(Layout(home), ADMIN_KEY)
        env = {"TENKI_HOME": str(home), "PATH": "/usr/bin:/bin", "TENKI_GOLDEN": "off",
               "TENKI_RUN_ROOT": str(home / "run"),  # not the machine's /dev/shm
               "PYTHONPATH": ":".join(sys.path), "TENKI_DATABASE_URL": url}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--grpc-port", "-1"], env=env,
            stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "w")))
    try:
        urls = []
        for home, proc in zip(homes, procs, strict=True):
            deadline = time.monotonic() + 60
            while not (home / "server.json").exists():
                assert proc.poll() is None, (home / "serve.log").read_text()
                assert time.monotonic() < deadline, "tenki serve did not start"
                time.sleep(0.1)
            urls.append(json.loads((home / "server.json").read_text())["url"])
        ws = httpx.post(f"{urls[0]}/v1/workspaces", json={"name": "shared"}, headers=AUTH,
                        timeout=10)
        assert ws.status_code in (200, 201), ws.text
        seen = httpx.get(f"{urls[1]}/v1/workspaces/{ws.json()['id']}", headers=AUTH,
                         timeout=10)
        assert seen.status_code == 200 and seen.json()["name"] == "shared"
        for u in urls:
            httpx.post(f"{u}/v1/server/shutdown", headers=AUTH, timeout=10)
        for proc in procs:
            assert proc.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    logs = " ".join((home / "serve.log").read_text() for home in homes)
    assert postgres.password not in logs and "***" in logs


def test_scripts_postgres_up_down_idempotent() -> None:
    """``scripts/postgres``: up twice is one server (same URL), down stops it, up again keeps
    the data and the password, down --purge leaves nothing."""
    directory = Path(tempfile.mkdtemp(prefix="tenki-pg-script-", dir="/tmp"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SCRIPT), *args, "--dir", str(directory)],
                              capture_output=True, text=True, timeout=120)
    try:
        first = run("up")
        assert first.returncode == 0, first.stderr
        url = first.stdout.strip()
        assert url.startswith("postgresql://tenki:") and url.endswith("/tenki")
        assert run("up").stdout.strip() == url
        assert run("status").returncode == 0
        store = Store(url)
        store.close()
        assert run("down").returncode == 0
        assert run("status").returncode == 1
        assert run("up").stdout.strip() == url
        store = Store(url)
        with store.engine.connect() as conn:  # migrated before the restart
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        store.close()
        assert run("url", "--db", "other").stdout.strip() == url[:-len("tenki")] + "other"
    finally:
        run("down", "--purge")
    assert not directory.exists()

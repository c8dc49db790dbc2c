"""The Python SDK against a live server with real VMs: the spec's snapshot flow, sync and async,
the error class of each failure, processes, and the session context manager.

The parity of ``Client``/``AsyncClient`` (same public names and signatures) is checked without
VMs in ``tests/unit/test_client_sdk.py::test_sync_async_parity``.

One booted session (``src``) and one snapshot of it are shared by the module; restores are cheap
(the RAM file is mapped, nothing boots), so tests restore freely and terminate what they make.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import tenkibox
from tenkibox import (
    AsyncClient,
    AuthenticationError,
    Client,
    CommandError,
    ConflictError,
    SessionNotFoundError,
    SessionState,
    SnapshotFailedError,
    SnapshotNotFoundError,
    SnapshotState,
    TenkiError,
    ValidationError,
    WaitTimeoutError,
)
from tenkibox.client import Session

pytestmark = pytest.mark.integration

MEMORY_MB = 1024


@pytest.fixture(scope="module")
def src(client: Client) -> Iterator[Session]:
    """The module's booted session."""
    s = client.create_and_wait(name="sdk-src", cpu=1, memory_mb=MEMORY_MB,
                               env={"GREETING": "hello"}, metadata={"suite": "sdk"})
    try:
        yield s
    finally:
        with contextlib.suppress(TenkiError):
            s.terminate()


@pytest.fixture(scope="module")
def snap(client: Client, src: Session) -> tenkibox.Snapshot:
    """A READY snapshot of ``src`` holding /root/fixture.txt."""
    src.files.write("/root/fixture.txt", "in the fixture snapshot\n")
    return src.snapshot("fixture")


def _wait_deleted(client: Client, snapshot_id: str, timeout: float = 60.0) -> tenkibox.Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        rec = client.get_snapshot(snapshot_id)
        if rec.state == SnapshotState.DELETED or time.monotonic() > deadline:
            return rec
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the spec's flow ------------------------------------------------------------------------


def test_spec_flow_sync(client: Client, src: Session) -> None:
    assert src.id.startswith("ses_") and src.name == "sdk-src"
    assert src.state == SessionState.READY
    assert src.record.cpu == 1 and src.record.memory_mb == MEMORY_MB
    assert src.record.env_keys == ["GREETING"] and src.record.metadata == {"suite": "sdk"}

    written = src.files.write("/root/state.txt", "saved state\n")
    assert written.size_bytes == len("saved state\n")
    src.files.write("/dev/shm/in-memory.bin", b"\x00\xffram")

    snapshot = client.create_snapshot_and_wait(src.id, "baseline")
    assert snapshot.state == SnapshotState.READY
    assert snapshot.id.startswith("snp_") and snapshot.session_id == src.id
    assert snapshot.name == "baseline" and snapshot.base_image_id == "sandbox"
    assert snapshot.size_bytes > 0 and snapshot.memory_bytes > 0
    assert snapshot.created_at is not None

    got = client.get_snapshot(snapshot.id)
    assert (got.id, got.state, got.name) == (snapshot.id, SnapshotState.READY, "baseline")
    assert snapshot.id in [s.id for s in client.list_snapshots()]
    assert snapshot.id in [s.id for s in client.list_snapshots(session_id=src.id)]
    assert client.list_snapshots(session_id="ses_other") == []

    # the source goes on changing; the restored copy has the snapshot's state
    src.files.write("/root/state.txt", "changed after the snapshot\n")
    restored = client.create_and_wait(snapshot_id=snapshot.id, name="restored-copy",
                                      env={"ROLE": "copy"})
    try:
        assert restored.id != src.id and restored.name == "restored-copy"
        assert restored.state in (SessionState.READY, SessionState.RUNNING)
        assert restored.record.snapshot_id == snapshot.id
        assert restored.files.read("/root/state.txt") == b"saved state\n"
        assert restored.files.read_text("/root/state.txt") == "saved state\n"
        assert restored.files.read("/dev/shm/in-memory.bin") == b"\x00\xffram"
        assert restored.shell("echo $ROLE").check().stdout == "copy\n"
    finally:
        restored.terminate()
    assert src.files.read("/root/state.txt") == b"changed after the snapshot\n"

    with pytest.raises(SnapshotNotFoundError):
        client.get_snapshot("snp_doesnotexist")

    deleted = client.delete_snapshot(snapshot.id)
    assert deleted.id == snapshot.id
    assert deleted.state in (SnapshotState.DELETING, SnapshotState.DELETED)
    assert _wait_deleted(client, snapshot.id).state == SnapshotState.DELETED
    assert snapshot.id not in [s.id for s in client.list_snapshots()]


async def test_spec_flow_async(tenki_server: Any) -> None:
    async with AsyncClient(endpoint=tenki_server.url, timeout=60.0) as client:
        session = await client.create_and_wait(name="sdk-async", cpu=1, memory_mb=MEMORY_MB)
        try:
            assert session.state == SessionState.READY
            await session.files.write("/root/async.txt", b"async state")

            pending = await client.create_snapshot(session.id, "async-baseline")
            assert pending.state == SnapshotState.CREATING
            ready = await client.wait_snapshot_ready(pending.id, timeout=300)
            assert ready.id == pending.id and ready.state == SnapshotState.READY
            assert (await client.get_snapshot(ready.id)).state == SnapshotState.READY
            listed = await client.list_snapshots(session_id=session.id)
            assert [s.id for s in listed] == [ready.id]
            await session.files.write("/root/async.txt", b"second state")
            snap2 = await client.create_snapshot_and_wait(session.id, "async-second")
            assert snap2.state == SnapshotState.READY and snap2.id != ready.id

            await session.files.write("/root/async.txt", b"live")
            async with await client.create_and_wait(snapshot_id=ready.id) as restored:
                assert await restored.files.read("/root/async.txt") == b"async state"
                # two commands at once on one session
                a, b = await asyncio.gather(restored.exec("sh", "-c", "sleep 1; echo a"),
                                            restored.shell("echo b >&2; exit 4"))
                assert (a.exit_code, a.stdout, b.exit_code, b.stderr) == (0, "a\n", 4, "b\n")
            assert (await client.get(restored.id)).state == SessionState.TERMINATED

            copy = await client.restore_snapshot(snap2.id, name="async-copy")
            try:
                assert copy.name == "async-copy"
                assert await copy.files.read("/root/async.txt") == b"second state"
                assert await session.files.read("/root/async.txt") == b"live"
            finally:
                await copy.terminate()

            with pytest.raises(SnapshotNotFoundError):
                await client.get_snapshot("snp_doesnotexist")
            with pytest.raises(SnapshotNotFoundError):
                await client.create_and_wait(snapshot_id="snp_doesnotexist")
            for s in (ready, snap2):
                gone = await client.delete_snapshot(s.id)
                assert gone.state in (SnapshotState.DELETING, SnapshotState.DELETED)
            with pytest.raises(SnapshotFailedError):
                await client.wait_snapshot_ready(ready.id, timeout=30)
            left = await client.list_snapshots(session_id=session.id)
            assert all(s.state == SnapshotState.DELETING for s in left), left
        finally:
            await session.terminate()
        assert (await session.refresh()).state == SessionState.TERMINATED


# -- errors ---------------------------------------------------------------------------------


def test_not_found_errors(client: Client) -> None:
    with pytest.raises(SessionNotFoundError) as exc:
        client.get("ses_x")
    assert str(exc.value) == "session ses_x not found"
    with pytest.raises(SessionNotFoundError):
        client.terminate("ses_x")
    with pytest.raises(SessionNotFoundError):
        client.create_snapshot("ses_x", "nope")
    with pytest.raises(SnapshotNotFoundError) as sexc:
        client.create(snapshot_id="snp_x")
    assert "snp_x" in str(sexc.value)
    with pytest.raises(SnapshotNotFoundError):
        client.delete_snapshot("snp_x")
    with pytest.raises(SnapshotNotFoundError):
        client.wait_snapshot_ready("snp_x", timeout=1)
    # all are tenki errors, and not-found ones share a parent
    assert issubclass(SessionNotFoundError, tenkibox.NotFoundError)
    assert issubclass(SnapshotNotFoundError, TenkiError)


@pytest.mark.parametrize("kwargs, field", [
    ({"cpu": 99}, "cpu"),
    ({"memory_mb": 100}, "memory_mb"),
    ({"env": {"1BAD": "x"}}, "env"),
    ({"max_duration": "abc"}, "max_duration"),
    ({"max_duration": -5}, "max_duration"),
    ({"volumes": ["no-colon"]}, "volumes"),
])
def test_validation_error_names_the_field(client: Client, kwargs: dict[str, Any],
                                          field: str) -> None:
    before = len(client.list())
    with pytest.raises(ValidationError) as exc:
        client.create(**kwargs)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")
    assert len(client.list()) == before


def test_validation_errors_from_the_server(client: Client, src: Session, snap: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        src.files.write("/root", "x")  # a directory
    assert exc.value.field == "path"
    with pytest.raises(ValidationError) as exc:
        client.create(snapshot_id=snap.id, cpu=snap.cpu + 1)
    assert exc.value.field == "cpu"
    with pytest.raises(ValidationError) as exc:
        client.create_snapshot(src.id, "past", expires_at="2000-01-01T00:00:00Z")
    assert exc.value.field == "expires_at"
    with pytest.raises(ValidationError) as exc:
        client.create_snapshot(src.id, "bad", expires_at="tomorrow")
    assert exc.value.field == "expires_at"


def test_wait_timeout_then_snapshot_failed_on_deleted(client: Client, src: Session) -> None:
    with pytest.raises(WaitTimeoutError) as exc:
        client.create_snapshot_and_wait(src.id, "slow", timeout=0)
    snapshot_id = exc.value.details["id"]
    assert exc.value.details["state"] == "CREATING"
    assert "continues" in str(exc.value)
    # the capture went on in the background
    assert client.wait_snapshot_ready(snapshot_id).state == SnapshotState.READY
    client.delete_snapshot(snapshot_id)
    assert _wait_deleted(client, snapshot_id).state == SnapshotState.DELETED
    with pytest.raises(SnapshotFailedError) as fexc:
        client.create_and_wait(snapshot_id=snapshot_id, name="from-deleted")
    assert snapshot_id in str(fexc.value) and "DELETED" in str(fexc.value)
    with pytest.raises(SnapshotFailedError):
        client.restore_snapshot(snapshot_id)
    with pytest.raises(SnapshotFailedError):
        client.wait_snapshot_ready(snapshot_id, timeout=5)
    assert not [s for s in client.list() if s.name == "from-deleted"]


def test_connection_error_for_a_dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with Client(endpoint=url, autostart=False, timeout=5) as dead:
        with pytest.raises(tenkibox.ConnectionError) as exc:
            dead.list()
    assert not isinstance(exc.value, httpx.HTTPError)
    assert url in str(exc.value)
    monkeypatch.setenv("TENKI_API_ENDPOINT", url)
    with Client(timeout=5) as from_env, pytest.raises(tenkibox.ConnectionError):
        from_env.get_snapshot("snp_x")

    async def run() -> None:
        async with AsyncClient(endpoint=url, timeout=5) as adead:
            await adead.health()

    with pytest.raises(tenkibox.ConnectionError):
        asyncio.run(run())


def test_client_from_environment(tenki_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_API_ENDPOINT", tenki_server.url)
    monkeypatch.setenv("TENKI_API_KEY", (tenki_server.home / "admin.key").read_text().strip())
    with Client() as c:
        info = c.health()
        assert c.endpoint == tenki_server.url
    assert tenki_server.proc is not None and info.pid == tenki_server.proc.pid
    # without a key an explicit endpoint is refused (the local key file is not sent to it)
    monkeypatch.delenv("TENKI_API_KEY")
    with Client() as c, pytest.raises(AuthenticationError, match="no API key"):
        c.health()


# -- commands -------------------------------------------------------------------------------


def test_exec_result_and_check(src: Session) -> None:
    r = src.exec("sh", "-c", "echo out; echo oops >&2; exit 5", env={"X": "1"})
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (5, "out\n", "oops\n", False)
    with pytest.raises(CommandError) as exc:
        r.check()
    assert exc.value.result is r
    assert "exited with code 5" in str(exc.value) and "oops" in str(exc.value)
    assert src.exec("true").check().exit_code == 0
    assert src.exec("cat", stdin=b"\x00bytes in").stdout_bytes == b"\x00bytes in"
    assert src.shell("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert src.shell("echo $X-$GREETING", env={"X": "1"}).stdout == "1-hello\n"
    t = src.exec("sleep", "10", timeout=1)
    assert (t.exit_code, t.timed_out) == (124, True)
    with pytest.raises(CommandError, match="timed out"):
        t.check()


def test_start_streams_output_as_it_comes(src: Session) -> None:
    t0 = time.monotonic()
    proc = src.start("sh", "-c", "echo one; sleep 2; echo two >&2; sleep 1; echo three")
    seen: list[tuple[str, bytes, float]] = []
    for stream, data in proc:
        seen.append((stream, data, time.monotonic() - t0))
    result = proc.wait()
    assert result.exit_code == 0 and proc.exit_code == 0
    assert b"".join(d for s, d, _ in seen if s == "stdout") == b"one\nthree\n"
    assert b"".join(d for s, d, _ in seen if s == "stderr") == b"two\n"
    end = time.monotonic() - t0
    first = next(t for s, d, t in seen if d.startswith(b"one"))
    assert end - first > 2, f"'one' arrived at {first:.1f}s of {end:.1f}s: not streamed"
    assert (result.stdout, result.stderr) == ("one\nthree\n", "two\n")


def test_start_stdin_interactive_and_kill(src: Session) -> None:
    proc = src.start("cat", stdin=True)
    out = iter(proc)
    proc.write_stdin("first\n")
    got = b""
    while got != b"first\n":
        stream, data = next(out)
        assert stream == "stdout"
        got += data
    assert proc.exit_code is None, "cat must still run: its stdin is open"
    proc.write_stdin(b"second\n")
    proc.close_stdin()
    result = proc.wait()
    assert result.exit_code == 0
    assert result.stdout == "first\nsecond\n"

    t0 = time.monotonic()
    sleeper = src.start("sleep", "300")
    sleeper.kill()
    killed = sleeper.wait()
    assert killed.exit_code == 128 + 9 and not killed.timed_out
    assert time.monotonic() - t0 < 30
    term = src.start("sleep", "300")
    term.kill(15)
    assert term.wait().exit_code == 128 + 15


def test_session_handle_refresh_and_get(client: Client, src: Session) -> None:
    proc = src.start("sleep", "3")
    assert client.get(src.id).refresh().state == SessionState.RUNNING
    proc.wait()
    deadline = time.monotonic() + 10
    while src.refresh().state != SessionState.READY and time.monotonic() < deadline:
        time.sleep(0.1)
    assert src.state == SessionState.READY
    assert src.id in [s.id for s in client.list()]
    assert src.id in [s.id for s in client.sessions.list(state="READY")]


# -- the context manager, and what a terminated session answers -----------------------------


def test_with_block_terminates(client: Client, snap: Any) -> None:
    with client.create_and_wait(snapshot_id=snap.id, name="ctx") as s:
        assert s.files.read("/root/fixture.txt") == b"in the fixture snapshot\n"
        sid = s.id
    assert client.get(sid).state == SessionState.TERMINATED
    assert s.state == SessionState.TERMINATED

    with pytest.raises(RuntimeError, match="boom"), \
            client.create_and_wait(snapshot_id=snap.id, name="ctx-raise") as s2:
        raise RuntimeError("boom")
    assert client.get(s2.id).state == SessionState.TERMINATED

    # a terminated session refuses work with ConflictError
    with pytest.raises(ConflictError) as exc:
        client.create_snapshot(sid, "too-late")
    assert sid in str(exc.value) and "TERMINATED" in str(exc.value)
    with pytest.raises(ConflictError):
        client.create_snapshot_and_wait(sid, "too-late")
    with pytest.raises(ConflictError):
        s.exec("true")
    with pytest.raises(ConflictError):
        s.files.read("/root/fixture.txt")
    assert s.terminate().state == SessionState.TERMINATED  # idempotent


# -- a restored session is a standard session: it can be snapshotted in turn ----------------


def test_snapshot_of_a_restored_session(client: Client, snap: Any) -> None:
    with client.create_and_wait(snapshot_id=snap.id, name="second-gen") as restored:
        restored.files.write("/root/second.txt", "second generation\n")
        again = client.create_snapshot_and_wait(restored.id, "second-generation")
        try:
            with client.create_and_wait(snapshot_id=again.id) as third:
                assert third.files.read("/root/fixture.txt") == b"in the fixture snapshot\n"
                assert third.files.read("/root/second.txt") == b"second generation\n"
        finally:
            client.delete_snapshot(again.id)

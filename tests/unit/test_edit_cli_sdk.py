"""Renaming and extending through the SDK (sync and async, every spelling) and the CLI:
``session.update`` / ``session.extend``, ``client.snapshots.update`` and ``tenki sandbox update |
extend`` / ``tenki sandbox snapshot update``, against the real server in-process over the fake
host (tests/support)."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from support.server import InProcessServer

from tenkibox import AsyncClient, Client, errors, models
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.client import (
    AsyncSession,
    AsyncSessions,
    AsyncSnapshots,
    Session,
    Sessions,
    Snapshots,
)
from tenkibox.client import _core as core

Run = Callable[..., Result]
S = models.SessionState
MISSING_SES = "ses_" + "0" * 26
MISSING_SNP = "snp_" + "0" * 26


@pytest.fixture
def client(inproc: InProcessServer) -> Iterator[Client]:
    with Client(endpoint=inproc.url) as c:
        yield c


@pytest.fixture
def run(inproc: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), obj=CliState())

    return invoke


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def _bad(result: Result, option: str, code: int = 2) -> Result:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert option in result.stderr and "Traceback" not in result.output, result.output
    return result


def _soon(record_time: datetime | None, seconds: float, slack: float = 60.0) -> bool:
    assert record_time is not None
    target = datetime.now(UTC) + timedelta(seconds=seconds)
    return abs((record_time - target).total_seconds()) < slack


# -- core: the bodies ---------------------------------------------------------------------------


def test_core_bodies() -> None:
    assert core.session_update().model_dump(exclude_unset=True) == {}
    body = core.session_update("n", {})
    assert body.model_dump(exclude_unset=True) == {"name": "n", "metadata": {}}
    assert core.session_extend("1h").seconds == 3600
    assert core.session_extend(90).seconds == 90
    for bad in (0, -1, "0", "soon", None, float("inf")):
        with pytest.raises(errors.ValidationError) as info:
            core.session_extend(bad)  # type: ignore[arg-type]
        assert info.value.field == "seconds"
    with pytest.raises(errors.ValidationError) as info:
        core.session_update(name="x" * 65)
    assert info.value.field == "name"
    # not given, given, removed: three different bodies
    assert core.snapshot_update().model_dump(exclude_unset=True) == {}
    when = datetime(2099, 1, 1, tzinfo=UTC)
    sent = core.update_snapshot("snp_x", core.snapshot_update(expires="2099-01-01T00:00:00"))
    assert sent.json == {"expires_at": "2099-01-01T00:00:00Z"}
    assert core.snapshot_update(expires=when).expires_at == when
    sent = core.update_snapshot("snp_x", core.snapshot_update(name="a", clear_expiry=True))
    assert sent.method == "PATCH" and sent.json == {"name": "a", "expires_at": None}
    with pytest.raises(errors.ValidationError) as info:
        core.snapshot_update(expires=when, clear_expiry=True)
    assert info.value.field == "clear_expiry"
    with pytest.raises(errors.ValidationError) as info:
        core.snapshot_update(expires="next week")
    assert info.value.field == "expires_at"
    call = core.extend_session("ses/x", core.session_extend(5))
    assert (call.method, call.path, call.json) == ("POST", "/v1/sessions/ses%2Fx/extend",
                                                   {"seconds": 5.0})


# -- SDK ------------------------------------------------------------------------------------------


def test_sync_session_update_and_extend(client: Client) -> None:
    s = client.create_and_wait(name="first", metadata={"a": "1"}, timeout=5)
    assert s.record.expires_at is None
    assert s.update(name="second") is s
    assert s.name == "second" and s.record.metadata == {"a": "1"}  # metadata stays
    assert s.update(metadata={"b": "2"}).record.metadata == {"b": "2"}  # replaced whole
    assert s.name == "second"
    assert client.get(s.id).record.metadata == {"b": "2"}
    assert s.update(metadata={}).record.metadata == {}
    # the client and namespace spellings answer handles
    again = client.update_session(s.id, name="third")
    assert isinstance(again, Session) and again.name == "third"
    assert client.sessions.update(s.id, metadata={"c": "3"}).record.metadata == {"c": "3"}
    assert client.sessions.update(s.id).name == "third"  # nothing given: as it is

    # no expiry: one from now; then later by as much
    assert s.extend("1h") is s
    first = s.record.expires_at
    assert first is not None and _soon(first, 3600)
    second = client.sessions.extend(s.id, 600).record.expires_at
    assert second is not None and abs((second - first).total_seconds() - 600) < 1
    assert client.extend_session(s.id, "10m").record.expires_at > second  # type: ignore[operator]

    with pytest.raises(errors.ValidationError) as info:
        s.extend(0)
    assert info.value.field == "seconds"
    with pytest.raises(errors.ValidationError):
        s.update(name="")
    s.terminate()
    with pytest.raises(errors.ConflictError, match="no longer"):
        s.update(name="late")
    with pytest.raises(errors.ConflictError):
        s.extend(60)
    with pytest.raises(errors.SessionNotFoundError):
        client.sessions.update(MISSING_SES, name="x")
    with pytest.raises(errors.SessionNotFoundError):
        client.extend_session(MISSING_SES, 60)


def test_sync_extend_max_duration(client: Client) -> None:
    s = client.create_and_wait(max_duration="30m", timeout=5)
    before = s.record.expires_at
    assert before is not None
    after = s.extend(3600).record.expires_at
    assert after is not None and abs((after - before).total_seconds() - 3600) < 1


def test_sync_snapshot_update(client: Client) -> None:
    s = client.create_and_wait(timeout=5)
    snap = s.snapshot("base", expires_at=datetime.now(UTC) + timedelta(days=1))
    assert snap.expires_at is not None
    renamed = client.snapshots.update(snap.id, name="renamed")
    assert renamed.name == "renamed" and renamed.expires_at == snap.expires_at  # stays
    later = datetime.now(UTC) + timedelta(days=30)
    moved = client.update_snapshot(snap.id, expires_at=later)
    assert moved.expires_at is not None and abs((moved.expires_at - later).total_seconds()) < 1
    assert moved.name == "renamed"
    cleared = client.snapshots.update(snap.id, clear_expiry=True)
    assert cleared.expires_at is None and cleared.name == "renamed"
    assert client.get_snapshot(snap.id).expires_at is None
    assert client.snapshots.update(snap.id, expires_at="2099-01-01T00:00:00Z").expires_at \
        == datetime(2099, 1, 1, tzinfo=UTC)

    with pytest.raises(errors.ValidationError) as info:
        client.snapshots.update(snap.id, expires_at=datetime.now(UTC) - timedelta(hours=1))
    assert info.value.field == "expires_at"
    with pytest.raises(errors.ValidationError) as info:
        client.snapshots.update(snap.id, expires_at=later, clear_expiry=True)
    assert info.value.field == "clear_expiry"
    with pytest.raises(errors.SnapshotNotFoundError):
        client.snapshots.update(MISSING_SNP, name="x")
    client.snapshots.delete(snap.id)
    with pytest.raises((errors.ConflictError, errors.SnapshotNotFoundError)):
        client.snapshots.update(snap.id, name="gone")


def test_sync_pause_snapshot_cannot_be_updated(client: Client) -> None:
    s = client.create_and_wait(timeout=5).pause()
    pause = [p for p in client.list_snapshots(s.id) if p.type == models.SnapshotType.PAUSE]
    assert pause
    with pytest.raises(errors.ConflictError, match="owner"):
        client.snapshots.update(pause[0].id, name="mine")
    # a paused session may still be renamed and extended
    assert s.update(name="napping").name == "napping"
    assert s.extend(60).record.expires_at is not None
    assert s.state == S.PAUSED


def test_async_sdk(inproc: InProcessServer) -> None:
    async def main() -> None:
        async with AsyncClient(endpoint=inproc.url) as client:
            s = await client.create_and_wait(name="one", timeout=5)
            assert await s.update(name="two", metadata={"k": "v"}) is s
            assert s.name == "two" and s.record.metadata == {"k": "v"}
            got = await client.sessions.update(s.id, name="three")
            assert isinstance(got, AsyncSession) and got.name == "three"
            assert (await client.update_session(s.id, metadata={})).record.metadata == {}
            assert await s.extend("2h") is s
            assert _soon(s.record.expires_at, 7200)
            first = s.record.expires_at
            second = (await client.sessions.extend(s.id, 60)).record.expires_at
            assert first is not None and second is not None
            assert abs((second - first).total_seconds() - 60) < 1
            await client.extend_session(s.id, "1m")

            snap = await s.snapshot("a")
            assert snap.expires_at is None
            later = datetime.now(UTC) + timedelta(days=30)
            snap = await client.snapshots.update(snap.id, name="b", expires_at=later)
            assert snap.name == "b" and snap.expires_at is not None
            snap = await client.update_snapshot(snap.id, clear_expiry=True)
            assert snap.expires_at is None and snap.name == "b"

            with pytest.raises(errors.ValidationError):
                await s.extend(-5)
            with pytest.raises(errors.SessionNotFoundError):
                await client.sessions.extend(MISSING_SES, 60)
            with pytest.raises(errors.SnapshotNotFoundError):
                await client.snapshots.update(MISSING_SNP, clear_expiry=True)
            await s.terminate()
            with pytest.raises(errors.ConflictError):
                await s.update(name="late")

    asyncio.run(main())


def test_sync_and_async_have_the_same_signatures() -> None:
    pairs = (
        (Client, AsyncClient, ("update_session", "extend_session", "update_snapshot")),
        (Session, AsyncSession, ("update", "extend")),
    )
    for sync_cls, async_cls, names in pairs:
        for name in names:
            s_fn, a_fn = getattr(sync_cls, name), getattr(async_cls, name)
            assert inspect.signature(s_fn).parameters == inspect.signature(a_fn).parameters
            assert inspect.iscoroutinefunction(a_fn) and not inspect.iscoroutinefunction(s_fn)
    for ns in (Sessions, AsyncSessions):
        assert {"update", "extend"} <= set(vars(ns))
    for sns in (Snapshots, AsyncSnapshots):
        assert "update" in vars(sns)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_sandbox_update(run: Run, client: Client) -> None:
    s = client.create_and_wait(name="old", metadata={"x": "1"}, timeout=5)
    out = _ok(run("sandbox", "update", "--session", s.id, "--name", "new")).stdout
    assert "id:" in out and s.id in out and "new" in out and "x=1" in out
    record = json.loads(_ok(run("sandbox", "update", "--session", s.id, "--metadata", "a=b",
                                "--metadata", "c=d=e", "--json")).stdout)
    assert record["id"] == s.id and record["name"] == "new"
    assert record["metadata"] == {"a": "b", "c": "d=e"}
    assert client.get(s.id).record.metadata == {"a": "b", "c": "d=e"}
    _ok(run("sandbox", "update", s.id, "--name", "positional"))
    assert client.get(s.id).name == "positional"

    _bad(run("sandbox", "update", "--session", s.id, "--metadata", "novalue"), "--metadata")
    _bad(run("sandbox", "update", "--session", s.id, "--name", "x" * 65), "--name")
    _bad(run("sandbox", "update", "--session", s.id, "--name", "a\x01b"), "--name")
    result = run("sandbox", "update", "--session", s.id)
    assert result.exit_code == 2 and "nothing to change" in result.output
    result = run("sandbox", "update", "--session", MISSING_SES, "--name", "x")
    assert result.exit_code == 1 and "not found" in result.stderr
    s.terminate()
    result = run("sandbox", "update", "--session", s.id, "--name", "x")
    assert result.exit_code == 1 and "no longer" in result.stderr


def test_cli_sandbox_extend(run: Run, client: Client) -> None:
    s = client.create_and_wait(timeout=5)
    out = _ok(run("sandbox", "extend", "--session", s.id, "--by", "2h")).stdout
    expires = client.get(s.id).record.expires_at
    assert _soon(expires, 7200)
    assert out == f"{s.id} expires_at {expires.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}\n"  # type: ignore[union-attr]
    record = json.loads(_ok(run("sandbox", "extend", "--session", s.id, "--by", "30m",
                                "--json")).stdout)
    later = datetime.fromisoformat(record["expires_at"])
    assert expires is not None and abs((later - expires).total_seconds() - 1800) < 1

    for bad in ("0", "-5m", "soon", "20000d"):
        _bad(run("sandbox", "extend", "--session", s.id, "--by", bad), "--by")
    result = run("sandbox", "extend", "--session", s.id)
    assert result.exit_code == 2 and "--by" in result.output
    result = run("sandbox", "extend", "--session", MISSING_SES, "--by", "1h")
    assert result.exit_code == 1 and "not found" in result.stderr
    help_text = _ok(run("sandbox", "extend", "--help")).stdout
    assert "--by" in help_text and "--json" in help_text


def test_cli_snapshot_update(run: Run, client: Client) -> None:
    s = client.create_and_wait(timeout=5)
    snap = s.snapshot("base")
    out = _ok(run("sandbox", "snapshot", "update", snap.id, "--name", "renamed")).stdout
    assert snap.id in out and "renamed" in out
    record = json.loads(_ok(run("sandbox", "snapshot", "update", snap.id, "--expires-at",
                                "30d", "--json")).stdout)
    assert record["name"] == "renamed" and _soon(
        datetime.fromisoformat(record["expires_at"]), 30 * 86400)
    record = json.loads(_ok(run("sandbox", "snapshot", "update", snap.id, "--expires-at",
                                "2099-06-01T12:00:00Z", "--json")).stdout)
    assert datetime.fromisoformat(record["expires_at"]) == datetime(2099, 6, 1, 12, tzinfo=UTC)
    out = _ok(run("sandbox", "snapshot", "update", snap.id, "--no-expiry")).stdout
    assert "expires_at:" in out
    assert client.get_snapshot(snap.id).expires_at is None

    _bad(run("sandbox", "snapshot", "update", snap.id, "--expires-at", "2001-01-01T00:00:00Z"),
         "--expires-at")
    _bad(run("sandbox", "snapshot", "update", snap.id, "--expires-at", "whenever"),
         "--expires-at")
    _bad(run("sandbox", "snapshot", "update", snap.id, "--expires-at", "1d", "--no-expiry"),
         "--no-expiry")
    _bad(run("sandbox", "snapshot", "update", snap.id, "--name", ""), "--name")
    result = run("sandbox", "snapshot", "update", snap.id)
    assert result.exit_code == 2 and "nothing to change" in result.output
    result = run("sandbox", "snapshot", "update", MISSING_SNP, "--name", "x")
    assert result.exit_code == 1 and "not found" in result.stderr
    assert client.get_snapshot(snap.id).name == "renamed"


def test_cli_messages(run: Run, client: Client) -> None:
    s = client.create_and_wait(timeout=5)
    snap = s.snapshot("base")
    result = run("sandbox", "snapshot", "update", snap.id, "--expires-at", "2001-01-01T00:00:00Z")
    assert result.stderr.strip().endswith("--expires-at: must be in the future, got "
                                          "2001-01-01T00:00:00Z")
    result = run("sandbox", "extend", "--session", s.id, "--by", "0")
    assert "--by: must be positive" in result.stderr
    result = run("sandbox", "update", "--session", s.id, "--name", "")
    assert "--name: " in result.stderr and "name: name" not in result.stderr

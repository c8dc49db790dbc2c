"""Pause and resume through the SDK (sync and async, both spellings) and ``tenki sandbox
pause|resume``, against the real server in-process over the fake host (tests/support)."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from support.fake_host import FakeHost
from support.server import InProcessServer

from tenkibox import AsyncClient, Client, errors, models
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.client import AsyncSession, AsyncSessions, Session, Sessions

Run = Callable[..., Result]
S = models.SessionState


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


# -- SDK ------------------------------------------------------------------------------------------


def test_sync_sdk(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(timeout=5)
    assert s.pause() is s and s.state == S.PAUSED
    assert client.get(s.id).state == S.PAUSED
    assert s.resume() is s and s.state == S.READY
    # the client and namespace spellings
    assert client.pause(s.id).state == S.PAUSED
    assert client.sessions.resume(s.id).state == S.READY
    gate = fake_host.block("capture")
    assert client.sessions.pause(s.id, wait=False).state == S.PAUSING
    gate.release()
    assert client.wait_session_ready(s.id, 5).state == S.PAUSED  # a wait waits through PAUSING
    fake_host.fail_next("restore", errors.InternalError("no room"))
    with pytest.raises(errors.SessionFailedError, match="resume failed: no room"):
        s.resume()


def test_sync_sdk_pause_failure_and_timeout(client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(timeout=5)
    fake_host.fail_next("capture", errors.InternalError("disk full"))
    with pytest.raises(errors.SnapshotFailedError, match=r"was not paused .*disk full"):
        s.pause()
    assert s.refresh().state == S.READY
    gate = fake_host.block("capture")
    with pytest.raises(errors.WaitTimeoutError, match="still PAUSING"):
        s.pause(timeout=0.2)
    gate.release()
    assert s.pause().state == S.PAUSED


def test_async_sdk(inproc: InProcessServer, fake_host: FakeHost) -> None:
    async def main() -> None:
        async with AsyncClient(endpoint=inproc.url) as client:
            s = await client.create_and_wait(timeout=5)
            assert (await s.pause()).state == S.PAUSED
            assert (await s.resume()).state == S.READY
            assert (await client.sessions.pause(s.id)).state == S.PAUSED
            assert (await client.resume(s.id, wait=False)).state in (S.RESUMING, S.READY)
            assert (await client.wait_session_ready(s.id, 5)).state == S.READY
            fake_host.fail_next("capture", errors.InternalError("disk full"))
            with pytest.raises(errors.SnapshotFailedError):
                await s.pause()

    asyncio.run(main())


def test_sync_and_async_have_the_same_signatures() -> None:
    for sync_cls, async_cls in ((Client, AsyncClient), (Session, AsyncSession)):
        for name in ("pause", "resume"):
            s_fn, a_fn = getattr(sync_cls, name), getattr(async_cls, name)
            assert inspect.signature(s_fn).parameters == inspect.signature(a_fn).parameters
            assert inspect.iscoroutinefunction(a_fn) and not inspect.iscoroutinefunction(s_fn)
    for ns in (Sessions, AsyncSessions):  # the namespace spelling is the client's method
        assert {"pause", "resume"} <= set(vars(ns))


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_pause_and_resume(run: Run, client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(timeout=5)
    assert _ok(run("sandbox", "pause", "--session", s.id)).stdout == f"{s.id} PAUSED\n"
    assert _ok(run("sandbox", "pause", s.id)).stdout == f"{s.id} PAUSED\n"  # idempotent
    record = json.loads(_ok(run("sandbox", "resume", "--session", s.id, "--json")).stdout)
    assert record["id"] == s.id and record["state"] == "READY"

    gate = fake_host.block("capture")
    out = _ok(run("sandbox", "pause", "--session", s.id, "--no-wait", "--json")).stdout
    assert json.loads(out)["state"] == "PAUSING"
    gate.release()
    assert client.wait_session_ready(s.id, 5).state == S.PAUSED
    gate = fake_host.block("restore")
    assert _ok(run("sandbox", "resume", "--session", s.id, "--no-wait")).stdout \
        == f"{s.id} RESUMING\n"
    gate.release()
    assert client.wait_session_ready(s.id, 5).state == S.READY
    listed = _ok(run("sandbox", "list")).stdout
    assert s.id in listed


def test_cli_errors(run: Run, client: Client, fake_host: FakeHost) -> None:
    s = client.create_and_wait(timeout=5)
    fake_host.fail_next("capture", errors.InternalError("disk full"))
    result = run("sandbox", "pause", "--session", s.id)
    assert result.exit_code != 0
    assert "disk full" in result.stderr and "Traceback" not in result.output
    result = run("sandbox", "resume", "--session", s.id)  # READY: answered as it is
    assert _ok(result).stdout == f"{s.id} READY\n"
    s.pause()
    result = run("sandbox", "exec", "--session", s.id, "true")
    assert result.exit_code != 0 and "paused" in result.stderr
    result = run("sandbox", "pause")
    assert result.exit_code == 2 and "missing session id" in result.output
    help_text = _ok(run("sandbox", "pause", "--help")).stdout
    assert "--no-wait" in help_text and "--json" in help_text

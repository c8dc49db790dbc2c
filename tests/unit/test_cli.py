"""The ``tenki`` CLI (through the SDK) against the real server in-process: the real app and
control plane over SQLite, with the fake host below them (no VMs; see tests/support)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from support.fake_host import FakeHost
from support.server import InProcessServer

from tenkibox import Client, _version, errors, models
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli

URL = "http://fake.test"

Run = Callable[..., Result]


@pytest.fixture
def run(inproc: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """``tenki ARGS`` with ``TENKI_API_ENDPOINT`` set to the in-process server."""
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))  # never the user's
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)

    def invoke(*args: str, input: bytes | str | None = None, factory: Any = None) -> Result:
        state = CliState(client_factory=factory)
        return CliRunner().invoke(cli, list(args), obj=state, input=input)

    return invoke


def _client(server: InProcessServer) -> Client:
    return Client(endpoint=server.url)


def _ready_session(server: InProcessServer, **kw: Any) -> str:
    s = _client(server).create_and_wait(**kw)
    server.requests.clear()
    return s.id


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


# -- bad input: one line, exit 2, nothing sent --------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["sandbox", "create", "--cpu", "99"], "error: --cpu: must be between 1 and 16, got 99"),
        (
            ["sandbox", "create", "--cpu", "two"],
            "error: --cpu: must be an integer between 1 and 16",
        ),
        (["sandbox", "create", "--memory-mb", "100"], "error: --memory-mb: must be between 512"),
        (["sandbox", "create", "--env", "FOO"], "error: --env: expected KEY=VALUE, got 'FOO'"),
        (["sandbox", "create", "--env", "1X=y"], "error: --env: invalid variable name '1X'"),
        (["sandbox", "create", "--metadata", "=v"], "error: --metadata: expected KEY=VALUE"),
        (["sandbox", "create", "--max-duration", "3x"], "error: --max-duration: cannot parse '3x'"),
        (["sandbox", "create", "--max-duration", "-5m"], "error: --max-duration: must be positive"),
        (["sandbox", "create", "--wait-timeout", "later"], "error: --wait-timeout: cannot parse"),
        (["sandbox", "create", "--volume", "vol_x"], "error: --volume: expected VOLUME:/path[:ro]"),
        (
            ["sandbox", "create", "--volume", "vol_x:rel"],
            "error: --volume.path: must be an absolute",
        ),
        (
            [
                "sandbox",
                "snapshot",
                "create",
                "--session",
                "ses_x",
                "--name",
                "n",
                "--expires-at",
                "2020-01-01T00:00:00Z",
            ],
            "error: --expires-at: must be in the future",
        ),
        (
            [
                "sandbox",
                "snapshot",
                "create",
                "--session",
                "ses_x",
                "--name",
                "n",
                "--expires-at",
                "someday",
            ],
            "error: --expires-at: cannot parse 'someday': must be in the future",
        ),
        (
            ["sandbox", "snapshot", "restore", "snp_x", "--cpu", "0"],
            "error: --cpu: must be between 1 and 16, got 0",
        ),
        (
            ["sandbox", "volume", "create", "--name", "v", "--size", "huge"],
            "error: --size: cannot parse",
        ),
        (
            ["sandbox", "volume", "create", "--name", "v", "--size", "1KiB"],
            "error: --size: must be between",
        ),
        (
            ["sandbox", "exec", "--session", "ses_x", "--timeout", "x", "ls"],
            "error: --timeout: cannot parse",
        ),
        (
            ["sandbox", "files", "write", "--session", "s", "--mode", "999", "/p", "-"],
            "error: --mode",
        ),
        (["sandbox", "get"], "error: missing session id"),
        (["sandbox", "exec", "ls"], "error: Missing option '--session'"),
        (["sandbox", "nope"], "error: No such command 'nope'"),
    ],
)
def test_bad_input(run: Run, inproc: InProcessServer, args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert _one_error_line(result).startswith(message)
    assert result.stdout == ""
    assert inproc.requests == []


def test_entry_point_has_no_traceback(tmp_path: Path) -> None:
    env = {"TENKI_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "tenkibox", "sandbox", "create", "--cpu", "99"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == "error: --cpu: must be between 1 and 16, got 99\n"
    assert proc.stdout == ""


# -- sessions -----------------------------------------------------------------------------------


def test_create_waits_and_prints_the_id(run: Run, inproc: InProcessServer) -> None:
    result = run(
        "sandbox", "create", "--name", "box", "--cpu", "4", "--memory-mb", "1024",
        "--env", "A=1=2", "--metadata", "team=x", "--max-duration", "30m",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sid = result.stdout.strip()
    assert _client(inproc).get(sid).state == models.SessionState.READY
    body = json.loads(inproc.requests.to("POST", "/v1/sessions")[0].body)
    assert body == {
        "name": "box",
        "cpu": 4,
        "memory_mb": 1024,
        "env": {"A": "1=2"},
        "metadata": {"team": "x"},
        "max_duration_s": 1800.0,
    }


def test_create_json_and_no_wait(run: Run, inproc: InProcessServer) -> None:
    result = run("sandbox", "create", "--no-wait", "--json")
    assert result.exit_code == 0
    record = models.Session.model_validate_json(result.stdout)
    assert record.state == models.SessionState.CREATING
    assert inproc.requests.to("GET", "/wait") == []


def test_create_failure_and_timeout(run: Run, fake_host: FakeHost) -> None:
    fake_host.fail_next("boot", errors.InternalError("the VM could not boot"))
    result = run("sandbox", "create")
    assert result.exit_code == 1
    assert "is FAILED: the VM could not boot" in _one_error_line(result)
    fake_host.block("boot")
    result = run("sandbox", "create", "--wait-timeout", "0.1s")
    assert result.exit_code == 1
    assert "is still CREATING after 0.1s; it continues in the background" in _one_error_line(result)


def test_list_get_terminate(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc, name="box")
    result = run("sandbox", "list")
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATE"]
    assert row.split()[:3] == [sid, "box", "READY"]
    assert json.loads(run("sandbox", "list", "--json").stdout)[0]["id"] == sid
    for args in (["sandbox", "get", sid], ["sandbox", "get", "--session", sid]):
        out = run(*args).stdout
        assert f"id:            {sid}" in out and "memory:        4.0 GiB" in out
    assert json.loads(run("sandbox", "get", sid, "--json").stdout)["name"] == "box"
    result = run("sandbox", "get", "ses_nope")
    assert result.exit_code == 1
    assert _one_error_line(result) == "error: session ses_nope not found"
    assert run("sandbox", "terminate", "--session", sid).stdout == f"{sid} TERMINATED\n"
    assert json.loads(run("sandbox", "terminate", sid, "--json").stdout)["state"] == "TERMINATED"


def test_empty_list(run: Run) -> None:
    result = run("sandbox", "list")
    assert result.exit_code == 0 and result.stdout == ""
    assert run("sandbox", "list", "--json").stdout.strip() == "[]"


# -- exec ---------------------------------------------------------------------------------------


def test_exec_propagates_output_and_exit_code(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    result = run("sandbox", "exec", "--session", sid, "sh", "-c", "echo hi; echo err >&2; exit 3")
    assert result.exit_code == 3
    assert result.stdout == "hi\n"
    assert result.stderr == "err\n"


def test_exec_options_after_cmd_belong_to_cmd(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    result = run(
        "sandbox", "exec", "--session", sid, "--env", "K=V", "--cwd", "/w", "--no-stdin",
        "bash", "-lc", "echo ok", "--session", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    body = models.ExecRequest.model_validate_json(inproc.requests.to("POST", "/processes")[0].body)
    assert body.argv == ["bash", "-lc", "echo ok", "--session", "--json"]
    assert (body.env, body.cwd, body.stdin) == ({"K": "V"}, "/w", False)


def test_exec_streams_stdin_and_closes_it(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    data = b"line 1\nline 2\n\x00\xff"
    result = run("sandbox", "exec", "--session", sid, "cat", input=data)
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == data
    body = models.ExecRequest.model_validate_json(inproc.requests.to("POST", "/processes")[0].body)
    assert body.stdin is True and body.stdin_data is None  # streamed, not sent up front
    assert b"".join(r.body for r in inproc.requests.to("POST", "/stdin")) == data
    assert len(inproc.requests.to("POST", "/stdin/close")) == 1


def test_exec_empty_stdin_still_closes(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    result = run("sandbox", "exec", "--session", sid, "sh", "-c", "cat; exit 5", input=b"")
    assert result.exit_code == 5
    assert len(inproc.requests.to("POST", "/stdin/close")) == 1


def test_exec_timeout_exits_124(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    result = run(
        "sandbox", "exec", "--session", sid, "--timeout", "0.2s", "--no-stdin", "sleep", "9"
    )
    assert result.exit_code == 124
    body = models.ExecRequest.model_validate_json(inproc.requests.to("POST", "/processes")[0].body)
    assert body.timeout_s == 0.2


def test_exec_on_missing_session(run: Run) -> None:
    result = run("sandbox", "exec", "--session", "ses_nope", "--no-stdin", "ls")
    assert result.exit_code == 1
    assert _one_error_line(result) == "error: session ses_nope not found"


# -- files --------------------------------------------------------------------------------------


def test_files_write_and_read(
    run: Run, inproc: InProcessServer, fake_host: FakeHost, tmp_path: Path
) -> None:
    sid = _ready_session(inproc)
    local = tmp_path / "f.bin"
    local.write_bytes(b"\x00binary\xff")
    result = run("sandbox", "files", "write", "--session", sid, "/data/f.bin", str(local))
    assert result.exit_code == 0, result.output
    assert result.stdout == "/data/f.bin: 8 B written\n"
    assert run("sandbox", "files", "read", "--session", sid, "/data/f.bin").stdout_bytes == (
        b"\x00binary\xff"
    )
    result = run(
        "sandbox", "files", "write", "--session", sid, "/x", "-", "--json", input=b"from stdin"
    )
    assert json.loads(result.stdout) == {"path": "/x", "size_bytes": 10}
    assert fake_host.file(sid, "/x") == b"from stdin"
    result = run("sandbox", "files", "write", "--session", sid, "/y", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "cannot read" in _one_error_line(result)
    result = run("sandbox", "files", "read", "--session", sid, "/nope")
    assert result.exit_code == 1 and "/nope" in _one_error_line(result)


# -- snapshots ----------------------------------------------------------------------------------


def test_snapshot_lifecycle(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    result = run(
        "sandbox", "snapshot", "create", "--session", sid, "--name", "before-upgrade",
        "--expires-at", "2999-03-20T12:00:00Z",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    snap_id = result.stdout.strip()
    snap = _client(inproc).get_snapshot(snap_id)
    assert snap.state == models.SnapshotState.READY
    assert snap.expires_at == datetime(2999, 3, 20, 12, tzinfo=UTC)
    listed = json.loads(run("sandbox", "snapshot", "list", "--json").stdout)
    assert [s["id"] for s in listed] == [snap_id]
    assert json.loads(run("sandbox", "snapshot", "list", "--json", "--session", "x").stdout) == []
    table = run("sandbox", "snapshot", "list").stdout.splitlines()
    assert table[1].split()[:4] == [snap_id, "before-upgrade", sid, "READY"]
    out = run("sandbox", "snapshot", "get", snap_id).stdout
    assert "size:          300.0 MiB" in out and "expires_at:    2999-03-20T12:00:00Z" in out
    assert json.loads(run("sandbox", "snapshot", "get", snap_id, "--json").stdout)["id"] == snap_id

    restored = run("sandbox", "snapshot", "restore", snap_id, "--name", "restored-copy")
    assert restored.exit_code == 0, restored.output
    new_sid = restored.stdout.strip()
    record = _client(inproc).get(new_sid).record
    assert record.snapshot_id == snap_id
    assert record.state == models.SessionState.READY

    result = run("sandbox", "snapshot", "delete", snap_id)
    assert result.stdout == f"{snap_id} DELETING\n"


def test_snapshot_restore_is_create_with_snapshot(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    snap = _client(inproc).create_snapshot_and_wait(sid, "s")
    vol = _client(inproc).create_volume("cache", "1GiB")
    inproc.requests.clear()
    a = run(
        "sandbox", "snapshot", "restore", snap.id, "--name", "c", "--volume", f"{vol.id}:/cache"
    )
    assert a.exit_code == 0, a.output
    # the volume is attached to the first restore until it ends
    assert run("sandbox", "terminate", a.stdout.strip()).exit_code == 0
    b = run(
        "sandbox", "create", "--snapshot", snap.id, "--name", "c", "--volume", f"{vol.id}:/cache"
    )
    assert b.exit_code == 0, b.output
    first, second = inproc.requests.to("POST", "/v1/sessions")
    assert first.body == second.body
    assert json.loads(first.body) == {
        "name": "c",
        "snapshot_id": snap.id,
        "volumes": [{"volume_id": vol.id, "path": "/cache", "read_only": False}],
    }


def test_snapshot_wait_timeout_and_failure(
    run: Run, inproc: InProcessServer, fake_host: FakeHost
) -> None:
    sid = _ready_session(inproc)
    gate = fake_host.block("capture")
    result = run(
        "sandbox", "snapshot", "create", "--session", sid, "--name", "s", "--wait-timeout", "0.1s"
    )
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert line.startswith("error: snapshot snp_")
    assert line.endswith("is still CREATING after 0.1s; it continues in the background")
    result = run(
        "sandbox", "snapshot", "create", "--session", sid, "--name", "s", "--no-wait", "--json"
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["state"] == "CREATING"
    gate.release()
    for snap in _client(inproc).list_snapshots(session_id=sid):
        assert _client(inproc).wait_snapshot_ready(snap.id, timeout=5).state == "READY"
    fake_host.fail_next("capture", errors.InternalError("disk capture failed"))
    result = run("sandbox", "snapshot", "create", "--session", sid, "--name", "s")
    assert result.exit_code == 1
    assert "is FAILED: capture failed: disk capture failed" in _one_error_line(result)
    result = run("sandbox", "snapshot", "get", "snp_nope")
    assert result.exit_code == 1 and _one_error_line(result) == "error: snapshot snp_nope not found"


# -- volumes ------------------------------------------------------------------------------------


def test_volume_commands(run: Run, inproc: InProcessServer) -> None:
    sid = _ready_session(inproc)
    result = run("sandbox", "volume", "create", "--name", "data", "--size", "1GiB")
    assert result.exit_code == 0, result.output
    vid = result.stdout.strip()
    assert _client(inproc).volumes.get(vid).size_bytes == 1 << 30
    assert run("sandbox", "volume", "list").stdout.splitlines()[1].split()[:4] == [
        vid, "data", "1.0", "GiB",
    ]  # fmt: skip
    result = run("sandbox", "volume", "attach", vid, "--session", sid, "--path", "/data", "--ro")
    assert result.stdout == f"{vid} attached to {sid} at /data (read-only)\n"
    assert json.loads(run("sandbox", "volume", "get", vid, "--json").stdout)["state"] == "IN_USE"
    result = run("sandbox", "volume", "delete", vid)
    assert result.exit_code == 1 and "attached" in _one_error_line(result)
    assert run("sandbox", "volume", "detach", vid, "--session", sid).exit_code == 0
    assert run("sandbox", "volume", "delete", vid).stdout == f"{vid} DELETED\n"
    result = run("sandbox", "volume", "attach", vid, "--session", sid, "--path", "rel")
    assert result.exit_code == 2 and "--path: must be an absolute path" in _one_error_line(result)


# -- server, images, serve ------------------------------------------------------------------------


def test_server_status(run: Run, inproc: InProcessServer) -> None:
    result = run("server", "status", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["running"] is True
    assert f"version:     {_version.__version__}" in run("server", "status").stdout

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    down = lambda: Client(endpoint=URL, transport=httpx.MockTransport(refuse))  # noqa: E731
    result = run("server", "status", factory=down)
    assert result.exit_code == 1 and result.stdout == "not running\n"


def test_server_status_without_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENKI_HOME", str(tmp_path))
    monkeypatch.delenv("TENKI_API_ENDPOINT", raising=False)
    result = CliRunner().invoke(cli, ["server", "status", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"running": False, "url": None}
    assert not (tmp_path / "server.json").exists()  # status never starts a server


def test_server_stop(run: Run, inproc: InProcessServer) -> None:
    result = run("server", "stop")
    assert result.exit_code == 0, result.output
    assert inproc.stop_requested.is_set()
    assert result.stdout == f"stopped (pid {os.getpid()})\n"
    assert inproc.wait_stopped()
    result = run("server", "stop", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"stopped": False, "running": False}


def test_unexpected_errors_are_one_line(run: Run) -> None:
    def boom() -> Client:
        raise RuntimeError("kaput\nsecond line")

    result = run("sandbox", "list", factory=boom)
    assert result.exit_code == 1
    assert _one_error_line(result) == "error: unexpected RuntimeError: kaput second line"


def test_image_commands_use_the_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    image = models.Image(
        id="sandbox", size_bytes=268 << 20, created_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    calls: list[Any] = []

    def build_image(
        layout: Any, image_id: str = "sandbox", *, force: bool = False, progress: Any = None
    ) -> Any:
        calls.append((image_id, force))
        progress("debootstrap", None)
        progress("packing", 0.5)
        return image

    mod = types.ModuleType("tenkibox.images.builder")
    mod.build_image = build_image  # type: ignore[attr-defined]
    mod.list_images = lambda layout: [image]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tenkibox.images.builder", mod)
    result = CliRunner().invoke(cli, ["image", "build", "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [("sandbox", True)]
    assert json.loads(result.stdout)["size_bytes"] == 268 << 20
    assert "packing" in result.stderr
    result = CliRunner().invoke(cli, ["image", "list"])
    assert result.stdout.splitlines()[1].split() == [
        "sandbox",
        "268.0",
        "MiB",
        "2026-01-01T00:00:00Z",
    ]


def test_serve_calls_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    mod = types.ModuleType("tenkibox.server.daemon")
    mod.serve = lambda **kw: seen.update(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tenkibox.server.daemon", mod)
    monkeypatch.delenv("TENKI_DATABASE_URL", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--port", "8080"])
    assert result.exit_code == 0, result.output
    assert seen == {"host": "127.0.0.1", "port": 8080, "tls_cert": None, "tls_key": None,
                    "grpc_port": 0, "grpc_advertise": None, "preview_host": None,
                    "preview_bind": None, "database_url": None, "artifacts": None,
                    "s3_endpoint": None, "artifact_cache_bytes": None,
                    "local_host": True}
    result = CliRunner().invoke(cli, ["serve", "--database", "postgresql://u:p@h/db"])
    assert result.exit_code == 0 and seen["database_url"] == "postgresql://u:p@h/db"
    result = CliRunner().invoke(cli, ["serve"], env={"TENKI_DATABASE_URL": "postgresql://e/db"})
    assert result.exit_code == 0 and seen["database_url"] == "postgresql://e/db"
    result = CliRunner().invoke(cli, ["serve", "--artifacts", "s3://b/p", "--s3-endpoint",
                                      "http://127.0.0.1:9000", "--artifact-cache", "2GiB"])
    assert result.exit_code == 0, result.output
    assert (seen["artifacts"], seen["s3_endpoint"], seen["artifact_cache_bytes"]) == (
        "s3://b/p", "http://127.0.0.1:9000", 2 << 30)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--preview-host",
                                      "box.example.org", "--preview-bind", "10.0.0.5"])
    assert result.exit_code == 0, result.output
    assert (seen["host"], seen["preview_host"], seen["preview_bind"]) == (
        "0.0.0.0", "box.example.org", "10.0.0.5")
    result = CliRunner().invoke(cli, ["serve", "--grpc-port", "-1"])
    assert result.exit_code == 0 and seen["grpc_port"] is None  # no gRPC wire at all
    result = CliRunner().invoke(cli, ["serve", "--grpc-port", "70000"])
    assert result.exit_code == 2 and "--grpc-port" in result.output

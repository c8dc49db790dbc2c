"""``tenki workspace|apikey|audit|host`` against the real server in-process (the real app,
control plane and SQLite store over the fake host; see tests/support), through the SDK, over
real HTTP; and how the CLI picks its key for the local server."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from support.server import InProcessServer

from tenkibox import Client, models, units
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.cli.workspace import parse_quotas
from tenkibox.client import _local
from tenkibox.config import Layout
from tenkibox.errors import ValidationError

Run = Callable[..., Result]


@pytest.fixture
def run(inproc: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """``tenki ARGS`` with the in-process server as endpoint and its admin key."""
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))  # never the user's
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), obj=CliState())

    return invoke


@pytest.fixture
def admin(inproc: InProcessServer) -> Client:
    return Client(endpoint=inproc.url, api_key=inproc.api_key)


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def _error(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


def _sent(server: InProcessServer, method: str, suffix: str) -> list[Any]:
    return [json.loads(r.body) for r in server.requests.to(method, suffix)]


# -- --quota ----------------------------------------------------------------------------------


def test_parse_quotas() -> None:
    assert parse_quotas([]) == {}
    assert parse_quotas([
        "max_concurrent_sessions=4", "max_memory_mib=16384", "max_snapshots=none",
        "max_volumes=UNLIMITED", "max_stored_bytes=10G",
    ]) == {
        "max_concurrent_sessions": 4, "max_memory_mib": 16384, "max_snapshots": None,
        "max_volumes": None, "max_stored_bytes": 10 << 30,
    }
    assert parse_quotas(["max_stored_bytes=512MiB"]) == {"max_stored_bytes": 512 << 20}
    assert parse_quotas(["max_stored_bytes=1048576"]) == {"max_stored_bytes": 1 << 20}
    assert parse_quotas(["max_volumes=0"]) == {"max_volumes": 0}
    with pytest.raises(ValidationError) as info:
        parse_quotas(["max_volumes=x"], "--limit")
    assert info.value.field == "--limit max_volumes"


@pytest.mark.parametrize(
    "item, message",
    [
        ("max_cpus=4", "--quota: unknown quota 'max_cpus' (valid: max_concurrent_sessions, "
                       "max_memory_mib, max_snapshots, max_volumes, max_stored_bytes)"),
        ("max_volumes", "--quota: expected NAME=VALUE, got 'max_volumes'"),
        ("max_volumes=", "--quota: expected NAME=VALUE, got 'max_volumes='"),
        ("=3", "--quota: expected NAME=VALUE, got '=3'"),
        ("max_volumes=ten", "--quota max_volumes: must be an integer, or none for no limit, "
                            "got 'ten'"),
        ("max_memory_mib=16G", "--quota max_memory_mib: must be an integer"),
        ("max_volumes=-1", "--quota max_volumes: input should be greater than or equal to 0"),
        ("max_stored_bytes=lots", "--quota max_stored_bytes: cannot parse 'lots' as a size"),
        ("max_stored_bytes=-1G", "--quota max_stored_bytes: must not be negative"),
    ],
)
def test_bad_quota_is_a_usage_error(
    run: Run, inproc: InProcessServer, item: str, message: str
) -> None:
    inproc.requests.clear()
    line = _error(run("workspace", "create", "--name", "x", "--quota", item), 2)
    assert line.startswith(f"error: {message}")
    line = _error(run("workspace", "update", "ws_x", "--quota", item), 2)
    assert line.startswith(f"error: {message}")
    assert inproc.requests == []  # nothing was sent


def test_quota_given_twice(run: Run) -> None:
    result = run("workspace", "create", "--name", "x", "--quota", "max_volumes=1",
                 "--quota", "max_volumes=2")
    assert _error(result, 2) == "error: --quota: max_volumes given twice"


def test_update_needs_something_to_change(run: Run) -> None:
    assert _error(run("workspace", "update", "ws_x"), 2) == (
        "error: nothing to change: give --name or --quota")


# -- workspace --------------------------------------------------------------------------------


def test_workspace_commands(run: Run, inproc: InProcessServer) -> None:
    result = _ok(run("workspace", "create", "--name", "team", "--quota", "max_volumes=3",
                     "--quota", "max_stored_bytes=10G", "--json"))
    ws = models.Workspace.model_validate_json(result.stdout)
    assert _sent(inproc, "POST", "/v1/workspaces") == [
        {"name": "team", "quotas": {"max_volumes": 3, "max_stored_bytes": 10 << 30}}]
    assert ws.name == "team" and ws.quotas.max_stored_bytes == 10 << 30

    plain = _ok(run("workspace", "create", "--name", "plain"))
    other_id = plain.stdout.strip()
    assert plain.stdout == f"{other_id}\n" and other_id != ws.id

    listed = json.loads(_ok(run("workspace", "list", "--json")).stdout)
    assert {ws.id, other_id} <= {w["id"] for w in listed}
    table = _ok(run("workspace", "list")).stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "QUOTAS", "CREATED"]
    row = next(line for line in table if line.startswith(ws.id))
    assert "max_volumes=3 max_stored_bytes=10.0GiB" in row

    assert json.loads(_ok(run("workspace", "get", ws.id, "--json")).stdout) == ws.model_dump(
        mode="json")
    fields = _ok(run("workspace", "get", ws.id)).stdout
    assert f"id:                      {ws.id}\n" in fields
    assert "max_volumes:             3\n" in fields
    assert "max_snapshots:           unlimited\n" in fields
    assert "max_stored_bytes:        10.0 GiB\n" in fields

    inproc.requests.clear()
    result = _ok(run("workspace", "update", ws.id, "--quota", "max_volumes=none",
                     "--quota", "max_snapshots=7", "--json"))
    assert _sent(inproc, "PATCH", f"/v1/workspaces/{ws.id}") == [
        {"quotas": {"max_volumes": None, "max_snapshots": 7}}]
    updated = models.Workspace.model_validate_json(result.stdout)
    assert updated.quotas == models.Quotas(max_snapshots=7, max_stored_bytes=10 << 30)
    renamed = _ok(run("workspace", "update", ws.id, "--name", "team-2")).stdout
    assert "name:                    team-2\n" in renamed
    assert "max_snapshots:           7\n" in renamed

    usage = _ok(run("workspace", "usage", ws.id)).stdout.splitlines()
    assert usage[0].split() == ["QUOTA", "IN", "USE", "LIMIT"]
    assert usage[1].split() == ["max_concurrent_sessions", "0", "unlimited"]
    assert usage[3].split() == ["max_snapshots", "0", "7"]
    assert usage[5].split() == ["max_stored_bytes", "0", "B", "10.0", "GiB"]
    assert json.loads(_ok(run("workspace", "usage", ws.id, "--json")).stdout)["volumes"] == 0

    assert _ok(run("workspace", "delete", other_id)).stdout == f"{other_id} deleted\n"
    deleted = json.loads(_ok(run("workspace", "delete", ws.id, "--json")).stdout)
    assert deleted["id"] == ws.id
    line = _error(run("workspace", "get", ws.id))
    assert ws.id in line and "not found" in line


def test_workspace_holding_objects_names_them(run: Run, admin: Client,
                                              inproc: InProcessServer) -> None:
    ws = admin.workspaces.create("busy")
    key = admin.api_keys.create(ws.id)
    vol = Client(endpoint=inproc.url, api_key=key.key).create_volume("d", "8MiB")
    line = _error(run("workspace", "delete", ws.id))
    assert vol.id in line


def test_user_data_is_escaped_on_a_terminal(run: Run, admin: Client) -> None:
    ws = admin.workspaces.create("evil\u202e\u2066name")
    table = _ok(run("workspace", "list")).stdout
    assert "evil\\u202e\\u2066name" in table and "\u202e" not in table
    fields = _ok(run("workspace", "get", ws.id)).stdout
    assert "name:                    evil\\u202e\\u2066name\n" in fields
    raw = json.loads(_ok(run("workspace", "get", ws.id, "--json")).stdout)
    assert raw["name"] == "evil\u202e\u2066name"  # JSON keeps the data as it is


# -- apikey -----------------------------------------------------------------------------------


def test_apikey_create_prints_the_key_once(run: Run, admin: Client,
                                           inproc: InProcessServer) -> None:
    ws = admin.workspaces.create("k")
    result = _ok(run("apikey", "create", "--workspace", ws.id, "--name", "ci"))
    key = result.stdout.strip()
    assert result.stdout == f"{key}\n" and key.startswith("tk_")
    assert "shown only once" in result.stderr
    record = next(k for k in admin.api_keys.list(ws.id) if key.startswith(k.prefix))
    assert record.id in result.stderr
    # the key printed is the key
    assert [w.id for w in Client(endpoint=inproc.url, api_key=key).workspaces.list()] == [ws.id]

    result = _ok(run("apikey", "create", "--workspace", ws.id, "--admin",
                     "--expires-at", "30d", "--json"))
    created = models.ApiKeyCreated.model_validate_json(result.stdout)
    assert created.key.startswith("tk_") and created.id and created.admin
    assert created.expires_at is not None
    expected = datetime.now(UTC) + timedelta(days=30)
    assert abs(created.expires_at - expected) < timedelta(minutes=1)
    assert result.stderr == ""

    _ok(run("apikey", "create", "--workspace", ws.id, "--expires-at", "2999-01-02T03:04:05"))
    assert _sent(inproc, "POST", "/v1/api-keys")[-1] == {
        "workspace_id": ws.id, "expires_at": "2999-01-02T03:04:05Z"}


@pytest.mark.parametrize(
    "when, message",
    [
        ("someday", "error: --expires-at: cannot parse 'someday': give a time (RFC 3339"),
        ("2020-01-01T00:00:00Z", "error: --expires-at: must be in the future"),
        ("99999d", "error: --expires-at: must be at most ten years from now"),
        ("-3h", "error: --expires-at: cannot parse '-3h'"),
    ],
)
def test_apikey_bad_expiry(run: Run, inproc: InProcessServer, when: str, message: str) -> None:
    inproc.requests.clear()
    line = _error(run("apikey", "create", "--workspace", "ws_x", "--expires-at", when), 2)
    assert line.startswith(message)
    assert inproc.requests == []


def test_apikey_list_and_revoke(run: Run, admin: Client) -> None:
    ws = admin.workspaces.create("kl")
    key = admin.api_keys.create(ws.id, name="deploy")
    table = _ok(run("apikey", "list", "--workspace", ws.id)).stdout.splitlines()
    assert table[0].split() == ["ID", "PREFIX", "NAME", "WORKSPACE", "CREATED", "LAST", "USED",
                                "EXPIRES", "REVOKED"]
    assert len(table) == 2
    row = table[1].split()
    assert row[:4] == [key.id, key.prefix, "deploy", ws.id]
    assert row[-2:] == ["-", "-"]
    listed = json.loads(_ok(run("apikey", "list", "--json")).stdout)
    assert key.id in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)

    result = _ok(run("apikey", "revoke", key.id))
    assert result.stdout.startswith(f"{key.id} revoked at 20")
    again = json.loads(_ok(run("apikey", "revoke", key.id, "--json")).stdout)
    assert again["id"] == key.id and again["revoked_at"]
    row = _ok(run("apikey", "list", "--workspace", ws.id)).stdout.splitlines()[1].split()
    assert row[-1] != "-"


def test_workspace_key_is_refused_admin_calls(run: Run, admin: Client,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ws = admin.workspaces.create("member")
    key = admin.api_keys.create(ws.id)
    monkeypatch.setenv("TENKI_API_KEY", key.key)
    assert "needs an admin key" in _error(run("workspace", "create", "--name", "x"))
    assert "needs an admin key" in _error(run("host", "status"))
    assert "needs an admin key" in _error(run("apikey", "list"))
    listed = json.loads(_ok(run("workspace", "list", "--json")).stdout)
    assert [w["id"] for w in listed] == [ws.id]
    # --api-key beats the environment
    assert _ok(run("--api-key", admin._api_key or "", "host", "status", "--json"))


# -- audit, host ------------------------------------------------------------------------------


def test_audit_list(run: Run, admin: Client) -> None:
    ws = admin.workspaces.create("audited")
    admin.workspaces.update(ws.id, quotas={"max_volumes": 1})
    entries = json.loads(_ok(run("audit", "list", "--json")).stdout)
    assert entries[0]["action"] == "updateWorkspace" and entries[0]["object_id"] == ws.id
    assert entries[1]["action"] == "createWorkspace"
    table = _ok(run("audit", "list", "--limit", "2")).stdout.splitlines()
    assert table[0].split() == ["ID", "AT", "WORKSPACE", "KEY", "ACTION", "OBJECT", "STATUS"]
    assert len(table) == 3
    newest = table[1].split()
    assert newest[0] == str(entries[0]["id"])
    assert newest[4:] == ["updateWorkspace", ws.id, "200", "ok"]
    older = json.loads(_ok(run("audit", "list", "--before-id", str(entries[0]["id"]),
                               "--limit", "1", "--json")).stdout)
    assert [e["id"] for e in older] == [entries[1]["id"]]
    mine = json.loads(_ok(run("audit", "list", "--workspace", ws.id, "--json")).stdout)
    assert {e["workspace_id"] for e in mine} <= {ws.id}

    assert _error(run("audit", "list", "--limit", "0"), 2) == (
        "error: --limit: must be between 1 and 1000, got 0")
    assert _error(run("audit", "list", "--limit", "many"), 2).startswith(
        "error: --limit: must be an integer between 1 and 1000")


def test_host_status(run: Run, admin: Client) -> None:
    status = models.HostStatus.model_validate_json(_ok(run("host", "status", "--json")).stdout)
    assert status == admin.host.status()
    out = _ok(run("host", "status")).stdout
    assert f"host_id:         {status.host_id}\n" in out
    assert f"cpus:            {status.cpus}\n" in out
    total = status.memory_total_mib
    assert f"memory_total:    {total} MiB" in out
    if total >= 1024:
        assert f"memory_total:    {total} MiB ({units.format_size(total << 20)})\n" in out
    assert status.tmpfs_total_bytes > 0
    assert (f"tmpfs:           {units.format_size(status.tmpfs_used_bytes)} used of "
            f"{units.format_size(status.tmpfs_total_bytes)}\n") in out


def test_host_list_get_drain_remove(run: Run, admin: Client) -> None:
    (local,) = [models.HostInfo.model_validate(h)
                for h in json.loads(_ok(run("host", "list", "--json")).stdout)]
    assert (local.host_id, local.state) == ("local", models.HostState.ACTIVE)
    out = _ok(run("host", "list")).stdout
    assert out.splitlines()[0].split()[:3] == ["HOST", "STATE", "ADDRESS"]
    assert out.splitlines()[1].split()[:3] == ["local", "ACTIVE", "-"]
    assert "state:" in _ok(run("host", "get", "local")).stdout
    assert _error(run("host", "get", "host-nope")) == "error: host host-nope not found"
    assert _ok(run("host", "drain", "local")).stdout == "local: DRAINING (0 sessions run on)\n"
    assert _error(run("sandbox", "create", "--host", "local", "--memory-mb", "512")).startswith(
        "error: host local is DRAINING")
    assert _ok(run("host", "undrain", "local")).stdout == "local: ACTIVE\n"
    sid = _ok(run("sandbox", "create", "--host", "local", "--memory-mb", "512")).stdout.strip()
    assert admin.get(sid).record.host_id == "local"
    assert _error(run("sandbox", "create", "--host", "nowhere"), 2) == (
        "error: host_id: host nowhere is not a host of this control plane")
    assert "cannot be removed" in _error(run("host", "remove", "local", "--force"))


# -- the key for the local server --------------------------------------------------------------


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               inproc: InProcessServer) -> Path:
    """A TENKI_HOME whose server.json points at the in-process server; no key, no endpoint in
    the environment; starting a second server fails the test."""
    home = tmp_path / "local-home"
    home.mkdir()
    (home / "server.json").write_text(json.dumps({"url": inproc.url, "pid": os.getpid()}))
    monkeypatch.setenv("TENKI_HOME", str(home))
    monkeypatch.delenv("TENKI_API_ENDPOINT", raising=False)
    monkeypatch.delenv("TENKI_API_KEY", raising=False)

    def spawn(layout: Layout) -> Any:
        raise AssertionError("a second local server was started")

    monkeypatch.setattr(_local, "_spawn", spawn)
    return home


def _cli(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), obj=CliState())


def test_cli_reads_the_local_key_file(local_home: Path, inproc: InProcessServer) -> None:
    key_file = Layout(local_home).admin_key_file
    key_file.write_text(inproc.api_key + "\n")
    listed = json.loads(_ok(_cli("workspace", "list", "--json")).stdout)
    assert listed
    status = json.loads(_ok(_cli("server", "status", "--json")).stdout)
    # the local server's data directory is known here: the one whose server.json named it
    assert status["running"] is True and status["home"] == str(local_home)
    # an endpoint given explicitly never gets the file's key
    line = _error(_cli("--endpoint", inproc.url, "workspace", "list"))
    assert line.startswith("error: no API key")


def test_cli_refused_key_names_its_source(local_home: Path, inproc: InProcessServer) -> None:
    key_file = Layout(local_home).admin_key_file
    line = _error(_cli("workspace", "list"))
    assert line.startswith(f"error: the local tenki server at {inproc.url} refused the key")
    assert line.endswith(f"(none set; {key_file} does not exist)")
    line = _error(_cli("--api-key", "tk_wrong", "host", "status"))
    assert line.endswith("(used: the one given with --api-key / api_key=)")
    status = _error(_cli("server", "status"))
    assert "refused the key" in status

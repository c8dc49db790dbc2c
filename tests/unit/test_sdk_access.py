"""The SDK's workspaces, API keys, audit and host calls, and how it picks its key, against the
real server in-process (the real app, control plane and SQLite store over the fake host; see
tests/support): real HTTP, nothing of the client mocked."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.server import InProcessServer

from tenkibox import AsyncClient, Client, errors, models
from tenkibox.client import (
    ApiKeys,
    AsyncApiKeys,
    AsyncAudit,
    AsyncHost,
    AsyncWorkspaces,
    Audit,
    Host,
    Workspaces,
    _local,
)
from tenkibox.config import Layout


@pytest.fixture
def client(inproc: InProcessServer) -> Iterator[Client]:
    with Client(endpoint=inproc.url, api_key=inproc.api_key) as c:
        yield c


def _body(server: InProcessServer, method: str, suffix: str) -> Any:
    sent = server.requests.to(method, suffix)
    assert sent, server.requests.summary()
    return json.loads(sent[-1].body)


# -- the surface ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attr, sync_cls, async_cls, names",
    [
        ("workspaces", Workspaces, AsyncWorkspaces,
         ["create", "delete", "get", "list", "update", "usage"]),
        ("api_keys", ApiKeys, AsyncApiKeys, ["create", "list", "revoke"]),
        ("audit", Audit, AsyncAudit, ["list"]),
        ("host", Host, AsyncHost, ["status"]),
    ],
)
def test_namespaces_are_client_methods_in_both_clients(
    attr: str, sync_cls: type, async_cls: type, names: list[str]
) -> None:
    sync_client = Client(endpoint="http://fake.test")  # nothing is sent
    async_client = AsyncClient(endpoint="http://fake.test")
    sync_ns, async_ns = getattr(sync_client, attr), getattr(async_client, attr)
    assert type(sync_ns) is sync_cls and type(async_ns) is async_cls
    for name in names:
        s, a = getattr(sync_ns, name), getattr(async_ns, name)
        assert s.__self__ is sync_client and a.__self__ is async_client
        assert inspect.iscoroutinefunction(a) and not inspect.iscoroutinefunction(s)
        assert str(inspect.signature(s)) == str(inspect.signature(a)), name
        assert s.__doc__ and a.__doc__
    assert sorted(n for n in dir(sync_ns) if not n.startswith("_")) == names


# -- workspaces -------------------------------------------------------------------------------


def test_workspace_lifecycle(client: Client, inproc: InProcessServer) -> None:
    ws = client.workspaces.create("team-a", quotas={"max_volumes": 2, "max_stored_bytes": 1 << 30})
    assert _body(inproc, "POST", "/v1/workspaces") == {
        "name": "team-a", "quotas": {"max_volumes": 2, "max_stored_bytes": 1 << 30}}
    assert ws.name == "team-a"
    assert (ws.quotas.max_volumes, ws.quotas.max_stored_bytes) == (2, 1 << 30)
    assert ws.quotas.max_snapshots is None
    assert ws.id in [w.id for w in client.workspaces.list()]
    assert client.workspaces.get(ws.id) == ws

    # only the quotas given change; None removes one
    changed = client.workspaces.update(ws.id, quotas={"max_volumes": None, "max_snapshots": 5})
    assert _body(inproc, "PATCH", f"/v1/workspaces/{ws.id}") == {
        "quotas": {"max_volumes": None, "max_snapshots": 5}}
    assert changed.quotas == models.Quotas(max_snapshots=5, max_stored_bytes=1 << 30)
    renamed = client.workspaces.update(ws.id, name="team-b")
    assert _body(inproc, "PATCH", f"/v1/workspaces/{ws.id}") == {"name": "team-b"}
    assert (renamed.name, renamed.quotas) == ("team-b", changed.quotas)

    usage = client.workspaces.usage(ws.id)
    assert usage.workspace_id == ws.id
    assert (usage.concurrent_sessions, usage.volumes, usage.snapshots) == (0, 0, 0)
    assert usage.quotas == changed.quotas

    assert client.workspaces.delete(ws.id).id == ws.id
    with pytest.raises(errors.WorkspaceNotFoundError):
        client.workspaces.get(ws.id)


def test_create_without_quotas_sends_none(client: Client, inproc: InProcessServer) -> None:
    ws = client.create_workspace("bare")
    assert _body(inproc, "POST", "/v1/workspaces") == {"name": "bare"}
    assert ws.quotas == models.Quotas()


@pytest.mark.parametrize(
    "quotas, field, message",
    [
        ({"max_cpus": 1}, "quotas", "unknown quota 'max_cpus' (valid: max_concurrent_sessions"),
        ({"max_volumes": True}, "quotas.max_volumes", "expected an integer or None"),
        ({"max_volumes": "3"}, "quotas.max_volumes", "expected an integer or None"),
        ({"max_volumes": -1}, "quotas.max_volumes", "greater than or equal to 0"),
        (["max_volumes"], "quotas", "expected a mapping"),
    ],
)
def test_bad_quotas_are_refused_before_sending(
    client: Client, inproc: InProcessServer, quotas: Any, field: str, message: str
) -> None:
    inproc.requests.clear()
    with pytest.raises(errors.ValidationError) as info:
        client.workspaces.create("x", quotas=quotas)
    assert info.value.field == field and message in info.value.message
    with pytest.raises(errors.ValidationError):
        client.workspaces.update("ws_x", quotas=quotas)
    assert inproc.requests.to("POST", "/v1/workspaces") == []
    assert inproc.requests.to("PATCH", "/v1/workspaces/ws_x") == []


def test_workspace_holding_a_volume_cannot_be_deleted(
    client: Client, inproc: InProcessServer
) -> None:
    ws = client.workspaces.create("holder")
    key = client.api_keys.create(ws.id, name="holder-key")
    with Client(endpoint=inproc.url, api_key=key.key) as member:
        vol = member.create_volume("data", "8MiB")
    assert vol.workspace_id == ws.id
    assert client.workspaces.usage(ws.id).volumes == 1
    with pytest.raises(errors.ConflictError, match=vol.id):
        client.workspaces.delete(ws.id)


def test_quota_exceeded_is_a_typed_error(client: Client, inproc: InProcessServer) -> None:
    ws = client.workspaces.create("tight", quotas={"max_volumes": 0})
    key = client.api_keys.create(ws.id)
    with Client(endpoint=inproc.url, api_key=key.key) as member:
        with pytest.raises(errors.QuotaExceededError, match="max_volumes") as info:
            member.volumes.create("data", "8MiB")
    assert info.value.status == 429


# -- API keys ---------------------------------------------------------------------------------


def test_api_key_lifecycle(client: Client, inproc: InProcessServer) -> None:
    ws = client.workspaces.create("keys")
    when = datetime.now(UTC) + timedelta(days=30)
    created = client.api_keys.create(ws.id, name="ci", expires_at=when)
    assert _body(inproc, "POST", "/v1/api-keys") == {
        "workspace_id": ws.id, "name": "ci",
        "expires_at": when.isoformat().replace("+00:00", "Z")}
    assert isinstance(created, models.ApiKeyCreated)
    assert created.key.startswith("tk_") and created.key.startswith(created.prefix)
    assert (created.workspace_id, created.name, created.admin) == (ws.id, "ci", False)
    assert created.expires_at is not None and abs(created.expires_at - when) < timedelta(seconds=1)

    listed = client.api_keys.list(workspace_id=ws.id)
    assert [k.id for k in listed] == [created.id]
    assert not hasattr(listed[0], "key")  # secrets are never listed
    assert created.id in [k.id for k in client.api_keys.list()]

    with Client(endpoint=inproc.url, api_key=created.key) as member:
        assert [w.id for w in member.workspaces.list()] == [ws.id]
        with pytest.raises(errors.PermissionDeniedError, match="admin key"):
            member.workspaces.create("nope")
        with pytest.raises(errors.PermissionDeniedError):
            member.host.status()
        with pytest.raises(errors.PermissionDeniedError):
            member.api_keys.list()

        revoked = client.api_keys.revoke(created.id)
        assert revoked.id == created.id and revoked.revoked_at is not None
        assert client.api_keys.revoke(created.id).revoked_at == revoked.revoked_at  # idempotent
        with pytest.raises(errors.AuthenticationError):
            member.workspaces.list()


def test_api_key_inputs(client: Client, inproc: InProcessServer) -> None:
    ws = client.workspaces.create("keys2")
    admin = client.api_keys.create(ws.id, expires_at="2999-01-01T00:00:00", admin=True)
    assert _body(inproc, "POST", "/v1/api-keys") == {
        "workspace_id": ws.id, "expires_at": "2999-01-01T00:00:00Z", "admin": True}
    assert admin.admin
    with Client(endpoint=inproc.url, api_key=admin.key) as other_admin:
        assert other_admin.host.status().cpus >= 1
    inproc.requests.clear()
    with pytest.raises(errors.ValidationError) as info:
        client.api_keys.create(ws.id, expires_at="next week")
    assert info.value.field == "expires_at"
    with pytest.raises(errors.ValidationError) as info:
        client.api_keys.create(ws.id, admin="yes")  # type: ignore[arg-type]
    assert info.value.field == "admin"
    assert inproc.requests.to("POST", "/v1/api-keys") == []
    with pytest.raises(errors.NotFoundError):
        client.api_keys.revoke("key_nope")


# -- audit and host ---------------------------------------------------------------------------


def test_audit_newest_first_paged_and_scoped(client: Client, inproc: InProcessServer) -> None:
    a = client.workspaces.create("audit-a")
    b = client.workspaces.create("audit-b")
    key_a = client.api_keys.create(a.id)
    key_b = client.api_keys.create(b.id)
    with Client(endpoint=inproc.url, api_key=key_a.key) as member_a:
        member_a.volumes.create("va", "8MiB")
    with Client(endpoint=inproc.url, api_key=key_b.key) as member_b:
        member_b.volumes.create("vb", "8MiB")

    entries = client.audit.list()
    assert len(entries) >= 6
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    assert entries[0].action == "createVolume" and entries[0].workspace_id == b.id
    assert entries[0].status == 201 and entries[0].outcome == "ok"
    assert entries[0].key_prefix == key_b.prefix

    first = client.audit.list(limit=2)
    assert [e.id for e in first] == [e.id for e in entries[:2]]
    assert inproc.requests.to("GET", "/v1/audit")[-1].query == {"limit": "2"}
    rest = client.audit.list(limit=2, before_id=first[-1].id)
    assert [e.id for e in rest] == [e.id for e in entries[2:4]]

    only_a = client.audit.list(workspace_id=a.id)
    assert only_a and {e.workspace_id for e in only_a} == {a.id}
    with Client(endpoint=inproc.url, api_key=key_a.key) as member_a:
        assert [e.id for e in member_a.audit.list()] == [e.id for e in only_a]
        with pytest.raises(errors.NotFoundError):
            member_a.audit.list(workspace_id=b.id)

    for bad in (0, 1001, True):
        with pytest.raises(errors.ValidationError) as info:
            client.audit.list(limit=bad)
        assert info.value.field == "limit"


def test_host_status(client: Client) -> None:
    h = client.host.status()
    assert isinstance(h, models.HostStatus)
    assert h.memory_capacity_mib >= 0 and h.sessions == 0
    assert 0 <= h.tmpfs_used_bytes <= h.tmpfs_total_bytes and h.tmpfs_total_bytes > 0
    assert client.host_status() == h


def test_health_needs_a_key(inproc: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENKI_API_KEY", raising=False)
    with Client(endpoint=inproc.url) as anonymous:
        with pytest.raises(errors.AuthenticationError, match=r"^no API key"):
            anonymous.health()
    with Client(endpoint=inproc.url, api_key="tk_not-a-key") as wrong:
        with pytest.raises(errors.AuthenticationError):
            wrong.health()


async def test_async_client(inproc: InProcessServer) -> None:
    async with AsyncClient(endpoint=inproc.url, api_key=inproc.api_key) as client:
        ws = await client.workspaces.create("async", quotas={"max_snapshots": 3})
        assert ws.quotas.max_snapshots == 3
        ws = await client.workspaces.update(ws.id, quotas={"max_snapshots": None})
        assert ws.quotas.max_snapshots is None
        assert (await client.workspaces.usage(ws.id)).snapshots == 0
        key = await client.api_keys.create(ws.id, name="k")
        assert [k.id for k in await client.api_keys.list(ws.id)] == [key.id]
        assert (await client.api_keys.revoke(key.id)).revoked_at is not None
        assert (await client.audit.list(limit=1))[0].action == "revokeApiKey"
        assert (await client.host.status()).cpus >= 1
        assert (await client.workspaces.delete(ws.id)).id == ws.id
        assert ws.id not in [w.id for w in await client.workspaces.list()]


# -- which key: the one given, $TENKI_API_KEY, else the local admin.key (local server only) ----


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TENKI_HOME with no key in the environment and no endpoint configured."""
    h = tmp_path / "tenki-home"
    h.mkdir()
    monkeypatch.setenv("TENKI_HOME", str(h))
    monkeypatch.delenv("TENKI_API_ENDPOINT", raising=False)
    monkeypatch.delenv("TENKI_API_KEY", raising=False)
    return h


def _announce(home: Path, server: InProcessServer) -> None:
    """What a local server writes once it listens: server.json pointing at it."""
    (home / "server.json").write_text(json.dumps({"url": server.url, "pid": os.getpid()}))


def _write_key(home: Path, key: str) -> None:
    path = Layout(home).admin_key_file
    path.write_text(f"  {key}\n")
    path.chmod(0o600)


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fails a test that would start a second local server."""
    spawned: list[Any] = []

    def spawn(layout: Layout) -> Any:
        spawned.append(layout)
        raise AssertionError("a second local server was started")

    monkeypatch.setattr(_local, "_spawn", spawn)
    return spawned


@pytest.mark.parametrize("autostart", [False, True])
def test_local_server_gets_the_key_file(
    home: Path, inproc: InProcessServer, no_spawn: list[Any], autostart: bool
) -> None:
    _announce(home, inproc)
    _write_key(home, inproc.api_key)
    with Client(autostart=autostart) as local:
        assert local.health().pid == os.getpid()
        assert local.endpoint == inproc.url
        assert local.workspaces.list()
    assert _local.local_key().source == "file"


async def test_async_local_server_gets_the_key_file(
    home: Path, inproc: InProcessServer, no_spawn: list[Any]
) -> None:
    _announce(home, inproc)
    _write_key(home, inproc.api_key)
    async with AsyncClient() as local:
        assert (await local.health()).pid == os.getpid()


def test_configured_endpoint_never_gets_the_key_file(
    home: Path, inproc: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _announce(home, inproc)
    _write_key(home, inproc.api_key)
    # the very server the file belongs to, named explicitly: no key is sent, so it refuses
    with Client(endpoint=inproc.url) as explicit:
        with pytest.raises(errors.AuthenticationError, match=r"^no API key"):
            explicit.health()
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    with Client() as configured:
        with pytest.raises(errors.AuthenticationError, match=r"^no API key"):
            configured.health()
    assert _local.resolve(None, None, autostart=False) == (inproc.url, None)
    monkeypatch.delenv("TENKI_API_ENDPOINT")
    assert _local.resolve(None, None, autostart=False) == (inproc.url, inproc.api_key)


def test_given_key_and_environment_come_before_the_file(
    home: Path, inproc: InProcessServer, monkeypatch: pytest.MonkeyPatch, no_spawn: list[Any]
) -> None:
    _announce(home, inproc)
    _write_key(home, "tk_stale-key-from-the-file")
    with Client(api_key=inproc.api_key, autostart=False) as given:
        assert given.health().pid == os.getpid()
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)
    with Client(autostart=False) as env:
        assert env.health().pid == os.getpid()
    assert _local.local_key().source == "environment"
    assert _local.local_key("tk_other").source == "argument"


def test_refused_key_is_an_error_not_a_second_server(
    home: Path, inproc: InProcessServer, monkeypatch: pytest.MonkeyPatch, no_spawn: list[Any]
) -> None:
    _announce(home, inproc)
    key_file = Layout(home).admin_key_file
    with pytest.raises(errors.AuthenticationError) as info:
        Client().health()
    message = info.value.message
    assert "\n" not in message
    assert message.startswith(f"the local tenki server at {inproc.url} refused the key (HTTP 401")
    assert message.endswith(
        f"the key is read from --api-key, $TENKI_API_KEY or {key_file} "
        f"(none set; {key_file} does not exist)")

    key_file.mkdir()  # a file that cannot be read gives no key
    with pytest.raises(errors.AuthenticationError, match=r"unreadable: is a directory\)$"):
        Client(autostart=False).health()
    key_file.rmdir()

    monkeypatch.setenv("TENKI_API_KEY", "tk_wrong")
    with pytest.raises(errors.AuthenticationError, match=r"\(used: \$TENKI_API_KEY\)$"):
        Client().health()
    with pytest.raises(errors.AuthenticationError, match=r"\(used: the one given"):
        Client(api_key="tk_also-wrong").health()
    monkeypatch.delenv("TENKI_API_KEY")
    _write_key(home, "tk_stale")
    with pytest.raises(errors.AuthenticationError, match=rf"\(used: {key_file}\)$"):
        Client().health()
    found = _local.local_server()
    assert found is not None and not found.running and found.refused is not None
    assert found.refused[0] == 401
    assert no_spawn == []


def test_nothing_answering_is_not_a_refusal(home: Path) -> None:
    (home / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": 1}))
    found = _local.local_server()
    assert found is not None and found.refused is None and not found.running
    with pytest.raises(errors.ConnectionError):
        Client(autostart=False, timeout=2).health()


def test_key_file_is_read_after_the_autostart(
    home: Path, inproc: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key before the start; the started server writes admin.key (and server.json), which
    the client reads then. The spawn is replaced by what the real server does at start."""

    class Started:
        pid = os.getpid()

        def poll(self) -> int | None:
            return None

    def spawn(layout: Layout) -> Started:
        _write_key(layout.home, inproc.api_key)
        _announce(layout.home, inproc)
        return Started()

    monkeypatch.setattr(_local, "_spawn", spawn)
    assert _local.local_key().key is None
    with Client() as local:
        assert local.health().pid == os.getpid()
        assert local.workspaces.get(local.workspaces.list()[0].id)


@pytest.fixture
def shared_home() -> Iterator[Path]:
    """A home that other users can enter (its files keep their own modes)."""
    home = Path(tempfile.mkdtemp(prefix="tenki-other-user-"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_unreadable_key_file_gives_no_key(shared_home: Path) -> None:
    """A key file of another user (mode 0600) just means no key. As root, where permissions
    do not stop a read, the read is made by a child that dropped to an unprivileged user."""
    _write_key(shared_home, "tk_someone-elses")
    layout = Layout(shared_home)
    if os.geteuid() != 0:
        layout.admin_key_file.chmod(0)
        assert _local.read_admin_key(layout) == (None, "unreadable: permission denied")
        return
    for parent in shared_home.parents:  # the child must reach the directory (not the file)
        if parent.stat().st_mode & 0o011 != 0o011:
            pytest.skip(f"{parent} is not searchable by other users")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(_local.read_admin_key(layout)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(out) == [None, "unreadable: permission denied"]

"""API keys and workspaces through the REST API and the SDK, over real HTTP (the real app and
control plane on SQLite, the fake host below them): a key's shape and storage (only its hash),
its use, revocation and expiry, every way of not presenting one, admin-only calls made with a
workspace key, and the deletion and naming rules of workspaces."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from support.fake_host import FakeHost
from support.server import ADMIN_KEY, InProcessServer

from tenkibox import Client, errors
from tenkibox.store.tables import ApiKeyRow

CONTRACT = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json")
                      .read_text())
EXPECTED = "expected the header Authorization: Bearer tk_<key>"
KEY_RE = re.compile(r"tk_[A-Za-z0-9_-]{43}")


def http(server: InProcessServer, key: str | None = None,
         authorization: str | None = None) -> httpx.Client:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if authorization is not None:
        headers["Authorization"] = authorization
    return httpx.Client(base_url=server.url, headers=headers, timeout=20.0)


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    return resp.json() if resp.content else None


def refused(resp: httpx.Response, status: int, code: str, message: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json() == {"error": {"code": code, "message": message}}


@pytest.fixture
def admin(inproc: InProcessServer) -> Iterator[httpx.Client]:
    with http(inproc, ADMIN_KEY) as c:
        yield c


def new_workspace(client: httpx.Client, ws_name: str, **key: Any) -> tuple[str, dict[str, Any]]:
    """A workspace and a key of it (``key``: more fields of the key's create)."""
    ws = ok(client.post("/v1/workspaces", json={"name": ws_name}), 201)["id"]
    created = ok(client.post("/v1/api-keys", json={"workspace_id": ws, **key}), 201)
    return ws, created


def admin_key_id(admin: httpx.Client, inproc: InProcessServer) -> str:
    keys = ok(admin.get("/v1/api-keys", params={"workspace_id": inproc.default_workspace}))
    return next(k["id"] for k in keys if k["prefix"] == ADMIN_KEY[:11])


# -- creation and storage -----------------------------------------------------------------------


def test_a_key_is_256_bits_shown_once_and_stored_as_its_hash(
        inproc: InProcessServer, admin: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ws, created = new_workspace(admin, "team", name="ci")
    secret = created["key"]
    assert KEY_RE.fullmatch(secret), secret
    assert len(base64.urlsafe_b64decode(secret[3:] + "=")) == 32  # 256 random bits
    assert created["prefix"] == secret[:11]
    assert (created["workspace_id"], created["name"], created["admin"]) == (ws, "ci", False)
    assert created["id"].startswith("key_") and created["last_used_at"] is None
    assert created["revoked_at"] is None and created["expires_at"] is None
    # two keys never share a secret
    other = ok(admin.post("/v1/api-keys", json={"workspace_id": ws}), 201)
    assert other["key"] != secret and KEY_RE.fullmatch(other["key"])

    # the list shows the record, never the secret
    listed = ok(admin.get("/v1/api-keys", params={"workspace_id": ws}))
    assert [k["id"] for k in listed] == [created["id"], other["id"]]
    assert "key" not in listed[0] and listed[0]["prefix"] == secret[:11]
    # the store keeps its SHA-256 and its prefix, nothing else of it
    with inproc.store.tx() as orm:
        row = orm.get(ApiKeyRow, created["id"])
        assert row is not None
        assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert row.prefix == secret[:11]
        rows = [tuple(r) for r in orm.execute(text("SELECT * FROM api_keys"))]
    assert len(rows) == 3  # the admin key and these two
    for r in rows:
        for value in r:
            assert secret[11:] not in str(value), r

    # the key works (so it is what the server knows) ...
    ok(http(inproc, secret).get("/v1/sessions"))
    # ... and the secret is nowhere on disk, in the audit trail or in the log
    for path in inproc.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret[11:].encode() not in data, path
            assert secret.encode() not in data, path
    assert secret[11:] not in admin.get("/v1/audit", params={"limit": 1000}).text
    assert secret[11:] not in caplog.text and created["prefix"] in caplog.text


def test_use_sets_last_used_at(inproc: InProcessServer, admin: httpx.Client) -> None:
    ws, created = new_workspace(admin, "team")
    before = datetime.now(UTC)
    with http(inproc, created["key"]) as c:
        assert ok(c.get("/v1/sessions")) == []
        assert ok(c.get(f"/v1/workspaces/{ws}"))["id"] == ws
    after = datetime.now(UTC)
    (key,) = ok(admin.get("/v1/api-keys", params={"workspace_id": ws}))
    used = datetime.fromisoformat(key["last_used_at"])
    assert before - timedelta(seconds=1) <= used <= after


def test_keys_of_unknown_workspaces_and_unknown_keys(inproc: InProcessServer,
                                                    admin: httpx.Client) -> None:
    refused(admin.post("/v1/api-keys", json={"workspace_id": "ws_doesnotexist0000"}), 404,
            "WorkspaceNotFound", "workspace ws_doesnotexist0000 not found")
    refused(admin.delete("/v1/api-keys/key_doesnotexist000"), 404, "ApiKeyNotFound",
            "API key key_doesnotexist000 not found")
    refused(admin.patch("/v1/workspaces/ws_doesnotexist0000", json={"name": "x"}), 404,
            "WorkspaceNotFound", "workspace ws_doesnotexist0000 not found")
    refused(admin.delete("/v1/workspaces/ws_doesnotexist0000"), 404, "WorkspaceNotFound",
            "workspace ws_doesnotexist0000 not found")
    assert len(ok(admin.get("/v1/api-keys"))) == 1  # the admin key only


# -- revocation and expiry ----------------------------------------------------------------------


def test_a_revoked_key_is_refused_at_its_very_next_call(inproc: InProcessServer,
                                                        admin: httpx.Client) -> None:
    ws, created = new_workspace(admin, "team")
    key = http(inproc, created["key"])
    ok(key.get("/v1/sessions"))
    revoked = ok(admin.delete(f"/v1/api-keys/{created['id']}"))
    assert revoked["revoked_at"] is not None and "key" not in revoked
    message = (f"API key {created['prefix']}… ({created['id']}) was revoked: {EXPECTED}")
    refused(key.get("/v1/sessions"), 401, "Unauthorized", message)
    refused(key.post("/v1/volumes", json={"name": "v", "size_bytes": 1 << 20}), 401,
            "Unauthorized", message)
    with Client(endpoint=inproc.url, api_key=created["key"]) as sdk, \
            pytest.raises(errors.AuthenticationError) as err:
        sdk.list()
    assert err.value.message == message
    # idempotent: the first revocation's time stays
    assert ok(admin.delete(f"/v1/api-keys/{created['id']}"))["revoked_at"] == \
        revoked["revoked_at"]
    # the other keys of the workspace are not affected
    second = ok(admin.post("/v1/api-keys", json={"workspace_id": ws}), 201)
    ok(http(inproc, second["key"]).get("/v1/sessions"))
    # nothing was created with the revoked key
    assert ok(http(inproc, second["key"]).get("/v1/volumes")) == []


def test_an_expired_key_is_refused(inproc: InProcessServer, admin: httpx.Client) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2.0)  # room for a loaded machine
    ws, created = new_workspace(admin, "team", expires_at=expires.isoformat())
    assert datetime.fromisoformat(created["expires_at"]) == expires
    key = http(inproc, created["key"])
    ok(key.get("/v1/sessions"))
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    message = (f"API key {created['prefix']}… ({created['id']}) expired at "
               f"{expires.isoformat()}: {EXPECTED}")
    refused(key.get("/v1/sessions"), 401, "Unauthorized", message)
    assert "expired" in message
    with Client(endpoint=inproc.url, api_key=created["key"]) as sdk, \
            pytest.raises(errors.AuthenticationError, match="expired at"):
        sdk.list()
    # a key cannot be made already expired
    past = datetime.now(UTC) - timedelta(seconds=1)
    resp = admin.post("/v1/api-keys", json={"workspace_id": ws, "expires_at": past.isoformat()})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "expires_at", resp.text


# -- presenting no usable key ---------------------------------------------------------------------

UNKNOWN = "tk_" + "A" * 43

NO_KEY_CASES = {
    "missing-header": (None, f"no API key: {EXPECTED}"),
    "empty-header": ("", f"no API key: {EXPECTED}"),
    "basic-scheme": ("Basic dXNlcjpwYXNzd29yZA==", f"not a bearer token: {EXPECTED}"),
    "basic-scheme-with-a-tk-key": (f"Basic {ADMIN_KEY}", f"not a bearer token: {EXPECTED}"),
    "bearer-without-token": ("Bearer", f"not a bearer token: {EXPECTED}"),
    "token-without-scheme": (ADMIN_KEY, f"not a bearer token: {EXPECTED}"),
    "not-a-tk-token": ("Bearer abcdef0123456789", f"not a tenki API key: {EXPECTED}"),
    "unknown-tk-key": (f"Bearer {UNKNOWN}", f"unknown API key {UNKNOWN[:11]}…: {EXPECTED}"),
    "admin-key-truncated": (f"Bearer {ADMIN_KEY[:-1]}",
                            f"unknown API key {ADMIN_KEY[:11]}…: {EXPECTED}"),
}


@pytest.mark.parametrize("case", list(NO_KEY_CASES))
def test_no_usable_key_is_401_naming_the_header(inproc: InProcessServer, case: str) -> None:
    authorization, message = NO_KEY_CASES[case]
    with http(inproc, authorization=authorization) as c:
        for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/volumes"),
                             ("GET", "/v1/health")):
            resp = c.request(method, path, json={"name": "v", "size_bytes": 1 << 20}
                             if method == "POST" else None)
            refused(resp, 401, "Unauthorized", message)
            assert "\n" not in resp.json()["error"]["message"]
            assert "Authorization: Bearer tk_<key>" in resp.json()["error"]["message"]
    # nothing was created
    assert inproc.plane.volumes.query(inproc.default_workspace) == []


@pytest.mark.parametrize("case", ["not-a-tk-token", "unknown-tk-key", "admin-key-truncated"])
def test_sdk_raises_authentication_error(inproc: InProcessServer, case: str) -> None:
    authorization, message = NO_KEY_CASES[case]
    assert authorization is not None
    with Client(endpoint=inproc.url, api_key=authorization.removeprefix("Bearer ")) as sdk, \
            pytest.raises(errors.AuthenticationError) as err:
        sdk.list()
    assert err.value.message == message and err.value.status == 401


def test_the_scheme_is_case_insensitive(inproc: InProcessServer) -> None:
    with http(inproc, authorization=f"bearer {ADMIN_KEY}") as c:
        ok(c.get("/v1/sessions"))


# -- admin-only calls with a workspace key ------------------------------------------------------

#: every operation the contract says may answer 403, called with a workspace key (a body that
#: would be valid, so that only the key decides)
ADMIN_ONLY: dict[str, tuple[str, str, Any]] = {
    "createWorkspace": ("POST", "/v1/workspaces", {"name": "by-a-workspace-key"}),
    "updateWorkspace": ("PATCH", "/v1/workspaces/{ws}", {"quotas": {"max_volumes": 1000}}),
    "deleteWorkspace": ("DELETE", "/v1/workspaces/{ws}", None),
    "createApiKey": ("POST", "/v1/api-keys", {"workspace_id": "{ws}", "admin": True}),
    "listApiKeys": ("GET", "/v1/api-keys", None),
    "revokeApiKey": ("DELETE", "/v1/api-keys/{admin_key_id}", None),
    "hostStatus": ("GET", "/v1/host", None),
    # with an admin key this one would stop the server: only workspace keys call it here
    "shutdownServer": ("POST", "/v1/server/shutdown", None),
    "verifyStore": ("POST", "/v1/admin/verify", None),
    "registerHost": ("POST", "/v1/hosts", {"address": "http://10.77.0.2:7070",
                                           "secret": "x" * 32, "cpus": 2,
                                           "memory_total_mib": 4096, "memory_reserve_mib": 0,
                                           "overcommit": 1.0, "accelerator": "tcg"}),
    "hostHeartbeat": ("POST", "/v1/hosts/local/heartbeat", {"vms": []}),
    "listHosts": ("GET", "/v1/hosts", None),
    "getHost": ("GET", "/v1/hosts/local", None),
    "drainHost": ("POST", "/v1/hosts/local/drain", None),
    "undrainHost": ("POST", "/v1/hosts/local/undrain", None),
    "removeHost": ("DELETE", "/v1/hosts/local", None),
}
#: operations open to every key but for one field that needs an admin key (a pin: host_id;
#: tests/component/test_fleet.py checks its 403)
ADMIN_FIELDS = {"createSession"}


def test_admin_only_operations_are_those_of_the_contract() -> None:
    with_403 = {op["operationId"] for item in CONTRACT["paths"].values()
                for op in item.values() if "403" in op.get("responses", {})}
    assert with_403 == set(ADMIN_ONLY) | ADMIN_FIELDS


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize("operation", list(ADMIN_ONLY))
def test_admin_only_call_with_a_workspace_key_is_403(inproc: InProcessServer,
                                                     admin: httpx.Client, operation: str) -> None:
    ws, created = new_workspace(admin, "team")
    ids = {"ws": ws, "admin_key_id": admin_key_id(admin, inproc)}
    workspaces_before = ok(admin.get("/v1/workspaces"))
    keys_before = ok(admin.get("/v1/api-keys"))
    method, path, body = ADMIN_ONLY[operation]
    with http(inproc, created["key"]) as c:
        resp = c.request(method, _fill(path, ids), json=_fill(body, ids))
    refused(resp, 403, "PermissionDenied",
            f"this call needs an admin key; key {created['prefix']}… ({created['id']}) is a "
            f"key of workspace {ws}")
    # nothing changed, and the server still serves
    assert not inproc.stop_requested.is_set()
    assert ok(admin.get("/v1/workspaces")) == workspaces_before
    after = ok(admin.get("/v1/api-keys"))
    assert [{**k, "last_used_at": None} for k in after] == \
        [{**k, "last_used_at": None} for k in keys_before]
    ok(admin.get("/v1/health"))


def test_health_names_the_data_directory_to_admin_keys_only(
        inproc: InProcessServer, admin: httpx.Client, fake_host: FakeHost) -> None:
    assert ok(admin.get("/v1/health"))["home"] == str(inproc.home)
    _ws, created = new_workspace(admin, "no-host-paths")
    with http(inproc, created["key"]) as c:
        info = ok(c.get("/v1/health"))
        assert info["home"] is None and info["version"] and info["accelerator"] == "tcg"
        # the images are the host's, through the control plane (any key may list them)
        fake_host.images.add("python")
        assert [i["id"] for i in ok(c.get("/v1/images"))] == ["python", "sandbox"]


SDK_ADMIN_CALLS = {
    "createWorkspace": lambda c, ids: c.workspaces.create("by-a-workspace-key"),
    "updateWorkspace": lambda c, ids: c.workspaces.update(ids["ws"],
                                                          quotas={"max_volumes": 1000}),
    "deleteWorkspace": lambda c, ids: c.workspaces.delete(ids["ws"]),
    "createApiKey": lambda c, ids: c.api_keys.create(ids["ws"], admin=True),
    "listApiKeys": lambda c, ids: c.api_keys.list(),
    "revokeApiKey": lambda c, ids: c.api_keys.revoke(ids["admin_key_id"]),
    "hostStatus": lambda c, ids: c.host.status(),
    "shutdownServer": lambda c, ids: c.shutdown_server(wait=False),
    "verifyStore": lambda c, ids: c.verify_store(),
    "listHosts": lambda c, ids: c.hosts.list(),
    "getHost": lambda c, ids: c.hosts.get("local"),
    "drainHost": lambda c, ids: c.hosts.drain("local"),
    "undrainHost": lambda c, ids: c.hosts.undrain("local"),
    "removeHost": lambda c, ids: c.hosts.remove("local"),
}
#: admin calls of host workers (``tenki host run``), not of the SDK
WORKER_CALLS = {"registerHost", "hostHeartbeat"}


def test_sdk_raises_permission_denied(inproc: InProcessServer, admin: httpx.Client) -> None:
    assert set(SDK_ADMIN_CALLS) == set(ADMIN_ONLY) - WORKER_CALLS
    ws, created = new_workspace(admin, "team")
    ids = {"ws": ws, "admin_key_id": admin_key_id(admin, inproc)}
    message = (f"this call needs an admin key; key {created['prefix']}… ({created['id']}) is "
               f"a key of workspace {ws}")
    with Client(endpoint=inproc.url, api_key=created["key"]) as sdk:
        for operation, call in SDK_ADMIN_CALLS.items():
            with pytest.raises(errors.PermissionDeniedError) as err:
                call(sdk, ids)
            assert (err.value.message, err.value.status) == (message, 403), operation
        # what a workspace key may do: read its own workspace and usage
        assert sdk.workspaces.get(ws).id == ws and sdk.workspaces.usage(ws).volumes == 0
        assert [w.id for w in sdk.workspaces.list()] == [ws]
    assert not inproc.stop_requested.is_set()


def test_an_admin_key_of_another_workspace_administers(inproc: InProcessServer,
                                                       admin: httpx.Client) -> None:
    ws, created = new_workspace(admin, "ops", admin=True, name="ops admin")
    assert created["admin"] is True
    with http(inproc, created["key"]) as c:
        other = ok(c.post("/v1/workspaces", json={"name": "made-by-ops"}), 201)
        assert {w["id"] for w in ok(c.get("/v1/workspaces"))} >= {ws, other["id"],
                                                                   inproc.default_workspace}
        assert ok(c.get("/v1/host"))["host_id"] == "fake"
        # it may delete the default workspace's sibling, not its own
        ok(c.delete(f"/v1/workspaces/{other['id']}"))


# -- workspace deletion and names -------------------------------------------------------------


def test_workspace_holding_objects_is_not_deleted(inproc: InProcessServer,
                                                  admin: httpx.Client) -> None:
    ws, created = new_workspace(admin, "team")
    c = http(inproc, created["key"])
    sid = ok(c.post("/v1/sessions", json={"memory_mb": 512}), 201)["id"]
    assert ok(c.get(f"/v1/sessions/{sid}/wait", params={"timeout_s": 10}))["state"] == "READY"
    vol = ok(c.post("/v1/volumes", json={"name": "v", "size_bytes": 1 << 20}), 201)["id"]
    snp = ok(c.post("/v1/snapshots", json={"session_id": sid}), 202)["id"]
    assert ok(c.get(f"/v1/snapshots/{snp}/wait", params={"timeout_s": 10}))["state"] == "READY"

    held = f"1 session ({sid}); 1 snapshot ({snp}); 1 volume ({vol})"
    resp = admin.delete(f"/v1/workspaces/{ws}")
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["code"] == "Conflict"
    assert resp.json()["error"]["message"] == \
        f"workspace {ws} still holds {held}; delete them first"
    with pytest.raises(errors.ConflictError, match=re.escape(held)):
        Client(endpoint=inproc.url).workspaces.delete(ws)
    ok(c.get("/v1/sessions"))  # its key still works

    # each kind is named until it is gone
    ok(c.delete(f"/v1/sessions/{sid}"))
    resp = admin.delete(f"/v1/workspaces/{ws}")
    assert resp.json()["error"]["message"] == \
        f"workspace {ws} still holds 1 snapshot ({snp}); 1 volume ({vol}); delete them first"
    ok(c.delete(f"/v1/volumes/{vol}"))
    resp = admin.delete(f"/v1/workspaces/{ws}")
    assert resp.json()["error"]["message"] == \
        f"workspace {ws} still holds 1 snapshot ({snp}); delete them first"
    ok(c.delete(f"/v1/snapshots/{snp}"))
    deadline = time.monotonic() + 5
    while ok(c.get(f"/v1/snapshots/{snp}"))["state"] != "DELETED":
        assert time.monotonic() < deadline, "the snapshot was not deleted"
        time.sleep(0.01)

    deleted = ok(admin.delete(f"/v1/workspaces/{ws}"))
    assert (deleted["id"], deleted["name"]) == (ws, "team")
    refused(admin.get(f"/v1/workspaces/{ws}"), 404, "WorkspaceNotFound",
            f"workspace {ws} not found")
    # its keys were revoked with it: the next call is refused
    refused(c.get("/v1/sessions"), 401, "Unauthorized",
            f"API key {created['prefix']}… ({created['id']}) was revoked: {EXPECTED}")
    (key,) = ok(admin.get("/v1/api-keys", params={"workspace_id": ws}))
    assert key["revoked_at"] is not None
    # a second delete: not found
    refused(admin.delete(f"/v1/workspaces/{ws}"), 404, "WorkspaceNotFound",
            f"workspace {ws} not found")


def test_deleting_a_workspace_revokes_every_key_of_it(inproc: InProcessServer,
                                                      admin: httpx.Client) -> None:
    ws, first = new_workspace(admin, "team")
    second = ok(admin.post("/v1/api-keys", json={"workspace_id": ws, "admin": True}), 201)
    other_ws, other = new_workspace(admin, "other")
    for k in (first, second, other):
        ok(http(inproc, k["key"]).get("/v1/sessions"))
    ok(admin.delete(f"/v1/workspaces/{ws}"))
    for k in (first, second):
        refused(http(inproc, k["key"]).get("/v1/sessions"), 401, "Unauthorized",
                f"API key {k['prefix']}… ({k['id']}) was revoked: {EXPECTED}")
    # another workspace's key is untouched
    ok(http(inproc, other["key"]).get("/v1/sessions"))
    assert ok(admin.get("/v1/api-keys", params={"workspace_id": other_ws}))[0][
        "revoked_at"] is None


def test_the_callers_own_workspace_is_not_deleted(inproc: InProcessServer,
                                                  admin: httpx.Client) -> None:
    default = inproc.default_workspace
    message = (f"workspace {default} holds the key making this call; delete it with an admin "
               "key of another workspace")
    refused(admin.delete(f"/v1/workspaces/{default}"), 403, "PermissionDenied", message)
    # nor by an admin key of its own made for it
    ws, created = new_workspace(admin, "ops", admin=True)
    refused(http(inproc, created["key"]).delete(f"/v1/workspaces/{ws}"), 403,
            "PermissionDenied",
            f"workspace {ws} holds the key making this call; delete it with an admin key of "
            "another workspace")
    assert ok(admin.get(f"/v1/workspaces/{default}"))["name"] == "default"
    ok(admin.get("/v1/sessions"))  # the admin key still works
    with pytest.raises(errors.PermissionDeniedError, match="holds the key making this call"):
        Client(endpoint=inproc.url).workspaces.delete(default)


def test_workspace_names_are_unique(inproc: InProcessServer, admin: httpx.Client) -> None:
    first = ok(admin.post("/v1/workspaces", json={"name": "team"}), 201)
    resp = admin.post("/v1/workspaces", json={"name": "team"})
    assert resp.status_code == 409, resp.text
    assert resp.json() == {"error": {"code": "Conflict", "field": "name",
                                     "message": "a workspace named 'team' exists already"}}
    resp = admin.post("/v1/workspaces", json={"name": "default"})
    assert resp.status_code == 409 and "'default' exists already" in resp.text
    # a rename onto a taken name too
    second = ok(admin.post("/v1/workspaces", json={"name": "team-2"}), 201)
    resp = admin.patch(f"/v1/workspaces/{second['id']}", json={"name": "team"})
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"] == {"code": "Conflict", "field": "name",
                                    "message": "a workspace named 'team' exists already"}
    assert ok(admin.get(f"/v1/workspaces/{second['id']}"))["name"] == "team-2"
    with pytest.raises(errors.ConflictError, match="exists already"):
        Client(endpoint=inproc.url).workspaces.create("team")
    names = [w["name"] for w in ok(admin.get("/v1/workspaces"))]
    assert sorted(names) == ["default", "team", "team-2"]
    # the name is free again once its workspace is deleted
    ok(admin.delete(f"/v1/workspaces/{first['id']}"))
    ok(admin.post("/v1/workspaces", json={"name": "team"}), 201)

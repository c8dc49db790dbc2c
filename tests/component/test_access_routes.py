"""Every route needs a key, and every mutating call is audited: the real app and control plane
over real HTTP (SQLite, the fake host below them).

The routes are read from the committed contract (``docs/openapi.json``), which must name exactly
the operations the app serves: a new route cannot be left out of these tests (nor of the
contract) without a test failing here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from fastapi.routing import APIRoute
from support.server import ADMIN_KEY, InProcessServer

from tenkibox.api.app import application

CONTRACT = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json")
                      .read_text())
EXPECTED = "expected the header Authorization: Bearer tk_<key>"
NO_KEY = {"error": {"code": "Unauthorized", "message": f"no API key: {EXPECTED}"}}
WRONG_KEY = "tk_" + "w" * 43
WRONG = {"error": {"code": "Unauthorized",
                   "message": f"unknown API key {WRONG_KEY[:11]}…: {EXPECTED}"}}
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
#: a made-up value for every path parameter of the contract
DUMMY = {"session_id": "ses_dummy00000000000", "process_id": "prc_dummy00000000000",
         "snapshot_id": "snp_dummy00000000000", "volume_id": "vol_dummy00000000000",
         "workspace_id": "ws_dummy000000000000", "key_id": "key_dummy00000000000"}


def contract_operations(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """operationId -> (METHOD, path template)."""
    ops = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                assert op["operationId"] not in ops, op["operationId"]
                ops[op["operationId"]] = (method.upper(), path)
    return ops


OPERATIONS = contract_operations(CONTRACT)


def error_body_problems(body: Any) -> list[str]:
    schema = {**CONTRACT["components"]["schemas"]["ErrorBody"],
              "components": CONTRACT["components"]}
    return [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(body)]


def concrete(path: str) -> str:
    """``path`` with a made-up id for each parameter (one of its kind where known)."""
    names = re.findall(r"\{(\w+)\}", path)
    return path.format(**{n: DUMMY.get(n, f"{n.removesuffix('_id')}_dummy0000") for n in names})


def http(server: InProcessServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=20.0)


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    return resp.json() if resp.content else None


# -- the operations covered are those served -----------------------------------------------------


def app_routes() -> tuple[set[tuple[str | None, str, str]], set[str]]:
    """The app's API routes as (operationId, METHOD, path), and the paths of its other routes
    (FastAPI's own). Routers included in the app are walked (their routes are wrapped in
    newer FastAPI versions)."""
    api: set[tuple[str | None, str, str]] = set()
    other: set[str] = set()

    def add(route: Any, path: str) -> None:
        for method in route.methods:
            api.add((route.operation_id, method, path))

    for route in application().routes:
        if isinstance(route, APIRoute):
            add(route, route.path)
        elif hasattr(route, "effective_route_contexts"):
            for ctx in route.effective_route_contexts():
                assert isinstance(ctx.original_route, APIRoute), ctx
                add(ctx.original_route, ctx.path)
        else:
            other.add(str(getattr(route, "path", route)))
    return api, other


def test_the_contract_names_every_route_the_app_serves(inproc: InProcessServer) -> None:
    api, other = app_routes()
    assert api == {(op, m, p) for op, (m, p) in OPERATIONS.items()}
    assert other == {"/openapi.json"}
    # the document the server serves (with a key) names the same operations
    with http(inproc, ADMIN_KEY) as c:
        served = ok(c.get("/openapi.json"))
    assert contract_operations(served) == OPERATIONS
    # and this file covers each of them (the parametrization below is made from OPERATIONS)
    assert sorted(COVERED) == sorted(OPERATIONS)
    assert len(OPERATIONS) >= 38


COVERED = list(OPERATIONS)


# -- no key, a wrong key -------------------------------------------------------------------------


@pytest.mark.parametrize("operation", COVERED)
def test_every_operation_without_a_key_is_401(inproc: InProcessServer, operation: str) -> None:
    method, template = OPERATIONS[operation]
    path = concrete(template)
    audit_before = len(inproc.plane.audit.query(None, 1000))
    for key, expected in ((None, NO_KEY), (WRONG_KEY, WRONG)):
        with http(inproc, key) as c:
            # no body and no query: the key is checked before anything else of the request
            resp = c.request(method, path)
        assert resp.status_code == 401, (operation, key, resp.text)
        assert resp.json() == expected, operation
        assert resp.headers["content-type"] == "application/json"
        assert error_body_problems(resp.json()) == []
    # nothing happened (the server did not stop, nothing was created) but the audit of a
    # mutating call
    assert not inproc.stop_requested.is_set()
    with http(inproc, ADMIN_KEY) as c:
        ok(c.get("/v1/health"))
        assert [w["name"] for w in ok(c.get("/v1/workspaces"))] == ["default"]
        assert ok(c.get("/v1/sessions")) == [] and ok(c.get("/v1/volumes")) == []
        assert len(ok(c.get("/v1/api-keys"))) == 1
    entries = inproc.plane.audit.query(None, 1000)
    mutating = method in ("POST", "PUT", "PATCH", "DELETE")
    assert len(entries) - audit_before == (2 if mutating else 0)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/nope"),
    ("POST", "/v1/nope"),
    ("GET", "/nope"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("DELETE", "/v1/sessions"),  # a known path, a method it does not have
    ("PATCH", "/v1/volumes/vol_dummy00000000000"),
])
def test_unknown_routes_without_a_key_are_401_not_404(inproc: InProcessServer, method: str,
                                                      path: str) -> None:
    with http(inproc, None) as c:
        resp = c.request(method, path)
    assert resp.status_code == 401, resp.text
    assert resp.json() == NO_KEY
    with http(inproc, WRONG_KEY) as c:
        resp = c.request(method, path)
    assert (resp.status_code, resp.json()) == (401, WRONG)


def test_unknown_route_with_a_key_is_404(inproc: InProcessServer) -> None:
    with http(inproc, ADMIN_KEY) as c:
        resp = c.get("/v1/nope")
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "NotFound"
        assert error_body_problems(resp.json()) == []
        assert c.delete("/v1/sessions").status_code == 405


# -- the audit trail ---------------------------------------------------------------------------


def _entry(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in ("workspace_id", "key_prefix", "action", "method", "path",
                              "object_id", "status", "outcome")}


@pytest.fixture
def audited(inproc: InProcessServer) -> Iterator[dict[str, Any]]:
    """A workspace with a key, and one call of each kind: a create, a delete, a refusal (404),
    a refusal (403), a refusal (422), reads, and calls without a key (401)."""
    admin = http(inproc, ADMIN_KEY)
    ws = ok(admin.post("/v1/workspaces", json={"name": "team"}), 201)["id"]
    key = ok(admin.post("/v1/api-keys", json={"workspace_id": ws}), 201)
    c = http(inproc, key["key"])
    vol = ok(c.post("/v1/volumes", json={"name": "v", "size_bytes": 1 << 20}), 201)["id"]
    ok(c.get(f"/v1/volumes/{vol}"))  # reads are not audited
    ok(c.get("/v1/volumes"))
    ok(c.delete(f"/v1/volumes/{vol}"))
    assert c.delete("/v1/sessions/ses_doesnotexist0000").status_code == 404
    assert c.post("/v1/workspaces", json={"name": "mine"}).status_code == 403
    assert c.post("/v1/volumes", json={"name": "", "size_bytes": 1 << 20}).status_code == 422
    no_key = http(inproc, None)
    assert no_key.post("/v1/volumes", json={"name": "v", "size_bytes": 1 << 20}) \
        .status_code == 401
    assert no_key.delete(f"/v1/volumes/{vol}").status_code == 401
    out = {"ws": ws, "key": key, "vol": vol, "admin": admin, "c": c, "no_key": no_key}
    yield out
    for client in (admin, c, no_key):
        client.close()


def test_every_mutating_call_is_audited(inproc: InProcessServer,
                                        audited: dict[str, Any]) -> None:
    ws, key, vol = audited["ws"], audited["key"], audited["vol"]
    prefix = key["prefix"]
    admin_prefix = ADMIN_KEY[:11]
    default = inproc.default_workspace
    mine = [
        {"workspace_id": ws, "key_prefix": prefix, "action": "createVolume", "method": "POST",
         "path": "/v1/volumes", "object_id": vol, "status": 201, "outcome": "ok"},
        {"workspace_id": ws, "key_prefix": prefix, "action": "deleteVolume",
         "method": "DELETE", "path": f"/v1/volumes/{vol}", "object_id": vol, "status": 200,
         "outcome": "ok"},
        {"workspace_id": ws, "key_prefix": prefix, "action": "terminateSession",
         "method": "DELETE", "path": "/v1/sessions/ses_doesnotexist0000",
         "object_id": "ses_doesnotexist0000", "status": 404, "outcome": "SessionNotFound"},
        {"workspace_id": ws, "key_prefix": prefix, "action": "createWorkspace",
         "method": "POST", "path": "/v1/workspaces", "object_id": None, "status": 403,
         "outcome": "PermissionDenied"},
        {"workspace_id": ws, "key_prefix": prefix, "action": "createVolume", "method": "POST",
         "path": "/v1/volumes", "object_id": None, "status": 422,
         "outcome": "ValidationError"},
    ]
    # the workspace key sees its workspace's entries, newest first, and only those
    seen = ok(audited["c"].get("/v1/audit"))
    assert [_entry(e) for e in seen] == mine[::-1]
    assert [e["id"] for e in seen] == sorted((e["id"] for e in seen), reverse=True)
    # the admin sees all: its own calls, the workspace's, and the calls without a key
    everything = [_entry(e) for e in ok(audited["admin"].get("/v1/audit"))][::-1]
    admins = [
        {"workspace_id": default, "key_prefix": admin_prefix, "action": "createWorkspace",
         "method": "POST", "path": "/v1/workspaces", "object_id": ws, "status": 201,
         "outcome": "ok"},
        {"workspace_id": default, "key_prefix": admin_prefix, "action": "createApiKey",
         "method": "POST", "path": "/v1/api-keys", "object_id": key["id"], "status": 201,
         "outcome": "ok"},
    ]
    assert everything[:2] == admins
    assert everything[2:7] == mine
    unauthenticated = everything[7:]
    assert [(e["workspace_id"], e["key_prefix"], e["method"], e["path"], e["status"],
             e["outcome"]) for e in unauthenticated] == [
        (None, None, "POST", "/v1/volumes", 401, "Unauthorized"),
        (None, None, "DELETE", f"/v1/volumes/{vol}", 401, "Unauthorized")]
    # one workspace's entries, for the admin
    filtered = ok(audited["admin"].get("/v1/audit", params={"workspace_id": ws}))
    assert [_entry(e) for e in filtered] == mine[::-1]
    # the workspace key may name its own workspace
    assert ok(audited["c"].get("/v1/audit", params={"workspace_id": ws})) == seen
    # paging
    page = ok(audited["c"].get("/v1/audit", params={"limit": 2}))
    rest = ok(audited["c"].get("/v1/audit", params={"before_id": page[-1]["id"]}))
    assert page + rest == seen


def test_a_call_without_a_key_is_audited_with_its_operation(inproc: InProcessServer,
                                                            audited: dict[str, Any]) -> None:
    entries = ok(audited["admin"].get("/v1/audit", params={"limit": 2}))
    assert [(e["action"], e["object_id"]) for e in entries] == [
        ("deleteVolume", audited["vol"]), ("createVolume", None)]

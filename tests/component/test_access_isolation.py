"""Workspace isolation through the REST API, over real HTTP (the real app and control plane on
SQLite, the fake host below them).

Two workspaces, A and B, each with a workspace key (both made with the admin key). A holds a
running session (with a file, a process and an attached volume), a READY snapshot and an
available volume; B holds a running session and a volume. Every call B's key can make on one of
A's objects is a cell of the matrix below (its own test id): it must answer 404 with exactly the
body of the same call naming an id that does not exist (the message names the id, so the two
are compared once the made-up id is replaced by A's), must reach nothing on the host, and must
leave everything as it was: A's records, A's file, A's process (still running, no stdin written
to it), B's records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support.fake_host import FakeHost
from support.server import AUTH, InProcessServer

SECRET_PATH = "/home/user/secret.txt"
SECRET = b"A's data: B must neither read nor change it\n"

#: ids of each kind that name nothing (valid ids, so only the lookup can refuse them)
MADE_UP = {"session": "ses_doesnotexist0000", "snapshot": "snp_doesnotexist0000",
           "volume": "vol_doesnotexist0000", "process": "prc_doesnotexist0000",
           "workspace": "ws_doesnotexist0000"}


def http(server: InProcessServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=20.0)


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    return resp.json() if resp.content else None


@dataclass
class World:
    server: InProcessServer
    host: FakeHost
    admin: httpx.Client
    a: httpx.Client
    b: httpx.Client
    ids: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        for c in (self.admin, self.a, self.b):
            c.close()


def _workspace(admin: httpx.Client, name: str) -> tuple[str, str, str]:
    ws = ok(admin.post("/v1/workspaces", json={"name": name}), 201)
    key = ok(admin.post("/v1/api-keys", json={"workspace_id": ws["id"], "name": f"{name} key"}),
             201)
    assert key["admin"] is False and key["workspace_id"] == ws["id"]
    return ws["id"], key["key"], key["id"]


def _running_session(c: httpx.Client) -> str:
    sid = ok(c.post("/v1/sessions", json={"memory_mb": 512}), 201)["id"]
    assert ok(c.get(f"/v1/sessions/{sid}/wait", params={"timeout_s": 10}))["state"] == "READY"
    return sid


@pytest.fixture
def world(inproc: InProcessServer, fake_host: FakeHost) -> Iterator[World]:
    admin = http(inproc, AUTH["Authorization"].removeprefix("Bearer "))
    ws_a, key_a, _ = _workspace(admin, "team-a")
    ws_b, key_b, _ = _workspace(admin, "team-b")
    w = World(inproc, fake_host, admin, http(inproc, key_a), http(inproc, key_b))
    a, b = w.a, w.b
    s_a = _running_session(a)
    ok(a.put(f"/v1/sessions/{s_a}/files", params={"path": SECRET_PATH}, content=SECRET))
    v_a = ok(a.post("/v1/volumes", json={"name": "a-data", "size_bytes": 1 << 20}), 201)["id"]
    v_a2 = ok(a.post("/v1/volumes", json={"name": "a-mounted", "size_bytes": 1 << 20}), 201)["id"]
    ok(a.post(f"/v1/sessions/{s_a}/volumes", json={"volume_id": v_a2, "path": "/mnt"}))
    snp_a = ok(a.post("/v1/snapshots", json={"session_id": s_a}), 202)["id"]
    assert ok(a.get(f"/v1/snapshots/{snp_a}/wait", params={"timeout_s": 10}))["state"] == "READY"
    # a process that runs until its stdin is closed: nothing B does may reach it
    p_a = ok(a.post(f"/v1/sessions/{s_a}/processes", json={"argv": ["cat"], "stdin": True}),
             201)["process_id"]
    s_b = _running_session(b)
    v_b = ok(b.post("/v1/volumes", json={"name": "b-data", "size_bytes": 1 << 20}), 201)["id"]
    w.ids = {"wsA": ws_a, "wsB": ws_b, "sA": s_a, "vA": v_a, "vA2": v_a2, "snA": snp_a,
             "pA": p_a, "sB": s_b, "vB": v_b}
    yield w
    w.close()


def state(w: World) -> dict[str, Any]:
    """Everything a foreign call could have changed, read with the owners' keys."""
    ids = w.ids
    out: dict[str, Any] = {}
    for who, c in (("A", w.a), ("B", w.b)):
        out[who] = {kind: ok(c.get(f"/v1/{kind}")) for kind in ("sessions", "snapshots",
                                                                 "volumes")}
        out[who]["workspace"] = ok(c.get(f"/v1/workspaces/{ids['ws' + who]}"))
        out[who]["usage"] = ok(c.get(f"/v1/workspaces/{ids['ws' + who]}/usage"))
    read = w.a.get(f"/v1/sessions/{ids['sA']}/files", params={"path": SECRET_PATH})
    assert read.status_code == 200, read.text
    out["A"]["file"] = read.content
    out["A"]["running processes"] = w.server.call(w.host.running_processes, ids["sA"])
    out["host"] = {"vms": sorted(w.server.call(lambda: list(w.host.vms))),
                   "volumes": sorted(w.server.call(lambda: list(w.host.volumes)))}
    return out


def a_process_is_untouched(w: World) -> None:
    """A closes the stdin of its ``cat``: it had read nothing, and exits 0 (not killed)."""
    s_a, p_a = w.ids["sA"], w.ids["pA"]
    ok(w.a.post(f"/v1/sessions/{s_a}/processes/{p_a}/stdin/close"), 204)
    with w.a.stream("GET", f"/v1/sessions/{s_a}/processes/{p_a}/events") as resp:
        assert resp.status_code == 200
        events = [json.loads(line) for line in resp.iter_lines() if line]
    assert events == [{"type": "exit", "exit_code": 0, "timed_out": False}], events


# -- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One call of B's key on one of A's objects. Strings are templates over ``World.ids``;
    ``target`` is the name of A's object the call must not find (the made-up id of its kind
    replaces it for the comparison); ``code``/``message``: the answer expected (message as a
    template; None where the message is the host's)."""

    id: str
    method: str
    path: str
    target: str
    code: str
    message: str | None
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None


KIND = {"sA": "session", "snA": "snapshot", "vA": "volume", "vA2": "volume", "pA": "process",
        "wsA": "workspace"}

SESSION_404 = ("SessionNotFound", "session {sA} not found")
SNAPSHOT_404 = ("SnapshotNotFound", "snapshot {snA} not found")
VOLUME_404 = ("VolumeNotFound", "volume {vA} not found")
WORKSPACE_404 = ("WorkspaceNotFound", "workspace {wsA} not found")
PROC = "/v1/sessions/{sA}/processes/{pA}"
B_PROC = "/v1/sessions/{sB}/processes/{pA}"

CELLS = [
    # A's session
    Cell("session-get", "GET", "/v1/sessions/{sA}", "sA", *SESSION_404),
    Cell("session-wait", "GET", "/v1/sessions/{sA}/wait", "sA", *SESSION_404,
         params={"timeout_s": 2}),
    Cell("session-terminate", "DELETE", "/v1/sessions/{sA}", "sA", *SESSION_404),
    Cell("session-snapshot-create", "POST", "/v1/snapshots", "sA", *SESSION_404,
         json={"session_id": "{sA}"}),
    Cell("session-snapshot-create-claiming-A", "POST", "/v1/snapshots", "sA", *SESSION_404,
         json={"session_id": "{sA}", "workspace_id": "{wsA}"}),
    Cell("session-attach-B-volume", "POST", "/v1/sessions/{sA}/volumes", "sA", *SESSION_404,
         json={"volume_id": "{vB}", "path": "/data"}),
    Cell("session-detach-its-volume", "DELETE", "/v1/sessions/{sA}/volumes/{vA2}", "sA",
         *SESSION_404),
    Cell("session-exec", "POST", "/v1/sessions/{sA}/processes", "sA", *SESSION_404,
         json={"argv": ["echo", "hi"]}),
    Cell("session-process-events", "GET", PROC + "/events", "sA", *SESSION_404),
    Cell("session-process-stdin", "POST", PROC + "/stdin", "sA", *SESSION_404,
         content=b"written by B\n"),
    Cell("session-process-stdin-close", "POST", PROC + "/stdin/close", "sA", *SESSION_404),
    Cell("session-process-kill", "POST", PROC + "/kill", "sA", *SESSION_404),
    Cell("session-file-read", "GET", "/v1/sessions/{sA}/files", "sA", *SESSION_404,
         params={"path": SECRET_PATH}),
    Cell("session-file-write", "PUT", "/v1/sessions/{sA}/files", "sA", *SESSION_404,
         params={"path": SECRET_PATH}, content=b"overwritten by B\n"),
    # A's process, named under B's own session
    Cell("process-events-via-B-session", "GET", B_PROC + "/events", "pA", "NotFound", None),
    Cell("process-stdin-via-B-session", "POST", B_PROC + "/stdin", "pA", "NotFound", None,
         content=b"written by B\n"),
    Cell("process-stdin-close-via-B-session", "POST", B_PROC + "/stdin/close", "pA",
         "NotFound", None),
    Cell("process-kill-via-B-session", "POST", B_PROC + "/kill", "pA", "NotFound", None),
    # A's snapshot
    Cell("snapshot-get", "GET", "/v1/snapshots/{snA}", "snA", *SNAPSHOT_404),
    Cell("snapshot-wait", "GET", "/v1/snapshots/{snA}/wait", "snA", *SNAPSHOT_404,
         params={"timeout_s": 2}),
    Cell("snapshot-delete", "DELETE", "/v1/snapshots/{snA}", "snA", *SNAPSHOT_404),
    Cell("snapshot-restore", "POST", "/v1/sessions", "snA", *SNAPSHOT_404,
         json={"snapshot_id": "{snA}"}),
    # A's volumes
    Cell("volume-get", "GET", "/v1/volumes/{vA}", "vA", *VOLUME_404),
    Cell("volume-delete", "DELETE", "/v1/volumes/{vA}", "vA", *VOLUME_404),
    Cell("volume-attach-to-B-session", "POST", "/v1/sessions/{sB}/volumes", "vA", *VOLUME_404,
         json={"volume_id": "{vA}", "path": "/data"}),
    Cell("volume-mount-in-B-create", "POST", "/v1/sessions", "vA", *VOLUME_404,
         json={"volumes": [{"volume_id": "{vA}", "path": "/data"}]}),
    Cell("volume-detach-via-B-session", "DELETE", "/v1/sessions/{sB}/volumes/{vA2}", "vA2",
         "VolumeNotFound", "volume {vA2} not found"),
    Cell("volume-get-attached", "GET", "/v1/volumes/{vA2}", "vA2", "VolumeNotFound",
         "volume {vA2} not found"),
    # A's workspace
    Cell("workspace-get", "GET", "/v1/workspaces/{wsA}", "wsA", *WORKSPACE_404),
    Cell("workspace-usage", "GET", "/v1/workspaces/{wsA}/usage", "wsA", *WORKSPACE_404),
    Cell("workspace-audit", "GET", "/v1/audit", "wsA", *WORKSPACE_404,
         params={"workspace_id": "{wsA}"}),
]


def render(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: render(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, ids) for v in value]
    return value


def send(c: httpx.Client, cell: Cell, ids: dict[str, str]) -> httpx.Response:
    return c.request(cell.method, render(cell.path, ids), params=render(cell.params, ids),
                     json=render(cell.json, ids), content=cell.content)


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_another_workspace_object_is_not_found(world: World, cell: Cell) -> None:
    ids = world.ids
    before = state(world)
    calls_before = len(world.host.calls)

    foreign = send(world.b, cell, ids)
    made_up = MADE_UP[KIND[cell.target]]
    unknown = send(world.b, cell, {**ids, cell.target: made_up})

    assert foreign.status_code == 404, foreign.text
    body = foreign.json()
    assert body["error"]["code"] == cell.code, body
    if cell.message is not None:
        assert body == {"error": {"code": cell.code, "message": render(cell.message, ids)}}
    assert ids[cell.target] in body["error"]["message"]
    # exactly the answer to an id that does not exist (but for the id it names)
    assert unknown.status_code == 404, unknown.text
    assert json.loads(unknown.text.replace(made_up, ids[cell.target])) == body
    assert foreign.headers["content-type"] == unknown.headers["content-type"]
    # the host was not asked to do anything, and nothing changed
    assert world.host.calls[calls_before:] == []
    assert state(world) == before
    assert before["A"]["file"] == SECRET
    assert before["A"]["running processes"] == 1
    a_process_is_untouched(world)


# -- lists -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, params, target", [
    ("/v1/sessions", None, "sA"),
    ("/v1/sessions", {"state": "RUNNING"}, "sA"),
    ("/v1/snapshots", None, "snA"),
    ("/v1/snapshots", {"session_id": "{sA}"}, "snA"),
    ("/v1/volumes", None, "vA"),
    ("/v1/volumes", None, "vA2"),
    ("/v1/workspaces", None, "wsA"),
    ("/v1/audit", None, "wsA"),
], ids=["sessions", "sessions-running", "snapshots", "snapshots-of-A-session", "volumes",
        "volumes-attached", "workspaces", "audit"])
def test_another_workspace_object_is_not_listed(world: World, path: str,
                                                params: dict[str, str] | None,
                                                target: str) -> None:
    ids = world.ids
    # the owner's list has it (the list is not simply empty) ...
    if path == "/v1/audit":
        assert any(e["workspace_id"] == ids["wsA"] for e in ok(world.a.get(path)))
    elif path != "/v1/workspaces":
        assert ids[target] in {r["id"] for r in ok(world.a.get(path, params=render(params,
                                                                                   ids)))}
    # ... the other's does not, nor anything else of A's
    listed = ok(world.b.get(path, params=render(params, ids)))
    text = json.dumps(listed)
    assert ids[target] not in text
    for name in ("wsA", "sA", "snA", "vA", "vA2", "pA"):
        assert ids[name] not in text, (name, listed)
    if path == "/v1/workspaces":
        assert [w["id"] for w in listed] == [ids["wsB"]]
    if path == "/v1/audit":
        assert listed and {e["workspace_id"] for e in listed} == {ids["wsB"]}


# -- records belong to their creator's workspace ------------------------------------------------


def test_every_record_belongs_to_the_creators_workspace(world: World) -> None:
    ids = world.ids
    for who, c in (("A", world.a), ("B", world.b)):
        ws = ids["ws" + who]
        records = [*ok(c.get("/v1/sessions")), *ok(c.get("/v1/snapshots")),
                   *ok(c.get("/v1/volumes"))]
        assert records and {r["workspace_id"] for r in records} == {ws}, records
    # each record read one by one, too, and the restore of A's snapshot is A's
    assert ok(world.a.get(f"/v1/sessions/{ids['sA']}"))["workspace_id"] == ids["wsA"]
    assert ok(world.a.get(f"/v1/snapshots/{ids['snA']}"))["workspace_id"] == ids["wsA"]
    assert ok(world.a.get(f"/v1/volumes/{ids['vA']}"))["workspace_id"] == ids["wsA"]
    assert ok(world.b.get(f"/v1/sessions/{ids['sB']}"))["workspace_id"] == ids["wsB"]
    assert ok(world.b.get(f"/v1/volumes/{ids['vB']}"))["workspace_id"] == ids["wsB"]
    restored = ok(world.a.post("/v1/sessions", json={"snapshot_id": ids["snA"]}), 201)
    assert restored["workspace_id"] == ids["wsA"] and restored["snapshot_id"] == ids["snA"]
    # the admin key's own records are the default workspace's
    s = ok(world.admin.post("/v1/sessions", json={"memory_mb": 512}), 201)
    assert s["workspace_id"] == world.server.default_workspace
    # ... and the records of the store agree with the answers
    from tenkibox.store.tables import SessionRow, SnapshotRow, VolumeRow

    owners = {}
    with world.server.store.tx() as orm:
        for cls in (SessionRow, SnapshotRow, VolumeRow):
            owners.update({r.id: r.workspace_id for r in orm.query(cls)})
    assert owners[ids["sA"]] == owners[ids["snA"]] == owners[ids["vA"]] == ids["wsA"]
    assert owners[restored["id"]] == owners[ids["vA2"]] == ids["wsA"]
    assert owners[ids["sB"]] == owners[ids["vB"]] == ids["wsB"]
    assert owners[s["id"]] == world.server.default_workspace


def test_snapshot_create_naming_another_workspace_is_refused(world: World) -> None:
    ids = world.ids
    resp = world.a.post("/v1/snapshots", json={"session_id": ids["sA"],
                                               "workspace_id": ids["wsB"]})
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": {
        "code": "ValidationError", "field": "workspace_id",
        "message": f"workspace_id: is set from the API key, whose workspace is {ids['wsA']}; "
                   f"got {ids['wsB']}"}}
    # nothing was created, in either workspace
    assert [s["id"] for s in ok(world.a.get("/v1/snapshots"))] == [ids["snA"]]
    assert ok(world.b.get("/v1/snapshots")) == []
    # naming its own workspace is allowed (and changes nothing)
    own = ok(world.a.post("/v1/snapshots", json={"session_id": ids["sA"],
                                                 "workspace_id": ids["wsA"]}), 202)
    assert own["workspace_id"] == ids["wsA"]

"""Workspace quotas (429) and the host's memory capacity (503) through the REST API and the SDK,
over real HTTP (the real app and control plane on SQLite, the fake host below them).

Quotas are set by an admin with ``PATCH /v1/workspaces/{id}`` and counted by the control plane
in the transaction that inserts the new record, so that of ten creates racing for five places
exactly five win. The host's capacity is ``FakeHost(memory_total_mib=...)``: every workspace's
sessions share it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from support.fake_host import FakeHost
from support.server import ADMIN_KEY, InProcessServer

from tenkibox import Client, errors

MiB = 1 << 20
CONTRACT = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json")
                      .read_text())


def http(server: InProcessServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"},
                        timeout=20.0)


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    return resp.json() if resp.content else None


def quota_refusal(resp: httpx.Response, name: str, limit: int, in_use: int) -> None:
    assert resp.status_code == 429, resp.text
    err = resp.json()["error"]
    assert err["code"] == "QuotaExceeded"
    assert err["message"] == f"quota exceeded: {name}={limit}, in use {in_use}"
    assert err.get("details") == {"quota": name, "limit": limit, "in_use": in_use}


@pytest.fixture
def admin(inproc: InProcessServer) -> Iterator[httpx.Client]:
    with http(inproc, ADMIN_KEY) as c:
        yield c


class Team:
    """A workspace, a key of it, and an HTTP client with that key."""

    def __init__(self, server: InProcessServer, admin: httpx.Client, name: str,
                 quotas: Mapping[str, int | None] | None = None) -> None:
        self.server = server
        self.admin = admin
        self.id = ok(admin.post("/v1/workspaces", json={"name": name}), 201)["id"]
        if quotas:
            self.set_quotas(**quotas)
        self.key = ok(admin.post("/v1/api-keys", json={"workspace_id": self.id}), 201)["key"]
        self.c = http(server, self.key)

    def set_quotas(self, **quotas: int | None) -> dict[str, Any]:
        ws = ok(self.admin.patch(f"/v1/workspaces/{self.id}", json={"quotas": quotas}))
        return dict(ws["quotas"])

    def sdk(self) -> Client:
        return Client(endpoint=self.server.url, api_key=self.key)

    def session(self, memory_mb: int = 512) -> httpx.Response:
        return self.c.post("/v1/sessions", json={"memory_mb": memory_mb})

    def ready_session(self, memory_mb: int = 512) -> str:
        sid = ok(self.session(memory_mb), 201)["id"]
        assert ok(self.c.get(f"/v1/sessions/{sid}/wait",
                             params={"timeout_s": 10}))["state"] == "READY"
        return sid

    def snapshot(self, session_id: str) -> httpx.Response:
        return self.c.post("/v1/snapshots", json={"session_id": session_id})

    def ready_snapshot(self, session_id: str) -> str:
        snp = ok(self.snapshot(session_id), 202)["id"]
        assert ok(self.c.get(f"/v1/snapshots/{snp}/wait",
                             params={"timeout_s": 10}))["state"] == "READY"
        return snp

    def volume(self, size: int = MiB) -> httpx.Response:
        return self.c.post("/v1/volumes", json={"name": "v", "size_bytes": size})

    def usage(self) -> dict[str, Any]:
        return dict(ok(self.c.get(f"/v1/workspaces/{self.id}/usage")))


def wait_for(what: str, fn: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout}s"
        time.sleep(0.01)


# -- max_concurrent_sessions -------------------------------------------------------------------


def test_ten_parallel_creates_for_five_places(inproc: InProcessServer,
                                              admin: httpx.Client) -> None:
    team = Team(inproc, admin, "team", {"max_concurrent_sessions": 5})
    start = threading.Barrier(10)
    answers: list[Any] = []
    lock = threading.Lock()

    def create() -> None:
        with team.sdk() as sdk:  # each thread its own client (and connection)
            sdk.health()  # connected before the race starts
            start.wait(10)
            try:
                got: Any = sdk.create(memory_mb=512)
            except errors.TenkiError as exc:
                got = exc
        with lock:
            answers.append(got)

    threads = [threading.Thread(target=create) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 10
    created = [a for a in answers if not isinstance(a, Exception)]
    refusals = [a for a in answers if isinstance(a, Exception)]
    assert len(created) == 5 and len(refusals) == 5, answers
    for exc in refusals:
        assert type(exc) is errors.QuotaExceededError, exc
        assert exc.message == "quota exceeded: max_concurrent_sessions=5, in use 5"
        assert exc.status == 429
        assert exc.details == {"quota": "max_concurrent_sessions", "limit": 5, "in_use": 5}
    # on the wire: five 201 and five 429
    statuses = sorted(r.status for r in inproc.requests.to("POST", "/v1/sessions"))
    assert statuses == [201] * 5 + [429] * 5
    assert len(ok(team.c.get("/v1/sessions"))) == 5
    assert team.usage()["concurrent_sessions"] == 5

    # the sixth is refused while five hold a VM; a terminate frees a place
    quota_refusal(team.session(), "max_concurrent_sessions", 5, 5)
    ok(team.c.delete(f"/v1/sessions/{created[0].id}"))
    assert team.usage()["concurrent_sessions"] == 4
    ok(team.session(), 201)
    quota_refusal(team.session(), "max_concurrent_sessions", 5, 5)
    # a refused create leaves no record behind
    assert len(ok(team.c.get("/v1/sessions"))) == 6  # five live, one TERMINATED


def test_a_failed_session_frees_its_place(inproc: InProcessServer, admin: httpx.Client,
                                          fake_host: FakeHost) -> None:
    team = Team(inproc, admin, "team", {"max_concurrent_sessions": 1})
    fake_host.fail_next("boot", errors.InternalError("no VM today"))
    sid = ok(team.session(), 201)["id"]
    assert ok(team.c.get(f"/v1/sessions/{sid}/wait",
                         params={"timeout_s": 10}))["state"] == "FAILED"
    assert team.usage()["concurrent_sessions"] == 0
    team.ready_session()
    quota_refusal(team.session(), "max_concurrent_sessions", 1, 1)


def test_quota_zero_refuses_everything(inproc: InProcessServer, admin: httpx.Client) -> None:
    team = Team(inproc, admin, "team", {"max_concurrent_sessions": 0, "max_volumes": 0})
    quota_refusal(team.session(), "max_concurrent_sessions", 0, 0)
    quota_refusal(team.volume(), "max_volumes", 0, 0)


# -- memory, snapshots, volumes, stored bytes --------------------------------------------------


def test_max_memory_mib(inproc: InProcessServer, admin: httpx.Client) -> None:
    team = Team(inproc, admin, "team", {"max_memory_mib": 2048})
    team.ready_session(1024)
    team.ready_session(512)
    quota_refusal(team.session(1024), "max_memory_mib", 2048, 1536)
    team.ready_session(512)  # exactly the limit fits
    quota_refusal(team.session(512), "max_memory_mib", 2048, 2048)
    with team.sdk() as sdk, pytest.raises(errors.QuotaExceededError) as err:
        sdk.create(memory_mb=512)
    assert err.value.message == "quota exceeded: max_memory_mib=2048, in use 2048"
    assert team.usage()["memory_mib"] == 2048


def test_max_snapshots(inproc: InProcessServer, admin: httpx.Client) -> None:
    team = Team(inproc, admin, "team", {"max_snapshots": 2})
    sid = team.ready_session()
    first = team.ready_snapshot(sid)
    team.ready_snapshot(sid)
    quota_refusal(team.snapshot(sid), "max_snapshots", 2, 2)
    with team.sdk() as sdk, pytest.raises(errors.QuotaExceededError,
                                          match=r"^quota exceeded: max_snapshots=2, in use 2$"):
        sdk.create_snapshot(sid)
    assert len(ok(team.c.get("/v1/snapshots"))) == 2
    # a deleted snapshot frees its place
    ok(team.c.delete(f"/v1/snapshots/{first}"))
    wait_for("the snapshot's deletion", lambda: team.usage()["snapshots"] == 1)
    team.ready_snapshot(sid)


def test_max_volumes(inproc: InProcessServer, admin: httpx.Client,
                     fake_host: FakeHost) -> None:
    team = Team(inproc, admin, "team", {"max_volumes": 1})
    vol = ok(team.volume(), 201)["id"]
    quota_refusal(team.volume(), "max_volumes", 1, 1)
    with team.sdk() as sdk, pytest.raises(errors.QuotaExceededError,
                                          match=r"^quota exceeded: max_volumes=1, in use 1$"):
        sdk.create_volume("v", "1MiB")
    # a refused volume leaves nothing on the host
    assert sorted(inproc.call(lambda: list(fake_host.volumes))) == [vol]
    ok(team.c.delete(f"/v1/volumes/{vol}"))
    ok(team.volume(), 201)


def test_max_stored_bytes_counts_volumes(inproc: InProcessServer, admin: httpx.Client) -> None:
    team = Team(inproc, admin, "team", {"max_stored_bytes": 3 * MiB})
    ok(team.volume(2 * MiB), 201)
    quota_refusal(team.volume(2 * MiB), "max_stored_bytes", 3 * MiB, 2 * MiB)
    ok(team.volume(MiB), 201)  # exactly the limit fits
    quota_refusal(team.volume(MiB), "max_stored_bytes", 3 * MiB, 3 * MiB)
    assert team.usage()["stored_bytes"] == 3 * MiB


def test_max_stored_bytes_counts_snapshots(inproc: InProcessServer, admin: httpx.Client,
                                           fake_host: FakeHost) -> None:
    stored = fake_host.capture_stored_bytes
    team = Team(inproc, admin, "team", {"max_stored_bytes": stored})
    sid = team.ready_session()
    # a snapshot's size is known once captured: the first is admitted (nothing stored yet) ...
    team.ready_snapshot(sid)
    assert team.usage()["stored_bytes"] == stored
    # ... and then the quota is full, for snapshots and volumes alike
    quota_refusal(team.snapshot(sid), "max_stored_bytes", stored, stored)
    quota_refusal(team.volume(), "max_stored_bytes", stored, stored)


def test_usage_counts_what_the_workspace_holds(inproc: InProcessServer, admin: httpx.Client,
                                               fake_host: FakeHost) -> None:
    quotas = {"max_concurrent_sessions": 10, "max_memory_mib": 8192, "max_snapshots": 5,
              "max_volumes": 5, "max_stored_bytes": 1 << 40}
    team = Team(inproc, admin, "team", quotas)
    other = Team(inproc, admin, "other")
    empty = {"workspace_id": team.id, "concurrent_sessions": 0, "memory_mib": 0,
             "snapshots": 0, "volumes": 0, "stored_bytes": 0, "quotas": quotas}
    assert team.usage() == empty
    s1 = team.ready_session(1024)
    team.ready_session(512)
    team.ready_snapshot(s1)
    ok(team.volume(MiB), 201)
    ok(team.volume(2 * MiB), 201)
    # another workspace's objects count for it, not for this one
    other.ready_session(2048)
    ok(other.volume(5 * MiB), 201)
    expected = {**empty, "concurrent_sessions": 2, "memory_mib": 1536, "snapshots": 1,
                "volumes": 2, "stored_bytes": fake_host.capture_stored_bytes + 3 * MiB}
    assert team.usage() == expected
    # the admin reads the same
    assert ok(admin.get(f"/v1/workspaces/{team.id}/usage")) == expected
    with team.sdk() as sdk:
        assert sdk.workspaces.usage(team.id).model_dump() == expected
    assert other.usage() == {"workspace_id": other.id, "concurrent_sessions": 1,
                             "memory_mib": 2048, "snapshots": 0, "volumes": 1,
                             "stored_bytes": 5 * MiB, "quotas": {
                                 k: None for k in quotas}}
    # a terminated session no longer counts
    ok(team.c.delete(f"/v1/sessions/{s1}"))
    assert team.usage() == {**expected, "concurrent_sessions": 1, "memory_mib": 512}


def test_removing_a_quota_lifts_it(inproc: InProcessServer, admin: httpx.Client) -> None:
    team = Team(inproc, admin, "team", {"max_volumes": 1, "max_snapshots": 3})
    ok(team.volume(), 201)
    quota_refusal(team.volume(), "max_volumes", 1, 1)
    # null removes that quota only; the others stay
    quotas = team.set_quotas(max_volumes=None)
    assert quotas["max_volumes"] is None and quotas["max_snapshots"] == 3
    assert ok(team.c.get(f"/v1/workspaces/{team.id}"))["quotas"] == {
        "max_concurrent_sessions": None, "max_memory_mib": None, "max_snapshots": 3,
        "max_volumes": None, "max_stored_bytes": None}
    ok(team.volume(), 201)
    ok(team.volume(), 201)
    assert team.usage()["volumes"] == 3
    # giving a quota below the use is allowed; it refuses the next create
    team.set_quotas(max_volumes=2)
    quota_refusal(team.volume(), "max_volumes", 2, 3)
    # the SDK removes one with None, too
    with Client(endpoint=inproc.url) as sdk:
        assert sdk.workspaces.update(team.id, quotas={"max_volumes": None}).quotas.max_volumes \
            is None
    ok(team.volume(), 201)


# -- host capacity -------------------------------------------------------------------------------


@pytest.fixture
def small_host(make_inproc: Callable[..., InProcessServer]) -> InProcessServer:
    """A server whose host may promise 3000 MiB of guest memory."""
    return make_inproc(host=FakeHost(memory_total_mib=3000, memory_reserve_mib=0,
                                     overcommit=1.0))


def test_capacity_is_the_hosts_across_workspaces(small_host: InProcessServer) -> None:
    admin = http(small_host, ADMIN_KEY)
    a = Team(small_host, admin, "team-a")
    b = Team(small_host, admin, "team-b")
    ok(admin.get("/v1/health"))
    first = a.ready_session(1024)
    b.ready_session(1024)
    message = ("capacity unavailable: host fake has promised 2048 of 3000 MiB of guest memory; "
               "a 1024 MiB session does not fit (retry when sessions end)")
    for team in (a, b):  # neither workspace has a quota: the host is full for both
        resp = team.session(1024)
        assert resp.status_code == 503, resp.text
        err = resp.json()["error"]
        assert (err["code"], err["message"]) == ("CapacityUnavailable", message)
        assert err.get("details") == {"host_id": "fake", "promised_mib": 2048,
                                      "capacity_mib": 3000, "requested_mib": 1024}
        with team.sdk() as sdk, pytest.raises(errors.CapacityUnavailableError) as exc:
            sdk.create(memory_mb=1024)
        assert exc.value.message == message and exc.value.retryable is True
        assert exc.value.status == 503
    # what still fits is admitted
    b.ready_session(512)
    host = ok(admin.get("/v1/host"))
    assert host == {"host_id": "fake", "memory_total_mib": 3000, "memory_reserve_mib": 0,
                    "overcommit": 1.0, "memory_capacity_mib": 3000, "memory_promised_mib": 2560,
                    "memory_used_mib": 2560 // 4, "sessions": 3, "cpus": 2,
                    "accelerator": "tcg", "network_enforced": True,
                    # the fake's booted guests hold their RAM on its tmpfs
                    "tmpfs_used_bytes": (2560 // 4) << 20, "tmpfs_total_bytes": 8 << 30,
                    "spares": []}  # TENKI_SPARES=off in these tests
    with Client(endpoint=small_host.url) as sdk:
        assert sdk.host.status().memory_promised_mib == 2560
    # a refused create left no record
    assert len(ok(a.c.get("/v1/sessions"))) == 1 and len(ok(b.c.get("/v1/sessions"))) == 2
    # after a terminate it fits again, whichever workspace asks
    ok(a.c.delete(f"/v1/sessions/{first}"))
    assert ok(admin.get("/v1/host"))["memory_promised_mib"] == 1536
    b.ready_session(1024)
    assert ok(admin.get("/v1/host"))["memory_promised_mib"] == 2560
    assert a.session(1024).status_code == 503
    admin.close()


def test_capacity_counts_sessions_being_created(small_host: InProcessServer) -> None:
    """A session still booting holds its memory: a create cannot slip in meanwhile."""
    admin = http(small_host, ADMIN_KEY)
    team = Team(small_host, admin, "team")
    gate = small_host.host.block("boot")
    try:
        s1 = ok(team.session(2048), 201)["id"]
        assert ok(team.c.get(f"/v1/sessions/{s1}"))["state"] == "CREATING"
        resp = team.session(1024)
        assert resp.status_code == 503, resp.text
        assert "has promised 2048 of 3000 MiB" in resp.json()["error"]["message"]
    finally:
        gate.release()
    assert ok(team.c.get(f"/v1/sessions/{s1}/wait",
                         params={"timeout_s": 10}))["state"] == "READY"
    admin.close()


def test_parallel_creates_never_overcommit_the_host(small_host: InProcessServer) -> None:
    admin = http(small_host, ADMIN_KEY)
    teams = [Team(small_host, admin, f"team-{i}") for i in range(2)]
    start = threading.Barrier(8)
    statuses: list[int] = []
    lock = threading.Lock()

    def create(team: Team) -> None:
        with http(small_host, team.key) as c:
            c.get("/v1/health")
            start.wait(10)
            status = c.post("/v1/sessions", json={"memory_mb": 1024}).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=create, args=(teams[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [201] * 2 + [503] * 6
    assert ok(admin.get("/v1/host"))["memory_promised_mib"] == 2048
    admin.close()


# -- the error format ----------------------------------------------------------------------------


def contract_problems(body: Any) -> list[str]:
    """What makes ``body`` not the contract's ``ErrorBody`` (the one error format)."""
    schema = {**CONTRACT["components"]["schemas"]["ErrorBody"],
              "components": CONTRACT["components"]}
    return [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(body)]


def test_refusals_are_the_contracts_error_body(small_host: InProcessServer) -> None:
    """429, 503 and 409 carry ``error.details`` (quota, limit and use; the host's numbers; what
    the workspace holds): the contract's ``ErrorBody`` must admit them."""
    admin = http(small_host, ADMIN_KEY)
    team = Team(small_host, admin, "team", {"max_volumes": 0})
    answers = {"quota": team.volume()}
    team.ready_session(2048)
    answers["capacity"] = team.session(2048)
    team.set_quotas(max_volumes=None)
    ok(team.volume(), 201)
    answers["workspace delete"] = admin.delete(f"/v1/workspaces/{team.id}")
    assert [r.status_code for r in answers.values()] == [429, 503, 409]
    problems = {what: contract_problems(r.json()) for what, r in answers.items()}
    admin.close()
    assert problems == {what: [] for what in answers}

"""Schemathesis over the whole REST API (issue 9): the real app and control plane, a fake host.

The committed contract (``docs/openapi.json``) drives schemathesis's stateless tests against
``support.server.InProcessServer`` (real routes, real control plane on SQLite, ``FakeHost``: no
VM is booted, so the file runs in well under a minute):

* negative mode (inputs the schema forbids) for every operation: each must be refused with a
  declared 4xx in the one error format. Operations with nothing to negate (no body, no query, only
  free-form string path parameters: ``GET /v1/health``, ``DELETE /v1/volumes/{volume_id}``, ...)
  cannot get negative data; that list is checked exactly, so that a new negatable parameter
  cannot be skipped silently;
* positive mode for the read-only (GET) operations, with path parameters that sometimes name
  records that exist (a session with a file, a process, a snapshot, a volume, seeded first).

Checks on every response: no 5xx, the status code is declared for the operation, the body
matches the declared schema (``ErrorBody`` for every 4xx/5xx), the content type is declared, and
every line of an NDJSON stream matches the item schema the contract gives it (schemathesis has no
NDJSON reader, so the last is a check of this file). A last test reads a process's event stream
while its session ends, the one event (``error``) fuzzing does not reach.

Hypothesis is derandomized (same cases on every run) and bounded by ``MAX_EXAMPLES`` per operation
and mode; ``TENKI_SCHEMATHESIS_EXAMPLES`` raises it for a longer local run::

    .venv/bin/pytest tests/component/test_schemathesis.py
    TENKI_SCHEMATHESIS_EXAMPLES=500 .venv/bin/pytest tests/component/test_schemathesis.py

A failure names the operation, the mode and schemathesis's report (with a ``curl`` line to
reproduce it against a running server).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.server import InProcessServer

from tenkibox.client._core import parse_events

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
DOC = json.loads(CONTRACT.read_text())
MAX_EXAMPLES = int(os.environ.get("TENKI_SCHEMATHESIS_EXAMPLES", "50"))
REQUEST_TIMEOUT_S = 30.0
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same cases on every run (CI must be reproducible)
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
    print_blob=False,
)
SEEDED_FILE = "/home/user/hello.txt"


# -- NDJSON streams --------------------------------------------------------------------------------


def ndjson_problems(path: str, method: str, status: int, media_type: str, body: bytes,
                    ) -> list[str]:
    """What is wrong with the lines of an NDJSON answer, by the contract: the ``schema`` of the
    media type describes one line (as for event streams before OpenAPI 3.2)."""
    response = DOC["paths"][path][method.lower()]["responses"].get(str(status), {})
    item = response.get("content", {}).get(media_type, {}).get("schema")
    if item is None:
        return [f"the contract gives no item schema for {status} {media_type}"]
    validator = jsonschema_rs.Draft202012Validator({**item, "components": DOC["components"]})
    problems = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            problems.append(f"line {n}: not JSON ({exc}): {line[:200]!r}")
            continue
        problems += [f"line {n}: {err.message}: {line[:200]!r}"
                     for err in validator.iter_errors(value)]
    return problems


def ndjson_items_conform(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every line of an NDJSON answer matches the contract's item schema."""
    content_type = next((v[0] for k, v in response.headers.items()
                         if k.lower() == "content-type" and v), "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/x-ndjson":
        return None
    problems = ndjson_problems(case.operation.path, case.method, response.status_code,
                               media_type, response.content)
    assert not problems, "\n".join(problems)
    return True


CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance,
          content_type_conformance, ndjson_items_conform]


@dataclass
class Run:
    """What one mode did: calls made, operations exercised, operations skipped, failures."""

    calls: int = 0
    exercised: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n\n".join(self.failures)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with InProcessServer(tmp_path_factory.mktemp("schemathesis")) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: InProcessServer) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {server.api_key}"
        yield session


@pytest.fixture(scope="module")
def seeds(server: InProcessServer, http: requests.Session) -> dict[str, str]:
    """Records that exist, for path parameters: a running session with a file and a finished
    process, a READY snapshot of it, and a volume attached to it."""

    def call(method: str, path: str, expect: int, **kw: Any) -> Any:
        r = http.request(method, server.url + path, timeout=REQUEST_TIMEOUT_S, **kw)
        assert r.status_code == expect, (method, path, r.status_code, r.text)
        return r.json() if r.content else None

    sid = call("POST", "/v1/sessions", 201, json={"name": "fuzz"})["id"]
    assert call("GET", f"/v1/sessions/{sid}/wait", 200)["state"] in ("READY", "RUNNING")
    call("PUT", f"/v1/sessions/{sid}/files", 200, params={"path": SEEDED_FILE}, data=b"hello\n",
         headers={"Content-Type": "application/octet-stream"})
    pid = call("POST", f"/v1/sessions/{sid}/processes", 201, json={"argv": ["echo", "hi"]})[
        "process_id"]
    snap = call("POST", "/v1/snapshots", 202, json={"session_id": sid, "name": "fuzz"})["id"]
    assert call("GET", f"/v1/snapshots/{snap}/wait", 200)["state"] == "READY"
    vol = call("POST", "/v1/volumes", 201, json={"name": "fuzz", "size_bytes": 1 << 20})["id"]
    call("POST", f"/v1/sessions/{sid}/volumes", 200, json={"volume_id": vol, "path": "/mnt/v"})
    return {"session_id": sid, "process_id": pid, "snapshot_id": snap, "volume_id": vol}


@pytest.fixture(scope="module")
def schema(server: InProcessServer) -> Any:
    # the session sends the admin key on every call: the contract's security requirement is
    # left out, or schemathesis would negate it (and e.g. send the shutdown with the key);
    # calls without a key are tests/component/test_access_routes.py's
    doc = {k: v for k, v in DOC.items() if k != "security"}
    loaded = schemathesis.openapi.from_dict(doc, config=schemathesis.Config())
    loaded.config.update(base_url=server.url)
    return loaded


# -- the run --------------------------------------------------------------------------------------


def _operations(schema: Any) -> list[Any]:
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) == sum(len(methods) for methods in DOC["paths"].values())
    return ops


def _nothing_to_negate(op: Any) -> bool:
    """No body, no query and only unconstrained string path parameters: every input the schema
    allows is valid, so there is no negative case to make."""
    spec = op.definition.raw
    if "requestBody" in spec:
        return False
    for param in spec.get("parameters", []):
        keys = set(param["schema"]) - {"title", "description"}
        if param["in"] != "path" or keys != {"type"} or param["schema"]["type"] != "string":
            return False
    return True


def _strategy(op: Any, mode: GenerationMode, seeds: dict[str, str]) -> Any:
    strategy = op.as_strategy(generation_mode=mode)
    names = [p["name"] for p in op.definition.raw.get("parameters", []) if p["in"] == "path"]
    if mode is GenerationMode.NEGATIVE or not names or not set(names) <= set(seeds):
        return strategy
    known = {name: seeds[name] for name in names}
    choices = [strategy, op.as_strategy(generation_mode=mode, path_parameters=known)]
    if op.definition.raw.get("operationId") == "readFile":
        choices.append(op.as_strategy(generation_mode=mode, path_parameters=known,
                                      query={"path": SEEDED_FILE}))
    return st.one_of(choices)


def _exercise(op: Any, mode: GenerationMode, seeds: dict[str, str], http: requests.Session,
              run: Run) -> None:
    calls_before = run.calls

    @SETTINGS
    @given(case=_strategy(op, mode, seeds))
    def test(case: Any) -> None:
        run.calls += 1
        case.call_and_validate(session=http, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    try:
        test()
    except Unsatisfiable:
        run.skipped.add(op.label)
        return
    except (Exception, BaseExceptionGroup) as exc:  # schemathesis's report says what and how
        run.failures.append(f"=== {op.label} ({mode.value}) ===\n{exc}")
    if run.calls > calls_before:
        run.exercised.add(op.label)


def _run(schema: Any, seeds: dict[str, str], http: requests.Session, mode: GenerationMode,
         *, read_only: bool = False) -> Run:
    run = Run()
    for op in _operations(schema):
        if read_only and op.method.upper() != "GET":
            continue
        _exercise(op, mode, seeds, http, run)
    return run


def test_negative_data_is_refused_in_the_error_format(
        schema: Any, seeds: dict[str, str], http: requests.Session,
        server: InProcessServer) -> None:
    requests_before = len(server.requests)
    run = _run(schema, seeds, http, GenerationMode.NEGATIVE)
    assert not run.failures, run.report()

    ops = _operations(schema)
    expected_skips = {op.label for op in ops if _nothing_to_negate(op)}
    assert run.skipped == expected_skips, "operations without negative cases changed"
    assert run.exercised == {op.label for op in ops} - expected_skips
    assert len(run.exercised) >= 12
    assert run.calls >= 10 * len(run.exercised), run.calls
    # the calls reached this server (and the shutdown operation was never sent)
    assert len(server.requests) - requests_before >= run.calls
    assert server.running and not server.stop_requested.is_set()


def test_read_only_operations_answer_per_contract(
        schema: Any, seeds: dict[str, str], http: requests.Session,
        server: InProcessServer) -> None:
    requests_before = len(server.requests)
    run = _run(schema, seeds, http, GenerationMode.POSITIVE, read_only=True)
    assert not run.failures, run.report()

    gets = {op.label for op in _operations(schema) if op.method.upper() == "GET"}
    assert run.skipped == set()
    assert run.exercised == gets
    assert len(gets) >= 12
    assert run.calls >= 10 * len(gets), run.calls
    assert len(server.requests) - requests_before >= run.calls
    # the seeds were hit: some answers were 200s about records that exist
    hits = [r for r in server.requests[requests_before:]
            if r.method == "GET" and r.status == 200 and seeds["session_id"] in r.path]
    assert hits, "no positive call named the seeded session"
    assert any(r.path.endswith(f"/{seeds['process_id']}/events") for r in hits), \
        "the seeded process's event stream was never read (the NDJSON check did not run)"


def test_event_stream_cut_by_the_session_end_matches_the_contract(
        server: InProcessServer, http: requests.Session) -> None:
    """A stream read while its session is terminated ends with an ``error`` event (with the bytes
    delivered); that event matches the contract and the SDK's reader takes it."""
    base = server.url + "/v1/sessions"
    sid = http.post(base, json={}, timeout=REQUEST_TIMEOUT_S).json()["id"]
    http.get(f"{base}/{sid}/wait", timeout=REQUEST_TIMEOUT_S).raise_for_status()
    started = http.post(f"{base}/{sid}/processes", json={"command": "echo hi; sleep 3600"},
                        timeout=REQUEST_TIMEOUT_S)
    assert started.status_code == 201, started.text
    events = f"{base}/{sid}/processes/{started.json()['process_id']}/events"
    with http.get(events, stream=True, timeout=REQUEST_TIMEOUT_S) as r:
        assert r.status_code == 200, r.text
        media_type = r.headers["content-type"]
        lines = r.iter_lines()
        first = next(lines)  # the output so far; the process still runs
        assert http.delete(f"{base}/{sid}", timeout=REQUEST_TIMEOUT_S).status_code == 200
        body = b"\n".join([first, *lines]) + b"\n"

    path = "/v1/sessions/{session_id}/processes/{process_id}/events"
    assert media_type == "application/x-ndjson"
    assert ndjson_problems(path, "GET", 200, media_type, body) == []
    parsed = parse_events(body)  # raised "malformed process event from server" before the fix
    assert [e.type for e in parsed] == ["stdout", "error"], body
    assert parsed[-1].delivered_bytes == len(b"hi\n") and parsed[-1].message

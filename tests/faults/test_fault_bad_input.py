"""Bad input over REST: every answer a 4xx (never a 5xx, never a dropped connection) in the one
error format ``{"error": {"code", "message", "field"?}}``, naming the field where there is one.

A case that the server wrongly accepts may start a VM or a capture: whatever it made is removed
again (and the case fails). After the table: the server is alive, the guest has no process left
waiting for stdin that never came, and the CLI prints no raw escape sequence from a record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import faultlib as fl
import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MB = 1_000_000
SMALL = {"memory_mb": 512, "cpu": 1}  # should a bad create be accepted, it costs little
ERROR_KEYS = {"code", "message", "field", "details"}


@dataclass
class Case:
    id: str
    method: str
    path: str  # "{sid}" is the live session's id
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    names: str | None = None  # the field the error must name (a prefix of its path)


def _many_env(n: int) -> dict[str, str]:
    return {f"K{i}": "v" for i in range(n)}


SES, PROC, FILES, SNAP, VOL = ("/v1/sessions", "/v1/sessions/{sid}/processes",
                               "/v1/sessions/{sid}/files", "/v1/snapshots", "/v1/volumes")
LONG_PATH = "/" + "a" * 9999
BAD_STDIN_MARK = "tenki-bad-stdin-mark"

CASES = [
    Case("argv-nul", "POST", PROC, {"argv": ["echo", "a\u0000b"]}, names="argv"),
    Case("command-nul", "POST", PROC, {"command": "echo a\u0000b"}, names="command"),
    Case("exec-env-value-nul", "POST", PROC, {"argv": ["true"], "env": {"A": "x\u0000y"}},
         names="env"),
    Case("exec-env-key-nul", "POST", PROC, {"argv": ["true"], "env": {"A\u0000B": "x"}},
         names="env"),
    Case("exec-env-key-equals", "POST", PROC, {"argv": ["true"], "env": {"A=B": "x"}},
         names="env"),
    Case("exec-cwd-nul", "POST", PROC, {"argv": ["true"], "cwd": "/ro\u0000ot"}, names="cwd"),
    Case("exec-20000-env-keys", "POST", PROC, {"argv": ["true"], "env": _many_env(20000)},
         names="env"),
    Case("exec-stdin-not-base64", "POST", PROC,
         {"argv": ["sh", "-c", f"cat >/dev/null # {BAD_STDIN_MARK}"],
          "stdin_data": "!!! not base64 !!!"}, names="stdin_data"),
    Case("exec-50mb-body", "POST", PROC, {"argv": ["echo", "x" * (50 * MB)]}),
    Case("session-env-key-nul", "POST", SES, {**SMALL, "env": {"A\u0000B": "x"}}, names="env"),
    Case("session-env-value-nul", "POST", SES, {**SMALL, "env": {"A": "x\u0000"}}, names="env"),
    Case("session-env-key-equals", "POST", SES, {**SMALL, "env": {"A=B": "x"}}, names="env"),
    Case("session-20000-env-keys", "POST", SES, {**SMALL, "env": _many_env(20000)},
         names="env"),
    Case("session-name-nul", "POST", SES, {**SMALL, "name": "a\u0000b"}, names="name"),
    Case("session-name-1mb", "POST", SES, {**SMALL, "name": "n" * MB}, names="name"),
    Case("session-name-escape", "POST", SES, {**SMALL, "name": "red\u001b[31mtext"},
         names="name"),
    Case("session-name-bell", "POST", SES, {**SMALL, "name": "ding\u0007"}, names="name"),
    Case("session-name-c1", "POST", SES, {**SMALL, "name": "csi\u009b2J"}, names="name"),
    Case("session-name-lone-surrogate", "POST", SES, None,
         content=b'{"name": "\\ud800", "memory_mb": 512, "cpu": 1}', names="name",
         headers={"content-type": "application/json"}),
    Case("session-metadata-key-nul", "POST", SES, {**SMALL, "metadata": {"k\u0000": "v"}},
         names="metadata"),
    Case("session-50mb-body", "POST", SES, {**SMALL, "metadata": {"k": "v" * (50 * MB)}}),
    Case("session-malformed-json", "POST", SES, None, content=b'{"name": "x", ',
         headers={"content-type": "application/json"}),
    Case("session-invalid-utf8", "POST", SES, None,
         content=b'{"name": "\xff\xfe", "memory_mb": 512, "cpu": 1}',
         headers={"content-type": "application/json"}),
    Case("session-not-an-object", "POST", SES, [1, 2, 3]),
    Case("snapshot-name-nul", "POST", SNAP, {"session_id": "{sid}", "name": "s\u0000"},
         names="name"),
    Case("snapshot-name-1mb", "POST", SNAP, {"session_id": "{sid}", "name": "s" * MB},
         names="name"),
    Case("snapshot-name-escape", "POST", SNAP, {"session_id": "{sid}", "name": "\u001b]0;x\u0007"},
         names="name"),
    Case("volume-name-nul", "POST", VOL, {"name": "v\u0000", "size_bytes": 1 << 20},
         names="name"),
    Case("volume-name-escape", "POST", VOL, {"name": "v\u001b[2J", "size_bytes": 1 << 20},
         names="name"),
    Case("read-path-nul", "GET", FILES, params={"path": "/root/a\u0000b"}, names="path"),
    Case("write-path-nul", "PUT", FILES, params={"path": "/root/a\u0000b"}, content=b"x",
         names="path"),
    Case("read-path-10000", "GET", FILES, params={"path": LONG_PATH}, names="path"),
    Case("write-path-10000", "PUT", FILES, params={"path": LONG_PATH}, content=b"x",
         names="path"),
    Case("read-path-invalid-utf8", "GET", FILES + "?path=/root/%FF%FE", names="path"),
]


@pytest.fixture(scope="module")
def box(server: fl.FaultServer, client: Any) -> Iterator[str]:
    s = client.create_and_wait(name="bad-input-box", memory_mb=512, cpu=1, timeout=300)
    s.files.write(fl.MARKER_PATH, fl.MARKER)
    yield str(s.id)


def _json_or_none(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _undo(server: fl.FaultServer, r: httpx.Response) -> None:
    """Remove what a wrongly accepted request made."""
    body = _json_or_none(r) if r.status_code in (200, 201, 202) else None
    if not isinstance(body, dict) or "id" not in body:
        return
    rid = str(body["id"])
    kind = {"ses": "sessions", "snp": "snapshots", "vol": "volumes"}.get(rid.split("_")[0])
    if kind is None:
        return
    if kind == "snapshots":
        fl.wait_snapshot_state(server, rid, {"READY", "FAILED"}, 300)
    httpx.delete(f"{server.url}/v1/{kind}/{rid}", timeout=60, headers=fl.AUTH)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_4xx_in_the_error_format(server: fl.FaultServer, box: str,
                                                case: Case) -> None:
    body = json.loads(json.dumps(case.json).replace("{sid}", box)) if case.json is not None \
        else None
    path = case.path.replace("{sid}", box)
    try:
        r = httpx.request(case.method, f"{server.url}{path}", json=body, content=case.content,
                          params=case.params or None,
                          headers={**fl.AUTH, **(case.headers or {})}, timeout=120)
    except httpx.TransportError as exc:
        pytest.fail(f"the server dropped the connection: {exc!r}; alive: {server.alive()}")
    try:
        assert 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:300]}"
        err = _json_or_none(r)
        if err is None:
            pytest.fail(f"HTTP {r.status_code} without a JSON body: {r.text[:300]!r}")
        assert isinstance(err, dict) and set(err) == {"error"}, f"not the error format: {err}"
        e = err["error"]
        assert isinstance(e, dict) and {"code", "message"} <= set(e) <= ERROR_KEYS, e
        assert isinstance(e["code"], str) and e["code"], e
        assert isinstance(e["message"], str) and e["message"], e
        assert len(e["message"]) < 2000, f"a {len(e['message'])}-character message"
        if case.names is not None:
            got = e.get("field") or ""
            assert got == case.names or got.startswith((case.names + ".", case.names + "[")), \
                f"the error names field {got!r}, not {case.names!r}: {e}"
    finally:
        _undo(server, r)
    if case.id == "exec-stdin-not-base64":
        with server.client() as c:
            ps = fl.sh(c.get(box), "ps -eo pid,args")
        waiting = [line for line in ps.splitlines()
                   if BAD_STDIN_MARK in line and "ps -eo" not in line]
        assert not waiting, f"a process waits for stdin in the guest: {waiting}"


def test_server_survives_the_table(server: fl.FaultServer, box: str) -> None:
    assert server.alive(), server.log_tail()
    assert httpx.get(f"{server.url}/v1/health", timeout=10, headers=fl.AUTH).status_code == 200
    with server.client() as c:
        assert c.get(box).files.read_text(fl.MARKER_PATH) == fl.MARKER
    fl.assert_settled(server)


ESC_TEXTS = {"name": "esc\u001b[31mred\u001b[0m", "metadata": {"note": "\u001b]0;pwned\u0007x",
                                                              "clear": "\u001b[2J\u001b[H"}}


def test_cli_prints_no_raw_escape_from_a_record(server: fl.FaultServer) -> None:
    """A record carrying ESC sequences (if the server accepts them at all) is printed by the
    CLI without a raw ESC byte; refused input must be refused in the error format."""
    made: list[str] = []
    try:
        for key, value in ESC_TEXTS.items():
            r = httpx.post(f"{server.url}/v1/sessions", json={**SMALL, key: value},
                           timeout=60, headers=fl.AUTH)
            if r.status_code == 201:
                made.append(r.json()["id"])
                httpx.delete(f"{server.url}/v1/sessions/{made[-1]}", timeout=60, headers=fl.AUTH)
            else:
                assert 400 <= r.status_code < 500 and r.json()["error"].get("field", "") \
                    .startswith(key), r.text[:300]
        for sid in made:
            for args in (("sandbox", "get", sid), ("sandbox", "list")):
                out = server.cli(*args)
                assert out.returncode == 0, out.stderr.decode(errors="replace")
                assert b"\x1b" not in out.stdout, f"`tenki {' '.join(args)}` printed raw ESC: " \
                                                  f"{out.stdout[:400]!r}"
                assert b"\x07" not in out.stdout, f"raw BEL: {out.stdout[:400]!r}"
                assert b"\x1b" not in out.stderr, out.stderr[:400]
    finally:
        for sid in made:
            httpx.delete(f"{server.url}/v1/sessions/{sid}", timeout=60, headers=fl.AUTH)

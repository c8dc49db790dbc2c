"""Input limits and the one error format of the API (no VMs: a small app with the real models)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import pydantic
import pytest
from click.testing import CliRunner
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from support.fake_host import FakeHost
from support.server import InProcessServer

from tenkibox import Client, limits
from tenkibox.api.errors import BodyLimitMiddleware, field_of, install_error_handlers
from tenkibox.cli import _common as c
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.errors import (
    ERROR_TABLE,
    InternalError,
    SessionFailedError,
    SessionNotFoundError,
    error_from_body,
)
from tenkibox.models import (
    ExecRequest,
    SessionCreate,
    SnapshotCreate,
    TemplateCreate,
    VolumeAttach,
    VolumeCreate,
)

MiB = 1 << 20
JSON = {"content-type": "application/json"}


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/sessions", status_code=201)
    async def create_session(body: SessionCreate) -> dict[str, Any]:
        return {"name": body.name}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        if session_id == "ses_missing":
            raise SessionNotFoundError(f"session {session_id} not found")
        return {"id": session_id}

    @app.post("/v1/sessions/{session_id}/processes", status_code=201)
    async def start_process(session_id: str, body: ExecRequest) -> dict[str, Any]:
        return {"argv": len(body.argv or [])}

    files = APIRouter(prefix="/v1/sessions")  # an included router, as the real app has

    @files.get("/{session_id}/files")
    async def read_file(session_id: str, path: str) -> dict[str, Any]:
        return {"path": path}

    @app.put("/v1/sessions/{session_id}/files")
    async def write_file(session_id: str, path: str, request: Request) -> dict[str, Any]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"path": path, "size_bytes": size}

    @app.post("/v1/sessions/{session_id}/volumes")
    async def attach_volume(session_id: str, body: VolumeAttach) -> dict[str, Any]:
        return {"path": body.path}

    @app.post("/v1/snapshots", status_code=202)
    async def create_snapshot(body: SnapshotCreate) -> dict[str, Any]:
        return {"name": body.name}

    @app.get("/v1/snapshots")
    async def list_snapshots(session_id: str | None = None) -> list[str]:
        return []

    @app.post("/v1/templates", status_code=201)
    async def create_template(body: TemplateCreate) -> dict[str, Any]:
        return {"ready_when": body.ready_when.model_dump() if body.ready_when else None}

    @app.post("/v1/volumes", status_code=201)
    async def create_volume(body: VolumeCreate) -> dict[str, Any]:
        return {"name": body.name}

    app.include_router(files)

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/shadow")

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as tc:
        yield tc


def error_of(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert code in ERROR_TABLE or code == "Internal"
    return err  # type: ignore[no-any-return]


def vol(path: str) -> dict[str, Any]:
    return {"volumes": [{"volume_id": "vol_1", "path": path}]}


LONG_PATH = "/" + "a" * 9_999  # 10,000 characters

BAD_INPUTS = [
    # (route, body, expected field)
    ("/v1/sessions/ses_1/processes", {"argv": ["ls", "-l", "x", "a\0b"]}, "argv.3"),
    ("/v1/sessions/ses_1/processes", {"argv": ["true"], "env": {"FOO": "a\0b"}}, "env.FOO"),
    ("/v1/sessions/ses_1/processes", {"argv": ["true"], "env": {"F\0O": "x"}}, "env"),
    ("/v1/sessions/ses_1/processes", {"argv": ["true"], "env": {"A=B": "x"}}, "env"),
    ("/v1/sessions/ses_1/processes", {"argv": ["true"], "cwd": "/tmp\0"}, "cwd"),
    ("/v1/sessions/ses_1/processes", {"argv": ["true"], "cwd": LONG_PATH}, "cwd"),
    ("/v1/sessions/ses_1/processes", {"argv": ["cat"], "stdin_data": "not base64!"}, "stdin_data"),
    ("/v1/sessions/ses_1/processes", {"argv": ["cat"], "stdin_data": "QUJ"}, "stdin_data"),
    ("/v1/sessions/ses_1/processes", {"command": "echo \0"}, "command"),
    ("/v1/sessions/ses_1/processes", {"argv": ["x"] * 1025}, "argv"),
    ("/v1/sessions/ses_1/processes", {"argv": ["x" * (128 * 1024 + 1)]}, "argv.0"),
    ("/v1/sessions/ses_1/processes", {"argv": ["true"], "timeout_s": 1e300}, "timeout_s"),
    ("/v1/sessions", {"name": "a\0b"}, "name"),
    ("/v1/sessions", {"name": "red\x1b[31m"}, "name"),
    ("/v1/sessions", {"name": ""}, "name"),
    ("/v1/sessions", {"name": "n" * 65}, "name"),
    ("/v1/sessions", {"env": {"A=B": "x"}}, "env"),
    ("/v1/sessions", {"env": {f"K{i}": "" for i in range(20_000)}}, "env"),
    ("/v1/sessions", {"metadata": {f"k{i}": "v" for i in range(65)}}, "metadata"),
    ("/v1/sessions", {"metadata": {"k": "v" * (9 * 1024)}}, "metadata.k"),
    ("/v1/sessions", {"metadata": {"k" * 129: "v"}}, "metadata"),
    ("/v1/sessions", {"metadata": {"k": "a\0"}}, "metadata.k"),
    ("/v1/sessions", {"metadata": {"a\nb": "v"}}, "metadata"),
    ("/v1/sessions", {"metadata": {"": "v"}}, "metadata"),
    ("/v1/sessions", {"volumes": [vol("/v")["volumes"][0]] * 17}, "volumes"),
    ("/v1/sessions", {"snapshot_id": "../../etc/passwd"}, "snapshot_id"),
    ("/v1/sessions", {"base_image_id": "i" * 65}, "base_image_id"),
    ("/v1/sessions", {"max_duration_s": 1e300}, "max_duration_s"),
    ("/v1/sessions", vol("/mnt/\0x"), "volumes.0.path"),
    ("/v1/sessions", vol(LONG_PATH), "volumes.0.path"),
    ("/v1/sessions", {"volumes": [{"volume_id": "vol 1", "path": "/x"}]}, "volumes.0.volume_id"),
    ("/v1/sessions/ses_1/volumes", {"volume_id": "vol_1", "path": "/a\0"}, "path"),
    ("/v1/sessions/ses_1/volumes", {"volume_id": "vol_1", "path": LONG_PATH}, "path"),
    ("/v1/snapshots", {"session_id": "ses_1", "name": "s" * 65}, "name"),
    ("/v1/snapshots", {"session_id": "ses\0"}, "session_id"),
    ("/v1/snapshots", {"session_id": "ses_1", "workspace_id": "w" * 65}, "workspace_id"),
    ("/v1/volumes", {"name": "v" * 65, "size_bytes": MiB}, "name"),
    ("/v1/volumes", {"name": "a\x07b", "size_bytes": MiB}, "name"),
    ("/v1/volumes", {"size_bytes": MiB}, "name"),
    # the readiness URL is passed to the guest as an argument and sent as a request line
    ("/v1/templates", {"name": "t", "ready_when": {"http_url": "a\0"}}, "ready_when.http_url"),
    ("/v1/templates", {"name": "t", "ready_when": {"http_url": "http://x/\x1b[2J"}},
     "ready_when.http_url"),
    ("/v1/templates", {"name": "t", "ready_when": {"http_url": "http://x/\r\nHost: y"}},
     "ready_when.http_url"),
    ("/v1/templates", {"name": "t", "ready_when": {"http_url": "http://x/\x7f"}},
     "ready_when.http_url"),
    ("/v1/templates", {"name": "t", "ready_when": {"http_url": "http://x/" + "a" * 2048}},
     "ready_when.http_url"),
    ("/v1/templates", {"name": "t", "spec": {"spec_version": "tenki.template.v1", "runtime": {
        "ready_when": {"http_url": "a\0"}}}}, "spec.runtime.ready_when.http_url"),
    ("/v1/templates", {"name": "t", "tags": ["a\0"]}, "tags.0"),
    ("/v1/templates", {"name": "t", "tags": ["ok", "a\x1bb"]}, "tags.1"),
]


@pytest.mark.parametrize("route, body, field", BAD_INPUTS)
def test_bad_input_is_422_naming_the_field(
    client: TestClient, route: str, body: dict[str, Any], field: str
) -> None:
    err = error_of(client.post(route, json=body), 422, "ValidationError")
    assert err["field"] == field
    assert err["message"].startswith(f"{field}: ")
    # the message never echoes a huge input
    assert len(err["message"]) < 300


def test_good_inputs_pass(client: TestClient) -> None:
    ok = {
        "name": "box\twith tab",
        "env": {f"K{i}": "v" * 8192 for i in range(64)},
        "metadata": {"k" * 128: "v"},
        "volumes": [{"volume_id": "vol_1", "path": "/mnt/data/"}],
        "max_duration_s": 3600,
    }
    assert client.post("/v1/sessions", json=ok).status_code == 201
    exec_ok = {"argv": ["x" * 1024] * 1024, "stdin_data": base64.b64encode(b"x" * MiB).decode()}
    assert client.post("/v1/sessions/ses_1/processes", json=exec_ok).status_code == 201
    resp = client.post("/v1/sessions/ses_1/volumes", json={"volume_id": "vol_1", "path": "/m/"})
    assert resp.json() == {"path": "/m"}
    url = "http://127.0.0.1:8080/health?q=a%00b&x=é"  # an escaped NUL is a URL's business
    resp = client.post("/v1/templates", json={"name": "t", "tags": ["tab\tok"],
                                              "ready_when": {"http_url": url}})
    assert resp.status_code == 201, resp.text
    assert resp.json()["ready_when"]["http_url"] == url


def test_ready_url_refuses_controls_in_the_model() -> None:
    # the SDK builds the same model, so it refuses before sending
    for bad in ("a\x00", "a\x1b", "a\t", "a\n", "a\x85", "\ud800"):
        with pytest.raises(pydantic.ValidationError, match=r"ready_when\.http_url"):
            TemplateCreate(name="t", ready_when={"http_url": bad})  # type: ignore[arg-type]


def test_stdin_data_is_bounded(client: TestClient) -> None:
    big = base64.b64encode(b"\0" * (limits.STDIN_DATA_MAX_BYTES + 3)).decode()
    # the exec route allows a larger body than other JSON routes, but not unbounded stdin_data
    err = error_of(
        client.post("/v1/sessions/ses_1/processes", json={"argv": ["cat"], "stdin_data": big}),
        422,
        "ValidationError",
    )
    assert err["field"] == "stdin_data"


def test_malformed_json_names_the_body(client: TestClient) -> None:
    resp = client.post(
        "/v1/sessions", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    err = error_of(resp, 422, "ValidationError")
    assert err["field"] == "body"
    assert err["message"].startswith("body: invalid JSON: ")


def test_invalid_utf8_body_is_422_same_format(client: TestClient) -> None:
    resp = client.post(
        "/v1/sessions", content=b'{"name": "\xff\xfe"}', headers=JSON
    )
    err = error_of(resp, 422, "ValidationError")
    assert err == {"code": "ValidationError", "message": "body: invalid UTF-8", "field": "body"}


def test_lone_surrogate_is_422(client: TestClient) -> None:
    cases = ((b'{"metadata": {"k": "\\ud800"}}', "metadata.k"), (b'{"name": "a\\udfffb"}', "name"))
    for body, field in cases:
        resp = client.post("/v1/sessions", content=body, headers=JSON)
        err = error_of(resp, 422, "ValidationError")
        assert err["field"] == field


def test_body_that_is_not_an_object(client: TestClient) -> None:
    err = error_of(client.post("/v1/sessions", json=[1, 2]), 422, "ValidationError")
    assert err["field"] == "body"


@pytest.mark.parametrize(
    "url, field, message",
    [
        ("/v1/sessions/ses_1/files?path=/a%00b", "path", "NUL"),
        ("/v1/sessions/ses_1/files?path=/a%FFb", "path", "invalid UTF-8"),
        ("/v1/sessions/ses_1/files?path=" + LONG_PATH, "path", "at most 4096 characters"),
        ("/v1/snapshots?session_id=%C3%28", "session_id", "invalid UTF-8"),
        ("/v1/sessions/ses%00x", "session_id", "NUL"),
        ("/v1/sessions/ses%FFx/files?path=/a", "session_id", "invalid UTF-8"),
        ("/v1/sessions/" + "s" * 5000, "session_id", "at most 4096 characters"),
        ("/v1/ses%FFsions/ses_1", "url", "invalid UTF-8"),
        ("/v1/nothing%00/here", "url", "NUL"),
    ],
)
def test_bad_query_and_path_parameters(
    client: TestClient, url: str, field: str, message: str
) -> None:
    err = error_of(client.get(url), 422, "ValidationError")
    assert err["field"] == field
    assert message in err["message"]


def test_good_parameters_pass(client: TestClient) -> None:
    resp = client.get("/v1/sessions/ses_1/files", params={"path": "/tmp/\u00e9t\u00e9 \ufffd.txt"})
    assert resp.status_code == 200
    assert resp.json() == {"path": "/tmp/\u00e9t\u00e9 \ufffd.txt"}
    assert client.get("/v1/sessions/ses_%C3%A9").json() == {"id": "ses_\u00e9"}


def test_query_validation_names_the_parameter(client: TestClient) -> None:
    err = error_of(client.get("/v1/sessions/ses_1/files"), 422, "ValidationError")
    assert err == {"code": "ValidationError", "message": "path: is required", "field": "path"}


def test_json_body_over_the_limit_is_413(client: TestClient) -> None:
    body = b'{"name": "' + b"x" * (2 * MiB) + b'"}'
    resp = client.post("/v1/sessions", content=body, headers={"content-type": "application/json"})
    err = error_of(resp, 413, "PayloadTooLarge")
    assert "1048576 bytes" in err["message"]


def test_chunked_json_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(32):
            yield b"x" * 65536
        yield b'"}'

    resp = client.post("/v1/sessions", content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    error_of(resp, 413, "PayloadTooLarge")


def test_upload_is_not_limited_by_the_json_limit(client: TestClient) -> None:
    data = b"\0" * (3 * MiB)
    resp = client.put("/v1/sessions/ses_1/files", params={"path": "/big"}, content=data)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"path": "/big", "size_bytes": 3 * MiB}

    def chunks() -> Iterator[bytes]:
        for _ in range(48):
            yield b"y" * 65536

    resp = client.put("/v1/sessions/ses_1/files", params={"path": "/big"}, content=chunks())
    assert resp.json()["size_bytes"] == 3 * MiB
    # declared as JSON, the upload route gets the JSON limit
    resp = client.put(
        "/v1/sessions/ses_1/files",
        params={"path": "/big"},
        content=data,
        headers={"content-type": "application/json"},
    )
    error_of(resp, 413, "PayloadTooLarge")


def test_unknown_route_is_404_same_format(client: TestClient) -> None:
    err = error_of(client.get("/v1/nope"), 404, "NotFound")
    assert "/v1/nope" in err["message"]
    assert isinstance(error_from_body(404, {"error": err}), ERROR_TABLE["NotFound"])


def test_wrong_method_is_405_same_format(client: TestClient) -> None:
    resp = client.delete("/v1/snapshots")
    err = error_of(resp, 405, "MethodNotAllowed")
    assert "DELETE" in err["message"]
    assert "POST" in resp.headers["allow"]
    assert type(error_from_body(405, resp.json())).__name__ == "MethodNotAllowedError"


def test_tenki_error_keeps_its_code(client: TestClient) -> None:
    err = error_of(client.get("/v1/sessions/ses_missing"), 404, "SessionNotFound")
    assert err["message"] == "session ses_missing not found"


def test_unexpected_error_is_500_without_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tenkibox.api"):
        resp = client.get("/v1/boom")
    err = error_of(resp, 500, "Internal")
    assert "RuntimeError" in err["message"]
    assert "Traceback" not in resp.text and "secret" not in resp.text and "shadow" not in resp.text
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)


def test_field_of() -> None:
    assert field_of(("body", "env", "FOO")) == "env.FOO"
    assert field_of(("body", "argv", 3)) == "argv.3"
    assert field_of(("body", "volumes", 0, "path")) == "volumes.0.path"
    assert field_of(("body", "env", "A=B", "[key]")) == "env.A=B"
    assert field_of(("query", "path")) == "path"
    assert field_of(("body",)) == "body"
    assert field_of(()) == "body"


# -- the middleware at the ASGI level: counts while streaming, never buffers ---------------------


def test_body_limit_stops_reading_a_stream_early() -> None:
    pulled: list[int] = []
    sent: list[MutableMapping[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:  # an app that reads the whole body, one message at a time
            msg = await receive()
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        pulled.append(1)
        return {"type": "http.request", "body": b"z" * 1000, "more_body": len(pulled) < 10_000}

    async def send(msg: MutableMapping[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/sessions",
        "headers": [(b"content-type", b"application/json")],
    }
    mw = BodyLimitMiddleware(app, max_json_bytes=10_000)
    asyncio.run(mw(scope, receive, send))
    assert len(pulled) == 11  # stopped as soon as the limit was passed
    assert sent[0]["status"] == 413
    assert b"PayloadTooLarge" in sent[1]["body"]


def test_body_limit_checks_content_length_first() -> None:
    sent: list[MutableMapping[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body is not read")

    async def send(msg: MutableMapping[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/volumes",
        "headers": [(b"content-length", b"99999999")],
    }
    asyncio.run(BodyLimitMiddleware(app)(scope, receive, send))
    assert sent[0]["status"] == 413


# -- CLI escaping ------------------------------------------------------------------------------


def test_escape_text() -> None:
    assert c.escape_text("plain name \u00e9\u6f22") == "plain name \u00e9\u6f22"
    assert c.escape_text("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert c.escape_text("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert c.escape_text("\0\x07\x7f\x9b") == "\\x00\\x07\\x7f\\x9b"
    assert c.escape_text("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert c.escape_text("abc\u202edef") == "abc\\u202edef"


def test_print_table_escapes_user_data(capsys: pytest.CaptureFixture[str]) -> None:
    c.print_table(
        ["ID", "NAME"], [["ses_1", "\x1b[2J\x1b]0;title\x07evil[red]x[/]\nnext"]], "none"
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b]0;title\\x07evil[red]x[/]\\nnext" in out
    assert len(out.splitlines()) == 2


def test_print_fields_escapes_user_data(capsys: pytest.CaptureFixture[str]) -> None:
    c.print_fields([("name", "a\x1b[31mb"), ("metadata", "k=\x9b1m")])
    out = capsys.readouterr().out
    assert out == "name:     a\\x1b[31mb\nmetadata: k=\\x9b1m\n"


def test_cli_get_escapes_and_json_stays_exact(inproc: InProcessServer,
                                             fake_host: FakeHost) -> None:
    """``tenki sandbox get`` (through the SDK, against the real server in-process)."""
    reason = "boot failed: \x1b]0;pwned\x07"
    fake_host.fail_next("boot", InternalError(reason))
    client = Client(endpoint=inproc.url)
    sid = client.create(name="box", metadata={"note": "\x1b[31mred\x1b[0m\nline2"}).id
    with pytest.raises(SessionFailedError):
        client.get(sid).wait_ready(5)
    state = CliState(client_factory=lambda: Client(endpoint=inproc.url))
    result = CliRunner().invoke(cli, ["sandbox", "get", sid], obj=state)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "metadata:      note=\\x1b[31mred\\x1b[0m\\nline2\n" in result.stdout
    assert "boot failed: \\x1b]0;pwned\\x07" in result.stdout
    result = CliRunner().invoke(cli, ["sandbox", "get", sid, "--json"], obj=state)
    record = json.loads(result.stdout)
    assert record["metadata"] == {"note": "\x1b[31mred\x1b[0m\nline2"}
    assert record["state_reason"] == reason

"""The I/O-free core of the SDK: error mapping, NDJSON events, input building, flows."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import httpx
import pytest

from tenkibox import errors, models
from tenkibox.client import _core as core


def _resp(status: int, body: object, method: str = "GET", path: str = "/v1/x") -> httpx.Response:
    request = httpx.Request(method, f"http://fake{path}")
    if isinstance(body, bytes | str):
        return httpx.Response(status, content=body, request=request)
    return httpx.Response(status, json=body, request=request)


# -- error mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize("code, cls", sorted(errors.ERROR_TABLE.items()))
def test_each_error_code_maps_to_its_class(code: str, cls: type[errors.TenkiError]) -> None:
    body = {"error": {"code": code, "message": f"boom {code}", "field": "cpu"}}
    exc = core.error_from_response(_resp(cls.status, body))
    expected = errors.InternalError if cls is errors.CommandError else cls
    assert type(exc) is expected
    assert f"boom {code}" in exc.message
    if expected is not errors.InternalError:
        assert exc.field == "cpu"


def test_error_hierarchy_is_kept() -> None:
    body = {"error": {"code": "SnapshotNotFound", "message": "snapshot snp_x not found"}}
    exc = core.error_from_response(_resp(404, body))
    assert isinstance(exc, errors.SnapshotNotFoundError)
    assert isinstance(exc, errors.NotFoundError)
    assert isinstance(exc, errors.TenkiError)
    assert str(exc) == "snapshot snp_x not found"


def test_unknown_code_is_internal() -> None:
    exc = core.error_from_response(_resp(500, {"error": {"code": "Weird", "message": "m"}}))
    assert type(exc) is errors.InternalError


@pytest.mark.parametrize(
    "status, body, cls",
    [
        (401, {"detail": "nope"}, errors.AuthenticationError),
        (404, {"detail": "Not Found"}, errors.NotFoundError),
        (409, "busy", errors.ConflictError),
        (502, "bad gateway", errors.ConnectionError),
        (500, "Internal Server Error", errors.InternalError),
        (418, b"", errors.InternalError),
    ],
)
def test_non_envelope_errors_fall_back_on_status(status: int, body: object, cls: type) -> None:
    exc = core.error_from_response(_resp(status, body))
    assert type(exc) is cls
    assert "/v1/x" in exc.message


def test_framework_422_names_the_field() -> None:
    body = {"detail": [{"loc": ["body", "cpu"], "msg": "Input should be <= 16", "type": "x"}]}
    exc = core.error_from_response(_resp(422, body))
    assert isinstance(exc, errors.ValidationError)
    assert exc.field == "cpu"
    assert exc.message.startswith("cpu: ")


def test_parse_response_wraps_bad_payloads() -> None:
    call = core.get_session("ses_x")
    with pytest.raises(errors.InternalError, match="unexpected answer"):
        core.parse_response(call, _resp(200, {"id": "ses_x"}))
    with pytest.raises(errors.InternalError):
        core.parse_response(call, _resp(200, b"not json"))


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.ConnectTimeout("slow"),
        httpx.RemoteProtocolError("eof"),
    ],
)
def test_transport_errors_become_connection_errors(exc: httpx.HTTPError) -> None:
    err = core.transport_error(exc, "http://127.0.0.1:1")
    assert isinstance(err, errors.ConnectionError)
    assert "http://127.0.0.1:1" in err.message


# -- NDJSON events ----------------------------------------------------------------------------


def _ev(**kw: object) -> bytes:
    return (json.dumps(kw) + "\n").encode()


def test_event_decoder_handles_split_lines() -> None:
    data = (
        _ev(type="stdout", data=base64.b64encode(b"hello ").decode())
        + b"\n"  # blank lines are ignored
        + _ev(type="stderr", data=base64.b64encode(b"warn").decode())
        + _ev(type="exit", exit_code=3, timed_out=False)
    )
    for size in (1, 2, 7, len(data)):
        dec = core.EventDecoder()
        events: list[models.ProcessEvent] = []
        for i in range(0, len(data), size):
            events += dec.feed(data[i : i + size])
        events += dec.close()
        assert [e.type for e in events] == ["stdout", "stderr", "exit"]
        assert events[2].exit_code == 3


def test_event_decoder_final_line_without_newline() -> None:
    dec = core.EventDecoder()
    assert dec.feed(b'{"type": "exit", "exit_code": 0}') == []
    (ev,) = dec.close()
    assert ev.type == "exit" and ev.exit_code == 0


def test_event_decoder_rejects_garbage() -> None:
    with pytest.raises(errors.InternalError, match="malformed process event"):
        core.parse_events(b"{nope}\n")
    with pytest.raises(errors.InternalError):
        core.parse_events(_ev(type="bogus"))


def test_process_state_folds_events_into_a_result() -> None:
    st = core.ProcessState("prc_1", ("sh", "-c", "x"))
    st.feed(_ev(type="stdout", data=base64.b64encode(b"a").decode()))
    st.feed(_ev(type="stderr", data=base64.b64encode(b"\xff").decode()))
    st.feed(_ev(type="stdout", data=base64.b64encode(b"b").decode()))
    st.feed(_ev(type="exit", exit_code=124, timed_out=True))
    assert st.exited and not st.finished
    assert [st.pop(), st.pop(), st.pop(), st.pop()] == [
        ("stdout", b"a"),
        ("stderr", b"\xff"),
        ("stdout", b"b"),
        None,
    ]
    res = st.collector.result()
    assert res.stdout == "ab" and res.stdout_bytes == b"ab"
    assert res.stderr == "\ufffd"
    assert res.exit_code == 124 and res.timed_out
    with pytest.raises(errors.CommandError, match="timed out") as info:
        res.check()
    assert info.value.result is res


def test_process_state_error_event_raises() -> None:
    st = core.ProcessState("prc_1")
    with pytest.raises(errors.InternalError, match="process lost"):
        st.feed(_ev(type="error", message="process lost: agent gone"))


def test_stream_without_exit_is_a_connection_error() -> None:
    st = core.ProcessState("prc_1")
    st.feed(_ev(type="stdout", data=base64.b64encode(b"a").decode()))
    with pytest.raises(errors.ConnectionError, match="ended before the process exited"):
        st.end()


def test_exec_result_check() -> None:
    ok = core.ExecResult(exit_code=0, stdout_bytes=b"x")
    assert ok.check() is ok
    bad = core.ExecResult(exit_code=2, stderr_bytes=b"first\nno such file\n", argv=("ls", "/x"))
    with pytest.raises(errors.CommandError) as info:
        bad.check()
    assert "ls /x exited with code 2: no such file" == info.value.message
    assert info.value.result is bad


# -- input building ---------------------------------------------------------------------------


def test_session_create_sends_only_what_was_given() -> None:
    body = core.session_create(snapshot_id="snp_1", name="copy")
    call = core.create_session(body)
    assert call.json == {"name": "copy", "snapshot_id": "snp_1"}


def test_session_create_converts_units_and_volumes() -> None:
    body = core.session_create(
        cpu=4,
        max_duration="30m",
        volumes=["vol_a:/data", "vol_b:/cache:ro", models.VolumeMount(volume_id="c", path="/c")],
    )
    assert body.max_duration_s == 1800
    assert [(v.volume_id, v.path, v.read_only) for v in body.volumes] == [
        ("vol_a", "/data", False),
        ("vol_b", "/cache", True),
        ("c", "/c", False),
    ]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"cpu": 99}, "cpu"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"volumes": ["novolume"]}, "volumes"),
        ({"volumes": ["v:relative"]}, "volumes.path"),
        ({"max_duration": "soon"}, "max_duration"),
    ],
)
def test_session_create_validates_locally(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        core.session_create(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.message.startswith(field + ": ")


def test_exec_request_stdin_forms() -> None:
    assert core.exec_request(("ls",)).stdin is False
    with_data = core.exec_request(("cat",), stdin="hé")
    assert with_data.stdin is True
    assert base64.b64decode(with_data.stdin_data or "") == "hé".encode()
    piped = core.exec_request(("cat",), stdin=True)
    assert piped.stdin is True and piped.stdin_data is None
    with pytest.raises(errors.ValidationError):
        core.exec_request(())


def test_expires_at_parsing() -> None:
    assert core.expires_at("2026-03-20T12:00:00Z") == datetime(2026, 3, 20, 12, tzinfo=UTC)
    assert core.expires_at("2026-03-20T12:00:00").tzinfo is not None  # type: ignore[union-attr]
    with pytest.raises(errors.ValidationError):
        core.expires_at("tomorrow")


def test_paths_quote_ids() -> None:
    assert core.get_session("a/../b").path == "/v1/sessions/a%2F..%2Fb"


def test_format_duration() -> None:
    assert core.format_duration(600) == "10m"
    assert core.format_duration(5400) == "1h30m"
    assert core.format_duration(2.5) == "2.5s"
    assert core.format_duration(45) == "45s"


def test_size_bytes() -> None:
    assert core.size_bytes("1GiB") == 1 << 30
    assert core.size_bytes(4096) == 4096
    with pytest.raises(errors.ValidationError):
        core.size_bytes("lots")


# -- flows ------------------------------------------------------------------------------------


def _session(state: str, reason: str | None = None) -> models.Session:
    return models.Session(
        id="ses_1",
        workspace_id="ws_1",
        state=models.SessionState(state),
        state_reason=reason,
        cpu=2,
        memory_mb=4096,
        base_image_id="sandbox",
        created_at=datetime.now(UTC),
    )


def _drive(
    flow: core.Flow[object], answers: list[object]
) -> tuple[list[core.Call[object]], object]:
    calls = [next(flow)]
    try:
        for answer in answers:
            calls.append(flow.send(answer))
    except StopIteration as stop:
        return calls, stop.value
    raise AssertionError("flow did not finish")


def test_create_and_wait_flow_long_polls_until_ready() -> None:
    body = core.session_create(name="x")
    calls, result = _drive(
        core.create_and_wait_flow(body, 100),
        [_session("CREATING"), _session("CREATING"), _session("READY")],
    )
    assert [(c.method, c.path) for c in calls] == [
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions/ses_1/wait"),
        ("GET", "/v1/sessions/ses_1/wait"),
    ]
    assert calls[1].params is not None and 0 < float(calls[1].params["timeout_s"]) <= 30
    assert calls[1].extra_timeout == float(calls[1].params["timeout_s"])
    assert isinstance(result, models.Session) and result.state == models.SessionState.READY


def test_wait_flow_failed_session_raises_with_reason() -> None:
    flow = core.wait_session_flow("ses_1", 10)
    next(flow)
    with pytest.raises(errors.SessionFailedError, match="kernel panic"):
        flow.send(_session("FAILED", "kernel panic"))


def test_wait_flow_timeout_says_still_creating() -> None:
    flow = core.wait_session_flow("ses_1", 0)
    next(flow)
    with pytest.raises(errors.WaitTimeoutError, match="session ses_1 is still CREATING"):
        flow.send(_session("CREATING"))


def _snapshot(state: str, reason: str | None = None) -> models.Snapshot:
    return models.Snapshot(
        id="snp_1",
        session_id="ses_1",
        state=models.SnapshotState(state),
        state_reason=reason,
        base_image_id="sandbox",
        cpu=2,
        memory_mb=4096,
        created_at=datetime.now(UTC),
    )


@pytest.mark.parametrize("state", ["FAILED", "DELETING", "DELETED"])
def test_snapshot_wait_failures(state: str) -> None:
    flow = core.wait_snapshot_flow("snp_1", 10)
    next(flow)
    with pytest.raises(errors.SnapshotFailedError, match=f"snapshot snp_1 is {state}"):
        flow.send(_snapshot(state, "disk full" if state == "FAILED" else None))


def test_snapshot_wait_timeout_message() -> None:
    flow = core.wait_snapshot_flow("snp_1", 0)
    next(flow)
    with pytest.raises(errors.WaitTimeoutError) as info:
        flow.send(_snapshot("CREATING"))
    assert info.value.message == (
        "snapshot snp_1 is still CREATING after 0s; it continues in the background"
    )


def test_create_snapshot_flow_without_wait_is_one_call() -> None:
    body = core.snapshot_create("ses_1", "base", None)
    calls, result = _drive(core.create_snapshot_flow(body, False, None), [_snapshot("CREATING")])
    assert [c.path for c in calls] == ["/v1/snapshots"]
    assert calls[0].json == {"session_id": "ses_1", "name": "base"}
    assert isinstance(result, models.Snapshot)

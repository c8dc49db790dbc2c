"""The rules of Tenki's wire that need no server: the error table, state mapping, session
credentials and the guest workdir."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from tenkibox import errors
from tenkibox.control.workdir import resolve
from tenkibox.models import Session, SessionState
from tenkibox.rpc import convert, proto
from tenkibox.rpc.credentials import LIFETIME_S, Credentials
from tenkibox.rpc.status import TABLE, status_of

ALL_ERRORS = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
              if issubclass(cls, errors.TenkiError) and cls is not errors.TenkiError]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_of_ours_has_a_row(cls: type[errors.TenkiError]) -> None:
    assert any(issubclass(cls, row) for row, _ in TABLE), f"{cls.__name__} has no gRPC code"


@pytest.mark.parametrize(("exc", "code", "words"), [
    (errors.SnapshotNotFoundError("snapshot snp_x not found"), grpc.StatusCode.NOT_FOUND,
     "snapshot"),
    (errors.NotFoundError("session ses_x not found"), grpc.StatusCode.NOT_FOUND, "session"),
    (errors.ConflictError("session ses_x is TERMINATED, not running"),
     grpc.StatusCode.FAILED_PRECONDITION, "terminated"),
    (errors.ValidationError("must be 1..16", field="cpu_cores"),
     grpc.StatusCode.INVALID_ARGUMENT, "cpu_cores: must be"),
    (errors.CapacityUnavailableError("the host's memory is promised"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "capacity"),
    (errors.QuotaExceededError("max_concurrent_sessions is 1"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "max_concurrent"),
    (errors.AuthenticationError("unknown API key"), grpc.StatusCode.UNAUTHENTICATED, "key"),
    (errors.WaitTimeoutError("not ready"), grpc.StatusCode.DEADLINE_EXCEEDED, "ready"),
])
def test_codes_and_words_the_sdks_read(exc: errors.TenkiError, code: grpc.StatusCode,
                                       words: str) -> None:
    got_code, message = status_of(exc)
    assert got_code == code
    assert words in message.lower()


def _session(state: str, reason: str | None = None) -> Session:
    return Session(id="ses_a", workspace_id="ws_a", state=SessionState(state),
                   state_reason=reason, cpu=2, memory_mb=1024, base_image_id="sandbox",
                   created_at=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize("state", [s.value for s in SessionState])
def test_no_session_state_is_sent_as_the_unused_value_2(state: str) -> None:
    wire = convert.session_state(state)
    names = proto.pool().FindEnumTypeByName("tenki.sandbox.v1.SessionState").values_by_number
    assert wire != 2 and wire in names and wire != 0


def test_ready_is_running_and_failed_is_terminated_with_its_error() -> None:
    assert convert.session(_session("READY")).state == 3
    failed = convert.session(_session("FAILED", "restore: RAM image damaged"))
    assert failed.state == 6 and failed.terminal_error == "restore: RAM image damaged"


def test_credentials_name_one_session_and_expire(tmp_path: Path) -> None:
    creds = Credentials.from_file(tmp_path / "dataplane.key")
    assert (tmp_path / "dataplane.key").stat().st_mode & 0o777 == 0o600
    token = creds.encode(creds.issue("ses_a", "ws_a", now=1000.0))
    grant = creds.verify(token, now=1000.0 + LIFETIME_S - 1)
    assert (grant.session_id, grant.workspace_id) == ("ses_a", "ws_a")
    with pytest.raises(errors.AuthenticationError, match="expired"):
        creds.verify(token, now=1000.0 + LIFETIME_S + 1)
    again = Credentials.from_file(tmp_path / "dataplane.key")  # a restarted server
    assert again.verify(token, now=1000.0).session_id == "ses_a"
    other = Credentials.from_file(tmp_path / "other.key")
    with pytest.raises(errors.AuthenticationError, match="not issued"):
        other.verify(token, now=1000.0)
    body, sig = token.rsplit(".", 1)
    forged = body[:-2] + ("AA" if not body.endswith("AA") else "BB") + "." + sig
    with pytest.raises(errors.AuthenticationError):
        creds.verify(forged, now=1000.0)
    with pytest.raises(errors.AuthenticationError, match="no session credential"):
        creds.verify(None)


@pytest.mark.parametrize(("path", "confined", "want"), [
    ("a.txt", True, "/home/tenki/a.txt"),
    ("./dir/../b.txt", True, "/home/tenki/b.txt"),
    ("/home/tenki/x/y", True, "/home/tenki/x/y"),
    ("/home/tenki", True, "/home/tenki"),
    ("/etc/passwd", False, "/etc/passwd"),
    ("../../etc/passwd", False, "/etc/passwd"),
])
def test_paths_resolve_under_the_workdir(path: str, confined: bool, want: str) -> None:
    assert resolve(path, confined=confined) == want


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "/home/tenkix/a", "/", "//etc"])
def test_confined_paths_stay_inside_the_workdir(path: str) -> None:
    with pytest.raises(errors.ValidationError, match="path outside workdir"):
        resolve(path, confined=True)

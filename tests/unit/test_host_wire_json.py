"""Every dataclass of the host wire survives ``to_json`` -> JSON text -> ``from_json``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tenkibox.errors import (
    CapacityUnavailableError,
    HostUnreachableError,
    InternalError,
    ValidationError,
)
from tenkibox.host.api import (
    BootSpec,
    CacheScrub,
    Captured,
    CaptureSpec,
    EgressPolicy,
    ExecSpec,
    ImageDamagedError,
    InUse,
    MachineShape,
    Manifest,
    NetworkSpec,
    ProcessEvent,
    ProcessRef,
    Recovered,
    RestoreSpec,
    SnapshotDamagedError,
    Started,
    Unowned,
    VMGone,
    VolumeMountSpec,
)
from tenkibox.host.capacity import HostCapacity
from tenkibox.host.tmpfs import TmpfsUse
from tenkibox.host.wire import error_body, error_from_wire

SHAPE = MachineShape(2, 1024, "console=ttyS0", "k" * 64, "i" * 64, 4)
MANIFEST = Manifest(SHAPE, ["a" * 64, "b" * 64], "r" * 64, "s" * 64, "sandbox",
                    ["p" * 64, "r" * 64], {"r" * 64: 100, "s" * 64: 5})
NET = NetworkSpec(EgressPolicy(True, ("*.example.com",), ("10.0.0.0/8",)), inbound=True)
VOL = VolumeMountSpec("vol_a", "/data", read_only=True)

EXAMPLES: list[Any] = [
    SHAPE, MANIFEST, VOL, NET, NetworkSpec(), EgressPolicy(outbound=False),
    BootSpec("ses_a", 2, 1024, "sandbox", "host-a", NET),
    RestoreSpec("ses_b", "snp_a", MANIFEST, "host-b", keep_identity=True, network=NET),
    Started(SHAPE, ["a" * 64], "r" * 64, {"restore": 1.5}, ["p" * 64, "r" * 64]),
    Started(SHAPE, ["a" * 64], None),
    CaptureSpec("ses_a", "snp_a", "sandbox", [VOL], leave_paused=True),
    Captured(MANIFEST, 300, 120, 0.25, {"pause": 0.25}, ["vol_b"]),
    ExecSpec(["sh", "-c", "echo é"], {"A": "1"}, "/root", 2.5, True, 1000),
    ExecSpec(["true"], {}),
    ProcessRef("prc_a", 42), ProcessRef("prc_b", None),
    ProcessEvent("stdout", b"\x00\xffbytes"), ProcessEvent("stderr", b"err"),
    ProcessEvent("exit", exit_code=3, timed_out=True),
    ProcessEvent("error", message="lost", delivered_bytes=10, lost_bytes=5),
    ProcessEvent("error", exit_code=1, timed_out=False, message="lost", delivered_bytes=1,
                 lost_bytes=2),
    VMGone("ses_a", "qemu died"),
    InUse("d" * 64, "disk", image_id="sandbox"), InUse("e" * 64, "RAM image", session_id="s"),
    CacheScrub({"f" * 64: "damaged"}, ["g" * 64]),
    Recovered(["ses_a"], {"ses_b": "gone"}, 2),
    Unowned("artifact", "h" * 64), Unowned("temporary", "artifacts/tmp/x"),
    Unowned("vm", "ses_c"),
    HostCapacity("h1", 8192, 1024, 2.0, 4, "kvm"),
    TmpfsUse(1, 3, 2),
]


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_round_trip(obj: Any) -> None:
    text = json.dumps(obj.to_json())
    assert type(obj).from_json(json.loads(text)) == obj


@pytest.mark.parametrize("bad", [
    lambda: ProcessEvent.from_json({"type": "nonsense"}),
    lambda: Unowned.from_json({"kind": "nonsense", "name": "x"}),
    lambda: BootSpec.from_json({"session_id": "s"}),
    lambda: ExecSpec.from_json({"argv": ["x"], "timeout_s": "soon"}),
])
def test_malformed_input_raises_a_plain_error_the_service_turns_into_422(bad: Any) -> None:
    with pytest.raises((KeyError, ValueError, TypeError)):
        bad()


@pytest.mark.parametrize("exc", [
    SnapshotDamagedError("snapshot snp_a: RAM image is missing"),
    ImageDamagedError("image sandbox: disk damaged"),
    ValidationError("bad", field="argv"),
    CapacityUnavailableError("full"),
    HostUnreachableError("host h1 did not answer"),
    InternalError("boom"),
])
def test_errors_travel_as_their_own_class(exc: Any) -> None:
    back = error_from_wire(exc.status, json.loads(json.dumps(error_body(exc))))
    assert type(back) is type(exc)
    assert (back.message, back.field) == (exc.message, exc.field)


def test_damaged_errors_keep_their_public_code() -> None:
    body = error_body(SnapshotDamagedError("x"))
    assert body["error"]["code"] == "SnapshotFailed" and body["error"]["type"] == "SnapshotDamaged"


def test_an_answer_that_is_not_ours_is_internal() -> None:
    assert type(error_from_wire(502, "<html>bad gateway</html>")) is InternalError

"""host/written.py's decisions that need no VM (the capture itself: tests/integration/
test_live_capture.py, and kill -9 at its steps: tests/faults/test_fault_kill9.py)."""

from __future__ import annotations

import struct
from pathlib import Path

from tenkibox.engine import stream as S
from tenkibox.host import written


def _devices(*sections: tuple[bytes, bytes]) -> bytes:
    out = struct.pack(">II", S.MAGIC, S.VERSION)
    for sid, (idstr, body) in enumerate(sections, 1):
        out += (bytes([S.SECTION_FULL]) + struct.pack(">I", sid) + bytes([len(idstr)]) + idstr
                + struct.pack(">II", 0, 1) + body + bytes([S.SECTION_FOOTER])
                + struct.pack(">I", sid))
    return out + bytes([S.VM_EOF])


def test_a_device_that_moved_between_two_saves_is_named(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(_devices((b"timer", b"t"), (b"0000:00:03.0/virtio-serial", b"idx=1")))
    b.write_bytes(a.read_bytes())
    assert written._moved(a, b) == []
    b.write_bytes(_devices((b"timer", b"t"), (b"0000:00:03.0/virtio-serial", b"idx=2")))
    assert written._moved(a, b) == ["0000:00:03.0/virtio-serial/0"]
    # the RTC's time fields follow the host's clock: not a move
    a.write_bytes(_devices((b"mc146818rtc", b"12:00:01"), (b"timer", b"t")))
    b.write_bytes(_devices((b"mc146818rtc", b"12:00:02"), (b"timer", b"t")))
    assert written._moved(a, b) == []
    b.write_bytes(_devices((b"timer", b"t")))
    assert written._moved(a, b) == ["the list of devices"]
    b.write_bytes(b"junk")
    assert written._moved(a, b)[0].startswith("unreadable")


def test_the_limit_for_a_running_guest_is_mib_and_a_bad_value_is_the_default() -> None:
    assert written._max_bytes(None) == 512 << 20
    assert written._max_bytes("128") == 128 << 20
    assert written._max_bytes("0") == 0  # a running guest is always saved live
    assert written._max_bytes("lots") == 512 << 20
    assert written._max_bytes("-5") == 0


def test_a_large_guest_may_have_written_a_quarter_of_its_ram() -> None:
    assert written.limit(128 << 20) == written.DIRECT_MAX_BYTES
    assert written.limit(16 << 30) == 4 << 30


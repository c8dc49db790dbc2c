"""engine/stream.py: a full migration stream split into RAM image + device state.

The streams are built here record by record in QEMU 7.2's format; the real ones are proved by
the snapshot integration tests (every capture goes through the splitter and is restored).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from tenkibox.engine import stream as S

P = S.PAGE
BLOCKS = [(b"mem0", 64 * P), (b"pc.bios", 4 * P)]


def _name(n: bytes) -> bytes:
    return bytes([len(n)]) + n


def _config(subsections: bytes = b"") -> bytes:
    machine = b"pc-q35-7.2"
    return (struct.pack(">II", S.MAGIC, S.VERSION) + bytes([S.CONFIGURATION])
            + struct.pack(">I", len(machine)) + machine + subsections)


def _start(with_addr: bool = False) -> bytes:
    out = bytes([S.SECTION_START]) + struct.pack(">I", 2) + _name(b"ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", sum(size for _, size in BLOCKS) | S.FLAG_MEM_SIZE)
    for name, size in BLOCKS:
        out += _name(name) + struct.pack(">Q", size) + (struct.pack(">Q", 0) if with_addr else b"")
    return out + struct.pack(">Q", S.FLAG_EOS) + bytes([S.SECTION_FOOTER]) + struct.pack(">I", 2)


def _page(offset: int, block: bytes | None, data: bytes | None) -> bytes:
    flags = S.FLAG_ZERO if data is None else S.FLAG_PAGE
    if block is None:
        flags |= S.FLAG_CONTINUE
    head = struct.pack(">Q", offset | flags) + (b"" if block is None else _name(block))
    return head + (b"\0" if data is None else data)


def _section(kind: int, *records: bytes) -> bytes:
    return (bytes([kind]) + struct.pack(">I", 2) + b"".join(records)
            + struct.pack(">Q", S.FLAG_EOS) + bytes([S.SECTION_FOOTER]) + struct.pack(">I", 2))


DEVICES = bytes([S.SECTION_FULL]) + b"device sections, copied as they are" + b"\0"


def _split(tmp_path: Path, data: bytes) -> tuple[S.Split, bytes, bytes]:
    src = tmp_path / "stream"
    src.write_bytes(data)
    done = S.split(src, tmp_path / "ram", tmp_path / "state")
    return done, (tmp_path / "ram").read_bytes(), (tmp_path / "state").read_bytes()


def test_pages_of_guest_ram_go_to_a_sparse_image_the_rest_stays(tmp_path: Path) -> None:
    a, b, c, bios = b"a" * P, b"b" * P, b"c" * P, b"r" * P
    stream = (_config() + _start()
              + _section(S.SECTION_PART,
                         _page(0, b"mem0", a), _page(P, None, None), _page(2 * P, None, b),
                         _page(0, b"pc.bios", bios), _page(P, None, None),
                         _page(5 * P, b"mem0", c))
              # pre-copy sends a page again: the later copy wins; data then zero: zero
              + _section(S.SECTION_END, _page(2 * P, b"mem0", c), _page(0, None, None),
                         _page(3 * P, b"pc.bios", bios))
              + DEVICES)
    done, ram, state = _split(tmp_path, stream)
    assert len(ram) == 64 * P
    assert ram[:P] == bytes(P)
    assert ram[2 * P:3 * P] == c and ram[5 * P:6 * P] == c
    assert ram.count(0) == len(ram) - 2 * P
    assert done.blocks == {"mem0": 64 * P, "pc.bios": 4 * P}
    assert (tmp_path / "ram").stat().st_blocks * 512 < 32 * P  # sparse
    # the device state: the capability the restore side checks, block addresses, the other
    # block's pages (each naming its block where the record before it is gone), the devices
    assert state.startswith(_config(bytes([S.SUBSECTION]) + _name(S.CAPABILITIES)
                                    + struct.pack(">II", 1, 1) + _name(S.IGNORE_SHARED)))
    assert _start(with_addr=True) in state
    assert _section(S.SECTION_PART, _page(0, b"pc.bios", bios), _page(P, None, None)) in state
    assert _section(S.SECTION_END, _page(3 * P, b"pc.bios", bios)) in state
    assert state.endswith(DEVICES)
    assert b"a" * P not in state and b"c" * P not in state


@pytest.mark.parametrize("bad, why", [
    (b"XXXX" + bytes(4), "not a QEMU migration stream"),
    (_config() + _start()[:20], "ends early"),
    (_config() + _start() + _section(S.SECTION_PART,
                                     struct.pack(">Q", 0 | 0x40) + _name(b"mem0")),
     "not supported"),  # XBZRLE
    (_config() + _start() + _section(S.SECTION_PART, _page(64 * P, b"mem0", b"x" * P)),
     "beyond the end"),
    (_config() + _start() + _section(S.SECTION_PART, _page(0, None, None)),
     "never named"),
    (_config() + DEVICES, "device state before the RAM"),
    (_config(bytes([S.SUBSECTION]) + _name(S.CAPABILITIES) + struct.pack(">II", 1, 1)
             + _name(S.IGNORE_SHARED)) + _start(), "saved with capabilities"),
])
def test_a_stream_it_does_not_know_is_refused(tmp_path: Path, bad: bytes, why: str) -> None:
    with pytest.raises(S.StreamError, match=why):
        _split(tmp_path, bad)


def test_runs_of_zero_pages_end_where_the_records_stop_being_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first pass is mostly zero-page records of consecutive pages, taken a window of 4096
    at a time: a run crossing a window's end, broken by a page with data, by a page of another
    block, by a jump back, and zeroing pages that a pass before sent with data."""
    pages = 2 * S.RUN_WINDOW + 10
    monkeypatch.setattr(sys.modules[__name__], "BLOCKS",
                        [(b"mem0", pages * P), (b"pc.bios", 4 * P)])
    x, y, bios = b"x" * P, b"y" * P, b"r" * P
    data = {5: x, S.RUN_WINDOW + 4: x, 2 * S.RUN_WINDOW: y}
    first = [_page(0, b"mem0", x)]
    first += [_page(i * P, None, data.get(i)) for i in range(1, 300)]
    first += [_page(0, b"pc.bios", bios), _page(300 * P, b"mem0", None)]
    first += [_page(i * P, None, data.get(i)) for i in range(301, pages - 3)]
    first += [_page((pages - 1) * P, None, None), _page((pages - 3) * P, None, y),
              _page((pages - 2) * P, None, None)]
    # zero now: pages 0, 5 and RUN_WINDOW + 4 had data
    second = [_page(0, b"mem0", None)] + [_page(i * P, None, None)
                                          for i in range(1, S.RUN_WINDOW + 100)]
    stream = (_config() + _start() + _section(S.SECTION_PART, *first)
              + _section(S.SECTION_END, *second) + DEVICES)
    done, ram, state = _split(tmp_path, stream)
    want = bytearray(pages * P)
    want[2 * S.RUN_WINDOW * P:(2 * S.RUN_WINDOW + 1) * P] = y
    want[(pages - 3) * P:(pages - 2) * P] = y
    assert ram == want
    assert done.data_pages == 5
    assert _page(0, b"pc.bios", bios) in state and x not in state


def test_a_run_of_zero_pages_past_the_block_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "BLOCKS", [(b"mem0", 64 * P)])
    stream = (_config() + _start() + _section(S.SECTION_PART, _page(60 * P, b"mem0", None),
                                              *[_page(i * P, None, None) for i in range(61, 70)]))
    with pytest.raises(S.StreamError, match="beyond the end"):
        _split(tmp_path, stream)


def test_a_run_is_taken_in_one_step_to_its_window_end(tmp_path: Path) -> None:
    """The bulk match itself (the tests above hold with or without it): records of pages
    4090-4099 are two runs, split where the window of 4096 pages ends."""
    w = S.RUN_WINDOW
    records = b"".join(_page(i * P, None, None) for i in range(w - 6, w + 4))
    with open(tmp_path / "state", "wb") as state, open(tmp_path / "ram", "wb") as ram:
        splitter = S._Splitter(S._Reader(records), state, ram, b"mem0")  # type: ignore[arg-type]
        assert splitter._zero_run(0, w - 6, 2 * w) == 6
        assert splitter._zero_run(6 * 9, w, 2 * w) == 4
        assert splitter._zero_run(6 * 9, w, w + 2) == 2  # the block ends
        assert splitter._zero_run(0, w - 5, 2 * w) == 0  # not the pages these records name


def _devices(*sections: tuple[int, bytes, bytes]) -> bytes:
    """A file as ``xen-save-devices-state`` writes it: header, FULL sections, end marker."""
    out = struct.pack(">II", S.MAGIC, S.VERSION)
    for sid, idstr, body in sections:
        out += (bytes([S.SECTION_FULL]) + struct.pack(">I", sid) + _name(idstr)
                + struct.pack(">II", 0, 1) + body + bytes([S.SECTION_FOOTER])
                + struct.pack(">I", sid))
    return out + bytes([S.VM_EOF])


def test_a_device_state_takes_the_roms_of_one_and_the_devices_of_another(
        tmp_path: Path) -> None:
    """``with_devices``: the configuration and RAM sections (firmware pages, no guest RAM) of a
    device state ``split`` wrote, then the device sections QEMU saved now."""
    bios = b"r" * P
    stream = (_config() + _start() + _section(S.SECTION_PART, _page(0, b"mem0", b"a" * P),
                                              _page(0, b"pc.bios", bios)) + DEVICES)
    _split(tmp_path, stream)
    old_state = (tmp_path / "state").read_bytes()
    prefix = old_state[:old_state.index(DEVICES)]
    # a body holding its own footer's bytes: the section ends where a section follows
    tricky = b"\x7e" + struct.pack(">I", 3) + b"more"
    devices = tmp_path / "devices"
    devices.write_bytes(_devices((3, b"timer", tricky), (4, b"0000:00:02.0/virtio-serial", b"q")))
    out = tmp_path / "out"
    S.with_devices(tmp_path / "state", devices, out)
    got = out.read_bytes()
    assert got.startswith(prefix + devices.read_bytes()[8:])
    assert got[len(prefix) + len(devices.read_bytes()) - 8] == S.VMDESCRIPTION
    assert S.device_sections(devices.read_bytes()) == [
        (b"timer", 0, tricky), (b"0000:00:02.0/virtio-serial", 0, b"q")]
    # the result is a device state of the same kind: its prefix serves again
    S.with_devices(out, devices, tmp_path / "out2")
    assert (tmp_path / "out2").read_bytes() == got


def test_a_device_state_with_guest_ram_or_without_devices_is_refused(tmp_path: Path) -> None:
    devices = tmp_path / "devices"
    devices.write_bytes(_devices((1, b"timer", b"x")))
    full = tmp_path / "full"  # a full stream (guest RAM in it), not a device state
    full.write_bytes(_config() + _start() + _section(S.SECTION_PART, _page(0, b"mem0", b"a" * P))
                     + DEVICES)
    with pytest.raises(S.StreamError, match="guest RAM"):
        S.with_devices(full, devices, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.write_bytes(struct.pack(">II", S.MAGIC, S.VERSION) + b"\x00")
    with pytest.raises(S.StreamError, match="not a device state"):
        S.with_devices(full, bad, tmp_path / "out")
    with pytest.raises(S.StreamError, match="no end"):
        S.device_sections(devices.read_bytes()[:-6])


def test_qemu10_switchover_start_command_is_copied_any_other_refused(tmp_path: Path) -> None:
    """QEMU 10 with a machine type 10.0 or later sends ``MIG_CMD_SWITCHOVER_START`` (a
    ``QEMU_VM_COMMAND`` with no data) before the last pass: kept in the device state, where a
    QEMU 10 destination expects it; any other command is refused."""
    a = b"a" * P
    cmd = bytes([S.COMMAND]) + struct.pack(">HH", S.CMD_SWITCHOVER_START, 0)
    stream = (_config() + _start() + _section(S.SECTION_PART, _page(0, b"mem0", a)) + cmd
              + _section(S.SECTION_END, _page(P, b"mem0", a)) + DEVICES)
    _, ram, state = _split(tmp_path, stream)
    assert ram[:2 * P] == a + a
    assert cmd + _section(S.SECTION_END) in state and state.endswith(DEVICES)
    bad = bytes([S.COMMAND]) + struct.pack(">HH", 2, 4) + b"ping"  # MIG_CMD_PING
    with pytest.raises(S.StreamError, match="unexpected command"):
        _split(tmp_path, _config() + _start() + bad + DEVICES)

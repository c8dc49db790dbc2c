"""engine/stream.py: a full migration stream split into RAM image + device state.

The streams are built here record by record in QEMU 7.2's format; the real ones are proved by
the snapshot integration tests (every capture goes through the splitter and is restored).
"""

from __future__ import annotations

import struct
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

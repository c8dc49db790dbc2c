"""The RAM image format: sparse in, sparse out, zero chunks skipped, corruption detected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tenkibox.artifacts import ramfile


def _sparse(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            os.pwrite(f.fileno(), data, off)


def test_roundtrip_keeps_data_and_holes(tmp_path: Path) -> None:
    size = 64 << 20
    pieces = {0: b"head" * 1000, 5 << 20: os.urandom(3 << 20), size - 4096: b"\xff" * 4096,
              20 << 20: bytes(2 << 20)}  # written zeros: allocated but worthless
    src, packed, out = tmp_path / "ram", tmp_path / "ram.zst", tmp_path / "back"
    _sparse(src, size, pieces)
    raw, stored, digest = ramfile.pack(src, packed)
    assert len(digest) == 64
    assert raw < 6 << 20  # the zero chunk and the holes are not stored
    assert stored < raw + 4096
    ramfile.unpack(packed, out)
    assert out.stat().st_size == size
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 < 8 << 20  # still sparse


def test_truncated_image_is_rejected(tmp_path: Path) -> None:
    src, packed = tmp_path / "ram", tmp_path / "ram.zst"
    _sparse(src, 8 << 20, {0: os.urandom(1 << 20)})
    ramfile.pack(src, packed)
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    with pytest.raises(ramfile.RamFormatError):
        ramfile.unpack(packed, tmp_path / "out")


def test_wrong_magic_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a ram image at all")
    with pytest.raises(ramfile.RamFormatError):
        ramfile.unpack(bad, tmp_path / "out")


@pytest.mark.parametrize("field", [0, 1, 2], ids=["offset", "length", "compressed-length"])
def test_a_damaged_frame_header_is_refused_before_it_sizes_a_buffer(tmp_path: Path,
                                                                    field: int) -> None:
    """A flipped high byte in a frame header once asked zstd for an exabyte (MemoryError)."""
    src, packed = tmp_path / "ram", tmp_path / "ram.zst"
    _sparse(src, 8 << 20, {1 << 20: os.urandom(4096)})
    ramfile.pack(src, packed)
    data = bytearray(packed.read_bytes())
    head = len(ramfile.MAGIC) + ramfile.SIZE.size
    data[head + 8 * field + 6] ^= 0x40
    packed.write_bytes(bytes(data))
    with pytest.raises(ramfile.RamFormatError):
        list(ramfile.frames(packed))
    with pytest.raises(ramfile.RamFormatError):
        ramfile.unpack(packed, tmp_path / "out")

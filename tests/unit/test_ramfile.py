"""The RAM image format: sparse in, sparse out, zero chunks skipped, corruption detected."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zstandard

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


# -- frames zstd cannot shrink ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 4096, 128 << 10, (128 << 10) + 1, 1 << 20])
def test_a_stored_frame_is_a_zstd_frame_of_its_bytes(n: int) -> None:
    data = os.urandom(n)
    frame = ramfile.stored_frame(data)
    dec = zstandard.ZstdDecompressor()
    assert dec.decompress(frame) == data  # its header says how long the content is
    assert dec.decompress(frame, max_output_size=n) == data
    # a header of 9 bytes and one of 3 per block of at most 128 KiB: within a frame's bound
    assert len(frame) == n + 9 + 3 * -(-n // (128 << 10))
    assert len(frame) <= n + n // 64 + 1024


def test_random_data_is_stored_and_compressible_data_compressed() -> None:
    comp, dec = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()
    rnd = os.urandom(1 << 20)
    text = (b"tenki page " * 100_000)[:1 << 20]
    stored = ramfile.compress_frame(comp, rnd)
    assert stored == ramfile.stored_frame(rnd)
    packed = ramfile.compress_frame(comp, text)
    assert len(packed) < len(text) // 10 and dec.decompress(packed) == text
    # compressible parts where the samples fall (its start, middle or end): compressed
    for mixed in (rnd[:700 << 10] + text[:324 << 10], text[:100 << 10] + rnd[:924 << 10]):
        out = ramfile.compress_frame(comp, memoryview(mixed))
        assert len(out) < len(mixed) and dec.decompress(out) == mixed
    # too small to sample: zstd decides, as for any frame
    assert ramfile.compress_frame(comp, rnd[:8192]) == comp.compress(rnd[:8192])


def test_an_incompressible_ram_image_round_trips(tmp_path: Path) -> None:
    """Stored frames in both versions' packers: the same RAM back, a few bytes per frame more
    than the data."""
    size = 8 << 20
    src = tmp_path / "ram"
    _sparse(src, size, {0: os.urandom(3 << 20), 5 << 20: b"x" * (1 << 20)})
    for pack in (ramfile.pack, ramfile.pack_delta):
        img = tmp_path / f"{pack.__name__}.img"
        pack(src, img)
        ramfile.unpack(img, tmp_path / "back")
        assert (tmp_path / "back").read_bytes() == src.read_bytes()
        assert (3 << 20) < img.stat().st_size < (3 << 20) + (64 << 10)


def test_a_failed_pack_leaves_no_hashing_thread(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "ram"
    _sparse(src, 4 << 20, {0: os.urandom(2 << 20)})

    def broken(*_a: object) -> bytes:
        raise OSError("the disk went away")

    monkeypatch.setattr(ramfile, "compress_frame", broken)
    with pytest.raises(OSError, match="went away"):
        ramfile.pack_delta(src, tmp_path / "img")
    assert not [t for t in threading.enumerate() if t.name == "ram-pack-sha256"]

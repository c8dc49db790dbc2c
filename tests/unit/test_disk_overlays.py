"""Overlays over a frozen layer (``engine/disks.py``): real qemu-img, and its bytes reused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tenkibox.engine import disks
from tenkibox.errors import InternalError


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disks, "_overlays", disks._Overlays())


def _info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _qemu_img_overlay(path: Path, backing: Path) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(backing), "-u", str(path), str(disks.virtual_size(backing))], check=True)
    return path.read_bytes()


def test_the_second_overlay_over_a_layer_is_qemu_imgs_bytes_without_qemu_img(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = disks.create_blank(tmp_path / "base.qcow2", 1 << 30)
    first = disks.create_overlay(tmp_path / "a" / "top.qcow2", base, reuse=True)

    def no_qemu_img(argv: list[str], what: str) -> str:
        raise AssertionError(f"qemu-img ran: {argv}")

    monkeypatch.setattr(disks, "run", no_qemu_img)
    second = disks.create_overlay(tmp_path / "b" / "top.qcow2", base, reuse=True)
    monkeypatch.undo()
    expected = _qemu_img_overlay(tmp_path / "c.qcow2", base)
    assert first.read_bytes() == expected and second.read_bytes() == expected
    info = _info(second)
    assert info["backing-filename"] == str(base) and info["virtual-size"] == 1 << 30
    subprocess.run(["qemu-img", "check", "-q", str(second)], check=True)


def test_another_layer_or_size_gets_its_own_overlay(tmp_path: Path) -> None:
    small = disks.create_blank(tmp_path / "small.qcow2", 1 << 30)
    large = disks.create_blank(tmp_path / "large.qcow2", 4 << 30)
    disks.create_overlay(tmp_path / "o1.qcow2", small, reuse=True)
    over_large = disks.create_overlay(tmp_path / "o2.qcow2", large, reuse=True)
    assert _info(over_large)["backing-filename"] == str(large)
    assert _info(over_large)["virtual-size"] == 4 << 30


def test_the_remembered_overlays_are_bounded(tmp_path: Path) -> None:
    cache = disks._Overlays()
    for i in range(cache.LIMIT + 5):
        cache.put((f"/layer{i}", 1), b"QFI\xfb")
    assert cache.get(("/layer0", 1)) is None
    assert cache.get((f"/layer{cache.LIMIT + 4}", 1)) == b"QFI\xfb"
    cache.put(("/huge", 1), bytes(cache.MAX_BYTES + 1))
    assert cache.get(("/huge", 1)) is None


def test_an_overlay_that_cannot_be_written_is_an_internal_error(tmp_path: Path) -> None:
    base = disks.create_blank(tmp_path / "base.qcow2", 1 << 30)
    disks.create_overlay(tmp_path / "first.qcow2", base, reuse=True)
    (tmp_path / "dir.qcow2").mkdir()
    with pytest.raises(InternalError, match="disk overlay"):
        disks.create_overlay(tmp_path / "dir.qcow2", base, reuse=True)


def test_an_overlay_made_once_is_not_kept(tmp_path: Path) -> None:
    # a capture's overlay over its VM's own top: no other overlay goes over that file
    top = disks.create_blank(tmp_path / "top.qcow2", 1 << 30)
    disks.create_overlay(tmp_path / "next.qcow2", top)
    assert disks._overlays.get((str(top), 1 << 30)) is None
    disks.create_overlay(tmp_path / "again.qcow2", top, reuse=True)
    assert disks._overlays.get((str(top), 1 << 30)) is not None

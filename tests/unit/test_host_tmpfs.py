"""The run root's tmpfs: its use as reported, and whether a capture's staging fits without
taking the room the running guests' RAM files may still need (``host.tmpfs``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenkibox.host import tmpfs
from tenkibox.host.tmpfs import TmpfsUse, staging_room_bytes, staging_space_ok, tmpfs_use

MiB = 1 << 20


@pytest.fixture
def run_root() -> Iterator[Path]:
    """A run root on the real tmpfs (sparse files and statvfs as the host sees them)."""
    with tempfile.TemporaryDirectory(prefix="tenki-test-", dir="/dev/shm") as d:
        yield Path(d)


def _ram(run_root: Path, session_id: str, size: int, touched: int) -> None:
    """A booted guest's RAM file: ``size`` bytes, of which the guest has touched ``touched``."""
    d = run_root / session_id
    d.mkdir()
    with open(d / tmpfs.RAM_FILE, "wb") as f:
        f.truncate(size)
        f.write(b"\1" * touched)


def test_use_is_the_file_systems(run_root: Path) -> None:
    use = tmpfs_use(run_root)
    st = os.statvfs(run_root)
    assert use.total_bytes == st.f_blocks * st.f_frsize > 0
    assert 0 <= use.free_bytes <= use.total_bytes - use.used_bytes
    assert tmpfs_use(run_root / "not-yet" / "made").total_bytes == use.total_bytes


def test_guest_ram_still_to_fill_is_kept(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _ram(run_root, "ses_a", 64 * MiB, 4 * MiB)  # may still take 60 MiB
    _ram(run_root, "ses_b", 32 * MiB, 32 * MiB)  # full: takes no more
    (run_root / "ses_b" / "qemu.log").write_bytes(b"x" * MiB)  # other files take nothing more
    assert tmpfs.ram_growth_bytes(run_root) == 60 * MiB
    free = 1024 * MiB
    monkeypatch.setattr(tmpfs, "tmpfs_use", lambda root: TmpfsUse(0, 2 * free, free))
    room = free - 60 * MiB - tmpfs.STAGING_MARGIN_BYTES
    assert staging_room_bytes(run_root) == room
    assert staging_space_ok(run_root, room)
    assert not staging_space_ok(run_root, room + 1)
    # nearly full: no room at all, never a negative one
    monkeypatch.setattr(tmpfs, "tmpfs_use", lambda root: TmpfsUse(0, free, 10 * MiB))
    assert staging_room_bytes(run_root) == 0
    assert not staging_space_ok(run_root, 1)
    assert staging_space_ok(run_root, 0)


def test_a_run_root_not_made_yet_has_its_file_systems_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tenki-x"
    assert tmpfs.ram_growth_bytes(root) == 0
    monkeypatch.setattr(tmpfs, "tmpfs_use", lambda r: TmpfsUse(0, 512 * MiB, 256 * MiB))
    assert staging_room_bytes(root) == 256 * MiB - tmpfs.STAGING_MARGIN_BYTES

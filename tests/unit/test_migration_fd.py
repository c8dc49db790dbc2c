"""``migration.file_uri``: a migration's file is opened here and handed to QEMU (``fd:``),
instead of QEMU forking a shell and ``cat``; the descriptor is this process's to close."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest
from support.helpers import fd_open

from tenkibox.engine import migration
from tenkibox.engine.machine import MachineError


class FdMachine:
    """Records what each ``send_fd`` gave: the name, and what the descriptor was then."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, int, int, str]] = []  # name, fd, access mode, file content
        self.fail = fail

    async def send_fd(self, name: str, fd: int) -> None:
        if self.fail:
            raise MachineError("QMP getfd failed: boom")
        mode = os.O_ACCMODE & _flags(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        content = os.read(fd, 100).decode() if mode != os.O_WRONLY else ""
        self.sent.append((name, fd, mode, content))


def _flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _hand_over(path: Path, *, write: bool) -> tuple[str, int, str]:
    """``file_uri`` of ``path``: (the name sent, the access mode, the content QEMU would
    read); the URI names it, and the descriptor is closed here once handed over."""
    m = FdMachine()
    uri = asyncio.run(migration.file_uri(m, path, write=write))  # type: ignore[arg-type]
    (name, fd, mode, content), = m.sent
    assert uri == f"fd:{name}"
    assert not fd_open(fd), "the descriptor handed over must be closed here afterwards"
    return name, mode, content


def test_a_load_reads_the_file_through_a_descriptor(tmp_path: Path) -> None:
    state = tmp_path / "state.bin"
    state.write_text("QEVM...")
    name, mode, content = _hand_over(state, write=False)
    assert name == migration.IN_FD and mode == os.O_RDONLY and content == "QEVM..."


def test_a_save_writes_a_new_file_through_a_descriptor(tmp_path: Path) -> None:
    target = tmp_path / "stream"
    target.write_text("an older stream, longer than the new one")
    name, mode, _ = _hand_over(target, write=True)
    assert name == migration.OUT_FD and mode == os.O_WRONLY
    assert target.read_bytes() == b"", "the file is truncated: no tail of an older stream"


def test_a_missing_file_is_a_machine_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MachineError, match=r"state\.bin"):
        asyncio.run(migration.file_uri(FdMachine(), tmp_path / "state.bin",  # type: ignore[arg-type]
                                       write=False))


def test_a_refused_descriptor_is_closed_all_the_same(tmp_path: Path) -> None:
    state = tmp_path / "state.bin"
    state.write_text("x")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(MachineError, match="getfd"):
        asyncio.run(migration.file_uri(FdMachine(fail=True), state,  # type: ignore[arg-type]
                                       write=False))
    assert set(os.listdir("/proc/self/fd")) <= before

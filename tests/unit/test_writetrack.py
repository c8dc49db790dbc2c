"""engine/writetrack.py with the real library and the real kernel: a child process maps a file
privately, as a restored VM's QEMU maps its RAM cache, with the library preloaded; this process
asks which pages it wrote. No QEMU: the kernel's answer is the thing under test.

Where the kernel cannot track (before Linux 6.7) or this process cannot read swap types, the
library is refused, and the test says so: a machine like that runs restored VMs untracked
(their written pages are copied inside the stop), which the integration tests cover.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenkibox.engine import pagemap, writetrack

P = pagemap.PAGE
PAGES = 1024  # 4 MiB: more than one page table's worth is not needed, two are covered

CHILD = textwrap.dedent("""
    import mmap, sys
    size = int(sys.argv[2])
    how = mmap.MAP_SHARED if sys.argv[3:] == ["shared"] else mmap.MAP_PRIVATE
    with open(sys.argv[1], "r+b") as f:
        m = mmap.mmap(f.fileno(), size, how, mmap.PROT_READ | mmap.PROT_WRITE)
    print(mmap.PAGESIZE, flush=True)
    for line in sys.stdin:  # "w N" writes page N, "r N" reads it
        op, page = line.split()
        at = int(page) * mmap.PAGESIZE
        if op == "w":
            m[at] = (m[at] + 1) % 256
        else:
            m[at]
        print("ok", flush=True)
""")


def _shared_at(pid: int, path: Path) -> int:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith(str(path)) and " rw-s " in line:
            return int(line.split("-", 1)[0], 16)
    raise AssertionError(f"{pid} does not map {path} shared")


class Child:
    def __init__(self, lib: Path | None, ram: Path, size: int, shared: bool = False) -> None:
        env = dict(os.environ)
        if lib is not None:
            env.update(writetrack.launch_env(lib, size))
        argv = [sys.executable, "-c", CHILD, str(ram), str(size), *(["shared"] if shared else [])]
        self.proc = subprocess.Popen(argv,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out, self.inp = self.proc.stdout, self.proc.stdin
        assert self.out.readline().strip() == str(P)
        self.address = (_shared_at(self.proc.pid, ram) if shared
                        else pagemap.find_mapping(self.proc.pid, ram, size))

    def do(self, op: str, *pages: int) -> None:
        for page in pages:
            self.inp.write(f"{op} {page}\n")
            self.inp.flush()
            assert self.out.readline().strip() == "ok"

    def close(self) -> str:
        self.inp.close()
        self.proc.wait(10)
        return self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    why = writetrack.available()
    assert why is None, f"write tracking cannot be used here: {why}"
    got = writetrack.Library.load(tmp_path / "lib")
    assert got is not None and got.path().is_file()
    return got.path()


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Path]:
    f = tmp_path / "ram.cache"
    f.write_bytes(bytes(range(256)) * (PAGES * P // 256))
    yield f


def pages(ranges: list[tuple[int, int]]) -> list[int]:
    return [p for a, b in ranges for p in range(a // P, b // P)]


def test_the_pages_written_since_the_last_look_are_reported(lib: Path, ram: Path) -> None:
    child = Child(lib, ram, PAGES * P)
    try:
        pid, at, size = child.proc.pid, child.address, PAGES * P
        child.do("w", 3)  # before the tracking
        with pytest.raises(writetrack.Untracked) as exc:  # registered only when armed
            writetrack.written(pid, at, size)
        assert exc.value.unregistered
        writetrack.arm(pid, at, size)
        assert writetrack.written(pid, at, size) == []  # nothing since
        child.do("r", 10, 700)  # reads are not writes
        child.do("w", 3, 5, 900, 901)  # a page written before, a file page, holes
        assert pages(writetrack.written(pid, at, size)) == [3, 5, 900, 901]
        assert writetrack.written(pid, at, size) == []
        # the page tables' own view: every page written since the mapping, and no page the
        # protection only marked (the markers look like swapped pages)
        assert pages(pagemap.written(pid, at, size)) == [3, 5, 900, 901]
        used = pagemap.used(pid, at, size)
        assert used[3] == used[10] == 1 and used[800] == 0
        # what the copy reads is what the child holds
        out = ram.with_name("copy")
        with pagemap.Target(out, size) as target:
            target.reserve([(5 * P, 6 * P)])
            pagemap.copy(pid, at, [(5 * P, 6 * P)], target)
        assert out.read_bytes()[5 * P] == (5 * P + 1) % 256
        # disarmed: no registration, the page tables as they were, and armed again later
        writetrack.disarm(pid)
        deadline = time.monotonic() + 5
        while True:
            try:
                writetrack.written(pid, at, size)
            except writetrack.Untracked:
                break
            assert time.monotonic() < deadline, "still registered"
            time.sleep(0.01)
        child.do("w", 6)
        assert pages(pagemap.written(pid, at, size)) == [3, 5, 6, 900, 901]
        writetrack.arm(pid, at, size)
        child.do("w", 901, 1000)
        assert pages(writetrack.written(pid, at, size)) == [901, 1000]
    finally:
        assert "tenki-writetrack" not in child.close()


def test_a_shared_mapping_is_tracked_too(lib: Path, tmp_path: Path) -> None:
    """A booted VM's RAM: a memfd (here a tmpfs file) mapped shared."""
    ram = Path("/dev/shm") / f"tenki-test-writetrack-{os.getpid()}"
    ram.write_bytes(bytes(PAGES * P))
    child = None
    try:
        child = Child(lib, ram, PAGES * P, shared=True)
        pid, at, size = child.proc.pid, child.address, PAGES * P
        writetrack.arm(pid, at, size)
        child.do("r", 2)
        child.do("w", 1, 700)
        assert pages(writetrack.written(pid, at, size)) == [1, 700]
        assert writetrack.written(pid, at, size) == []
        writetrack.disarm(pid)
    finally:
        if child is not None:
            child.close()
        ram.unlink()


def test_a_mapping_of_another_length_is_left_untracked(lib: Path, ram: Path) -> None:
    """Only the RAM is registered (told by its length); another mapping, or a process
    without the library, answers Untracked, and the page tables read as before."""
    size = PAGES * P
    env_size = size - P  # the library looks for another length
    child = Child(None, ram, size)
    other = None
    try:
        with pytest.raises(writetrack.Untracked, match="not registered"):
            writetrack.written(child.proc.pid, child.address, size)
        # no library: never signalled (the signal would kill it)
        with pytest.raises(writetrack.Untracked, match="without write tracking"):
            writetrack.arm(child.proc.pid, child.address, size)
        writetrack.disarm(child.proc.pid)
        assert child.proc.poll() is None
        other = subprocess.Popen([sys.executable, "-c", CHILD, str(ram), str(size)],
                                 env={**os.environ, **writetrack.launch_env(lib, env_size)},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert other.stdout is not None and other.stdout.readline().strip() == str(P)
        addr = pagemap.find_mapping(other.pid, ram, size)
        with pytest.raises(writetrack.Untracked, match="not registered"):
            writetrack.arm(other.pid, addr, size)  # it found no RAM to register
        child.do("w", 7)
        assert pages(pagemap.written(child.proc.pid, child.address, size)) == [7]
    finally:
        child.close()
        if other is not None:
            other.kill()
            other.wait(10)


def test_a_gone_process_is_untracked() -> None:
    with pytest.raises(writetrack.Untracked, match="cannot read"):
        writetrack.written(2**22 + 12345, 0, P)


def test_the_library_is_built_once_and_built_again_when_damaged(tmp_path: Path) -> None:
    """A cache derived from its source: named by the source's digest and its own, checked
    before every use; a damaged one is never handed to a QEMU."""
    assert writetrack.available() is None
    lib = writetrack.Library.load(tmp_path)
    assert lib is not None
    first = lib.path()
    stamp = first.stat().st_mtime_ns
    assert lib.path() == first and first.stat().st_mtime_ns == stamp  # not built again
    again = writetrack.Library.load(tmp_path)  # a server started again finds it
    assert again is not None and again.path() == first
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    fixed = lib.path()  # (the same name: the build is reproducible)
    assert fixed.is_file() and fixed.read_bytes() != bytes(data)
    assert [p.name for p in tmp_path.iterdir()] == [fixed.name]  # the damaged one removed
    fixed.unlink()
    assert lib.path().is_file()  # gone: built again


def test_it_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_WRITE_TRACKING", "off")
    assert writetrack.Library.load(tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_the_preload_keeps_what_was_preloaded(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/x/other.so")
    env = writetrack.launch_env(tmp_path / "w.so", 8192)
    assert env == {"LD_PRELOAD": f"{tmp_path / 'w.so'} /x/other.so",
                   writetrack.RAM_BYTES_ENV: "8192"}

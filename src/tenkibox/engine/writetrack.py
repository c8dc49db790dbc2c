"""Which pages of a VM's RAM its QEMU wrote since the host last asked: the kernel's answer,
from userfaultfd's asynchronous write protection, read with ``PAGEMAP_SCAN``.

A capture by the written pages (``host/written.py``) used to copy them all with the guest
stopped, so its stop grew with them (~50 ms per 256 MiB). With this, it copies them while the
guest runs, and inside the stop only those written since: a stop of the same length however
much the guest wrote. This host kernel has no soft-dirty bits (``CONFIG_MEM_SOFT_DIRTY`` is not
set) and no idle page tracking; QEMU 7.2's own dirty tracking costs a scan of every vCPU's TLB
per page under TCG, and its background snapshot refuses a private file mapping. Linux 6.7's
asynchronous write protection works on any mapping, and ``PAGEMAP_SCAN`` reports and
protects again in one call, from another process.

The registration has to be made inside QEMU: ``writetrack.c``, built here with the machine's C
compiler into the host's directory (``Library``) and loaded with ``LD_PRELOAD`` into the QEMU
of a VM whose RAM is a file: a restored VM's RAM cache, mapped privately, or a booted one's
memfd, mapped shared (``Machine.launch``, ``LaunchOptions.track_writes``). It registers the
RAM when the host sends ``TRACK_ON`` (``arm``, at a capture's start) and ends that on
``TRACK_OFF`` (``disarm``, once the guest runs again): a registered mapping gets no
fault-around, so a VM never captured maps its snapshot's pages as it would without it. A QEMU
without the library, or where the kernel refused the registration, is ``Untracked``, and its
capture copies inside the stop as before; the host signals only a QEMU that catches the
signals (an untracked QEMU would die of them).

Two things change for the page tables' readers (``engine/pagemap.py``): a page protected while
it was not mapped holds a *marker*, which ``/proc/<pid>/pagemap`` shows as a swapped page of
swap type 31; only a reader that sees swap types (``CAP_SYS_ADMIN``) can tell it from one, so
QEMU is given the library only when this process can (``available``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("writetrack.c")
#: the environment variable the library reads the RAM's length from
RAM_BYTES_ENV = "TENKI_TRACK_RAM_BYTES"
PAGE = 4096
BUILD_TIMEOUT_S = 60.0

# <linux/fs.h>, Linux 6.7 (Debian 12's headers are older)
PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
#: regions one call returns at most (24 bytes each)
VEC_LEN = 1 << 14
#: the library's signals (``writetrack.c``): register the RAM, end that
TRACK_ON = signal.SIGRTMAX - 3
TRACK_OFF = signal.SIGRTMAX - 4
#: how long ``arm`` waits for QEMU to register (its handler runs at once, in whichever of its
#: threads does not block the signal)
ARM_TIMEOUT_S = 0.5


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


# _IOWR('f', 16, struct pm_scan_arg)
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class Untracked(Exception):
    """The mapping is not registered for asynchronous write protection (a QEMU started
    without the library, not armed, or whose registration the kernel refused), or the kernel
    has no ``PAGEMAP_SCAN``."""

    def __init__(self, message: str, *, unregistered: bool = False) -> None:
        super().__init__(message)
        #: the scan ran and the mapping is not registered (yet)
        self.unregistered = unregistered


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (``SigCgt`` in its status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def arm(pid: int, start: int, size: int) -> None:
    """Have QEMU (``pid``) register its RAM, at ``start`` for ``size`` bytes, and protect all
    of it: from here, ``written`` reports what it writes. ``Untracked`` if it was started
    without the library, or did not register within ``ARM_TIMEOUT_S`` (its log says why)."""
    if not _catches(pid, TRACK_ON):
        raise Untracked(f"process {pid} was started without write tracking")
    os.kill(pid, TRACK_ON)
    deadline = time.monotonic() + ARM_TIMEOUT_S
    while True:
        try:
            written(pid, start, size)  # all of it, the first time: not needed
            return
        except Untracked as exc:
            if not exc.unregistered or time.monotonic() > deadline:
                raise
        time.sleep(0.001)


def disarm(pid: int) -> None:
    """End the registration (a QEMU that is gone, or never had it: nothing to do)."""
    if _catches(pid, TRACK_OFF):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, TRACK_OFF)


def written(pid: int, start: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges ``(offset, end)`` of the mapping at ``start`` that process ``pid``
    wrote since the last call (since ``arm``, the first time: every page), ascending; they are
    protected again, so the next call reports only what is written after this one.
    ``Untracked`` if the mapping is not registered."""
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Untracked(f"cannot read the page tables of process {pid}: {exc}") from exc
    vec = (_Region * VEC_LEN)()
    out: list[tuple[int, int]] = []
    try:
        at, end = start, start + size
        while at < end:
            arg = _ScanArg(size=ctypes.sizeof(_ScanArg),
                           flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, start=at,
                           end=end, vec=ctypes.addressof(vec), vec_len=VEC_LEN,
                           category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
            n = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EPERM:
                    raise Untracked(f"process {pid}'s RAM is not registered for write "
                                    "tracking", unregistered=True)
                raise Untracked(f"PAGEMAP_SCAN of process {pid}: {os.strerror(err)}")
            for r in vec[:n]:
                a, b = r.start - start, r.end - start
                if out and out[-1][1] == a:
                    a = out.pop()[0]
                out.append((a, b))
            if arg.walk_end <= at:  # no progress: never expected, never looped on
                raise Untracked(f"PAGEMAP_SCAN of process {pid} stopped at {at:#x}")
            at = arg.walk_end
    finally:
        os.close(fd)
    return out


def _sees_swap_types() -> bool:
    """Whether this process reads page frame and swap details in pagemap (``CAP_SYS_ADMIN``):
    a present page of its own shows a frame number only then."""
    buf = ctypes.create_string_buffer(PAGE)
    buf[0] = b"x"  # present
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(ctypes.addressof(buf) // PAGE * 8)
            entry = int.from_bytes(f.read(8), "little")
    except OSError:
        return False
    return bool(entry & ((1 << 55) - 1))


def _kernel_has_it() -> bool:
    """Whether the kernel takes asynchronous write protection (Linux 6.7)."""
    nr_userfaultfd = 323  # x86_64
    uffdio_api = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
    fd = _libc.syscall(nr_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return False
    try:
        api = (ctypes.c_uint64 * 3)(0xAA, (1 << 15) | (1 << 13), 0)
        return _libc.ioctl(fd, uffdio_api, ctypes.addressof(api)) == 0
    finally:
        os.close(fd)


def available() -> str | None:
    """Why write tracking cannot be used on this machine, or None when it can."""
    if os.uname().machine != "x86_64":
        return f"not built for {os.uname().machine}"
    if not _kernel_has_it():
        return "the kernel has no asynchronous userfaultfd write protection (Linux >= 6.7)"
    if not _sees_swap_types():
        return "this process cannot read swap details in pagemap (needs CAP_SYS_ADMIN)"
    return None


class Library:
    """The library for QEMU, built into ``directory`` once per version of its source and named
    by its own digest too (``writetrack-<source>-<library>.so``): ``path`` checks the file
    against that name before every launch and builds it again if it is damaged or gone (a
    QEMU never loads a damaged one; it is a cache, derived from ``SOURCE``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._tag = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        self._path: Path | None = None

    @classmethod
    def load(cls, directory: Path) -> Library | None:
        """The library, built if needed; None (logged) where write tracking cannot be used
        or the library cannot be built."""
        off = os.environ.get("TENKI_WRITE_TRACKING", "on").lower() in ("off", "0", "no",
                                                                        "false")
        why = "TENKI_WRITE_TRACKING is off" if off else available()
        if why is None:
            lib = cls(directory)
            try:
                lib.path()
                return lib
            except OSError as exc:
                why = f"its library could not be built: {exc}"
        log.info("write tracking off: %s; a session's written pages are copied while it is "
                 "stopped", why)
        return None

    def path(self) -> Path:
        """The library's file, intact (built again if not); OSError if it cannot be built."""
        if self._path is not None and _intact(self._path):
            return self._path
        for old in sorted(self.directory.glob(f"writetrack-{self._tag}-*.so")):
            if _intact(old):
                self._path = old
                return old
            log.warning("write tracking: %s is damaged: built again", old.name)
            old.unlink(missing_ok=True)
        self._path = _build(self.directory, self._tag)
        return self._path


def _intact(lib: Path) -> bool:
    try:
        digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    except OSError:
        return False
    return lib.name == f"{lib.name.rsplit('-', 1)[0]}-{digest[:16]}.so"


def _build(directory: Path, tag: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc, gcc) on PATH; scripts/setup installs gcc")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".writetrack-{tag}.{os.getpid()}.part"
    argv = [cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(tmp), str(SOURCE)]
    try:
        subprocess.run(argv, capture_output=True, text=True, check=True,
                       timeout=BUILD_TIMEOUT_S)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        out = directory / f"writetrack-{tag}-{digest[:16]}.so"
        os.replace(tmp, out)  # whole or not at all: a QEMU never loads a half-written one
    except subprocess.CalledProcessError as exc:
        raise OSError(f"`{' '.join(argv)}` failed: {exc.stderr.strip()[-500:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"`{' '.join(argv)}` did not finish in {BUILD_TIMEOUT_S:g}s") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def launch_env(lib: Path, ram_bytes: int) -> dict[str, str]:
    """What QEMU's environment gets for its RAM of ``ram_bytes`` to be tracked."""
    preload = os.environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{lib} {preload}".strip(), RAM_BYTES_ENV: str(ram_bytes)}

"""The guest agent as a Python module: the host's tests run it in their own process.

Until tenki 0.5 this was the guest agent (``src/tenkibox/guest/agent.py``); the guest now runs
``agentd`` (``src/tenkibox/guest/agentd``, Go). It stays as the in-process guest of the
host-side tests that look inside it (``tests/unit/test_host_processes.py``,
``tests/unit/test_restore_settle.py``), and ``tests/unit/test_agent_protocol.py`` holds both
to the same protocol (docs/agent-protocol.md). Standard library only.
One process serves one host connection at a time; the host may go away and come back (server
restart, snapshot restored into a new QEMU) while processes keep running and their output is
kept for the next host.

Threads: the main thread reads requests; one writer thread owns all output to the port; each
request that may block runs in a thread of its own; each process has pump threads for its pipes,
one waiter and, with ``stdin``, one stdin writer (so stdin chunks keep their order). Those are
taken from threads parked after earlier work when one is free (``Threads``).

``--listen PATH`` serves a unix socket instead of the virtio port (development and unit tests).
"""

from __future__ import annotations

import base64
import collections
import errno
import fcntl
import json
import os
import queue
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

# Every import is paid at each boot before the agent can answer (argparse, typing, ctypes and
# socket cost ~1 s together under TCG), so the rare ones are imported where they are used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any

    # An op answers with its result, or with None when it answers by itself (exec, stdin).
    Handler = Callable[[dict[str, Any]], dict[str, Any] | None]

VERSION = "0.4.2"  # 0.3.0: exec as another user (``user``); 0.4.0: ``settle`` (clock and
#                    identity of a restored clone in one request), parked threads; 0.4.1:
#                    ``settle``'s ``warm``; 0.4.2: ``settle`` sets the clock before the warm-up
PORT_NAME = "org.tenki.agent"
MAX_CHUNK = 1 << 20  # largest read_file/write_file/stdin payload per request
OUTPUT_LIMIT = 4 << 20  # process output held for the host, per process
# Flow control (exec with ``credit``): output sent but not yet acknowledged by the host, per
# process. The pipes are not read past it, so a fast producer blocks on its pipe.
CREDIT_WINDOW = 2 << 20
CREDIT_WINDOW_MIN = 256 << 10
CREDIT_WINDOW_MAX = 16 << 20
TMP_SUFFIX = ".part"
MAX_LINE = 16 << 20  # a longer request line is garbage, not a request
PIPE_READ = 1 << 16
WRITE_BATCH = 256 << 10
# After a process exits, its pipes may stay open because a background child inherited them
# (`sh -c 'server &'`). Past this grace, with the pipes idle, the exit is reported anyway.
LEADER_GRACE_S = 0.3
# Safety net only: the port's wait queue wakes the epoll when a host connects.
HOST_WAIT_S = 1.0
DEVICE_WAIT_S = 10.0
# Threads kept parked for the next request or process (see ``Threads``): an exec with stdin
# takes 5 (the request, two pumps, the stdin writer, the waiter)
THREADS_PARKED = 8

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_UID = 1000  # the image's user ``tenki``

DEFAULT_ENV = {
    "PATH": DEFAULT_PATH,
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    # A sandbox has nobody to answer debconf prompts.
    "DEBIAN_FRONTEND": "noninteractive",
}

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
MS_RDONLY = 1
EXT_MAGIC_OFFSET = 1024 + 56
HOSTNAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-"
HEX_DIGITS = "0123456789abcdef"


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"tenki-agent: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class OpError(Exception):
    """A request failed; ``errno_name`` travels to the host as ``errno``."""

    def __init__(self, message: str, errno_name: str | None = None) -> None:
        super().__init__(message)
        self.errno_name = errno_name


def _errno_name(code: int | None) -> str | None:
    return errno.errorcode.get(code) if code else None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


# --------------------------------------------------------------------------------------------
# Ports


class VirtioPort:
    """The guest end of the virtio-serial channel.

    With no host connected, read() returns b"" at once and poll() reports POLLHUP, so level-
    triggered waiting would spin. An edge-triggered epoll fires on each wake-up of the port's
    wait queue, which the driver does when the host side opens or closes: that is the signal.
    Writes block in the driver while no host is connected, which holds output for the next host.
    """

    def __init__(self, name: str = PORT_NAME) -> None:
        self.name = name
        self.fd = -1
        self.ep = select.epoll()
        self._lock = threading.Lock()
        self._open()

    def _find(self) -> str | None:
        base = "/sys/class/virtio-ports"
        for entry in sorted(_listdir(base)):
            try:
                with open(f"{base}/{entry}/name") as f:
                    if f.read().strip() == self.name:
                        return f"/dev/{entry}"
            except OSError:
                continue
        return None

    def _open(self) -> None:
        delay, warned = 0.02, False
        while True:
            dev = self._find()
            if dev:
                try:
                    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
                    break
                except OSError as e:
                    if not warned:
                        log(f"cannot open {dev}: {e}; retrying")
                        warned = True
            elif not warned:
                log(f"waiting for virtio port {self.name}")
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        with self._lock:
            old, self.fd = self.fd, fd
            if old >= 0:
                try:
                    self.ep.unregister(old)
                except OSError:
                    pass
                os.close(old)
            self.ep.register(fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        log(f"serving on {dev}")

    def read(self) -> bytes:
        try:
            return os.read(self.fd, PIPE_READ)
        except OSError as e:
            log(f"port read failed: {e}; reopening")
            time.sleep(0.2)
            self._open()
            return b""

    def wait_host(self) -> None:
        self.ep.poll(HOST_WAIT_S)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                # The reader thread reopens the port on hard errors; retry on the new fd.
                log(f"port write failed: {e}")
                time.sleep(0.2)
                continue
            view = view[n:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ListenPort:
    """A unix socket standing in for the port: each accepted connection is one host.

    Used to run the agent outside a VM (development, unit tests).
    """

    def __init__(self, path: str) -> None:
        import socket

        self.path = path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.conn: socket.socket | None = None
        self.closed = False
        self.cv = threading.Condition()

    def _drop(self, conn: socket.socket) -> None:
        with self.cv:
            if self.conn is conn:
                self.conn = None
        try:
            conn.close()
        except OSError:
            pass

    def read(self) -> bytes:
        conn = self.conn
        if conn is None:
            return b""
        try:
            data = conn.recv(PIPE_READ)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
        return data

    def wait_host(self) -> None:
        if self.conn is not None or self.closed:
            return
        try:
            ready, _, _ = select.select([self.sock], [], [], HOST_WAIT_S)
            if not ready:
                return
            conn, _ = self.sock.accept()
        except OSError:
            time.sleep(0.05)
            return
        with self.cv:
            self.conn = conn
            self.cv.notify_all()

    def write(self, data: bytes) -> None:
        while True:
            with self.cv:
                while self.conn is None and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                conn = self.conn
            assert conn is not None
            try:
                conn.sendall(data)
                return
            except OSError:
                self._drop(conn)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            conn, self.conn = self.conn, None
            self.cv.notify_all()
        for s in (conn, self.sock):
            if s is not None:
                try:
                    s.shutdown(2)  # SHUT_RDWR
                except OSError:
                    pass
                s.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# The parts of the system the agent changes, kept apart so they can be pointed elsewhere when the
# agent runs outside a VM (tests must not set the host's clock or hostname).


class System:
    def __init__(self, root: str = "/") -> None:
        self.root = root

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))

    def set_clock(self, epoch_ns: int) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, epoch_ns)

    # Both run in a restored clone's ``settle``, where all guest code is cold (see
    # ``Agent._read_text``): plain file descriptors, no file objects.
    def set_hostname(self, name: str) -> None:
        fd = os.open("/proc/sys/kernel/hostname", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, name.encode())
        finally:
            os.close(fd)

    def mix_entropy(self, data: bytes) -> None:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # A plain write mixes without crediting; the ioctl credits it and the reseed makes
            # the very next random bytes depend on it (a restored clone must not repeat its
            # siblings' random stream).
            os.write(fd, data)
            try:
                fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            except OSError as e:
                log(f"entropy ioctl failed: {e}")
        finally:
            os.close(fd)


class Warmup:
    """A shell parked on a pipe that starts ``program`` each time the agent pokes it.

    Under TCG a restored guest runs in a new QEMU whose translation cache is empty: each guest
    path runs slowly the first time, and a user's first exec paid ~110 ms more than the next
    one. ``settle`` pokes this shell right after it sets the clock, so the kernel's fork and
    exec, the dynamic loader and libc's start-up are translated on the guest's other vCPU while
    the settle runs, instead of when the first exec comes (``uname -a`` as a clone's first exec:
    136 -> 98 ms, settle 58 -> 54 ms; medians of 6 clones each, alternating). Kernel code has
    one address in every process, so its translations serve any later one; a program's own
    code does not (ASLR puts it elsewhere in each process). It is a process of
    its own, not a thread of the agent: a thread doing it waited for the interpreter's lock
    that the settle holds (first exec 60 ms sooner, settle 69 ms longer). The shell survives
    snapshots like any process, so every clone finds it parked; it ends when the agent's end
    of the pipe closes (the agent exits)."""

    SCRIPT = 'while read -r _; do "$0"; done'

    def __init__(self, program: str = "/bin/true") -> None:
        self.program = program
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", self.SCRIPT, self.program], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                env={"PATH": DEFAULT_PATH}, start_new_session=True)
        except OSError as e:
            log(f"warm-up shell not started: {e}")
            self.proc = None
            return
        assert self.proc.stdin is not None
        # a stopped shell with a full pipe must not hold the settle: the poke is then dropped
        os.set_blocking(self.proc.stdin.fileno(), False)

    def poke(self) -> None:
        """Start ``program`` once in the parked shell (never waits). A shell that is gone (a
        user killed it) is replaced, for the next restore."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.start()
            return
        assert proc.stdin is not None
        try:
            os.write(proc.stdin.fileno(), b"\n")
        except OSError:
            pass

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait()
            self.proc = None


# --------------------------------------------------------------------------------------------
# Output to the host


class Outbox:
    """Everything for the host goes through here, in order.

    A message finding nobody writing and nothing queued is written at once by the thread that
    made it: handing it to the writer thread costs a thread switch, which under TCG is most of
    a ping's round trip. Otherwise it queues behind the others and the writer thread sends it.
    Queued process output is accounted per process so that a process whose host is away (or
    slow) is held back at OUTPUT_LIMIT instead of growing the agent.
    """

    def __init__(self, port: Any) -> None:
        self.port = port
        self.items: collections.deque[tuple[bytes, Proc | None, int]] = collections.deque()
        self.cv = threading.Condition()
        self.busy = False  # a thread is writing to the port

    def put(self, msg: dict[str, Any], proc: Proc | None = None, nbytes: int = 0) -> bool:
        """Send or queue ``msg``; True when it was queued (then it counts against ``proc``)."""
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self.cv:
            if self.items or self.busy:
                self.items.append((line, proc, nbytes))
                self.cv.notify_all()
                return True
            self.busy = True
        try:
            self.port.write(line)
        finally:
            with self.cv:
                self.busy = False
                self.cv.notify_all()
        return False

    def run_writer(self) -> None:
        while True:
            with self.cv:
                while not self.items or self.busy:
                    self.cv.wait()
                self.busy = True
                batch: list[tuple[bytes, Proc | None, int]] = []
                size = 0
                while self.items and (not batch or size + len(self.items[0][0]) <= WRITE_BATCH):
                    item = self.items.popleft()
                    batch.append(item)
                    size += len(item[0])
            try:
                self.port.write(b"".join(item[0] for item in batch))
            finally:
                with self.cv:
                    self.busy = False
                    self.cv.notify_all()
            # After letting go of the port: a pump may hold its process's lock while it writes.
            for _, proc, nbytes in batch:
                if proc is not None and nbytes:
                    proc.release(nbytes)


# --------------------------------------------------------------------------------------------
# Processes


class Threads:
    """Runs work on a thread parked after earlier work, or on a new one when none is free.

    A guest restored from a snapshot runs every code path for the first time since the
    restore, and under TCG each one is translated again: starting a thread (clone, its stack,
    Python's bootstrap) is among the dearest, and an exec needs three or four. Threads parked
    before the snapshot are in it, and waking one is a futex. At most ``keep`` stay parked;
    a busy pool never makes work wait (a new thread is started instead)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.parked = 0
        self.work: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = \
            collections.deque()
        self.cv = threading.Condition()
        self.closed = False

    def close(self) -> None:
        """Let the parked threads end (the agent stops); later work gets threads of its own."""
        with self.cv:
            self.keep = 0
            self.closed = True
            self.cv.notify_all()

    def start(self, fn: Callable[..., object], *args: Any) -> None:
        with self.cv:
            if self.parked > len(self.work):  # a parked thread takes it
                self.work.append((fn, args))
                self.cv.notify()
                return
        threading.Thread(target=self._run, args=(fn, args), daemon=True).start()

    def _run(self, fn: Callable[..., object] | None, args: tuple[Any, ...]) -> None:
        while fn is not None:
            try:
                fn(*args)
            except Exception as e:  # as a thread of its own would: reported, the others go on
                log(f"thread work crashed: {e!r}")
            fn, args = None, ()  # nothing of the last work is kept alive while parked
            with self.cv:
                if self.parked >= self.keep:
                    return
                self.parked += 1
                while not self.work and not self.closed:
                    self.cv.wait()
                self.parked -= 1
                if not self.work:  # closed
                    return
                fn, args = self.work.popleft()


class Proc:
    def __init__(self, agent: Agent, rid: int, popen: subprocess.Popen[bytes],
                 timeout_s: float | None, window: int = 0) -> None:
        self.agent = agent
        self.id = rid
        self.popen = popen
        self.pid = popen.pid
        self.timeout_s = timeout_s
        self.timed_out = False
        self.exited = False
        self.detached = False  # exit reported: later pipe output is drained and dropped
        self.pending = 0  # output queued in the outbox (not yet written to the port)
        # Credit mode (window > 0): output sent and not yet acknowledged by the host.
        self.window = window
        self.unacked = 0
        self.cv = threading.Condition()
        self.idle: dict[str, bool] = {}  # per pipe: blocked in read() on an empty pipe
        self.pumps: list[tuple[str, threading.Event]] = []  # per pipe: set once drained
        self.stdin_done = False
        self.stdin_q: queue.Queue[tuple[int, bytes | None] | None] | None = None
        if popen.stdin is not None:
            self.stdin_q = queue.Queue()

    def start(self) -> None:
        for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            assert stream is not None
            self.idle[name] = False
            done = threading.Event()
            self.pumps.append((name, done))
            self.agent.threads.start(self._pump, name, stream, done)
        if self.stdin_q is not None:
            self.agent.threads.start(self._stdin_writer)
        self.agent.threads.start(self._wait)

    def release(self, nbytes: int) -> None:
        with self.cv:
            self.pending -= nbytes
            self.cv.notify_all()

    def ack(self, nbytes: int) -> None:
        """The host consumed ``nbytes`` more of this process's output."""
        with self.cv:
            # Never below 0: a reconnected host may acknowledge output sent before the reset.
            self.unacked = max(0, self.unacked - nbytes)
            self.cv.notify_all()

    def forgive(self, unlimited: bool = False) -> None:
        """A new host (or none): what was in flight to the previous one is not coming back."""
        with self.cv:
            self.unacked = 0
            if unlimited:
                self.window = 0
            self.cv.notify_all()

    def _held(self) -> bool:
        if self.detached:
            return False
        return self.pending >= OUTPUT_LIMIT or (self.window > 0 and self.unacked >= self.window)

    def _pump(self, name: str, stream: Any, done: threading.Event) -> None:
        try:
            self._pump_pipe(name, stream)
        finally:
            done.set()

    def _pump_pipe(self, name: str, stream: Any) -> None:
        fd = stream.fileno()
        while True:
            with self.cv:
                while self._held():
                    self.cv.wait()
                self.idle[name] = True
            try:
                data = os.read(fd, PIPE_READ)
            except OSError:
                data = b""
            with self.cv:
                self.idle[name] = False
                if not data:
                    self.cv.notify_all()
                    break
                if self.detached:
                    continue
                # Sent under the process lock so that no output can follow the exit event.
                if self.agent.out.put(
                        {"id": self.id, "event": name, "data": base64.b64encode(data).decode()},
                        self, len(data)):
                    self.pending += len(data)
                if self.window:
                    self.unacked += len(data)
        # Through the file object, which owns the fd: a raw close would leave it to close the
        # number again later, when it may belong to another process's pipe.
        stream.close()

    def _wait(self) -> None:
        try:
            self.popen.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.signal(signal.SIGKILL)
            self.popen.wait()
        self.exited = True
        exited_at = time.monotonic()
        while True:
            for _, done in self.pumps:
                done.wait(0.05)
            with self.cv:
                alive = [name for name, done in self.pumps if not done.is_set()]
                if not alive:
                    break
                idle = all(self.idle[name] for name in alive)
                if idle and time.monotonic() - exited_at >= LEADER_GRACE_S:
                    break
        rc = self.popen.returncode
        code = 124 if self.timed_out else (128 - rc if rc < 0 else rc)
        with self.cv:
            self.detached = True
            self.cv.notify_all()
            self.agent.out.put(
                {"id": self.id, "event": "exit", "exit_code": code, "timed_out": self.timed_out})
        if self.stdin_q is not None:
            self.stdin_q.put(None)
        self.agent.forget(self)

    def _stdin_writer(self) -> None:
        assert self.stdin_q is not None and self.popen.stdin is not None
        fd = self.popen.stdin.fileno()
        closed = False
        while True:
            item = self.stdin_q.get()
            if item is None:
                break
            rid, data = item
            try:
                if closed:
                    raise OpError("stdin is closed", "EPIPE")
                if data is None:
                    self.popen.stdin.close()
                    closed = True
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                self.agent.answer(rid, {})
            except OSError as e:
                self.agent.fail(rid, str(e), _errno_name(e.errno))
            except OpError as e:
                self.agent.fail(rid, str(e), e.errno_name)
        if not closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        with self.cv:
            self.stdin_done = True
        # Requests queued behind the exit still get an answer.
        while True:
            try:
                item = self.stdin_q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.agent.fail(item[0], "process has exited", "EPIPE")

    def send_stdin(self, rid: int, data: bytes | None) -> None:
        if self.stdin_q is None:
            raise OpError("process was started without stdin", "EBADF")
        with self.cv:
            if self.stdin_done:
                raise OpError("process has exited", "EPIPE")
            self.stdin_q.put((rid, data))

    def signal(self, sig: int) -> None:
        # The whole group: `sh -c` and its children, not only the leader.
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            if not self.exited:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass


# --------------------------------------------------------------------------------------------
# The agent


def _hostname_ok(name: str) -> bool:
    """1-63 letters, digits, dots and dashes, not starting with a dot or a dash. Checked with
    string methods, not a regular expression: it runs in a restored clone's ``settle``, where
    the regular expression engine's code would be translated first (and ``$`` let a trailing
    newline through)."""
    return 0 < len(name) <= 63 and name[0] not in ".-" and not name.strip(HOSTNAME_CHARS)


def _machine_id_ok(machine_id: str) -> bool:
    """32 lowercase hex digits."""
    return len(machine_id) == 32 and not machine_id.strip(HEX_DIGITS)


def _b64(req: dict[str, Any], key: str = "data") -> bytes:
    raw = req.get(key, "")
    if not isinstance(raw, str):
        raise OpError(f"{key} must be a base64 string", "EINVAL")
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError as e:
        raise OpError(f"{key} is not valid base64", "EINVAL") from e


def _int(req: dict[str, Any], key: str, default: int | None = None) -> int:
    value = req.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OpError(f"{key} must be an integer", "EINVAL")
    return value


def _str(req: dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value or "\0" in value:
        raise OpError(f"{key} must be a non-empty string", "EINVAL")
    return value


def _unescape_mount_field(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class Agent:
    def __init__(self, port: Any, system: System | None = None,
                 warmup: Warmup | None = None) -> None:
        self.port = port
        self.sys = system or System()
        self.warmup = warmup
        self.out = Outbox(port)
        self.threads = Threads(THREADS_PARKED)
        self.procs: dict[int, Proc] = {}
        self.procs_lock = threading.Lock()
        self.stopping = False
        self.boot_id = self._read_text("/proc/sys/kernel/random/boot_id").strip()
        self._libc: Any = None
        self.ops: dict[str, Handler] = {
            "ping": self.op_ping,
            "exec": self.op_exec,
            "stdin": self.op_stdin,
            "stdin_close": self.op_stdin_close,
            "kill": self.op_kill,
            "read_file": self.op_read_file,
            "write_file": self.op_write_file,
            "rename": self.op_rename,
            "remove": self.op_remove,
            "ack": self.op_ack,
            "set_time": self.op_set_time,
            "reidentify": self.op_reidentify,
            "settle": self.op_settle,
            "sync": self.op_sync,
            "mount": self.op_mount,
            "umount": self.op_umount,
        }
        # Answered from the reader thread: quick and order-sensitive (stdin chunks must not
        # overtake each other; set_time must not wait behind a slow request). ``settle`` too:
        # a restored guest's first request after the ping, a few small writes to files in
        # /etc (page cache), and a thread started just for it costs more than the work in a
        # guest that was just restored (each page it touches first is a fault on the host).
        self.inline = {"ping", "stdin", "stdin_close", "kill", "set_time", "ack", "settle"}

    @staticmethod
    def _read_text(path: str) -> str:
        """The file's text ("" when it cannot be read). Read from a plain descriptor: a
        restored clone's ``settle`` reads /etc/hosts as the first file its new QEMU sees read,
        and Python's text files run much more guest code the first time under TCG (the
        ``settle``'s hostname, as a text file write: 20-31 ms of its 42-65 ms identity part; as
        a descriptor write: 6-11 ms). Bytes that are not UTF-8 survive a rewrite
        (``surrogateescape``, as ``_replace_file`` encodes)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return ""
        chunks: list[bytes] = []
        try:
            while chunk := os.read(fd, PIPE_READ):
                chunks.append(chunk)
        except OSError:
            return ""
        finally:
            os.close(fd)
        return b"".join(chunks).decode(errors="surrogateescape")

    # -- plumbing --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        threading.Thread(target=self.out.run_writer, name="writer", daemon=True).start()
        buf = bytearray()
        scanned = 0
        connected = False
        while not self.stopping:
            data = self.port.read()
            if not data:
                if connected:
                    log("host disconnected")
                    connected = False
                    self.new_host()
                # A partial line is the torn end of the previous host's last request.
                buf.clear()
                scanned = 0
                if not self.stopping:
                    self.port.wait_host()
                continue
            if not connected:
                log("host connected")
                connected = True
            buf += data
            while True:
                i = buf.find(b"\n", scanned)
                if i < 0:
                    scanned = len(buf)
                    break
                line = bytes(buf[:i])
                del buf[: i + 1]
                scanned = 0
                if line.strip():
                    self.dispatch(line)
                elif not line:
                    # A host starts each connection with an empty line.
                    self.new_host()
            if len(buf) > MAX_LINE:
                buf.clear()
                scanned = 0

    def stop(self) -> None:
        self.stopping = True
        self.threads.close()
        with self.procs_lock:
            procs = list(self.procs.values())
        for p in procs:
            p.forgive(unlimited=True)
            p.signal(signal.SIGKILL)
        self.port.close()

    def new_host(self) -> None:
        """The host went away or a new one starts: output in flight to the previous host is
        lost, so it no longer counts against the processes' credit windows."""
        with self.procs_lock:
            procs = list(self.procs.values())
        for p in procs:
            p.forgive()

    def answer(self, rid: int, result: dict[str, Any]) -> None:
        self.out.put({"id": rid, "ok": True, **result})

    def fail(self, rid: int, message: str, errno_name: str | None) -> None:
        self.out.put({"id": rid, "ok": False, "error": message, "errno": errno_name})

    def dispatch(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            return
        if not isinstance(req, dict):
            return
        rid, op = req.get("id"), req.get("op")
        if not isinstance(rid, int) or isinstance(rid, bool):
            return
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            self.fail(rid, f"unknown op {op!r}", "ENOSYS")
            return
        if op in self.inline:
            self._handle(rid, handler, req)
        else:
            self.threads.start(self._handle, rid, handler, req)

    def _handle(self, rid: int, handler: Handler, req: dict[str, Any]) -> None:
        try:
            result = handler(req)
        except OpError as e:
            self.fail(rid, str(e), e.errno_name)
        except OSError as e:
            self.fail(rid, str(e), _errno_name(e.errno))
        except Exception as e:  # an agent bug must cost one request, not the connection
            log(f"{req.get('op')} crashed: {e!r}")
            self.fail(rid, f"{type(e).__name__}: {e}", None)
        else:
            if result is not None:
                self.answer(rid, result)

    def forget(self, proc: Proc) -> None:
        with self.procs_lock:
            if self.procs.get(proc.id) is proc:
                del self.procs[proc.id]

    def _proc(self, req: dict[str, Any]) -> Proc:
        target = _int(req, "target")
        with self.procs_lock:
            proc = self.procs.get(target)
        if proc is None:
            raise OpError(f"no process {target}", "ESRCH")
        return proc

    # -- ops -------------------------------------------------------------------------------

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        # /proc/uptime's first field is CLOCK_BOOTTIME; read as a file it cost a restore's
        # first request ~12-26 ms (a restored guest's first file read in its new QEMU runs
        # untranslated code: the agent step 78 -> 52-66 ms, medians of 8 clones, alternating)
        return {
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "uptime_s": round(time.clock_gettime(time.CLOCK_BOOTTIME), 2),
            "version": VERSION,
        }

    def op_exec(self, req: dict[str, Any]) -> None:
        rid = req["id"]
        argv = req.get("argv")
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and "\0" not in a for a in argv)):
            raise OpError("argv must be a non-empty list of strings", "EINVAL")
        env = dict(DEFAULT_ENV)
        extra = req.get("env") or {}
        if not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise OpError("env must map strings to strings", "EINVAL")
        env.update(extra)
        cwd = req.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise OpError("cwd must be a string", "EINVAL")
        if cwd is None:
            cwd = env["HOME"] if os.path.isdir(env.get("HOME", "")) else "/"
        elif not os.path.isdir(cwd):  # else Popen's error names the program, not the directory
            raise OpError(f"cwd {cwd}: no such directory", "ENOTDIR")
        # ``user``: a uid to run as, switched to in the child (no setpriv/su program to start)
        ids: dict[str, Any] = {}
        uid = req.get("user")
        if uid is not None:
            if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
                raise OpError("user must be a uid", "EINVAL")
            import pwd
            try:
                entry = pwd.getpwuid(uid)
            except KeyError as exc:
                raise OpError(f"no user with uid {uid}", "EINVAL") from exc
            ids = {"user": uid, "group": entry.pw_gid,
                   "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid)}
        timeout_s = req.get("timeout_s")
        if timeout_s is not None and (not isinstance(timeout_s, int | float) or timeout_s <= 0):
            raise OpError("timeout_s must be a positive number", "EINVAL")
        with self.procs_lock:
            if rid in self.procs:
                raise OpError(f"id {rid} is already a running process", "EEXIST")
        window = 0
        if req.get("credit"):
            window = _int(req, "window", CREDIT_WINDOW)
            window = max(CREDIT_WINDOW_MIN, min(window, CREDIT_WINDOW_MAX))
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            **ids,
        )
        proc = Proc(self, rid, popen, float(timeout_s) if timeout_s else None, window)
        with self.procs_lock:
            self.procs[rid] = proc
        # The answer goes out before the pumps start, so it precedes every event of this id.
        self.answer(rid, {"pid": popen.pid, "window": window} if window else {"pid": popen.pid})
        proc.start()
        return None

    def op_stdin(self, req: dict[str, Any]) -> None:
        data = _b64(req)
        self._proc(req).send_stdin(req["id"], data)
        return None  # answered by the process's stdin writer once written

    def op_stdin_close(self, req: dict[str, Any]) -> None:
        self._proc(req).send_stdin(req["id"], None)
        return None

    def op_ack(self, req: dict[str, Any]) -> None:
        # Fire and forget: never answered, not even when the process is gone meanwhile.
        target, nbytes = req.get("target"), req.get("bytes")
        if isinstance(target, int) and isinstance(nbytes, int) and nbytes > 0:
            with self.procs_lock:
                proc = self.procs.get(target)
            if proc is not None:
                proc.ack(nbytes)
        return None

    def op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        sig = _int(req, "signal", int(signal.SIGKILL))
        if not 0 <= sig < signal.NSIG:
            raise OpError(f"bad signal {sig}", "EINVAL")
        self._proc(req).signal(sig)
        return {}

    def op_read_file(self, req: dict[str, Any]) -> dict[str, Any]:
        path = _str(req, "path")
        offset = _int(req, "offset", 0)
        length = min(_int(req, "length", MAX_CHUNK), MAX_CHUNK)
        if offset < 0 or length < 0:
            raise OpError("offset and length must be >= 0", "EINVAL")
        # O_NONBLOCK: a FIFO must not hang the request; regular files ignore the flag.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise OpError(f"{path} is a directory", "EISDIR")
            try:
                data = os.pread(fd, length, offset)
            except BlockingIOError:
                data = b""
        finally:
            os.close(fd)
        regular = stat.S_ISREG(st.st_mode)
        end = offset + len(data)
        eof = len(data) < length or (regular and end >= st.st_size)
        size = st.st_size if regular and st.st_size else end
        return {"data": base64.b64encode(data).decode(), "size": size, "eof": eof}

    def op_write_file(self, req: dict[str, Any]) -> dict[str, Any]:
        path = _str(req, "path")
        data = _b64(req)
        offset = _int(req, "offset", 0)
        mode = _int(req, "mode", 0o644) & 0o7777
        if offset < 0:
            raise OpError("offset must be >= 0", "EINVAL")
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        result: dict[str, Any] = {}
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        truncate = bool(req.get("truncate"))
        if req.get("tmp") and self._replaceable(path):
            # A fresh temporary file beside the destination (after following a symlink there,
            # so that the final rename replaces what the link points to, on its filesystem).
            target = os.path.realpath(path)
            head, base = os.path.split(target)
            path = os.path.join(head, f".{base[:200]}.tenki-{os.urandom(6).hex()}{TMP_SUFFIX}")
            flags |= os.O_EXCL
            truncate, offset = True, 0
            result = {"tmp": path, "target": target}
        if truncate:
            flags |= os.O_TRUNC
        fd = os.open(path, flags, mode)
        try:
            if truncate and stat.S_ISREG(os.fstat(fd).st_mode):
                # The umask and an older file's mode must not win over the requested mode.
                # (Never a device's: writing /dev/null must not change who may use it.)
                os.fchmod(fd, mode)
            view = memoryview(data)
            pos = offset
            # Devices and FIFOs have no offsets (pwrite fails with ESPIPE there).
            seekable = stat.S_ISREG(os.fstat(fd).st_mode)
            while view:
                n = os.pwrite(fd, view, pos) if seekable else os.write(fd, view)
                view, pos = view[n:], pos + n
            size = os.fstat(fd).st_size
        except BaseException:
            if result:  # the host never learns the temporary name: remove it here
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        finally:
            os.close(fd)
        return {"size": size, **result}

    @staticmethod
    def _replaceable(path: str) -> bool:
        """Whether a write to ``path`` can go through a temporary file and a rename: not for
        devices, FIFOs and the files of /proc and /sys, which are written in place."""
        target = os.path.realpath(path)
        if target.startswith(("/proc/", "/sys/", "/dev/")):
            return False
        try:
            st = os.stat(target)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode):
            raise OpError(f"{path} is a directory", "EISDIR")
        return stat.S_ISREG(st.st_mode)

    def op_rename(self, req: dict[str, Any]) -> dict[str, Any]:
        src, dst = _str(req, "src"), _str(req, "dst")
        os.replace(src, dst)
        return {"size": os.stat(dst).st_size}

    def op_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        path = _str(req, "path")
        try:
            os.unlink(path)
        except FileNotFoundError:
            return {"existed": False}
        return {"existed": True}

    def op_set_time(self, req: dict[str, Any]) -> dict[str, Any]:
        epoch_ns = _int(req, "epoch_ns")
        before = time.time_ns()
        self.sys.set_clock(epoch_ns)
        return {"delta_s": (epoch_ns - before) / 1e9}

    def op_reidentify(self, req: dict[str, Any]) -> dict[str, Any]:
        hostname = _str(req, "hostname")
        machine_id = _str(req, "machine_id").lower()
        if not _hostname_ok(hostname):
            raise OpError(f"invalid hostname {hostname!r}", "EINVAL")
        if not _machine_id_ok(machine_id):
            raise OpError("machine_id must be 32 hex digits", "EINVAL")
        entropy = _b64(req, "entropy")
        self.sys.set_hostname(hostname)
        self._replace_file("/etc/hostname", hostname + "\n")
        self._replace_file("/etc/machine-id", machine_id + "\n", 0o444)
        self._replace_file("/etc/hosts", self._hosts(hostname))
        if entropy:
            self.sys.mix_entropy(entropy)
        return {}

    def op_settle(self, req: dict[str, Any]) -> dict[str, Any]:
        """A restored clone's clock and, when ``hostname`` is given, its new identity, in one
        round trip: ``set_time``, then ``reidentify`` (same arguments and checks). The
        identity is checked before the clock is touched, so a refused request changes
        nothing. ``warm`` (default true): poke the warm-up shell (``Warmup``); a host whose
        cores are all taken sends false, since the warm-up then only takes CPU from the other
        guests starting beside this one. ``took_s``: the agent's own time for it (the rest
        of the round trip is the channel's)."""
        start = time.monotonic()
        warm = req.get("warm", True)
        if not isinstance(warm, bool):
            raise OpError("warm must be true or false", "EINVAL")
        identity = "hostname" in req
        if identity:
            if not _hostname_ok(_str(req, "hostname")):
                raise OpError(f"invalid hostname {req['hostname']!r}", "EINVAL")
            if not _machine_id_ok(_str(req, "machine_id").lower()):
                raise OpError("machine_id must be 32 hex digits", "EINVAL")
            _b64(req, "entropy")
        result = self.op_set_time(req)  # first: its epoch_ns was the host's time at sending
        # after the clock: setting it waits for every other vCPU to take an interrupt, and the
        # one the warm-up wakes is busy translating (the clock 15-30 ms after a poke, 5-9 ms
        # before one); the warm-up still runs beside the identity's writes
        if warm and self.warmup is not None:
            self.warmup.poke()
        if identity:
            self.op_reidentify(req)
        result["took_s"] = time.monotonic() - start
        return result

    def _hosts(self, hostname: str) -> str:
        lines = [ln for ln in self._read_text(self.sys.path("/etc/hosts")).splitlines()
                 if not ln.startswith("127.0.1.1")]
        if not any(ln.split()[:2] == ["127.0.0.1", "localhost"] for ln in lines):
            lines.insert(0, "127.0.0.1\tlocalhost")
        lines.insert(1, f"127.0.1.1\t{hostname}")
        return "\n".join(lines) + "\n"

    def _replace_file(self, path: str, text: str, mode: int = 0o644) -> None:
        data = text.encode(errors="surrogateescape")
        if self._rewrite(path, data, mode):
            return
        # the file a link names (the image links the identity files into /run/tenki, tmpfs):
        # replacing the link itself would put the file back on the disk
        target = os.path.realpath(self.sys.path(path))
        tmp = f"{target}.tenki-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    def _rewrite(self, path: str, data: bytes, mode: int) -> bool:
        """Write ``data`` over the regular file ``path`` names (through its links) in place,
        if it is exactly as long: no new file, no rename. A restored clone is the first in its
        QEMU to run those paths, and under TCG the first file created and renamed took 19-37 ms
        of its settle, where this took 9-12 ms. Same length: a reader never sees a shorter file
        or an old tail (hostnames, machine-ids and so /etc/hosts keep theirs from clone to
        clone). False, with nothing written, for any other file: it is replaced."""
        try:
            # never waits: a FIFO put there (the guest is its user's) fails at once
            fd = os.open(self.sys.path(path),
                         os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
                return False
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            view, pos = memoryview(data), 0
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
            return True
        finally:
            os.close(fd)

    def op_sync(self, req: dict[str, Any]) -> dict[str, Any]:
        os.sync()
        return {}

    # -- volumes ---------------------------------------------------------------------------

    def _libc_call(self, name: str, *args: Any) -> None:
        import ctypes

        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        if getattr(self._libc, name)(*args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{name}: {os.strerror(code)}")

    def _find_disk(self, serial: str, wait_s: float) -> str:
        # A hot-plugged disk shows up in sysfs a moment after device_add returns.
        deadline = time.monotonic() + wait_s
        while True:
            base = self.sys.path("/sys/block")
            for name in sorted(n for n in _listdir(base) if n.startswith("vd")):
                if self._read_text(f"{base}/{name}/serial").strip() == serial:
                    dev = f"/dev/{name}"
                    if os.path.exists(dev):
                        return dev
            if time.monotonic() >= deadline:
                raise OpError(f"no virtio disk with serial {serial!r}", "ENODEV")
            time.sleep(0.05)

    def _mounts(self) -> list[tuple[str, str]]:
        out = []
        for line in self._read_text("/proc/self/mounts").splitlines():
            fields = line.split()
            if len(fields) >= 2:
                out.append((_unescape_mount_field(fields[0]), _unescape_mount_field(fields[1])))
        return out

    @staticmethod
    def _probe(dev: str) -> tuple[str | None, bool]:
        """(filesystem type or None, blank) of a block device."""
        with open(dev, "rb") as f:
            head = f.read(128 << 10)
        if head[EXT_MAGIC_OFFSET:EXT_MAGIC_OFFSET + 2] == b"\x53\xef":
            return "ext4", False  # the ext4 driver mounts ext2/3/4
        try:
            r = subprocess.run(["blkid", "-p", "-s", "TYPE", "-o", "value", dev],
                               capture_output=True, text=True, timeout=30)
            fstype = r.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            fstype = None
        return fstype, fstype is None and not any(head)

    def op_mount(self, req: dict[str, Any]) -> dict[str, Any]:
        serial = _str(req, "serial")
        path = os.path.normpath(_str(req, "path"))
        if not path.startswith("/") or path == "/":
            raise OpError("path must be absolute and not /", "EINVAL")
        read_only = bool(req.get("read_only"))
        dev = self._find_disk(serial, float(req.get("wait_s", DEVICE_WAIT_S)))
        for source, target in self._mounts():
            if target == path:
                if os.path.realpath(source) == os.path.realpath(dev):
                    return {"device": dev}
                raise OpError(f"{path} is already a mount point of {source}", "EBUSY")
        fstype, blank = self._probe(dev)
        if fstype is None:
            if not blank:
                raise OpError(f"{dev} holds data but no filesystem tenki recognizes; "
                              "refusing to format it", "EINVAL")
            if not req.get("mkfs") or read_only:
                raise OpError(f"{dev} has no filesystem", "EINVAL")
            # the root of a new volume belongs to the sandbox user (root may write anyway)
            r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                                f"nodiscard,root_owner={SANDBOX_UID}:{SANDBOX_UID}", dev],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise OpError(f"mkfs.ext4 {dev} failed: {r.stderr.strip()}", "EIO")
            fstype = "ext4"
        os.makedirs(path, exist_ok=True)
        import ctypes

        self._libc_call("mount", dev.encode(), path.encode(), fstype.encode(),
                        ctypes.c_ulong(MS_RDONLY if read_only else 0), None)
        return {"device": dev}

    def op_umount(self, req: dict[str, Any]) -> dict[str, Any]:
        path = os.path.normpath(_str(req, "path"))
        if not any(target == path for _, target in self._mounts()):
            return {"was_mounted": False}
        # umount writes back the filesystem's dirty data before it returns.
        self._libc_call("umount2", path.encode(), 0)
        return {"was_mounted": True}


USAGE = """usage: agent.py [--listen PATH] [--port-name NAME] [--wait-file PATH]

  --listen PATH     serve a unix socket at PATH instead of the virtio port
  --port-name NAME  the virtio-serial port to serve (default org.tenki.agent)
  --wait-file PATH  serve only once PATH exists (tenki-init creates it when the guest is set up)
"""
WAIT_FILE_LIMIT_S = 60.0


def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + WAIT_FILE_LIMIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            log(f"{path} did not appear within {WAIT_FILE_LIMIT_S:g}s; serving anyway")
            return
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    opts = {"--listen": "", "--port-name": PORT_NAME, "--wait-file": ""}
    while args:
        if args[0] in opts and len(args) >= 2:
            opts[args[0]] = args[1]
            args = args[2:]
        else:
            sys.stderr.write(USAGE)
            return 0 if args[0] in ("-h", "--help") else 2
    os.umask(0o022)
    os.chdir("/")
    if opts["--wait-file"]:
        _wait_for_file(opts["--wait-file"])
    port: Any
    warmup = None
    if opts["--listen"]:
        port = ListenPort(opts["--listen"])
    else:
        port = VirtioPort(opts["--port-name"])
        warmup = Warmup()  # in a VM only: outside one there is no translation to warm
        warmup.start()
    log(f"version {VERSION} pid {os.getpid()}")
    Agent(port, warmup=warmup).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the benchmarks: a private tenki server, plain QEMU, libvirt, tables.

Everything a benchmark starts is registered with a ``Cleanup`` stack and undone in reverse
order on the way out, failure and Ctrl-C (and SIGTERM/SIGHUP) included: sessions, the server,
QEMU processes, libvirt domains and daemons, temporary directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SRC = REPO / "src"
if str(SRC) not in sys.path:  # run with any python that has the project's dependencies
    sys.path.insert(0, str(SRC))

from tenkibox import Client  # noqa: E402
from tenkibox import config as tconfig  # noqa: E402
from tenkibox.engine.agent import AgentClient  # noqa: E402
from tenkibox.host.network.addressing import VMNet  # noqa: E402
from tenkibox.host.network.links import ours, remove  # noqa: E402

QEMU = "qemu-system-x86_64"
AGENT_PORT_NAME = "org.tenki.agent"
IMAGE_ID = "sandbox"
IMAGE_FILES = ("base.qcow2", "vmlinuz", "initrd.img", "image.json", "packages.txt")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- numbers and tables --------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float], unit: str = "s", digits: int = 3) -> str:
    """``median (min-max)``, or just the value for one sample."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}{unit}"
    return f"{median(xs):.{digits}f}{unit} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def secs(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}s"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0 or a != a or b != b:
        return "n/a"
    return f"{a / b:.2f}x"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.1f} MiB"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


# -- cleanup --------------------------------------------------------------------------------

class Cleanup:
    """A LIFO of undo actions; each runs once, its failure is logged and the rest still run."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, action: Callable[[], object]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except BaseException as exc:  # cleanup must go on
                log(f"cleanup: {what}: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Cleanup:
        def on_signal(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        # a second Ctrl-C must not cut the cleanup short
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.run()
        finally:
            signal.signal(signal.SIGINT, old)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def kill_pid(pid: int, must_contain: str, timeout: float = 5.0) -> bool:
    """SIGKILL ``pid`` if it is alive and its command line contains ``must_contain``."""
    if not pid_alive(pid) or must_contain not in pid_cmdline(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def stop_popen(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- host load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU time so far (``/proc/stat``'s first line, in clock ticks) and its load
    average, read at ``at`` (monotonic): what else ran here is part of every timing, so each
    result notes it."""

    busy: int
    idle: int
    iowait: int
    steal: int
    load1: float
    at: float

    @classmethod
    def now(cls) -> CpuTimes:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is counted in user)
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return cls(busy=user + nice + system + irq + softirq, idle=idle, iowait=iowait,
                   steal=steal, load1=os.getloadavg()[0], at=time.monotonic())


@dataclass(frozen=True)
class HostLoad:
    """The machine between two ``CpuTimes``: shares of all its CPUs' time, in percent."""

    busy: float
    iowait: float
    steal: float
    load1: float  # the load average at the end
    seconds: float

    @classmethod
    def since(cls, a: CpuTimes) -> HostLoad:
        """The machine from ``a`` until now."""
        b = CpuTimes.now()
        busy, idle = b.busy - a.busy, b.idle - a.idle
        iowait, steal = b.iowait - a.iowait, b.steal - a.steal
        total = max(1, busy + idle + iowait + steal)
        return cls(busy=100 * busy / total, iowait=100 * iowait / total,
                   steal=100 * steal / total, load1=b.load1, seconds=b.at - a.at)

    @classmethod
    def idle_for(cls, seconds: float) -> HostLoad:
        """The machine while this process waits ``seconds``: the load of others alone."""
        a = CpuTimes.now()
        time.sleep(seconds)
        return cls.since(a)

    def cells(self) -> list[str]:
        return [f"{self.busy:.0f}%", f"{self.iowait:.0f}%", f"{self.steal:.1f}%",
                f"{self.load1:.2f}"]


LOAD_HEADERS = ["CPU busy", "iowait", "steal", "load avg (1 min)"]


# -- host memory ----------------------------------------------------------------------------

def smaps_rollup(pid: int) -> dict[str, int]:
    """Bytes of /proc/<pid>/smaps_rollup's fields (Pss, Pss_Anon, Pss_File, Pss_Shmem, Rss...)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


def allocated(path: Path) -> int:
    """Bytes a (sparse) file really occupies."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


@dataclass
class HostMemory:
    pss: int  # sum of Pss of the processes
    ram_mapped: int  # the part of it that is pages of guest RAM files (counted in ``files``)
    files: int  # bytes of the guest RAM files resident in memory, each file counted once
    helpers: int  # Pss of helper processes (passt)
    file_count: int = 0

    @property
    def total(self) -> int:
        """Private memory of the processes + each guest RAM file once + helpers."""
        return self.pss - self.ram_mapped + self.files + self.helpers


def ram_mappings(pid: int, min_size: int = 64 << 20) -> list[tuple[tuple[int, int], str, int]]:
    """Large file mappings of ``pid`` (its guest RAM files, tmpfs or disk):
    ``((dev, inode), /proc/<pid>/map_files/<range>, Pss of their file pages)``.

    map_files reaches a file even once it is unlinked, and (dev, inode) lets clones that share
    one snapshot RAM file count it once. Pages a private (copy-on-write) mapping has written
    are anonymous and private: they stay in the process's own Pss.
    """
    out: list[tuple[tuple[int, int], str, int]] = []
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    current: dict[str, Any] | None = None
    entries: list[dict[str, Any]] = []
    for line in text.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$", line)
        if head:
            current = {"range": f"{head.group(1)}-{head.group(2)}",
                       "size": int(head.group(2), 16) - int(head.group(1), 16),
                       "path": head.group(3)}
            entries.append(current)
            continue
        m = re.match(r"^(\w+):\s+(\d+) kB", line)
        if m and current is not None:
            current[m.group(1)] = int(m.group(2)) * 1024
    for e in entries:
        if e["size"] < min_size or not str(e["path"]).startswith("/"):
            continue
        link = f"/proc/{pid}/map_files/{e['range']}"
        try:
            st = os.stat(link)
        except OSError:
            continue
        file_pss = max(0, e.get("Pss", 0) - e.get("Anonymous", 0))
        out.append(((st.st_dev, st.st_ino), link, file_pss))
    return out


def resident_bytes(path: str) -> int:
    """Bytes of a file held in memory (page cache or tmpfs), per ``fincore``."""
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                          capture_output=True, text=True)
    try:
        return int(done.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def host_memory(pids: Iterable[int], helper_pids: Iterable[int] = ()) -> HostMemory:
    pss = mapped = helpers = 0
    files: dict[tuple[int, int], str] = {}
    for pid in pids:
        pss += smaps_rollup(pid).get("Pss", 0)
        for key, link, file_pss in ram_mappings(pid):
            mapped += file_pss
            files.setdefault(key, link)
    for pid in helper_pids:
        helpers += smaps_rollup(pid).get("Pss", 0)
    return HostMemory(pss, mapped, sum(resident_bytes(p) for p in files.values()), helpers,
                      len(files))


# -- the guest image ------------------------------------------------------------------------

@dataclass
class Image:
    dir: Path
    base: Path
    kernel: Path
    initrd: Path
    cmdline: str


def project_env() -> dict[str, str]:
    """The environment for tenki subprocesses: this checkout's sources come first, whatever the
    virtualenv's editable install points at."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def ensure_image() -> Path:
    """The default home's image directory, built (or rebuilt if stale) by ``tenki image build``."""
    default_home = Path.home() / ".local" / "share" / "tenki"
    env = {k: v for k, v in project_env().items()
           if k not in (tconfig.ENV_HOME, tconfig.ENV_ENDPOINT)}
    log("checking the guest image (tenki image build; builds only when missing or stale)")
    done = subprocess.run([sys.executable, "-m", "tenkibox", "image", "build"], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tenki image build failed: {done.stderr.strip() or done.stdout}")
    image_dir = default_home / "images" / IMAGE_ID
    for name in IMAGE_FILES:
        if not (image_dir / name).is_file():
            raise RuntimeError(f"{image_dir / name} missing after tenki image build")
    return image_dir


def link_image(src_dir: Path, home: Path) -> Image:
    """Hard-link (copy across filesystems) the image files into ``home``'s image directory."""
    dst = home / "images" / IMAGE_ID
    dst.mkdir(parents=True, exist_ok=True)
    for name in IMAGE_FILES:
        try:
            os.link(src_dir / name, dst / name)
        except OSError:
            shutil.copy2(src_dir / name, dst / name)
    meta = json.loads((dst / "image.json").read_text())
    return Image(dst, dst / "base.qcow2", dst / "vmlinuz", dst / "initrd.img",
                 str(meta["boot_cmdline"]))


def make_overlay(path: Path, backing: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing),
                    str(path)], check=True, capture_output=True)


# -- the guest agent, for baselines -----------------------------------------------------------

class Agent:
    """A synchronous wrapper over ``AgentClient`` (one private event loop)."""

    def __init__(self, sock: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AgentClient(sock)

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def connect(self, timeout: float) -> None:
        self._run(self.client.connect(timeout))

    def ping(self) -> dict[str, Any]:
        return self._run(self.client.ping())  # type: ignore[no-any-return]

    def exec(self, argv: list[str], timeout: float = 600.0) -> tuple[int, bytes, bytes]:
        async def go() -> tuple[int, bytes, bytes]:
            proc = await self.client.exec(argv, timeout=timeout)
            out, err, code = bytearray(), bytearray(), -1
            async with asyncio.timeout(timeout):
                async for ev in proc.events():
                    if ev["event"] == "stdout":
                        out += ev["data"]
                    elif ev["event"] == "stderr":
                        err += ev["data"]
                    else:
                        code = int(ev["exit_code"])
            return code, bytes(out), bytes(err)

        return self._run(go())  # type: ignore[no-any-return]

    def shell(self, command: str, timeout: float = 600.0) -> str:
        code, out, err = self.exec(["/bin/sh", "-c", command], timeout)
        if code != 0:
            raise RuntimeError(f"guest command failed ({code}): {command}: "
                               f"{err.decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.client.close())
        self.loop.close()


def agent_exec_ready(sock: Path, timeout: float = 120.0) -> Agent:
    """Connect to a guest agent and run ``true``; returns the connected agent."""
    agent = Agent(sock)
    try:
        agent.connect(timeout)
        code, _, err = agent.exec(["true"], timeout)
        if code != 0:
            raise RuntimeError(f"exec true failed ({code}): {err!r}")
    except BaseException:
        agent.close()
        raise
    return agent


# -- a private tenki server -------------------------------------------------------------------

class TenkiServer:
    """``tenki serve`` on a temporary TENKI_HOME holding hard links of the image."""

    def __init__(self, cleanup: Cleanup, image_dir: Path, label: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix=f"tenki-bench-{label}-"))
        cleanup.push(f"remove {self.home}", lambda: shutil.rmtree(self.home, ignore_errors=True))
        self.run_dir = tconfig.run_dir(self.home)
        cleanup.push(f"remove {self.run_dir}",
                     lambda: shutil.rmtree(self.run_dir, ignore_errors=True))
        self.image = link_image(image_dir, self.home)
        self.log_path = self.home / "server.log"
        env = {k: v for k, v in project_env().items() if k != tconfig.ENV_ENDPOINT}
        env[tconfig.ENV_HOME] = str(self.home)
        env.update(extra_env or {})
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tenkibox", "serve", "--host", "127.0.0.1", "--port", "0"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.home)
        self.client: Client | None = None
        cleanup.push("stop the tenki server", self.stop)
        url = self._wait_announced(60.0)
        # the server's local admin key (an explicit endpoint never reads the key file)
        self.key = tconfig.layout(self.home).admin_key_file.read_text().strip()
        self.url = url
        self.client = Client(endpoint=url, api_key=self.key, autostart=False, timeout=120.0)
        log(f"tenki server pid {self.proc.pid} at {url}, home {self.home}")

    def _wait_announced(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        server_file = self.home / "server.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tenki serve exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(server_file.read_text())
                if info.get("pid") == self.proc.pid:
                    return str(info["url"])
            time.sleep(0.05)
        raise RuntimeError(f"tenki serve did not announce itself within {timeout:.0f}s")

    @property
    def sdk(self) -> Client:
        assert self.client is not None
        return self.client

    def terminate_all(self) -> None:
        """Terminate every session that is not final yet (in parallel)."""
        if self.client is None:
            return
        live = [s for s in self.sdk.list()
                if s.state.value not in ("TERMINATED", "FAILED", "TERMINATING")]
        if not live:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(live))) as pool:
            for fut in [pool.submit(s.terminate) for s in live]:
                with contextlib.suppress(Exception):
                    fut.result()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.terminate_all()
        if self.client is not None:
            self.client.close()
            self.client = None
        stop_popen(self.proc, 15.0)
        # VMs outlive a server by design: kill whatever is left of ours, by pid
        for info_file in self.run_dir.glob("*/machine.json"):
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(info_file.read_text())
                if info.get("pid") and kill_pid(int(info["pid"]), str(self.run_dir)):
                    log(f"killed leftover QEMU {info['pid']}")
                if info.get("net_pid"):
                    kill_pid(int(info["net_pid"]), "passt")
        # and the network of a session the server could not end (its recovery would have,
        # on a next start; this home is about to go)
        tag = tconfig.home_tag(self.home)
        spaces, tables = ours(tag)
        for sid in sorted(set(spaces) | set(tables)):
            log(f"removing the leftover network of {sid}")
            remove(VMNet(tag, sid, 0))  # named by owner and session: any slot will do

    def machines(self, session_ids: Iterable[str]) -> list[dict[str, Any]]:
        out = []
        for sid in session_ids:
            with contextlib.suppress(OSError, ValueError):
                info = json.loads((self.run_dir / sid / "machine.json").read_text())
                out.append(info)
        return out

    def memory(self, session_ids: Iterable[str]) -> HostMemory:
        ms = self.machines(session_ids)
        return host_memory([int(m["pid"]) for m in ms],
                           [int(m["net_pid"]) for m in ms if m.get("net_pid")])

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def wait_log(self, pattern: str, since: int, timeout: float) -> bool:
        """Wait until the server's log, after its first ``since`` bytes, has a line matching
        ``pattern`` (False if it has none within ``timeout``)."""
        pat = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                if pat.search(f.read().decode(errors="replace")):
                    return True
            time.sleep(0.05)
        return False

    def steps(self, subject: str) -> dict[str, float]:
        """Step timings the server logged for ``subject`` (``ses_x``, ``snp_x``, ...)."""
        pat = re.compile(r"^\S+ \S+ \w+ [\w.]+: (.+?): ([A-Za-z][\w -]*?) (\d+\.\d+)s$")
        out: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                m = pat.match(line)
                if m and m.group(1) == subject:
                    out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(3))
        return out


# -- plain QEMU -----------------------------------------------------------------------------

class QMP:
    """A minimal synchronous QMP client (enough for a baseline: commands, no events)."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)  # type: ignore[no-any-return]

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd}: {reply['error'].get('desc')}")

    def wait_migration(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration {status}: {info.get('error-desc')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"migration still {status} after {timeout:.0f}s")
            time.sleep(0.002)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


class PlainVM:
    """``qemu-system-x86_64`` with tenki's guest and device set, anonymous RAM, slirp network."""

    def __init__(self, cleanup: Cleanup, workdir: Path, image: Image, memory_mb: int, cpu: int,
                 name: str, *, disk: Path | None = None, incoming: bool = False) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.agent_sock = self.dir / "agent.sock"
        self.qmp_sock = self.dir / "qmp.sock"
        self.disk = disk or self.dir / "overlay.qcow2"
        if disk is None:
            make_overlay(self.disk, image.base)
        self.argv = [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-name", name,
            "-machine", "q35,accel=tcg", "-cpu", "qemu64", "-smp", str(cpu),
            "-m", f"{memory_mb}M",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"{image.cmdline} tenki.hostname=bench",
            "-drive", f"file={self.disk},if=none,id=vda0,format=qcow2",
            "-device", "virtio-blk-pci,drive=vda0,id=vda",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent0,path={self.agent_sock},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
            "-device", "virtio-rng-pci,id=rng0",
            "-netdev", "user,id=net0,restrict=off",
            "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=nic0",
        ]
        for i in range(4):  # tenki's hot-plug ports, for the same device set
            self.argv += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0"]
        self.argv += ["-serial", f"file:{self.dir / 'console.log'}",
                      "-qmp", f"unix:{self.qmp_sock},server=on,wait=off"]
        if incoming:
            self.argv += ["-incoming", "defer"]
        for stale in (self.agent_sock, self.qmp_sock):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.started = time.monotonic()
        with open(self.dir / "qemu.log", "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.dir)
        cleanup.push(f"kill QEMU {name}", self.kill)
        self._qmp: QMP | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def qmp(self) -> QMP:
        if self._qmp is None:
            self._qmp = QMP(self.qmp_sock)
        return self._qmp

    def kill(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


# -- libvirt --------------------------------------------------------------------------------

#: the baseline's Debian packages (lzop: one of libvirt's save formats)
LIBVIRT_PACKAGES = ("libvirt-daemon-system", "libvirt-clients", "lzop")


def missing_libvirt() -> list[str]:
    """The programs of libvirt the baseline runs that are not installed."""
    return [c for c in ("virsh", "libvirtd", "virtlogd") if shutil.which(c) is None]


def install_libvirt(missing: list[str]) -> None:
    """Install libvirt from Debian's packages (as root, where apt-get is), so that a fresh
    machine measures against libvirt and not the plain-QEMU fallback; RuntimeError naming what
    is missing otherwise."""
    hint = f"{', '.join(missing)} not installed (apt-get install -y {' '.join(LIBVIRT_PACKAGES)})"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(hint)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *LIBVIRT_PACKAGES]
    log(f"{hint}: installing {', '.join(LIBVIRT_PACKAGES)} with apt-get")
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # the package lists may be stale or absent on a fresh machine
        log("apt-get install failed; updating the package lists and trying again")
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    still = missing_libvirt()
    if done.returncode != 0 or still:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{hint}; apt-get install failed: {' / '.join(tail)}")
    log("libvirt installed")


class Libvirt:
    """The system libvirtd (``qemu:///system``), started under our subreaper when not running."""

    URI = "qemu:///system"

    def __init__(self, cleanup: Cleanup) -> None:
        self.reaper: subprocess.Popen[str] | None = None
        self.domains: set[str] = set()
        self.warning: str | None = None
        missing = missing_libvirt()
        if missing:
            install_libvirt(missing)
        cleanup.push("stop libvirt", self.stop)
        if self._answers():
            self.warning = ("libvirtd was already running (not under the benchmark's subreaper); "
                            "if PID 1 reaps it, every save/destroy waits ~1.7 s more")
            log(f"using the running libvirtd; {self.warning}")
            return
        log("starting virtlogd and libvirtd under a child subreaper")
        for stale in ("/run/libvirtd.pid", "/run/virtlogd.pid"):
            with contextlib.suppress(OSError):
                pid = int(Path(stale).read_text().strip())
                if not pid_alive(pid):
                    Path(stale).unlink()
        self.reaper = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "_reaper.py"), "virtlogd", "-d", "--", "libvirtd",
             "-d"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        assert self.reaper.stdout is not None
        first = self.reaper.stdout.readline().strip()
        if first != "ready":
            raise RuntimeError(f"cannot start libvirtd: {first or 'reaper exited'}")
        deadline = time.monotonic() + 30
        while not self._answers():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd does not answer on qemu:///system")
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:
            return subprocess.run(["virsh", "-c", self.URI, "version"], capture_output=True,
                                  timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def virsh(self, *args: str, timeout: float = 600.0, check: bool = True) -> str:
        done = subprocess.run(["virsh", "-q", "-c", self.URI, *args], capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def destroy(self, name: str) -> None:
        self.virsh("destroy", name, check=False, timeout=60)
        self.domains.discard(name)

    def qemu_pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        return None

    def stop(self) -> None:
        for name in list(self.domains):
            with contextlib.suppress(Exception):
                self.destroy(name)
        if self.reaper is None:
            return
        # only the daemons this benchmark started: children of our reaper
        for pidfile in ("/run/libvirtd.pid", "/run/virtlogd.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(Path(pidfile).read_text().strip())
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == self.reaper.pid:
                    os.kill(pid, signal.SIGTERM)
        try:
            self.reaper.wait(20)
        except subprocess.TimeoutExpired:
            log("libvirt daemons did not stop in 20 s; stopping the reaper")
            stop_popen(self.reaper)


def domain_xml(*, name: str, image: Image, memory_mb: int, cpu: int, disk: Path,
               agent_sock: Path, console: Path) -> str:
    """Same kernel, initrd, cmdline, q35, qemu64, TCG, disk and agent channel as a tenki VM.

    QEMU runs as root without relabelling (a static DAC label): the files live in /tmp.
    """
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>{cpu}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{image.cmdline} tenki.hostname=bench</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/{QEMU}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind' path='{agent_sock}'/>
      <target type='virtio' name='{AGENT_PORT_NAME}'/>
    </channel>
    <interface type='user'>
      <mac address='52:54:00:12:34:56'/>
      <model type='virtio'/>
    </interface>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""

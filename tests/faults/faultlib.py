"""Helpers of the fault suite (issue 9, "Reliability"): servers started with injected faults,
the settled-state invariant checked after every case, and the discovery of VM processes and
stored files without relying on more of the data directory's layout than necessary.

What little this knows of the on-disk layout lives in ``orphan_files`` (which paths must have an
owner) and ``stored_files`` (what a snapshot stored, found by time, not by place); processes are
found by the run root or home they mention. ``assert_settled`` also runs ``tenki admin verify
--json`` (expected: an object with ``ok``; skipped while the command does not exist).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from support.counter import COUNTER

from tenkibox.config import home_tag


def _load_integration() -> Any:
    """The integration suite's conftest, imported once under a fixed name (pytest imports it
    separately as ``conftest`` when tests/integration runs too; both copies share RUN_TAG)."""
    name = "tenki_integration_conftest"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


it = _load_integration()
AUTH = it.AUTH

MARKER_PATH = "/root/fault-marker.txt"
MARKER = "written before the capture\n"
SHM_PATH = "/dev/shm/fault-blob"

LIVE = frozenset({"READY", "RUNNING"})
SESSION_MOVING = frozenset({"CREATING", "TERMINATING", "PAUSING", "RESUMING"})
SNAPSHOT_MOVING = frozenset({"CREATING", "DELETING"})
SETTLE_S = 30.0

_ID = re.compile(r"\b((?:ses|snp)_[0-9a-z]{6,})")


# -- servers ----------------------------------------------------------------------------------


class FaultServer(it.TenkiServer):  # type: ignore[misc, name-defined]
    """A TenkiServer with extra environment (``TENKI_FAULT=plan.step[:after]``)."""

    def __init__(self, home: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(home)
        #: the server's own environment, kept across restarts (a fault's is added to it)
        self.base_env: dict[str, str] = dict(env or {})
        self.extra_env: dict[str, str] = dict(self.base_env)

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.pop("TENKI_FAULT", None)
        # plain creates boot here: a fault point must be reached by the test's own boot or
        # capture, never by a golden snapshot build in the background
        env["TENKI_GOLDEN"] = "off"
        env.update(self.extra_env)
        return env

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, env: dict[str, str] | None = None) -> None:
        """Stop (gracefully; VMs keep running) and start again with ``env`` added to the
        server's own."""
        if self.alive():
            self.stop()
        self.extra_env = {**self.base_env, **(env or {})}
        self.start()

    def with_fault(self, fault: str) -> None:
        self.restart({"TENKI_FAULT": fault})

    def wait_dead(self, timeout: float) -> int | None:
        """The exit status once the process ended within ``timeout`` s, else None."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def cli(self, *args: str, input: bytes | None = None,
            timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
        saved = self.extra_env
        self.extra_env = {k: v for k, v in saved.items() if k != "TENKI_FAULT"}
        try:
            return super().cli(*args, input=input, timeout=timeout)
        finally:
            self.extra_env = saved

    def cleanup(self) -> None:
        """Terminate its sessions, stop, kill whatever VM process is left (passt included),
        remove its files."""
        if self.alive():
            with contextlib.suppress(httpx.HTTPError):
                for s in list_sessions(self):
                    if s["state"] not in ("TERMINATED", "FAILED"):
                        httpx.delete(f"{self.url}/v1/sessions/{s['id']}", headers=it.AUTH,
                                     timeout=30)
        self.stop()
        for p in vm_processes(self):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        super().cleanup()

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=it.AUTH, timeout=timeout)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


def new_home(image_layout: Any, name: str, copy_images: bool = False) -> Path:
    """A data directory below the run's temp root with the built image (hard links, or real
    copies when a test corrupts files that a hard link would share with other homes)."""
    home = it.new_home(image_layout, name)
    if copy_images:
        for p in (home / "images").rglob("*"):
            if p.is_file() and p.stat().st_nlink > 1:
                tmp = p.with_name(p.name + ".copying")
                shutil.copy2(p, tmp)
                os.replace(tmp, p)
    return home


# -- REST -------------------------------------------------------------------------------------


def list_sessions(server: Any) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.url}/v1/sessions", headers=it.AUTH, timeout=30)
    r.raise_for_status()
    return list(r.json())


def spare_ids(server: Any) -> set[str]:
    """The session ids of the restores the server prepared ahead (``GET /v1/host``): paused
    VMs, with their networks, that its spare notes own while no session record names them."""
    r = httpx.get(f"{server.url}/v1/host", headers=it.AUTH, timeout=30)
    r.raise_for_status()
    return {s["session_id"] for s in r.json().get("spares", [])}


def list_snapshots(server: Any) -> list[dict[str, Any]]:
    r = httpx.get(f"{server.url}/v1/snapshots", headers=it.AUTH, timeout=30)
    r.raise_for_status()
    return list(r.json())


def get_session(server: Any, session_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/sessions/{session_id}", timeout=30, headers=it.AUTH)
    r.raise_for_status()
    return dict(r.json())


def get_snapshot(server: Any, snapshot_id: str) -> dict[str, Any] | None:
    r = httpx.get(f"{server.url}/v1/snapshots/{snapshot_id}", timeout=30, headers=it.AUTH)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return dict(r.json())


def wait_session_state(server: Any, session_id: str, states: Iterable[str],
                       timeout: float) -> dict[str, Any]:
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        rec = get_session(server, session_id)
        if rec["state"] in wanted or time.monotonic() > deadline:
            return rec
        time.sleep(0.2)


def wait_snapshot_state(server: Any, snapshot_id: str, states: Iterable[str],
                        timeout: float) -> dict[str, Any] | None:
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        rec = get_snapshot(server, snapshot_id)
        if rec is None or rec["state"] in wanted or time.monotonic() > deadline:
            return rec
        time.sleep(0.2)


# -- processes --------------------------------------------------------------------------------


@dataclass
class VmProc:
    pid: int
    kind: str  # "qemu" | "passt"
    argv: list[str]
    owner: str | None  # the session id it serves, when it can be told
    paths: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.kind} pid {self.pid} owner {self.owner}: {' '.join(self.argv)[:240]}"


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def pid_alive(pid: int) -> bool:
    return _proc_state(pid) not in ("Z", "X")


def _links(pid: int) -> list[str]:
    out = []
    for sub in ("cwd", "exe"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/{sub}"))
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def vm_processes(server: Any) -> list[VmProc]:
    """Every live QEMU and passt process of this server (found by its run root or home in the
    command line, open files, working directory or environment), with the session it serves."""
    home, run_root = str(server.home), str(server.run_root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = [a.decode(errors="replace")
                    for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if not argv or not pid_alive(pid):
            continue
        prog = os.path.basename(argv[0])
        if prog.startswith("qemu-system"):
            kind = "qemu"
        elif prog.startswith("passt") or prog.startswith("pasta"):
            kind = "passt"
        else:
            continue
        links = _links(pid)
        text = " ".join(argv)
        env = _environ(pid)
        mine = (run_root in text or any(link.startswith(run_root) for link in links)
                or env.get("TENKI_RUN_ROOT") == run_root or env.get("TENKI_HOME") == home
                or any(link.startswith(home + "/") for link in links if kind == "passt"))
        if not mine:
            continue
        owner = None
        if kind == "qemu" and "-name" in argv:
            name = argv[argv.index("-name") + 1].split(",")[0]
            m = _ID.search(name)
            owner = m.group(1) if m else name
        if owner is None:
            for link in [text, *links]:
                if run_root in link or home in link:
                    m = _ID.search(link)
                    if m:
                        owner = m.group(1)
                        break
        found.append(VmProc(pid, kind, argv, owner, links))
    return found


def run_leaks() -> list[str]:
    """QEMU and passt processes of this test run still alive (by the run's tag in their command
    line, open files or environment: passt's command line names no path)."""
    tag = it.RUN_TAG
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        prog = os.path.basename(argv[0].decode(errors="replace")) if argv else ""
        if not prog.startswith(("qemu-system", "passt", "pasta")) or not pid_alive(pid):
            continue
        text = b" ".join(argv).decode(errors="replace")
        if tag in text or any(tag in link for link in _links(pid)) \
                or any(tag in v for v in _environ(pid).values()):
            out.append(f"{pid} {text[:200]}")
    return out


def qemu_pids(server: Any, session_id: str) -> list[int]:
    return [p.pid for p in vm_processes(server) if p.kind == "qemu" and p.owner == session_id]


def passt_pids(server: Any, session_id: str) -> list[int]:
    return [p.pid for p in vm_processes(server) if p.kind == "passt" and p.owner == session_id]


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` s."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class ProcWatch:
    """Samples this server's QEMU processes in the background: which sessions ever had one."""

    def __init__(self, server: Any, interval: float = 0.05) -> None:
        self.server = server
        self.interval = interval
        self.seen: dict[int, VmProc] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                for p in vm_processes(self.server):
                    if p.kind == "qemu":
                        self.seen.setdefault(p.pid, p)
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def new_since(self, before: Iterable[int]) -> list[VmProc]:
        old = set(before)
        return [p for pid, p in self.seen.items() if pid not in old]


# -- guest networks ---------------------------------------------------------------------------


def network_tag(server: Any) -> str:
    """What names this server's namespaces and tables: its data directory's tag, as the
    server computes it from TENKI_HOME (``config.home``, ``host/network/addressing.py``)."""
    return home_tag(Path(server.home).expanduser().absolute())


def server_networks(server: Any) -> tuple[dict[str, str], dict[str, str]]:
    """This server's network namespaces (``/run/netns/tenki-<tag>-<session>``) and host
    nftables tables (``ip tenki_<tag>_<session>``), each as session id -> name."""
    tag = network_tag(server)
    spaces = {p.name.removeprefix(f"tenki-{tag}-"): p.name
              for p in Path("/run/netns").glob(f"tenki-{tag}-*")}
    tables: dict[str, str] = {}
    with contextlib.suppress(OSError):  # no nft here: no tables either
        out = subprocess.run(["nft", "list", "tables", "ip"], capture_output=True, text=True,
                             timeout=30).stdout
        for line in out.splitlines():
            name = line.split()[-1] if line.strip() else ""
            if name.startswith(f"tenki_{tag}_"):
                tables[name.removeprefix(f"tenki_{tag}_")] = name
    return spaces, tables


def _network_problems(server: Any, sessions: list[dict[str, Any]]) -> list[str]:
    live = {s["id"] for s in sessions if s["state"] in LIVE} | spare_ids(server)
    spaces, tables = server_networks(server)
    return ([f"network namespace {name} of a session that is not live (nor a spare)"
             for sid, name in sorted(spaces.items()) if sid not in live]
            + [f"nftables table {name} of a session that is not live (nor a spare)"
               for sid, name in sorted(tables.items()) if sid not in live])


def reap_networks(server: Any) -> None:
    """After a failed check: remove the namespaces and tables no live session owns."""
    live = {s["id"] for s in list_sessions(server) if s["state"] in LIVE} | spare_ids(server)
    spaces, tables = server_networks(server)
    for sid, name in spaces.items():
        if sid not in live:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
    for sid, name in tables.items():
        if sid not in live:
            subprocess.run(["nft", "delete", "table", "ip", name], capture_output=True,
                           timeout=30)


# -- stored files -----------------------------------------------------------------------------

TEMP_NAME = re.compile(r"(\.tmp$|\.tmp\.|^\.tmp|\.part$|\.partial$|\.incoming$|\.copying$)")


def _under(root: Path) -> Iterator[Path]:
    if root.exists():
        yield from (p for p in root.rglob("*"))


def _ids_in(path: Path, base: Path) -> list[str]:
    rel = str(path.relative_to(base))
    return _ID.findall(rel)


def mapped_files() -> set[str]:
    """Files mapped or named by any live QEMU (a RAM cache stays while a clone maps it)."""
    out: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"qemu-system" not in argv.split(b"\0")[0]:
                continue
            for line in Path(f"/proc/{entry}/maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.add(parts[5].removesuffix(" (deleted)"))
            out.update(re.findall(r"mem-path=([^,\s]+)", argv.decode(errors="replace")))
        except OSError:
            continue
    return out


def orphan_files(server: Any, sessions: list[dict[str, Any]],
                 snapshots: list[dict[str, Any]]) -> list[str]:
    """Files no record owns. The one place that knows the data directory's layout:

    - no temporary file (``*.tmp``, ``.tmp*``, ``*.part``...) anywhere under $TENKI_HOME or the
      run root;
    - below the run root, a path naming a session (``ses_...``) belongs to a live session (or a
      spare, ``spare_ids``), and
      nothing names a snapshot (``snp_...``: staging files of a capture) or is a conversion
      scratch directory (``cv-*``) once everything is settled;
    - below $TENKI_HOME (images excluded), a path naming a snapshot belongs to a snapshot that
      is not DELETED (or is a RAM cache still mapped by a live QEMU), and a path naming a
      session belongs to a session that is not finished.
    """
    home, run_root = Path(server.home), Path(server.run_root)
    spares = spare_ids(server)  # a spare has a VM's files under its future session id
    live_sessions = {s["id"] for s in sessions if s["state"] in LIVE} | spares
    open_sessions = {s["id"] for s in sessions
                     if s["state"] not in ("TERMINATED", "FAILED")} | spares
    kept_snapshots = {s["id"] for s in snapshots if s["state"] != "DELETED"}
    mapped = mapped_files()
    problems: list[str] = []
    for root in (home, run_root):
        for p in _under(root):
            if TEMP_NAME.search(p.name):
                problems.append(f"temporary file left: {p}")
    for p in _under(run_root):
        for ident in _ids_in(p, run_root):
            if ident.startswith("ses_") and ident not in live_sessions:
                problems.append(f"run file of a session that is not live: {p}")
                break
            if ident.startswith("snp_"):
                problems.append(f"capture staging file left: {p}")
                break
        else:
            if any(part.startswith("cv-") for part in p.relative_to(run_root).parts):
                problems.append(f"conversion scratch left: {p}")
    for p in _under(home):
        rel = p.relative_to(home)
        if rel.parts and rel.parts[0] == "images":
            continue
        ids = _ids_in(p, home)
        owners = [i for i in ids if i.startswith("ses_")]
        if owners:  # a session's file (its disks may be named after its captures)
            if owners[0] not in open_sessions:
                problems.append(f"file of a finished session {owners[0]}: {p}")
            continue
        for ident in ids:
            if ident not in kept_snapshots and str(p) not in mapped \
                    and not (p.is_dir() and any(str(m).startswith(f"{p}/") for m in mapped)):
                problems.append(f"file of a DELETED or unknown snapshot {ident}: {p}")
                break
    # a parent directory and its files say the same thing: keep the shortest paths
    problems.sort(key=len)
    kept: list[str] = []
    for prob in problems:
        path = prob.rsplit(": ", 1)[-1]
        if not any(path.startswith(k.rsplit(": ", 1)[-1] + "/") for k in kept):
            kept.append(prob)
    return kept


def stored_files(server: Any, since: float, until: float) -> list[Path]:
    """Regular files of the data directory that entered it between ``since`` and ``until``
    (by ctime: a hard link or a chmod moves it, a copy or write too), outside the image home,
    the server's own top-level files (database, log, lock) and anything a session owns (a path
    naming ``ses_...``: disks and notes of one VM). Hard links are listed once (store path
    preferred over another name)."""
    home = Path(server.home)
    seen: dict[tuple[int, int], Path] = {}
    for p in sorted(home.rglob("*")):
        rel = p.relative_to(home)
        if len(rel.parts) < 2 or rel.parts[0] == "images" or (_ID.search(str(rel)) and \
                any(x.startswith("ses_") for x in _ID.findall(str(rel)))):
            continue
        if not p.is_file() or p.is_symlink():
            continue
        st = p.stat()
        if since <= max(st.st_mtime, st.st_ctime) <= until:
            seen.setdefault((st.st_dev, st.st_ino), p)
    return sorted(seen.values())


def link_names(path: Path, root: Path) -> set[str]:
    """The names of every hard link of ``path`` under ``root``."""
    st = path.stat()
    names = {path.name}
    if st.st_nlink > 1:
        for p in root.rglob("*"):
            with contextlib.suppress(OSError):
                q = p.stat()
                if q.st_ino == st.st_ino and q.st_dev == st.st_dev:
                    names.add(p.name)
    return names


def derived(path: Path) -> bool:
    """A cache or record derived from other files (a digest record, a hidden file): damage to it
    may be refused or repaired, but must not harm a restore."""
    return any(part.startswith(".") for part in path.parts[-3:]) or path.suffix in (
        ".sha256", ".meta")


def names_file(message: str, path: Path, root: Path | None = None) -> bool:
    """The message names the file: by one of its names (hard links under ``root`` too), or,
    for an artifact named by its digest, by the digest's first 12 characters."""
    names = link_names(path, root) if root is not None else {path.name}
    for name in names:
        if name in message:
            return True
        if re.fullmatch(r"[0-9a-f]{64}", name) and name[:12] in message:
            return True
    return False


def parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def flip_byte(path: Path, offset: int | None = None, keep_mtime: bool = False) -> tuple[int, int]:
    """XOR one byte (default: the middle one) in place; returns (offset, original byte)."""
    st = path.stat()
    size = st.st_size
    assert size > 0, f"{path} is empty"
    off = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(off)
        old = f.read(1)[0]
        f.seek(off)
        f.write(bytes([old ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return off, old


def put_byte(path: Path, offset: int, value: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))
        f.flush()
        os.fsync(f.fileno())
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- the settled-state invariant --------------------------------------------------------------


_NO_ADMIN_VERIFY: list[bool] = []


def admin_verify(server: Any) -> dict[str, Any] | None:
    """``tenki admin verify --json`` when the server has it (None when the command is absent).
    Assumed answer: a JSON object with ``ok`` (bool) and ``problems`` (a list)."""
    if _NO_ADMIN_VERIFY:
        return None
    proc = server.cli("admin", "verify", "--json", timeout=300)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 and "no such command" in err.lower():
        _NO_ADMIN_VERIFY.append(True)
        return None
    try:
        out = json.loads(proc.stdout or b"null")
    except ValueError:
        raise AssertionError(f"tenki admin verify --json printed no JSON (exit "
                             f"{proc.returncode}): {proc.stdout[:500]!r} {err[:500]}") from None
    assert isinstance(out, dict), out
    return out


def _wait_steady(server: Any, timeout: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while True:
        sessions, snapshots = list_sessions(server), list_snapshots(server)
        moving = [f"session {s['id']} {s['state']}" for s in sessions
                  if s["state"] in SESSION_MOVING]
        moving += [f"snapshot {s['id']} {s['state']}" for s in snapshots
                   if s["state"] in SNAPSHOT_MOVING]
        if not moving:
            return sessions, snapshots
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout:.0f}s: {moving}")
        time.sleep(0.3)


def _process_problems(server: Any, sessions: list[dict[str, Any]]) -> list[str]:
    live = {s["id"] for s in sessions if s["state"] in LIVE}
    owned = live | spare_ids(server)
    procs = vm_processes(server)
    problems = [f"no live record for {p.line()}" for p in procs
                if p.owner not in owned]
    for sid in sorted(live):
        q = [p for p in procs if p.kind == "qemu" and p.owner == sid]
        if len(q) != 1:
            problems.append(f"session {sid} is live but has {len(q)} QEMU processes")
    for sid in sorted(owned - live):
        q = [p for p in procs if p.kind == "qemu" and p.owner == sid]
        if len(q) > 1:
            problems.append(f"spare {sid} has {len(q)} QEMU processes")
    return problems


def assert_settled(server: Any, *, restore: bool = True, timeout: float = SETTLE_S,
                   restore_timeout: float = 120.0) -> None:
    """The invariant after every fault case:

    (a) every QEMU/passt process of this server serves a live (READY/RUNNING) session or a
        spare the server lists (``spare_ids``), and every live session has its one QEMU; every
        network namespace and host nftables table of this server (named by its tag) belongs to
        one of them;
    (b) every record is in a steady state within ``timeout`` s;
    (c) every READY snapshot is restorable with its data (the marker file) intact;
    (d) no file without an owner (``orphan_files``; and ``tenki admin verify`` when present).
    """
    assert server.alive(), f"the server is not running: {server.log_tail()}"
    sessions, snapshots = _wait_steady(server, timeout)
    deadline = time.monotonic() + 10
    while (problems := _process_problems(server, sessions)) and time.monotonic() < deadline:
        time.sleep(0.3)
        sessions = list_sessions(server)
    if problems:
        reap(server)
    assert not problems, f"processes without a record / records without a VM: {problems}"
    # a network goes after its VM's processes: the same short grace
    deadline = time.monotonic() + 10
    while (nets := _network_problems(server, sessions)) and time.monotonic() < deadline:
        time.sleep(0.3)
        sessions = list_sessions(server)
    if nets:
        reap_networks(server)
    assert not nets, f"guest networks without a live session: {nets}"
    if restore:
        for snap in snapshots:
            if snap["state"] != "READY":
                continue
            if snap.get("type") == "PAUSE":  # restorable only as its own session's resume
                check_resumable(server, snap["session_id"], timeout=restore_timeout)
            else:
                check_restorable(server, snap["id"], timeout=restore_timeout)
        sessions, snapshots = _wait_steady(server, timeout)
        problems = _process_problems(server, sessions)
        assert not problems, f"after the restore checks: {problems}"
        nets = _network_problems(server, sessions)
        if nets:
            reap_networks(server)
        assert not nets, f"after the restore checks: {nets}"
    # files awaiting the garbage collector are not leaks: they must go within the same bound
    deadline = time.monotonic() + timeout
    while True:
        orphans = orphan_files(server, sessions, snapshots)
        verdict = admin_verify(server)
        bad = verdict is not None and (verdict.get("ok") is not True or verdict.get("problems"))
        if (not orphans and not bad) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
        sessions, snapshots = list_sessions(server), list_snapshots(server)
    if orphans:
        reap(server, [o.rsplit(": ", 1)[-1] for o in orphans])
    assert not orphans, f"files without an owner after {timeout:.0f}s: {orphans}"
    assert not bad, f"tenki admin verify after {timeout:.0f}s: {json.dumps(verdict)[:2000]}"


def reap(server: Any, paths: Iterable[str] = ()) -> None:
    """After a failed check: kill the VM processes no live record owns and remove the given
    files, so that the next case is judged on its own leftovers, not on this one's."""
    live = {s["id"] for s in list_sessions(server) if s["state"] in LIVE} | spare_ids(server)
    for p in vm_processes(server):
        if p.owner not in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    for path in paths:
        target = Path(path)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                target.unlink()


def check_resumable(server: Any, session_id: str, timeout: float = 120.0) -> None:
    """Resume the PAUSED ``session_id`` and read the marker file back (it stays running)."""
    with server.http() as api:
        r = api.post(f"/v1/sessions/{session_id}/resume")
        assert r.status_code in (200, 202), f"resume of {session_id} refused: {r.text}"
        rec = wait_session_state(server, session_id, LIVE | {"FAILED", "TERMINATED"}, timeout)
        assert rec["state"] in LIVE, \
            f"PAUSED {session_id} did not resume: {rec['state']} {rec['state_reason']}"
        got = api.get(f"/v1/sessions/{session_id}/files", params={"path": MARKER_PATH})
        assert got.status_code == 200 and got.content == MARKER.encode(), \
            f"resumed {session_id}: marker {got.status_code} {got.content[:200]!r}"


def check_restorable(server: Any, snapshot_id: str, timeout: float = 120.0) -> None:
    """Restore ``snapshot_id``, read the marker file back, terminate the copy."""
    with server.http() as api:
        r = api.post("/v1/sessions", json={"snapshot_id": snapshot_id, "name": "settle-check"})
        assert r.status_code == 201, f"restore of READY {snapshot_id} refused: {r.text}"
        sid = r.json()["id"]
        try:
            rec = wait_session_state(server, sid, LIVE | {"FAILED", "TERMINATED"}, timeout)
            assert rec["state"] in LIVE, \
                f"READY snapshot {snapshot_id} did not restore: {rec['state']} " \
                f"{rec['state_reason']}"
            got = api.get(f"/v1/sessions/{sid}/files", params={"path": MARKER_PATH})
            assert got.status_code == 200 and got.content == MARKER.encode(), \
                f"restored {snapshot_id}: marker {got.status_code} {got.content[:200]!r}"
        finally:
            api.delete(f"/v1/sessions/{sid}")


# -- guests -----------------------------------------------------------------------------------


def sh(session: Any, cmd: str, timeout: float = 60) -> str:
    return str(session.shell(cmd, timeout=timeout).check().stdout).strip()


def prepare(session: Any, counter: bool = True, shm_mib: int = 0) -> None:
    """The marker file every snapshot of this suite carries, a counting process, and
    optionally a random blob in /dev/shm with its checksum on disk."""
    session.files.write(MARKER_PATH, MARKER)
    if counter:
        sh(session, COUNTER)
    if shm_mib:
        sh(session, f"head -c {shm_mib}M /dev/urandom > {SHM_PATH} && "
                    f"md5sum {SHM_PATH} > /root/shm.md5")
    sh(session, "sync")


def new_source(client: Any, name: str, memory_mb: int = 512, cpu: int = 1,
               shm_mib: int = 0, timeout: float = 300) -> Any:
    s = client.create_and_wait(name=name, memory_mb=memory_mb, cpu=cpu, timeout=timeout)
    prepare(s, shm_mib=shm_mib)
    return s


def counting(session: Any, wait: float = 1.2) -> bool:
    """The guest is not paused: its counter moves on."""
    first = int(sh(session, "cat /tmp/count"))
    time.sleep(wait)
    return int(sh(session, "cat /tmp/count")) > first


def guest_clock_skew(session: Any) -> float:
    return abs(float(sh(session, "date +%s.%N")) - time.time())

"""One QEMU process, driven over QMP: launch, attach after a server restart, pause, quit.

The device set is a pure function of ``MachineConfig``: a restore must present exactly the
devices the captured VM had (machine, cpu model, RAM size and backend, every PCI device and
hot-plug port), while files and sockets may live elsewhere. A booted VM's RAM is anonymous
memory, or a memfd mapped shared (under TCG, to be captured by the pages it touched), and a
restored VM's a private mapping of its snapshot's RAM image (``MachineConfig``); its size under
TCG is padded (``TCG_RAM_PAD``) so that a live save of it is correct.

QEMU runs in its own session (setsid) with its output in a log file, so it outlives the server;
``Machine.attach`` finds it again by pid and QMP socket. Every process started for a VM carries
a token on its command line, a path in the VM's run directory (QEMU's ``-qmp`` socket, passt's
``--pid`` file): ``vm_process_owner`` tells a process of ours, and which VM it serves, from its
command line alone, so that a pid the kernel has given to another process is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from ..errors import InternalError, ValidationError
from . import kernelstub, net, writetrack

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QMP_SOCKET = "qmp.sock"
#: how long a SIGKILLed VM process may take to be gone (it frees its guest RAM first)
KILL_WAIT_S = 5.0
HOTPLUG_PORTS = 4
AGENT_PORT_NAME = "org.tenki.agent"


# query-migrate states of a migration still in progress
ORPHAN_MIGRATION = ("setup", "active", "pre-switchover", "device")


class RunState(str, Enum):
    NEW = "new"
    LAUNCHING = "launching"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


class MachineError(InternalError):
    """QEMU failed; carries the command line and the tail of QEMU's log."""

    def __init__(self, message: str, *, argv: list[str] | None = None, log_tail: str = "") -> None:
        text = message
        if log_tail:
            text += f": {log_tail.strip()}"
        super().__init__(text)
        self.argv = argv or []
        self.log_tail = log_tail


@dataclass(frozen=True)
class MachineConfig:
    """What determines the guest's device set (identical at capture and restore)."""

    cpu: int
    memory_mb: int
    accel: str
    kernel: str
    initrd: str
    cmdline: str
    hotplug_ports: int = HOTPLUG_PORTS
    #: QEMU's ``-cpu`` model; empty: the accelerator's default (``default_cpu_model``)
    cpu_model: str = ""
    #: bytes of guest RAM beyond ``memory_mb`` (``ram_pad``): 0, or ``TCG_RAM_PAD``
    ram_pad: int = 0
    # A restored VM maps its snapshot's RAM image privately (copy-on-write), so that clones of
    # one snapshot share its pages on the host. None: fresh RAM of its own, anonymous memory
    # (a capture reads all of RAM, which allocates every hole of a tmpfs file but maps the zero
    # page for anonymous memory) or a memfd (``ram_shared``), or with ``ram_file`` a shared file
    # at that path that the host takes as it is (the scratch VM of a conversion).
    ram_base: str | None = None
    ram_file: str | None = None
    # A booted VM's RAM in a memfd QEMU maps shared, instead of anonymous memory: its pages are
    # then those of a file, which the host finds (``SEEK_DATA``) and reads with the guest
    # stopped, and which a save with ``x-ignore-shared`` leaves out, so that a capture costs
    # no migration of RAM (``host/written.py``). A live save of it would allocate every page
    # of the memfd it reads: such a VM is never saved live.
    ram_shared: bool = False

    @property
    def ram_bytes(self) -> int:
        """The guest RAM's size in bytes: what QEMU maps for it."""
        return self.memory_mb * 2**20 + self.ram_pad

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineConfig:
        return cls(**data)


@dataclass
class MachineFiles:
    """Per-VM volatile files, on tmpfs. Socket paths must stay under 108 bytes."""

    run_dir: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / QMP_SOCKET

    @property
    def agent(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def ram(self) -> Path:
        return self.run_dir / "ram"

    @property
    def rom_state(self) -> Path:
        """A booted VM's ROMs and firmware as its reset made them (``host/boot.py``)."""
        return self.run_dir / "rom-state.bin"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def info(self) -> Path:
        return self.run_dir / "machine.json"

    @property
    def kernel_stub(self) -> Path:
        """The kernel an incoming VM is launched with (``engine/kernelstub.py``)."""
        return self.run_dir / "kernel-stub"


@dataclass
class LaunchOptions:
    disk_chain: list[Path]  # base first, writable top last
    incoming: bool = False  # start paused, waiting for migrate-incoming
    paused: bool = False  # start with the vCPUs stopped (``-S``), the machine reset
    network: str | None = None  # engine.net mode; None: the default
    netns: str | None = None  # a network namespace with the VM's tap device (host/network)
    tap_fd: int | None = None  # open on that tap device (the caller's: QEMU gets a copy)
    mac: str = "52:54:00:12:34:56"
    extra_devices: list[str] = field(default_factory=list)
    #: how TCG runs the vCPUs (``tcg_threads``): ``multi``, ``single``, or None for QEMU's
    #: default; not part of the device set (a snapshot restores under either)
    tcg_threads: str | None = None
    #: the write-tracking library (``engine/writetrack.py``) for the QEMU of a VM whose RAM is
    #: a file (a restored VM's RAM cache, a booted one's memfd); None: untracked
    track_writes: Path | None = None


def blockdev_args(chain: list[Path]) -> tuple[list[str], str]:
    """-blockdev arguments for a qcow2 chain; returns them and the top node name.

    Every link is spelled out so that QEMU never guesses a backing file from an image header.
    """
    args: list[str] = []
    backing: str | None = None
    for i, path in enumerate(chain):
        top = i == len(chain) - 1
        fnode, dnode = f"f{i}", ("top" if top else f"d{i}")
        args += ["-blockdev", json.dumps({"driver": "file", "filename": str(path),
                                          "node-name": fnode, "read-only": not top})]
        fmt: dict[str, Any] = {"driver": "qcow2", "file": fnode, "node-name": dnode,
                               "read-only": not top, "backing": backing}
        args += ["-blockdev", json.dumps(fmt)]
        backing = dnode
    assert backing is not None
    return args, backing


def _memory_backend(cfg: MachineConfig, files: MachineFiles, size: str) -> str:
    if cfg.ram_base:
        return f"memory-backend-file,id=mem0,size={size},mem-path={cfg.ram_base},share=off"
    if cfg.ram_file:
        return f"memory-backend-file,id=mem0,size={size},mem-path={cfg.ram_file},share=on"
    if cfg.ram_shared:
        return f"memory-backend-memfd,id=mem0,size={size},share=on"
    return f"memory-backend-ram,id=mem0,size={size}"


#: Extra guest RAM that makes a live save correct under TCG. QEMU 7.2 syncs the migration dirty
#: bitmap of a RAM block whose length is a multiple of 64 pages word by word, and that fast path
#: clears the dirty bits without re-arming TCG's TLB: a vCPU that keeps a page in its TLB (the
#: kernel's own pages: timers, stacks, per-CPU data) writes it on without marking it dirty again,
#: so the last pass misses those writes and the snapshot's guest crashes (hrtimer corruption,
#: RCU stalls). Later QEMU re-arms the TLB there. A block of any other length takes the per-page
#: path, which does re-arm it: 8 KiB more than the configured memory (QEMU sizes RAM in 8 KiB
#: steps). Measured: 176 of 262144 pages wrong in a 1 GiB live save without it, none with it.
TCG_RAM_PAD = 8192


def ram_pad(accel: str) -> int:
    """The ``ram_pad`` of a new VM under ``accel`` (KVM tracks dirty pages itself: none)."""
    return 0 if accel == "kvm" else TCG_RAM_PAD


def live_save_safe(cfg: MachineConfig) -> bool:
    """Whether QEMU's dirty tracking of this VM's RAM holds during a live save (see
    ``TCG_RAM_PAD``): under KVM always; under TCG only with a padded RAM block (VMs booted or
    restored from snapshots taken before the pad have none: they are saved stopped)."""
    if cfg.ram_shared:  # every page read would be allocated (``MachineConfig.ram_shared``)
        return False
    return cfg.accel == "kvm" or cfg.ram_pad % (64 * 4096) != 0


#: ``TENKI_CPU_MODEL``: QEMU's name of a CPU model, with flags (``Haswell-v4``,
#: ``EPYC,-svm``): letters, digits and ``_.+-=,`` only (it is one argument of QEMU's)
_CPU_MODEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-=,")


TCG_THREADS = ("multi", "single")


def tcg_threads(vcpus: int, placed_vcpus: int, cores: int | None = None) -> str:
    """How TCG runs a new VM's ``vcpus``, given the vCPUs of the host's other VMs: ``multi`` (a
    host thread per vCPU, QEMU's default) while every vCPU, this VM's included, can have a core
    of its own; ``single`` (one thread runs the VM's vCPUs in turn) beyond. With more vCPU
    threads than cores, a guest's vCPU spins in a kernel lock that its other vCPU holds while
    that vCPU's thread waits for a core: ten 2-vCPU clones restored at once on 2 cores were
    ready 14% sooner on 17% less CPU single (medians of 3; docs/snapshots.md). A VM keeps its
    mode for its life. ``TENKI_TCG_THREADS=multi|single`` chooses one for every VM.
    ``placed_vcpus``: the vCPUs of the VMs that compete for the cores (the host counts those
    busy or being started; ``LocalHost._tcg_threads``)."""
    forced = os.environ.get("TENKI_TCG_THREADS", "").strip().lower()
    if forced in TCG_THREADS:
        return forced
    if forced not in ("", "auto"):
        raise ValidationError(f"TENKI_TCG_THREADS {forced!r}: auto, multi or single",
                              field="TENKI_TCG_THREADS")
    cores = cores or len(os.sched_getaffinity(0))
    return "single" if vcpus > 1 and placed_vcpus + vcpus > cores else "multi"


def default_cpu_model(accel: str) -> str:
    """The guest CPU of a new VM here: ``TENKI_CPU_MODEL``, else QEMU's ``qemu64`` under TCG
    and the host's own under KVM. A memory snapshot restores only with the model it was
    captured with (its shape records it): hosts that restore each other's snapshots under KVM
    name one model they all have."""
    model = os.environ.get("TENKI_CPU_MODEL", "").strip()
    if model:
        if not set(model) <= _CPU_MODEL_CHARS or model.startswith((",", "-")):
            raise ValidationError(f"TENKI_CPU_MODEL {model!r}: a QEMU CPU model name, with "
                                  "flags after commas (letters, digits and _.+-=, only)",
                                  field="TENKI_CPU_MODEL")
        return model
    return "host" if accel == "kvm" else "qemu64"


def build_argv(cfg: MachineConfig, files: MachineFiles, opts: LaunchOptions,
               netdev: str = "user,id=net0", kernel_stub: Path | None = None) -> list[str]:
    """QEMU's command line. ``kernel_stub``: launch with it instead of the kernel and the
    initrd (an incoming VM: ``engine/kernelstub.py``)."""
    # QEMU takes the size in KiB when it is not whole MiB (the machine's and the backend's must
    # be equal)
    mem = f"{cfg.memory_mb * 1024 + cfg.ram_pad // 1024}K" if cfg.ram_pad else f"{cfg.memory_mb}M"
    accel = "kvm" if cfg.accel == "kvm" else "tcg"
    cpu = cfg.cpu_model or default_cpu_model(accel)
    argv = [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none",
        "-name", files.run_dir.name,
        "-machine", "q35,memory-backend=mem0",
        "-accel", accel if accel == "kvm" or not opts.tcg_threads
        else f"tcg,thread={opts.tcg_threads}",
        "-cpu", cpu, "-smp", str(cfg.cpu), "-m", mem,
        "-object", _memory_backend(cfg, files, mem),
    ]
    argv += (["-kernel", str(kernel_stub)] if kernel_stub is not None
             else ["-kernel", cfg.kernel, "-initrd", cfg.initrd])
    argv += ["-append", cfg.cmdline]
    disk_args, top = blockdev_args(opts.disk_chain)
    argv += disk_args
    argv += ["-device", f"virtio-blk-pci,drive={top},id=vda"]
    argv += [
        # no ioeventfds for the agent's port device: it has 64 queues (31 ports by default),
        # and QEMU sets up an eventfd and a memory listener update for each when the VM starts
        # and again when a device state loads: a restore's load-state took 33-37 ms with them,
        # 17-18 ms without, its agent step 66-75 ms and 55-59 ms, and 4 MB of a command's
        # output came 329 ms against 359 ms (A/B in one server, 10-14 clones each, 1 GiB). A
        # guest's notify is then handled on its vCPU's thread. It is no device state: snapshots
        # taken with either restore with the other.
        "-device", "virtio-serial-pci,id=vser0,ioeventfd=off",
        "-chardev", f"socket,id=agent0,path={files.agent},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
        "-device", "virtio-rng-pci,id=rng0",
        "-netdev", netdev,
        "-device", f"virtio-net-pci,netdev=net0,mac={opts.mac},id=nic0",
    ]
    for i in range(cfg.hotplug_ports):
        argv += ["-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0"]
    argv += opts.extra_devices
    argv += [
        "-serial", f"file:{files.console}",
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
    ]
    if opts.incoming:
        argv += ["-incoming", "defer"]
    elif opts.paused:
        argv += ["-S"]
    return argv


def is_system_disk(dev: dict[str, Any]) -> bool:
    qdev = str(dev.get("qdev", ""))
    return qdev.endswith("/vda") or "/vda/" in qdev or dev.get("device") == "vda"


PROC = Path("/proc")


def _stat_fields(pid: int, proc: Path = PROC) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (the state first); [] when
    the process is gone. The name is cut at its last ")": it may hold spaces and parentheses."""
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def pid_alive(pid: int | None, proc: Path = PROC) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    if not pid:
        return False
    fields = _stat_fields(pid, proc)
    return bool(fields) and fields[0] not in ("Z", "X")


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """When ``pid`` started (clock ticks after boot): with the pid, it names one process for
    good, where a pid alone may be given to a new process once the old one is reaped."""
    try:
        return int(_stat_fields(pid, proc)[19])
    except (IndexError, ValueError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, proc: Path = PROC) -> float | None:
    """The CPU time ``pid`` used so far (user and system, all its threads); None when gone."""
    fields = _stat_fields(pid, proc)
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return None


def read_argv(pid: int, proc: Path = PROC) -> list[str]:
    """The command line of ``pid`` ([] when it is gone or has none, as a kernel thread)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def vm_process_owner(argv: Sequence[str], run_root: Path) -> str | None:
    """The VM (its run directory's name: the session id) that a process serves, when its
    command line is one this module starts under ``run_root``: QEMU with its ``-qmp`` socket
    there, or passt with its ``--pid`` file there. Any other program, whatever its arguments
    mention, is not ours (None)."""
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program.startswith("qemu-system-"):
        value, prefix, name = _option(argv, "-qmp"), "unix:", QMP_SOCKET
    elif program in net.PASST_PROGRAMS:
        value, prefix, name = _option(argv, "--pid"), "", net.PASST_PID
    else:
        return None
    root = f"{prefix}{run_root}/"
    if value is None or not value.startswith(root):
        return None
    owner, _, rest = value[len(root):].partition("/")
    # QEMU's option goes on with ",server=on,..."
    if not owner or owner in (".", "..") or rest.split(",", 1)[0] != name:
        return None
    return owner


#: in one vCPU's block of HMP ``info registers -a``: the instruction pointer (``EIP`` before
#: the guest is in long mode), the privilege level and whether the vCPU is halted
_VCPU_RE = re.compile(r"\b[RE]IP=([0-9a-f]+)\b.*?\bCPL=(\d)\b.*?\bHLT=(\d)\b", re.S)


def describe_vcpus(status: str, registers: str) -> str:
    """One line on where a guest is, from QEMU's run state and HMP ``info registers -a``: for a
    guest whose agent never answered, whose console (``quiet``) may say nothing."""
    parts = []
    for block in registers.split("CPU#")[1:]:
        m = _VCPU_RE.search(block)
        if m is None:
            continue
        n = block.split(None, 1)[0]
        ip, cpl, hlt = m.groups()
        where = ("the guest kernel" if int(ip, 16) >= 1 << 63 else
                 "user space" if cpl == "3" else "firmware or early boot")
        parts.append(f"vCPU {n} in {where} at {ip}{', halted' if hlt == '1' else ''}")
    return f"QEMU {status}" + (f"; {'; '.join(parts)}" if parts else "")


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


class Machine:
    """A QEMU VM. ``launch`` or ``attach``, then ``qmp()``; ``kill`` always cleans up."""

    def __init__(self, name: str, files: MachineFiles, cfg: MachineConfig) -> None:
        self.name = name
        self.files = files
        self.cfg = cfg
        self.pid: int | None = None
        self.argv: list[str] = []
        self.state = RunState.NEW
        self._proc: subprocess.Popen[bytes] | None = None
        self._net_proc: subprocess.Popen[bytes] | None = None
        self.net_pid: int | None = None
        self._qmp: QMPClient | None = None
        self._lock = asyncio.Lock()
        #: pid -> start time of a process found again by pid and known ours by its token
        self._known: dict[int, int] = {}

    # -- launch and attach ------------------------------------------------------------------
    async def launch(self, opts: LaunchOptions, *, timeout: float = 20.0) -> None:
        self.files.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.files.qmp, self.files.agent):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self.state = RunState.LAUNCHING
        backend = net.start(self.files.run_dir, opts.network, opts.netns, opts.tap_fd)
        self.net_pid = backend.helper.pid if backend.helper else None
        # an incoming VM never boots its kernel: the stub spares QEMU reading it (~20 ms) and
        # keeping it (~14 MiB)
        stub = (self.files.kernel_stub if opts.incoming
                and kernelstub.write_stub(Path(self.cfg.kernel), self.files.kernel_stub) else None)
        self.argv = [*backend.prefix,
                     *build_argv(self.cfg, self.files, opts, backend.netdev, stub)]
        # on disk before QEMU starts: a server killed right here leaves a helper that a
        # restarted one can still find and stop
        self._write_info()
        log.debug("%s: %s", self.name, shlex.join(self.argv))
        env = None
        if opts.track_writes is not None and (self.cfg.ram_base or self.cfg.ram_shared):
            env = {**os.environ, **writetrack.launch_env(opts.track_writes, self.cfg.ram_bytes)}
        with open(self.files.qemu_log, "ab") as out:
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd=self.files.run_dir, pass_fds=backend.pass_fds,
                    env=env,
                )
            except OSError as exc:
                self.state = RunState.FAILED
                if backend.helper is not None:
                    backend.helper.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        backend.helper.wait(KILL_WAIT_S)
                raise MachineError(f"cannot start {QEMU}: {exc}", argv=self.argv) from exc
            finally:
                backend.after_launch()
        self._net_proc = backend.helper
        self.pid = self._proc.pid
        self._write_info()
        deadline = time.monotonic() + timeout
        while not self.files.qmp.exists():
            if self._proc.poll() is not None:
                self.state = RunState.FAILED
                raise MachineError(
                    f"QEMU exited with status {self._proc.returncode} before QMP came up",
                    argv=self.argv, log_tail=_tail(self.files.qemu_log),
                )
            if time.monotonic() > deadline:
                await self.kill()
                raise MachineError("QEMU did not open its QMP socket in time", argv=self.argv,
                                   log_tail=_tail(self.files.qemu_log))
            # a restore waits for this (QEMU is up in ~40 ms): a coarser look costs it half
            # the interval on average, a stat this often costs nothing
            await asyncio.sleep(0.002)
        await self._connect_qmp(deadline)
        self.state = RunState.PAUSED if opts.incoming or opts.paused else RunState.RUNNING

    async def attach(self) -> None:
        """Find a QEMU started by an earlier server process and reconnect to its QMP."""
        try:
            info = json.loads(self.files.info.read_text())
        except (OSError, ValueError) as exc:
            raise MachineError(f"no machine record in {self.files.run_dir}") from exc
        self.pid = int(info["pid"])
        self.net_pid = info.get("net_pid")
        self.argv = list(info.get("argv", []))
        if not self.alive():
            self.state = RunState.STOPPED
            raise MachineError(f"QEMU (pid {self.pid}) is gone",
                               log_tail=_tail(self.files.qemu_log))
        await self._connect_qmp(time.monotonic() + 5.0)
        await self._cancel_orphan_migration()
        status = await self.execute("query-status")
        self.state = RunState.RUNNING if status.get("running") else RunState.PAUSED

    async def _cancel_orphan_migration(self) -> None:
        """A capture cut short by a dead server left its migration behind: nobody reads its
        stream any more, and a live save would hold the guest stopped at its switchover for
        ever. Cancelling starts the guest again if the migration had stopped it."""
        info = await self.execute("query-migrate")
        if info.get("status") not in ORPHAN_MIGRATION:
            return
        await self.execute("migrate_cancel")
        deadline = time.monotonic() + 10.0
        while (await self.execute("query-migrate")).get("status") in (*ORPHAN_MIGRATION,
                                                                       "cancelling"):
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: a migration left by a capture cut short "
                                   "does not end", log_tail=_tail(self.files.qemu_log))
            await asyncio.sleep(0.02)

    async def _connect_qmp(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            qmp = QMPClient(self.name)
            try:
                await qmp.connect(str(self.files.qmp))
                self._qmp = qmp
                return
            except (QMPError, OSError) as exc:
                last = exc
                await asyncio.sleep(0.02)
        raise MachineError(f"cannot connect to QMP: {last}", argv=self.argv,
                           log_tail=_tail(self.files.qemu_log))

    def _write_info(self) -> None:
        tmp = self.files.info.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "net_pid": self.net_pid, "argv": self.argv,
                                   "config": self.cfg.to_json()}))
        os.replace(tmp, self.files.info)

    # -- QMP --------------------------------------------------------------------------------
    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                      fd: int | None = None) -> Any:
        """``cmd`` over QMP; with ``fd``, a duplicate of that descriptor goes with it (the
        caller still owns and closes its own)."""
        if self._qmp is None:
            raise MachineError(f"{self.name}: not connected to QEMU")
        try:
            async with self._lock:  # a descriptor belongs to the very next command
                if fd is not None:
                    self._qmp.send_fd_scm(fd)
                return await self._qmp.execute(cmd, args)
        except QMPError as exc:
            raise MachineError(f"QMP {cmd} failed: {exc}",
                               log_tail="" if self.alive() else _tail(self.files.qemu_log)) from exc
        except (OSError, EOFError) as exc:
            raise MachineError(f"QMP {cmd}: connection to QEMU lost ({exc})",
                               log_tail=_tail(self.files.qemu_log)) from exc

    async def vcpu_report(self, timeout: float = 5.0) -> str:
        """``describe_vcpus`` of this VM now; "" when QEMU cannot tell (a diagnosis only)."""
        try:
            status = await asyncio.wait_for(self.execute("query-status"), timeout)
            regs = await asyncio.wait_for(self.execute(
                "human-monitor-command", {"command-line": "info registers -a"}), timeout)
        except (MachineError, TimeoutError):
            return ""
        return describe_vcpus(str(status.get("status", "unknown")), str(regs))

    async def send_fd(self, name: str, fd: int) -> None:
        """Give QEMU a duplicate of ``fd`` under ``name`` (QMP ``getfd``; a later one of the
        same name replaces it)."""
        await self.execute("getfd", {"fdname": name}, fd=fd)

    async def pause(self) -> None:
        await self.execute("stop")
        self.state = RunState.PAUSED

    async def resume(self) -> None:
        await self.execute("cont")
        self.state = RunState.RUNNING

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])

    async def top_node(self) -> tuple[str, str]:
        """The writable top of the system disk: (node name, file name)."""
        for dev in await self.execute("query-block"):
            if is_system_disk(dev):
                inserted = dev["inserted"]
                return inserted["node-name"], inserted["file"]
        raise MachineError(f"{self.name}: system disk not found in query-block")

    # -- lifetime ---------------------------------------------------------------------------
    def alive(self) -> bool:
        """QEMU runs: our child that has not exited, or (attached after a restart) a process
        under its pid that still carries this VM's token."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._ours(self.pid)

    def net_alive(self) -> bool:
        """The network helper (passt) runs; False for a VM without one."""
        if self._net_proc is not None:
            return self._net_proc.poll() is None
        return self._ours(self.net_pid)

    def _ours(self, pid: int | None) -> bool:
        """``pid`` runs and is the process of this VM: its token is checked once, then its
        start time (an exiting process's command line reads empty while it still frees its
        memory, and a reused pid has another start time)."""
        if not pid or not pid_alive(pid):
            return False
        started = start_time(pid)
        known = self._known.get(pid)
        if known is not None:
            return started == known
        run_dir = self.files.run_dir
        if started is None or vm_process_owner(read_argv(pid), run_dir.parent) != run_dir.name:
            return False
        self._known[pid] = started
        return True

    def exit_reason(self) -> str:
        code = self._proc.returncode if self._proc is not None else None
        tail = _tail(self.files.qemu_log, 600).strip()
        if code == 0:  # QEMU ends by itself only when the guest powers off
            text = ("the guest powered off, or rebooted after a restore (a restored VM has no "
                    "kernel to boot again: engine/kernelstub.py); QEMU exited (status 0)")
        else:
            text = f"QEMU exited (status {code})" if code is not None else "QEMU process is gone"
        return f"{text}: {tail}" if tail else text

    async def quit(self, timeout: float = 5.0) -> None:
        """Ask QEMU to quit, then make sure it is gone (``kill``). Without a QMP connection it
        cannot be asked, and nothing is waited for before the kill."""
        if self._qmp is not None and self.alive():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.execute("quit"), 2.0)
            await self._wait_gone(timeout)
        await self.kill()

    async def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def kill(self) -> None:
        """SIGKILL QEMU and its network helper where they still run, wait until both are gone
        (children reaped), disconnect. Safe to call again. Raises ``MachineError`` when either
        still runs ``KILL_WAIT_S`` after the signal (stuck in the kernel): the VM is not
        stopped, and whoever owns it must keep it and try again."""
        for up, pid in ((self.alive(), self.pid), (self.net_alive(), self.net_pid)):
            if up and pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while (self.alive() or self.net_alive()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.disconnect()
        left = [f"QEMU (pid {self.pid})"] if self.alive() else []
        if self.net_alive():
            left.append(f"its network helper (pid {self.net_pid})")
        if left:
            raise MachineError(f"{self.name}: {' and '.join(left)} still running "
                               f"{KILL_WAIT_S:g}s after SIGKILL")
        self.state = RunState.STOPPED

    async def disconnect(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception, EOFError):
                await qmp.disconnect()

    def cleanup_files(self) -> None:
        """Remove the run directory (RAM file, sockets, logs)."""
        import shutil

        shutil.rmtree(self.files.run_dir, ignore_errors=True)

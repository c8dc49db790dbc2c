"""One live VM as the host holds it, and the host's own small record of it on disk.

``vm.json`` (in the VM's disk directory, written atomically) is the host's knowledge that a
restarted server needs and QEMU cannot tell: which stored layers the VM reads, which of its own
layers were frozen by captures (and their digests), which RAM image it maps, where its writable
top is. It is host-local state, not a control-plane record: paths may appear in it.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Layout
from ..engine.agent import AgentClient
from ..engine.machine import Machine, MachineFiles
from .api import MachineShape, VolumeMountSpec

#: the share of a core from which a VM's vCPUs count as competing for the host's cores
BUSY_SHARE = 0.2


@dataclass(frozen=True)
class HostLayout:
    """Where this host keeps its files inside the data directory."""

    layout: Layout

    @property
    def root(self) -> Path:
        return self.layout.home / "host"

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    @property
    def ram_cache(self) -> Path:
        return self.root / "ram-cache"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def artifacts(self) -> Path:
        return self.layout.home / "artifacts"

    def disk_dir(self, session_id: str) -> Path:
        return self.disks / session_id

    def run_dir(self, session_id: str) -> Path:
        return self.layout.session_run_dir(session_id)

    def files(self, session_id: str) -> MachineFiles:
        return MachineFiles(self.run_dir(session_id))

    def staging(self, session_id: str) -> Path:
        """Capture scratch space on tmpfs, inside the VM's run directory (gone with it)."""
        return self.run_dir(session_id) / "staging"

    def volume_file(self, volume_id: str) -> Path:
        return self.volumes / f"{volume_id}.img"

    def ensure(self) -> HostLayout:
        for p in (self.disks, self.ram_cache, self.volumes, self.artifacts):
            p.mkdir(parents=True, exist_ok=True)
        return self


#: a save's temporary file, renamed over ``vm.json`` once written
PARTIAL = ".vm.json.tmp"


@dataclass
class VMRecord:
    """The host's on-disk note about one VM (see the module docstring)."""

    session_id: str
    shape: MachineShape
    layers: list[str]  # stored layer digests, base first
    frozen: list[tuple[str, str]] = field(default_factory=list)  # (file name, digest)
    top: str = "top-0.qcow2"
    ram: str | None = None  # RAM image digest mapped copy-on-write, if restored
    #: the RAM images ``ram``'s cache is composed of, base first (its rebuild needs them all)
    ram_chain: list[str] = field(default_factory=list)
    #: the RAM chain the guest's memory derives from now: the snapshot it was restored from,
    #: then each capture's own; the next capture stores a delta over its top (if still stored)
    lineage: list[str] = field(default_factory=list)
    #: its network: {"slot": n, "spec": NetworkSpec JSON} (None: the user-mode helper's)
    net: dict[str, Any] | None = None
    #: the device state digest of the snapshot it was restored from (its ROMs' pages are the
    #: VM's still: a capture that copies only written pages takes them from there)
    state: str | None = None
    #: its RAM is a memfd (``MachineConfig.ram_shared``): what it was launched with, so that a
    #: server started again attaches to it with the same config (and never saves it live)
    ram_shared: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "shape": self.shape.to_json(),
                "layers": self.layers, "frozen": [list(f) for f in self.frozen],
                "top": self.top, "ram": self.ram, "net": self.net,
                "ram_chain": list(self.ram_chain), "lineage": list(self.lineage),
                "state": self.state, "ram_shared": self.ram_shared}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMRecord:
        return cls(data["session_id"], MachineShape.from_json(data["shape"]),
                   list(data["layers"]), [(a, b) for a, b in data.get("frozen", [])],
                   data.get("top", "top-0.qcow2"), data.get("ram"),
                   ram_chain=list(data.get("ram_chain") or []),
                   lineage=list(data.get("lineage") or []), net=data.get("net"),
                   state=data.get("state"), ram_shared=bool(data.get("ram_shared", False)))

    def save(self, disk_dir: Path) -> None:
        disk_dir.mkdir(parents=True, exist_ok=True)
        tmp = disk_dir / PARTIAL
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, disk_dir / "vm.json")

    @classmethod
    def load(cls, disk_dir: Path) -> VMRecord:
        return cls.from_json(json.loads((disk_dir / "vm.json").read_text()))

    @staticmethod
    def drop_partial(disk_dir: Path) -> None:
        """Remove what a save cut short by a crash left (the note is the one saved before)."""
        (disk_dir / PARTIAL).unlink(missing_ok=True)


@dataclass
class VM:
    """A VM that runs: its QEMU, its agent connection, and the lock that serialises the
    operations that must not overlap (capture, hot-plug, stop)."""

    record: VMRecord
    machine: Machine
    agent: AgentClient
    disk_dir: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    volumes: dict[str, VolumeMountSpec] = field(default_factory=dict)
    stopping: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    #: (monotonic s, CPU s of its QEMU) when last sampled, and the cores it used since the
    #: sample before (None until sampled twice): ``busy``
    cpu_seen: tuple[float, float] | None = None
    cpu_share: float | None = None

    def sample_cpu(self, now: float, cpu_s: float | None) -> None:
        """Record its QEMU's CPU time as read at ``now`` (None: not readable, unknown)."""
        if cpu_s is None:
            self.cpu_seen = self.cpu_share = None
            return
        if self.cpu_seen is not None and now > self.cpu_seen[0]:
            self.cpu_share = (cpu_s - self.cpu_seen[1]) / (now - self.cpu_seen[0])
        self.cpu_seen = (now, cpu_s)

    @property
    def busy(self) -> bool:
        """Whether its vCPUs compete for the host's cores: it used at least ``BUSY_SHARE`` of a
        core since the sample before, or it was not sampled twice yet (a VM just started is
        counted; an idle guest under TCG uses 2-4 % of a core)."""
        return self.cpu_share is None or self.cpu_share >= BUSY_SHARE

    @property
    def session_id(self) -> str:
        return self.record.session_id

    def chain_paths(self, resolve: Any) -> list[Path]:
        """The disk chain as files: stored layers, the VM's own frozen layers, its top."""
        return [*(resolve(d) for d in self.record.layers),
                *(self.disk_dir / name for name, _ in self.record.frozen),
                self.disk_dir / self.record.top]

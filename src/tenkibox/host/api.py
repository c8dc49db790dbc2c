"""``HostAPI``: what the control plane may ask of one machine, in plain data.

Arguments and results are ids, digests, numbers, enums and small dataclasses: never a host path
or a live object, so that the same calls can later travel over the network to a host worker.
The host owns its VMs from before QEMU starts until after it is gone; the control plane owns the
records and decides. The host reports VMs that die on their own through ``watch()``, which the
control plane consumes (the host never writes a record).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ..artifacts.store import GC_GRACE_S
from ..errors import SessionFailedError, SnapshotFailedError
from ..models import Image
from .capacity import HostCapacity
from .tmpfs import TmpfsUse

#: a collection spares artifacts younger than this: a capture puts its files a moment before
#: a record names them
COLLECT_GRACE_S = GC_GRACE_S


class SnapshotDamagedError(SnapshotFailedError):
    """A restore found an artifact of the snapshot missing or corrupt: no restore of it can
    succeed (on the wire it is SnapshotFailed, like any failed restore)."""


class ImageDamagedError(SessionFailedError):
    """A boot found a file of the image (disk, kernel, initrd) whose stored copy does not match
    the digest the build recorded: no boot of it can succeed until it is rebuilt (on the wire it
    is SessionFailed, like any failed boot)."""


@dataclass(frozen=True)
class MachineShape:
    """The device set of a VM: identical at capture and restore."""

    cpu: int
    memory_mb: int
    cmdline: str
    kernel: str  # digest
    initrd: str  # digest
    hotplug_ports: int = 4
    #: QEMU's ``-cpu`` model the guest was started with (a restore uses the same); empty in a
    #: shape from before it was recorded: the accelerator's default
    cpu_model: str = ""
    #: bytes of RAM beyond ``memory_mb`` (``engine.machine.TCG_RAM_PAD``: what makes a live save
    #: correct under TCG); 0 in a shape from before it, or under KVM
    ram_pad: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineShape:
        return cls(**{k: data[k] for k in ("cpu", "memory_mb", "cmdline", "kernel", "initrd",
                                           "hotplug_ports", "cpu_model", "ram_pad")
                      if k in data})


@dataclass(frozen=True)
class Manifest:
    """Everything a restore needs, by digest. Stored on the snapshot record."""

    shape: MachineShape
    layers: list[str]  # disk chain, base first; every layer frozen and stored
    ram: str  # packed RAM image (the top of ``ram_chain``)
    state: str  # device state
    base_image_id: str
    #: the RAM images a restore composes, base first, ``ram`` last: a snapshot of a lineage
    #: stores only what changed since its parent and references the parent's images by digest
    #: (empty in a manifest written before lineages: ``ram`` alone)
    ram_chain: list[str] = field(default_factory=list)
    #: stored bytes of every artifact captures produced that this snapshot references (RAM
    #: images, device state, frozen disk layers; not the base image's files): what deleting
    #: it can free is computed from these by the control plane (``unique_bytes``)
    stored: dict[str, int] = field(default_factory=dict)

    @property
    def rams(self) -> list[str]:
        """The RAM chain, base first (one image for a manifest from before lineages)."""
        return list(self.ram_chain) or [self.ram]

    def digests(self) -> dict[str, str]:
        """digest -> kind, for verification and garbage collection: every RAM image of the
        chain (a parent's image stays stored while a child names it, whoever deletes the
        parent's snapshot)."""
        rams = self.rams
        out = {self.shape.kernel: "kernel", self.shape.initrd: "initrd",
               **{d: "RAM image" if d == self.ram else f"RAM image (parent {len(rams) - 1 - i})"
                  for i, d in enumerate(rams)},
               self.state: "device state"}
        for i, layer in enumerate(self.layers):
            out[layer] = "base image" if i == 0 else f"disk layer {i}"
        return out

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape.to_json(), "layers": list(self.layers), "ram": self.ram,
                "state": self.state, "base_image_id": self.base_image_id,
                "ram_chain": list(self.ram_chain), "stored": dict(self.stored)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(MachineShape.from_json(data["shape"]), list(data["layers"]), data["ram"],
                   data["state"], data["base_image_id"], list(data.get("ram_chain") or []),
                   {str(k): int(v) for k, v in (data.get("stored") or {}).items()})


@dataclass(frozen=True)
class VolumeMountSpec:
    volume_id: str
    path: str
    read_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeMountSpec:
        return cls(str(data["volume_id"]), str(data["path"]), bool(data.get("read_only")))


@dataclass(frozen=True)
class EgressPolicy:
    """Where a guest may open connections, fixed when its session is created.

    ``outbound`` off: nowhere. Otherwise, with neither list: any public address (never the
    host's own addresses, other guests, private, loopback, link-local, multicast or reserved
    ranges). With ``allow_domains`` (exact names or ``*.suffix`` wildcards) and/or
    ``allow_cidrs``: only the addresses those name (then even private ones), DNS included: a
    name outside the list does not resolve. The host enforces it outside the guest.
    """

    outbound: bool = True
    allow_domains: tuple[str, ...] = ()
    allow_cidrs: tuple[str, ...] = ()

    @property
    def allow_listed(self) -> bool:
        return bool(self.allow_domains or self.allow_cidrs)

    def to_json(self) -> dict[str, Any]:
        return {"outbound": self.outbound, "allow_domains": list(self.allow_domains),
                "allow_cidrs": list(self.allow_cidrs)}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> EgressPolicy:
        if not data:
            return cls()
        return cls(bool(data.get("outbound", True)), tuple(data.get("allow_domains") or ()),
                   tuple(data.get("allow_cidrs") or ()))


@dataclass(frozen=True)
class NetworkSpec:
    """A VM's network: its egress policy and whether ports of it may be exposed."""

    egress: EgressPolicy = field(default_factory=EgressPolicy)
    inbound: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"egress": self.egress.to_json(), "inbound": self.inbound}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> NetworkSpec:
        if not data:
            return cls()
        return cls(EgressPolicy.from_json(data.get("egress")), bool(data.get("inbound")))


@dataclass(frozen=True)
class BootSpec:
    session_id: str
    cpu: int
    memory_mb: int
    image_id: str
    hostname: str
    network: NetworkSpec = field(default_factory=NetworkSpec)

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "cpu": self.cpu, "memory_mb": self.memory_mb,
                "image_id": self.image_id, "hostname": self.hostname,
                "network": self.network.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BootSpec:
        return cls(str(data["session_id"]), int(data["cpu"]), int(data["memory_mb"]),
                   str(data["image_id"]), str(data["hostname"]),
                   NetworkSpec.from_json(data.get("network")))


@dataclass(frozen=True)
class RestoreSpec:
    session_id: str
    snapshot_id: str
    manifest: Manifest
    hostname: str
    #: a resume of a paused session: the guest keeps its hostname, machine-id and entropy
    #: (the clock is still set)
    keep_identity: bool = False
    network: NetworkSpec = field(default_factory=NetworkSpec)

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "snapshot_id": self.snapshot_id,
                "manifest": self.manifest.to_json(), "hostname": self.hostname,
                "keep_identity": self.keep_identity, "network": self.network.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestoreSpec:
        return cls(str(data["session_id"]), str(data["snapshot_id"]),
                   Manifest.from_json(data["manifest"]), str(data["hostname"]),
                   bool(data.get("keep_identity")), NetworkSpec.from_json(data.get("network")))


@dataclass(frozen=True)
class Started:
    """A VM that runs: what its record must keep (digests it depends on, its shape)."""

    shape: MachineShape
    layers: list[str]  # stored layers the VM reads (its own top is the host's business)
    ram: str | None  # the RAM image it maps copy-on-write (a restore), else None
    timings: dict[str, float] = field(default_factory=dict)
    ram_chain: list[str] = field(default_factory=list)  # the images ``ram`` is composed of

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape.to_json(), "layers": list(self.layers), "ram": self.ram,
                "timings": dict(self.timings), "ram_chain": list(self.ram_chain)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Started:
        return cls(MachineShape.from_json(data["shape"]), list(data["layers"]), data.get("ram"),
                   {str(k): float(v) for k, v in (data.get("timings") or {}).items()},
                   list(data.get("ram_chain") or []))


@dataclass(frozen=True)
class CaptureSpec:
    session_id: str
    snapshot_id: str
    base_image_id: str
    volumes: list[VolumeMountSpec]  # unplugged for the capture, plugged back after
    #: a pause: once captured, the guest stays paused (its VM is stopped next, so nothing it
    #: would do after the captured instant is lost) and its volumes unplugged; both come back
    #: if the capture fails.
    leave_paused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "snapshot_id": self.snapshot_id,
                "base_image_id": self.base_image_id,
                "volumes": [v.to_json() for v in self.volumes],
                "leave_paused": self.leave_paused}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaptureSpec:
        return cls(str(data["session_id"]), str(data["snapshot_id"]),
                   str(data["base_image_id"]),
                   [VolumeMountSpec.from_json(v) for v in data.get("volumes") or []],
                   bool(data.get("leave_paused")))


@dataclass(frozen=True)
class Captured:
    manifest: Manifest
    size_bytes: int  # RAM data + device state + every disk layer over the base image
    stored_bytes: int  # what this capture newly stored (a delta RAM image, state, new layer)
    paused_s: float
    timings: dict[str, float]
    lost_volumes: list[str]  # volumes that could not be plugged back (the guest lost them)

    def to_json(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_json(), "size_bytes": self.size_bytes,
                "stored_bytes": self.stored_bytes, "paused_s": self.paused_s,
                "timings": dict(self.timings), "lost_volumes": list(self.lost_volumes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Captured:
        return cls(Manifest.from_json(data["manifest"]), int(data["size_bytes"]),
                   int(data["stored_bytes"]), float(data["paused_s"]),
                   {str(k): float(v) for k, v in (data.get("timings") or {}).items()},
                   [str(v) for v in data.get("lost_volumes") or []])


@dataclass(frozen=True)
class ExecSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    timeout_s: float | None = None
    stdin: bool = False
    user: int | None = None  # the uid to run as (None: root)

    def to_json(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "env": dict(self.env), "cwd": self.cwd,
                "timeout_s": self.timeout_s, "stdin": self.stdin, "user": self.user}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecSpec:
        timeout, user = data.get("timeout_s"), data.get("user")
        return cls([str(a) for a in data["argv"]],
                   {str(k): str(v) for k, v in (data.get("env") or {}).items()},
                   data.get("cwd"), float(timeout) if timeout is not None else None,
                   bool(data.get("stdin")), int(user) if user is not None else None)


@dataclass(frozen=True)
class ProcessRef:
    process_id: str
    pid: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRef:
        pid = data.get("pid")
        return cls(str(data["process_id"]), int(pid) if pid is not None else None)


@dataclass(frozen=True)
class ProcessEvent:
    """One event of a process's output (``HostAPI.process_events``): ``stdout``/``stderr``
    with ``data``, then exactly one ``exit`` (``exit_code``, ``timed_out``) or ``error`` (the
    output is no longer available, or some was lost: ``message``, ``delivered_bytes``,
    ``lost_bytes`` and, when known, ``exit_code`` and ``timed_out``)."""

    type: Literal["stdout", "stderr", "exit", "error"]
    data: bytes = b""
    exit_code: int | None = None
    timed_out: bool = False
    message: str | None = None
    delivered_bytes: int | None = None
    lost_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as a line of ``GET .../events`` says it (``models.ProcessEvent``: output
        in base64, only the fields of its type)."""
        if self.type in ("stdout", "stderr"):
            return {"type": self.type, "data": base64.b64encode(self.data).decode()}
        if self.type == "exit":
            return {"type": "exit", "exit_code": self.exit_code, "timed_out": self.timed_out}
        out: dict[str, Any] = {"type": "error", "message": self.message,
                               "delivered_bytes": self.delivered_bytes,
                               "lost_bytes": self.lost_bytes}
        if self.exit_code is not None:
            out.update(exit_code=self.exit_code, timed_out=self.timed_out)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessEvent:
        """The inverse of ``to_json`` (a host worker's event stream)."""
        kind = data["type"]
        if kind not in ("stdout", "stderr", "exit", "error"):
            raise ValueError(f"unknown process event type {kind!r}")
        code = data.get("exit_code")
        return cls(kind, base64.b64decode(data.get("data") or ""),
                   int(code) if code is not None else None, bool(data.get("timed_out")),
                   data.get("message"), data.get("delivered_bytes"), data.get("lost_bytes"))


@dataclass(frozen=True)
class VMGone:
    """A VM stopped without being asked to (QEMU or its network helper died)."""

    session_id: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMGone:
        return cls(str(data["session_id"]), str(data["reason"]))


@dataclass(frozen=True)
class InUse:
    """A stored artifact this host uses that no snapshot record may name: a file of a built
    image, or one a VM of this host runs on (its layers, kernel, initrd, RAM image)."""

    digest: str
    kind: str  # what it is to its user: "disk", "kernel", "disk layer 1", "RAM image"...
    image_id: str | None = None  # set for an image's file
    session_id: str | None = None  # set for a VM's

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InUse:
        return cls(str(data["digest"]), str(data["kind"]), data.get("image_id"),
                   data.get("session_id"))


@dataclass
class CacheScrub:
    """What a check of the derived RAM caches found."""

    #: digest -> what is wrong with its cache (not rebuilt: without repair, or that failed)
    damaged: dict[str, str] = field(default_factory=dict)
    #: digests whose damaged cache was rebuilt
    rebuilt: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"damaged": dict(self.damaged), "rebuilt": list(self.rebuilt)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheScrub:
        return cls(dict(data.get("damaged") or {}), list(data.get("rebuilt") or []))


@dataclass(frozen=True)
class Recovered:
    found: list[str]  # sessions whose VM runs and answers
    lost: dict[str, str]  # session id -> why its VM could not be found
    strays_killed: int  # processes of ours that no session owned

    def to_json(self) -> dict[str, Any]:
        return {"found": list(self.found), "lost": dict(self.lost),
                "strays_killed": self.strays_killed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recovered:
        return cls(list(data["found"]), dict(data["lost"]), int(data["strays_killed"]))


@dataclass(frozen=True)
class Unowned:
    """Something stored on a host that no record owns (``tenki admin verify`` lists it)."""

    #: "artifact": a stored artifact no record references (``name``: its digest);
    #: "temporary": a file a crashed write left (``name``: its path in the data directory);
    #: "vm": the run or disk directory of a VM no session holds (``name``: the session id)
    kind: Literal["artifact", "temporary", "vm"]
    name: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Unowned:
        kind = data["kind"]
        if kind not in ("artifact", "temporary", "vm"):
            raise ValueError(f"unknown kind of unowned file {kind!r}")
        return cls(kind, str(data["name"]))


@runtime_checkable
class SpareHost(Protocol):
    """A host that prepares restores ahead (``host/spares.py``): ``LocalHost``, and a host
    worker through ``RemoteHost``. The control plane asks only the members that are."""

    async def prepare_spare(self, spec: RestoreSpec) -> None:
        """Prepare ``spec`` ahead, for a ``restore`` of the same spec to claim; returns at
        once. ``ConflictError`` if the session id is taken."""
        ...

    async def drop_spare(self, session_id: str) -> None:
        """Stop the spare prepared for ``session_id`` (none: nothing to do)."""
        ...


class HostAPI(Protocol):
    @property
    def capacity(self) -> HostCapacity:
        """What this host may promise; the control plane admits by it (read-only here: a fleet
        computes it from its members)."""
        ...

    async def boot(self, spec: BootSpec) -> Started: ...
    async def restore(self, spec: RestoreSpec) -> Started: ...

    async def capture(self, spec: CaptureSpec) -> Captured: ...
    async def terminate(self, session_id: str, volumes: list[VolumeMountSpec]) -> None: ...
    async def recover(self, live: dict[str, list[VolumeMountSpec]]) -> Recovered: ...
    def watch(self) -> AsyncIterator[VMGone]: ...
    def has_vm(self, session_id: str) -> bool: ...

    def list_vms(self) -> list[str]:
        """The session ids of the VMs this host runs (started, not yet stopped)."""
        ...

    def memory_used_mib(self) -> int: ...
    def tmpfs_use(self) -> TmpfsUse:
        """The tmpfs of the VMs' run directories (guest RAM of booted VMs, capture staging)."""
        ...

    async def image_digest(self, image_id: str) -> str: ...

    async def list_images(self) -> list[Image]:
        """The guest images built on this host (their files stay on it)."""
        ...

    # network
    @property
    def network_enforced(self) -> bool:
        """Whether this host can enforce egress policies and expose ports (root, nftables)."""
        ...

    async def port_address(self, session_id: str, port: int) -> tuple[str, int]:
        """A TCP address on this host that reaches ``port`` of the session's guest (for the
        exposed-port proxy); ConflictError when the VM is not running or has no inbound."""
        ...

    # volumes (their files stay on this host)
    async def create_volume(self, volume_id: str, size_bytes: int) -> None: ...
    async def delete_volume(self, volume_id: str) -> None: ...
    async def attach_volume(self, session_id: str, mount: VolumeMountSpec) -> None: ...
    async def detach_volume(self, session_id: str, mount: VolumeMountSpec) -> None: ...
    async def volume_files(self) -> list[str]: ...

    # what runs in a VM
    async def start_process(self, session_id: str, spec: ExecSpec) -> ProcessRef: ...
    def process_events(self, session_id: str,
                       process_id: str) -> AsyncGenerator[ProcessEvent, None]: ...
    async def process_stdin(self, session_id: str, process_id: str, data: bytes) -> None: ...
    async def process_close_stdin(self, session_id: str, process_id: str) -> None: ...
    async def process_kill(self, session_id: str, process_id: str, signal: int) -> None: ...
    async def process_exit(self, session_id: str, process_id: str) -> int | None: ...
    def running_processes(self, session_id: str) -> int: ...
    def read_file(self, session_id: str, path: str) -> AsyncGenerator[bytes, None]: ...
    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int) -> int: ...

    # stored artifacts and derived caches
    def referenced_locally(self) -> set[str]: ...
    async def collect_garbage(self, referenced: set[str], grace_s: float | None = None) -> int:
        """Remove stored artifacts and caches outside ``referenced`` (and the host's own
        references); by default one stored less than ``COLLECT_GRACE_S`` ago is spared."""
        ...
    def unowned_files(self, referenced: set[str]) -> list[Unowned]: ...

    async def remove_unowned(self, found: list[Unowned], referenced: set[str],
                             live_sessions: set[str]) -> list[Unowned]:
        """Remove what ``unowned_files`` ``found`` that no one can still claim (nothing of a
        live session's or a running process's, no artifact referenced or stored within the
        GC's grace, no temporary a writer may still rename); returns the entries removed."""
        ...

    async def verify_artifacts(self, digests: dict[str, str], *, deep: bool) -> dict[str, str]:
        """digest -> problem, for each of ``digests`` (digest -> kind) missing or corrupt;
        ``deep`` reads every one in full whatever its stat says."""
        ...

    async def cached_bytes(self, digests: list[str]) -> int:
        """Bytes of ``digests`` this host can read without a download (its local store, or its
        cache of the bucket): placement prefers the host that has a snapshot's files."""
        ...

    def local_artifacts(self) -> list[InUse]:
        """The stored artifacts this host uses that no snapshot record names: the built
        images' files and what its VMs run on (for a deep verify)."""
        ...

    async def scrub_caches(self, repair: bool) -> CacheScrub:
        """Re-hash the derived caches in full; rebuild damaged ones only with ``repair`` (a
        damaged one is never used again without a rebuild either way)."""
        ...

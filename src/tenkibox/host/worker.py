"""The host worker's side of membership: register with the control plane, heartbeat, fence.

``tenki host run`` serves its host's API (``host.service``) and runs a ``HostWorker`` next to it:

- **register** (``POST {control}/v1/hosts``, the admin key): the host's address, the secret the
  control plane must call it with, its machine (cores, memory, disk, accelerator, QEMU, CPU) and
  the VMs it runs. The answer names the host (kept in ``<data dir>/host-id`` and sent at every
  later registration), the heartbeat interval, and the sessions the records place on it
  (``owned``). At start the worker recovers exactly those VMs (``HostAPI.recover``): anything
  else of ours is stopped and removed.
- **heartbeat** every interval (``POST {control}/v1/hosts/{id}/heartbeat``): VMs and use. A 404
  means the control plane forgot the host: register again.
- **fence**: every VM the host runs that an answer's ``owned`` does not name is terminated (the
  records decide; a partitioned host that comes back must not keep a session another host now
  runs). A VM the worker first saw less than one interval ago is spared until the next answer:
  a boot's record names the host before the boot starts, but the answer may predate it.

The control plane not answering changes nothing on the host: VMs run on, the worker retries.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from ..engine.machine import default_cpu_model
from ..errors import AuthenticationError, ConnectionError, PermissionDeniedError, TenkiError
from ..errors import error_from_body as control_error
from .api import HostAPI, VolumeMountSpec
from .journal import MountJournal

log = logging.getLogger("tenkibox.host.worker")

#: a control plane that does not answer: the next try after this (at start, registration)
RETRY_S = 2.0
#: used until an answer names the interval
DEFAULT_INTERVAL_S = 5.0
#: one call to the control plane (it answers from its records: quickly)
CONTROL_TIMEOUT_S = 20.0
#: the registration's limits (``models.HostRegister``)
QEMU_VERSION_MAX = 64
CPU_MODEL_MAX = 128


@dataclass(frozen=True)
class Machine:
    """What the control plane places by, besides the capacity (``HostAPI.capacity``)."""

    accelerator: str
    qemu_version: str
    cpu_model: str
    data_dir: Path

    @classmethod
    def probe(cls, accelerator: str, data_dir: Path) -> Machine:
        # the guest CPU model of new VMs (engine.machine.default_cpu_model): a memory snapshot
        # restores where the model is the same; "host" is named by the host's own CPU
        guest_cpu = default_cpu_model(accelerator)
        if guest_cpu == "host":
            guest_cpu = f"host: {cpu_model()}"
        return cls(accelerator, qemu_version()[:QEMU_VERSION_MAX], guest_cpu[:CPU_MODEL_MAX],
                   data_dir)

    def disk(self) -> tuple[int, int]:
        """(total, free) bytes of the data directory's file system."""
        use = shutil.disk_usage(self.data_dir)
        return use.total, use.free


def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    """``QEMU emulator version 8.2.2 (Debian …)`` -> ``8.2.2 (Debian …)``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not out.strip():
        return "unknown"
    return out.splitlines()[0].strip().removeprefix("QEMU emulator version ").strip()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class ControlClient:
    """The control plane's host routes, with the admin key."""

    def __init__(self, url: str, token: str, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url, transport=transport,
                                         headers={"Authorization": f"Bearer {token}"},
                                         timeout=httpx.Timeout(CONTROL_TIMEOUT_S, connect=5.0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._client.post(path, json=body)
        except httpx.TransportError as exc:
            raise ConnectionError(f"control plane {self.url} did not answer POST {path}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        try:
            data = resp.json()
        except ValueError:
            data = resp.text[:200]
        if resp.status_code >= 400:
            raise control_error(resp.status_code, data)
        if not isinstance(data, dict):
            raise ConnectionError(f"control plane {self.url}: POST {path} answered no object")
        return data


def _owned(raw: Any) -> dict[str, list[VolumeMountSpec] | None]:
    """``owned`` of an answer: session ids (the contract; their mounts unknown: None), or
    objects that also name the session's volume mounts (``{"session_id", "volumes"}``)."""
    out: dict[str, list[VolumeMountSpec] | None] = {}
    for item in raw or []:
        if isinstance(item, dict):
            out[str(item["session_id"])] = [VolumeMountSpec.from_json(m)
                                            for m in item.get("volumes") or []]
        else:
            out[str(item)] = None
    return out


class HostWorker:
    def __init__(self, host: HostAPI, control: ControlClient, *, address: str, secret: str,
                 machine: Machine, id_file: Path, host_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 journal: MountJournal | None = None) -> None:
        """``journal``: the mounts the host's VMs had, for those the control plane names
        without theirs (recovery makes a VM hold exactly the mounts it is given)."""
        self.host = host
        self.journal = journal
        self.control = control
        self.address = address
        self.secret = secret
        self.machine = machine
        self.id_file = id_file
        self.host_id = host_id or self._stored_id()
        self.interval_s = DEFAULT_INTERVAL_S
        self.state: str | None = None
        self.clock = clock
        #: session id -> when the worker first saw its VM (for the fencing grace)
        self._seen: dict[str, float] = {}
        #: sessions fenced so far (for the log and the tests)
        self.fenced: list[str] = []

    def _stored_id(self) -> str | None:
        try:
            return self.id_file.read_text().strip() or None
        except OSError:
            return None

    def _store_id(self, host_id: str) -> None:
        tmp = self.id_file.with_name(f".{self.id_file.name}.{os.getpid()}")
        tmp.write_text(host_id + "\n")
        os.replace(tmp, self.id_file)

    # -- registration ------------------------------------------------------------------------
    def registration(self) -> dict[str, Any]:
        cap = self.host.capacity
        total, free = self.machine.disk()
        return {"host_id": self.host_id, "address": self.address, "secret": self.secret,
                "cpus": cap.cpus, "memory_total_mib": cap.memory_total_mib,
                "memory_reserve_mib": cap.memory_reserve_mib, "overcommit": cap.overcommit,
                "disk_total_bytes": total, "disk_free_bytes": free,
                "accelerator": self.machine.accelerator,
                "qemu_version": self.machine.qemu_version, "cpu_model": self.machine.cpu_model,
                "network_enforced": bool(self.host.network_enforced),
                "vms": self.host.list_vms()}

    async def register(self) -> dict[str, list[VolumeMountSpec] | None]:
        """Register (or again); returns what the control plane says this host owns."""
        answer = await self.control.post("/v1/hosts", self.registration())
        host_id = str(answer["host_id"])
        if host_id != self.host_id:
            self._store_id(host_id)
        self.host_id = host_id
        # the host reports itself by its registered id (HostAPI's capacity is read-only to
        # the control plane; the worker owns its host object)
        host: Any = self.host
        host.capacity = replace(self.host.capacity, host_id=host_id)
        self.interval_s = float(answer.get("heartbeat_interval_s") or DEFAULT_INTERVAL_S)
        self.state = answer.get("state")
        log.info("registered as %s at %s (state %s, heartbeat every %.1fs)", host_id,
                 self.control.url, self.state, self.interval_s)
        return _owned(answer.get("owned"))

    async def start(self, stop: asyncio.Event) -> bool:
        """Register (trying again while the control plane does not answer), then recover the
        VMs it says this host owns. False if ``stop`` was set first. A refused key raises."""
        while not stop.is_set():
            try:
                owned = await self.register()
                break
            except (AuthenticationError, PermissionDeniedError):
                raise
            except TenkiError as exc:
                log.warning("registration: %s; trying again in %.0fs", exc.message, RETRY_S)
                await _wait(stop, RETRY_S)
        else:
            return False
        live = {s: m if m is not None else self.journal.mounts(s) if self.journal else []
                for s, m in owned.items()}
        recovered = await self.host.recover(live)
        if self.journal is not None:
            for session_id in recovered.found:
                self.journal.record(session_id, live[session_id])
            self.journal.retain(set(recovered.found))  # the rest were stopped, or died
        log.info("recovered %d VM(s); %d lost; %d stray process(es) stopped",
                 len(recovered.found), len(recovered.lost), recovered.strays_killed)
        for session_id, why in recovered.lost.items():
            log.warning("session %s: %s", session_id, why)
        now = self.clock()
        # VMs found again are old: no grace for them if a later answer disowns them
        self._seen = {s: now - 2 * self.interval_s for s in recovered.found}
        return True

    # -- heartbeats --------------------------------------------------------------------------
    def heartbeat_body(self) -> dict[str, Any]:
        tmpfs = self.host.tmpfs_use()
        return {"vms": self.host.list_vms(), "memory_used_mib": self.host.memory_used_mib(),
                "tmpfs_used_bytes": tmpfs.used_bytes, "tmpfs_total_bytes": tmpfs.total_bytes,
                "disk_free_bytes": self.machine.disk()[1]}

    async def heartbeat(self) -> None:
        """One heartbeat, and the fencing its answer calls for (a 404: register again)."""
        body = self.heartbeat_body()
        vms = list(body["vms"])
        try:
            answer = await self.control.post(f"/v1/hosts/{self.host_id}/heartbeat", body)
            owned = set(_owned(answer.get("owned")))
            state = answer.get("state")
        except TenkiError as exc:
            if exc.status != 404:
                raise
            log.warning("the control plane does not know host %s: registering again",
                        self.host_id)
            owned = set(await self.register())
            state = self.state
        if state != self.state:
            log.info("host %s is %s", self.host_id, state)
            self.state = state
        await self.fence(vms, owned)

    async def fence(self, vms: list[str], owned: set[str]) -> list[str]:
        """Terminate the VMs of ``vms`` (what the answer was about) that ``owned`` does not
        name, but spare those first seen less than one interval ago."""
        now = self.clock()
        for session_id in vms:
            self._seen.setdefault(session_id, now)
        self._seen = {s: t for s, t in self._seen.items() if self.host.has_vm(s)}
        killed = []
        for session_id in vms:
            if session_id in owned or not self.host.has_vm(session_id):
                continue
            if now - self._seen[session_id] < self.interval_s:
                log.info("session %s: not owned yet; spared until the next heartbeat",
                         session_id)
                continue
            log.warning("session %s: the control plane does not place it on this host; "
                        "stopping its VM (fencing)", session_id)
            try:
                await self.host.terminate(session_id, [])
            except TenkiError as exc:
                log.error("session %s: fencing failed: %s", session_id, exc.message)
                continue
            self._seen.pop(session_id, None)
            if self.journal is not None:
                self.journal.gone(session_id)
            self.fenced.append(session_id)
            killed.append(session_id)
        return killed

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat every interval until ``stop``; a failed one is logged and tried again."""
        while not stop.is_set():
            await _wait(stop, self.interval_s)
            if stop.is_set():
                return
            try:
                await self.heartbeat()
            except TenkiError as exc:
                log.warning("heartbeat of host %s: %s", self.host_id, exc.message)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass

"""``LocalHost``: the VMs of this machine, in this process (the ``HostAPI`` implementation).

Ownership: a VM belongs to the host from before its QEMU starts (``_starting``) until its
processes are gone and its files are removed; one whose processes outlive SIGKILL stays in
``_stuck`` (the terminate fails, and is tried again). Every QEMU and network helper carries a
token, a path in its VM's run directory (``engine.machine.vm_process_owner``); at start-up
``recover`` kills any such process that no live session owns (a server killed mid-boot leaves
one), waits until it is gone, and removes every file of a VM that is not live. A VM that dies on
its own, or whose network breaks, is reported through ``watch()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

from ..artifacts.s3 import DEFAULT_CACHE_BYTES, S3ArtifactStore, S3Location
from ..artifacts.store import GC_GRACE_S, ArtifactStore, LocalArtifactStore
from ..config import Layout, home_tag
from ..engine import writetrack
from ..engine.accel import detect_accel
from ..engine.agent import AgentClient, AgentError
from ..engine.machine import (
    PROC,
    Machine,
    MachineError,
    cpu_seconds,
    default_cpu_model,
    pid_alive,
    read_argv,
    start_time,
    tcg_threads,
    vm_process_owner,
)
from ..errors import ConflictError, InternalError, NotFoundError, TenkiError, ValidationError
from ..models import Image
from ..steps import Steps
from . import unowned
from . import volumes as vols
from .api import (
    BootSpec,
    CacheScrub,
    Captured,
    CaptureSpec,
    ExecSpec,
    InUse,
    NetworkSpec,
    ProcessEvent,
    ProcessRef,
    Recovered,
    RestoreSpec,
    Started,
    Unowned,
    VMGone,
    VolumeMountSpec,
)
from .boot import boot
from .capacity import configured, pss_mib
from .capture import capture
from .context import HostContext
from .network import HostNetwork, VMNet
from .processes import ProcessHandle, ProcessTable
from .ramcache import RamCache
from .restore import Prepared, finish, prepare, restore, still_intact
from .spares import SPARE_DELAY_S, SPARE_KEEP_S, SPARE_POLL_S, Spare
from .tmpfs import TmpfsUse, tmpfs_use
from .vm import VM, HostLayout, VMRecord

log = logging.getLogger(__name__)

#: the guest agent switches user itself from this version on
AGENT_USER_SINCE = (0, 3, 0)

WATCH_INTERVAL_S = 0.5
RECOVER_AGENT_TIMEOUT_S = 15.0
#: a restored clone has usually answered its first exec by then: the pages that took are kept
TRIM_DELAY_S = 2.0
#: reading a clone's page tables at its stop (~5 ms per GiB of guest RAM here)
NOTE_USED_TIMEOUT_S = 2.0
#: how long recovery waits for the strays it SIGKILLed to be gone
STRAY_WAIT_S = 10.0


def our_processes(run_root: Path, proc: Path = PROC) -> dict[int, tuple[str, str]]:
    """pid -> (the VM it serves, its command line) of every live QEMU or network helper that
    carries the token of a VM under ``run_root`` (``vm_process_owner``)."""
    found: dict[int, tuple[str, str]] = {}
    for entry in proc.iterdir() if proc.exists() else []:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = read_argv(pid, proc)
        owner = vm_process_owner(argv, run_root)
        if owner is not None and pid_alive(pid, proc):
            found[pid] = (owner, " ".join(argv))
    return found


class LocalHost:
    @classmethod
    def open(cls, layout: Layout, *, artifacts: S3Location | None = None,
             artifact_cache_bytes: int | None = None) -> LocalHost:
        """This machine's host over ``layout`` (``tenki serve``'s embedded one, a host
        worker's), with the accelerator that really boots a guest here (``detect_accel``)."""
        accel, why = detect_accel(layout.home / "accel.json")
        log.info("accelerator: %s (%s)", accel, why)
        host = cls(layout, accel, artifacts=artifacts, artifact_cache_bytes=artifact_cache_bytes)
        if artifacts is not None:
            log.info("artifacts: %s (local cache in %s)", artifacts.describe(),
                     host.paths.artifacts)
        return host

    def __init__(self, layout: Layout, accel: str, *, artifacts: S3Location | None = None,
                 artifact_cache_bytes: int | None = None) -> None:
        """``artifacts``: a bucket to keep artifacts in, with ``artifacts/`` as this host's
        local cache of them (at most ``artifact_cache_bytes``); None: ``artifacts/`` is the
        store. A bucket that cannot be reached raises ``InternalError`` here, a
        ``TENKI_CPU_MODEL`` QEMU cannot take, or a ``TENKI_TCG_THREADS`` that is none of its
        values, ``ValidationError``."""
        default_cpu_model(accel)  # at start, not at the first boot
        tcg_threads(1, 0)
        self.paths = HostLayout(layout).ensure()
        store: ArtifactStore
        if artifacts is None:
            store = LocalArtifactStore(self.paths.artifacts)
        else:
            s3 = S3ArtifactStore(self.paths.artifacts, artifacts,
                                 cache_bytes=artifact_cache_bytes or DEFAULT_CACHE_BYTES,
                                 in_use=lambda: self.referenced_locally())
            s3.check()
            store = s3
        self.network = HostNetwork(home_tag(layout.home))
        # a cache derived from its source (hidden: built again when damaged, never restored)
        tracking = writetrack.Library.load(self.paths.root / ".writetrack")
        self.ctx = HostContext(self.paths, store, RamCache(self.paths.ram_cache, store), accel,
                               self.network, write_tracking=tracking)
        self.vms: dict[str, VM] = {}
        self._starting: dict[str, list[VM]] = {}
        #: the vCPUs of each VM being started, counted as placed from the request on
        #: (``_tcg_threads``): a burst of restores sees all of its VMs
        self._starting_vcpus: dict[str, int] = {}
        #: VMs whose stop failed (a process outlived SIGKILL): still ours, until a terminate
        #: tried again finds their processes gone
        self._stuck: dict[str, VM] = {}
        self.processes = ProcessTable()
        #: the built images' files known to be stored in a bucket, and a check of the others
        #: running: ``local_artifacts`` answers from this set, since each question is a HEAD
        #: request, and it was asked on the event loop for every status and every start's
        #: answer (a loaded bucket held a worker's loop, and its heartbeats, for seconds)
        self._images_stored: set[str] = set()
        self._images_check: asyncio.Task[None] | None = None
        self._gone: asyncio.Queue[VMGone] = asyncio.Queue()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: digests stored by captures in flight (referenced until their record names them)
        self._producing: dict[str, set[str]] = {}
        #: per RAM cache, its pending trim (``_trim_later``)
        self._trims: dict[str, asyncio.Task[None]] = {}
        #: session id -> a restore prepared ahead for it (``host.spares``)
        self._spares: dict[str, Spare] = {}
        #: when the last start ended (a spare is prepared ``SPARE_DELAY_S`` after)
        self._last_start = 0.0
        self.capacity = configured("local", accel)

    @property
    def store(self) -> ArtifactStore:
        return self.ctx.store

    # -- start -----------------------------------------------------------------------------
    async def boot(self, spec: BootSpec) -> Started:
        slot = self._slot(spec.session_id, spec.cpu)
        vm = await self._start(spec.session_id, boot(self.ctx, spec, slot,
                                                     self._tcg_threads(spec.session_id)))
        return Started(vm.record.shape, list(vm.record.layers), None, vm.timings)

    async def restore(self, spec: RestoreSpec) -> Started:
        spare = self._spares.pop(spec.session_id, None)
        if spare is not None:
            # claimed: the spare is this restore's from here on, as a VM being started is
            self._slot(spec.session_id, spec.manifest.shape.cpu, spare.slot)
            plan = self._claim(spare, spec)
        else:
            slot = self._slot(spec.session_id, spec.manifest.shape.cpu)
            plan = restore(self.ctx, spec, slot, self._tcg_threads(spec.session_id))
        vm = await self._start(spec.session_id, plan)
        if vm.record.ram:
            self._trim_later(vm.record.ram, TRIM_DELAY_S)
        return Started(vm.record.shape, list(vm.record.layers), vm.record.ram, vm.timings,
                       list(vm.record.ram_chain))

    def _slot(self, session_id: str, vcpus: int, slot: list[VM] | None = None) -> list[VM]:
        self._slot_free(session_id)
        slot = [] if slot is None else slot
        self._starting[session_id] = slot
        self._starting_vcpus[session_id] = vcpus
        return slot

    def _tcg_threads(self, session_id: str) -> str | None:
        """How TCG runs the vCPUs of the VM being started (``engine.machine.tcg_threads``),
        counting those of every other VM of this host that is busy (``VM.busy``, sampled by
        ``_watch``) or being started; None under KVM. An idle session does not push a restore
        onto one thread: one restore alone beside one was ~5 % slower on one thread."""
        if self.ctx.accel == "kvm":
            return None
        placed = sum(vm.record.shape.cpu for sid, vm in self.vms.items()
                     if sid != session_id and vm.busy)
        placed += sum(n for sid, n in self._starting_vcpus.items() if sid != session_id)
        return tcg_threads(self._starting_vcpus[session_id], placed)

    async def _start(self, session_id: str, plan: Any) -> VM:
        """Run a boot or restore plan; on any failure or cancellation (a terminate) the VM it
        may have launched is stopped and its files removed before this returns."""
        try:
            vm: VM = await plan
        except BaseException:
            slot = self._starting.pop(session_id, [])
            self._starting_vcpus.pop(session_id, None)
            self._last_start = time.monotonic()
            await asyncio.shield(self._destroy(session_id, slot[0] if slot else None))
            raise
        self._starting.pop(session_id, None)
        self._starting_vcpus.pop(session_id, None)
        self._last_start = time.monotonic()
        self.vms[session_id] = vm
        self._watchers[session_id] = asyncio.create_task(self._watch(vm),
                                                         name=f"watch {session_id}")
        return vm

    # -- spares (``host.spares``) -------------------------------------------------------------
    async def prepare_spare(self, spec: RestoreSpec) -> None:
        """Prepare ``spec`` ahead, for a ``restore`` of the same spec to claim (in the
        background: this returns at once). ``ConflictError`` if the session id is taken."""
        self._slot_free(spec.session_id)
        spare = Spare(spec)
        spare.made = asyncio.create_task(self._make_spare(spare),
                                         name=f"spare {spec.session_id}")
        spare.keeper = asyncio.create_task(self._keep_spare(spare),
                                           name=f"keep spare {spec.session_id}")
        self._spares[spec.session_id] = spare

    def _slot_free(self, session_id: str) -> None:
        if session_id in self.vms or session_id in self._starting or session_id in self._stuck \
                or session_id in self._spares:
            raise ConflictError(f"session {session_id} already has a VM on this host")

    async def _make_spare(self, spare: Spare) -> Prepared:
        spec = spare.spec
        # after the host's starts: a spare's launch takes no core from them (once claimed,
        # it is a start itself)
        while not spare.claimed and (
                self._starting or time.monotonic() < self._last_start + SPARE_DELAY_S):
            await asyncio.sleep(SPARE_POLL_S)
        steps = Steps(log, f"spare {spec.session_id} of {spec.snapshot_id}", plan="spare")
        # one thread per vCPU, as for a restore on an idle host: it is claimed whatever runs
        # beside it then, and a VM keeps its mode
        threads = None if self.ctx.accel == "kvm" else tcg_threads(spec.manifest.shape.cpu, 0)
        prepared = await prepare(self.ctx, spec, spare.slot, threads, steps)
        log.info("spare %s of %s: ready in %.3fs", spec.session_id, spec.snapshot_id,
                 steps.total)
        return prepared

    async def _keep_spare(self, spare: Spare) -> None:
        """Stop the spare when its preparation fails or ``SPARE_KEEP_S`` pass unclaimed (a
        claim or a drop cancels this first)."""
        assert spare.made is not None
        try:
            await asyncio.shield(spare.made)
        except asyncio.CancelledError:
            if not spare.made.cancelled():
                raise  # this keeper cancelled: the claim or the drop owns the spare
        except Exception as exc:
            why = exc.message if isinstance(exc, TenkiError) else repr(exc)
            log.warning("spare %s of %s failed: %s", spare.spec.session_id,
                        spare.spec.snapshot_id, why)
        else:
            await asyncio.sleep(SPARE_KEEP_S)
            log.info("spare %s of %s: not claimed in %.0fs, stopped", spare.spec.session_id,
                     spare.spec.snapshot_id, SPARE_KEEP_S)
        if self._spares.get(spare.spec.session_id) is spare:
            del self._spares[spare.spec.session_id]
            await asyncio.shield(self._stop_spare(spare))

    async def _stop_spare(self, spare: Spare) -> None:
        """Stop a spare taken out of the table (its preparation cancelled first)."""
        for task in (spare.keeper, spare.made):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if spare.made is not None:
            with contextlib.suppress(BaseException):
                (await spare.made).abandon()
        try:
            await self._destroy(spare.spec.session_id, spare.vm())
        except TenkiError as exc:
            log.warning("spare %s: %s", spare.spec.session_id, exc.message)

    async def drop_spare(self, session_id: str) -> None:
        """Stop the spare of ``session_id`` (none: nothing to do)."""
        spare = self._spares.pop(session_id, None)
        if spare is not None:
            await asyncio.shield(self._stop_spare(spare))

    def spares(self) -> list[str]:
        """The session ids of this host's spares."""
        return sorted(self._spares)

    async def _claim(self, spare: Spare, spec: RestoreSpec) -> VM:
        """A restore of a spare's session: it resumes the spare (``restore.finish``) once it
        is prepared. A spare that failed, or that was prepared for another restore than
        ``spec``, is stopped and the restore runs whole."""
        assert spare.made is not None and spare.keeper is not None
        spare.claimed = True
        spare.keeper.cancel()
        steps = Steps(log, f"{spec.session_id} from {spec.snapshot_id}", plan="restore")
        prepared: Prepared | None = None
        why = "prepared for another restore"
        if spare.serves(spec):
            with steps.step("spare"):
                # a cancelled claim (a terminate) cancels the preparation: ``_start`` then
                # stops what it made, in the slot
                try:
                    prepared = await spare.made
                    # the guest has not run yet: what it will read is checked again
                    await asyncio.to_thread(still_intact, self.ctx, spec)
                except TenkiError as exc:
                    why = exc.message
                    prepared = None
        if prepared is not None:
            try:
                return await finish(self.ctx, spec, prepared, steps)
            except TenkiError as exc:
                why = exc.message
        log.warning("%s: its spare is not used (%s): restoring it whole", spec.session_id, why)
        spare.made.cancel()
        with contextlib.suppress(BaseException):
            (await spare.made).abandon()
        vm = spare.vm()
        if vm is not None:
            await self._destroy(spec.session_id, vm)
            # the slot stays this restore's (``_starting``): the whole one appends its VM
            spare.slot.clear()
        return await restore(self.ctx, spec, spare.slot, self._tcg_threads(spec.session_id))

    # -- stop --------------------------------------------------------------------------------
    async def terminate(self, session_id: str, volumes: list[VolumeMountSpec]) -> None:
        """Stop the VM and remove its files; idempotent. A boot or restore in progress is the
        caller's to cancel first (its task); whatever it launched is stopped here too."""
        steps = Steps(log, session_id, plan="terminate")
        # a session ended before its restore came: no restore will claim its spare
        await self.drop_spare(session_id)
        vm = self.vms.get(session_id)
        with steps.step("flush-volumes"):
            if vm is not None and not vm.stopping and not vm.lock.locked():
                vm.stopping = True
                async with vm.lock:
                    await vols.flush_before_stop(vm, volumes)
        slot = self._starting.get(session_id) or []
        vm = vm or self._stuck.get(session_id) or (slot[0] if slot else None)
        await self._destroy(session_id, vm, steps)

    async def _destroy(self, session_id: str, vm: VM | None, steps: Steps | None = None) -> None:
        """Stop the VM's processes, then remove its network and files. Raises ``MachineError``
        when a process outlives SIGKILL: the VM is then kept in ``_stuck`` with its files, for
        the next terminate of the session to try again."""
        steps = steps or Steps(log, session_id, plan="destroy")
        if vm is not None:
            vm.stopping = True
        self.vms.pop(session_id, None)
        watcher = self._watchers.pop(session_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        with steps.step("stop-vm"):
            for proc in self.processes.for_session(session_id):
                await proc.cancel()
            self.processes.drop_session(session_id)
            if vm is not None:
                await vm.agent.close()
                if vm.record.ram and vm.machine.pid:
                    # the pages this clone used, while its QEMU still maps them; bounded: a
                    # process stuck in the kernel may hold its page tables, and the stop comes
                    # first (the thread, if it hangs, ends with the process)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.to_thread(
                            self.ctx.ram_cache.note_used, vm.record.ram, [vm.machine.pid]),
                            NOTE_USED_TIMEOUT_S)
                    self._trim_later(vm.record.ram, 0.0)
                try:
                    await vm.machine.quit(timeout=3.0)
                except MachineError:
                    self._stuck[session_id] = vm
                    raise
            self._stuck.pop(session_id, None)
        with steps.step("cleanup"):
            await self.network.teardown(session_id)
            await asyncio.to_thread(self._remove_files, session_id)

    def _remove_files(self, session_id: str) -> None:
        shutil.rmtree(self.paths.run_dir(session_id), ignore_errors=True)
        shutil.rmtree(self.paths.disk_dir(session_id), ignore_errors=True)

    def _trim_later(self, digest: str, delay_s: float) -> None:
        """After ``delay_s``, keep in memory only the pages of RAM cache ``digest`` that its
        clones use (``residency``): those of every clone running then, and of those gone. One
        trim per cache at a time: a burst of restores is read by the first one's."""
        if digest not in self._trims:
            self._trims[digest] = asyncio.create_task(self._trim(digest, delay_s),
                                                      name=f"trim {digest[:12]}")

    async def _trim(self, digest: str, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            pids = [vm.machine.pid for vm in self.vms.values()
                    if vm.record.ram == digest and vm.machine.pid and not vm.stopping]
            cache = self.ctx.ram_cache

            def trim() -> int:
                cache.note_used(digest, pids)
                return cache.trim(digest)

            advised = await asyncio.to_thread(trim)
            log.debug("RAM cache %s: %d MiB not used by its clones (%d running) let go of",
                      digest[:12], advised >> 20, len(pids))
        finally:
            if self._trims.get(digest) is asyncio.current_task():
                del self._trims[digest]

    def has_vm(self, session_id: str) -> bool:
        return session_id in self.vms

    def list_vms(self) -> list[str]:
        return sorted(self.vms)

    # -- network -----------------------------------------------------------------------------
    @property
    def network_enforced(self) -> bool:
        return self.network.enforced

    async def port_address(self, session_id: str, port: int) -> tuple[str, int]:
        self._vm(session_id)
        address = self.network.port_address(session_id, port)
        if address is None:
            raise ConflictError(f"session {session_id}: inbound access is disabled")
        return address

    async def image_digest(self, image_id: str) -> str:
        """The digest of an image's disk as it is now (a rebuilt image has a new one)."""
        disk, _kernel, _initrd, _cmdline = await asyncio.to_thread(self.ctx.image_artifacts,
                                                                   image_id)
        return disk

    async def list_images(self) -> list[Image]:
        from ..images import builder

        return await asyncio.to_thread(builder.list_images, self.paths.layout)

    def memory_used_mib(self) -> int:
        pids = [pid for vm in [*self.vms.values(), *self._stuck.values()]
                for pid in (vm.machine.pid, vm.machine.net_pid) if pid]
        return pss_mib(pids)

    def tmpfs_use(self) -> TmpfsUse:
        return tmpfs_use(self.paths.layout.run)

    # -- health ------------------------------------------------------------------------------
    async def _watch(self, vm: VM) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if vm.stopping:
                return
            reason = None
            if not vm.machine.alive():
                reason = f"the VM stopped unexpectedly: {vm.machine.exit_reason()}"
            elif vm.machine.net_pid and not vm.machine.net_alive():
                reason = "the network helper (passt) of the VM exited; the VM was stopped"
            else:
                broken = await self.network.broken(vm.session_id)
                if broken is not None:
                    reason = f"{broken}; the VM was stopped"
            if reason is None:
                vm.sample_cpu(time.monotonic(), cpu_seconds(vm.machine.pid)
                              if vm.machine.pid else None)
                continue
            log.warning("session %s: %s", vm.session_id, reason)
            # reported once its processes are gone: until then the session stays live
            while True:
                try:
                    await self._destroy(vm.session_id, vm)
                    break
                except MachineError as exc:
                    log.error("session %s: %s; trying again", vm.session_id, exc.message)
                    await asyncio.sleep(WATCH_INTERVAL_S)
            await self._gone.put(VMGone(vm.session_id, reason))
            return

    async def watch(self) -> AsyncIterator[VMGone]:
        while True:
            yield await self._gone.get()

    # -- recovery ------------------------------------------------------------------------------
    async def recover(self, live: dict[str, list[VolumeMountSpec]]) -> Recovered:
        """Find the VMs of ``live`` sessions again; stop and remove everything else of ours.

        Idempotent: a VM this host already holds is found as it is. A host worker recovers at
        its own start, and a control plane that starts later asks again: attaching a second
        time would wait forever on QEMU's monitor, which serves one client."""
        found: list[str] = []
        lost: dict[str, str] = {}
        for session_id, mounts in live.items():
            if session_id in self.vms:
                found.append(session_id)
                continue
            try:
                vm = await self._attach(session_id)
            except (TenkiError, OSError, ValueError, KeyError) as exc:
                why = exc.message if isinstance(exc, TenkiError) else str(exc)
                lost[session_id] = f"VM not found after server restart ({why})"
                await self._destroy(session_id, None)
                continue
            self.vms[session_id] = vm
            async with vm.lock:
                lost_vols = await vols.recover_mounts(vm, mounts, self.paths.volume_file)
            if lost_vols:
                log.warning("%s: volumes lost on recovery: %s", session_id, lost_vols)
            self._watchers[session_id] = asyncio.create_task(self._watch(vm))
            found.append(session_id)
            log.info("session %s: VM (pid %s) found again", session_id, vm.machine.pid)
        killed = await asyncio.to_thread(self._kill_strays)
        await asyncio.to_thread(self._remove_leftovers)
        await self.network.remove_strays()
        return Recovered(found, lost, killed)

    async def _attach(self, session_id: str) -> VM:
        disk_dir = self.paths.disk_dir(session_id)
        record = VMRecord.load(disk_dir)
        VMRecord.drop_partial(disk_dir)  # e.g. killed while a capture saved the note
        ram = self.ctx.ram_cache.path(record.ram) if record.ram else None
        files = self.paths.files(session_id)
        machine = Machine(session_id, files,
                          self.ctx.machine_config(record.shape, ram, record.ram_shared))
        agent = AgentClient(files.agent)
        try:
            await machine.attach()
            if await machine.status() != "running":
                # a capture was cut short by a crash: the guest must not stay frozen
                await machine.resume()
            await agent.connect(RECOVER_AGENT_TIMEOUT_S)
        except BaseException:
            await agent.close()
            try:
                await machine.kill()
            except MachineError as exc:
                # the stray sweep at the end of recovery tries again, and waits
                log.warning("%s: %s", session_id, exc.message)
            raise
        await self._follow_qemu_chain(machine, record, disk_dir)
        if record.net is not None:
            await self.network.adopt(VMNet(self.network.owner, session_id,
                                           int(record.net["slot"])),
                                     NetworkSpec.from_json(record.net.get("spec")))
        shutil.rmtree(self.paths.staging(session_id), ignore_errors=True)
        return VM(record, machine, agent, disk_dir)

    @staticmethod
    async def _follow_qemu_chain(machine: Machine, record: VMRecord, disk_dir: Path) -> None:
        """A capture killed between freezing the disk and saving the note leaves QEMU on a
        newer top than the note says: QEMU's own chain decides (the layers in between are
        frozen, and hashed at the next capture's seal)."""
        _node, top_file = await machine.top_node()
        top = Path(top_file)
        if top.parent != disk_dir or top.name == record.top:
            return
        own = [name for name, _ in record.frozen]
        if record.top not in own:
            record.frozen.append((record.top, ""))
        record.top = top.name
        record.save(disk_dir)
        log.info("%s: disk chain taken from QEMU (top %s)", record.session_id, top.name)

    def _kill_strays(self) -> int:
        """SIGKILL every process of ours that no VM of this host owns, and wait (at most
        ``STRAY_WAIT_S``) until they are gone: the files they use are removed next."""
        killed: dict[int, tuple[int | None, str]] = {}
        for pid, (owner, cmd) in our_processes(self.paths.layout.run).items():
            vm = self.vms.get(owner)
            if vm is not None and pid in (vm.machine.pid, vm.machine.net_pid):
                continue
            started = start_time(pid)
            log.warning("killing pid %d: no live session owns it (%s)", pid, cmd[:200])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed[pid] = (started, cmd)
        deadline = time.monotonic() + STRAY_WAIT_S
        # by pid and start time: a dying process's command line already reads empty
        while (left := [pid for pid, (started, _) in killed.items()
                        if pid_alive(pid) and start_time(pid) == started]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            log.error("pid %d still runs %.0fs after SIGKILL (%s)", pid, STRAY_WAIT_S,
                      killed[pid][1][:200])
        return len(killed)

    def _orphan_dirs(self, *, conversions: bool) -> list[Path]:
        """Run and disk directories of VMs this host does not hold (with ``conversions``, also
        the scratch directories of snapshot conversions, which only a crash leaves behind)."""
        owned = set(self.vms) | set(self._starting) | set(self._stuck) | set(self._spares)
        run_root = self.paths.layout.run
        runs = list(run_root.iterdir()) if run_root.exists() else []
        return [d for d in [*runs, *self.paths.disks.iterdir()]
                if d.name not in owned and (conversions or not d.name.startswith("cv-"))]

    def _remove_leftovers(self) -> None:
        for d in self._orphan_dirs(conversions=True):
            shutil.rmtree(d, ignore_errors=True)
        self.ctx.ram_cache.clear_temporaries()
        for tmp in self.store.strays():
            tmp.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        """Server stop: let go of the VMs (they keep running), stop the spares (no record
        names them) and stop background work."""
        for session_id in list(self._spares):
            await self.drop_spare(session_id)
        for task in [*self._watchers.values(), *self._trims.values()]:
            task.cancel()
        self._watchers.clear()
        self._trims.clear()
        if self._images_check is not None:
            self._images_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._images_check
        for vm in self.vms.values():
            await vm.agent.close()
            await vm.machine.disconnect()
        self.vms.clear()
        await self.network.close()

    # -- capture -------------------------------------------------------------------------------
    def _vm(self, session_id: str) -> VM:
        vm = self.vms.get(session_id)
        if vm is None or vm.stopping:
            raise ConflictError(f"session {session_id} has no running VM")
        return vm

    async def capture(self, spec: CaptureSpec) -> Captured:
        vm = self._vm(spec.session_id)
        async with vm.lock:  # one capture, hot-plug or stop at a time
            if vm.stopping:
                raise ConflictError(f"session {spec.session_id} ended before the capture")
            produced = self._producing.setdefault(spec.snapshot_id, set())
            try:
                return await capture(self.ctx, vm, spec, produced)
            finally:
                # the control plane writes the record before it next yields to the loop
                self._producing.pop(spec.snapshot_id, None)

    # -- volumes -------------------------------------------------------------------------------
    async def create_volume(self, volume_id: str, size_bytes: int) -> None:
        path = self.paths.volume_file(volume_id)
        try:
            await asyncio.to_thread(vols.make_sparse_file, path, size_bytes)
        except OSError as exc:
            raise InternalError(f"cannot create the file of volume {volume_id}: {exc}") from exc

    async def delete_volume(self, volume_id: str) -> None:
        await asyncio.to_thread(vols.remove_file, self.paths.volume_file(volume_id))

    async def volume_files(self) -> list[str]:
        return [p.stem for p in self.paths.volumes.glob("vol_*.img")]

    async def attach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        vm = self._vm(session_id)
        async with vm.lock:
            if vm.stopping:
                raise ConflictError(f"session {session_id} ended during the attach")
            await vols.plug_and_mount(vm, self.paths.volume_file(mount.volume_id), mount,
                                      mkfs=True)

    async def detach_volume(self, session_id: str, mount: VolumeMountSpec) -> None:
        vm = self._vm(session_id)
        async with vm.lock:
            await vols.umount_and_unplug(vm, mount)

    # -- processes and files ---------------------------------------------------------------------
    async def start_process(self, session_id: str, spec: ExecSpec) -> ProcessRef:
        vm = self._vm(session_id)
        argv, user = spec.argv, spec.user
        if user is not None and await vm.agent.version() < AGENT_USER_SINCE:
            # a guest restored from a snapshot taken with an older agent: switch user with
            # util-linux's setpriv instead (one program start more)
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
                    *argv]
            user = None
        try:
            agent_proc = await vm.agent.exec(argv, env=spec.env, cwd=spec.cwd,
                                             timeout_s=spec.timeout_s, stdin=spec.stdin,
                                             user=user)
        except AgentError as exc:
            if exc.errno in ("ENOENT", "EACCES", "ENOTDIR"):
                field = "cwd" if exc.errno == "ENOTDIR" else "argv"
                raise ValidationError(exc.message, field=field) from exc
            raise
        handle = ProcessHandle(session_id, agent_proc)
        handle.start()
        self.processes.add(handle)
        return ProcessRef(handle.id, handle.pid)

    def _process(self, session_id: str, process_id: str) -> ProcessHandle:
        proc = self.processes.get(process_id)
        if proc is None or proc.session_id != session_id:
            raise NotFoundError(f"process {process_id} not found in session {session_id}")
        return proc

    def process_events(self, session_id: str,
                       process_id: str) -> AsyncGenerator[ProcessEvent, None]:
        return self._process(session_id, process_id).stream()

    async def process_stdin(self, session_id: str, process_id: str, data: bytes) -> None:
        proc = self._process(session_id, process_id)
        try:
            await proc.agent_proc.write_stdin(data)
        except AgentError as exc:
            raise _stdin_error(exc, process_id) from exc

    async def process_close_stdin(self, session_id: str, process_id: str) -> None:
        proc = self._process(session_id, process_id)
        try:
            await proc.agent_proc.close_stdin()
        except AgentError as exc:
            raise _stdin_error(exc, process_id) from exc

    async def process_kill(self, session_id: str, process_id: str, signal: int) -> None:
        await self._process(session_id, process_id).agent_proc.kill(signal)

    async def process_exit(self, session_id: str, process_id: str) -> int | None:
        """Wait until the process has exited; its exit code (None if the VM went away)."""
        proc = self._process(session_id, process_id)
        try:
            end = await proc.wait_exit()
        except (TenkiError, OSError):
            return None
        code = end.get("exit_code")
        return int(code) if code is not None else None

    def running_processes(self, session_id: str) -> int:
        return self.processes.running(session_id)

    async def read_file(self, session_id: str, path: str) -> AsyncGenerator[bytes, None]:
        vm = self._vm(session_id)
        try:
            async for chunk in vm.agent.read_file_chunks(path):
                yield chunk
        except AgentError as exc:
            raise _file_error(exc, session_id, path) from exc

    async def write_file(self, session_id: str, path: str, chunks: AsyncIterable[bytes],
                         mode: int) -> int:
        vm = self._vm(session_id)
        try:
            return await vm.agent.write_file_chunks(path, chunks, mode)
        except AgentError as exc:
            raise _file_error(exc, session_id, path) from exc

    # -- artifacts -------------------------------------------------------------------------------
    def referenced_locally(self) -> set[str]:
        refs: set[str] = set(self.ctx.image_digests)
        for produced in self._producing.values():
            refs.update(produced)
        for vm in [*self.vms.values(), *self._stuck.values(),
                   *(v for s in self._starting.values() for v in s),
                   *(v for spare in self._spares.values() for v in spare.slot)]:
            r = vm.record
            refs.update(r.layers)
            refs.update((r.shape.kernel, r.shape.initrd))
            refs.update(d for _, d in r.frozen if d)
            if r.ram:
                refs.add(r.ram)
            refs.update(r.ram_chain)  # a rebuild of its cache reads them all
        return refs

    async def collect_garbage(self, referenced: set[str], grace_s: float | None = None) -> int:
        """Remove artifacts and caches nothing references. ``grace_s`` spares younger ones (a
        capture in flight puts its files a moment before its record names them); recovery,
        with nothing in flight, passes 0."""
        keep = referenced | self.referenced_locally()
        grace = GC_GRACE_S if grace_s is None else grace_s
        freed = await asyncio.to_thread(self.store.collect, keep, grace)
        freed += await asyncio.to_thread(self.ctx.ram_cache.collect, keep, grace)
        if freed:
            log.info("freed %d bytes of unreferenced artifacts and caches", freed)
        return freed

    async def verify_artifacts(self, digests: dict[str, str], *, deep: bool) -> dict[str, str]:
        return await asyncio.to_thread(self.store.damaged, digests, deep=deep)

    async def cached_bytes(self, digests: list[str]) -> int:
        return sum(self.store.cached_size(d) for d in set(digests))

    def local_artifacts(self) -> list[InUse]:
        """The stored files of the built images (one not stored yet is read in full when a
        boot stores it), and what every VM of this host runs on.

        With a bucket, files are known stored from an earlier check: on the event loop the
        others are checked in a thread for a later call (a file is stored once, by a boot, and
        stays); elsewhere at once. A local store is asked at once (a stat)."""
        built = self.ctx.built_images()
        self._check_images_stored([d for d in built if d not in self._images_stored])
        out = [InUse(d, kind, image_id=image_id)
               for d, (image_id, kind) in built.items() if d in self._images_stored]
        for vm in [*self.vms.values(), *self._stuck.values(),
                   *(v for s in self._starting.values() for v in s),
                   *(v for spare in self._spares.values() for v in spare.slot)]:
            r = vm.record
            layers = [*r.layers, *(d for _, d in r.frozen if d)]
            uses = {**{d: f"disk layer {i}" for i, d in enumerate(layers)},
                    r.shape.kernel: "kernel", r.shape.initrd: "initrd",
                    **{d: "RAM image" for d in r.ram_chain},
                    **({r.ram: "RAM image"} if r.ram else {})}
            out += [InUse(d, kind, session_id=r.session_id) for d, kind in uses.items()]
        return out

    def _check_images_stored(self, digests: list[str]) -> None:
        if not digests or (self._images_check is not None and not self._images_check.done()):
            return

        def check() -> None:
            self._images_stored.update(d for d in digests if self.store.has(d))

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or not self.store.remote:
            check()
            return

        async def in_thread() -> None:
            try:
                await asyncio.to_thread(check)
            except Exception as exc:  # asked again at the next call
                log.warning("cannot tell whether the images' files are stored: %s", exc)

        self._images_check = loop.create_task(in_thread(), name="images stored?")

    async def scrub_caches(self, repair: bool) -> CacheScrub:
        return await asyncio.to_thread(self.ctx.ram_cache.scrub, repair=repair)

    async def remove_unowned(self, found: list[Unowned], referenced: set[str],
                             live_sessions: set[str]) -> list[Unowned]:
        def owned(session_id: str) -> bool:
            return session_id in self.vms or session_id in self._starting \
                or session_id in self._stuck or session_id in self._spares \
                or session_id in live_sessions

        keep = referenced | self.referenced_locally()
        return await asyncio.to_thread(unowned.remove, found, store=self.store, paths=self.paths,
                                       owned=owned, referenced=keep, processes=our_processes)

    def unowned_files(self, referenced: set[str]) -> list[Unowned]:
        """What this host stores that nothing owns (for ``tenki admin verify``), named without
        host paths: a temporary by its path in the data directory."""
        home = self.paths.layout.home
        out = [Unowned("temporary", unowned.temporary_name(p, home)) for p in self.store.strays()]
        keep = referenced | self.referenced_locally()
        now = time.time()
        out += [Unowned("artifact", a.digest) for a in self.store.entries()
                if a.digest not in keep and now - a.stored_at >= GC_GRACE_S]
        # a VM's run directory (tmpfs) and disk directory are both named by its session
        vms = sorted({d.name for d in self._orphan_dirs(conversions=False)})
        return out + [Unowned("vm", name) for name in vms]


def _stdin_error(exc: AgentError, process_id: str) -> TenkiError:
    """The process exited, or its stdin was closed or never opened: the caller's mistake."""
    if exc.errno in ("ESRCH", "EPIPE", "EBADF"):
        return ConflictError(f"process {process_id} takes no more input: {exc.message}")
    return exc


def _file_error(exc: AgentError, session_id: str, path: str) -> TenkiError:
    if exc.errno == "ENOENT":
        return NotFoundError(f"{path}: no such file or directory (session {session_id})")
    if exc.errno in ("EISDIR", "ENOTDIR", "EACCES", "EPERM", "EROFS", "ENOSPC", "EFBIG"):
        return ValidationError(f"{path}: {exc.message}", field="path")
    return InternalError(f"{path}: {exc.message}")


__all__ = ["LocalHost", "MachineError"]

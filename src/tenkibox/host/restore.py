"""Restore: a new VM that continues from the captured instant. Nothing boots.

One ordered list of named, timed steps:

1. ``verify``      every artifact of the manifest exists and matches its digest (see
                   ``artifacts.digests`` for when the content is read again)
2. ``overlay``     the VM's own writable qcow2 on top of the snapshot's frozen chain
3. ``load-ram``    the RAM image, unpacked once per image into a verified cache that every
                   restored VM maps copy-on-write (clones share its pages)
4. ``network``     a namespace and tap device of its own (``host/network``); its addresses,
                   rules and DNS forwarder are built meanwhile, beside the launch
5. ``launch``      QEMU with exactly the captured device set, ``-incoming defer``
6. ``wire``        the rest of the network is in place before the guest can send anything: the
                   clone's traffic leaves with its own address, under its own session's policy,
                   and a connection the source had open is answered with a reset
7. ``load-state``  ``migrate-incoming`` of the device state (``x-ignore-shared``: RAM is the file)
8. ``resume``      ``cont`` (an incoming VM stays paused otherwise)
9. ``agent``       the guest's agent, still running from before, answers the new socket; from
                   agentd 0.5.2 it does steps 10 and 11 in the same request (and step 10
                   follows again when the guest read that request late: see below)
10. ``clock``      the guest clock is set to the host's (it is behind by the snapshot's age)
11. ``identity``   new hostname, machine-id and entropy, so clones do not share them (not for
                   the resume of a paused session: it is the same guest); with an agent from
                   0.4.0 steps 10 and 11 are one request, the step ``settle``.
Meanwhile the guest warms its exec path (its agent's warm-up, started by step 9 from agentd
0.5.1, by ``settle`` before) unless this host's cores are all taken (``warm_exec_path``).

Round trips are what a restore waits for once the guest runs, so there is one:

- the agent's socket is connected right after ``launch`` (QEMU listens from its start), while
  the device state loads;
- once the guest runs, its first request is a ``ping`` that carries the settle (``clock`` and
  ``identity``) and the warm-up's start: an agent from 0.5.2 does all of it and answers once
  (step ``agent``). The ping carries the host's time at sending, right after ``resume``, but a
  guest that just woke reads it late (~40 ms under TCG here), so its clock is that far behind:
  the answer says the guest's clock as it left, and when it is more than
  ``CLOCK_BEHIND_MAX_S`` behind the host's on arrival, ``clock`` sets it again (the guest now
  answers at once: the error is one way of a short round trip, as it was when the settle
  followed a separate ping, a round trip later). An older agent answers the ping only: then
  ``clock`` and ``identity`` follow as one request (``settle``, agents from 0.4.0), or as two
  (older ones, a snapshot taken before), sent at once with the host's time then.

The VM is not usable before the last step: until then the record stays CREATING, and a server
that dies in between leaves a VM that recovery kills (the session then FAILED), never a clone
with the source's identity or a stale clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ..artifacts.store import ArtifactError
from ..engine import disks
from ..engine.agent import SETTLE_SINCE, WARM_PING_SINCE, AgentClient, guest_answer
from ..engine.machine import LaunchOptions, Machine
from ..engine.migration import load_state
from ..errors import SnapshotFailedError, TenkiError
from ..steps import Steps
from .api import RestoreSpec, SnapshotDamagedError
from .boot import launch, vm_network
from .context import HostContext
from .vm import VM, VMRecord

log = logging.getLogger(__name__)

#: the first bytes of a zstd frame (a raw device state begins with QEMU's "QEVM")
STATE_ZSTD = b"\x28\xb5\x2f\xfd"

RESTORE_AGENT_TIMEOUT_S = 30.0
#: how far behind a restored guest's clock may be left after its settle (``_settle``)
CLOCK_BEHIND_MAX_S = 0.005


def device_state_file(stored: Path, scratch: Path) -> Path:
    """The device state as QEMU reads it: one stored zstd-compressed (captures since lineages:
    ~0.75 MiB of mostly ROM and device tables shrinks to ~0.33 MiB, stored again by every
    snapshot) is unpacked to ``scratch`` on the run directory's tmpfs; one stored raw (older
    snapshots) is read as it is. The stored file was verified against its digest before."""
    with open(stored, "rb") as f:
        if f.read(len(STATE_ZSTD)) != STATE_ZSTD:
            return stored
        f.seek(0)
        with open(scratch, "wb") as out:
            zstandard.ZstdDecompressor().copy_stream(f, out)
    return scratch


def verify_manifest(ctx: HostContext, snapshot_id: str, digests: dict[str, str]) -> None:
    """Raise SnapshotDamagedError naming the first missing or corrupt artifact."""
    bad = ctx.store.damaged(digests)
    if bad:
        raise SnapshotDamagedError(
            f"snapshot {snapshot_id} cannot be restored: {next(iter(bad.values()))}")


@dataclass
class Prepared:
    """A restore up to its guest's first instruction (``prepare``): QEMU launched, its device
    state loaded, the guest paused, its agent's socket connecting (``opening``). ``finish``
    runs it; the owner of one that is not finished stops its VM (``LocalHost``)."""

    vm: VM
    opening: asyncio.Future[None]
    #: how TCG runs its vCPUs (``LaunchOptions.tcg_threads``), fixed at its launch
    tcg_threads: str | None
    timings: dict[str, float]

    def abandon(self) -> None:
        """Stop connecting its agent (the VM itself is its owner's to stop)."""
        if not self.opening.done():
            self.opening.cancel()


async def restore(ctx: HostContext, spec: RestoreSpec, vm_slot: list[VM],
                  tcg_threads: str | None = None) -> VM:
    """Restore ``spec`` (the steps above); the VM is appended to ``vm_slot`` as soon as it
    exists, as for a boot. ``tcg_threads``: ``LaunchOptions.tcg_threads``."""
    steps = Steps(log, f"{spec.session_id} from {spec.snapshot_id}", plan="restore")
    prepared = await prepare(ctx, spec, vm_slot, tcg_threads, steps)
    return await finish(ctx, spec, prepared, steps)


async def prepare(ctx: HostContext, spec: RestoreSpec, vm_slot: list[VM],
                  tcg_threads: str | None, steps: Steps) -> Prepared:
    """Steps ``verify`` to ``load-state``: a VM that ``finish`` resumes, at once or later (a
    spare, ``host.spares``). Raises ``SnapshotFailedError`` or ``SnapshotDamagedError``."""
    m = spec.manifest
    with steps.step("verify"):
        await asyncio.to_thread(verify_manifest, ctx, spec.snapshot_id, m.digests())
    record = VMRecord(spec.session_id, m.shape, list(m.layers), ram=m.ram, ram_chain=m.rams,
                      lineage=m.rams, state=m.state)
    disk_dir = ctx.layout.disk_dir(spec.session_id)
    with steps.step("overlay"):
        record.save(disk_dir)
        await asyncio.to_thread(disks.create_overlay, disk_dir / record.top,
                                ctx.store.local_path(m.layers[-1]), reuse=True)
    with steps.step("load-ram"):
        try:
            ram_base = await ctx.ram_cache.ensure(m.ram)
        except (ArtifactError, ValueError, OSError) as exc:
            why = exc.message if isinstance(exc, TenkiError) else str(exc)
            raise SnapshotDamagedError(
                f"snapshot {spec.snapshot_id} cannot be restored: RAM image unreadable: {why}"
            ) from exc
    files = ctx.layout.files(spec.session_id)
    machine = Machine(spec.session_id, files, ctx.machine_config(m.shape, ram_base))
    agent = AgentClient(files.agent)
    vm = VM(record, machine, agent, disk_dir)
    vm_slot.append(vm)
    try:
        with steps.step("network"):
            tap = await vm_network(ctx, vm, spec.network, whole=False)
        with steps.step("launch"):
            await launch(machine, LaunchOptions(disk_chain=vm.chain_paths(ctx.store.local_path),
                                                incoming=True, tcg_threads=tcg_threads,
                                                track_writes=ctx.tracking()), tap)
        with steps.step("wire"):
            await ctx.network.wired(spec.session_id)
        opening = await _load_state(ctx, spec, machine, agent, steps)
    except TenkiError as exc:
        if isinstance(exc, SnapshotFailedError):
            raise
        raise _failed(spec, steps, exc) from exc
    return Prepared(vm, opening, tcg_threads, dict(steps.timings))


def still_intact(ctx: HostContext, spec: RestoreSpec) -> None:
    """What ``verify`` and ``load-ram`` checked, again, for a restore prepared earlier (a
    spare): its artifacts and the RAM cache its guest maps, which the guest reads only once it
    runs. Raises ``SnapshotDamagedError``; cheap (stat keys, no hashing)."""
    verify_manifest(ctx, spec.snapshot_id, spec.manifest.digests())
    if not ctx.ram_cache.intact(spec.manifest.ram):
        raise SnapshotDamagedError(f"snapshot {spec.snapshot_id}: its RAM cache changed since "
                                   "the spare mapped it")


async def _load_state(ctx: HostContext, spec: RestoreSpec, machine: Machine,
                      agent: AgentClient, steps: Steps) -> asyncio.Future[None]:
    """Step ``load-state``; the agent's socket, there from QEMU's start, is connected
    meanwhile: that connection is returned, made or in flight (ended if the step fails)."""
    opening = asyncio.ensure_future(agent.open(RESTORE_AGENT_TIMEOUT_S))
    try:
        with steps.step("load-state"):
            scratch = ctx.layout.files(spec.session_id).run_dir / "state.bin"
            try:
                state = await asyncio.to_thread(device_state_file,
                                                ctx.store.local_path(spec.manifest.state),
                                                scratch)
                await load_state(machine, state)
            finally:
                scratch.unlink(missing_ok=True)
    except BaseException:
        await _retrieve(opening)
        raise
    return opening


async def finish(ctx: HostContext, spec: RestoreSpec, prepared: Prepared,
                 steps: Steps) -> VM:
    """The rest of a restore ``prepare`` began: the guest resumed, its clock and identity
    set (``_settle``). Raises ``SnapshotFailedError``; the VM is then its owner's to stop."""
    vm = prepared.vm
    try:
        await _settle(spec, vm.machine, vm.agent, prepared.opening, steps,
                      warm=warm_exec_path(ctx.accel, prepared.tcg_threads))
    except TenkiError as exc:
        if isinstance(exc, SnapshotFailedError):
            raise
        raise _failed(spec, steps, exc) from exc
    vm.timings = steps.timings
    log.info("%s: restored from %s in %.3fs", spec.session_id, spec.snapshot_id, steps.total)
    return vm


def _failed(spec: RestoreSpec, steps: Steps, exc: TenkiError) -> SnapshotFailedError:
    return SnapshotFailedError(
        f"restore of {spec.snapshot_id} failed at {steps.current or 'start'}: {exc.message}")


async def _retrieve(opening: asyncio.Future[None]) -> None:
    """End an agent connection in flight; retrieved here, so that a failure another step
    reported is not logged as unretrieved."""
    if not opening.done():
        opening.cancel()
    with contextlib.suppress(BaseException):
        await opening


def warm_exec_path(accel: str, tcg_threads: str | None) -> bool:
    """Whether a restored guest warms its exec path (from its first ping on; during ``settle``
    for agents before 0.5.1): under TCG, while each of its vCPUs has a core (``tcg_threads``
    is not ``single``). The warm-up translates the
    guest's fork, exec and libc start-up on its other vCPU, so that the user's first exec does
    not: 23-50 ms sooner for one restore. With the cores taken it is only CPU taken from the
    guests starting beside it, one thread running both vCPUs in turn: ten clones of a 1 GiB
    snapshot at once were ready and had answered an exec in 2.55 s without it against 3.19 s
    with it (medians of 4 bursts, alternating; the machine's CPU 4.97 against 6.12 s). Under
    KVM nothing is translated."""
    return accel != "kvm" and tcg_threads != "single"


async def _settle(spec: RestoreSpec, machine: Machine, agent: AgentClient,
                  opening: asyncio.Future[None], steps: Steps, *, warm: bool = True) -> None:
    """From the paused guest, its device state loaded, to one running with its clock and
    identity set: steps ``resume``, ``agent`` (with the settle in it, for agents from 0.5.2),
    else then ``settle`` (or ``clock`` and ``identity``); see the module's text. ``opening``:
    the agent's connection, begun before the device state loaded. Nothing is left in flight
    when this returns or raises."""
    try:
        with steps.step("resume"):
            await machine.resume()
        # a resume carries on the same guest: it keeps its identity
        identity = None if spec.keep_identity else (
            spec.hostname, secrets.token_hex(16), os.urandom(64))
        with steps.step("agent"):
            await guest_answer(machine, opening)
            # sent now that the guest runs: it carries the host's time at sending
            settled = await guest_answer(machine, agent.ping_settle(
                identity, warm=warm, timeout=RESTORE_AGENT_TIMEOUT_S))
    finally:
        await _retrieve(opening)
    if settled is not None:
        log.debug("%s: settled in the ping: %.3fs in the guest, its clock %.3fs behind",
                  spec.session_id, settled["took_s"], settled["behind_s"])
        if settled["behind_s"] > CLOCK_BEHIND_MAX_S:
            # the guest, just woken, read the request late: set again, now that it answers
            # at once (one short round trip; the error is then its one way)
            with steps.step("clock"):
                await agent.set_time(time.time_ns())
        return
    version = await agent.version()  # known from the ping: no request
    if version >= SETTLE_SINCE:
        with steps.step("settle"):
            # an agent that took the ping's ``warm`` runs its warm-up already
            took = await agent.settle(identity, warm=warm and version < WARM_PING_SINCE)
        log.debug("%s: settle: %.3fs in the guest", spec.session_id, took["took_s"])
        return
    with steps.step("clock"):
        await agent.set_time(time.time_ns())
    if identity is not None:
        with steps.step("identity"):
            await agent.reidentify(*identity)

"""Boot: a fresh VM from a base image. One ordered list of named, timed steps.

1. ``image``    the image's disk, kernel and initrd, as stored artifacts under the digests its
                build recorded, verified (a damaged file refuses the boot: ImageDamagedError)
2. ``overlay``  the VM's own writable qcow2 on top of the base
3. ``network``  the VM's namespace, tap device, rules and DNS forwarder (``host/network``)
4. ``launch``   QEMU, inside that namespace and handed its tap, owned by the host from before it
                starts
5. ``roms``     a VM with its RAM in a memfd (under TCG) starts stopped: its ROMs' and
                firmware's pages, as the machine's reset made them, are saved (a save that
                leaves the memfd out) for its captures by the pages it touched
                (``host/written.py``), which then need no such save inside their stop; then
                its vCPUs start
6. ``agent``    the guest agent answers (the guest has booted and configured its network)
7. ``clock``    the guest clock is set from the host's
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace

from ..engine import disks
from ..engine.agent import AgentClient, connect_agent
from ..engine.machine import LaunchOptions, Machine, MachineError, default_cpu_model, ram_pad
from ..engine.migration import save_state
from ..steps import Steps
from .api import BootSpec, MachineShape, NetworkSpec
from .context import HostContext
from .network import Tap
from .vm import VM, VMRecord

log = logging.getLogger(__name__)

BOOT_AGENT_TIMEOUT_S = 180.0


def shares_ram(accel: str) -> bool:
    """Whether a VM booted here gets its RAM in a memfd (``MachineConfig.ram_shared``), to be
    captured by the pages it touched (``host/written.py``): under TCG, where a live save's
    first dirty sync costs ~0.75 s per GiB of RAM however little the guest touched. Not under
    KVM, which tracks dirty pages itself (and a live save reads every page of a memfd,
    allocating it), nor with ``TENKI_DIRECT_CAPTURE=0``."""
    return os.environ.get("TENKI_DIRECT_CAPTURE", "1") != "0" and accel != "kvm"


async def save_roms(machine: Machine) -> None:
    """Save the ROMs of a VM launched stopped (``MachineFiles.rom_state``, written whole or not
    at all), then start it. The guest never writes them: what a restore's own reset puts in
    them is the same, and the ACPI tables QEMU rebuilds when the firmware first reads them are
    copied into guest RAM by the firmware (a reset rebuilds them again). A failed save only
    costs the captures that save inside their stop."""
    dst = machine.files.rom_state
    part = dst.with_name(dst.name + ".part")
    try:
        await save_state(machine, part, with_ram=False)
        os.replace(part, dst)
    except (MachineError, OSError) as exc:
        part.unlink(missing_ok=True)
        log.warning("%s: its ROMs were not saved (%s): its captures save them", machine.name,
                    exc)
    await machine.resume()


async def vm_network(ctx: HostContext, vm: VM, spec: NetworkSpec, *,
                     whole: bool = True) -> Tap | None:
    """Build the VM's network and note it in its record; its tap, open, for QEMU's launch
    (None where the host builds none). ``whole=False``: only what the launch needs, the rest
    built meanwhile (``HostNetwork.prepare``; ``HostNetwork.wired`` waits for it)."""
    tap = await (ctx.network.setup if whole else ctx.network.prepare)(vm.session_id, spec)
    if tap is None:
        return None
    vm.record.net = {"slot": tap.net.slot, "spec": spec.to_json()}
    try:
        await asyncio.to_thread(vm.record.save, vm.disk_dir)
    except BaseException:
        tap.close()
        raise
    return tap


async def launch(machine: Machine, opts: LaunchOptions, tap: Tap | None) -> None:
    """``machine.launch`` with the VM's tap: QEMU runs in its namespace and gets a copy of its
    descriptor; the server's copy is closed once QEMU has its own (or failed to start)."""
    if tap is not None:
        opts = replace(opts, netns=tap.net.netns, tap_fd=tap.fd)
    try:
        await machine.launch(opts)
    finally:
        if tap is not None:
            tap.close()


async def boot(ctx: HostContext, spec: BootSpec, vm_slot: list[VM],
               tcg_threads: str | None = None) -> VM:
    """Boot ``spec``; the VM is appended to ``vm_slot`` as soon as its QEMU exists, so that a
    terminate arriving meanwhile can stop it (the host owns it from launch on).
    ``tcg_threads``: ``LaunchOptions.tcg_threads``."""
    steps = Steps(log, spec.session_id, plan="boot")
    with steps.step("image"):
        disk, kernel, initrd, cmdline = await asyncio.to_thread(ctx.image_artifacts,
                                                                spec.image_id)
    shape = MachineShape(cpu=spec.cpu, memory_mb=spec.memory_mb, kernel=kernel, initrd=initrd,
                         cmdline=f"{cmdline} tenki.hostname={spec.hostname}",
                         cpu_model=default_cpu_model(ctx.accel), ram_pad=ram_pad(ctx.accel))
    record = VMRecord(spec.session_id, shape, [disk], ram_shared=shares_ram(ctx.accel))
    disk_dir = ctx.layout.disk_dir(spec.session_id)
    with steps.step("overlay"):
        record.save(disk_dir)
        await asyncio.to_thread(disks.create_overlay, disk_dir / record.top,
                                ctx.store.local_path(disk), reuse=True)
    files = ctx.layout.files(spec.session_id)
    cfg = ctx.machine_config(shape, ram_base=None, ram_shared=record.ram_shared)
    machine = Machine(spec.session_id, files, cfg)
    agent = AgentClient(files.agent)
    vm = VM(record, machine, agent, disk_dir)
    vm_slot.append(vm)
    with steps.step("network"):
        tap = await vm_network(ctx, vm, spec.network)
    with steps.step("launch"):
        await launch(machine, LaunchOptions(disk_chain=vm.chain_paths(ctx.store.local_path),
                                            paused=cfg.ram_shared, tcg_threads=tcg_threads,
                                            track_writes=ctx.tracking()),
                     tap)
    if cfg.ram_shared:
        with steps.step("roms"):
            await save_roms(machine)
    with steps.step("agent"):
        await connect_agent(machine, agent, BOOT_AGENT_TIMEOUT_S)
    with steps.step("clock"):
        await agent.set_time(time.time_ns())
    vm.timings = steps.timings
    return vm

"""Capture: memory, device state and disk of a running VM, taken inside one short pause.

Steps (each logged and timed):

1. ``pause``        ``stop``; QEMU drains in-flight disk I/O.
2. ``freeze-disk``  ``blockdev-snapshot-sync``: the current top layer becomes read-only and the
                    VM continues on a new overlay. Done before the migration because a completed
                    migration inactivates the block layer until ``cont``.
3. ``device-state`` ``migrate`` with ``x-ignore-shared`` to a file: device state and the small
                    ROM/ACPI blocks only (~1 MiB); guest RAM is a shared file and is skipped.
4. ``copy-ram``     sparse copy of the RAM file (touched pages only) to a tmpfs staging file.
                    (A restored VM maps its RAM privately: step 3 streams the RAM instead and
                    ``convert_stream`` turns it into the same format afterwards.)
5. ``resume``       ``cont``; always attempted, whatever failed before, if the guest was running.

The disk layer and the memory come from the same pause: pairing memory with an older disk
layer looks fine at first (the page cache hides it) and corrupts the filesystem later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..engine import disks
from ..engine.machine import LaunchOptions, Machine, MachineConfig, MachineError, MachineFiles
from ..steps import Steps
from . import ramfile

log = logging.getLogger(__name__)

MIGRATE_TIMEOUT_S = 60.0


@dataclass
class Captured:
    frozen_layer: Path  # the layer that is now read-only and belongs to the snapshot chain
    new_top: Path  # where the session continues
    state_file: Path
    ram_staging: Path
    paused_s: float
    # A restored VM maps its RAM privately, so QEMU streams that RAM with the device state;
    # the stream is then turned into the usual RAM image + device state (``convert_stream``).
    stream: Path | None = None


async def enable_snapshot_caps(machine: Machine, ignore_shared: bool = True) -> None:
    """Migration settings a capture needs (idempotent; also set on the restore side).

    ``x-ignore-shared`` changes the stream's format, so both ends of one stream must agree.
    """
    await machine.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": ignore_shared},
    ]})
    # the default bandwidth cap (128 MiB/s) applies even to a paused guest
    await machine.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})


async def wait_migration(machine: Machine, timeout: float = MIGRATE_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        info = await machine.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            raise MachineError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise MachineError(f"migration did not complete in {timeout:.0f}s (status {status})")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def capture(machine: Machine, steps: Steps, *, new_top: Path, state_file: Path,
                  ram_staging: Path, node_name: str) -> Captured:
    private = machine.cfg.ram_base is not None
    stream = ram_staging.with_suffix(".stream") if private else None
    was_running = (await machine.status()) == "running"
    paused_at = time.monotonic()
    frozen: Path | None = None
    try:
        with steps.step("pause"):
            await machine.pause()
        with steps.step("freeze-disk"):
            top_node, top_file = await machine.top_node()
            await machine.execute("blockdev-snapshot-sync", {
                "node-name": top_node, "snapshot-file": str(new_top),
                "snapshot-node-name": node_name, "format": "qcow2",
            })
            frozen = Path(top_file)
        with steps.step("device-state"):
            await enable_snapshot_caps(machine, ignore_shared=not private)
            await machine.execute("migrate", {"uri": f"exec:cat > {stream or state_file}"})
            await wait_migration(machine)
        if not private:
            with steps.step("copy-ram"):
                await asyncio.to_thread(ramfile.sparse_copy, machine.files.ram, ram_staging)
    finally:
        if was_running:
            with steps.step("resume"):
                await machine.resume()
    paused_s = time.monotonic() - paused_at
    assert frozen is not None
    return Captured(frozen, new_top, state_file, ram_staging, paused_s, stream)


async def convert_stream(cfg: MachineConfig, chain: list[Path], stream: Path, work_dir: Path,
                         ram_out: Path, state_out: Path, steps: Steps) -> None:
    """Load a full migration stream into a scratch QEMU that never runs, with its RAM in a
    shared file, and save it again without the RAM: the usual RAM image + device state.

    Runs after the session has resumed, so it costs the session no pause.
    """
    files = MachineFiles(work_dir)
    scratch = Machine(f"convert-{work_dir.name}", files, replace(cfg, ram_base=None))
    try:
        with steps.step("convert"):
            work_dir.mkdir(parents=True, exist_ok=True)
            top = work_dir / "scratch.qcow2"
            await asyncio.to_thread(disks.create_overlay, top, chain[-1])
            await scratch.launch(LaunchOptions([*chain, top], incoming=True))
            await enable_snapshot_caps(scratch, ignore_shared=False)
            await scratch.execute("migrate-incoming", {"uri": f"exec:cat {stream}"})
            await wait_migration(scratch)
            await enable_snapshot_caps(scratch, ignore_shared=True)
            await scratch.execute("migrate", {"uri": f"exec:cat > {state_out}"})
            await wait_migration(scratch)
            await scratch.kill()
            os.replace(files.ram, ram_out)
    finally:
        await scratch.kill()
        scratch.cleanup_files()

"""QEMU migration, used for snapshots: capabilities, waiting, and converting a full stream.

A snapshot's device state is a migration stream written to a file; with ``x-ignore-shared`` it
leaves out guest RAM, which lives in a shared file and is copied (or mapped) separately.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import disks
from .machine import LaunchOptions, Machine, MachineConfig, MachineError, MachineFiles

MIGRATE_TIMEOUT_S = 60.0


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


async def freeze_disk(machine: Machine, new_top: Path, node_name: str) -> None:
    """``blockdev-snapshot-sync``: the current top layer becomes read-only and the VM goes on
    writing to a new overlay at ``new_top`` (the guest may run or be paused)."""
    top_node, _ = await machine.top_node()
    await machine.execute("blockdev-snapshot-sync", {
        "node-name": top_node, "snapshot-file": str(new_top),
        "snapshot-node-name": node_name, "format": "qcow2",
    })


async def save_state(machine: Machine, target: Path, *, with_ram: bool) -> None:
    """Write the device state (and guest RAM, if ``with_ram``) to ``target``; waits."""
    await enable_snapshot_caps(machine, ignore_shared=not with_ram)
    await machine.execute("migrate", {"uri": f"exec:cat > {target}"})
    await wait_migration(machine)


async def load_state(machine: Machine, source: Path) -> None:
    """Load a device state written by ``save_state`` into a VM started ``-incoming defer``."""
    await enable_snapshot_caps(machine)
    await machine.execute("migrate-incoming", {"uri": f"exec:cat {source}"})
    await wait_migration(machine)


async def convert_stream(cfg: MachineConfig, chain: list[Path], stream: Path, work_dir: Path,
                         ram_out: Path, state_out: Path, steps: Any) -> None:
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

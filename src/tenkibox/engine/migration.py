"""QEMU migration, used for snapshots: capabilities, waiting, and converting a full stream.

A snapshot's device state is a migration stream written to a file; with ``x-ignore-shared`` it
leaves out guest RAM, which lives in a shared file and is copied (or mapped) separately. A
capture of a running guest saves it live instead (``start_live_save``: pre-copy, then a short
stop) and converts the full stream afterwards (``convert_stream``).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

from . import disks
from .machine import (
    LaunchOptions,
    Machine,
    MachineConfig,
    MachineError,
    MachineFiles,
    RunState,
)

MIGRATE_TIMEOUT_S = 60.0
#: the names of the descriptors a migration reads or writes (``file_uri``)
IN_FD, OUT_FD = "tenki-migrate-in", "tenki-migrate-out"
LIVE_DOWNTIME_MS = 20  # what a live save may leave for the stop: a few MiB under TCG
CONVERGE_S = 10.0
FORCED_DOWNTIME_MS = 5000


async def file_uri(machine: Machine, path: Path, *, write: bool) -> str:
    """A migration URI for ``path``: the file opened here and handed to QEMU (``fd:``). An
    ``exec:cat`` URI made QEMU fork a shell and ``cat`` for each one: a restore's
    ``load-state`` took 64 ms with it, 45 ms this way (medians of 6 restores each, two servers
    alternating; QEMU 7.2 has no ``file:`` URI)."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise MachineError(f"cannot open {path} for a migration: {exc}") from exc
    try:
        name = OUT_FD if write else IN_FD
        await machine.send_fd(name, fd)
    finally:
        os.close(fd)
    return f"fd:{name}"


async def enable_snapshot_caps(machine: Machine, ignore_shared: bool = True,
                               live: bool = False) -> None:
    """Migration settings a capture needs (idempotent; also set on the restore side).

    ``x-ignore-shared`` changes the stream's format, so both ends of one stream must agree.
    ``pause-before-switchover`` (``live``) only changes the source's steps; every capability is
    set explicitly each time because it stays set on the VM.
    """
    await machine.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": ignore_shared},
        {"capability": "pause-before-switchover", "state": live},
    ]})
    # the default bandwidth cap (128 MiB/s) applies even to a paused guest
    await machine.execute("migrate-set-parameters", {
        "max-bandwidth": 1 << 40, "downtime-limit": LIVE_DOWNTIME_MS})


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


async def freeze_disk(machine: Machine, new_top: Path, node_name: str, top_node: str) -> None:
    """``blockdev-snapshot-sync``: the current top layer ``top_node`` becomes read-only and the
    VM goes on writing to the overlay ``new_top`` (the guest may run or be paused). ``new_top``
    was made beforehand over the current top (``disks.create_overlay``), while the guest ran:
    QEMU only opens it (``mode: existing``; the step 5 ms instead of 11 inside a capture's
    stop, where QEMU created it, medians of 6 captures each)."""
    await machine.execute("blockdev-snapshot-sync", {
        "node-name": top_node, "snapshot-file": str(new_top),
        "snapshot-node-name": node_name, "format": "qcow2", "mode": "existing",
    })


async def save_state(machine: Machine, target: Path, *, with_ram: bool) -> None:
    """Write the device state (and guest RAM, if ``with_ram``) to ``target``; waits."""
    await enable_snapshot_caps(machine, ignore_shared=not with_ram)
    await machine.execute("migrate", {"uri": await file_uri(machine, target, write=True)})
    await wait_migration(machine)


async def save_devices(machine: Machine, target: Path) -> None:
    """Write the device state alone to ``target``: QEMU's ``xen-save-devices-state`` (not only
    for Xen: it is ``qemu_save_device_state``, every device section but RAM's, with no
    migration, so no dirty tracking starts). The file has the stream's header and the devices'
    sections, and no configuration and RAM sections: ``engine.stream.with_devices`` puts them
    before it. QEMU stops a running guest for it and starts it again; a stopped one stays so."""
    await machine.execute("xen-save-devices-state", {"filename": str(target), "live": False})


async def start_live_save(machine: Machine, target: Path) -> None:
    """Start a live save of a running VM to ``target``: QEMU copies RAM while the guest runs
    (pre-copy, again for the pages written meanwhile), then stops the guest when what is left
    fits in ``LIVE_DOWNTIME_MS`` and waits (``wait_switchover``). The stream holds all of RAM;
    a page sent twice is overwritten by its later copy when the stream is loaded."""
    await enable_snapshot_caps(machine, ignore_shared=False, live=True)
    await machine.execute("migrate", {"uri": await file_uri(machine, target, write=True)})


async def wait_switchover(machine: Machine, timeout: float) -> None:
    """Wait until QEMU has stopped the guest before the last pass. A guest writing memory
    faster than it can be copied never gets there by itself: ``CONVERGE_S`` after the first
    pass over all of RAM ended (QEMU's second dirty-bitmap sync), the allowed downtime is
    raised so that the next pass ends it (a longer pause, not no end). The first pass is not
    counted: it takes seconds for a large guest however little it writes. Under TCG, QEMU
    7.2's first dirty-bitmap sync of a VM finds every page dirty, and for each one scans
    every vCPU's TLB (``tlb_reset_dirty``, 97 % of the QEMU process's time then, by
    ``perf``): ~0.75 s per GiB of RAM, once per VM."""
    started = time.monotonic()
    first_pass_done: float | None = None
    forced = False
    delay = 0.001
    while True:
        info = await machine.execute("query-migrate")
        status = info.get("status")
        if status == "pre-switchover":
            machine.state = RunState.PAUSED
            return
        if status in ("failed", "cancelled", "completed"):
            raise MachineError(f"live save {status} before the switchover: "
                               f"{info.get('error-desc', 'no reason given')}")
        waited = time.monotonic() - started
        if waited > timeout:
            raise MachineError(f"live save did not reach its switchover in {timeout:.0f}s "
                               f"(status {status})")
        if first_pass_done is None and int(info.get("ram", {}).get("dirty-sync-count", 0)) >= 2:
            first_pass_done = time.monotonic()
        if (first_pass_done is not None and time.monotonic() - first_pass_done > CONVERGE_S
                and not forced):
            await machine.execute("migrate-set-parameters",
                                  {"downtime-limit": FORCED_DOWNTIME_MS})
            forced = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)


async def finish_live_save(machine: Machine, timeout: float = MIGRATE_TIMEOUT_S) -> float:
    """Send what is left (the last dirty pages and the device state) and wait; the guest stays
    stopped until the caller's ``cont``. Returns the seconds QEMU had the guest stopped."""
    await machine.execute("migrate-continue", {"state": "pre-switchover"})
    info = await wait_migration(machine, timeout)
    return float(info.get("downtime", 0)) / 1000


async def cancel_migration(machine: Machine) -> None:
    """Stop a migration in progress (its stream is then incomplete: the caller drops it)."""
    await machine.execute("migrate_cancel")


async def load_state(machine: Machine, source: Path) -> None:
    """Load a device state written by ``save_state`` into a VM started ``-incoming defer``."""
    await enable_snapshot_caps(machine)
    await machine.execute("migrate-incoming",
                          {"uri": await file_uri(machine, source, write=False)})
    await wait_migration(machine)


async def convert_stream(cfg: MachineConfig, disk_size: int, stream: Path, work_dir: Path,
                         ram_out: Path, state_out: Path) -> None:
    """Load a full migration stream into a scratch QEMU that never runs, with its RAM in a
    shared file at ``ram_out``, and save it again without the RAM: the usual RAM image +
    device state.

    Runs after the session has resumed, so it costs the session no pause. ``engine.stream``
    does the same without a QEMU, for the streams it knows. ``ram_out`` belongs
    on a disk file system, not tmpfs: loading a stream reads every page it marks as zero,
    which allocates a hole of a tmpfs file but leaves a disk file sparse (a clean page).
    The scratch's disk is a blank one of the same size: it never runs, and no device state
    refers to the disk's content.
    """
    files = MachineFiles(work_dir)
    scratch = Machine(f"convert-{work_dir.name}", files,
                      replace(cfg, ram_base=None, ram_file=str(ram_out)))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        disk = work_dir / "scratch.qcow2"
        await asyncio.to_thread(disks.create_blank, disk, disk_size)
        await scratch.launch(LaunchOptions([disk], incoming=True))
        await enable_snapshot_caps(scratch, ignore_shared=False)
        await scratch.execute("migrate-incoming",
                              {"uri": await file_uri(scratch, stream, write=False)})
        await wait_migration(scratch)
        await enable_snapshot_caps(scratch, ignore_shared=True)
        await scratch.execute("migrate",
                              {"uri": await file_uri(scratch, state_out, write=True)})
        await wait_migration(scratch)
        await scratch.kill()
    finally:
        await scratch.kill()
        scratch.cleanup_files()

"""Capture: memory, device state and disk of a running VM, taken inside one short pause,
then sealed into the artifact store. One ordered list of named, timed steps:

1. ``pause``        ``stop``; QEMU drains in-flight disk I/O.
2. ``freeze-disk``  ``blockdev-snapshot-sync``: the current top layer becomes read-only and the
                    VM continues on a new overlay. Done before the migration because a completed
                    migration inactivates the block layer until ``cont``.
3. ``device-state`` ``migrate`` with ``x-ignore-shared`` to a file: device state and the small
                    ROM/ACPI blocks only (~1 MiB); guest RAM is a shared file and is skipped.
4. ``copy-ram``     sparse copy of the RAM file (touched pages only) to tmpfs staging.
                    (A restored VM maps its RAM privately: step 3 streams the RAM instead and
                    ``convert`` turns it into the same format afterwards.)
5. ``resume``       ``cont``; always attempted, whatever failed before, if the guest was running.
6. ``compress-ram`` the staging copy, zstd-compressed, into the artifact store
7. ``checksum``     the device state and the newly frozen layer into the store; every older layer
                    verified against its digest (a layer damaged under a running VM must not be
                    sealed into a snapshot)
8. ``sync``         everything durable; only then does the caller mark the snapshot READY

The disk layer and the memory come from the same pause: pairing memory with an older disk
layer looks fine at first (the page cache hides it) and corrupts the filesystem later.
Volumes are unplugged before the pause and plugged back after (snapshots hold no volume data).
A pause of the session (``spec.leave_paused``) skips step 5: the guest stays paused for the VM to
be stopped, and is resumed only if a later step fails; its volumes stay unplugged (the resume
plugs them in again), and go back at once if it fails.
Staging files live in the VM's run directory and are removed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

from ..artifacts import ramfile
from ..artifacts.digests import sha256_file
from ..artifacts.store import ArtifactError
from ..engine.migration import convert_stream, freeze_disk, save_state
from ..errors import SnapshotFailedError
from ..steps import Steps
from . import volumes
from .api import Captured, CaptureSpec, Manifest, VolumeMountSpec
from .context import HostContext
from .vm import VM

log = logging.getLogger(__name__)


async def capture(ctx: HostContext, vm: VM, spec: CaptureSpec, produced: set[str]) -> Captured:
    """Caller holds ``vm.lock``. Every digest stored is added to ``produced`` before it is
    stored, so that the host counts it as referenced until the record names it."""
    steps = Steps(log, spec.snapshot_id, plan="capture")
    staging = ctx.layout.staging(vm.session_id) / spec.snapshot_id
    staging.mkdir(parents=True, exist_ok=True)
    held = False  # the guest is left paused (a pause): resumed if anything below fails
    unplugged: list[VolumeMountSpec] = []
    out = False  # volumes kept unplugged for a pause: plugged back if it fails after all
    try:
        unplugged = await volumes.unplug_for_capture(vm, list(spec.volumes),
                                                     ctx.layout.volume_file)
        try:
            paused_s, stream, held = await _pause_and_copy(vm, steps, staging, spec)
        finally:
            if held:  # a pause: they stay out (the VM stops next; the resume plugs them in)
                lost, out = [], bool(unplugged)
            else:  # the guest runs on: its volumes go back at once
                lost = await volumes.replug(vm, unplugged, ctx.layout.volume_file)
        log.info("%s: guest paused %.3fs", spec.snapshot_id, paused_s)
        if stream is not None:
            # short: the scratch VM's socket paths must fit in 108 bytes
            work = ctx.layout.layout.run / f"cv-{spec.snapshot_id.removeprefix('snp_')}"
            chain = vm.chain_paths(ctx.store.local_path)[:-1]
            try:
                await convert_stream(ctx.machine_config(vm.record.shape, None), chain, stream,
                                     work, staging / "ram", staging / "state.bin", steps)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        manifest, size, stored = await asyncio.to_thread(
            _seal, ctx, vm, staging, steps, spec.base_image_id, produced)
    except BaseException:
        if held:  # the original error is the one to report
            with contextlib.suppress(Exception), steps.step("resume"):
                await asyncio.shield(vm.machine.resume())
            if out:
                with contextlib.suppress(Exception):
                    await asyncio.shield(volumes.replug(vm, unplugged, ctx.layout.volume_file))
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    steps.timings["paused"] = paused_s
    return Captured(manifest, size, stored, paused_s, steps.timings, lost)


async def _pause_and_copy(vm: VM, steps: Steps, staging: Path,
                          spec: CaptureSpec) -> tuple[float, Path | None, bool]:
    """Returns the seconds paused, the stream to convert (or None), and whether the guest was
    left paused (``spec.leave_paused``, and it was running)."""
    machine = vm.machine
    private = machine.cfg.ram_base is not None
    stream = staging / "stream" if private else None
    was_running = (await machine.status()) == "running"
    paused_at = time.monotonic()
    frozen_name = vm.record.top
    new_top = f"top-{spec.snapshot_id}.qcow2"  # unique: a crashed capture's file is never reused
    done = False
    try:
        with steps.step("pause"):
            await machine.pause()
        with steps.step("freeze-disk"):
            await freeze_disk(machine, vm.disk_dir / new_top, f"top-{spec.snapshot_id}")
            # from here QEMU writes to the new top: the host's note must say so at once
            vm.record.frozen.append((frozen_name, ""))
            vm.record.top = new_top
            vm.record.save(vm.disk_dir)
        with steps.step("device-state"):
            await save_state(machine, stream or staging / "state.bin", with_ram=private)
        if not private:
            with steps.step("copy-ram"):
                copied = await asyncio.to_thread(ramfile.sparse_copy, machine.files.ram,
                                                 staging / "ram")
            # bounded by the guest's touched RAM; removed when the capture ends, or at recovery
            log.info("%s: %.1f MiB of RAM staged on tmpfs", spec.snapshot_id, copied / 2**20)
        done = True
    finally:
        if was_running and not (done and spec.leave_paused):
            with steps.step("resume"):
                await machine.resume()
    return time.monotonic() - paused_at, stream, was_running and spec.leave_paused


def _seal(ctx: HostContext, vm: VM, staging: Path, steps: Steps, base_image_id: str,
          produced: set[str]) -> tuple[Manifest, int, int]:
    store = ctx.store
    with steps.step("compress-ram"):
        packed = store.temp_path()  # packed straight onto the store's disk: no copy after
        try:
            ram_raw, ram_stored, ram_digest = ramfile.pack(staging / "ram", packed)
            produced.add(ram_digest)
            store.put(packed, digest=ram_digest, move=True)
        finally:
            packed.unlink(missing_ok=True)
    with steps.step("checksum"):
        state = staging / "state.bin"
        state_bytes = state.stat().st_size
        state_digest = sha256_file(state)
        produced.add(state_digest)
        store.put(state, digest=state_digest, move=True)
        # the layers frozen by this VM's captures: the new one is hashed now, older ones were
        for i, (name, digest) in enumerate(vm.record.frozen):
            if not digest:
                digest = sha256_file(vm.disk_dir / name)
                produced.add(digest)
                store.put(vm.disk_dir / name, digest=digest)
                vm.record.frozen[i] = (name, digest)
        vm.record.save(vm.disk_dir)
        layers = [*vm.record.layers, *(d for _, d in vm.record.frozen)]
        shape = vm.record.shape
        kinds = {shape.kernel: "kernel", shape.initrd: "initrd",
                 **{d: f"disk layer {i}" for i, d in enumerate(layers)}}
        for digest, kind in kinds.items():
            try:
                store.verify(digest, kind)
            except ArtifactError as exc:
                raise SnapshotFailedError(f"{exc.message}; not sealing a snapshot over it") \
                    from exc
    with steps.step("sync"):
        # put() fsyncs each file and the store's directory before it returns
        pass
    manifest = Manifest(shape, layers, ram_digest, state_digest, base_image_id)
    own = [d for _, d in vm.record.frozen]
    size = ram_raw + state_bytes + sum(store.size(d) for d in own)
    stored = ram_stored + state_bytes + sum(store.allocated(d) for d in own)
    return manifest, size, stored

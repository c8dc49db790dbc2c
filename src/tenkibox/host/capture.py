"""Capture: memory, device state and disk of a running VM at one instant, then sealed into the
artifact store. One ordered list of named, timed steps:

0. ``prepare``      while the guest still runs: whether it is captured by the pages it wrote
                    (``written.plan``: the pages found from QEMU's page tables, the copy's
                    target allocated and mapped), or saved live or paused; and the disk's
                    next overlay, over its current top (removed again if step 2 never
                    switches to it). ``copy-ahead`` then, where QEMU's writes are tracked
                    (``engine/writetrack.py``): the written pages copied while the guest
                    runs, so that the stop copies only those written since.
1. ``pre-copy``     a running guest is saved live (``start_live_save``): QEMU copies its RAM while
                    it runs, again for the pages written meanwhile, and stops it once what is left
                    takes ~20 ms (``wait_switchover``): the guest is stopped for the last pages and
                    the device state, however much memory it dirtied. ``pause`` instead (a plain
                    ``stop``; QEMU drains in-flight disk I/O) for a guest that stays paused
                    anyway, a VM whose dirty tracking a live save cannot trust
                    (``engine.machine.live_save_safe``), or with ``TENKI_LIVE_CAPTURE=0``; and
                    for a VM restored from a snapshot that wrote little since (or stays
                    paused), or booted with its RAM in a memfd (under TCG), captured by the
                    pages it wrote (``host/written.py``): steps 3 are then ``device-state``
                    and ``copy-written``, with no migration of its RAM.
2. ``freeze-disk``  ``blockdev-snapshot-sync`` with the guest stopped: the current top layer
                    becomes read-only and the VM continues on a new overlay (made in step 0,
                    so that the stop only opens it), so the disk layer and the memory are of
                    the same instant.
3. ``device-state`` device state and RAM into a stream on tmpfs staging (live: the last dirty
                    pages and the device state, ``finish_live_save``).
4. ``resume``       ``cont``; always attempted, whatever failed before, if the guest was running
                    (a live save cut short is cancelled, which starts the guest again).
5. ``convert``      the stream split into the RAM image + device state that a restore maps
                    (``engine/stream.py``: one pass, only pages holding data written; a stream
                    it does not know goes through a scratch QEMU, ``convert_stream``).
6. ``compress-ram`` the RAM image, zstd-compressed, into the artifact store: a delta over the
                    RAM chain the guest derives from (``_parent``: the snapshot it was restored
                    from, or its own last capture), holding only the 4 KiB chunks whose hash
                    differs from the parent's index (``ramfile`` version 2); a full image when
                    there is no usable parent (none, not stored any more, a v1 image, or a
                    chain already ``MAX_RAM_CHAIN`` long)
7. ``checksum``     the newly frozen layer into the store; every older layer, the kernel and
                    the initrd verified against their digests (a layer damaged under a running
                    VM must not be sealed into a snapshot). It needs nothing from steps 5 and
                    6, so it runs in a thread of its own from the resume on, beside them (the
                    split and the hashing are one core each; the compression uses every core
                    it gets); its time overlaps theirs. Then, once 6 is done: the device state
                    (zstd) into the store, and every image of the parent RAM chain verified
                    again
8. ``sync``         everything durable (each ``put`` fsyncs); only when every step above has
                    finished does the caller mark the snapshot READY

A pause of the session (``spec.leave_paused``), or a guest paused already, stays paused anyway:
step 1 is a plain ``pause`` and step 3 saves device state and RAM while it waits; step 4 is
skipped: the guest stays paused for the VM to be stopped, and is resumed only if a later step
fails; its volumes stay unplugged (the resume plugs them in again), and go back at once if it
fails.

Pairing memory with an older disk layer looks fine at first (the page cache hides it) and
corrupts the filesystem later: hence step 2 inside the stop.
Volumes are unplugged before step 1 and plugged back after step 4 (QEMU refuses a hot-plug
during a migration; snapshots hold no volume data).
Staging files live in the VM's run directory and are removed whatever happens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import zstandard

from ..artifacts import ramfile
from ..artifacts.digests import sha256_file
from ..artifacts.store import ArtifactError
from ..engine import disks, pagemap
from ..engine.machine import live_save_safe
from ..engine.migration import (
    cancel_migration,
    convert_stream,
    finish_live_save,
    freeze_disk,
    save_state,
    start_live_save,
    wait_switchover,
)
from ..engine.stream import StreamError
from ..engine.stream import split as split_stream
from ..errors import SnapshotFailedError
from ..steps import Steps
from . import volumes, written
from .api import Captured, CaptureSpec, Manifest, VolumeMountSpec
from .context import HostContext
from .tmpfs import staging_room_bytes, staging_space_ok
from .vm import VM

log = logging.getLogger(__name__)

# On by default: a live save stops the guest for tens of ms instead of for the whole stream.
# ``TENKI_LIVE_CAPTURE=0`` saves every guest stopped (the guest is then paused for the copy of
# all its RAM, ~0.3 s per 256 MiB under TCG).
LIVE_CAPTURE = os.environ.get("TENKI_LIVE_CAPTURE", "1") != "0"


async def capture(ctx: HostContext, vm: VM, spec: CaptureSpec, produced: set[str]) -> Captured:
    """Caller holds ``vm.lock``. Every digest stored is added to ``produced`` before it is
    stored, so that the host counts it as referenced until the record names it."""
    steps = Steps(log, spec.snapshot_id, plan="capture")
    staging = ctx.layout.staging(vm.session_id) / spec.snapshot_id
    staging.mkdir(parents=True, exist_ok=True)
    held = False  # the guest is left paused (a pause): resumed if anything below fails
    unplugged: list[VolumeMountSpec] = []
    out = False  # volumes kept unplugged for a pause: plugged back if it fails after all
    _check_staging(ctx, vm)
    try:
        unplugged = await volumes.unplug_for_capture(vm, list(spec.volumes),
                                                     ctx.layout.volume_file)
        try:
            paused_s, copied, held = await _pause_and_copy(ctx, vm, steps, staging, spec)
        finally:
            if held:  # a pause: they stay out (the VM stops next; the resume plugs them in)
                lost, out = [], bool(unplugged)
            else:  # the guest runs on: its volumes go back at once
                lost = await volumes.replug(vm, unplugged, ctx.layout.volume_file)
        log.info("%s: guest paused %.3fs", spec.snapshot_id, paused_s)
        ram = ctx.store.temp_path()  # on the store's disk (see convert_stream)
        # what compress-ram packs: the split RAM image, or the written pages as they are
        source: Path | written.Written = copied if isinstance(copied, written.Written) else ram
        _check_room(ram.parent, copied.bytes if isinstance(copied, written.Written)
                    else copied.stat().st_size)
        # step 7's layers beside steps 5 and 6 (see the module's text)
        pool = concurrent.futures.ThreadPoolExecutor(1, "capture-layers")
        layers = pool.submit(_store_layers, ctx, vm, steps, produced)
        pool.shutdown(wait=False)  # the thread ends with its one task
        try:
            with steps.step("convert"):
                if isinstance(copied, written.Written):
                    await asyncio.to_thread(written.device_state, copied, staging / "state.bin")
                else:
                    await _convert(ctx, vm, spec, copied, ram, staging / "state.bin")
                    copied.unlink()  # tmpfs: free it before the long part
            manifest, size, stored = await asyncio.to_thread(
                _seal, ctx, vm, source, staging, steps, spec.base_image_id, produced, layers)
        finally:
            # a thread cannot be cancelled: whatever failed, the capture ends only after it
            # (its files are in ``produced``, and it saves the VM's note); its failure is
            # reported by _seal, unless an error above came first
            await _joined(layers)
            ram.unlink(missing_ok=True)
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


async def _pause_and_copy(ctx: HostContext, vm: VM, steps: Steps, staging: Path,
                          spec: CaptureSpec) -> tuple[float, Path | written.Written, bool]:
    """Returns the seconds paused, what to convert (the stream, or the written pages of a
    restored VM, ``host/written.py``), and whether the guest was left paused
    (``spec.leave_paused``, and it was running)."""
    machine = vm.machine
    was_running = (await machine.status()) == "running"
    stays_paused = spec.leave_paused or not was_running
    # unique: a crashed capture's file is never reused (nor, being the session's, left behind
    # once it ends)
    new_top = vm.disk_dir / f"top-{spec.snapshot_id}.qcow2"
    direct = None
    try:
        # a restored VM by the pages it wrote, if few or it stays paused; else a guest that
        # goes on running is saved live, and one that stays paused anyway is saved while it
        # waits. The disk's next overlay is made here too: the stop then only switches to it.
        with steps.step("prepare"):  # timed: part of a capture, though the guest runs on
            # the plan (mostly allocating the copy's pages) and the overlay at once: each
            # waits on the kernel or on qemu-img, on a core of its own
            planning = asyncio.ensure_future(
                asyncio.to_thread(written.plan, ctx, vm, staging, stays_paused))
            try:
                # over the record's top (QEMU names a node given with its chain by a json: text)
                top_node, _ = await machine.top_node()
                await asyncio.to_thread(disks.create_overlay, new_top,
                                        vm.disk_dir / vm.record.top)
            finally:
                # awaited whatever happened: a plan made is closed below if this fails
                direct = await asyncio.shield(planning)
        live = (direct is None and not stays_paused and LIVE_CAPTURE
                and live_save_safe(machine.cfg))
        if direct is not None and direct.tracked:
            with steps.step("copy-ahead"):  # the guest runs: its writes meanwhile are tracked
                try:
                    await asyncio.to_thread(written.copy_ahead, vm, direct)
                except (pagemap.PagemapError, OSError) as exc:
                    raise SnapshotFailedError(
                        f"copying the guest's written pages failed: {exc}") from exc
        # the written pages are copied with the vCPUs stopped: nothing may reach the guest then
        quiet = vm.agent.quiet() if direct is not None else contextlib.nullcontext()
        async with quiet:
            paused_s, copied = await _stop_and_copy(vm, steps, staging, spec, direct, live,
                                                    was_running, new_top, top_node)
    finally:
        # unmapped here, not in a thread beside the convert: its munmap (~20 ms per 256 MiB
        # copied) then made the convert that much longer instead (2026-12-03, six captures
        # each way, 0.757 s against 0.751 s)
        if direct is not None:
            direct.close()
        if vm.record.top != new_top.name:  # not switched to: nothing refers to it
            new_top.unlink(missing_ok=True)
    return paused_s, copied, was_running and spec.leave_paused


async def _stop_and_copy(vm: VM, steps: Steps, staging: Path, spec: CaptureSpec,
                         direct: written.Plan | None, live: bool, was_running: bool,
                         new_top: Path, top_node: str) -> tuple[float, Path | written.Written]:
    """Steps 1 to 4 (see the module's text); returns the seconds paused and what to convert.
    ``new_top``: the overlay made over ``top_node`` in ``prepare``, switched to in step 2."""
    machine = vm.machine
    stream = staging / "stream"
    copied: Path | written.Written = stream
    paused_at = time.monotonic()
    downtime: float | None = None
    frozen_name = vm.record.top
    done = False
    try:
        if live:
            with steps.step("pre-copy"):  # the guest runs; QEMU stops it for the last pass
                await start_live_save(machine, stream)
                await wait_switchover(machine, _copy_timeout(vm))
            paused_at = time.monotonic()
        else:
            with steps.step("pause"):
                await machine.pause()
        with steps.step("freeze-disk"):
            await freeze_disk(machine, new_top, f"top-{spec.snapshot_id}", top_node)
            # from here QEMU writes to the new top: the host's note must say so at once
            vm.record.frozen.append((frozen_name, ""))
            vm.record.top = new_top.name
            vm.record.save(vm.disk_dir)
        if direct is not None:
            copied = await written.copy(vm, direct, staging, steps)
        else:
            with steps.step("device-state"):
                if live:
                    downtime = await finish_live_save(machine)
                else:
                    await save_state(machine, stream, with_ram=True)
            # bounded by the guest's touched RAM (an untouched page is a marker of a few
            # bytes); removed when the capture ends, or at recovery
            log.info("%s: %.1f MiB of stream staged on tmpfs", spec.snapshot_id,
                     stream.stat().st_size / 2**20)
        done = True
    finally:
        if live and not done:
            with contextlib.suppress(Exception):  # QEMU starts the guest again if it stopped it
                await asyncio.shield(cancel_migration(machine))
        finished_at = time.monotonic()
        if was_running and not (done and spec.leave_paused):
            with steps.step("resume"):
                await machine.resume()
    if downtime is not None:
        # QEMU's own count runs from its stop to the end of the stream; then the resume
        paused_s = downtime + (time.monotonic() - finished_at)
    else:
        paused_s = time.monotonic() - paused_at
    return paused_s, copied


def _copy_timeout(vm: VM) -> float:
    """A live save copies all of the guest's RAM at least once before it stops it."""
    return 60.0 + 15.0 * vm.record.shape.memory_mb / 1024


async def _convert(ctx: HostContext, vm: VM, spec: CaptureSpec, stream: Path, ram: Path,
                   state: Path) -> None:
    """The full stream into RAM image + device state: split here, in one pass that writes only
    the pages holding data; a stream the splitter does not know (another QEMU) goes through
    a scratch QEMU instead."""
    try:
        done = await asyncio.to_thread(split_stream, stream, ram, state)
        log.info("%s: RAM image of %d data pages split from the stream", spec.snapshot_id,
                 done.data_pages)
        return
    except StreamError as exc:
        log.warning("%s: %s; converting the stream with QEMU instead", spec.snapshot_id, exc)
    ram.unlink(missing_ok=True)
    # short: the scratch VM's socket paths must fit in 108 bytes
    work = ctx.layout.layout.run / f"cv-{spec.snapshot_id.removeprefix('snp_')}"
    try:
        await convert_stream(ctx.machine_config(vm.record.shape, None),
                             disks.virtual_size(vm.disk_dir / vm.record.top), stream, work,
                             ram, state)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_staging(ctx: HostContext, vm: VM) -> None:
    """The stream is staged on the run root's tmpfs: refuse before anything stops if it cannot
    fit. It holds each page with data once or more (bounded by what QEMU holds resident) and a
    9-byte marker per other page."""
    pages = vm.record.shape.memory_mb * 2**20 // 4096
    need = _resident_bytes(vm.machine.pid) + 9 * pages
    run_root = ctx.layout.layout.run
    if not staging_space_ok(run_root, need):
        room = staging_room_bytes(run_root)
        raise SnapshotFailedError(
            f"No space left on device: the capture needs up to {need / 2**20:.0f} MiB of "
            f"staging on the run root's tmpfs, {room / 2**20:.0f} MiB are free")


def _resident_bytes(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _check_room(where: Path, need: int) -> None:
    """The scratch QEMU writes the RAM image through a shared mapping: on a full file system
    it would die of SIGBUS. The stream holds every page the image will (and a little more)."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise SnapshotFailedError(
            f"No space left on device: the RAM image needs up to {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free in the artifact store")


#: the longest RAM chain a capture extends; the next one stores a full image. A restore reads
#: every image of the chain once (to build its cache), so the depth bounds that cost; deleting
#: snapshots never shortens a chain (their images stay while a child names them)
MAX_RAM_CHAIN = 8


def _parent(ctx: HostContext, vm: VM, produced: set[str]) -> list[str]:
    """The RAM chain the new image may be a delta over: the VM's lineage (the snapshot it was
    restored from, or its own last capture), if every image of it is still stored, it is not
    too long, and its top is a version 2 image (it has an index); else [] (a full image).

    Its digests join ``produced`` first: from then on the GC spares them, so what is checked
    here is still there when the new snapshot's record names them."""
    chain = list(vm.record.lineage)
    if not chain or len(chain) >= MAX_RAM_CHAIN:
        return []
    produced.update(chain)
    try:
        for d in chain:
            ctx.store.verify(d, "RAM image")
        top = ramfile.header(ctx.store.local_path(chain[-1]))
    except (ArtifactError, OSError, ValueError) as exc:
        log.info("%s: a full RAM image (the parent's chain is not usable: %s)",
                 vm.session_id, exc)
        return []
    return chain if top.version == 2 else []


def _parent_ram(vm: VM, parent: list[str]) -> Path | None:
    """The parent chain's RAM composed, if the VM maps it: a VM restored from ``parent`` and
    not captured since maps that chain's RAM cache (a chunk equal to it needs no hash)."""
    base = vm.machine.cfg.ram_base
    if parent and base and parent == vm.record.ram_chain:
        return Path(base)
    return None


async def _joined(future: concurrent.futures.Future[Any]) -> None:
    """Wait for a thread's work to end, whatever it did, even if this task is cancelled
    meanwhile (the cancellation is delivered once the thread is done)."""
    done = asyncio.wrap_future(future)
    cancelled = False
    while not done.done():
        try:
            await asyncio.wait({done})
        except asyncio.CancelledError:
            cancelled = True
    if not done.cancelled():
        done.exception()  # retrieved: whoever needs it has it from ``future``
    if cancelled:
        raise asyncio.CancelledError


def _store_layers(ctx: HostContext, vm: VM, steps: Steps,
                  produced: set[str]) -> tuple[list[str], list[str]]:
    """Step 7's disk part (in a thread, beside steps 5 and 6): the layers frozen by this VM's
    captures into the store (the new one is hashed now, older ones were), then every layer,
    the kernel and the initrd verified. Returns (every layer, the layers stored now)."""
    store = ctx.store
    with steps.step("checksum"):
        new_layers: list[str] = []
        for i, (name, digest) in enumerate(vm.record.frozen):
            if not digest:
                digest = sha256_file(vm.disk_dir / name)
                produced.add(digest)
                store.put(vm.disk_dir / name, digest=digest)
                vm.record.frozen[i] = (name, digest)
                new_layers.append(digest)
        vm.record.save(vm.disk_dir)
        layers = [*vm.record.layers, *(d for _, d in vm.record.frozen)]
        shape = vm.record.shape
        _verify_all(ctx, {shape.kernel: "kernel", shape.initrd: "initrd",
                          **{d: f"disk layer {i}" for i, d in enumerate(layers)}})
    return layers, new_layers


def _verify_all(ctx: HostContext, kinds: dict[str, str]) -> None:
    for digest, kind in kinds.items():
        try:
            ctx.store.verify(digest, kind)
        except ArtifactError as exc:
            raise SnapshotFailedError(f"{exc.message}; not sealing a snapshot over it") \
                from exc


def _seal(ctx: HostContext, vm: VM, ram: Path | written.Written, staging: Path, steps: Steps,
          base_image_id: str, produced: set[str],
          layers_done: concurrent.futures.Future[tuple[list[str], list[str]]],
          ) -> tuple[Manifest, int, int]:
    store = ctx.store
    with steps.step("compress-ram"):
        parent = _parent(ctx, vm, produced)
        packed = store.temp_path()  # packed straight onto the store's disk: no copy after
        try:
            top = store.local_path(parent[-1]) if parent else None
            try:
                if isinstance(ram, written.Written):
                    got = written.pack(ram, packed, top, parent[-1] if parent else None)
                else:
                    got = ramfile.pack_delta(ram, packed, top, parent[-1] if parent else None,
                                             parent_ram=_parent_ram(vm, parent))
            except ramfile.RamFormatError as exc:  # e.g. the memory was resized: start anew
                log.info("%s: a full RAM image (%s)", vm.session_id, exc)
                parent = []
                got = (written.pack(ram, packed, None, None) if isinstance(ram, written.Written)
                       else ramfile.pack_delta(ram, packed))
            produced.add(got.digest)
            store.put(packed, digest=got.digest, move=True)
        finally:
            packed.unlink(missing_ok=True)
        ram_chain = [*parent, got.digest]
        log.info("%s: RAM image %s: %.1f MiB changed of %.1f MiB (chain of %d)",
                 vm.session_id, got.digest[:12], got.changed / 2**20, got.raw / 2**20,
                 len(ram_chain))
    raw_state = staging / "state.bin"
    state_bytes = raw_state.stat().st_size
    # stored compressed: every snapshot of a lineage stores its own (a restore unpacks it,
    # ``restore.device_state_file``); small (~1 MiB raw), so after the RAM, not beside it
    state = staging / "state.zst"
    with open(raw_state, "rb") as fin, open(state, "wb") as fout:
        zstandard.ZstdCompressor(level=3).copy_stream(fin, fout)
    raw_state.unlink()
    state_digest = sha256_file(state)
    produced.add(state_digest)
    store.put(state, digest=state_digest, move=True)
    _verify_all(ctx, {d: "RAM image" for d in parent})  # still there (the GC spared them)
    # step 7's layers (a thread started at the resume): done, or their failure is the capture's
    layers, new_layers = layers_done.result()
    with steps.step("sync"):
        # put() fsyncs each file and the store's directory before it returns
        pass
    # what captures produced that this snapshot references, with its stored bytes: the base
    # image's files are the image's, never freed by deleting a snapshot
    produced_layers = layers[1:]  # layers[0] is the base image's (Manifest.digests)
    stored_of = {d: store.size(d) for d in [*ram_chain, state_digest]}
    stored_of.update({d: store.allocated(d) for d in produced_layers})
    manifest = Manifest(vm.record.shape, layers, got.digest, state_digest, base_image_id, ram_chain,
                        stored_of)
    # the logical size: the whole RAM it restores, its state, every disk layer over the image
    size = got.raw + state_bytes + sum(store.size(d) for d in produced_layers)
    # newly stored by this capture (what its parent chain and older layers hold is not)
    stored = got.stored + stored_of[state_digest] + sum(store.allocated(d) for d in new_layers)
    # the next capture of this guest is a delta over this one
    vm.record.lineage = ram_chain
    vm.record.save(vm.disk_dir)
    return manifest, size, stored

"""A capture of a VM by the pages it wrote: no migration of its RAM, nothing else copied.

A VM restored from a snapshot maps that snapshot's RAM cache privately (``engine.pagemap``): its
RAM is the cache plus the pages the QEMU process holds as its own, found from its page tables.
So a capture of it needs only those pages, the device state (``migration.save_devices``) and
the ROMs' pages, which are still the snapshot's (``stream.with_devices`` takes them from its
device state). In ``host/capture.py``'s list: ``pause``, ``freeze-disk``, ``device-state``,
``copy-written`` (the guest stopped for these), ``resume``; then ``convert`` builds the device
state and ``compress-ram`` stores an image that reads and hashes the written pages only
(``ramfile.pack_pages``), freeing the copy's pages as it reads them. QEMU's dirty tracking
is not used at all: under TCG its first sync scans every vCPU's TLB once per page of RAM
(QEMU 7.2; ~0.75 s per GiB here), which made the first live capture of every restored session
take seconds.

Where QEMU's writes are tracked (``engine/writetrack.py``: every VM whose RAM is a file, on a
host whose kernel and rights allow it), the pages are copied while the guest still runs
(``copy_ahead``, step ``copy-ahead``): the tracking is armed first, then every page written so
far is copied, then, in a round or two, those written meanwhile; inside the stop,
``copy-written`` copies only what was written after the last round (typically a few MiB), so
the stop does not grow with what the guest wrote. Without tracking the guest is stopped while
all of its written pages are copied (~5 GB/s out of QEMU's memory). Either way a running
restored guest is captured like this only while it holds at most ``limit()`` (512 MiB, or a
quarter of its RAM if more; counted before it stops); one that wrote more is saved live
(pre-copy), and one that stays paused anyway (a pause of the session) always this way, all of
it copied in the stop. ``TENKI_DIRECT_CAPTURE=0`` on the server turns it off.

Devices may still write guest memory while the vCPUs are stopped (QEMU hands the agent's input
to the guest's virtio-serial buffers whenever it comes): the device state is saved again after
the copy, and the copy is repeated if any device moved meanwhile, so that memory and device
state are of one instant (``COPY_TRIES``).

A VM booted under TCG is captured the same way (``host/boot.py`` gives it its RAM in a memfd,
``MachineConfig.ram_shared``): its pages are the memfd's, each one the guest touched since it
booted, all of them copied out of the memfd mapped here (``pagemap.Source``; untracked, the
stop grows with them: ~0.2 s per GiB touched, where a live save took 1.65-9.35x ``virsh save``
to READY; tracked, they are copied ahead as above, and a page first touched after that by a
read is zero, as the copy is where nothing was copied).
There is no snapshot's state to take the ROMs' pages from: the boot saved them before the guest
first ran (``host/boot.py``, step ``roms``; a save with ``x-ignore-shared``, which leaves the
memfd out), or, if that failed, ``device-state`` saves them inside the stop. Its image is every
page copied, or a delta of them over its own last capture (``ramfile.pack_delta``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import ramfile
from ..artifacts.store import ArtifactError
from ..engine import pagemap, writetrack
from ..engine.migration import save_devices, save_state
from ..engine.stream import StreamError, device_sections, with_devices
from ..errors import SnapshotFailedError
from ..steps import Steps
from .context import HostContext
from .restore import device_state_file
from .vm import VM

log = logging.getLogger(__name__)


def _max_bytes(raw: str | None, default_mib: int = 512) -> int:
    try:
        mib = int(raw) if raw is not None else default_mib
    except ValueError:
        log.warning("TENKI_DIRECT_MAX_MIB=%r is not a number of MiB: %d used", raw, default_mib)
        mib = default_mib
    return max(0, mib) << 20


DIRECT_CAPTURE = os.environ.get("TENKI_DIRECT_CAPTURE", "1") != "0"
#: what a running guest may have written for this way, at least (``TENKI_DIRECT_MAX_MIB``): its
#: copy is at most ~0.1 s of the stop, where a live save of a 1 GiB guest that wrote 256 MiB was
#: READY only after 9-10 s here (2026-12-02; its stop 22-30 ms), and this way after 0.78 s (its
#: stop 84 ms); 64 MiB until then, when a live save of it had taken 2.3-4.1 s
DIRECT_MAX_BYTES = _max_bytes(os.environ.get("TENKI_DIRECT_MAX_MIB"))
#: or this share of its RAM if more: the stop is then at most ~50 ms per GiB of RAM (the copy
#: at ~5 GB/s, the page tables' scan ~3 ms per GiB), where a live save of a restored VM reads
#: all of its RAM and syncs QEMU's dirty bitmap for the first time, 1-3 s per GiB of RAM here
#: (a 16 GiB guest with 1 GiB written: 57 s to READY); an eighth until the copy went from
#: ~3.4 to ~5 GB/s (``pagemap.Target``)
DIRECT_RAM_SHARE = 4
#: copies of the written pages before giving up on devices that keep writing guest memory
COPY_TRIES = 3
#: rounds of ``copy_ahead`` after its first copy, each of what the guest wrote during the one
#: before, at most; it stops early once a round finds no more than ``AHEAD_ENOUGH`` bytes
AHEAD_ROUNDS = 3
AHEAD_ENOUGH = 4 << 20
#: the copy's file in the capture's staging directory (tmpfs)
PAGES = "written.ram"
#: devices whose saved state follows the host's clock while the guest is stopped, and which
#: write no guest memory: the RTC (QEMU updates its time fields from the host clock at each
#: save, so a copy across a second's end would always look like a move)
CLOCKED = frozenset({b"mc146818rtc"})


@dataclass
class Plan:
    """What a capture of this VM by its written pages starts from, checked before it stops."""

    pid: int
    address: int  # of the guest RAM in QEMU's memory (a booted VM's is read from ``source``)
    size: int
    cache: Path | None  # the RAM cache QEMU maps (None: a booted VM's memfd)
    cache_index: dict[int, bytes]  # of the RAM the cache composes
    cache_hash: str  # what ``cache_index`` is hashed with (``ramfile.Header.hash``)
    # the restored snapshot's device state, uncompressed; a booted VM's ROMs as saved at its
    # launch, or inside the stop (``save_roms``)
    parent_state: Path
    target: pagemap.Target  # the copy's file, its pages written so far reserved
    #: a booted VM's RAM (``MachineConfig.ram_shared``): its memfd mapped here, its pages found
    #: from the file and copied from this mapping; None for a restored VM, whose pages are
    #: found from QEMU's page tables and read out of its memory
    source: pagemap.Source | None = None
    #: ``parent_state`` is to be saved inside the stop (a booted VM whose ROMs were not saved
    #: at its launch)
    save_roms: bool = False
    #: the digest of the image whose index ``cache_index`` is (the top of the restored
    #: snapshot's RAM chain; "" for a booted VM)
    cache_digest: str = ""
    #: QEMU's writes are tracked from the plan on (``engine/writetrack.py``): the pages
    #: written so far are copied before the stop (``copy_ahead``), inside it only those
    #: written since the last look
    tracked: bool = False
    #: the pages found written so far (``ranges`` at the plan), then what each look after
    #: found; all of them copied into ``target``
    found: list[list[tuple[int, int]]] = field(default_factory=list)

    def close(self) -> None:
        """Unmap the copy's file (it stays on disk for ``pack``), and the memfd; end the
        tracking of QEMU's writes (the guest runs again)."""
        self.target.close()
        if self.source is not None:
            self.source.close()
        writetrack.disarm(self.pid)  # armed or not (``copy`` may have found it lost)


@dataclass
class Written:
    plan: Plan
    pages: Path  # a sparse file of the RAM's size holding the written pages
    devices: Path  # QEMU's device sections

    @functools.cached_property
    def ranges(self) -> list[tuple[int, int]]:
        """The pages written (merged once the guest runs again, not inside the stop)."""
        return pagemap.union(*self.plan.found)

    @property
    def bytes(self) -> int:
        return sum(b - a for a, b in self.ranges)


def limit(ram_bytes: int) -> int:
    """The most a running guest of ``ram_bytes`` may have written for this way."""
    return max(DIRECT_MAX_BYTES, ram_bytes // DIRECT_RAM_SHARE)


def plan(ctx: HostContext, vm: VM, staging: Path, stays_paused: bool) -> Plan | None:
    """A plan, or None when the VM is not one this works for (booted with anonymous RAM,
    restored by an older version, its snapshot's images or device state gone or of version 1,
    its cache not what it maps) or, restored and running on, wrote more than ``limit``."""
    record, cfg, pid = vm.record, vm.machine.cfg, vm.machine.pid
    if DIRECT_CAPTURE and cfg.ram_shared and pid:
        return _plan_booted(vm, staging, cfg.ram_bytes, pid, stays_paused)
    if not (DIRECT_CAPTURE and cfg.ram_base and record.ram_chain and record.state and pid):
        return None
    cache = Path(cfg.ram_base)
    target = None
    try:
        size = cache.stat().st_size
        address = pagemap.find_mapping(pid, cache, size)
        # armed before the pages written so far are read: a page written after this look
        # is found by the next (one that stays paused is copied whole inside the stop)
        tracked = not stays_paused and _arm(vm, pid, address, size)
        ranges = pagemap.written(pid, address, size)
        written = sum(b - a for a, b in ranges)
        if not stays_paused and written > limit(size):
            log.info("%s: %.0f MiB written since its restore: a live capture", vm.session_id,
                     written / 2**20)
            writetrack.disarm(pid)
            return None
        pagemap.readable(pid, address)
        top = ctx.store.local_path(record.ram_chain[-1])
        cache_index, cache_hash = ramfile.read_index(top), ramfile.header(top).hash
        ctx.store.verify(record.state, "device state")
        # read now: a snapshot deleted meanwhile may lose it to the GC
        parent_state = staging / "parent-state.bin"
        stored = device_state_file(ctx.store.local_path(record.state), parent_state)
        if stored != parent_state:  # stored uncompressed (older snapshots)
            shutil.copyfile(stored, parent_state)
        # taken while the guest still runs: allocating the copy's file inside the stop took
        # 2.5 s instead of 0.35 s for 1 GiB when the host was short of free memory (two
        # 16 GiB guests on 24 GiB), and mapping it there 0.2 s per GiB
        target = pagemap.Target(staging / PAGES, size)
        target.reserve(ranges)
    except (pagemap.PagemapError, ramfile.RamFormatError, ArtifactError, OSError,
            ValueError) as exc:
        if target is not None:
            target.close()
        writetrack.disarm(pid)
        why = exc.message if isinstance(exc, ArtifactError) else str(exc)
        log.info("%s: not captured by its written pages: %s", vm.session_id, why)
        return None
    return Plan(pid, address, size, cache, cache_index, cache_hash, parent_state, target,
                cache_digest=record.ram_chain[-1], tracked=tracked, found=[ranges])


def _arm(vm: VM, pid: int, address: int, size: int) -> bool:
    """Whether QEMU's writes to its RAM are tracked, from here on (until ``Plan.close``)."""
    try:
        writetrack.arm(pid, address, size)
    except writetrack.Untracked as exc:
        log.info("%s: writes not tracked: %s", vm.session_id, exc)
        writetrack.disarm(pid)  # a registration that came too late
        return False
    return True


def copy_ahead(vm: VM, p: Plan) -> None:
    """Step ``copy-ahead``, while the guest runs (in a thread): the pages found written so far
    into the copy, then those written meanwhile, for up to ``AHEAD_ROUNDS`` rounds; a page
    written during a copy is found again by the next look, at the latest inside the stop
    (``copy``). Untracked after all (the registration is gone): nothing is copied ahead, and
    the stop copies every written page."""
    ahead = _copy_ranges(p, p.found[0])
    try:
        for _ in range(AHEAD_ROUNDS):
            again = writetrack.written(p.pid, p.address, p.size)
            p.target.reserve(again)
            ahead += _copy_ranges(p, again)
            p.found.append(again)
            if sum(b - a for a, b in again) <= AHEAD_ENOUGH:
                break
    except writetrack.Untracked as exc:
        log.warning("%s: write tracking lost (%s): the written pages are copied in the stop",
                    vm.session_id, exc)
        p.tracked = False
    log.info("%s: %.1f MiB copied before the stop", vm.session_id, ahead / 2**20)


def _plan_booted(vm: VM, staging: Path, size: int, pid: int,
                 stays_paused: bool) -> Plan | None:
    """A booted VM's RAM is a memfd: every page it holds is one the guest touched, read or
    written, since it booted (an untouched page is a hole, zero). All of them are copied,
    however many: a live save would read every page of it, allocating the holes. Tracked,
    they are copied before the stop, and inside it those written since (a page first touched
    since by a read is zero, as the copy's file is where nothing was copied)."""
    target = source = None
    tracked = False
    try:
        address, memfd = pagemap.find_shared(pid, size)
        tracked = not stays_paused and _arm(vm, pid, address, size)
        ranges = pagemap.touched(memfd, size)
        source = pagemap.Source(memfd, size)
        source.populate(ranges)
        target = pagemap.Target(staging / PAGES, size)  # as above: reserved while it runs
        target.reserve(ranges)
    except (pagemap.PagemapError, OSError) as exc:
        for m in (target, source):
            if m is not None:
                m.close()
        if tracked:
            writetrack.disarm(pid)
        log.info("%s: not captured by its touched pages: %s", vm.session_id, exc)
        return None
    log.info("%s: %.0f MiB touched since its boot", vm.session_id,
             sum(b - a for a, b in ranges) / 2**20)
    roms = vm.machine.files.rom_state  # saved at its launch (``host/boot.py``), if it was
    if roms.is_file():
        return Plan(pid, address, size, None, {}, ramfile.NEW_HASH, roms, target, source,
                    tracked=tracked, found=[ranges])
    return Plan(pid, address, size, None, {}, ramfile.NEW_HASH, staging / "parent-state.bin",
                target, source, save_roms=True, tracked=tracked, found=[ranges])


async def copy(vm: VM, p: Plan, staging: Path, steps: Steps) -> Written:
    """With the guest stopped: the device state and the pages written (steps
    ``device-state`` and ``copy-written``)."""
    w = Written(p, p.target.path, staging / "devices.bin")
    again = staging / "devices-again.bin"
    inside = 0
    with steps.step("device-state"):
        if p.save_roms:
            # a booted VM has no snapshot's state with the ROMs' pages: a save that leaves
            # out the shared RAM (``x-ignore-shared``) holds them, with no copy of its RAM
            await save_state(vm.machine, p.parent_state, with_ram=False)
        await save_devices(vm.machine, w.devices)
    for _ in range(COPY_TRIES):
        with steps.step("copy-written"):
            try:
                inside += await asyncio.to_thread(_copy, p)
            except (pagemap.PagemapError, OSError) as exc:
                raise SnapshotFailedError(f"copying the guest's written pages failed: {exc}") \
                    from exc
        with steps.step("device-state"):
            await save_devices(vm.machine, again)
            moved = await asyncio.to_thread(_moved, w.devices, again)
            os.replace(again, w.devices)
        if not moved:
            break
        log.info("%s: devices moved while the guest was stopped (%s): copying again",
                 vm.session_id, ", ".join(moved))
    else:
        raise SnapshotFailedError("the guest's devices kept writing its memory while it was "
                                  "stopped; try again")
    log.info("%s: %.1f MiB copied inside the stop", vm.session_id, inside / 2**20)
    return w


def _moved(before: Path, after: Path) -> list[str]:
    """The devices whose state differs between two saves of the stopped VM, but for those
    that follow the host's clock (``CLOCKED``): no other moves on its own."""
    try:
        a = device_sections(before.read_bytes())
        b = device_sections(after.read_bytes())
    except StreamError as exc:
        return [f"unreadable: {exc}"]
    if [(i, n) for i, n, _ in a] != [(i, n) for i, n, _ in b]:
        return ["the list of devices"]
    return [f"{i.decode()}/{n}" for (i, n, x), (_, _, y) in zip(a, b, strict=True)
            if x != y and i not in CLOCKED]


def _copy(p: Plan) -> int:
    """The pages to copy with the guest stopped, copied (``found`` says which are written in
    all); returns the bytes copied."""
    if p.tracked:
        try:  # only what was written since the last look: the rest is copied already
            again = writetrack.written(p.pid, p.address, p.size)
        except writetrack.Untracked as exc:
            log.warning("write tracking of process %d lost (%s): every written page is "
                        "copied", p.pid, exc)
            p.tracked = False
        else:
            p.target.reserve(again)
            p.found.append(again)
            return _copy_ranges(p, again)
    if p.source is not None:  # a booted VM's memfd
        ranges = pagemap.touched(p.source.path, p.size)  # those since the plan too
    else:
        ranges = pagemap.written(p.pid, p.address, p.size)
    p.target.reserve(ranges)
    p.found = [ranges]
    return _copy_ranges(p, ranges)


def _copy_ranges(p: Plan, ranges: list[tuple[int, int]]) -> int:
    if p.source is not None:  # out of the memfd mapped here
        return pagemap.copy_mapped(p.source, ranges, p.target)
    return pagemap.copy(p.pid, p.address, ranges, p.target)  # out of QEMU's memory


def device_state(w: Written, out: Path) -> None:
    """Step ``convert``: the device state a restore loads (the guest runs again meanwhile)."""
    try:
        with_devices(w.plan.parent_state, w.devices, out)
    except StreamError as exc:
        raise SnapshotFailedError(f"the device state could not be composed: {exc}") from exc


def pack(w: Written, dst: Path, parent: Path | None,
         parent_digest: str | None) -> ramfile.Packed:
    """Step ``compress-ram``: the RAM image, a delta over ``parent`` (or full)."""
    if w.plan.cache is None:  # a booted VM: its RAM is the pages copied, zero elsewhere
        return ramfile.pack_delta(w.pages, dst, parent, parent_digest)
    # the first capture after a restore: a delta over the image whose index the plan read
    same = parent_digest is not None and parent_digest == w.plan.cache_digest
    return ramfile.pack_pages(w.pages, w.ranges, w.plan.cache, w.plan.cache_index, dst,
                              parent, parent_digest, index_hash=w.plan.cache_hash,
                              free_pages=True,
                              parent_index=w.plan.cache_index if same else None)

#!/usr/bin/env python3
"""Benchmark: tenki snapshots (capture, restore, clones) against libvirt save/restore.

    .venv/bin/python bench/snapshot.py [--memory 512,1024,4096] [--dirty 0,256] [--restores 2]
                                       [--clones 10] [--clone-from 1024] [--baseline auto]
    .venv/bin/python bench/snapshot.py --quick     # 512 and 1024 MiB, one restore each

For each guest memory size, one tenki session and one baseline guest are booted (same kernel,
initrd, command line, q35, qemu64, TCG, an overlay on the same base disk, the same agent on a
virtio-serial port). The tenki session captured is, by default (``--session restored``), one
restored from a snapshot of the booted one, as every session is but the first of a size (a
restore of the image's golden snapshot); ``--session booted`` captures the booted one. For each
dirty size (ascending; the data stays, so "256" means ~256 MiB of random data in the guest's
/dev/shm on top of the idle guest):

- tenki: snapshot create -> READY (total capture), the time the guest was paused (server log),
  memory_bytes / size_bytes / compressed_bytes, then ``create(snapshot_id)`` -> first
  ``exec true`` answered (restore to exec-ready; the source session keeps running);
- libvirt: ``virsh save`` (the guest stops; paused = capture = the save) and ``virsh restore`` ->
  first ``exec true`` answered over the agent socket (the disk overlay is put back as it was at
  the save before every restore); the save file's size and the overlay's;
- with ``--baseline qemu`` (or when libvirt cannot run): plain QEMU ``stop``, ``migrate`` to
  ``exec:cat > file``, overlay copy, ``cont``; restore = a new QEMU with ``-incoming defer`` +
  ``migrate-incoming`` + ``cont``.

Then N sessions restored from one snapshot at once (``--clones``, from the ``--clone-from`` guest
with the most dirty data): time until all answered ``exec true``, and host memory: the sum of
the QEMU processes' PSS (/proc/<pid>/smaps_rollup) without their mapped tmpfs part, plus the
tmpfs RAM files, plus helpers (passt); and the same from the baseline's save file.

The machine's load is noted with the results (``/proc/stat``): CPU busy, iowait and steal, and
the load average, for 3 s before anything of ours runs (the other tenants alone), during each
row and during each system's clones. These machines are shared: a row measured under steal or
iowait is noisy for both systems, and ratios of such rows mean less.

Everything runs against a private tenki server on a temporary TENKI_HOME and is cleaned up on
the way out (failure and Ctrl-C included). Nothing is asserted: tables and a summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    LOAD_HEADERS,
    Agent,
    Cleanup,
    CpuTimes,
    HostLoad,
    HostMemory,
    Image,
    Libvirt,
    PlainVM,
    TenkiServer,
    agent_exec_ready,
    allocated,
    domain_xml,
    ensure_image,
    host_memory,
    log,
    make_overlay,
    md_table,
    median,
    mib,
    ratio,
    secs,
    spread,
)

#: how often a run that has not ended says where it waits (``faulthandler``)
WATCHDOG_S = 600

CAPTURE_STEPS = ("prepare", "copy-ahead", "pre-copy", "pause", "freeze-disk", "device-state",
                 "copy-written", "resume", "convert", "compress-ram", "checksum", "sync")
RESTORE_STEPS = ("spare", "verify", "overlay", "load-ram", "network", "launch", "wire",
                 "load-state", "resume", "agent", "settle", "clock", "identity")
# settle: clock and identity in one request (agent 0.4); wire: the network built beside launch


def dirty_command(mb: int) -> str:
    # the guest's /dev/shm is 50% of its RAM by default: too small for 256 MiB in a 512 MiB guest
    return (f"mount -o remount,size=90% /dev/shm && "
            f"head -c {mb}M /dev/urandom > /dev/shm/bench-dirty-{mb}")


def patch_save_image(path: Path, replace: dict[str, str]) -> None:
    """Replace strings (each by one of the same length) in a libvirt save image's XML header.

    Layout (libvirt qemu_saveimage.h): 16-byte magic, u32 version, u32 data_len, ..., then
    data_len bytes of domain XML (and the migration cookie), then QEMU's migration stream.
    """
    with open(path, "r+b") as f:
        head = f.read(64)
        if not head.startswith(b"LibvirtQemudSave"):
            raise RuntimeError(f"{path.name}: not a libvirt save image")
        (data_len,) = struct.unpack_from("<I", head, 20)
        f.seek(0)
        region = f.read(data_len + 256)
        patched = region
        for old, new in replace.items():
            assert len(old) == len(new), (old, new)
            if old.encode() not in patched:
                raise RuntimeError(f"{path.name}: {old!r} not found in the header")
            patched = patched.replace(old.encode(), new.encode())
        f.seek(0)
        f.write(patched)


def sparse_copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


# -- baselines ------------------------------------------------------------------------------

@dataclass
class Saved:
    path: Path
    frozen_disk: Path  # the overlay as it was at the save
    paused: float
    total: float
    size: int
    disk_bytes: int


@dataclass
class Clones:
    total: float
    each: list[float]
    memory: HostMemory
    load: HostLoad | None = None  # the machine while they were restored


class LibvirtBaseline:
    """``virsh save`` / ``virsh restore`` of a transient domain."""

    label = "libvirt"
    desc = ("libvirt 9.0 `virsh save` / `virsh restore` (default raw save format) of a transient "
            "domain; the guest is stopped by the save, so paused = capture = the save")

    def __init__(self, cleanup: Cleanup, lv: Libvirt, work: Path, image: Image,
                 cpu: int) -> None:
        self.cleanup, self.lv, self.work, self.image, self.cpu = cleanup, lv, work, image, cpu
        self.name = ""
        self.agent: Agent | None = None
        self.running = False

    def boot(self, memory_mb: int) -> float:
        self.name = f"tenki-bench-{os.getpid()}-{memory_mb}-src"
        self.dir = self.work / f"libvirt-{memory_mb}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.overlay = self.dir / "overlay.qcow2"
        self.sock = self.dir / "agent.sock"
        make_overlay(self.overlay, self.image.base)
        xml = self.dir / "domain.xml"
        xml.write_text(domain_xml(name=self.name, image=self.image, memory_mb=memory_mb,
                                  cpu=self.cpu, disk=self.overlay, agent_sock=self.sock,
                                  console=self.dir / "console.log"))
        t0 = time.monotonic()
        self.lv.domains.add(self.name)
        self.lv.virsh("create", str(xml))
        self.running = True
        self.agent = agent_exec_ready(self.sock, 300)
        return time.monotonic() - t0

    def clone_name(self, i: int) -> str:
        return f"{self.name[:-3]}c{i:02d}"  # as long as the source's name

    def shell(self, command: str) -> None:
        assert self.agent is not None
        self.agent.shell(command)

    def save(self, tag: str) -> Saved:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        path = self.dir / f"save-{tag}.img"
        t0 = time.monotonic()
        self.lv.virsh("save", self.name, str(path))
        took = time.monotonic() - t0
        self.running = False
        self.lv.domains.discard(self.name)
        frozen = self.dir / f"overlay-{tag}.qcow2"
        sparse_copy(self.overlay, frozen)
        return Saved(path, frozen, took, took, path.stat().st_size, allocated(frozen))

    def restore(self, saved: Saved, keep: bool) -> float:
        sparse_copy(saved.frozen_disk, self.overlay)  # the disk as it was at the save
        self.lv.domains.add(self.name)
        t0 = time.monotonic()
        self.lv.virsh("restore", str(saved.path))
        self.running = True
        agent = agent_exec_ready(self.sock, 120)
        took = time.monotonic() - t0
        if keep:
            self.agent = agent
        else:
            agent.close()
            self.lv.destroy(self.name)
            self.running = False
        return took

    def clones(self, saved: Saved, n: int) -> Clones:
        base_xml = self.lv.virsh("save-image-dumpxml", str(saved.path))
        cdir = self.dir / "clones"
        cdir.mkdir(exist_ok=True)
        jobs = []
        for i in range(n):
            name = self.clone_name(i)
            disk, sock = cdir / f"c{i}.qcow2", cdir / f"c{i}.sock"
            make_overlay(disk, saved.frozen_disk)
            root = ET.fromstring(base_xml)
            root.find("name").text = name  # type: ignore[union-attr]
            # libvirt restores a save image only as the domain (name and UUID) it was saved
            # from, and two domains cannot share them: each clone gets a copy of the image with
            # its own name and UUID patched into the header (same lengths)
            image = cdir / f"c{i}.img"
            shutil.copyfile(saved.path, image)
            uuid_el = root.find("uuid")
            assert uuid_el is not None and uuid_el.text
            new_uuid = str(uuid.uuid4())
            patch_save_image(image, {uuid_el.text: new_uuid, self.name: name})
            uuid_el.text = new_uuid
            devices = root.find("devices")
            assert devices is not None
            for d in devices.findall("disk"):
                d.find("source").set("file", str(disk))  # type: ignore[union-attr]
            for ch in devices.findall("channel"):
                ch.find("source").set("path", str(sock))  # type: ignore[union-attr]
            for tag in ("serial", "console"):
                for s in devices.findall(tag):
                    src = s.find("source")
                    if src is not None and src.get("path"):
                        src.set("path", str(cdir / f"c{i}.console.log"))
            xml = cdir / f"c{i}.xml"
            xml.write_text(ET.tostring(root, encoding="unicode"))
            jobs.append((name, xml, sock, image))
        agents: list[Agent] = []

        def one(job: tuple[str, Path, Path, Path]) -> float:
            name, xml, sock, image = job
            self.lv.domains.add(name)
            self.lv.virsh("restore", str(image), "--xml", str(xml))
            agents.append(agent_exec_ready(sock, 300))
            return time.monotonic()

        try:
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=n) as pool:
                done = list(pool.map(one, jobs))
            each = [d - t0 for d in done]
            total = max(done) - t0
            pids = [p for p in (self.lv.qemu_pid(j[0]) for j in jobs) if p]
            memory = host_memory(pids)
        finally:
            for a in agents:
                a.close()
            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(self.lv.destroy, [j[0] for j in jobs]))
            shutil.rmtree(cdir, ignore_errors=True)
        return Clones(total, each, memory)

    def end(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.running:
            self.lv.destroy(self.name)
            self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)


class QemuFileBaseline:
    """Plain QEMU: ``stop`` + ``migrate`` to ``exec:cat > file`` + ``cont``; ``-incoming``."""

    label = "qemu-file"
    desc = ("plain QEMU: `stop`, `migrate` to `exec:cat > file`, overlay copy, `cont` (then "
            "fsync); restore = new QEMU `-incoming defer` + `migrate-incoming` + `cont`")

    def __init__(self, cleanup: Cleanup, work: Path, image: Image, cpu: int) -> None:
        self.cleanup, self.work, self.image, self.cpu = cleanup, work, image, cpu
        self.vm: PlainVM | None = None
        self.agent: Agent | None = None
        self.restores = 0

    def boot(self, memory_mb: int) -> float:
        self.memory_mb = memory_mb
        self.dir = self.work / f"qemu-{memory_mb}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vm = PlainVM(self.cleanup, self.dir, self.image, memory_mb, self.cpu, "source")
        self.agent = agent_exec_ready(self.vm.agent_sock, 300)
        return time.monotonic() - self.vm.started

    def shell(self, command: str) -> None:
        assert self.agent is not None
        self.agent.shell(command)

    def save(self, tag: str) -> Saved:
        assert self.vm is not None
        qmp = self.vm.qmp()
        qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        path, frozen = self.dir / f"save-{tag}.img", self.dir / f"overlay-{tag}.qcow2"
        t0 = time.monotonic()
        qmp.execute("stop")
        try:
            qmp.execute("migrate", {"uri": f"exec:cat > {path}"})
            qmp.wait_migration()
            sparse_copy(self.vm.disk, frozen)
        finally:
            qmp.execute("cont")
        paused = time.monotonic() - t0
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        total = time.monotonic() - t0
        return Saved(path, frozen, paused, total, path.stat().st_size, allocated(frozen))

    def _incoming(self, saved: Saved, name: str, disk: Path) -> PlainVM:
        vm = PlainVM(self.cleanup, self.dir, self.image, self.memory_mb, self.cpu, name,
                     disk=disk, incoming=True)
        qmp = vm.qmp()
        qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        qmp.execute("migrate-incoming", {"uri": f"exec:cat {saved.path}"})
        qmp.wait_migration()
        qmp.execute("cont")
        return vm

    def restore(self, saved: Saved, keep: bool) -> float:
        self.restores += 1
        disk = self.dir / f"restored-{self.restores}.qcow2"
        make_overlay(disk, saved.frozen_disk)
        t0 = time.monotonic()
        vm = self._incoming(saved, f"restored-{self.restores}", disk)
        try:
            agent_exec_ready(vm.agent_sock, 120).close()
            return time.monotonic() - t0
        finally:
            vm.kill()  # the source runs on, as a tenki session does

    def clones(self, saved: Saved, n: int) -> Clones:
        vms: list[PlainVM] = []
        agents: list[Agent] = []

        def one(i: int) -> float:
            disk = self.dir / f"clone-{i}.qcow2"
            make_overlay(disk, saved.frozen_disk)
            vm = self._incoming(saved, f"clone-{i}", disk)
            vms.append(vm)
            agents.append(agent_exec_ready(vm.agent_sock, 300))
            return time.monotonic()

        try:
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=n) as pool:
                done = list(pool.map(one, range(n)))
            memory = host_memory([vm.pid for vm in vms])
        finally:
            for a in agents:
                a.close()
            for vm in vms:
                vm.kill()
        return Clones(max(done) - t0, [d - t0 for d in done], memory)

    def end(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.vm is not None:
            self.vm.kill()
            self.vm = None
        shutil.rmtree(self.dir, ignore_errors=True)


# -- tenki ----------------------------------------------------------------------------------

@dataclass
class Row:
    memory_mb: int
    dirty_mb: int
    t_paused: float | None = None
    t_capture: float = 0.0
    t_restore: list[float] = field(default_factory=list)
    capture_steps: dict[str, float] = field(default_factory=dict)
    restore_steps: list[dict[str, float]] = field(default_factory=list)
    memory_bytes: int = 0
    size_bytes: int = 0
    compressed_bytes: int = 0
    b_paused: float | None = None
    b_capture: float | None = None
    b_restore: list[float] = field(default_factory=list)
    b_size: int | None = None
    b_disk: int | None = None
    load: HostLoad | None = None  # the machine while this row was measured


def tenki_capture(srv: TenkiServer, session_id: str, row: Row) -> Any:
    t0 = time.monotonic()
    snap = srv.sdk.create_snapshot_and_wait(session_id, name=f"bench-{row.memory_mb}-"
                                            f"{row.dirty_mb}", timeout=900)
    row.t_capture = time.monotonic() - t0
    steps = srv.steps(snap.id)
    row.t_paused = steps.get("guest paused")
    row.capture_steps = steps
    row.memory_bytes, row.size_bytes = snap.memory_bytes, snap.size_bytes
    row.compressed_bytes = snap.compressed_bytes
    log(f"tenki {row.memory_mb} MiB/{row.dirty_mb}: capture {row.t_capture:.2f}s, paused "
        f"{secs(row.t_paused)}, stored {mib(snap.compressed_bytes)}")
    return snap


def tenki_restore(srv: TenkiServer, snapshot_id: str, row: Row, spares: bool) -> None:
    since = srv.log_size()
    t0 = time.monotonic()
    session = srv.sdk.create(snapshot_id=snapshot_id, name="bench-restore")
    try:
        session.wait_ready(timeout=300)
        session.exec("true").check()
        row.t_restore.append(time.monotonic() - t0)
    finally:
        session.terminate()
    steps = srv.steps(f"{session.id} from {snapshot_id}")
    row.restore_steps.append(steps)
    how = "claimed a spare" if "spare" in steps else "whole"
    log(f"tenki {row.memory_mb} MiB/{row.dirty_mb}: restore to exec {row.t_restore[-1]:.2f}s "
        f"({how})")
    if spares:
        # the next restore's spare is prepared now: not while the baseline is measured
        srv.wait_log(rf"spare ses_\w+ of {snapshot_id}: ready in", since, timeout=30.0)


def tenki_clones(srv: TenkiServer, snapshot_id: str, n: int) -> Clones:
    sdk = srv.sdk
    ids: list[str] = []
    try:
        t0 = time.monotonic()
        for i in range(n):
            ids.append(sdk.create(snapshot_id=snapshot_id, name=f"bench-clone-{i}").id)

        def one(sid: str) -> float:
            s = sdk.wait_session_ready(sid, timeout=600)
            s.exec("true").check()
            return time.monotonic()

        with ThreadPoolExecutor(max_workers=n) as pool:
            done = list(pool.map(one, ids))
        memory = srv.memory(ids)
    finally:
        with ThreadPoolExecutor(max_workers=max(1, len(ids))) as pool:
            for fut in [pool.submit(sdk.terminate, sid) for sid in ids]:
                with contextlib.suppress(Exception):
                    fut.result()
    return Clones(max(done) - t0, [d - t0 for d in done], memory)


def with_load(measure: Callable[..., Clones], *args: Any) -> Clones:
    """``measure(*args)``, with the machine's load while it ran."""
    a = CpuTimes.now()
    result = measure(*args)
    result.load = HostLoad.since(a)
    return result


# -- output ---------------------------------------------------------------------------------

def print_report(rows: list[Row], clones: dict[str, Clones], clone_desc: str, label: str,
                 desc: str, note: str | None, args: argparse.Namespace, elapsed: float,
                 before: HostLoad) -> None:
    b = label
    print(f"\n## Snapshots: tenki vs {b} ({args.cpu} vCPU, TCG; restores per row: "
          f"{args.restores}, median (min-max); ratio = tenki/{b})\n")
    print(f"Baseline: {desc}.\n")
    print(f"tenki session captured: {args.session}.\n")
    if note:
        print(f"Baseline note: {note}\n")
    t_rows = []
    for r in rows:
        t_rows.append((
            f"{r.memory_mb} MiB", f"{r.dirty_mb} MiB",
            secs(r.t_paused), secs(r.b_paused), ratio(r.t_paused, r.b_paused),
            secs(r.t_capture), secs(r.b_capture), ratio(r.t_capture, r.b_capture),
            spread(r.t_restore), spread(r.b_restore),
            ratio(median(r.t_restore), median(r.b_restore) if r.b_restore else None),
        ))
    print(md_table(["guest", "dirty", "paused tenki", f"paused {b}", "ratio",
                    "capture tenki", f"capture {b}", "ratio", "restore->exec tenki",
                    f"restore->exec {b}", "ratio"], t_rows))
    print(f"\n### Sizes (tenki record fields; {b}: save file and the disk overlay)\n")
    s_rows = []
    for r in rows:
        s_rows.append((
            f"{r.memory_mb} MiB", f"{r.dirty_mb} MiB", mib(r.memory_bytes), mib(r.size_bytes),
            mib(r.compressed_bytes), mib(r.b_size), mib(r.b_disk),
            ratio(r.compressed_bytes, (r.b_size or 0) + (r.b_disk or 0) or None),
        ))
    print(md_table(["guest", "dirty", "memory_bytes", "size_bytes", "compressed_bytes",
                    f"{b} save file", f"{b} overlay", "stored ratio"], s_rows))
    print("\n### tenki capture steps (server log; 'paused' = guest stopped; rest = API and "
          "waiting)\n")
    c_rows = []
    for r in rows:
        vals = [r.capture_steps.get(s, 0.0) for s in CAPTURE_STEPS]
        c_rows.append((f"{r.memory_mb}/{r.dirty_mb}", *(secs(v) for v in vals),
                       secs(r.t_paused), secs(r.t_capture - sum(vals))))
    print(md_table(["MiB/dirty", *CAPTURE_STEPS, "paused", "rest"], c_rows))
    print("\n### tenki restore steps (server log, medians; rest = API, polling and the first "
          "exec)\n")
    r_rows = []
    for r in rows:
        vals = [median([st.get(s, 0.0) for st in r.restore_steps]) for s in RESTORE_STEPS]
        r_rows.append((f"{r.memory_mb}/{r.dirty_mb}", *(secs(v) for v in vals),
                       secs(median(r.t_restore) - sum(vals))))
    print(md_table(["MiB/dirty", *RESTORE_STEPS, "rest"], r_rows))
    claimed = sum("spare" in st for r in rows for st in r.restore_steps)
    print(f"\nrestores that claimed a spare (prepared after the restore before; the steps "
          f"before 'resume' then ran before the request): {claimed} of "
          f"{sum(len(r.restore_steps) for r in rows)}"
          + ("" if args.spares else " (--no-spares)"))
    if clones:
        print(f"\n### {args.clones} sessions restored at once from one snapshot ({clone_desc})\n")
        print("host memory = PSS of the QEMU processes without the pages of guest RAM files they "
              "map + those files' resident bytes (fincore), each file once + helper processes "
              "(passt)\n")
        k_rows = []
        for system, c in clones.items():
            m = c.memory
            k_rows.append((system, secs(c.total), spread(c.each), mib(m.total),
                           mib(m.total / max(1, len(c.each))), mib(m.pss), mib(m.ram_mapped),
                           f"{mib(m.files)} ({m.file_count})", mib(m.helpers)))
        print(md_table(["system", "all exec-ready", "each exec-ready", "host memory",
                        "per clone", "PSS (QEMU)", "of it RAM-file pages", "RAM files (n)",
                        "helpers"], k_rows))
    print("\n### The machine's load (/proc/stat, all CPUs; both systems' own work included)\n")
    print("Steal is time the hypervisor gave to other guests; a row measured while it or "
          "iowait was high is noisy for both systems.\n")
    l_rows = [("before the run (3 s, nothing of ours running)", *before.cells())]
    l_rows += [(f"{r.memory_mb} MiB / {r.dirty_mb} MiB ({r.load.seconds:.0f} s)", *r.load.cells())
               for r in rows if r.load is not None]
    l_rows += [(f"{args.clones} clones: {system} ({c.load.seconds:.0f} s)", *c.load.cells())
               for system, c in clones.items() if c.load is not None]
    print(md_table(["measured", *LOAD_HEADERS], l_rows))
    # summary
    parts = []

    def rng(xs: list[float]) -> str:
        xs = [x for x in xs if x == x]
        if not xs:
            return "n/a"
        return f"{min(xs):.2f}x" if len(xs) == 1 else f"{min(xs):.2f}-{max(xs):.2f}x"

    def rat(a: float | None, c: float | None) -> float:
        return a / c if a is not None and c else float("nan")

    parts.append("paused " + rng([rat(r.t_paused, r.b_paused) for r in rows]))
    parts.append("capture " + rng([rat(r.t_capture, r.b_capture) for r in rows]))
    parts.append("restore->exec " + rng([rat(median(r.t_restore), median(r.b_restore))
                                         for r in rows if r.b_restore]))
    parts.append("stored bytes " + rng([rat(r.compressed_bytes, (r.b_size or 0) + (r.b_disk or 0))
                                        for r in rows]))
    if "tenki" in clones and b in clones:
        parts.append(f"{args.clones}-way restore time "
                     f"{ratio(clones['tenki'].total, clones[b].total)}, host memory "
                     f"{ratio(clones['tenki'].memory.total, clones[b].memory.total)}")
    growth = []
    for d in sorted({r.dirty_mb for r in rows}):
        same = sorted((r for r in rows if r.dirty_mb == d), key=lambda r: r.memory_mb)
        if len(same) > 1:
            growth.append(f"{same[-1].memory_mb}/{same[0].memory_mb} MiB at {d} MiB dirty "
                          f"{ratio(median(same[-1].t_restore), median(same[0].t_restore))}")
    print(f"\nSummary (tenki/{b}): " + "; ".join(parts)
          + (f". tenki restore time growth with memory: {', '.join(growth)}" if growth else "")
          + f". Total bench time {elapsed:.0f}s.")


# -- main -----------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", type=int_list, default=None,
                    help="guest memory sizes in MiB (default 512,1024,4096)")
    ap.add_argument("--dirty", type=int_list, default=[0, 256],
                    help="MiB of random data written into the guest (default 0,256)")
    ap.add_argument("--restores", type=int, default=None,
                    help="restores per row and system (default 2; --quick: 1)")
    ap.add_argument("--clones", type=int, default=10,
                    help="sessions restored at once from one snapshot (0: skip; default 10)")
    ap.add_argument("--clone-from", type=int, default=None,
                    help="guest memory of the snapshot the clones come from (default 1024 if "
                         "measured, else the first size)")
    ap.add_argument("--baseline", choices=("auto", "libvirt", "qemu"), default="auto",
                    help="auto: libvirt, or plain QEMU migrate-to-file when libvirt cannot run")
    ap.add_argument("--cpu", type=int, default=2)
    ap.add_argument("--session", choices=("restored", "booted"), default="restored",
                    help="the tenki session captured: restored from a snapshot of a freshly "
                         "booted one (what every create but a size's first is: a restore of "
                         "the image's golden snapshot), or the booted one itself")
    ap.add_argument("--no-spares", dest="spares", action="store_false",
                    help="tenki prepares no restore ahead (TENKI_SPARES=off): every restore "
                         "runs whole (by default the next restore of a snapshot claims the "
                         "spare prepared after the one before, as in the product)")
    ap.add_argument("--quick", action="store_true",
                    help="512 and 1024 MiB, one restore per row (unless given explicitly)")
    args = ap.parse_args()
    # a run once waited 17 min on a baseline guest that hung at boot, with no word of where:
    # while a run lasts, every 10 min, the stack of every thread goes to stderr
    faulthandler.dump_traceback_later(WATCHDOG_S, repeat=True)
    if args.memory is None:
        args.memory = [512, 1024] if args.quick else [512, 1024, 4096]
    if args.restores is None:
        args.restores = 1 if args.quick else 2
    if args.restores < 1:
        ap.error("--restores must be at least 1")
    if any(m < 512 for m in args.memory):
        ap.error("--memory: tenki sessions have at least 512 MiB")
    if args.clone_from is None:
        args.clone_from = 1024 if 1024 in args.memory else args.memory[0]
    if args.clones and args.clone_from not in args.memory:
        ap.error(f"--clone-from {args.clone_from} is not among --memory {args.memory}")

    started = time.monotonic()
    rows: list[Row] = []
    clones: dict[str, Clones] = {}
    clone_desc = ""
    note: str | None = None
    # before anything of ours runs: what the machine's other tenants take (3 s)
    before = HostLoad.idle_for(3.0)
    with Cleanup() as cleanup:
        image_dir = ensure_image()
        srv = TenkiServer(cleanup, image_dir, "snapshot",
                          extra_env={"TENKI_SPARES": "on" if args.spares else "off"})
        work = Path(tempfile.mkdtemp(prefix="tenki-bench-baseline-"))
        cleanup.push(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
        baseline: LibvirtBaseline | QemuFileBaseline
        if args.baseline in ("auto", "libvirt"):
            try:
                lv = Libvirt(cleanup)
                note = lv.warning
                baseline = LibvirtBaseline(cleanup, lv, work, srv.image, args.cpu)
            except Exception as exc:
                if args.baseline == "libvirt":
                    raise
                note = f"libvirt cannot run here ({exc}); plain QEMU migration to a file instead"
                log(note)
                baseline = QemuFileBaseline(cleanup, work, srv.image, args.cpu)
        else:
            baseline = QemuFileBaseline(cleanup, work, srv.image, args.cpu)
        label = baseline.label

        for memory_mb in args.memory:
            log(f"== {memory_mb} MiB guest: booting a tenki session and a {label} guest")
            session = srv.sdk.create_and_wait(memory_mb=memory_mb, cpu=args.cpu,
                                              name=f"bench-{memory_mb}", timeout=300)
            cleanup.push(f"terminate {session.id}", session.terminate)
            if args.session == "restored":
                seed = srv.sdk.create_snapshot_and_wait(session.id, name=f"seed-{memory_mb}",
                                                        timeout=600)
                session.terminate()
                session = srv.sdk.create_and_wait(snapshot_id=seed.id, name=f"bench-{memory_mb}",
                                                  timeout=300)
                cleanup.push(f"terminate {session.id}", session.terminate)
            session.exec("true").check()
            boot = baseline.boot(memory_mb)
            cleanup.push(f"end {label} guest {memory_mb}", baseline.end)
            log(f"{label} guest exec-ready in {boot:.1f}s")
            for dirty in args.dirty:
                row = Row(memory_mb, dirty)
                rows.append(row)
                row_start = CpuTimes.now()
                if dirty:
                    log(f"writing {dirty} MiB of random data into both guests")
                    session.shell(dirty_command(dirty), timeout=900).check()
                    baseline.shell(dirty_command(dirty))
                snap = tenki_capture(srv, session.id, row)
                saved = baseline.save(f"{dirty}")
                row.b_paused, row.b_capture = saved.paused, saved.total
                row.b_size, row.b_disk = saved.size, saved.disk_bytes
                log(f"{label} {memory_mb} MiB/{dirty}: save {saved.total:.2f}s, "
                    f"{mib(saved.size)}")
                for k in range(args.restores):
                    tenki_restore(srv, snap.id, row, args.spares)
                    row.b_restore.append(baseline.restore(saved, keep=k == args.restores - 1))
                    log(f"{label} {memory_mb} MiB/{dirty}: restore to exec "
                        f"{row.b_restore[-1]:.2f}s")
                row.load = HostLoad.since(row_start)
                if args.clones and memory_mb == args.clone_from and dirty == args.dirty[-1]:
                    clone_desc = f"{memory_mb} MiB guest, {dirty} MiB dirty"
                    log(f"restoring {args.clones} tenki sessions at once ({clone_desc})")
                    clones["tenki"] = with_load(tenki_clones, srv, snap.id, args.clones)
                    log(f"tenki: {args.clones} clones in {clones['tenki'].total:.2f}s, "
                        f"{mib(clones['tenki'].memory.total)}")
                    log(f"restoring {args.clones} {label} guests at once")
                    clones[label] = with_load(baseline.clones, saved, args.clones)
                    log(f"{label}: {args.clones} clones in {clones[label].total:.2f}s, "
                        f"{mib(clones[label].memory.total)}")
                with contextlib.suppress(OSError):
                    saved.path.unlink()
            session.terminate()
            baseline.end()
            # snapshots stay until the temporary home goes: deleting one runs the layer garbage
            # collector in the background, which can race the next session's boot (the base
            # image's hard link is old, so its age does not protect it)

    print_report(rows, clones, clone_desc, label, baseline.desc, note, args,
                 time.monotonic() - started, before)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: tenki session cold boot and exec latency against a plain QEMU boot of the same image.

    .venv/bin/python bench/session.py [--runs 3] [--execs 10] [--memory-mb 4096] [--cpu 2]

tenki (through the SDK, against a private server on a temporary TENKI_HOME):
- cold boot to exec-ready: ``create()`` until the first ``exec true`` has answered;
- boot to READY: ``create()`` until the session is READY (the agent answered, clock set);
- ``exec true`` round trip: HTTP start + output stream until the exit code.

Baseline: ``qemu-system-x86_64`` with the same kernel, initrd, command line, q35, qemu64, TCG,
an overlay on the same base disk and the same virtio-serial agent port (plain anonymous RAM,
QEMU's built-in user network instead of passt), timed from process start until the guest agent
answers a ping on its socket (init is up), and until its first ``exec true``; exec round trips
straight over the agent socket (the floor under tenki's API).

Then (issue 12) create -> first exec answered for a session from a template (a build that
writes files and starts an HTTP server, waited for on its port), for a default create (which
restores the image's golden snapshot) and for a restore of a plain snapshot, against the cold
boots above (asked for with ``cold_boot``), in the same run.

Runs alternate (baseline, tenki, baseline, ...) so that load from other VMs on the host hits both;
compare ratios within one run. Nothing is asserted: it prints markdown tables and a summary line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from _common import (
    Agent,
    Cleanup,
    PlainVM,
    TenkiServer,
    ensure_image,
    log,
    md_table,
    median,
    ratio,
    secs,
    spread,
)

BOOT_STEPS = ("image", "overlay", "launch", "agent", "clock")


def tenki_run(srv: TenkiServer, args: argparse.Namespace, out: dict[str, list[float]]) -> None:
    sdk = srv.sdk
    t0 = time.monotonic()
    # a cold boot, asked for: a plain create restores the image's golden snapshot
    session = sdk.create(memory_mb=args.memory_mb, cpu=args.cpu, name="bench-boot",
                         cold_boot=True)
    try:
        session.wait_ready(timeout=300)
        t_ready = time.monotonic()
        session.exec("true").check()
        t_exec = time.monotonic()
        out["exec_ready"].append(t_exec - t0)
        out["ready"].append(t_ready - t0)
        for _ in range(args.execs):
            t = time.monotonic()
            session.exec("true").check()
            out["exec"].append(time.monotonic() - t)
        steps = srv.steps(session.id)
        for name in BOOT_STEPS:
            out[f"step:{name}"].append(steps.get(name, 0.0))
        t = time.monotonic()
    finally:
        session.terminate()
    out["terminate"].append(time.monotonic() - t)
    log(f"tenki: exec-ready {out['exec_ready'][-1]:.2f}s, steps "
        + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items()))


def baseline_run(cleanup: Cleanup, srv: TenkiServer, work: Path, i: int,
                 args: argparse.Namespace, out: dict[str, list[float]]) -> None:
    vm = PlainVM(cleanup, work, srv.image, args.memory_mb, args.cpu, f"plain{i}")
    agent = Agent(vm.agent_sock)
    try:
        agent.connect(300)
        t_ping = time.monotonic()
        code, _, err = agent.exec(["true"])
        t_exec = time.monotonic()
        if code != 0:
            raise RuntimeError(f"exec true failed in the plain VM: {err!r}")
        out["exec_ready"].append(t_exec - vm.started)
        out["ready"].append(t_ping - vm.started)
        for _ in range(args.execs):
            t = time.monotonic()
            code, _, _ = agent.exec(["true"])
            out["exec"].append(time.monotonic() - t)
    finally:
        agent.close()
        t = time.monotonic()
        vm.kill()
        out["terminate"].append(time.monotonic() - t)
        shutil.rmtree(vm.dir, ignore_errors=True)
    log(f"plain QEMU: exec-ready {out['exec_ready'][-1]:.2f}s (ping {out['ready'][-1]:.2f}s)")


def _golden_ready(srv: TenkiServer, args: argparse.Namespace) -> bool:
    import sqlite3

    with contextlib.closing(sqlite3.connect(srv.home / "tenki.db")) as db:
        rows = db.execute("SELECT 1 FROM snapshots WHERE state = 'READY' AND template_id LIKE "
                          "?", (f"golden:%/{args.cpu}x{args.memory_mb}",)).fetchall()
    return bool(rows)


def from_template_runs(srv: TenkiServer, args: argparse.Namespace,
                       out: dict[str, list[float]]) -> None:
    """create -> first exec for: a session from a template, a snapshot restore."""
    import httpx

    with httpx.Client(base_url=srv.url, timeout=600,
                      headers={"Authorization": f"Bearer {srv.key}"}) as api:
        tpl = api.post("/v1/templates", json={
            "name": "bench-web", "cpu": args.cpu, "memory_mb": args.memory_mb,
            "setup_script": "sudo install -d -o tenki /srv/www && echo ok > /srv/www/index.html\n",
            "start_cmd": "cd /srv/www && exec python3 -m http.server 8080",
            "ready_when": {"port": 8080, "timeout_s": 120}}).json()
        t = time.monotonic()
        build = api.post(f"/v1/templates/{tpl['id']}/builds").json()
        while build["state"] not in ("READY", "FAILED"):
            build = api.get(f"/v1/templates/{tpl['id']}/builds/{build['id']}/wait",
                            params={"timeout_s": 30}).json()
        if build["state"] != "READY":
            raise RuntimeError(f"template build failed: {json.dumps(build)[:2000]}")
        out["build"].append(time.monotonic() - t)
    sdk = srv.sdk
    source = sdk.create_and_wait(memory_mb=args.memory_mb, cpu=args.cpu, name="bench-src",
                                 timeout=300)
    snap = sdk.create_snapshot_and_wait(source.id, "bench-restore", timeout=600)
    source.terminate()
    # the default create: its first one makes the golden snapshot of this size
    first = sdk.create_and_wait(memory_mb=args.memory_mb, cpu=args.cpu, name="bench-first",
                                timeout=300)
    first.terminate()
    t = time.monotonic()
    while not _golden_ready(srv, args):
        if time.monotonic() - t > 600:
            raise RuntimeError("no golden snapshot after 600 s")
        time.sleep(0.5)
    for i in range(args.runs):
        for kind, fields in (("template", {"template_id": tpl["id"]}),
                             ("restore", {"snapshot_id": snap.id}),
                             ("default", {"cpu": args.cpu, "memory_mb": args.memory_mb})):
            t0 = time.monotonic()
            with httpx.Client(base_url=srv.url, timeout=600,
                              headers={"Authorization": f"Bearer {srv.key}"}) as api:
                made = api.post("/v1/sessions", json={"name": f"bench-{kind}-{i}", **fields})
            made.raise_for_status()
            s = sdk.get(made.json()["id"])
            try:
                s.wait_ready(timeout=300)
                s.exec("true").check()
                out[kind].append(time.monotonic() - t0)
            finally:
                s.terminate()
        log(f"template {out['template'][-1]:.2f}s, restore {out['restore'][-1]:.2f}s, "
            f"default {out['default'][-1]:.2f}s")
    if args.parallel > 1:
        for kind, fields in (("template", {"template_id": tpl["id"]}),
                             ("restore", {"snapshot_id": snap.id}),
                             ("cold boot", {"cpu": args.cpu, "memory_mb": args.memory_mb,
                                            "cold_boot": True})):
            wall, mib = _at_once(srv, args.parallel, fields)
            out[f"{kind} x{args.parallel}"].append(wall)
            out[f"{kind} x{args.parallel} MiB"].append(mib)
            log(f"{args.parallel} x {kind} at once: {wall:.2f}s, {mib:.0f} MiB of host memory")
    sdk.delete_snapshot(snap.id)


def _at_once(srv: TenkiServer, n: int, fields: Mapping[str, object]) -> tuple[float, float]:
    """``n`` creates at once, each until its first exec answered: the wall time, then the host
    memory (PSS of QEMU and its network helper) of the ``n`` idle sessions."""
    import concurrent.futures

    import httpx

    def one(i: int) -> str:
        with httpx.Client(base_url=srv.url, timeout=600,
                          headers={"Authorization": f"Bearer {srv.key}"}) as api:
            made = api.post("/v1/sessions", json={"name": f"bench-n{i}", **fields})
        made.raise_for_status()
        s = srv.sdk.get(made.json()["id"])
        s.wait_ready(timeout=600)
        s.exec("true").check()
        return s.id

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        ids = list(pool.map(one, range(n)))
    wall = time.monotonic() - t0
    time.sleep(5)  # idle
    mem = srv.memory(ids)
    mib = mem.total / (1 << 20)  # private memory + each guest RAM file once + helpers
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda sid: srv.sdk.terminate(sid), ids))
    return wall, mib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="cold boots of each kind (default 3)")
    ap.add_argument("--execs", type=int, default=10,
                    help="exec round trips per booted VM (default 10)")
    ap.add_argument("--memory-mb", type=int, default=4096, help="guest memory (default 4096)")
    ap.add_argument("--cpu", type=int, default=2, help="vCPUs (default 2)")
    ap.add_argument("--parallel", type=int, default=10,
                    help="creates at once from a template, a snapshot and cold (default 10; "
                    "1: none)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    tenki: dict[str, list[float]] = {k: [] for k in ("exec_ready", "ready", "exec", "terminate")}
    tenki.update({f"step:{s}": [] for s in BOOT_STEPS})
    base: dict[str, list[float]] = {k: [] for k in ("exec_ready", "ready", "exec", "terminate")}
    started = time.monotonic()
    with Cleanup() as cleanup:
        image_dir = ensure_image()
        srv = TenkiServer(cleanup, image_dir, "session")
        work = Path(tempfile.mkdtemp(prefix="tenki-bench-plain-"))
        cleanup.push(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}")
            baseline_run(cleanup, srv, work, i, args, base)
            tenki_run(srv, args, tenki)
        fast: dict[str, list[float]] = collections.defaultdict(list)
        from_template_runs(srv, args, fast)

    print(f"\n## Session boot and exec ({args.runs} cold boots each, {args.execs} execs per "
          f"boot; {args.cpu} vCPU, {args.memory_mb} MiB, TCG; median (min-max))\n")
    rows = [
        ("cold boot to exec-ready", spread(tenki["exec_ready"]), spread(base["exec_ready"]),
         ratio(median(tenki["exec_ready"]), median(base["exec_ready"]))),
        ("boot to agent ready (tenki: READY; QEMU: ping)", spread(tenki["ready"]),
         spread(base["ready"]), ratio(median(tenki["ready"]), median(base["ready"]))),
        ("`exec true` round trip", spread(tenki["exec"], digits=4),
         spread(base["exec"], digits=4), ratio(median(tenki["exec"]), median(base["exec"]))),
        ("stop (terminate / kill)", spread(tenki["terminate"]), spread(base["terminate"]),
         ratio(median(tenki["terminate"]), median(base["terminate"]))),
    ]
    print(md_table(["metric", "tenki (SDK)", "plain QEMU (agent socket)", "ratio"], rows))
    step_rows = [(name, secs(median(tenki[f"step:{name}"]))) for name in BOOT_STEPS]
    accounted = sum(median(tenki[f"step:{name}"]) for name in BOOT_STEPS)
    step_rows.append(("API, polling and first exec (rest)",
                      secs(median(tenki["exec_ready"]) - accounted)))
    print("\n### tenki boot steps (server log, medians)\n")
    print(md_table(["step", "time"], step_rows))
    cold = median(tenki["exec_ready"])
    print("\n### create -> first exec: from a template, from a snapshot, cold boot (same run)\n")
    print(md_table(["path", "time", "vs cold boot", "vs snapshot restore"], [
        ("template (golden snapshot; an HTTP server already runs)", spread(fast["template"]),
         ratio(median(fast["template"]), cold),
         ratio(median(fast["template"]), median(fast["restore"]))),
        ("default create (the image's golden snapshot)", spread(fast["default"]),
         ratio(median(fast["default"]), cold),
         ratio(median(fast["default"]), median(fast["restore"]))),
        ("snapshot restore", spread(fast["restore"]), ratio(median(fast["restore"]), cold),
         "1.00x"),
        ("cold boot", spread(tenki["exec_ready"]), "1.00x",
         ratio(cold, median(fast["restore"]))),
        ("(the template's build, once)", spread(fast["build"]), "", ""),
    ]))
    if args.parallel > 1:
        n = args.parallel
        print(f"\n### {n} creates at once, until each answered its first exec; then the host "
              f"memory of the {n} idle sessions (PSS of QEMU and its network helper)\n")
        par_rows = []
        for kind in ("template", "restore", "cold boot"):
            par_rows.append((kind, secs(median(fast[f"{kind} x{n}"])),
                             ratio(median(fast[f"{kind} x{n}"]), median(fast[f"restore x{n}"])),
                             f"{median(fast[f'{kind} x{n} MiB']):.0f} MiB",
                             ratio(median(fast[f"{kind} x{n} MiB"]),
                                   median(fast[f"cold boot x{n} MiB"]))))
        print(md_table(["path", "wall time", "vs restore", "host memory", "vs cold boot"],
                       par_rows))
    print(f"\nSummary: tenki/plain-QEMU boot-to-exec-ready "
          f"{ratio(median(tenki['exec_ready']), median(base['exec_ready']))} (fastest runs "
          f"{ratio(min(tenki['exec_ready']), min(base['exec_ready']))}), exec round trip "
          f"{ratio(median(tenki['exec']), median(base['exec']))} (fastest "
          f"{ratio(min(tenki['exec']), min(base['exec']))}); medians move with the load of "
          f"other VMs on the host (total bench time {time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

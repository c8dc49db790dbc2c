#!/usr/bin/env python3
"""Benchmark: exec round trip through the official Python SDK against our own SDK, same session.

    .venv/bin/python bench/official_sdk.py [--execs 30] [--warmup 5] [--memory-mb 1024] [--cpu 2]

One private server (a temporary TENKI_HOME), one session, two clients in this process:
- official: PyPI ``tenki`` 1.4.1 (``tenki.Client``), over the server's gRPC wire
  (``grpc_endpoint``: control plane ``SandboxService``, exec over the data plane's bidi ``Run``
  with a session credential), ``sandbox.exec("echo", "hi")``. As in the product, that command
  runs as the guest user ``tenki`` (the guest agent switches user in the child);
  ``privileged=True`` runs it as root, as our SDK does, and is measured too;
- ours: ``tenkibox.Client`` over the REST API (process start + NDJSON event stream),
  ``session.exec("echo", "hi")`` (as root).

All warm up first (the official SDK fetches its data-plane credential on its first exec), then
``--execs`` round trips each, interleaved (official, privileged, ours, ...; the order rotates)
so that load from other VMs on the host hits them alike; compare ratios within one run. Each
round trip is checked (exit 0, stdout ``hi``). Prints a markdown table and the ratio
official/ours (goal: at most 1.5x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import metadata

import tenki  # the official SDK (the dev extra pins tenki==1.4.1)
from _common import Cleanup, TenkiServer, ensure_image, log, md_table, median, ratio, spread

GOAL = 1.5


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execs", type=int, default=30, help="measured round trips per SDK (30)")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured round trips first (5)")
    ap.add_argument("--memory-mb", type=int, default=1024, help="guest memory (default 1024)")
    ap.add_argument("--cpu", type=int, default=2, help="vCPUs (default 2)")
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 when official/ours is above {GOAL}x")
    args = ap.parse_args()
    if args.execs < 1:
        ap.error("--execs must be at least 1")

    times: dict[str, list[float]] = {"official": [], "privileged": [], "ours": []}
    started = time.monotonic()
    with Cleanup() as cleanup:
        srv = TenkiServer(cleanup, ensure_image(), "official")
        grpc = json.loads((srv.home / "server.json").read_text()).get("grpc_endpoint")
        if not grpc:
            raise SystemExit("the server announces no grpc_endpoint (no gRPC wire)")
        log(f"gRPC wire at {grpc}")
        session = srv.sdk.create_and_wait(memory_mb=args.memory_mb, cpu=args.cpu,
                                          name="bench-official", timeout=600)
        cleanup.push(f"terminate {session.id}", session.terminate)
        official = tenki.Client(base_url=grpc, api_key=srv.key)
        cleanup.push("close the official client", official.close)
        box = official.get(session.id)
        log(f"session {session.id}: {box.state} (official SDK {metadata.version('tenki')})")

        def run_official() -> float:
            t = time.perf_counter()
            r = box.exec("echo", "hi")
            took = time.perf_counter() - t
            if r.exit_code != 0 or r.stdout != b"hi\n":
                raise RuntimeError(f"official exec: {r}")
            return took

        def run_privileged() -> float:
            t = time.perf_counter()
            r = box.exec("echo", "hi", privileged=True)
            took = time.perf_counter() - t
            if r.exit_code != 0 or r.stdout != b"hi\n":
                raise RuntimeError(f"official privileged exec: {r}")
            return took

        def run_ours() -> float:
            t = time.perf_counter()
            r = session.exec("echo", "hi")
            took = time.perf_counter() - t
            if r.exit_code != 0 or r.stdout_bytes != b"hi\n":
                raise RuntimeError(f"our exec: {r}")
            return took

        first = {"official": run_official(), "ours": run_ours()}
        runs = [("official", run_official), ("privileged", run_privileged), ("ours", run_ours)]
        for _ in range(max(0, args.warmup - 1)):
            for _name, fn in runs:
                fn()
        for i in range(args.execs):
            # rotate the order, so that none always follows the same one
            for name, fn in runs[i % 3:] + runs[:i % 3]:
                times[name].append(fn())
        log(f"{args.execs} round trips each in {time.monotonic() - started:.0f}s in all")

    off, priv, ours = times["official"], times["privileged"], times["ours"]
    print(f"\n## exec round trip `echo hi` on one session ({args.execs} each after "
          f"{args.warmup} warm-up, interleaved; {args.cpu} vCPU, {args.memory_mb} MiB, TCG)\n")
    version = metadata.version("tenki")
    rows = []
    for label, xs in ((f"official tenki {version} (gRPC), as the guest user", off),
                      (f"official tenki {version} (gRPC), privileged=True", priv),
                      ("tenkibox SDK (REST), as root", ours)):
        rows.append((label, spread(xs, digits=4), f"{statistics.fmean(xs):.4f}s",
                     f"{p90(xs):.4f}s", ratio(median(xs), median(ours))))
    print(md_table(["`echo hi`", "median (min-max)", "mean", "p90", "median / ours"], rows))
    print(f"\nfirst exec: official {first['official']:.4f}s (with its data-plane credential), "
          f"ours {first['ours']:.4f}s")
    r = median(off) / median(ours)
    rp = median(priv) / median(ours)
    verdict = "within" if r <= GOAL else "ABOVE"
    print(f"\nofficial/ours (median) = {r:.2f}x: {verdict} the goal of {GOAL}x "
          f"(privileged, the same user as ours: {rp:.2f}x)")
    return 1 if args.check and r > GOAL else 0


if __name__ == "__main__":
    sys.exit(main())

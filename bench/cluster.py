"""Many hosts on one machine (``scripts/cluster``, needs root): what a restore costs on a host
that caches the snapshot's artifacts against one that must fetch them from the bucket, and how
creates spread over two hosts compare with the same creates on one.

    .venv/bin/python bench/cluster.py [--memory 1024] [--restores 3] [--creates 20]

1. A session on host 1 (``--memory`` MiB, 256 MiB of its memory dirtied) is snapshotted there.
2. **Cached**: ``--restores`` restores on host 1 (every artifact is in its local cache since
   the capture): seconds from ``create`` to the first ``exec true`` answered.
3. **Fetched**: ``--restores`` restores on host 2, each after host 2's cache of the snapshot's
   artifacts (and the RAM cache derived from them) is emptied: the same time, and the bytes
   downloaded (the growth of host 2's artifact directory).
4. **Placement under load**: ``--creates`` restores at once, placed by the control plane (over
   both hosts), against the same number pinned to host 1: time until all answered ``exec true``.

Both sides of each ratio run in this one process against the same cluster, one after the other;
the host's load is printed with the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
sys.path.insert(0, str(BENCH_DIR))

from _common import log, md_table, median, ratio, spread  # noqa: E402
from support import cluster as cl  # noqa: E402  (this file is "cluster" too)

from tenkibox import Client  # noqa: E402


def dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def restore_time(client: Client, snapshot_id: str, host_id: str | None) -> tuple[float, Any]:
    t0 = time.monotonic()
    s = client.create_and_wait(snapshot_id=snapshot_id, host_id=host_id, timeout=900)
    s.shell("true", timeout=120).check()
    return time.monotonic() - t0, s


def forget(home: Path) -> None:
    """Host ``home`` loses its cached artifacts but the guest image's files, and its RAM caches:
    as a host that runs sessions of the image but never saw the snapshot."""
    image = json.loads((home / "images" / "sandbox" / "image.json").read_text())
    keep = set(image.get("sha256", {}).values())
    for p in (home / "artifacts" / "sha256").glob("*"):
        if p.is_file() and p.name not in keep:
            p.unlink()
    shutil.rmtree(home / "host" / "ram-cache", ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--restores", type=int, default=3)
    ap.add_argument("--creates", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cluster.py needs root (scripts/cluster)", file=sys.stderr)
        return 1
    d = Path(tempfile.mkdtemp(prefix="tenki-bench-cluster-"))
    os.chmod(d, 0o755)
    try:
        c = cl.up(d, hosts=2, subnet="10.233.0.0/24", prefix="tkb",
                  env={"TENKI_GOLDEN": "off"})
        client = Client(c.control_url, c.api_key, autostart=False)
        by_address = {h.address: h.host_id for h in client.hosts.list()}
        h1, h2 = (by_address[h.url] for h in c.hosts)
        log(f"cluster up: {h1} and {h2}")
        src = client.create_and_wait(name="bench-src", memory_mb=args.memory, host_id=h1,
                                     timeout=900)
        src.shell("head -c 256M /dev/urandom > /dev/shm/dirty", timeout=600).check()
        snap = client.create_snapshot_and_wait(src.id, "bench-cluster", timeout=900)
        src.terminate()
        log(f"snapshot {snap.id}: {snap.size_bytes} bytes")
        cached: list[float] = []
        for _ in range(args.restores):
            t, s = restore_time(client, snap.id, h1)
            cached.append(t)
            s.terminate()
        home2 = Path(c.hosts[1].home)
        # host 2 runs sessions of the image already: only the snapshot is new to it
        client.create_and_wait(name="bench-warm", memory_mb=512, host_id=h2,
                               timeout=900).terminate()
        fetched: list[float] = []
        moved: list[int] = []
        for _ in range(args.restores):
            forget(home2)
            before = dir_bytes(home2 / "artifacts")
            t, s = restore_time(client, snap.id, h2)
            fetched.append(t)
            moved.append(dir_bytes(home2 / "artifacts") - before)
            s.terminate()
        log(f"cached {cached}, fetched {fetched}, moved {moved}")

        def many(pin: str | None) -> float:
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(args.creates) as pool:
                made = list(pool.map(lambda _i: restore_time(client, snap.id, pin)[1],
                                     range(args.creates)))
            took = time.monotonic() - t0
            spread_over = {s.host_id for s in made}
            for s in made:
                s.terminate()
            log(f"{args.creates} creates ({'pinned to ' + pin if pin else 'placed'}): "
                f"{took:.2f} s over {sorted(spread_over)}")
            return took

        one = many(h1)
        two = many(None)
        print(md_table(["restore", "to first exec", "bytes moved"], [
            ["cached on the host", spread(cached), "0"],
            ["fetched from S3", spread(fetched), f"{median(moved) / 2**20:.0f} MiB"],
            ["ratio fetched/cached", ratio(median(fetched), median(cached)), ""]]))
        print()
        print(md_table([f"{args.creates} creates at once", "time to all exec-ready"], [
            ["one host", f"{one:.2f}s"], ["placed over two hosts", f"{two:.2f}s"],
            ["ratio two/one", ratio(two, one)]]))
        print(f"\nload: {os.getloadavg()}")
        client.close()
    finally:
        cl.down(d, purge=True)
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RAM image compression (``artifacts.ramfile.pack``): one compressing thread against a pool.

A 1 GiB sparse RAM file on tmpfs with 128 MiB of random (incompressible, like dirty guest data)
and 128 MiB of compressible pages, packed to tmpfs by ``workers=1`` and by the default pool,
alternating, medians of ``--runs``. Prints a markdown table with the ratio pool/one.

    .venv/bin/python bench/ram_pack.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import md_table

from tenkibox.artifacts import ramfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        src, dst = Path(tmp) / "guest.ram", Path(tmp) / "ram.zst"
        with open(src, "wb") as f:
            f.truncate(1 << 30)
            f.seek(64 << 20)
            f.write(os.urandom(128 << 20))
            f.seek(512 << 20)
            f.write((b"tenki page " * 100_000)[: 1 << 20] * 128)
        times: dict[str, list[float]] = {"one thread": [], "pool": []}
        for _ in range(args.runs):
            for label, workers in (("one thread", 1), ("pool", None)):
                t = time.perf_counter()
                ramfile.pack(src, dst, workers=workers)
                times[label].append(time.perf_counter() - t)
    one, pool = (statistics.median(times[k]) for k in ("one thread", "pool"))
    print(md_table(["pack 256 MiB touched", "one thread", f"pool ({os.cpu_count()} cores)",
                    "pool/one"],
                   [["median (s)", f"{one:.3f}", f"{pool:.3f}", f"{pool / one:.2f}x"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

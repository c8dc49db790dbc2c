"""RAM image compression (``artifacts.ramfile``): one compressing thread against a pool, and
an image written past the page cache against through it.

1. A 1 GiB sparse RAM file on tmpfs with 128 MiB of random (incompressible, like dirty guest
   data) and 128 MiB of compressible pages, packed to tmpfs by ``workers=1`` and by the default
   pool.
2. The written pages of a restored VM's capture (``pack_pages``: 256 MiB of random data over a
   1 GiB RAM cache) packed to ``--dir`` (a disk, as the artifact store is; default: the
   current directory) and synced: past the page cache (``O_DIRECT``, as the sink writes where
   the file system takes it) and through it (``SINK_WRITE`` at a time, the write-back started
   every ``ramfile.WRITEBACK`` bytes, as elsewhere). The difference grows when the machine's
   fresh memory is dear (see ``ramfile._Sink``): a run in a quiet moment shows the least of it.

Each pair alternates, medians of ``--runs``. Prints markdown tables with the ratios.

    .venv/bin/python bench/ram_pack.py [--runs 5] [--dir PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO
from unittest import mock

from _common import md_table

from tenkibox.artifacts import ramfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path.cwd(),
                    help="a directory on the disk the images go to (part 2)")
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
    print()
    _direct(args.runs, args.dir)
    return 0


def _through(_f: BinaryIO) -> ramfile._DirectFile | None:
    """As ``_DirectFile.open`` where the file system takes no direct writes."""
    return None


def _direct(runs: int, where: Path) -> None:
    size, mib = 1 << 30, 256
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp, \
            tempfile.TemporaryDirectory(dir=where, prefix="ram-pack-") as out:
        cache, pages = Path(tmp) / "cache.ram", Path(tmp) / "pages.ram"
        with open(cache, "wb") as f:
            f.truncate(size)
            f.write(os.urandom(64 << 20))
        ramfile.pack_delta(cache, Path(tmp) / "cache.img")
        cache_index = ramfile.read_index(Path(tmp) / "cache.img")
        with open(pages, "wb") as f:
            f.truncate(size)
            f.seek(128 << 20)
            f.write(os.urandom(mib << 20))
        ranges = [(128 << 20, (128 + mib) << 20)]
        times: dict[str, list[float]] = {"through": [], "past": []}
        for i in range(runs):
            for label in ("through", "past"):
                dst = Path(out) / f"{i}-{label}.img"
                with (mock.patch.object(ramfile._DirectFile, "open", _through)
                      if label == "through" else contextlib.nullcontext()):
                    t = time.perf_counter()
                    ramfile.pack_pages(pages, ranges, cache, cache_index, dst)
                    times[label].append(time.perf_counter() - t)
                dst.unlink()
    through, past = (statistics.median(times[k]) for k in ("through", "past"))
    print(md_table([f"pack_pages {mib} MiB written, synced", "through the page cache",
                    "past it (O_DIRECT)", "past/through"],
                   [["median (s)", f"{through:.3f}", f"{past:.3f}", f"{past / through:.2f}x"]]))


if __name__ == "__main__":
    sys.exit(main())

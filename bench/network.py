"""Guest network cost: today's tap-in-a-namespace network against the user-mode helper (passt).

Two tenki servers in this process's run, identical but for ``TENKI_NET`` (``tap``: the default
where the host can enforce policies; ``passt``: the helper it replaced). For each: N idle
sessions restored from the golden snapshot, then
- host memory of the network per idle session: the helper's PSS (passt), and the kernel's slab
  growth per session (everything the kernel holds for a VM; for tap also its namespace, veth
  pair, tap device and tables);
- host CPU of the network while the sessions idle for ``--idle`` seconds (the helper's CPU time;
  the kernel's per-namespace work shows as the server's, which is also measured);
- throughput of a guest → test-service download (64 MiB from a service in a network namespace
  of this benchmark's, medians of 3).
Prints a markdown table with raw numbers and ratios tap/passt. Needs root (namespaces).

    python bench/network.py [--sessions 3] [--idle 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _common import Cleanup, TenkiServer, ensure_image, log, md_table

from tenkibox.client import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.netlab import PUBLIC_A, NetLab

DOWNLOAD = r'''
import socket, sys, time
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 8200), timeout=30)
t = time.perf_counter(); s.sendall(b"%d\n" % n); got = 0
while True:
    b = s.recv(1 << 20)
    if not b: break
    got += len(b)
print(got, time.perf_counter() - t)
'''


def pids_of(name: str, tag: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmd.startswith(name) and tag in cmd:
                out.append(int(proc.name))
    return out


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slab_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


def measure(mode: str, image: Path, args: argparse.Namespace, cleanup: Cleanup) -> dict[str, float]:
    srv = TenkiServer(cleanup, image, f"net-{mode}", extra_env={"TENKI_NET": mode})
    assert srv.client is not None
    warm = srv.client.create_and_wait(memory_mb=1024, timeout=900)  # builds the golden one
    warm.terminate()
    before = slab_kib()
    sessions: list[Session] = []
    alive = sessions  # terminated ones leave it; cleanup terminates the rest
    for i in range(args.sessions):
        s = srv.client.create_and_wait(memory_mb=1024, name=f"net-{mode}-{i}", timeout=300)
        def end(s: Session = s) -> None:
            if s in alive:
                s.terminate()

        cleanup.push(f"terminate {s.id}", end)
        sessions.append(s)
    helpers = [p for s in sessions for p in pids_of("passt", "")] if mode == "passt" else []
    helpers = sorted(set(helpers))
    helper_pss = sum(pss_kib(p) for p in helpers) / max(1, len(sessions)) / 1024
    # the kernel's objects per session (the VM's and, for tap, its namespace, devices, rules)
    other_mib = (slab_kib() - before) / 1024 / len(sessions)
    cpu0 = {p: cpu_s(p) for p in helpers}
    srv_cpu0 = cpu_s(srv.proc.pid)
    time.sleep(args.idle)
    helper_cpu = sum(cpu_s(p) - cpu0[p] for p in helpers) / args.idle / len(sessions) * 100
    srv_cpu = (cpu_s(srv.proc.pid) - srv_cpu0) / args.idle * 100
    s = sessions[0]
    s.files.write("/tmp/download.py", DOWNLOAD.encode())
    rates = []
    for _ in range(3):
        got, secs = s.exec("python3", "/tmp/download.py", PUBLIC_A, str(64 << 20),
                           timeout=300).check().stdout.split()
        assert int(got) == 64 << 20, got
        rates.append(int(got) / float(secs) / (1 << 20))
    log(f"{mode}: helper {helper_pss:.1f} MiB/session, other {other_mib:.1f} MiB/session, "
        f"helper cpu {helper_cpu:.2f}%/session, server cpu {srv_cpu:.2f}%, "
        f"download {statistics.median(rates):.1f} MiB/s {rates}")
    for s in list(sessions):
        s.terminate()  # the next mode is measured without these
        alive.remove(s)
    srv.stop()
    return {"helper_mib": helper_pss, "other_mib": other_mib, "helper_cpu": helper_cpu,
            "server_cpu": srv_cpu, "mib_s": statistics.median(rates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--idle", type=float, default=20.0)
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        log(f"load before: {f.read().strip()}")
    with Cleanup() as cleanup:
        lab = NetLab().open()
        cleanup.push("remove the lab", lab.close)
        image = ensure_image()
        res = {mode: measure(mode, image, args, cleanup) for mode in ("passt", "tap")}
    t, p = res["tap"], res["passt"]

    def r(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    print(md_table(["per idle session", "passt", "tap", "tap/passt"], [
        ["helper process PSS (MiB)", f"{p['helper_mib']:.1f}", f"{t['helper_mib']:.1f}",
         r(t["helper_mib"], p["helper_mib"])],
        ["kernel slab growth per session (MiB)", f"{p['other_mib']:.1f}",
         f"{t['other_mib']:.1f}", r(t["other_mib"], p["other_mib"])],
        ["helper CPU (% of a core)", f"{p['helper_cpu']:.2f}", f"{t['helper_cpu']:.2f}",
         r(t["helper_cpu"], p["helper_cpu"])],
        ["server CPU while idle (%)", f"{p['server_cpu']:.2f}", f"{t['server_cpu']:.2f}",
         r(t["server_cpu"], p["server_cpu"])],
        ["download guest <- service (MiB/s, median of 3)", f"{p['mib_s']:.1f}",
         f"{t['mib_s']:.1f}", r(t["mib_s"], p["mib_s"])],
    ]))
    with open("/proc/loadavg") as f:
        log(f"load after: {f.read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

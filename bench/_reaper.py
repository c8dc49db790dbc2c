"""A child subreaper for daemons the benchmarks start (libvirtd, virtlogd and their QEMUs).

PID 1 on these machines reaps exited orphans slowly (~1.7 s), and libvirtd waits for a QEMU it
stops to be reaped: under PID 1 every ``virsh save`` and ``destroy`` would take 1.3-1.9 s more.
This process marks itself a subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), runs the commands given
as arguments (each one an argv joined by ``--``; they daemonize, so the daemons become orphans
and are adopted by this process), prints ``ready`` and then reaps every child as soon as it exits.
It exits when it has no children left (the daemons were stopped) or on SIGTERM.

Usage: python _reaper.py virtlogd -d -- libvirtd -d
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl failed: errno {ctypes.get_errno()}", flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    for cmd in filter(None, commands):
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}", flush=True)
            return 1
    print("ready", flush=True)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

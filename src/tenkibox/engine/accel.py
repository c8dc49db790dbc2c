"""Choosing the accelerator: KVM only where a guest really boots with it, TCG otherwise.

Some hosts expose a ``/dev/kvm`` that cannot run a standard guest (a nested "PVM" KVM: SeaBIOS
runs, then the kernel hangs silently; ``-cpu host`` aborts). Detection therefore never trusts
the device node alone and never blocks for long:

1. ``TENKI_ACCEL=kvm|tcg`` wins.
2. No ``/dev/kvm``, or not read-write -> tcg.
3. ``kvm_pvm`` loaded, or no vmx/svm flag in /proc/cpuinfo -> tcg (instant).
4. Otherwise a probe boot of the guest kernel under KVM with ``earlyprintk`` that must print
   "Linux version" within a few seconds; the answer is cached per host in the data directory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from ..config import ENV_ACCEL

log = logging.getLogger(__name__)

PROBE_SECONDS = 4.0


def _quick_verdict() -> tuple[str | None, str]:
    forced = os.environ.get(ENV_ACCEL, "auto").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced, f"forced by {ENV_ACCEL}"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not read-write"
    if os.path.exists("/sys/module/kvm_pvm"):
        return "tcg", "kvm_pvm (nested PVM KVM) cannot boot a standard guest"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " vmx" not in flags and " svm" not in flags:
        return "tcg", "no vmx/svm in /proc/cpuinfo"
    return None, "needs a probe boot"


def probe_kvm(kernel: Path, timeout: float = PROBE_SECONDS) -> bool:
    """Boot ``kernel`` under KVM just far enough to print its banner."""
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M", "-kernel", str(kernel),
        "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1", "-serial", "stdio", "-no-reboot",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline and proc.poll() is None:
            chunk = proc.stdout.read(4096) or b""
            seen += chunk
            if b"Linux version" in seen:
                return True
            time.sleep(0.05)
        return False
    finally:
        proc.kill()
        proc.wait()


def detect_accel(cache_file: Path | None = None, kernel: Path | None = None) -> tuple[str, str]:
    """Return ``(accel, reason)``; never hangs longer than the probe timeout."""
    verdict, reason = _quick_verdict()
    if verdict:
        return verdict, reason
    if cache_file and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
            return cached["accel"], cached["reason"] + " (cached)"
        except (OSError, ValueError, KeyError):
            pass
    if kernel is None or not kernel.exists():
        return "tcg", "no kernel to probe KVM with yet"
    ok = probe_kvm(kernel)
    result = ("kvm", "probe boot printed its banner") if ok else (
        "tcg", f"probe boot under KVM printed nothing in {PROBE_SECONDS:.0f}s")
    if cache_file:
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"accel": result[0], "reason": result[1]}))
        os.replace(tmp, cache_file)
    log.info("accelerator: %s (%s)", *result)
    return result

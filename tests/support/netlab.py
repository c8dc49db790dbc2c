"""A network lab for the guest-network tests: test services in a network namespace that the
test creates, reachable from the host like machines on a link of its own.

    host  tkt<pid>a 10.77.0.1/24, 203.0.113.1/24  <-veth->  namespace tkt-lab-<pid>:
          10.77.0.2 (a private address: HTTP, DNS), 203.0.113.2 and .3 (public-looking
          documentation addresses: HTTP; a line service on .2)

Nothing here reaches any address outside the machine. The lab is removed by ``close``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRIVATE, PUBLIC_A, PUBLIC_B = "10.77.0.2", "203.0.113.2", "203.0.113.3"
HOST_SIDE = "10.77.0.1"
SERVICES = Path(__file__).with_name("netlab_services.py")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def host_address() -> str:
    """The host's first global IPv4 address (what a guest must not reach)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith(("10.77.", "203.0.113.", "10.201.")):
            return addr
    raise RuntimeError("the host has no global IPv4 address")


class NetLab:
    def __init__(self) -> None:
        tag = os.getpid()
        self.netns = f"tkt-lab-{tag}"
        self.host_if, self.lab_if = f"tkt{tag}a"[:15], f"tkt{tag}b"[:15]
        self.dir = Path(tempfile.mkdtemp(prefix="netlab-"))
        self.line_log = self.dir / "lines.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dns(self) -> str:
        return f"{PRIVATE}:53"

    def open(self) -> NetLab:
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.lab_if,
                "netns", self.netns)
            _ip("addr", "add", f"{HOST_SIDE}/24", "dev", self.host_if)
            _ip("addr", "add", "203.0.113.1/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            for addr in (f"{PRIVATE}/24", f"{PUBLIC_A}/24", f"{PUBLIC_B}/24"):
                _ip("-n", self.netns, "addr", "add", addr, "dev", self.lab_if)
            _ip("-n", self.netns, "link", "set", self.lab_if, "up")
            _ip("-n", self.netns, "link", "set", "lo", "up")
            _ip("-n", self.netns, "route", "add", "default", "via", HOST_SIDE)
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, str(SERVICES),
                 str(self.line_log), PRIVATE, PUBLIC_A, PUBLIC_B],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert self.proc.stdout is not None
            first = self.proc.stdout.readline()
            if b"ready" not in first:
                raise RuntimeError(f"lab services did not start: {first!r}")
        except BaseException:
            self.close()
            raise
        return self

    def lines(self) -> list[tuple[int, str]]:
        if not self.line_log.exists():
            return []
        out = []
        for line in self.line_log.read_text().splitlines():
            number, _, text = line.partition(" ")
            out.append((int(number), text))
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.host_if], capture_output=True)
        for f in self.dir.iterdir():
            f.unlink()
        self.dir.rmdir()

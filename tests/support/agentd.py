"""``agentd``, the guest agent, for tests on the host: built once per run from
``src/tenkibox/guest/agentd`` with the image builder's own step (``images/agentd.py``), and run
on a unix socket (``--listen``) in its test mode (``--test-root``): identity files below a temp
root, and the clock, hostname and entropy it would set recorded in ``<root>/.calls`` instead of
changing the machine running the tests."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tenkibox.images import agentd


def build(directory: Path) -> Path:
    """The binary, compiled into ``directory`` (the run's: ``tests/conftest.py``)."""
    return agentd.build(directory / "agentd")


def version() -> str:
    """The version its ping answers (the source's constant)."""
    source = (agentd.SOURCE_DIR / "agent.go").read_text()
    found = re.search(r'^\s*version\s*=\s*"([0-9.]+)"', source, re.MULTILINE)
    assert found, "no version constant in agent.go"
    return found[1]


@dataclass
class Calls:
    """What a test-mode ``agentd`` did instead of changing the machine (``<root>/.calls``)."""

    root: Path

    def _of(self, kind: str) -> list[str]:
        path = self.root / ".calls"
        lines = path.read_text().splitlines() if path.exists() else []
        return [rest for k, _, rest in (ln.partition(" ") for ln in lines) if k == kind]

    @property
    def clock(self) -> list[int]:
        return [int(x) for x in self._of("clock")]

    @property
    def hostnames(self) -> list[str]:
        return self._of("hostname")

    @property
    def entropy(self) -> list[bytes]:
        return [base64.b64decode(x) for x in self._of("entropy")]

    @property
    def launchers(self) -> list[int]:
        """The uids of execs that went through the launcher (the direct start failed)."""
        return [int(x) for x in self._of("launcher")]

    @property
    def order(self) -> list[str]:
        """Every call's kind, in the order made (``poke`` for each poke of the warm-up)."""
        path = self.root / ".calls"
        lines = path.read_text().splitlines() if path.exists() else []
        return [ln.partition(" ")[0] for ln in lines]


def start(binary: Path, sock: Path, root: Path, *, warm_program: str | None = None,
          timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    """``agentd`` serving ``sock``, once it listens."""
    argv = [str(binary), "--listen", str(sock), "--test-root", str(root)]
    if warm_program:
        argv += ["--test-warmup", warm_program]
    with open(sock.parent / "agentd.log", "ab") as log:  # its stderr: what a console shows
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout_s
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"agentd exited with status {proc.returncode} before listening")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"agentd did not listen on {sock} within {timeout_s:g}s")
        time.sleep(0.01)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

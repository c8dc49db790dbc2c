"""The official Tenki SDKs, unmodified and pinned, against a live ``tenki serve`` with real VMs.

Each test runs one program of ``conformance/`` as a subprocess whose environment holds only
``TENKI_API_ENDPOINT`` (the server's ``grpc_endpoint``), ``TENKI_API_KEY`` (the admin key), ``PATH``
and ``HOME``, exactly as a user of the SDK would configure it, and asserts that it exits 0. The
programs print one line per step; a failing test shows that output and the server's log.
Nothing is skipped: a missing toolchain or a missing ``npm ci`` is a failure (``scripts/setup``
installs them). After each program the server must hold nothing it made: no live session, no
snapshot, no volume.

- ``conformance/ts/flows.mjs``: npm ``@tenkicloud/sandbox`` 0.5.4 (``package-lock.json``), the
  snapshots spec's TypeScript calls as written.
- ``conformance/python/flows.py``: PyPI ``tenki`` 1.4.1 (the ``dev`` extra).
- ``conformance/go/run.sh``: builds and runs ``conformance/go`` (the Go SDK of ``sdk/go``, the
  spec's Go calls); the Go toolchain's own settings (``GO*``, ``TMPDIR``) pass through too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration.conftest import TenkiServer
from support.helpers import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = REPO / "conformance"
PROGRAM_TIMEOUT = 1500  # s: a first create may build the golden snapshot under TCG


def grpc_endpoint(server: TenkiServer) -> str:
    """Where the server's gRPC wire listens (``TenkiServer.grpc_endpoint``, or its server.json)."""
    url = getattr(server, "grpc_endpoint", "") or json.loads(
        (server.home / "server.json").read_text()).get("grpc_endpoint") or ""
    assert url.startswith("http://"), f"the server announces no gRPC endpoint: {url!r}"
    return str(url)


def run_program(server: TenkiServer, argv: list[str], cwd: Path,
                toolchain: dict[str, str] | None = None) -> None:
    from support.server import ADMIN_KEY

    env = {**(toolchain or {}),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "HOME": os.environ.get("HOME", "/root"),
           "TENKI_API_ENDPOINT": grpc_endpoint(server),
           "TENKI_API_KEY": ADMIN_KEY}
    t = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=PROGRAM_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        pytest.fail(f"{argv} did not finish in {PROGRAM_TIMEOUT}s\n--- output ---\n{out}\n"
                    f"--- server log ---\n{server.log_tail()}")
    took = time.monotonic() - t
    print(done.stdout)  # shown with -rA
    assert done.returncode == 0, (
        f"{' '.join(argv)} exited {done.returncode} after {took:.0f}s\n"
        f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}\n"
        f"--- server log (tail) ---\n{server.log_tail()}")
    assert_nothing_left(server)


def assert_nothing_left(server: TenkiServer) -> None:
    """What the program made is gone: sessions final, no snapshot, no volume."""
    with server.client() as c:
        def live() -> list[str]:
            return [f"{s.id} {s.state.value}" for s in c.list()
                    if s.state.value not in ("TERMINATED", "FAILED")]

        eventually(lambda: not live(), timeout=60, interval=0.5,
                   what="every session the program made is terminated")

        # a delete answers DELETING and finishes in the background (a snapshot's spares are
        # stopped first): what the program deleted must reach DELETED, what it left stays
        def snaps() -> list[str]:
            return [f"{s.id} {s.state.value}" for s in c.list_snapshots()
                    if s.state.value != "DELETED"]

        def vols() -> list[str]:
            return [f"{v.id} {v.state.value}" for v in c.list_volumes()
                    if v.state.value != "DELETED"]

        kept = [x for x in snaps() + vols() if not x.endswith(" DELETING")]
        assert not kept, f"left behind: {kept}"
        eventually(lambda: not snaps() and not vols(), timeout=60, interval=0.5,
                   what="every snapshot and volume deleted reaches DELETED")


def test_typescript_sdk(official_server: TenkiServer) -> None:
    """npm @tenkicloud/sandbox 0.5.4: create, write, createSnapshotAndWait, createAndWait from
    the snapshot, read back, SnapshotNotFoundError, pause/resume, clean-up."""
    ts = CONFORMANCE / "ts"
    node = shutil.which("node")
    assert node, "node is not on PATH (Node 20: see scripts/setup)"
    pkg = ts / "node_modules" / "@tenkicloud" / "sandbox" / "package.json"
    assert pkg.is_file(), f"{pkg} is missing: run scripts/setup (npm ci in {ts})"
    run_program(official_server, [node, "flows.mjs"], ts)


def test_python_sdk(official_server: TenkiServer) -> None:
    """PyPI tenki 1.4.1: sessions, exec (stdout/stderr/exit code, stdin), files, volumes,
    snapshots (create/wait/get/list/delete, restore, not found, failed), pause/resume."""
    from importlib import metadata

    assert metadata.version("tenki") == "1.4.1", "the dev extra pins tenki==1.4.1"
    run_program(official_server, [sys.executable, str(CONFORMANCE / "python" / "flows.py")],
                REPO)


def test_go_sdk(official_server: TenkiServer) -> None:
    """The Go SDK (sdk/go) through conformance/go/run.sh: the spec's Go calls."""
    run_sh = CONFORMANCE / "go" / "run.sh"
    assert run_sh.is_file(), f"{run_sh} is missing"
    assert shutil.which("go"), "go is not on PATH (Go: see scripts/setup)"
    toolchain = {k: v for k, v in os.environ.items()
                 if k.startswith("GO") or k in ("TMPDIR", "CGO_ENABLED")}
    run_program(official_server, ["sh", str(run_sh)], REPO, toolchain)


def test_go_sdk_unit_tests() -> None:
    """``go test ./...`` of sdk/go: the client's own logic (error table, paging, waits,
    credentials, exec framing) against an in-process fake built on the same descriptors."""
    assert shutil.which("go"), "go is not on PATH (Go: see scripts/setup)"
    done = subprocess.run(["go", "test", "-count=1", "./..."], cwd=REPO / "sdk" / "go",
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"go test failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"

"""Integration fixtures: real servers, real VMs (TCG), and a leak check at the end.

- The guest image is built once per machine into ``$TENKI_TEST_IMAGE_HOME`` (default: the user's
  normal data directory, which the README's set-up fills) and hard-linked into each test home.
- Every tenki server under test runs as its own process with its own ``TENKI_HOME`` and a
  ``TENKI_RUN_ROOT`` below one per-run directory, so leaks can be found by path.
- At the end of the run no QEMU process, socket, RAM file or temp directory may be left; the
  run fails if one is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.server import ADMIN_KEY, AUTH, write_admin_key

from tenkibox.config import Layout, layout

RUN_TAG = f"tenki-it-{os.getpid()}"
RUN_ROOT = Path("/dev/shm") / RUN_TAG
TMP_ROOT = Path(tempfile.gettempdir()) / RUN_TAG
IMAGE_HOME = Path(os.environ.get("TENKI_TEST_IMAGE_HOME")
                  or Path.home() / ".local" / "share" / "tenki")
REPO = Path(__file__).resolve().parents[2]
TENKI = [sys.executable, "-m", "tenkibox"]


@pytest.fixture(scope="session")
def image_layout():
    """The machine's built image (built here on first use; ~1 minute)."""
    from tenkibox.images.builder import ensure_image

    lay = layout(IMAGE_HOME).ensure()
    ensure_image(lay, "sandbox")
    return lay


def _networks() -> set[str]:
    """Guest network namespaces and nftables tables (named by owner and session) here."""
    spaces = {p.name.removeprefix("tenki-") for p in Path("/run/netns").glob("tenki-*")}
    out = subprocess.run(["nft", "list", "tables", "ip"], capture_output=True, text=True).stdout
    tables = {line.split()[-1].removeprefix("tenki_") for line in out.splitlines()
              if line.strip().startswith("table ip tenki_")}
    return spaces | tables


def _qemu_leaks() -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if RUN_TAG in line and ("qemu-system" in line or "passt" in line)]


@pytest.fixture(scope="session")
def run_root() -> Path:
    """The tmpfs directory of this run's VMs: whatever is left in it fails the leak check."""
    return RUN_ROOT


@pytest.fixture(scope="session", autouse=True)
def leak_check() -> Iterator[None]:
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    TMP_ROOT.mkdir(parents=True, exist_ok=True)
    networks_before = _networks()
    yield
    deadline = time.monotonic() + 10
    while _qemu_leaks() and time.monotonic() < deadline:
        time.sleep(0.2)
    leaks = _qemu_leaks()
    for line in leaks:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    left = [str(p) for p in RUN_ROOT.rglob("*")] if RUN_ROOT.exists() else []
    shutil.rmtree(RUN_ROOT, ignore_errors=True)
    tmp_left = [str(p) for p in TMP_ROOT.iterdir()] if TMP_ROOT.exists() else []
    shutil.rmtree(TMP_ROOT, ignore_errors=True)
    net_left = sorted(_networks() - networks_before)
    assert not leaks, f"QEMU processes leaked: {leaks}"
    assert not net_left, f"guest networks leaked (namespaces or tables): {net_left}"
    assert not left, f"run files leaked: {left[:10]}"
    assert not tmp_left, f"temp directories leaked: {tmp_left[:10]}"


class TenkiServer:
    """A ``tenki serve`` process for one data directory; restartable, killable."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.run_root = RUN_ROOT / home.name
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        #: Tenki's gRPC wire (what the official SDKs take as TENKI_API_ENDPOINT)
        self.grpc_endpoint = ""
        #: more environment for the server (a test module's ``SERVER_ENV``)
        self.extra_env: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TENKI_HOME=str(self.home), TENKI_RUN_ROOT=str(self.run_root),
                   TENKI_LOG_LEVEL="INFO")
        env.pop("TENKI_API_ENDPOINT", None)
        env["TENKI_API_KEY"] = ADMIN_KEY  # the CLI's key (the server reads admin.key)
        env["TENKI_GOLDEN"] = "on"  # the product's default: plain creates restore golden ones
        env["TENKI_SPARES"] = "on"  # the product's default: restores prepared ahead
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> None:
        server_file = self.home / "server.json"
        server_file.unlink(missing_ok=True)
        if not (self.home / "admin.key").exists():
            write_admin_key(Layout(self.home), ADMIN_KEY)
        log = open(self.home / "server.log", "ab")
        # a restarted server keeps its port, so clients made earlier still reach it
        port = self.url.rsplit(":", 1)[1] if self.url else "0"
        grpc_port = self.grpc_endpoint.rsplit(":", 1)[1] if self.grpc_endpoint else "0"
        self.proc = subprocess.Popen([*TENKI, "serve", "--port", port, "--grpc-port", grpc_port],
                                     env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            if server_file.exists():
                info = json.loads(server_file.read_text())
                self.url, self.grpc_endpoint = info["url"], info.get("grpc_endpoint") or ""
                return
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.home / "server.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):  # type: ignore[no-untyped-def]
        from tenkibox import Client

        return Client(endpoint=self.url, timeout=60.0)

    def cli(self, *args: str, input: bytes | None = None,
            timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
        env = self.env
        env["TENKI_API_ENDPOINT"] = self.url
        return subprocess.run([*TENKI, *args], env=env, input=input, capture_output=True,
                              timeout=timeout)

    def artifacts(self, snapshot_id: str) -> dict[str, Path]:
        """kind -> stored file of a snapshot (white box: the manifest in the database names
        artifacts by digest; the local store keeps them as artifacts/sha256/<digest>)."""
        import sqlite3

        with sqlite3.connect(self.home / "tenki.db") as db:
            row = db.execute("SELECT files FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        m = json.loads(row[0])
        store = self.home / "artifacts" / "sha256"
        out = {"ram": store / m["ram"], "state": store / m["state"],
               "kernel": store / m["shape"]["kernel"], "initrd": store / m["shape"]["initrd"]}
        for i, layer in enumerate(m["layers"]):
            out["base" if i == 0 else f"layer{i}"] = store / layer
        return out

    def cleanup(self) -> None:
        """Terminate every session of this home, stop the server, remove its files."""
        if self.proc and self.proc.poll() is None:
            try:
                for s in httpx.get(f"{self.url}/v1/sessions", headers=AUTH,
                                   timeout=10).json():
                    if s["state"] not in ("TERMINATED", "FAILED"):
                        httpx.delete(f"{self.url}/v1/sessions/{s['id']}", headers=AUTH,
                                     timeout=30)
            except httpx.HTTPError:
                pass
        self.stop()
        # a killed server may have left VMs: they are found by their run directory
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if str(self.run_root) in line:
                try:
                    os.kill(int(line.split()[0]), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(self.run_root, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)


def new_home(image_layout, name: str) -> Path:  # type: ignore[no-untyped-def]
    home = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=TMP_ROOT))
    src = image_layout.images
    shutil.copytree(src, home / "images", copy_function=os.link,
                    ignore=shutil.ignore_patterns("*.lock", ".*"))
    return home


@pytest.fixture(scope="module")
def tenki_server(image_layout, request) -> Iterator[TenkiServer]:  # type: ignore[no-untyped-def]
    """One server per test module (module-scoped: VMs are expensive under TCG)."""
    server = TenkiServer(new_home(image_layout, request.module.__name__.rsplit(".", 1)[-1]))
    server.extra_env = dict(getattr(request.module, "SERVER_ENV", {}))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fresh_home(image_layout, request):  # type: ignore[no-untyped-def]
    """(home, run root) of a data directory with the built image and nothing else (no key):
    what a user who configured nothing has. Removing it is the test's job (both are below the
    run's roots, which the leak check inspects)."""
    home = new_home(image_layout, "fresh")
    return home, RUN_ROOT / home.name


@pytest.fixture(scope="module")
def client(tenki_server):  # type: ignore[no-untyped-def]
    c = tenki_server.client()
    try:
        yield c
    finally:
        c.close()

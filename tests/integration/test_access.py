"""Access on a real machine (issue 10): zero-config local use, no open door, TLS, isolation of a
real snapshot between two workspaces.

- A fresh ``TENKI_HOME`` with no key anywhere: ``tenki sandbox create`` starts the server, which
  writes ``admin.key`` (0600), and the CLI uses it by itself; a real VM boots and runs a command.
- Another local user (uid 65534, ``setpriv``) cannot read the key, and its call gets 401.
- ``tenki serve --host 0.0.0.0`` answers 401 without a key and says in its log which
  workspaces' keys can use it; with ``--tls-cert/--tls-key`` it serves HTTPS.
- Workspace B's key gets "not found" for workspace A's real snapshot on get, restore and delete,
  and A's snapshot still restores afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tenkibox import Client, errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TENKI = [sys.executable, "-m", "tenkibox"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


class Home:
    """A fresh data directory (the built image linked in, nothing else: no key) and the
    environment of a user who has configured nothing."""

    def __init__(self, home: Path, run_root: Path) -> None:
        self.home = home
        self.run_root = run_root
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("TENKI_API_KEY", "TENKI_API_ENDPOINT")}
        env.update(TENKI_HOME=str(self.home), TENKI_RUN_ROOT=str(self.run_root))
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TENKI, *args], env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)

    def serve(self, *args: str) -> str:
        """``tenki serve ARGS`` in the background; its local URL once it listens."""
        log = open(self.home / "server.log", "ab")
        proc = subprocess.Popen([*TENKI, "serve", "--port", "0", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log()
            if (self.home / "server.json").exists():
                return str(json.loads((self.home / "server.json").read_text())["url"])
            time.sleep(0.05)
        raise AssertionError(f"the server did not start: {self.log()}")

    def key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    def log(self) -> str:
        try:
            return (self.home / "server.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        if (self.home / "server.json").exists() and (self.home / "admin.key").exists():
            url = json.loads((self.home / "server.json").read_text())["url"]
            try:
                with _admin(url, self.key()) as c:
                    for s in c.list():
                        if s.state.value not in ("TERMINATED", "FAILED"):
                            c.terminate(s.id)
            except (errors.TenkiError, httpx.HTTPError):
                pass
        self.cli("server", "stop", timeout=60)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.run_root, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)


def _admin(url: str, key: str) -> Client:
    return Client(endpoint=url, api_key=key, timeout=60, autostart=False)


@pytest.fixture
def fresh(fresh_home: tuple[Path, Path]) -> Iterator[Home]:
    h = Home(*fresh_home)
    try:
        yield h
    finally:
        h.close()


def _as_nobody(h: Home, *cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], env=env, capture_output=True, text=True, timeout=60)


def test_the_local_cli_needs_no_set_up_and_another_user_gets_401(fresh: Home) -> None:
    made = fresh.cli("sandbox", "create", "--name", "zero", "--memory-mb", "512", "--json")
    assert made.returncode == 0, (made.stderr, fresh.log())
    sid = json.loads(made.stdout)["id"]
    key_file = fresh.home / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = fresh.key()
    assert key.startswith("tk_") and len(key) == 46
    ran = fresh.cli("sandbox", "exec", "--session", sid, "echo", "hello from the guest")
    assert ran.returncode == 0 and ran.stdout == "hello from the guest\n", ran.stderr

    # another local user: the key is not theirs to read, and without it the server refuses
    url = json.loads((fresh.home / "server.json").read_text())["url"]
    other_home = Path(tempfile.mkdtemp(prefix="nobody-"))
    try:
        os.chown(other_home, 65534, 65534)
        peek = _as_nobody(fresh, "cat", str(key_file), env=fresh.env)
        assert peek.returncode != 0 and "Permission denied" in peek.stderr
        env = {**fresh.env, "TENKI_HOME": str(other_home), "TENKI_API_ENDPOINT": url}
        call = _as_nobody(fresh, *TENKI, "sandbox", "list", env=env)
        assert call.returncode != 0, call.stdout
        lines = call.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no API key"), call.stderr
        assert "Authorization: Bearer tk_" in lines[0]
        # nor by guessing: a made-up key is refused the same way
        env["TENKI_API_KEY"] = "tk_" + "A" * 43
        call = _as_nobody(fresh, *TENKI, "sandbox", "list", env=env)
        assert call.returncode != 0 and "unknown API key" in call.stderr, call.stderr
    finally:
        shutil.rmtree(other_home, ignore_errors=True)
    assert fresh.cli("sandbox", "terminate", "--session", sid).returncode == 0


def test_listening_on_every_address_still_needs_a_key(fresh: Home) -> None:
    url = fresh.serve("--host", "0.0.0.0")
    assert httpx.get(f"{url}/v1/sessions", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/nope", timeout=10).status_code == 401  # not even a 404
    r = httpx.post(f"{url}/v1/sessions", json={}, timeout=10)
    assert r.status_code == 401 and "Authorization: Bearer tk_" in r.json()["error"]["message"]
    headers = {"Authorization": f"Bearer {fresh.key()}"}
    assert httpx.get(f"{url}/v1/sessions", headers=headers, timeout=10).json() == []
    log = fresh.log()
    assert "keys of these workspaces can use it: default (ws_" in log, log
    assert "reachable from other machines without TLS" in log, log


def test_tls(fresh: Home, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                    str(key), "-out", str(cert)], check=True, capture_output=True)
    url = fresh.serve("--tls-cert", str(cert), "--tls-key", str(key))
    assert url.startswith("https://127.0.0.1:")
    with pytest.raises(httpx.ConnectError):  # not a certificate anyone vouches for
        httpx.get(f"{url}/v1/sessions", timeout=10)
    trusted = ssl.create_default_context(cafile=str(cert))
    assert httpx.get(f"{url}/v1/sessions", verify=trusted, timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {fresh.key()}"}
    assert httpx.get(f"{url}/v1/sessions", verify=trusted, headers=headers,
                     timeout=10).json() == []
    # the CLI, as the README shows it: the endpoint, the key and the CA file
    env = {**fresh.env, "TENKI_API_ENDPOINT": url, "TENKI_API_KEY": fresh.key(),
           "SSL_CERT_FILE": str(cert)}
    listed = fresh.cli("sandbox", "list", "--json", env=env)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    # the wire's endpoint is TLS too: the official SDK (gRPC, ALPN h2) and our CLI (HTTP/1.1)
    grpc_endpoint = json.loads((fresh.home / "server.json").read_text())["grpc_endpoint"]
    assert grpc_endpoint.startswith("https://127.0.0.1:")
    env.update(TENKI_API_ENDPOINT=grpc_endpoint, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(cert))
    listed = fresh.cli("sandbox", "list", "--json", env=env)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    who = subprocess.run([sys.executable, "-c", "import tenki; print(tenki.Client().who_am_i()"
                          ".workspaces[0].name)"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert (who.returncode, who.stdout) == (0, "default\n"), who.stderr


def test_another_workspace_cannot_see_a_real_snapshot(fresh: Home) -> None:
    url = fresh.serve()
    admin = _admin(url, fresh.key())
    try:
        team_b = admin.workspaces.create("team-b")
        key_b = admin.api_keys.create(team_b.id, name="b").key
        box = admin.create_and_wait(name="a-box", memory_mb=512, timeout=180)
        box.files.write("/root/marker", "workspace A")
        snap = box.snapshot("a-snap")
        assert snap.workspace_id == box.record.workspace_id != team_b.id
        with _admin(url, key_b) as b:
            for call in (lambda: b.get_snapshot(snap.id),
                         lambda: b.create(snapshot_id=snap.id),
                         lambda: b.delete_snapshot(snap.id)):
                with pytest.raises(errors.SnapshotNotFoundError) as info:
                    call()
                assert str(info.value) == f"snapshot {snap.id} not found"
            assert b.list_snapshots() == [] and b.list() == []
            with pytest.raises(errors.SessionNotFoundError):
                b.get(box.id)
        assert admin.get_snapshot(snap.id).state.value == "READY"
        clone = admin.create_and_wait(snapshot_id=snap.id, timeout=180)
        assert clone.files.read_text("/root/marker") == "workspace A"
    finally:
        admin.close()

"""Finding the server: explicit endpoint, else ``TENKI_API_ENDPOINT``, else the local server.

The local server announces itself in ``$TENKI_HOME/server.json`` once it listens. When nothing
answers there, a client starts one, detached (its own session, output appended to
``server.log``), under a file lock so that clients starting at once start a single server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .. import config, errors, models

#: Seconds to wait for a freshly started local server to answer.
START_TIMEOUT = 30.0
#: Seconds one health probe may take.
PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class LocalServer:
    """What ``server.json`` says, with the health answer when the server answered."""

    url: str
    pid: int | None
    version: str | None
    started_at: str | None
    info: models.ServerInfo | None = None

    @property
    def running(self) -> bool:
        return self.info is not None


def normalize_endpoint(url: str) -> str:
    """``host:port`` or ``http://host:port[/v1]`` -> ``http://host:port``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[:-3]
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise errors.ValidationError(f"not a URL: {url!r} ({exc})", field="endpoint") from None
    port_ok = parsed.port is None or 0 < parsed.port < 65536
    if parsed.scheme not in ("http", "https") or not parsed.host or not port_ok:
        raise errors.ValidationError(f"expected http(s)://host:port, got {url!r}", field="endpoint")
    return url


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(config.ENV_API_KEY) or None)


def configured_endpoint(endpoint: str | None) -> str | None:
    """The endpoint given or configured, None when the local server is to be used."""
    raw = endpoint or os.environ.get(config.ENV_ENDPOINT)
    return normalize_endpoint(raw) if raw else None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe(
    url: str, api_key: str | None, timeout: float = PROBE_TIMEOUT
) -> models.ServerInfo | None:
    """The server's ``ServerInfo`` when a tenki server answers at ``url``, else None."""
    try:
        resp = httpx.get(f"{url}/v1/health", headers=auth_headers(api_key), timeout=timeout)
        if resp.status_code != 200:
            return None
        return models.ServerInfo.model_validate(resp.json())
    except (httpx.HTTPError, ValueError):
        return None


def read_server_file(layout: config.Layout) -> dict[str, Any] | None:
    try:
        data = json.loads(layout.server_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("url"), str) else None


def local_server(
    layout: config.Layout | None = None, api_key: str | None = None
) -> LocalServer | None:
    """The local server of ``$TENKI_HOME`` as ``server.json`` describes it (None: no file).

    ``.running`` tells whether it answered its health check.
    """
    layout = layout or config.layout()
    data = read_server_file(layout)
    if data is None:
        return None
    try:
        url = normalize_endpoint(data["url"])
    except errors.ValidationError:
        return None
    pid = data.get("pid")
    return LocalServer(
        url=url,
        pid=pid if isinstance(pid, int) else None,
        version=data.get("version"),
        started_at=data.get("started_at"),
        info=probe(url, resolve_api_key(api_key)),
    )


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise errors.ConnectionError(
                        f"timed out waiting for the lock {path} "
                        "(another client starting the server?)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _spawn(layout: config.Layout) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env[config.ENV_HOME] = str(layout.home)
    argv = [sys.executable, "-m", "tenkibox", "serve", "--host", "127.0.0.1", "--port", "0"]
    with open(layout.server_log, "ab") as log:
        return subprocess.Popen(
            argv,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            close_fds=True,
        )


def ensure_local_server(
    layout: config.Layout | None = None,
    api_key: str | None = None,
    *,
    timeout: float = START_TIMEOUT,
) -> str:
    """The URL of the local server, starting one (detached) when none answers."""
    layout = layout or config.layout()
    key = resolve_api_key(api_key)
    found = local_server(layout, key)
    if found is not None and found.running:
        return found.url
    try:
        layout.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.ConnectionError(f"cannot create TENKI_HOME {layout.home}: {exc}") from exc
    with _file_lock(layout.home / "server-start.lock", timeout + 10):
        found = local_server(layout, key)
        if found is not None and found.running:
            return found.url
        proc = _spawn(layout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = local_server(layout, key)
            if found is not None and found.running:
                return found.url
            code = proc.poll()
            if code is not None:
                time.sleep(0.2)  # another server may have won the race for the data directory
                found = local_server(layout, key)
                if found is not None and found.running:
                    return found.url
                raise errors.ConnectionError(
                    f"the local tenki server exited with code {code} before it answered; "
                    f"see {layout.server_log}"
                )
            time.sleep(0.1)
        raise errors.ConnectionError(
            f"the local tenki server (pid {proc.pid}) did not answer within "
            f"{timeout:g}s; see {layout.server_log}"
        )


def resolve_endpoint(endpoint: str | None, api_key: str | None, autostart: bool) -> str:
    """Explicit endpoint, else ``TENKI_API_ENDPOINT``, else the local server (maybe started)."""
    url = configured_endpoint(endpoint)
    if url:
        return url
    if autostart:
        return ensure_local_server(api_key=api_key)
    found = local_server(api_key=api_key)
    if found is None:
        raise errors.ConnectionError(
            f"no local tenki server ({config.layout().server_file} does not exist); "
            "start one with 'tenki serve'"
        )
    return found.url


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False

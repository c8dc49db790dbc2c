"""Finding the server: explicit endpoint, else ``TENKI_API_ENDPOINT``, else the local server.

The local server announces itself in ``$TENKI_HOME/server.json`` once it listens. When nothing
answers there, a client starts one, detached (its own session, output appended to
``server.log``), under a file lock so that clients starting at once start a single server.

The API key: the one given (``api_key=``, ``--api-key``), else ``$TENKI_API_KEY``, else, only
for the local server (no endpoint given or configured), the admin key the server wrote to
``$TENKI_HOME/admin.key`` on its first start. That file is never sent anywhere else.
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
#: Seconds a freshly started server may refuse the key file's key (written as it starts).
REFUSAL_GRACE = 2.0


@dataclass(frozen=True)
class LocalServer:
    """What ``server.json`` says, with the health answer when the server answered.

    ``refused``: the server answered but refused the key (the HTTP status, 401 or 403, and the
    server's message); ``running`` is False then.
    """

    url: str
    pid: int | None
    version: str | None
    started_at: str | None
    info: models.ServerInfo | None = None
    refused: tuple[int, str] | None = None

    @property
    def running(self) -> bool:
        return self.info is not None


@dataclass(frozen=True)
class LocalKey:
    """The key a client uses with the local server, and where it comes from.

    ``source``: ``"argument"`` (given explicitly), ``"environment"`` (``$TENKI_API_KEY``),
    ``"file"`` (the home's ``admin.key``) or ``"none"``; ``problem``: why the file gave no key
    (``"does not exist"``, ``"unreadable: permission denied"``, ...).
    """

    key: str | None
    source: str
    file: Path
    problem: str | None = None

    def describe(self) -> str:
        """Where the key is read from, and what was found: for an error message."""
        chain = f"the key is read from --api-key, ${config.ENV_API_KEY} or {self.file}"
        if self.source == "argument":
            used = "used: the one given with --api-key / api_key="
        elif self.source == "environment":
            used = f"used: ${config.ENV_API_KEY}"
        elif self.source == "file":
            used = f"used: {self.file}"
        else:
            used = f"none set; {self.file} {self.problem or 'gave no key'}"
        return f"{chain} ({used})"


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
    """The key given, else ``$TENKI_API_KEY`` (for any server; see :func:`local_key`)."""
    return api_key if api_key is not None else (os.environ.get(config.ENV_API_KEY) or None)


def read_admin_key(layout: config.Layout) -> tuple[str | None, str | None]:
    """``(key, None)`` from the home's ``admin.key`` (stripped), else ``(None, why not)``.

    A file that cannot be read (another user's, mode 0600) just gives no key.
    """
    path = layout.admin_key_file
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None, "does not exist"
    except PermissionError:
        return None, "unreadable: permission denied"
    except IsADirectoryError:
        return None, "unreadable: is a directory"
    except UnicodeDecodeError:
        return None, "unreadable: not UTF-8 text"
    except OSError as exc:
        return None, f"unreadable: {(exc.strerror or str(exc)).lower()}"
    if not text:
        return None, "is empty"
    return text, None


def local_key(api_key: str | None = None, layout: config.Layout | None = None) -> LocalKey:
    """The key for the local server of ``layout``: the one given, else ``$TENKI_API_KEY``,
    else the home's ``admin.key``. Only for the local server: never for a configured endpoint.
    """
    layout = layout or config.layout()
    env = os.environ.get(config.ENV_API_KEY) or None
    if api_key is not None:
        # the CLI passes $TENKI_API_KEY as --api-key (click's envvar): name the variable then
        source = "environment" if api_key == env else "argument"
        return LocalKey(api_key, source, layout.admin_key_file)
    if env is not None:
        return LocalKey(env, "environment", layout.admin_key_file)
    key, problem = read_admin_key(layout)
    return LocalKey(key, "file" if key else "none", layout.admin_key_file, problem)


def configured_endpoint(endpoint: str | None) -> str | None:
    """The endpoint given or configured, None when the local server is to be used."""
    raw = endpoint or os.environ.get(config.ENV_ENDPOINT)
    return normalize_endpoint(raw) if raw else None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe(
    url: str, api_key: str | None, timeout: float = PROBE_TIMEOUT
) -> models.ServerInfo | None:
    """The server's ``ServerInfo`` when a tenki server answers at ``url`` and accepts the key,
    else None (see :func:`refusal` to tell a refused key from no server)."""
    try:
        resp = httpx.get(f"{url}/v1/health", headers=auth_headers(api_key), timeout=timeout)
        if resp.status_code != 200:
            return None
        return models.ServerInfo.model_validate(resp.json())
    except (httpx.HTTPError, ValueError):
        return None


def refusal(
    url: str, api_key: str | None, timeout: float = PROBE_TIMEOUT
) -> tuple[int, str] | None:
    """``(status, message)`` when a tenki server at ``url`` refuses the key (401 or 403 with
    tenki's error body), None when it accepts it or nothing (tenki) answers there."""
    try:
        resp = httpx.get(f"{url}/v1/health", headers=auth_headers(api_key), timeout=timeout)
        if resp.status_code not in (401, 403):
            return None
        body = resp.json()
    except (httpx.HTTPError, ValueError):
        return None
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        return None  # not tenki's error envelope: something else listens on that port
    message = " ".join(str(err.get("message") or err["code"]).split())[:200]
    return resp.status_code, message


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
    key = local_key(api_key, layout).key
    info = probe(url, key)
    return LocalServer(
        url=url,
        pid=pid if isinstance(pid, int) else None,
        version=data.get("version"),
        started_at=data.get("started_at"),
        info=info,
        refused=refusal(url, key) if info is None else None,
    )


def refused_error(
    found: LocalServer, layout: config.Layout | None = None, api_key: str | None = None
) -> errors.AuthenticationError:
    """The error of a local server that answers but refuses the key: one line saying where
    the key comes from (rather than starting a second server)."""
    status, message = found.refused or (401, "unauthorized")
    where = local_key(api_key, layout).describe()
    return errors.AuthenticationError(
        f"the local tenki server at {found.url} refused the key (HTTP {status}: {message}); "
        f"{where}"
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
    """The URL of the local server, starting one (detached) when none answers.

    A server that answers but refuses the key (see :func:`local_key`) is an
    AuthenticationError saying so: no second server is started next to it.
    """
    layout = layout or config.layout()
    found = local_server(layout, api_key)
    if found is not None and found.running:
        return found.url
    if found is not None and found.refused:
        raise refused_error(found, layout, api_key)
    try:
        layout.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.ConnectionError(f"cannot create TENKI_HOME {layout.home}: {exc}") from exc
    with _file_lock(layout.home / "server-start.lock", timeout + 10):
        found = local_server(layout, api_key)
        if found is not None and found.running:
            return found.url
        if found is not None and found.refused:
            raise refused_error(found, layout, api_key)
        proc = _spawn(layout)
        deadline = time.monotonic() + timeout
        refused_since: float | None = None
        while time.monotonic() < deadline:
            # the key file appears with the server's first start: local_server reads it anew
            found = local_server(layout, api_key)
            if found is not None and found.running:
                return found.url
            if found is not None and found.refused:
                # a key given or in the environment is refused for good; the file's may be
                # read a moment before the new server has written it
                now = time.monotonic()
                refused_since = refused_since if refused_since is not None else now
                given = local_key(api_key, layout).source in ("argument", "environment")
                if given or now - refused_since > REFUSAL_GRACE:
                    raise refused_error(found, layout, api_key)
            code = proc.poll()
            if code is not None:
                time.sleep(0.2)  # another server may have won the race for the data directory
                found = local_server(layout, api_key)
                if found is not None and found.running:
                    return found.url
                if found is not None and found.refused:
                    raise refused_error(found, layout, api_key)
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
    return resolve(endpoint, api_key, autostart)[0]


def resolve(
    endpoint: str | None, api_key: str | None, autostart: bool
) -> tuple[str, str | None]:
    """The server URL and the key to send it.

    An endpoint given or in ``TENKI_API_ENDPOINT`` gets ``api_key`` or ``$TENKI_API_KEY`` (never
    the local key file); else the local server of ``$TENKI_HOME`` (started when ``autostart``
    and none answers) gets :func:`local_key` (the file read after the start, where it appears).
    """
    url = configured_endpoint(endpoint)
    if url:
        return url, resolve_api_key(api_key)
    layout = config.layout()
    if autostart:
        url = ensure_local_server(layout, api_key)
        return url, local_key(api_key, layout).key
    found = local_server(layout, api_key)
    if found is None:
        raise errors.ConnectionError(
            f"no local tenki server ({layout.server_file} does not exist); "
            "start one with 'tenki serve'"
        )
    if found.refused:
        raise refused_error(found, layout, api_key)
    return found.url, local_key(api_key, layout).key


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

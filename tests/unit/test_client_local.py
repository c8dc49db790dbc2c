"""Finding the server: endpoint configuration and the local server's discovery and start."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tenkibox import Client, errors, models
from tenkibox.client import _local
from tenkibox.config import layout


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TENKI_HOME", str(tmp_path))
    monkeypatch.delenv("TENKI_API_ENDPOINT", raising=False)
    monkeypatch.delenv("TENKI_API_KEY", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "raw, url",
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://h:1/", "http://h:1"),
        ("https://h/v1", "https://h"),
    ],
)
def test_normalize_endpoint(raw: str, url: str) -> None:
    assert _local.normalize_endpoint(raw) == url


@pytest.mark.parametrize("raw", ["ftp://h", "http://:80", "http://h:99999"])
def test_bad_endpoint_is_a_validation_error(raw: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        Client(endpoint=raw)
    assert info.value.field == "endpoint"


def test_argument_beats_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_API_ENDPOINT", "http://env:1")
    monkeypatch.setenv("TENKI_API_KEY", "envkey")
    assert Client().endpoint == "http://env:1"
    c = Client(endpoint="http://arg:2", api_key="argkey")
    assert (c.endpoint, c._api_key) == ("http://arg:2", "argkey")
    assert Client()._api_key == "envkey"


def test_no_local_server_without_autostart(home: Path) -> None:
    with pytest.raises(errors.ConnectionError, match="tenki serve"):
        Client(autostart=False).health()
    assert not (home / "server.json").exists()


def test_dead_local_server_is_a_connection_error(home: Path) -> None:
    (home / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": 1}))
    found = _local.local_server()
    assert found is not None and not found.running
    with pytest.raises(errors.ConnectionError):
        Client(autostart=False, timeout=2).health()


def _info() -> models.ServerInfo:
    return models.ServerInfo(version="x", pid=4242, home="/h", accelerator="tcg")


class _Proc:
    pid = 4242

    def poll(self) -> int | None:
        return None


def test_clients_starting_at_once_start_one_server(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[Path] = []
    live: set[str] = set()

    def spawn(lay: Any) -> _Proc:
        spawned.append(lay.home)
        url = "http://127.0.0.1:5555"
        (lay.home / "server.json").write_text(json.dumps({"url": url, "pid": 4242}))
        live.add(url)
        return _Proc()

    monkeypatch.setattr(_local, "_spawn", spawn)
    monkeypatch.setattr(
        _local, "probe", lambda url, key, timeout=2.0: _info() if url in live else None
    )
    urls: list[str] = []
    threads = [
        threading.Thread(target=lambda: urls.append(_local.ensure_local_server())) for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spawned == [home]
    assert urls == ["http://127.0.0.1:5555"] * 5


def test_server_that_dies_at_start_is_reported(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Dead(_Proc):
        def poll(self) -> int | None:
            return 3

    monkeypatch.setattr(_local, "_spawn", lambda lay: Dead())
    with pytest.raises(errors.ConnectionError, match=r"exited with code 3.*server\.log"):
        _local.ensure_local_server(layout(home))


def test_process_gone() -> None:
    import os

    assert not _local.process_gone(os.getpid())
    assert _local.process_gone(2**22 + 12345)

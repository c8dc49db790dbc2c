"""Bounded memory per request: the server's RSS (VmRSS of the server process) while a client
reads /dev/zero, uploads 512 MiB, or takes 500 MB of exec output.

Each test restarts the server first (a fresh heap: memory freed by an earlier test would hide
growth), warms it up, and samples its RSS every 50 ms. A guard stops the transfer when the growth
passes ``ABORT_KIB`` (a server that buffers everything would otherwise eat the shared machine), in
which case the server is killed and restarted after the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import faultlib as fl
import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MiB = 1 << 20
LIMIT_KIB = 64 * 1024  # allowed RSS growth during a transfer
ABORT_KIB = 384 * 1024  # the guard: stop the transfer, the test has failed anyway
AFTER_KIB = 8 * 1024  # allowed growth in the 3 s after the client went away


class RssWatch:
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.base = fl.rss_kib(pid)
        self.peak = self.base
        self.samples: list[tuple[float, int]] = []
        self.tripped = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kib = fl.rss_kib(self.pid)
            except (OSError, AssertionError):
                return
            self.samples.append((time.monotonic(), kib))
            self.peak = max(self.peak, kib)
            if kib - self.base > ABORT_KIB:
                self.tripped.set()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024

    def after(self, seconds: float = 3.0) -> tuple[int, int]:
        """RSS shortly after the transfer ended and ``seconds`` later."""
        time.sleep(0.5)
        first = fl.rss_kib(self.pid)
        time.sleep(seconds)
        last = fl.rss_kib(self.pid)
        self.peak = max(self.peak, first, last)
        return first, last


@pytest.fixture(scope="module")
def box(server: fl.FaultServer, client: Any) -> str:
    s = client.create_and_wait(name="memory-box", memory_mb=1024, cpu=1, timeout=300)
    s.files.write(fl.MARKER_PATH, fl.MARKER)
    return str(s.id)


@pytest.fixture
def fresh(server: fl.FaultServer, box: str) -> Iterator[fl.FaultServer]:
    """The server restarted (a fresh heap) and warmed up; killed and restarted afterwards when
    a guard stopped a transfer (it may still be buffering)."""
    server.restart()
    with server.http() as api:
        for _ in range(3):
            assert api.get(f"/v1/sessions/{box}/files", params={"path": fl.MARKER_PATH}
                           ).status_code == 200
            api.put(f"/v1/sessions/{box}/files", params={"path": "/root/warm"},
                    content=b"x" * MiB).raise_for_status()
            r = api.post(f"/v1/sessions/{box}/processes", json={"argv": ["echo", "warm"]})
            r.raise_for_status()
            with api.stream("GET", f"/v1/sessions/{box}/processes/{r.json()['process_id']}"
                                   "/events") as ev:
                for _ in ev.iter_lines():
                    pass
    time.sleep(1.0)
    yield server
    if server.alive() and fl.rss_kib(server.pid) > 1024 * 1024:
        server.kill9()
    if not server.alive():
        server.start()


def _verdict(w: RssWatch, what: str, after: tuple[int, int] | None) -> None:
    assert not w.tripped.is_set(), (
        f"{what}: the server's RSS grew by more than {ABORT_KIB // 1024} MiB (transfer stopped)")
    assert w.growth_mib <= LIMIT_KIB / 1024, \
        f"{what}: the server's RSS grew by {w.growth_mib:.0f} MiB (limit {LIMIT_KIB // 1024})"
    if after is not None:
        first, last = after
        assert last - first <= AFTER_KIB, (
            f"{what}: the server's RSS still grew after the client went away "
            f"({first // 1024} -> {last // 1024} MiB in 3 s)")


def test_reading_dev_zero_is_bounded_and_stops_with_the_client(fresh: fl.FaultServer,
                                                               box: str) -> None:
    want = 300 * MiB
    got = 0
    nonzero = 0
    timeout = httpx.Timeout(60.0, read=60.0)
    with RssWatch(fresh.pid) as w:
        with httpx.Client(base_url=fresh.url, timeout=timeout, headers=fl.AUTH) as api, \
                api.stream("GET", f"/v1/sessions/{box}/files",
                           params={"path": "/dev/zero"}) as r:
            assert r.status_code == 200, r.read()[:500]
            for chunk in r.iter_bytes(MiB):
                got += len(chunk)
                nonzero += len(chunk) - chunk.count(0)
                if got >= want or w.tripped.is_set():
                    break
        # the client went away: the server must stop reading
        after = None if w.tripped.is_set() else w.after(3.0)
    _verdict(w, "reading /dev/zero", after)
    assert got >= want, f"only {got} bytes of /dev/zero arrived"
    assert nonzero == 0, "/dev/zero delivered non-zero bytes"
    with fresh.client() as c:  # the session is fine
        assert c.get(box).files.read_text(fl.MARKER_PATH) == fl.MARKER


def test_uploading_512mib_is_bounded(fresh: fl.FaultServer, box: str) -> None:
    size = 512 * MiB
    chunk = hashlib.sha256(b"tenki").digest() * (MiB // 32)
    first_md5 = hashlib.md5(chunk).hexdigest()

    with RssWatch(fresh.pid) as w:
        def body() -> Iterator[bytes]:
            sent = 0
            while sent < size:
                if w.tripped.is_set():
                    raise RuntimeError("stopped by the RSS guard")
                yield chunk
                sent += len(chunk)

        try:
            with httpx.Client(base_url=fresh.url, timeout=httpx.Timeout(300.0),
                              headers=fl.AUTH) as api:
                r = api.put(f"/v1/sessions/{box}/files", params={"path": "/root/big"},
                            content=body())
        except (RuntimeError, httpx.TransportError) as exc:
            r = None
            failure = exc
        after = None if w.tripped.is_set() else w.after(3.0)
    _verdict(w, "uploading 512 MiB", after)
    assert r is not None, f"the upload failed: {failure}"
    assert r.status_code == 200, r.text[:500]
    assert r.json()["size_bytes"] == size, r.json()
    with fresh.client() as c:
        s = c.get(box)
        assert fl.sh(s, "stat -c %s /root/big") == str(size)
        assert fl.sh(s, "head -c 1048576 /root/big | md5sum").split()[0] == first_md5
        assert fl.sh(s, "tail -c 1048576 /root/big | md5sum").split()[0] == first_md5
        fl.sh(s, "rm -f /root/big")


def test_exec_output_of_500mb_is_delivered_in_bounded_memory(fresh: fl.FaultServer,
                                                             box: str) -> None:
    total = 500_000_000
    got = 0
    exit_event: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = []
    with RssWatch(fresh.pid) as w, \
            httpx.Client(base_url=fresh.url, timeout=httpx.Timeout(120.0), headers=fl.AUTH) as api:
        r = api.post(f"/v1/sessions/{box}/processes",
                     json={"argv": ["head", "-c", str(total), "/dev/zero"]})
        assert r.status_code == 201, r.text
        pid = r.json()["process_id"]
        with api.stream("GET", f"/v1/sessions/{box}/processes/{pid}/events") as ev:
            assert ev.status_code == 200
            for line in ev.iter_lines():
                if not line:
                    continue
                e = json.loads(line)
                if e["type"] == "stdout":
                    got += len(base64.b64decode(e["data"]))
                elif e["type"] == "exit":
                    exit_event = e
                    break
                elif e["type"] == "error":
                    errors.append(e)
                if w.tripped.is_set():
                    api.post(f"/v1/sessions/{box}/processes/{pid}/kill")
                    break
        after = None if w.tripped.is_set() else w.after(3.0)
    _verdict(w, "500 MB of exec output", after)
    assert not errors, errors
    assert got == total, f"{got} of {total} bytes delivered"
    assert exit_event is not None and exit_event["exit_code"] == 0, exit_event

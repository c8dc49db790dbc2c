"""``HostNetwork.prepare``, ``wired`` and ``teardown``: a restore's network in two parts, with
the commands of ``links`` replaced by recording fakes (the real ones, as root, are in
tests/integration/test_network.py and every restore of the integration suite).

What must hold: ``prepare`` hands over the tap before the rest is built; ``wired`` waits for
the rest and raises what stopped it; nothing a set-up thread makes outlives the teardown, even
when the set-up is cancelled (a terminate) while a thread runs, and no descriptor is left
open."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from support.helpers import fd_open

from tenkibox.host.api import NetworkSpec
from tenkibox.host.network import HostNetwork, links
from tenkibox.host.network.addressing import VMNet

SID = "ses_setup"


class Links:
    """The fakes: each call recorded when it ends; ``hold`` names the ones that wait for
    ``release`` first (in their thread, as the real ones run)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []
        self.hold: set[str] = set()
        self.started = {name: threading.Event() for name in ("create_pair", "open_tap", "wire")}
        self.release = threading.Event()
        self.fail_wire = False
        self.fds: list[int] = []

    def _maybe_hold(self, name: str) -> None:
        self.started[name].set()
        if name in self.hold:
            assert self.release.wait(10)

    def create_pair(self, net: VMNet) -> None:
        self._maybe_hold("create_pair")
        self.calls.append("create_pair")

    def open_tap(self, net: VMNet) -> int:
        self._maybe_hold("open_tap")
        r, w = os.pipe()
        os.close(w)
        self.fds.append(r)
        self.calls.append("open_tap")
        return r

    def wire(self, net: VMNet, spec: NetworkSpec) -> None:
        self._maybe_hold("wire")
        if self.fail_wire:
            self.calls.append("wire failed")
            raise links.NetworkError("nft -f - failed (1): no such table")
        self.calls.append("wire")

    def remove(self, net: VMNet) -> None:
        self.calls.append("remove")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[HostNetwork, Links]:
    fakes = Links(tmp_path)
    monkeypatch.setattr(links, "why_unavailable", lambda: None)
    monkeypatch.delenv("TENKI_NET", raising=False)
    monkeypatch.setattr(links, "prepare_host", lambda: None)
    monkeypatch.setattr(links, "SYS_NET", tmp_path)  # no interface: every slot is free
    for name in ("create_pair", "open_tap", "wire", "remove"):
        monkeypatch.setattr(links, name, getattr(fakes, name))
    network = HostNetwork("0123456789")

    async def no_dns(*args: Any) -> None:
        return None

    monkeypatch.setattr(network._dns, "start", no_dns)
    monkeypatch.setattr(network._dns, "stop", no_dns)
    return network, fakes


async def _until(event: threading.Event) -> None:
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the fake was never called")


async def test_the_tap_is_handed_over_before_the_rest_is_built(
        fake: tuple[HostNetwork, Links]) -> None:
    network, fakes = fake
    fakes.hold = {"wire"}
    tap = await network.prepare(SID, NetworkSpec())
    assert tap is not None and tap.net.session_id == SID
    assert fakes.calls == ["create_pair", "open_tap"]  # the rest still being built
    waiting = asyncio.ensure_future(network.wired(SID))
    await _until(fakes.started["wire"])
    assert not waiting.done()
    fakes.release.set()
    await waiting
    assert fakes.calls == ["create_pair", "open_tap", "wire"]
    tap.close()
    tap.close()  # idempotent
    assert not fd_open(fakes.fds[0])
    await network.teardown(SID)
    assert fakes.calls[-1] == "remove"


async def test_a_wiring_that_failed_is_raised_by_wired_and_torn_down(
        fake: tuple[HostNetwork, Links]) -> None:
    network, fakes = fake
    fakes.fail_wire = True
    tap = await network.prepare(SID, NetworkSpec())
    assert tap is not None
    tap.close()
    with pytest.raises(links.NetworkError, match="no such table"):
        await network.wired(SID)
    await network.teardown(SID)
    assert fakes.calls == ["create_pair", "open_tap", "wire failed", "remove"]


async def test_a_teardown_waits_for_the_wiring_still_running(
        fake: tuple[HostNetwork, Links]) -> None:
    network, fakes = fake
    fakes.hold = {"wire"}
    tap = await network.prepare(SID, NetworkSpec())
    assert tap is not None
    tap.close()
    await _until(fakes.started["wire"])
    tearing = asyncio.ensure_future(network.teardown(SID))
    await asyncio.sleep(0.05)
    assert not tearing.done() and "remove" not in fakes.calls
    fakes.release.set()
    await tearing
    assert fakes.calls == ["create_pair", "open_tap", "wire", "remove"]


@pytest.mark.parametrize("held", ["create_pair", "open_tap"])
async def test_a_set_up_cancelled_meanwhile_leaves_nothing_behind(
        fake: tuple[HostNetwork, Links], held: str) -> None:
    # a terminate cancels the restore while a set-up thread runs: the thread is waited for,
    # then the teardown removes what it made, and the tap it opened is closed
    network, fakes = fake
    fakes.hold = {held}
    preparing = asyncio.ensure_future(network.prepare(SID, NetworkSpec()))
    await _until(fakes.started[held])
    preparing.cancel()
    await asyncio.sleep(0.05)
    assert not preparing.done()  # the thread has not ended: nothing is removed under it
    fakes.release.set()
    with pytest.raises(asyncio.CancelledError):
        await preparing
    made = ["create_pair", "open_tap"] if held == "open_tap" else ["create_pair"]
    assert fakes.calls == [*made, "remove"]  # no wiring started
    assert len(fakes.fds) == (held == "open_tap") and not any(map(fd_open, fakes.fds))

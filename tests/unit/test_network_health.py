"""``HostNetwork.broken``: what of a running VM's network is gone (its namespace, the host end
of its veth pair, its DNS forwarder, its host table), with the OS seen through fakes: a
directory for /run/netns, one for /sys/class/net, and a recorded ``nft list tables``. The real
case (a table deleted under a READY session) is in tests/faults/test_fault_lifecycle.py; the
forwarder here is the real one, on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import tenkibox.host.network as network_mod
from tenkibox.host.api import EgressPolicy
from tenkibox.host.network import HostNetwork, links
from tenkibox.host.network.addressing import VMNet
from tenkibox.host.network.dns import DnsProxy

OWNER = "0123456789"
SID = "ses_net"


class World:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.netns = root / "netns"
        self.sys_net = root / "sys-class-net"
        self.netns.mkdir()
        self.sys_net.mkdir()
        monkeypatch.setattr(links, "NETNS_DIR", self.netns)
        monkeypatch.setattr(links, "SYS_NET", self.sys_net)
        monkeypatch.setattr(links, "host_tables", self.host_tables)
        monkeypatch.setattr(links, "why_unavailable", lambda: None)
        monkeypatch.delenv("TENKI_NET", raising=False)
        self.tables: set[str] = set()
        self.listings = 0
        self.nft_error: str | None = None
        self.network = HostNetwork(OWNER)
        self.serving = True
        monkeypatch.setattr(self.network._dns, "serving", lambda sid: self.serving)

    def host_tables(self, owner: str) -> list[str]:
        assert owner == OWNER
        self.listings += 1
        if self.nft_error is not None:
            raise links.NetworkError(self.nft_error)
        return sorted(self.tables)

    def build(self, session_id: str, slot: int) -> VMNet:
        """What the set-up (``links``) leaves, as the network then knows it."""
        net = VMNet(OWNER, session_id, slot)
        (self.netns / net.netns).touch()
        (self.sys_net / net.host_if).mkdir()
        self.tables.add(session_id)
        self.network._nets[session_id] = net
        self.network._since[session_id] = time.monotonic()
        return net


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


async def test_a_whole_network_is_not_broken(world: World) -> None:
    world.build(SID, 3)
    assert await world.network.broken(SID) is None
    assert await world.network.broken("ses_other") is None  # no network of ours: no verdict


@pytest.mark.parametrize(("break_it", "reason"), [
    (lambda w, net: (w.netns / net.netns).unlink(),
     "the network namespace of the VM was removed"),
    (lambda w, net: (w.sys_net / net.host_if).rmdir(),
     "the host end (tkh3) of the VM's network link was removed"),
    (lambda w, net: setattr(w, "serving", False),
     "the DNS forwarder of the VM's network stopped"),
    (lambda w, net: w.tables.discard(net.session_id),
     f"the host's nftables table of the VM's network (tenki_{OWNER}_{SID}) was removed"),
], ids=["namespace", "link", "dns", "table"])
async def test_each_missing_part_is_named(world: World, monkeypatch: pytest.MonkeyPatch,
                                          break_it, reason: str) -> None:  # type: ignore[no-untyped-def]
    net = world.build(SID, 3)
    assert await world.network.broken(SID) is None
    monkeypatch.setattr(network_mod, "TABLES_MAX_AGE_S", 0.0)  # every check lists anew
    break_it(world, net)
    assert await world.network.broken(SID) == reason


async def test_one_listing_of_tables_serves_every_vm_while_fresh(world: World) -> None:
    world.build("ses_a", 1)
    world.build("ses_b", 2)
    for _ in range(3):
        assert await world.network.broken("ses_a") is None
        assert await world.network.broken("ses_b") is None
    assert world.listings == 1
    # a VM whose table was made after the listing is judged by a new one, not the stale one
    world.build("ses_c", 4)
    assert await world.network.broken("ses_c") is None
    assert world.listings == 2


async def test_nft_failing_gives_no_verdict(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.build(SID, 3)
    world.tables.clear()
    world.nft_error = "nft list tables ip failed (1): out of memory"
    monkeypatch.setattr(network_mod, "TABLES_MAX_AGE_S", 0.0)
    assert await world.network.broken(SID) is None


async def test_teardown_forgets_the_network(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links, "remove", lambda net: None)
    net = world.build(SID, 3)
    await world.network.teardown(SID)
    (world.netns / net.netns).unlink()
    assert await world.network.broken(SID) is None
    assert SID not in world.network._since


async def test_the_dns_forwarder_serves_until_its_sockets_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_NET_POOL", "127.77.0.0/16")  # the VM's host address on loopback
    net = VMNet(OWNER, SID, 5)
    proxy = DnsProxy(lambda net, addresses: _nothing())
    try:
        await proxy.start(net, EgressPolicy())
    except PermissionError:
        pytest.skip("binding port 53 needs root")
    try:
        assert proxy.serving(SID)
        udp = proxy._resolvers[SID].udp
        assert udp is not None
        udp.close()  # e.g. a fatal socket error closes the transport
        assert not proxy.serving(SID)
        await proxy.stop(SID)
        await asyncio.sleep(0.01)  # a transport's socket closes at the loop's next turn
        await proxy.start(net, EgressPolicy())  # the next server start opens them again
        assert proxy.serving(SID)
        await proxy.stop(SID)
        assert not proxy.serving(SID)
        assert not proxy.serving("ses_never")
    finally:
        await proxy.close()


async def _nothing() -> None:
    return None

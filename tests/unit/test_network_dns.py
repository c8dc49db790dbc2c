"""The per-VM DNS forwarder's decisions against a real DNS server on loopback (the nftables
side is ``allow``, recorded here; the real one is proved in tests/integration/test_network.py)."""

from __future__ import annotations

import asyncio

import dns.message
import dns.rcode
import dns.rrset
import pytest

from tenkibox.host.api import EgressPolicy
from tenkibox.host.network.addressing import VMNet
from tenkibox.host.network.dns import _Resolver

NET = VMNet("0123456789", "ses_dns", 3)
ZONE = {"a.test.": "203.0.113.7", "x.svc.test.": "203.0.113.8"}


class Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr):  # type: ignore[no-untyped-def]
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text()
        self.asked.append(name)
        out = dns.message.make_response(query)
        if name in ZONE:
            out.answer.append(dns.rrset.from_text(name, 30, "IN", "A", ZONE[name]))
        else:
            out.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(out.to_wire(), addr)


Outcome = tuple[int, list[str], list[list[str]], list[str]]


async def _ask(policy: EgressPolicy, name: str) -> Outcome:
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    transport, _ = await loop.create_datagram_endpoint(lambda: upstream,
                                                       local_addr=("127.0.0.1", 0))
    allowed: list[list[str]] = []

    async def allow(net: VMNet, addresses: list[str]) -> None:
        assert net is NET
        allowed.append(addresses)

    try:
        resolver = _Resolver(NET, policy, allow, transport.get_extra_info("sockname"))
        raw = await resolver.answer(dns.message.make_query(name, "A").to_wire(), tcp=False)
        assert raw is not None
        reply = dns.message.from_wire(raw)
        found = [rd.address for rrset in reply.answer for rd in rrset]
        return reply.rcode(), found, allowed, upstream.asked
    finally:
        transport.close()


@pytest.mark.parametrize(("policy", "name", "rcode", "found", "allowed", "asked"), [
    # open: everything is forwarded, nothing needs allowing
    (EgressPolicy(), "a.test", dns.rcode.NOERROR, ["203.0.113.7"], [], ["a.test."]),
    (EgressPolicy(), "nope.test", dns.rcode.NXDOMAIN, [], [], ["nope.test."]),
    # no outbound: refused here, upstream never asked
    (EgressPolicy(outbound=False), "a.test", dns.rcode.REFUSED, [], [], []),
    # an allow-list: a listed name is forwarded and its addresses allowed first
    (EgressPolicy(allow_domains=("a.test", "*.svc.test")), "a.test", dns.rcode.NOERROR,
     ["203.0.113.7"], [["203.0.113.7"]], ["a.test."]),
    (EgressPolicy(allow_domains=("*.svc.test",)), "x.svc.test", dns.rcode.NOERROR,
     ["203.0.113.8"], [["203.0.113.8"]], ["x.svc.test."]),
    # ...an unlisted one does not exist, and nobody upstream hears of it
    (EgressPolicy(allow_domains=("a.test",)), "x.svc.test", dns.rcode.NXDOMAIN, [], [], []),
    (EgressPolicy(allow_cidrs=("203.0.113.0/24",)), "a.test", dns.rcode.NXDOMAIN, [], [], []),
])
async def test_decisions(policy: EgressPolicy, name: str, rcode: int, found: list[str],
                         allowed: list[list[str]], asked: list[str]) -> None:
    assert await _ask(policy, name) == (rcode, found, allowed, asked)


async def test_garbage_gets_no_answer() -> None:
    async def allow(net: VMNet, addresses: list[str]) -> None:
        raise AssertionError("nothing to allow")

    resolver = _Resolver(NET, EgressPolicy(), allow, ("127.0.0.1", 9))
    assert await resolver.answer(b"\x00\x01not dns", tcp=False) is None


async def test_a_dead_upstream_is_servfail() -> None:
    async def allow(net: VMNet, addresses: list[str]) -> None:
        raise AssertionError("nothing to allow")

    resolver = _Resolver(NET, EgressPolicy(), allow, ("127.0.0.1", 9))  # nothing listens
    raw = await resolver.answer(dns.message.make_query("a.test", "A").to_wire(), tcp=False)
    assert raw is not None and dns.message.from_wire(raw).rcode() == dns.rcode.SERVFAIL

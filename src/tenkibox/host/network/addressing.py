"""Names and addresses of one VM's network, from its slot (a small number unique on the host).

Every guest sees the same private link (10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3, as QEMU's
user networking would give it), so a restored guest needs no reconfiguration: the link lives in
a network namespace of its own (``tenki-<owner>-<session id>``, the owner being the data
directory's tag, so that two servers on one machine never touch each other's), where QEMU's tap
device is. The namespace reaches the host through a veth pair on a /30 of the pool
(10.201.0.0/16 by default, ``TENKI_NET_POOL``): ``tkh<slot>`` on the host, ``tkn<slot>`` in the
namespace; a slot is free when no interface of that name exists on the machine. The host's
rules key on the host-side interface, so they know which session a packet comes from.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

GUEST_IP, GUEST_PREFIX, GATEWAY, DNS = "10.0.2.15", 24, "10.0.2.2", "10.0.2.3"
GUEST_NET = "10.0.2.0/24"
TAP = "tap0"
#: the gateway's MAC address, the same in every namespace (and passt's own): a restored guest
#: keeps its ARP cache, and a gateway address that moved to another MAC would leave it talking
#: to nobody until the entry went stale
GATEWAY_MAC = "9a:55:9a:55:9a:55"
DEFAULT_POOL = "10.201.0.0/16"


def pool() -> ipaddress.IPv4Network:
    net = ipaddress.IPv4Network(os.environ.get("TENKI_NET_POOL", DEFAULT_POOL))
    if net.prefixlen > 28:
        raise ValueError(f"TENKI_NET_POOL {net} is too small")
    return net


def max_slots() -> int:
    return pool().num_addresses // 4


@dataclass(frozen=True)
class VMNet:
    owner: str  # the data directory's tag (``config.home_tag``)
    session_id: str
    slot: int

    @property
    def netns(self) -> str:
        return f"tenki-{self.owner}-{self.session_id}"

    @property
    def host_if(self) -> str:
        return f"tkh{self.slot}"

    @property
    def ns_if(self) -> str:
        return f"tkn{self.slot}"

    @property
    def table(self) -> str:
        """The host's nftables table of this VM (its egress policy and its DNS set)."""
        return f"tenki_{self.owner}_{self.session_id}"

    def _addr(self, offset: int) -> str:
        if not 0 <= self.slot < max_slots():
            raise ValueError(f"network slot {self.slot} outside the pool {pool()}")
        return str(pool().network_address + 4 * self.slot + offset)

    @property
    def host_ip(self) -> str:
        """The host's end of the pair: where the VM's DNS proxy listens."""
        return self._addr(1)

    @property
    def ns_ip(self) -> str:
        """The namespace's end: the guest's traffic leaves with this source address, and the
        host reaches the guest's ports through it (exposed ports)."""
        return self._addr(2)

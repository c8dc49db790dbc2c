"""The nftables rule sets of the host's guest networks, as text (pure: tested without root).

Three kinds of table, each written in one atomic ``nft -f`` batch:

- ``ip tenki`` on the host, shared: nothing new enters a guest's link from outside (only
  answers to what the guest or the host opened), and guest traffic leaving the host is
  masqueraded.
- ``ip tenki_<session>`` on the host, one per VM, keyed on its host-side interface's index:
  the guest reaches no address of the host (only its DNS proxy), and its egress policy decides
  what it may reach beyond; ``dns4`` holds the addresses its allowed names resolved to (kept for the
  VM's life: nft 1.0.6 cannot refresh an element's timeout, and an address that expired while
  the guest still used its cached answer would break a connection the policy allows).
- ``ip tenki`` inside the VM's namespace: DNS to 10.0.2.3 goes to the proxy, the guest's
  traffic leaves with the namespace's address, a TCP segment of a connection the namespace
  never saw (a clone's copy of its source's connection) is answered with a reset, and, with
  inbound on, the host reaches the guest's ports through the namespace's address.

Refusals are rejects (TCP reset, ICMP admin-prohibited), so a guest's connect fails at once
instead of hanging.
"""

from __future__ import annotations

from ..api import EgressPolicy
from .addressing import DNS, GUEST_IP, GUEST_NET, TAP, VMNet

#: never reachable with outbound on and no allow-list (the host's own addresses are refused in
#: the input hook, whatever they are): this-network, private, carrier-grade NAT, loopback,
#: link-local (cloud metadata), IETF protocol assignments, benchmarking, multicast, reserved,
#: broadcast
BLOCKED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
              "224.0.0.0/4", "240.0.0.0/4")

_REJECT = ("meta l4proto tcp reject with tcp reset",
           "reject with icmp type admin-prohibited")


def _rejects(prefix: str) -> list[str]:
    return [f"{prefix}{r}".strip() for r in _REJECT]


def shared_table(pool: str) -> str:
    """The host's shared table (recreated whole: it holds no state)."""
    return "\n".join([
        "table ip tenki {}",
        "delete table ip tenki",
        "table ip tenki {",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
        '    oifname "tkh*" ct state established,related accept',
        *(f'    oifname "tkh*" {r}' for r in _REJECT),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    ip saddr {pool} oifname != "tkh*" masquerade',
        "  }",
        "}",
    ]) + "\n"


def _egress(policy: EgressPolicy) -> list[str]:
    out = ["ct state established,related accept"]
    if not policy.outbound:
        return [*out, *_rejects("")]
    if policy.allow_domains:
        out.append("ip daddr @dns4 accept")
    if policy.allow_cidrs:
        out.append(f"ip daddr {{ {', '.join(policy.allow_cidrs)} }} accept")
    if policy.allow_listed:
        return [*out, *_rejects("")]
    blocked = ", ".join(BLOCKED_V4)
    return [*out, *_rejects(f"ip daddr {{ {blocked} }} "), "accept"]


def vm_table(net: VMNet, policy: EgressPolicy) -> str:
    """One VM's table on the host (created with the VM's network, deleted with it)."""
    # ``iif`` is resolved to the interface's index when the table is loaded: an index is never
    # handed out again, a name (``tkh<slot>``) is, by every data directory on the machine
    iif = f'iif "{net.host_if}"'
    return "\n".join([
        f"table ip {net.table} {{",
        "  set dns4 {",
        "    type ipv4_addr;",
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        f"    {iif} ct state established,related accept",
        f"    {iif} ip daddr {net.host_ip} udp dport 53 accept",
        f"    {iif} ip daddr {net.host_ip} tcp dport 53 accept",
        *(f"    {r}" for r in _rejects(f"{iif} ")),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority 0; policy accept;",
        f"    {iif} jump egress",
        "  }",
        "  chain egress {",
        *(f"    {r}" for r in _egress(policy)),
        "  }",
        "}",
    ]) + "\n"


def namespace_table(net: VMNet, inbound: bool) -> str:
    """The table inside the VM's namespace."""
    tap, out = f'iifname "{TAP}"', f'oifname "{net.ns_if}"'
    pre = [f"{tap} ip daddr {DNS} udp dport 53 dnat to {net.host_ip}",
           f"{tap} ip daddr {DNS} tcp dport 53 dnat to {net.host_ip}"]
    if inbound:
        pre.append(f'iifname "{net.ns_if}" ip saddr {net.host_ip} ip daddr {net.ns_ip} '
                   f"meta l4proto tcp dnat to {GUEST_IP}")
    return "\n".join([
        "table ip tenki {",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *(f"    {r}" for r in pre),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    {out} ip saddr {GUEST_NET} masquerade",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority 0; policy drop;",
        f"    {tap} {out} ct state established,related accept",
        f"    {tap} {out} tcp flags & (fin | syn | rst | ack) == syn accept",
        f"    {tap} {out} meta l4proto tcp reject with tcp reset",
        f"    {tap} {out} accept",
        f'    iifname "{net.ns_if}" oifname "{TAP}" ct state established,related accept',
        f'    iifname "{net.ns_if}" oifname "{TAP}" ct status dnat accept',
        "  }",
        "}",
    ]) + "\n"


def allow_elements(net: VMNet, addresses: list[str]) -> str:
    """Addresses an allowed name resolved to (adding one already there is a no-op)."""
    return f"add element ip {net.table} dns4 {{ {', '.join(addresses)} }}\n"

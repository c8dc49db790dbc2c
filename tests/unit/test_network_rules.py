"""The guest network's rule sets and DNS decisions, as pure functions (no root needed); the
real enforcement is proved with VMs in tests/integration/test_network.py."""

from __future__ import annotations

import dns.message
import dns.rrset
import pytest

from tenkibox.host.api import EgressPolicy
from tenkibox.host.network import rules
from tenkibox.host.network.addressing import VMNet
from tenkibox.host.network.dns import addresses_in, name_allowed

NET = VMNet("0123456789", "ses_abc", 5)


def test_addresses_come_from_the_slot() -> None:
    assert (NET.host_ip, NET.ns_ip) == ("10.201.0.21", "10.201.0.22")
    assert (NET.host_if, NET.ns_if, NET.netns, NET.table) == (
        "tkh5", "tkn5", "tenki-0123456789-ses_abc", "tenki_0123456789_ses_abc")
    with pytest.raises(ValueError, match="outside the pool"):
        _ = VMNet("0123456789", "ses_x", 1 << 20).host_ip


def test_open_policy_refuses_private_ranges_then_accepts() -> None:
    egress = rules._egress(EgressPolicy())
    assert egress[0] == "ct state established,related accept"
    assert egress[-1] == "accept"
    assert all("10.0.0.0/8" in r and "169.254.0.0/16" in r for r in egress[1:3])
    assert "@dns4" not in "\n".join(egress)


def test_no_outbound_refuses_all() -> None:
    egress = rules._egress(EgressPolicy(outbound=False))
    assert "accept" not in "\n".join(egress[1:])
    assert egress[1:] == list(rules._REJECT)


def test_allow_list_accepts_only_what_it_names() -> None:
    egress = rules._egress(EgressPolicy(allow_domains=("a.test",), allow_cidrs=("10.1.0.0/16",)))
    assert egress[1:3] == ["ip daddr @dns4 accept", "ip daddr { 10.1.0.0/16 } accept"]
    assert egress[3:] == list(rules._REJECT)  # then nothing else, private ranges or not
    only_cidrs = rules._egress(EgressPolicy(allow_cidrs=("203.0.113.0/24",)))
    assert "@dns4" not in "\n".join(only_cidrs)


def test_host_table_refuses_the_host_but_its_dns_forwarder() -> None:
    text = rules.vm_table(NET, EgressPolicy())
    assert 'iif "tkh5" ip daddr 10.201.0.21 udp dport 53 accept' in text
    assert 'iif "tkh5" meta l4proto tcp reject with tcp reset' in text
    assert text.index("udp dport 53 accept") < text.index("reject")


def test_namespace_table_reaches_the_guest_only_with_inbound() -> None:
    assert "dnat to 10.0.2.15" not in rules.namespace_table(NET, inbound=False)
    with_inbound = rules.namespace_table(NET, inbound=True)
    assert 'ip saddr 10.201.0.21 ip daddr 10.201.0.22 meta l4proto tcp dnat to 10.0.2.15' \
        in with_inbound
    # a segment of a connection the namespace never saw (a clone's) gets a reset
    assert "tcp flags & (fin | syn | rst | ack) == syn accept" in with_inbound


def test_shared_table_lets_nothing_new_into_a_guest_link() -> None:
    text = rules.shared_table("10.201.0.0/16")
    assert 'oifname "tkh*" ct state established,related accept' in text
    assert 'ip saddr 10.201.0.0/16 oifname != "tkh*" masquerade' in text
    assert text.startswith("table ip tenki {}\ndelete table ip tenki\n")  # recreated whole


@pytest.mark.parametrize(("name", "allowed"), [
    ("example.org", True), ("EXAMPLE.org.", True), ("www.example.org", False),
    ("api.svc.test", True), ("a.b.svc.test", True), ("svc.test", False),
    ("evilsvc.test", False), ("svc.test.evil", False),
])
def test_name_patterns(name: str, allowed: bool) -> None:
    assert name_allowed(name, ("example.org", "*.svc.test")) is allowed


def test_addresses_of_an_answer() -> None:
    query = dns.message.make_query("a.test", "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text("a.test.", 30, "IN", "CNAME", "b.test."))
    answer.answer.append(dns.rrset.from_text("b.test.", 30, "IN", "A", "203.0.113.9",
                                             "203.0.113.8"))
    assert addresses_in(answer) == ["203.0.113.8", "203.0.113.9"]
    assert rules.allow_elements(NET, ["203.0.113.8"]) == \
        "add element ip tenki_0123456789_ses_abc dns4 { 203.0.113.8 }\n"

"""The rules of a session's network policy (``tenkibox.control.egress``): each rule, and each
refusal naming its field, as the REST model, the CLI and the wire all get them."""

from __future__ import annotations

import pytest

from tenkibox import errors, models
from tenkibox.client import _core
from tenkibox.control import egress

# -- allow_domains: one entry ---------------------------------------------------------------------


@pytest.mark.parametrize(("given", "kept"), [
    ("pypi.org", "pypi.org"),
    ("PyPI.Org", "pypi.org"),  # lower-cased
    ("*.example.org", "*.example.org"),
    ("*.Example.ORG", "*.example.org"),
    ("example.org.", "example.org"),  # a fully qualified name is the same name
    ("*.example.org.", "*.example.org"),
    ("files.pythonhosted.org", "files.pythonhosted.org"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("a-b.c-d.example", "a-b.c-d.example"),
    ("localhost", "localhost"),
    ("*.org", "*.org"),
    ("9gag.com", "9gag.com"),  # a digit may start a label
    ("a" * 63 + ".org", "a" * 63 + ".org"),
])
def test_domains_that_are_kept_and_how(given: str, kept: str) -> None:
    assert egress.domain(given) == kept


@pytest.mark.parametrize(("given", "words"), [
    ("", "must not be empty"),
    ("*", "wildcard is allowed only as a leading '*.'"),
    ("*example.org", "wildcard is allowed only as a leading '*.'"),
    ("foo.*.org", "wildcard is allowed only as a leading '*.'"),
    ("*.*.example.org", "wildcard is allowed only as a leading '*.'"),
    ("ex*ample.org", "wildcard is allowed only as a leading '*.'"),
    ("example.*", "wildcard is allowed only as a leading '*.'"),
    ("*.", "names no domain"),
    (".", "names no domain"),
    ("example.org..", "empty label"),
    ("a..example.org", "empty label"),
    (".example.org", "empty label"),
    ("*..example.org", "empty label"),
    ("-x.example.org", "must not start or end with '-'"),
    ("x-.example.org", "must not start or end with '-'"),
    ("a_b.example.org", "only letters, digits and '-'"),
    ("a b.example.org", "only letters, digits and '-'"),
    ("example.org/path", "only letters, digits and '-'"),
    ("http://example.org", "only letters, digits and '-'"),
    ("example.org:443", "only letters, digits and '-'"),
    ("a" * 64 + ".org", "longer than 63 characters"),
    ("a." * 126 + "org", "longer than 253 characters"),
    ("203.0.113.7", "is an IP address, not a domain: put it in allow_cidrs (203.0.113.7/32)"),
    ("203.0.113.7.", "is an IP address"),
    ("*.203.0.113.7", "is an IP address"),
    ("10.0.0.0/8", "is an IP network, not a domain: put it in allow_cidrs (10.0.0.0/8)"),
    ("::1", "IPv6 address, not a domain (guests have no IPv6)"),
    ("example.123", "its last label is a number"),
    ("bücher.de", "ASCII form (xn--bcher-kva.de)"),
    ("*.bücher.de", "ASCII form (*.xn--bcher-kva.de)"),
])
def test_domains_that_are_refused_say_why(given: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        egress.domain(given)
    assert words in str(caught.value)
    if given:
        assert repr(given[:20]).rstrip("'") in str(caught.value)  # the entry is named


def test_a_domain_of_253_characters_is_the_limit() -> None:
    name = ("a" * 62 + ".") * 4 + "a" * 1  # 253 characters
    assert len(name) == 253 and egress.domain(name) == name
    with pytest.raises(ValueError, match="longer than 253"):
        egress.domain(name + "a")


# -- allow_cidrs: one entry -----------------------------------------------------------------------


@pytest.mark.parametrize(("given", "kept"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("203.0.113.7/32", "203.0.113.7/32"),
    ("203.0.113.7", "203.0.113.7/32"),  # an address alone is one host
    ("192.168.0.0/16", "192.168.0.0/16"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("255.255.255.255/32", "255.255.255.255/32"),
])
def test_cidrs_that_are_kept_and_how(given: str, kept: str) -> None:
    assert egress.cidr(given) == kept


@pytest.mark.parametrize(("given", "words"), [
    ("", "must not be empty"),
    ("10.0.0.1/8", "has host bits set: the network is 10.0.0.0/8"),
    ("192.168.1.1/24", "has host bits set: the network is 192.168.1.0/24"),
    ("2001:db8::/32", "is IPv6: guests have no IPv6"),
    ("::/0", "is IPv6: guests have no IPv6"),
    ("::ffff:10.0.0.1", "is IPv6"),
    ("10.0.0.0/33", "is not an IPv4 network"),
    ("256.0.0.0/8", "is not an IPv4 network"),
    ("010.0.0.0/8", "is not an IPv4 network"),  # leading zeros are ambiguous (octal?)
    ("10.0.0.0/255.0.0.0", "is not an IPv4 network a.b.c.d/n"),  # masks are not taken
    ("10.0.0/8", "is not an IPv4 network a.b.c.d/n"),
    ("example.org", "is not an IPv4 network a.b.c.d/n"),
    (" 10.0.0.0/8", "is not an IPv4 network a.b.c.d/n"),
    ("100.100.100.100/32x", "longer than 18 characters"),
])
def test_cidrs_that_are_refused_say_why(given: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        egress.cidr(given)
    assert words in str(caught.value)
    if given:
        assert repr(given)[:10] in str(caught.value)


# -- lists: counts, duplicates, the field of each refusal -----------------------------------------


def test_lists_are_normalised_without_duplicates() -> None:
    assert egress.domains(["A.org", "a.org.", "*.b.org", "a.org"]) == ["a.org", "*.b.org"]
    assert egress.cidrs(["10.0.0.0/8", "10.0.0.0/8", "1.2.3.4"]) == ["10.0.0.0/8", "1.2.3.4/32"]
    assert egress.domains([]) == [] and egress.cidrs([]) == []


def test_a_refused_entry_names_its_field_and_index() -> None:
    with pytest.raises(errors.ValidationError) as caught:
        egress.domains(["ok.org", "*bad"], "egress.allow_domains")
    assert caught.value.field == "egress.allow_domains.1"
    assert str(caught.value).startswith("egress.allow_domains.1: '*bad'")
    with pytest.raises(errors.ValidationError) as caught:
        egress.cidrs(["10.0.0.0/8", "10.0.0.0/8", "10.0.0.1/8"], "egress.allow_cidrs")
    assert caught.value.field == "egress.allow_cidrs.2"
    # a repeated CLI option: the option alone (the message names the value)
    with pytest.raises(errors.ValidationError) as caught:
        egress.cidrs(["10.0.0.1/8"], "--allow-cidr", index=False)
    assert caught.value.field == "--allow-cidr"
    assert str(caught.value).startswith("--allow-cidr: '10.0.0.1/8' has host bits set")


def test_too_many_entries_name_the_list() -> None:
    egress.domains([f"h{i}.example.org" for i in range(256)])
    with pytest.raises(errors.ValidationError) as caught:
        egress.domains([f"h{i}.example.org" for i in range(257)], "egress.allow_domains")
    assert caught.value.field == "egress.allow_domains"
    assert "at most 256 names, got 257" in str(caught.value)
    egress.cidrs([f"10.0.{i}.0/24" for i in range(64)])
    with pytest.raises(errors.ValidationError) as caught:
        egress.cidrs([f"10.0.{i}.0/24" for i in range(65)], "egress.allow_cidrs")
    assert caught.value.field == "egress.allow_cidrs"
    assert "at most 64 networks, got 65" in str(caught.value)


# -- the policy as a whole ------------------------------------------------------------------------


def test_no_outbound_with_an_allow_list_is_a_contradiction() -> None:
    assert egress.contradiction(False, ["a.org"], []) is not None
    assert egress.contradiction(False, [], ["10.0.0.0/8"]) is not None
    assert egress.contradiction(False, [], []) is None
    assert egress.contradiction(True, ["a.org"], ["10.0.0.0/8"]) is None


@pytest.mark.parametrize(("outbound", "inbound", "domains", "cidrs", "field"), [
    (True, False, [], [], None),
    (False, False, [], [], "allow_outbound"),
    (True, False, ["a.org"], [], "egress.allow_domains"),
    (True, False, [], ["10.0.0.0/8"], "egress.allow_cidrs"),
    (True, True, [], [], "allow_inbound"),
    (False, True, [], [], "allow_outbound"),  # the first that asks for more is named
])
def test_what_asks_for_more_than_the_default(outbound: bool, inbound: bool, domains: list[str],
                                             cidrs: list[str], field: str | None) -> None:
    beyond = egress.beyond_default(outbound, inbound, domains, cidrs)
    assert (beyond[0] if beyond else None) == field


# -- the same rules in the REST model (so the server's 422 and our SDK's local check) -------------


def test_the_model_takes_the_policy_normalised() -> None:
    req = models.SessionCreate.model_validate({"allow_inbound": True, "egress": {
        "allow_domains": ["PyPI.org.", "*.Example.org", "pypi.org"],
        "allow_cidrs": ["10.0.0.0/8", "203.0.113.7"]}})
    assert req.allow_outbound is True and req.allow_inbound is True
    assert req.egress is not None
    assert req.egress.allow_domains == ["pypi.org", "*.example.org"]
    assert req.egress.allow_cidrs == ["10.0.0.0/8", "203.0.113.7/32"]
    plain = models.SessionCreate()
    assert (plain.allow_outbound, plain.allow_inbound, plain.egress) == (True, False, None)


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"egress": {"allow_domains": ["*.*.org"]}}, "egress.allow_domains.0", "wildcard"),
    ({"egress": {"allow_domains": ["ok.org", "1.2.3.4"]}}, "egress.allow_domains.1",
     "IP address"),
    ({"egress": {"allow_domains": ["x.org"] * 257}}, "egress.allow_domains", "at most 256"),
    ({"egress": {"allow_domains": ["a" * 254]}}, "egress.allow_domains.0", "longer than 253"),
    ({"egress": {"allow_cidrs": ["10.0.0.1/8"]}}, "egress.allow_cidrs.0", "host bits"),
    ({"egress": {"allow_cidrs": ["fd00::/8"]}}, "egress.allow_cidrs.0", "no IPv6"),
    ({"egress": {"allow_cidrs": ["10.0.0.0/8"] * 65}}, "egress.allow_cidrs", "at most 64"),
    ({"allow_outbound": False, "egress": {"allow_domains": ["a.org"]}}, "egress",
     "needs outbound access"),
    ({"allow_outbound": False, "egress": {"allow_cidrs": ["10.0.0.0/8"]}}, "egress",
     "needs outbound access"),
    ({"egress": {"allow_domain": ["a.org"]}}, "egress.allow_domain", "xtra"),  # a typo
    ({"allow_outbound": "maybe"}, "allow_outbound", "bool"),
])
def test_the_model_refuses_naming_the_field(body: dict[str, object], field: str,
                                            words: str) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        _core.build(models.SessionCreate, **body)
    assert caught.value.field == field
    assert words in str(caught.value)


def test_no_outbound_without_a_list_is_fine() -> None:
    req = models.SessionCreate.model_validate({"allow_outbound": False,
                                                "egress": {"allow_domains": []}})
    assert req.allow_outbound is False


def test_the_sdk_sends_only_what_differs_from_the_defaults() -> None:
    body = _core.session_create()
    assert body.model_dump(exclude_unset=True) == {}
    body = _core.session_create(allow_outbound=False, allow_inbound=True)
    assert body.model_dump(exclude_unset=True) == {"allow_outbound": False,
                                                   "allow_inbound": True}
    body = _core.session_create(allow_domains="pypi.org", allow_cidrs=["10.0.0.0/8"])
    assert body.model_dump(mode="json", exclude_unset=True) == {
        "egress": {"allow_domains": ["pypi.org"], "allow_cidrs": ["10.0.0.0/8"]}}
    with pytest.raises(errors.ValidationError) as caught:
        _core.session_create(allow_outbound="yes")  # type: ignore[arg-type]
    assert caught.value.field == "allow_outbound"

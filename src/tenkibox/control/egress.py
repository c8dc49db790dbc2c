"""A session's network policy as asked at create: the rules of its fields, in one place.

Pure functions (no records, no I/O, nothing but the standard library and our errors), used by
every surface that takes a policy, so that all accept and refuse the same values in the same
words: the REST model (``models.SessionCreate``, hence our SDK, which builds it before sending),
the CLI (``tenki sandbox create --allow-domain/--allow-cidr``) and Tenki's wire
(``rpc/sandbox.py``, ``CreateSession.egress``). The host enforces the policy
(``host.api.EgressPolicy``); the control plane refuses one a host cannot enforce
(:func:`beyond_default`).

- ``allow_domains``: at most 256; each at most 253 characters, an exact DNS name
  (``pypi.org``) or a wildcard ``*.`` followed by a name (``*.example.org``: any name below
  it, not ``example.org`` itself). Lower-cased; one trailing dot (a fully qualified name) is
  dropped. No other wildcard, no IP address (those go in ``allow_cidrs``), letters, digits and
  ``-`` only (an internationalised name in its ASCII ``xn--`` form).
- ``allow_cidrs``: at most 64; each an IPv4 network ``a.b.c.d/n`` (a bare address is ``/32``),
  without host bits set (``10.0.0.1/8`` is refused: it is ambiguous). IPv6 is refused: guests
  have no IPv6.
- Outbound off together with an allow-list is a contradiction, refused.

Each item function raises ``ValueError`` naming the item (pydantic turns that into the field's
422); the list functions raise ``ValidationError`` naming ``field.N`` (or ``field`` for the
count). Duplicates (after normalising) are dropped, the first kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

from .. import limits
from ..errors import ValidationError

DOMAINS_MAX = limits.EGRESS_DOMAINS_MAX
DOMAIN_MAX_CHARS = limits.EGRESS_DOMAIN_MAX_CHARS
CIDRS_MAX = limits.EGRESS_CIDRS_MAX
CIDR_MAX_CHARS = limits.EGRESS_CIDR_MAX_CHARS

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DOTTED_QUAD = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?$")
_EXAMPLE = "e.g. pypi.org or *.example.org"


def _shown(text: str, n: int = 60) -> str:
    """``repr`` of user input, cut to a readable length."""
    return repr(text if len(text) <= n else text[:n] + "...")


def _ip_or_network(text: str) -> str | None:
    """``text`` as an address or network, if it is one (for a pointed error message)."""
    for parse in (ipaddress.ip_address, ipaddress.ip_network):
        try:
            return str(parse(text))
        except ValueError:
            continue
    return None


# -- one item -------------------------------------------------------------------------------


def domain(pattern: str) -> str:
    """One entry of ``allow_domains``, normalised: lower case, no trailing dot."""
    shown = _shown(pattern)
    if not pattern:
        raise ValueError(f"must not be empty ({_EXAMPLE})")
    if len(pattern) > DOMAIN_MAX_CHARS:
        raise ValueError(f"{shown} is longer than {DOMAIN_MAX_CHARS} characters "
                         f"({len(pattern)})")
    name = pattern.lower()
    wildcard = name.startswith("*.")
    rest = name[2:] if wildcard else name
    if "*" in rest:
        raise ValueError(f"{shown}: a wildcard is allowed only as a leading '*.' followed by a "
                         "name (e.g. *.example.org)")
    if rest.endswith("."):  # a fully qualified name: the same name
        rest = rest[:-1]
    if not rest:
        raise ValueError(f"{shown} names no domain ({_EXAMPLE})")
    as_ip = _ip_or_network(rest)
    if as_ip is not None:
        kind = "network" if "/" in rest else "address"
        if ":" in as_ip:
            raise ValueError(f"{shown} is an IPv6 {kind}, not a domain (guests have no IPv6)")
        net = as_ip if "/" in as_ip else f"{as_ip}/32"
        raise ValueError(f"{shown} is an IP {kind}, not a domain: put it in allow_cidrs ({net})")
    if not rest.isascii():
        try:
            ascii_form = rest.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{shown} is not a valid domain name") from None
        raise ValueError(f"{shown}: give the name in its ASCII form "
                         f"({'*.' if wildcard else ''}{ascii_form})")
    for label in rest.split("."):
        if not label:
            raise ValueError(f"{shown} has an empty label (two dots, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"{shown}: label {_shown(label, 20)} is longer than 63 characters")
        if not _LABEL.match(label):
            raise ValueError(f"{shown}: label {_shown(label, 20)} may hold only letters, digits "
                             "and '-', and must not start or end with '-'")
    if rest.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{shown} is not a domain name (its last label is a number)")
    return ("*." if wildcard else "") + rest


def cidr(text: str) -> str:
    """One entry of ``allow_cidrs``, normalised (``10.0.0.0/8``; a bare address is ``/32``)."""
    shown = _shown(text)
    if not text:
        raise ValueError("must not be empty (e.g. 10.0.0.0/8 or 203.0.113.7/32)")
    if ":" in text:
        raise ValueError(f"{shown} is IPv6: guests have no IPv6; give an IPv4 network such as "
                         "203.0.113.0/24")
    if len(text) > CIDR_MAX_CHARS:
        raise ValueError(f"{shown} is longer than {CIDR_MAX_CHARS} characters (a.b.c.d/n)")
    if not _DOTTED_QUAD.match(text):
        raise ValueError(f"{shown} is not an IPv4 network a.b.c.d/n (e.g. 10.0.0.0/8)")
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"{shown} is not an IPv4 network: {exc}") from None
    if str(net.network_address) != text.split("/", 1)[0]:
        raise ValueError(f"{shown} has host bits set: the network is {net} (or give the "
                         f"address alone, {text.split('/', 1)[0]}/32)")
    return str(net)


# -- lists ----------------------------------------------------------------------------------


def count(items: Sequence[str], maximum: int, what: str) -> None:
    """``ValueError`` when there are more than ``maximum`` items."""
    if len(items) > maximum:
        raise ValueError(f"must have at most {maximum} {what}, got {len(items)}")


def _each(items: Sequence[str], check: Callable[[str], str], maximum: int, what: str,
          field: str, index: bool) -> list[str]:
    try:
        count(items, maximum, what)
    except ValueError as exc:
        raise ValidationError(str(exc), field=field) from None
    out: list[str] = []
    for i, item in enumerate(items):
        try:
            value = check(item)
        except ValueError as exc:
            raise ValidationError(str(exc), field=f"{field}.{i}" if index else field) from None
        if value not in out:
            out.append(value)
    return out


def domains(items: Sequence[str], field: str = "allow_domains", *,
            index: bool = True) -> list[str]:
    """Every entry checked (:func:`domain`), normalised, without duplicates;
    ``ValidationError`` naming ``field`` (too many) or ``field.N`` (that entry; ``field``
    alone with ``index`` false, as for a repeated CLI option: the message names the value)."""
    return _each(items, domain, DOMAINS_MAX, "names", field, index)


def cidrs(items: Sequence[str], field: str = "allow_cidrs", *, index: bool = True) -> list[str]:
    """Every entry checked (:func:`cidr`), normalised, without duplicates."""
    return _each(items, cidr, CIDRS_MAX, "networks", field, index)


def dedupe(items: Sequence[str]) -> list[str]:
    """The items in order, each once."""
    return list(dict.fromkeys(items))


# -- the policy as a whole --------------------------------------------------------------------

CONTRADICTION = ("an allow-list needs outbound access, but allow_outbound is false (no "
                 "outbound connections at all): give one or the other")


def contradiction(outbound: bool, domain_list: Sequence[str],
                  cidr_list: Sequence[str]) -> str | None:
    """The reason outbound off with an allow-list is refused, or None."""
    if not outbound and (domain_list or cidr_list):
        return CONTRADICTION
    return None


def beyond_default(outbound: bool, inbound: bool, domain_list: Sequence[str],
                   cidr_list: Sequence[str]) -> tuple[str, str] | None:
    """The first field (REST and wire name) that asks for more than the default policy
    (outbound to public addresses, no allow-list, no inbound), with what it asks; None for
    the default policy. A host that cannot enforce policies can run only the default."""
    if not outbound:
        return "allow_outbound", "turn outbound access off"
    if domain_list:
        return "egress.allow_domains", "restrict outbound access to an allow-list"
    if cidr_list:
        return "egress.allow_cidrs", "restrict outbound access to an allow-list"
    if inbound:
        return "allow_inbound", "allow inbound access (exposed ports)"
    return None


def unenforceable_message(what: str) -> str:
    """The refusal of a policy on a host that cannot enforce one."""
    return (f"this host cannot enforce network policies (the server needs root and nftables), "
            f"so it cannot {what}; create the session with the default policy, or run the "
            "server where it can")

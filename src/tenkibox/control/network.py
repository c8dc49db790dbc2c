"""A session's network in the control plane: what its create asks for, what its record keeps
(``SessionRow.network``, ``host.api.NetworkSpec`` JSON), what its answer shows, and the refusal
of a policy this host cannot enforce. The rules of the fields themselves are ``egress.py``.

The policy is fixed at create and is the create's own: a restore of a snapshot or a session from
a template does not take its source's, and a resume of a paused session keeps its record's. The
host gets it in every ``BootSpec`` and ``RestoreSpec``.
"""

from __future__ import annotations

from typing import Any

from ..errors import NetworkPolicyUnsupportedError
from ..host.api import EgressPolicy, HostAPI, NetworkSpec
from ..models import SessionCreate, SessionEgress
from ..store.tables import SessionRow
from . import egress


def asked(req: SessionCreate) -> NetworkSpec:
    """The network a create asks for (an allow-list only with outbound on: the model refuses
    both together, and a request copied without validation gets no list rather than more)."""
    allow = req.egress if req.allow_outbound else None
    return NetworkSpec(
        EgressPolicy(req.allow_outbound,
                     tuple(allow.allow_domains) if allow else (),
                     tuple(allow.allow_cidrs) if allow else ()),
        req.allow_inbound)


def network_of(row: SessionRow) -> NetworkSpec:
    """The session's network as its create fixed it (a record from before: the defaults)."""
    return NetworkSpec.from_json(row.network)


def answer(net: NetworkSpec) -> dict[str, Any]:
    """The ``Session`` answer's fields for ``net``."""
    return {"allow_inbound": net.inbound,
            "egress": SessionEgress(outbound=net.egress.outbound,
                                    allow_domains=list(net.egress.allow_domains),
                                    allow_cidrs=list(net.egress.allow_cidrs))}


def needs_enforcement(net: NetworkSpec) -> bool:
    """Whether ``net`` is more than the default policy (only a host that enforces policies
    may run it)."""
    e = net.egress
    return egress.beyond_default(e.outbound, net.inbound, e.allow_domains,
                                 e.allow_cidrs) is not None


def refuse_unenforceable(host: HostAPI, net: NetworkSpec, lead: str = "") -> None:
    """``NetworkPolicyUnsupportedError`` naming the field, when ``net`` is more than the
    default policy and ``host`` cannot enforce policies: a sandbox never runs with more access
    than its policy gives it. ``lead``: words before the reason."""
    if host.network_enforced:
        return
    e = net.egress
    beyond = egress.beyond_default(e.outbound, net.inbound, e.allow_domains, e.allow_cidrs)
    if beyond is not None:
        field, asks = beyond
        raise NetworkPolicyUnsupportedError(lead + egress.unenforceable_message(asks),
                                            field=field)

"""The state machines of every resource, each written down once as a table.

``TRANSITIONS[kind][from]`` is the set of states a record may move to. ``Records.transition``
refuses anything else with ``IllegalTransitionError`` and writes with compare-and-set, so of two
actors moving one record at once exactly one wins.

Sessions::

    CREATING ──boot/restore done──> READY <──> RUNNING (a process runs)
       │                              │
       ├──failed────────────────────> FAILED <──VM died── READY/RUNNING
       └──terminate──> TERMINATING <──terminate/expiry── READY/RUNNING
                           └──VM gone, files removed──> TERMINATED

(``PAUSED`` is part of the wire model for pause/resume, which no surface offers yet: no
transition reaches it.)

Snapshots (states never lie: READY only once every artifact is stored and verified)::

    CREATING ──sealed──> READY ──delete/expiry──> DELETING ──> DELETED
        └──failed────> FAILED ──delete/expiry──┘
                  READY ──an artifact found damaged (admin verify --repair)──> FAILED

Template builds (READY only once the golden snapshot is READY)::

    PENDING ──> BUILDING ──golden snapshot READY──> READY
       └────────────┴──a step failed / the server stopped──> FAILED

Volumes::

    AVAILABLE ──attach──> IN_USE ──detach / its session ended──> AVAILABLE
        └──delete──> DELETING ──file removed──> DELETED
"""

from __future__ import annotations

from ..errors import ConflictError
from ..models import BuildState as B
from ..models import SessionState as S
from ..models import SnapshotState as P
from ..models import VolumeState as V

SESSION: dict[str, frozenset[str]] = {
    S.CREATING: frozenset({S.READY, S.FAILED, S.TERMINATING}),
    S.READY: frozenset({S.RUNNING, S.TERMINATING, S.FAILED}),
    S.RUNNING: frozenset({S.READY, S.TERMINATING, S.FAILED}),
    S.TERMINATING: frozenset({S.TERMINATED}),
    S.PAUSED: frozenset(),
    S.TERMINATED: frozenset(),
    S.FAILED: frozenset(),
}

SNAPSHOT: dict[str, frozenset[str]] = {
    P.CREATING: frozenset({P.READY, P.FAILED}),
    P.READY: frozenset({P.DELETING, P.FAILED}),
    P.FAILED: frozenset({P.DELETING}),
    P.DELETING: frozenset({P.DELETED}),
    P.DELETED: frozenset(),
}

VOLUME: dict[str, frozenset[str]] = {
    V.AVAILABLE: frozenset({V.IN_USE, V.DELETING}),
    V.IN_USE: frozenset({V.AVAILABLE}),
    V.DELETING: frozenset({V.DELETED}),
    V.DELETED: frozenset(),
}

BUILD: dict[str, frozenset[str]] = {
    B.PENDING: frozenset({B.BUILDING, B.FAILED}),
    B.BUILDING: frozenset({B.READY, B.FAILED}),
    B.READY: frozenset(),
    B.FAILED: frozenset(),
}

TRANSITIONS = {"session": SESSION, "snapshot": SNAPSHOT, "volume": VOLUME, "build": BUILD}

#: Sessions whose VM exists and can be driven.
LIVE = frozenset({S.READY.value, S.RUNNING.value})
#: Sessions that are over.
FINAL = frozenset({S.TERMINATED.value, S.FAILED.value})


class IllegalTransitionError(ConflictError):
    """A record was asked to move to a state its table does not allow from where it is."""

    def __init__(self, kind: str, record_id: str, current: str, target: str) -> None:
        super().__init__(f"{kind} {record_id} is {current}; it cannot become {target}")
        self.current = current
        self.target = target


def sources(kind: str, target: str) -> frozenset[str]:
    """Every state from which ``target`` may be reached."""
    return frozenset(str(s.value if hasattr(s, "value") else s)
                     for s, tos in TRANSITIONS[kind].items() if target in tos)

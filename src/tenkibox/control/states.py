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

    READY/RUNNING ──pause──> PAUSING ──PAUSE snapshot READY, VM stopped──> PAUSED
                               └──capture failed, VM still runs──> READY/RUNNING (reason kept)
                               └──capture failed, VM gone──> FAILED
    PAUSED ──resume (quota and capacity checked again)──> RESUMING ──restored──> READY
                                                              └──restore failed──> FAILED
    PAUSING/PAUSED/RESUMING ──terminate/expiry──> TERMINATING (the PAUSE snapshot is released)

A PAUSED session has no VM: it holds its PAUSE snapshot (``SnapshotType.PAUSE``, owned by the
session: it cannot be deleted while the session is paused, and is released once the session is
resumed or terminated; a failed resume keeps it, to be restored as a new session or deleted).
It counts against no session or memory quota and no host capacity.

Recovery after a server crash (``SessionControl.recover``): PAUSING whose VM still runs ->
READY (the host resumes a guest a capture left frozen; the PAUSE snapshot, finished or not, is
released); PAUSING with no VM -> PAUSED if its PAUSE snapshot is READY, else
FAILED; PAUSED stays PAUSED; RESUMING -> the restore is tried again from the PAUSE snapshot
(whatever VM the crashed restore left is killed first), FAILED if that snapshot is not READY.

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

Hosts (``control/hosts.py``; no final state: a host record ends by its removal)::

    ACTIVE <──drain / undrain──> DRAINING      (DRAINING: no new sessions, the others run on)
       └──────────┴──no heartbeat for TENKI_HOST_LOST_AFTER_S──> LOST
    LOST ──registers again──> ACTIVE

No table for API keys or exposed ports: neither has a state column to move. A key is usable,
revoked or expired, but revoked is one timestamp written once (``KeyControl.revoke``, guarded by
``revoked_at IS NULL``) and expired is the clock passing ``expires_at``: nothing to move from
where to where. An exposed port exists or is deleted (unexposed, expired, its session stopped
running); its expiry is also read from the clock. A table over "active -> revoked" would add a
column that restates those timestamps, and two writers to keep in step.
"""

from __future__ import annotations

from ..errors import ConflictError
from ..models import BuildState as B
from ..models import HostState as H
from ..models import SessionState as S
from ..models import SnapshotState as P
from ..models import VolumeState as V

SESSION: dict[str, frozenset[str]] = {
    S.CREATING: frozenset({S.READY, S.FAILED, S.TERMINATING}),
    S.READY: frozenset({S.RUNNING, S.TERMINATING, S.FAILED, S.PAUSING}),
    S.RUNNING: frozenset({S.READY, S.TERMINATING, S.FAILED, S.PAUSING}),
    S.PAUSING: frozenset({S.PAUSED, S.READY, S.RUNNING, S.FAILED, S.TERMINATING}),
    S.PAUSED: frozenset({S.RESUMING, S.TERMINATING}),
    S.RESUMING: frozenset({S.READY, S.FAILED, S.TERMINATING}),
    S.TERMINATING: frozenset({S.TERMINATED}),
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

HOST: dict[str, frozenset[str]] = {
    H.ACTIVE: frozenset({H.DRAINING, H.LOST}),
    H.DRAINING: frozenset({H.ACTIVE, H.LOST}),
    H.LOST: frozenset({H.ACTIVE}),
}

TRANSITIONS = {"session": SESSION, "snapshot": SNAPSHOT, "volume": VOLUME, "build": BUILD,
               "host": HOST}

#: Sessions whose VM exists and can be driven.
LIVE = frozenset({S.READY.value, S.RUNNING.value})
#: Sessions that are being paused, are paused, or are being resumed.
PAUSE_STATES = frozenset({S.PAUSING.value, S.PAUSED.value, S.RESUMING.value})
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

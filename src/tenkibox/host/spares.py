"""Spares: restores prepared ahead, for the next restore of the same snapshot to claim.

A restore spends ~60-70 ms of its ~220 ms (TCG, 2 cores) before the guest runs: the network
(~6 ms), QEMU's start (~35 ms), the device state (~15-20 ms), the checks and the overlay. None
of it depends on the request but the session id, so the control plane names the session id of
the *next* restore of a snapshot as soon as one is restored (``control/spares.py``), and the
host prepares it then (``LocalHost.prepare_spare``): ``restore.prepare``, every step up to the
guest's first instruction, the guest left paused. The restore that comes with that session id
claims it and only resumes the guest and settles it (``restore.finish``: clock and identity,
which are the new session's).

Ownership: a spare belongs to the host's spare table (``Spare``, in ``LocalHost._spares``)
from its request until a restore claims it (then it is that restore's, as a VM being started),
``drop_spare`` removes it, its ``SPARE_KEEP_S`` run out, or the server stops. A spare whose
preparation fails is removed by its keeper; the restore that comes for it then runs whole.
A spare is not a session: no record names it, so a server killed with one leaves a process
that the next server's recovery kills with the other strays.

A spare is prepared once the host starts nothing else (``SPARE_DELAY_S`` after the last start
ended), so that it takes no core from a start, and under TCG with a thread per vCPU, as a
restore on an idle host is. It holds QEMU's own memory and its network helper's (the guest's
RAM is the snapshot's RAM cache, which it maps and does not touch until it runs).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from .api import RestoreSpec
from .restore import Prepared
from .vm import VM


def _seconds(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


#: how long a spare waits, unclaimed, before the host stops it (``TENKI_SPARE_KEEP_S``)
SPARE_KEEP_S = _seconds("TENKI_SPARE_KEEP_S", 600.0)
#: how long after the host's last start a spare is prepared: a restore answered READY runs its
#: first exec then, and a spare's launch beside it would take a core from it
SPARE_DELAY_S = 0.5
#: how often a spare waiting for the host's starts to end looks again
SPARE_POLL_S = 0.05


@dataclass
class Spare:
    """One spare: the restore it was prepared for, its VM once it exists (``slot``), its
    preparation (``made``) and its keeper (``LocalHost._keep_spare``)."""

    spec: RestoreSpec
    slot: list[VM] = field(default_factory=list)
    made: asyncio.Task[Prepared] | None = None
    keeper: asyncio.Task[None] | None = None
    #: a restore claimed it: it is prepared at once, whatever else starts
    claimed: bool = False

    def serves(self, spec: RestoreSpec) -> bool:
        """Whether ``spec`` is the restore this spare was prepared for (the same snapshot,
        manifest, network, identity and hostname)."""
        return spec.to_json() == self.spec.to_json()

    def vm(self) -> VM | None:
        return self.slot[0] if self.slot else None

"""Spares: the session id that the next restore of a snapshot gets, prepared ahead on a host.

A restore does most of its work before its guest runs (``host/spares.py``), and all of that
work depends on nothing of the request but the session id. So when a session restored from a
snapshot is READY (a user's snapshot, a template's or an image's golden one: every plain create
is a restore), the control plane picks the id of the *next* restore of that snapshot with the
same network policy, and has the host that ran this one prepare it. A create that restores that
snapshot with that network takes the id (``take``): its record gets it, and its host is tried
first; the host's restore then claims the spare and only resumes and settles the guest. The
next spare is asked for once that session is READY in turn.

What is kept here is a note, not a record: a spare is not a session (no quota, no listing), the
host owns it and stops it after ``SPARE_KEEP_S`` unclaimed (``host.spares``), and a note that
outlives its spare (expired, failed, or lost with a host worker) only makes the restore that
takes it run whole. Notes are dropped, and their spares stopped, when their snapshot is deleted
or a host holds more than ``SPARES_PER_HOST``. ``TENKI_SPARES=off`` prepares none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import TenkiError
from ..host.api import Manifest, NetworkSpec, RestoreSpec
from ..host.spares import SPARE_KEEP_S
from ..ids import hostname_for, new_id
from .fleet import Fleet

log = logging.getLogger(__name__)

#: spares a host holds at most (the oldest goes for a newer one): each is a paused QEMU and a
#: network (tens of MiB; the guest's RAM is the snapshot's cache, shared)
SPARES_PER_HOST = 4


def enabled() -> bool:
    return os.environ.get("TENKI_SPARES", "on").lower() not in ("off", "0", "false", "no")


@dataclass(frozen=True)
class SpareNote:
    """A spare asked of a host: the restore it serves is ``snapshot_id`` with ``network``."""

    snapshot_id: str
    network: str  # the policy as canonical JSON
    host_id: str
    session_id: str
    asked_at: float  # monotonic

    @property
    def fresh(self) -> bool:
        """Whether its host still keeps it, unclaimed (it counts from readiness, later)."""
        return time.monotonic() - self.asked_at < SPARE_KEEP_S


def _key(snapshot_id: str, network: NetworkSpec) -> tuple[str, str]:
    return snapshot_id, json.dumps(network.to_json(), sort_keys=True)


class Spares:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._notes: dict[tuple[str, str], SpareNote] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def take(self, snapshot_id: str, network: NetworkSpec) -> SpareNote | None:
        """The spare for a restore of ``snapshot_id`` with ``network``, if one was asked for
        and is still kept: its session id is the new session's from now on (``release`` it if
        the session does not go to its host after all)."""
        note = self._notes.pop(_key(snapshot_id, network), None)
        if note is not None and not note.fresh:
            return None
        return note

    def listing(self) -> list[SpareNote]:
        """The spares asked for and still kept, oldest first."""
        return sorted((n for n in self._notes.values() if n.fresh), key=lambda n: n.asked_at)

    def release(self, note: SpareNote) -> None:
        """A taken spare that its session did not use: stopped on its host."""
        self._spawn(self._drop(note), f"drop spare {note.session_id}")

    def after_restore(self, snapshot_id: str, manifest: Manifest, network: NetworkSpec,
                      host_id: str) -> None:
        """A session restored from ``snapshot_id`` is READY on ``host_id``: ask that host for
        the next restore's spare (unless one is kept already, or spares are off)."""
        key = _key(snapshot_id, network)
        host = self.fleet.spares_on(host_id)
        if not enabled() or host is None or (key in self._notes and self._notes[key].fresh):
            return
        session_id = new_id("session")
        note = SpareNote(snapshot_id, key[1], host_id, session_id, time.monotonic())
        on_host = sorted((n for n in self._notes.values() if n.host_id == host_id),
                         key=lambda n: n.asked_at)
        for oldest in on_host[:max(0, len(on_host) - SPARES_PER_HOST + 1)]:
            self._forget(oldest)
            self.release(oldest)
        stale = self._notes.get(key)
        if stale is not None:
            self.release(stale)
        self._notes[key] = note
        spec = RestoreSpec(session_id, snapshot_id, manifest, hostname_for(session_id),
                           network=network)
        self._spawn(self._ask(note, spec), f"spare {session_id}")

    async def drop_snapshot(self, snapshot_id: str) -> None:
        """Stop the spares of a snapshot being deleted (its files are then unused)."""
        notes = [n for n in self._notes.values() if n.snapshot_id == snapshot_id]
        for note in notes:
            self._forget(note)
        await asyncio.gather(*(self._drop(n) for n in notes))

    def _forget(self, note: SpareNote) -> None:
        key = (note.snapshot_id, note.network)
        if self._notes.get(key) is note:
            del self._notes[key]

    async def _ask(self, note: SpareNote, spec: RestoreSpec) -> None:
        host = self.fleet.spares_on(note.host_id)
        try:
            if host is None:
                raise TenkiError(f"host {note.host_id} left")
            await host.prepare_spare(spec)
        except TenkiError as exc:
            log.warning("no spare for %s on %s: %s", note.snapshot_id, note.host_id,
                        exc.message)
            self._forget(note)

    async def _drop(self, note: SpareNote) -> None:
        host = self.fleet.spares_on(note.host_id)
        if host is None:
            return
        try:
            await host.drop_spare(note.session_id)
        except TenkiError as exc:  # its host stops it when its time is up
            log.warning("spare %s on %s not stopped: %s", note.session_id, note.host_id,
                        exc.message)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Let the requests in flight end (the hosts stop their spares at their own stop)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._notes.clear()

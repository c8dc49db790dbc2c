"""May this create go ahead? Workspace quotas (429) and the host's memory capacity (503).

A host's memory is counted per host: the sessions whose record names it (``host_id``) against
its own capacity; the control plane places a session on one host (``control/fleet.py``) and
checks that host here.

Each check runs inside the transaction that inserts the new record (``Records.insert(check=)``),
so a count and the insert it allows are never split: of ten creates racing for the last five
places, exactly five get one. (In one server process the check and the insert also run without
yielding to the event loop; with several control-plane processes the workspace row is locked
``FOR UPDATE`` where the database has it.)
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from ..errors import CapacityUnavailableError, QuotaExceededError, WorkspaceNotFoundError
from ..host.capacity import HostCapacity
from ..store.tables import SessionRow, WorkspaceRow
from .workspaces import HOLDING_SESSION, usage_of

Check = Callable[[OrmSession], None]


def _quotas(orm: OrmSession, ws: str) -> dict[str, int]:
    row = orm.execute(select(WorkspaceRow).where(WorkspaceRow.id == ws)
                      .with_for_update()).scalar_one_or_none()
    if row is None:  # deleted while the key was in use
        raise WorkspaceNotFoundError(f"workspace {ws} not found")
    return {k: int(v) for k, v in (row.quotas or {}).items() if v is not None}


def _refuse(name: str, limit: int, in_use: int, unit: str = "") -> None:
    raise QuotaExceededError(f"quota exceeded: {name}={limit}{unit}, in use {in_use}{unit}",
                             details={"quota": name, "limit": limit, "in_use": in_use})


def session(ws: str, memory_mib: int, capacity: HostCapacity, host_id: str) -> Check:
    """A new session of ``memory_mib`` on host ``host_id``: the workspace's session and memory
    quotas, then that host's memory."""
    fits = host_memory(memory_mib, capacity, host_id)

    def check(orm: OrmSession) -> None:
        quotas = _quotas(orm, ws)
        used = usage_of(orm, ws)
        limit = quotas.get("max_concurrent_sessions")
        if limit is not None and used["concurrent_sessions"] + 1 > limit:
            _refuse("max_concurrent_sessions", limit, used["concurrent_sessions"])
        limit = quotas.get("max_memory_mib")
        if limit is not None and used["memory_mib"] + memory_mib > limit:
            _refuse("max_memory_mib", limit, used["memory_mib"])
        fits(orm)

    return check


def promised_mib(orm: OrmSession, host_id: str) -> int:
    """The memory of the sessions placed on ``host_id`` that hold a VM or are getting one."""
    return int(orm.execute(
        select(func.coalesce(func.sum(SessionRow.memory_mb), 0))
        .where(SessionRow.state.in_(HOLDING_SESSION), SessionRow.host_id == host_id))
        .scalar_one())


def host_memory(memory_mib: int, capacity: HostCapacity, host_id: str) -> Check:
    """Host ``host_id``'s memory alone (the server's own sessions: golden snapshot builds)."""

    def check(orm: OrmSession) -> None:
        promised = promised_mib(orm, host_id)
        room = capacity.memory_capacity_mib
        if promised + memory_mib > room:
            raise CapacityUnavailableError(
                f"capacity unavailable: host {capacity.host_id} has promised {promised} of "
                f"{room} MiB of guest memory; a {memory_mib} MiB session does not fit (retry "
                "when sessions end)",
                details={"host_id": capacity.host_id, "promised_mib": promised,
                         "capacity_mib": room, "requested_mib": memory_mib})

    return check


def snapshot(ws: str) -> Check:
    """A new snapshot: the count, and the stored bytes already used (its own size is known
    only once it is captured)."""

    def check(orm: OrmSession) -> None:
        quotas = _quotas(orm, ws)
        used = usage_of(orm, ws)
        limit = quotas.get("max_snapshots")
        if limit is not None and used["snapshots"] + 1 > limit:
            _refuse("max_snapshots", limit, used["snapshots"])
        limit = quotas.get("max_stored_bytes")
        if limit is not None and used["stored_bytes"] >= limit:
            _refuse("max_stored_bytes", limit, used["stored_bytes"])

    return check


def volume(ws: str, size_bytes: int) -> Check:
    def check(orm: OrmSession) -> None:
        quotas = _quotas(orm, ws)
        used = usage_of(orm, ws)
        limit = quotas.get("max_volumes")
        if limit is not None and used["volumes"] + 1 > limit:
            _refuse("max_volumes", limit, used["volumes"])
        limit = quotas.get("max_stored_bytes")
        if limit is not None and used["stored_bytes"] + size_bytes > limit:
            _refuse("max_stored_bytes", limit, used["stored_bytes"])

    return check

"""Exposed ports: the records of ``port_exposures`` (this is their one writer) and the preview
proxy's listeners that serve them.

An exposure makes one TCP port of a running session's guest reachable through the server's
preview proxy (``tenkibox.preview``) under an unguessable token. It exists only while the session
runs (READY or RUNNING): the session's code calls ``close_session`` as soon as the session
leaves that (PAUSING, TERMINATING, FAILED; expiry is a terminate), which deletes the records and
closes their listeners, cutting live connections. Records are per session: a clone or a restore
is another session and has none. The sweeper deletes expired exposures (a connection to an
expired one is refused at once, before the sweep).

Only a session whose network has inbound access (``NetworkSpec.inbound``, fixed at create) may
expose ports; otherwise ConflictError "inbound access is disabled" (FAILED_PRECONDITION on
Tenki's wire, which the official SDKs read as InboundDisabled). At most ``MAX_PER_SESSION``
ports per session ("maximum exposed ports", 429 / RESOURCE_EXHAUSTED).

One lock per session orders exposes against ``close_session``: a session leaves READY first (its
record's compare-and-set) and closes its exposures second, so an expose either ran before the
close (and is closed by it) or sees the new state and is refused.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from ..errors import ConflictError, NotFoundError, QuotaExceededError, ValidationError
from ..host.api import HostAPI, NetworkSpec
from ..ids import new_id
from ..models import PORT_MAX, PORT_MIN, PortExposure
from ..preview import Exposure, PreviewProxy
from ..store.tables import PortExposureRow, SessionRow
from .records import Records
from .sessions import not_running
from .states import LIVE

log = logging.getLogger(__name__)

MAX_PER_SESSION = 16
INBOUND_DISABLED = "inbound access is disabled"


def now() -> datetime:
    return datetime.now(UTC)


def _exposure(row: PortExposureRow) -> Exposure:
    return Exposure(row.id, row.session_id, row.workspace_id, row.port, row.token,
                    row.expires_at)


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not PORT_MIN <= port <= PORT_MAX:
        raise ValidationError(f"must be {PORT_MIN}..{PORT_MAX}, got {port!r}", field="port")
    return port


class PortControl:
    def __init__(self, records: Records, host: HostAPI, proxy: PreviewProxy) -> None:
        self.records = records
        self.host = host
        self.proxy = proxy
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    # -- reads -------------------------------------------------------------------------------
    def _rows(self, *where: Any) -> builtins.list[PortExposureRow]:
        return sorted(self.records.all(PortExposureRow, *where), key=lambda r: r.port)

    def _find(self, session_id: str, port: int) -> PortExposureRow | None:
        rows = self._rows(PortExposureRow.session_id == session_id, PortExposureRow.port == port)
        return rows[0] if rows else None

    def to_model(self, row: PortExposureRow) -> PortExposure:
        return PortExposure(session_id=row.session_id, port=row.port,
                            url=self.proxy.url(row.host_port or 0, row.token),
                            expires_at=row.expires_at, created_at=row.created_at)

    def list(self, session_id: str, ws: str | None = None) -> list[PortExposure]:
        """The session's exposed ports (not the expired ones), by port."""
        self.records.get(SessionRow, session_id, ws=ws)  # not found (or another workspace's)
        t = now()
        return [self.to_model(r) for r in self._rows(PortExposureRow.session_id == session_id)
                if r.expires_at is None or r.expires_at > t]

    # -- expose and unexpose -----------------------------------------------------------------
    async def expose(self, session_id: str, port: int, ws: str | None = None, *,
                     ttl_s: float | None = None,
                     expires_at: datetime | None = None) -> PortExposure:
        """Make ``port`` of the session's guest reachable through the preview proxy until
        ``ttl_s`` seconds from now (or ``expires_at``; neither: until unexposed or the session
        stops running). An exposed port is answered as it is, with its expiry moved if one is
        given."""
        check_port(port)
        if ttl_s is not None and expires_at is not None:
            raise ValidationError("give ttl_s or expires_at, not both", field="expires_at")
        if ttl_s is not None:
            expires_at = now() + timedelta(seconds=ttl_s)
        elif expires_at is not None:
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=UTC)
            if expires_at <= now():
                raise ValidationError(f"must be in the future, got {expires_at.isoformat()}",
                                      field="expires_at")
        async with self._lock(session_id):
            row = self.records.get(SessionRow, session_id, ws=ws)
            if row.state not in LIVE or not self.host.has_vm(session_id):
                raise not_running(row)
            if not NetworkSpec.from_json(row.network).inbound:
                raise ConflictError(f"session {session_id}: {INBOUND_DISABLED} (ports can be "
                                    "exposed only for a sandbox created with inbound access)")
            # the host can reach the guest's ports (else its reason, a ConflictError)
            await self.host.port_address(session_id, port)
            await self._drop_expired(session_id)
            found = self._find(session_id, port)
            if found is not None:
                if expires_at is not None:
                    await self._set_expiry(found, expires_at)
                    found = self._find(session_id, port) or found
                return self.to_model(found)
            return await self._create(row, port, expires_at)

    async def _create(self, session: SessionRow, port: int,
                      expires_at: datetime | None) -> PortExposure:
        row = PortExposureRow(id=new_id("port"), session_id=session.id,
                              workspace_id=session.workspace_id, port=port,
                              token=secrets.token_urlsafe(32), host_port=None,
                              created_at=now(), expires_at=expires_at)
        row.host_port = await self.proxy.open(_exposure(row))
        try:
            await self.records.insert(row, check=self._below_limit(session.id), notify=False)
        except BaseException:
            await self.proxy.close(row.id)
            raise
        log.info("session %s: port %d exposed on %s", session.id, port,
                 self.proxy.address(row.host_port))
        return self.to_model(row)

    @staticmethod
    def _below_limit(session_id: str) -> Callable[[OrmSession], None]:
        def check(orm: OrmSession) -> None:
            n = orm.scalar(select(func.count()).select_from(PortExposureRow)
                           .where(PortExposureRow.session_id == session_id)) or 0
            if n >= MAX_PER_SESSION:
                raise QuotaExceededError(
                    f"maximum exposed ports reached: session {session_id} has {n} "
                    f"(at most {MAX_PER_SESSION}); unexpose one first",
                    details={"quota": "max_exposed_ports", "limit": MAX_PER_SESSION,
                             "in_use": n})
        return check

    async def _set_expiry(self, row: PortExposureRow, expires_at: datetime) -> None:
        await self.records.update(PortExposureRow, row.id, notify=False, expires_at=expires_at)
        row.expires_at = expires_at
        self.proxy.update(_exposure(row))

    async def unexpose(self, session_id: str, port: int, ws: str | None = None) -> None:
        """Close the exposure of ``port``: its URL stops working and its live connections are
        cut. NotFoundError if the port is not exposed."""
        check_port(port)
        self.records.get(SessionRow, session_id, ws=ws)
        async with self._lock(session_id):
            row = self._find(session_id, port)
            expired = row is not None and row.expires_at is not None and row.expires_at <= now()
            if row is not None:
                await self._delete([row])
            if row is None or expired:
                raise NotFoundError(f"port {port} of session {session_id} is not exposed")

    # -- ends --------------------------------------------------------------------------------
    async def close_session(self, session_id: str, reason: str) -> None:
        """The session stopped running (paused, terminated, failed): its exposures go."""
        async with self._lock(session_id):
            rows = self._rows(PortExposureRow.session_id == session_id)
            if rows:
                log.info("session %s: %d exposed port(s) closed: %s", session_id, len(rows),
                         reason)
                await self._delete(rows)
        self._locks.pop(session_id, None)

    async def _drop_expired(self, session_id: str) -> None:
        t = now()
        await self._delete([r for r in self._rows(PortExposureRow.session_id == session_id)
                            if r.expires_at is not None and r.expires_at <= t])

    async def _delete(self, rows: builtins.list[PortExposureRow]) -> None:
        if not rows:
            return
        await self.records.remove_where(PortExposureRow,
                                        PortExposureRow.id.in_([r.id for r in rows]),
                                        notify=False)
        for r in rows:
            await self.proxy.close(r.id)

    async def sweep(self) -> None:
        """Delete expired exposures, and any of a session that no longer runs."""
        t = now()
        rows = self._rows()
        states = {s.id: s.state for s in self.records.all(
            SessionRow, SessionRow.id.in_({r.session_id for r in rows}))} if rows else {}
        for session_id in {r.session_id for r in rows}:
            mine = [r for r in rows if r.session_id == session_id]
            if states.get(session_id) not in LIVE:
                await self.close_session(session_id, "the session is not running")
                continue
            gone = [r for r in mine if r.expires_at is not None and r.expires_at <= t]
            if gone:
                async with self._lock(session_id):
                    still = {r.id for r in self._rows(PortExposureRow.session_id == session_id)
                             if r.expires_at is not None and r.expires_at <= now()}
                    await self._delete([r for r in gone if r.id in still])
                log.info("session %s: %d exposed port(s) expired", session_id, len(gone))

    # -- server start and stop ---------------------------------------------------------------
    async def recover(self) -> None:
        """After a (re)start (sessions recovered first): the listeners of the exposures that
        survive are opened again, on their port when it is free (else another: the URL then
        changes); the others are deleted."""
        t = now()
        for row in self._rows():
            session = self.records.find(SessionRow, row.session_id)
            alive = (session is not None and session.state in LIVE
                     and self.host.has_vm(row.session_id)
                     and (row.expires_at is None or row.expires_at > t))
            if not alive:
                await self._delete([row])
                continue
            try:
                port = await self.proxy.open(_exposure(row), row.host_port or 0)
            except ConflictError as exc:
                log.warning("session %s: exposed port %d could not listen again (%s); it is "
                            "closed", row.session_id, row.port, exc.message)
                await self._delete([row])
                continue
            if port != row.host_port:
                log.warning("session %s: port %d is exposed on %d now (%s was taken): its URL "
                            "changed", row.session_id, row.port, port, row.host_port)
                await self.records.update(PortExposureRow, row.id, notify=False,
                                          host_port=port)

    async def shutdown(self) -> None:
        """The server stops: every listener closes (the records stay for the next start)."""
        await self.proxy.close_all()

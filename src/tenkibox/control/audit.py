"""The audit trail: one row per mutating call (who, what, on which object, with what outcome),
kept for ``TENKI_AUDIT_RETENTION_DAYS`` (90 by default) and pruned by the sweeper."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from ..models import AuditEntry
from ..store.tables import AuditRow
from .records import Records

RETENTION_DAYS = float(os.environ.get("TENKI_AUDIT_RETENTION_DAYS", 90))
LIST_MAX = 1000


def to_model(row: AuditRow) -> AuditEntry:
    return AuditEntry(id=row.id, at=row.at, workspace_id=row.workspace_id,
                      key_prefix=row.key_prefix, action=row.action, method=row.method,
                      path=row.path, object_id=row.object_id, status=row.status,
                      outcome=row.outcome)


#: the largest id of an audit entry on PostgreSQL (an ``integer`` column)
INT32_MAX = 2**31 - 1


class AuditLog:
    def __init__(self, records: Records, retention_days: float = RETENTION_DAYS) -> None:
        self.records = records
        self.retention = timedelta(days=retention_days)

    async def record(self, *, workspace_id: str | None, key_prefix: str | None, action: str,
                     method: str, path: str, object_id: str | None, status: int,
                     outcome: str) -> None:
        await self.records.insert(AuditRow(
            at=datetime.now(UTC), workspace_id=workspace_id, key_prefix=key_prefix,
            action=action[:64], method=method[:8], path=path[:1024],
            object_id=object_id[:64] if object_id else None, status=status,
            outcome=outcome[:64]), notify=False)

    def query(self, workspace_id: str | None, limit: int = 100,
              before_id: int | None = None) -> list[AuditEntry]:
        """Newest first; ``before_id`` pages back."""
        stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(max(1, min(limit, LIST_MAX)))
        if workspace_id is not None:
            stmt = stmt.where(AuditRow.workspace_id == workspace_id)
        # ids are 32-bit integers on PostgreSQL: an id beyond them bounds nothing (every id is
        # before it), and would not fit the comparison
        if before_id is not None and not (self.records.store.postgres and before_id > INT32_MAX):
            stmt = stmt.where(AuditRow.id < before_id)
        with self.records.store.tx() as orm:
            return [to_model(r) for r in orm.scalars(stmt)]

    async def prune(self) -> int:
        """Delete the entries older than the retention; how many went."""
        cutoff = datetime.now(UTC) - self.retention
        return await self.records.remove_where(AuditRow, AuditRow.at < cutoff, notify=False)

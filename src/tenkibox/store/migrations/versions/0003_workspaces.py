"""Workspaces, API keys and the audit trail; every session, snapshot and volume belongs to a
workspace.

Everything that existed before goes to a workspace named ``default`` (created here); the server
mints the local admin key of that workspace on its next start.

Revision ID: 0003
Revises: 0002
"""

import secrets
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from tenkibox.store.tables import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128), unique=True, nullable=False),
        sa.Column("quotas", sa.JSON),
        sa.Column("created_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("workspace_id", sa.String(40), index=True, nullable=False),
        sa.Column("key_hash", sa.String(64), unique=True, nullable=False),
        sa.Column("prefix", sa.String(16)),
        sa.Column("name", sa.String(128)),
        sa.Column("admin", sa.Boolean, default=False),
        sa.Column("created_at", UTCDateTime),
        sa.Column("last_used_at", UTCDateTime),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("revoked_at", UTCDateTime),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, index=True),
        sa.Column("workspace_id", sa.String(40), index=True),
        sa.Column("key_prefix", sa.String(16)),
        sa.Column("action", sa.String(64)),
        sa.Column("method", sa.String(8)),
        sa.Column("path", sa.Text),
        sa.Column("object_id", sa.String(64)),
        sa.Column("status", sa.Integer),
        sa.Column("outcome", sa.String(64)),
    )
    with op.batch_alter_table("sessions") as b:
        b.add_column(sa.Column("workspace_id", sa.String(64)))
    with op.batch_alter_table("volumes") as b:
        b.add_column(sa.Column("workspace_id", sa.String(64)))
    op.create_index("ix_sessions_workspace_id", "sessions", ["workspace_id"])
    op.create_index("ix_volumes_workspace_id", "volumes", ["workspace_id"])
    op.create_index("ix_snapshots_workspace_id", "snapshots", ["workspace_id"])

    conn = op.get_bind()
    ws = "ws_" + "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz")
                         for _ in range(16))
    t = datetime.now(UTC).replace(tzinfo=None)
    conn.execute(sa.text("INSERT INTO workspaces (id, name, quotas, created_at, updated_at) "
                         "VALUES (:id, 'default', '{}', :t, :t)"), {"id": ws, "t": t})
    for table in ("sessions", "snapshots", "volumes"):
        # the snapshot's workspace_id came from the request body before: it is replaced
        conn.execute(sa.text(f"UPDATE {table} SET workspace_id = :ws"), {"ws": ws})


def downgrade() -> None:
    raise NotImplementedError("workspaces cannot be removed once objects belong to them")

"""Sessions, snapshots and volumes.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from tenkibox.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128)),
        sa.Column("state", sa.String(16), index=True),
        sa.Column("state_reason", sa.Text),
        sa.Column("cpu", sa.Integer),
        sa.Column("memory_mb", sa.Integer),
        sa.Column("base_image_id", sa.String(64)),
        sa.Column("snapshot_id", sa.String(40)),
        sa.Column("env", sa.JSON),
        sa.Column("metadata", sa.JSON),
        sa.Column("volumes", sa.JSON),
        sa.Column("machine", sa.JSON),
        sa.Column("disk_chain", sa.JSON),
        sa.Column("created_at", UTCDateTime),
        sa.Column("ready_at", UTCDateTime),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("terminated_at", UTCDateTime),
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("session_id", sa.String(40), index=True),
        sa.Column("workspace_id", sa.String(64)),
        sa.Column("name", sa.String(128)),
        sa.Column("state", sa.String(16), index=True),
        sa.Column("state_reason", sa.Text),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("compressed_bytes", sa.BigInteger),
        sa.Column("memory_bytes", sa.BigInteger),
        sa.Column("base_image_id", sa.String(64)),
        sa.Column("cpu", sa.Integer),
        sa.Column("memory_mb", sa.Integer),
        sa.Column("machine", sa.JSON),
        sa.Column("disk_chain", sa.JSON),
        sa.Column("files", sa.JSON),
        sa.Column("timings", sa.JSON),
        sa.Column("created_at", UTCDateTime),
        sa.Column("ready_at", UTCDateTime),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("deleted_at", UTCDateTime),
    )
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128)),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("state", sa.String(16), index=True),
        sa.Column("session_id", sa.String(40)),
        sa.Column("path", sa.Text),
        sa.Column("read_only", sa.Integer),
        sa.Column("created_at", UTCDateTime),
        sa.Column("deleted_at", UTCDateTime),
    )


def downgrade() -> None:
    op.drop_table("volumes")
    op.drop_table("snapshots")
    op.drop_table("sessions")

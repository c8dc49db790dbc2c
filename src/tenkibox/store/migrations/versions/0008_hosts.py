"""Hosts: the machines that run VMs (``hosts``), and the host of each session and volume
(``sessions.host_id``, ``volumes.host_id``). Everything recorded before ran on the embedded host,
``local``: unfinished sessions and undeleted volumes are placed there.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("address", sa.Text(), nullable=True),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("memory_total_mib", sa.BigInteger(), nullable=False),
        sa.Column("memory_reserve_mib", sa.BigInteger(), nullable=False),
        sa.Column("overcommit", sa.Float(), nullable=False),
        sa.Column("disk_total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("accelerator", sa.String(16), nullable=False),
        sa.Column("qemu_version", sa.String(64), nullable=False),
        sa.Column("cpu_model", sa.String(128), nullable=False),
        sa.Column("network_enforced", sa.Boolean(), nullable=False),
        sa.Column("memory_used_mib", sa.BigInteger(), nullable=False),
        sa.Column("tmpfs_used_bytes", sa.BigInteger(), nullable=False),
        sa.Column("tmpfs_total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("registered_at", sa.DateTime(), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(), nullable=True),
    )
    with op.batch_alter_table("sessions") as b:
        b.add_column(sa.Column("host_id", sa.String(64), nullable=True))
        b.create_index("ix_sessions_host_id", ["host_id"])
    with op.batch_alter_table("volumes") as b:
        b.add_column(sa.Column("host_id", sa.String(64), nullable=True))
        b.create_index("ix_volumes_host_id", ["host_id"])
    op.execute("UPDATE sessions SET host_id = 'local' "
               "WHERE state NOT IN ('TERMINATED', 'FAILED')")
    op.execute("UPDATE volumes SET host_id = 'local' WHERE state <> 'DELETED'")


def downgrade() -> None:
    raise NotImplementedError

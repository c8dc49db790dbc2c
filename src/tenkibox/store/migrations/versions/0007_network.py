"""Sessions carry their network: ``network`` (egress policy and inbound, as
``host.api.NetworkSpec`` JSON; existing sessions: outbound open, no inbound). Exposed ports are
records of their own (``port_exposures``), owned by the control plane's port control.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as b:
        b.add_column(sa.Column("network", sa.JSON(), nullable=True))
    op.create_table(
        "port_exposures",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("session_id", sa.String(40), nullable=False, index=True),
        sa.Column("workspace_id", sa.String(64), nullable=False, index=True),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("host_port", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("session_id", "port", name="uq_port_exposures_session_port"),
    )


def downgrade() -> None:
    raise NotImplementedError

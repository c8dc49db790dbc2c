"""Templates and their builds; a session and a snapshot may name their template.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from tenkibox.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("workspace_id", sa.String(40), index=True, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON),
        sa.Column("build_env", sa.JSON),
        sa.Column("created_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime),
        sa.UniqueConstraint("workspace_id", "name", name="uq_templates_workspace_name"),
    )
    op.create_table(
        "template_builds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("template_id", sa.String(40), index=True, nullable=False),
        sa.Column("workspace_id", sa.String(40), index=True, nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("state", sa.String(16), index=True),
        sa.Column("error", sa.Text),
        sa.Column("failed_step", sa.String(32)),
        sa.Column("log", sa.Text),
        sa.Column("session_id", sa.String(40)),
        sa.Column("snapshot_id", sa.String(40)),
        sa.Column("created_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("completed_at", UTCDateTime),
    )
    with op.batch_alter_table("sessions") as b:
        b.add_column(sa.Column("template_id", sa.String(40)))
    with op.batch_alter_table("snapshots") as b:
        b.add_column(sa.Column("template_id", sa.String(40)))


def downgrade() -> None:
    raise NotImplementedError

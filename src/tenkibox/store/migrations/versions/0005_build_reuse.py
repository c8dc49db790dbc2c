"""A build records what it was made from (the template's fields and its base), so that a build
of an unchanged template on an unchanged base reuses it.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("template_builds") as b:
        b.add_column(sa.Column("spec_hash", sa.String(64)))
        b.add_column(sa.Column("base_ref", sa.String(128)))


def downgrade() -> None:
    raise NotImplementedError

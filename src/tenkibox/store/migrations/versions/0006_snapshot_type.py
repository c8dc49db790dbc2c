"""A snapshot has a type: USER, PAUSE (a paused session's, owned by it) or TEMPLATE (a
template's or an image's golden snapshot). Existing rows: TEMPLATE where a template (or the
server's golden snapshots, ``golden:<key>``) owns them, USER otherwise.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots") as b:
        b.add_column(sa.Column("type", sa.String(16), nullable=False, server_default="USER"))
    op.execute("UPDATE snapshots SET type = 'TEMPLATE' WHERE template_id IS NOT NULL")


def downgrade() -> None:
    raise NotImplementedError

"""Records name artifacts by digest, not by path.

Snapshots written before this kept host paths in their manifest; their files were not moved
into the artifact store, so they cannot be restored: they become FAILED (and are deleted like any
FAILED snapshot). Sessions of that time are not found by the new host at start-up and end
TERMINATED with the reason.

Revision ID: 0002
Revises: 0001
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

REASON = "stored by an older tenki (files by path, not by digest); take a new snapshot"


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, files FROM snapshots WHERE state IN "
                                "('READY', 'CREATING')")).fetchall()
    for sid, files in rows:
        manifest = json.loads(files) if isinstance(files, str) else (files or {})
        if "shape" not in manifest:
            conn.execute(sa.text("UPDATE snapshots SET state = 'FAILED', state_reason = :r, "
                                 "files = '{}' WHERE id = :id"), {"r": REASON, "id": sid})
    conn.execute(sa.text("UPDATE snapshots SET files = '{}' WHERE state IN ('FAILED', "
                         "'DELETING', 'DELETED') AND CAST(files AS TEXT) NOT LIKE '%\"shape\"%'"))


def downgrade() -> None:
    raise NotImplementedError("artifacts by digest cannot be turned back into paths")

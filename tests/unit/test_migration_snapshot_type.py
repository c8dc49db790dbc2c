"""Migration 0006: snapshots gain ``type``; existing rows are back-filled (TEMPLATE where a
template or the server's golden snapshots own them, USER otherwise)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from tenkibox.store.db import MIGRATIONS, Store
from tenkibox.store.tables import SnapshotRow


def _upgrade(url: str, revision: str) -> None:
    engine = create_engine(url, future=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def test_existing_snapshots_get_their_type(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tenki.db'}"
    _upgrade(url, "0005")
    engine = create_engine(url, future=True)
    with engine.begin() as conn:
        for sid, template in (("snp_user", None), ("snp_tpl", "tpl_x"),
                              ("snp_golden", "golden:sandbox@abc/2x4096")):
            conn.execute(text(
                "INSERT INTO snapshots (id, session_id, workspace_id, template_id, state, "
                "base_image_id, cpu, memory_mb) VALUES (:id, 'ses_x', 'ws_x', :t, 'READY', "
                "'sandbox', 2, 4096)"), {"id": sid, "t": template})
    engine.dispose()
    store = Store(url)  # brings the schema to head
    try:
        types = {r.id: r.type for r in store.all(SnapshotRow)}
    finally:
        store.close()
    assert types == {"snp_user": "USER", "snp_tpl": "TEMPLATE", "snp_golden": "TEMPLATE"}

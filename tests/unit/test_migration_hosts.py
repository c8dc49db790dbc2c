"""Migration 0008: the ``hosts`` table; sessions and volumes name their host, and what existed
before ran on the embedded host (``local``): unfinished sessions and undeleted volumes say so,
ended ones name none."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from test_migration_snapshot_type import _upgrade

from tenkibox.store.db import Store
from tenkibox.store.tables import SessionRow, VolumeRow


def test_existing_sessions_and_volumes_are_on_the_local_host(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tenki.db'}"
    _upgrade(url, "0007")
    engine = create_engine(url, future=True)
    with engine.begin() as conn:
        for sid, state in (("ses_live", "READY"), ("ses_paused", "PAUSED"),
                           ("ses_done", "TERMINATED"), ("ses_failed", "FAILED")):
            conn.execute(text(
                "INSERT INTO sessions (id, workspace_id, state, cpu, memory_mb, base_image_id, "
                "created_at) VALUES (:id, 'ws_x', :s, 2, 4096, 'sandbox', '2026-01-01')"),
                {"id": sid, "s": state})
        for vid, state in (("vol_kept", "AVAILABLE"), ("vol_gone", "DELETED")):
            conn.execute(text(
                "INSERT INTO volumes (id, workspace_id, name, size_bytes, state, created_at) "
                "VALUES (:id, 'ws_x', 'v', 1048576, :s, '2026-01-01')"), {"id": vid, "s": state})
    engine.dispose()
    store = Store(url)  # brings the schema to head
    try:
        sessions = {r.id: r.host_id for r in store.all(SessionRow)}
        volumes = {r.id: r.host_id for r in store.all(VolumeRow)}
        assert "hosts" in inspect(store.engine).get_table_names()
    finally:
        store.close()
    assert sessions == {"ses_live": "local", "ses_paused": "local", "ses_done": None,
                        "ses_failed": None}
    assert volumes == {"vol_kept": "local", "vol_gone": None}

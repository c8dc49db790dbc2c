"""Renaming and extending sessions and snapshots over REST (the wire's UpdateSession,
ExtendSession and UpdateSnapshot run through the same control-plane calls)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from support.server import AUTH, InProcessServer


def _ready(client: httpx.Client) -> str:
    sid = client.post("/v1/sessions", json={"name": "a", "memory_mb": 512}).json()["id"]
    assert client.get(f"/v1/sessions/{sid}/wait", params={"timeout_s": 10}).json()["state"] \
        == "READY"
    return str(sid)


def test_session_rename_metadata_and_extend(inproc: InProcessServer) -> None:
    with httpx.Client(base_url=inproc.url, headers=AUTH, timeout=20) as c:
        sid = _ready(c)
        r = c.patch(f"/v1/sessions/{sid}", json={"name": "b", "metadata": {"k": "v"}})
        assert r.status_code == 200
        assert (r.json()["name"], r.json()["metadata"]) == ("b", {"k": "v"})
        assert c.patch(f"/v1/sessions/{sid}", json={}).json()["name"] == "b"  # left out: kept
        r = c.patch(f"/v1/sessions/{sid}", json={"name": "x" * 500})
        assert r.status_code == 422 and r.json()["error"]["field"] == "name"
        r = c.patch(f"/v1/sessions/{sid}", json={"state": "READY"})
        assert r.status_code == 422  # not a field one may set
        first = datetime.fromisoformat(c.post(f"/v1/sessions/{sid}/extend",
                                              json={"seconds": 300}).json()["expires_at"])
        assert timedelta(seconds=290) < first - datetime.now(UTC) <= timedelta(seconds=300)
        second = datetime.fromisoformat(c.post(f"/v1/sessions/{sid}/extend",
                                               json={"seconds": 60}).json()["expires_at"])
        assert second - first == timedelta(seconds=60)
        assert c.post(f"/v1/sessions/{sid}/extend", json={"seconds": 0}).status_code == 422
        assert c.delete(f"/v1/sessions/{sid}").json()["state"] == "TERMINATED"
        r = c.patch(f"/v1/sessions/{sid}", json={"name": "late"})
        assert r.status_code == 409 and "no longer" in r.json()["error"]["message"]
        assert c.patch("/v1/sessions/ses_doesnotexist0000", json={}).status_code == 404


def test_snapshot_rename_and_expiry(inproc: InProcessServer) -> None:
    with httpx.Client(base_url=inproc.url, headers=AUTH, timeout=20) as c:
        sid = _ready(c)
        snap = c.post("/v1/snapshots", json={"session_id": sid, "name": "one"}).json()
        later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        r = c.patch(f"/v1/snapshots/{snap['id']}", json={"name": "two", "expires_at": later})
        assert r.status_code == 200 and r.json()["name"] == "two"
        assert r.json()["expires_at"] is not None
        r = c.patch(f"/v1/snapshots/{snap['id']}", json={"expires_at": None})
        assert r.json()["expires_at"] is None and r.json()["name"] == "two"
        r = c.patch(f"/v1/snapshots/{snap['id']}", json={"expires_at": "2020-01-01T00:00:00Z"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "expires_at"
        c.delete(f"/v1/sessions/{sid}")


def test_an_update_on_a_stale_read_changes_nothing(inproc: InProcessServer) -> None:
    """``Records.update(when=...)``: the compare-and-set under ``extend`` (two control-plane
    processes extending at once must both count)."""
    from tenkibox.store.tables import SessionRow

    with httpx.Client(base_url=inproc.url, headers=AUTH, timeout=20) as c:
        sid = _ready(c)
        first = inproc.run(inproc.plane.sessions.extend(sid, 100)).expires_at
        assert first is not None
        stale = inproc.run(inproc.plane.records.update(
            SessionRow, sid, when={"expires_at": None}, expires_at=first))
        assert stale is False  # another actor set an expiry since: nothing is overwritten
        fresh = inproc.run(inproc.plane.records.update(
            SessionRow, sid, when={"expires_at": first}, expires_at=first + timedelta(seconds=5)))
        assert fresh is True
        after = inproc.run(inproc.plane.sessions.extend(sid, 10)).expires_at
        assert after is not None and (after - first).total_seconds() == 15
        c.delete(f"/v1/sessions/{sid}")

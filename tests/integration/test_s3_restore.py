"""A real server keeping its artifacts in S3 (``tenki serve --artifacts s3://...`` against the
``s3_server`` fixture's SeaweedFS): a snapshot's files are in the bucket once it is READY, and a
restore whose files are gone from the host's local cache fetches them from the bucket.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from support.s3server import S3Server

from tenkibox import errors

#: the environment of this module's server (conftest's ``tenki_server`` reads it), set from the
#: ``s3_server`` fixture before the server starts
SERVER_ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"it-{secrets.token_hex(6)}"


@pytest.fixture(scope="module")
def s3_env(s3_server: S3Server, prefix: str) -> None:
    SERVER_ENV.clear()
    SERVER_ENV.update({**s3_server.env(), "TENKI_GOLDEN": "off",
                       "TENKI_ARTIFACTS": f"s3://{s3_server.bucket}/{prefix}"})


@pytest.fixture(scope="module")
def s3_tenki(s3_env: None, tenki_server: Any) -> Any:
    """conftest's ``tenki_server``, started after ``s3_env`` (fixtures of one scope are set up
    in the order they are asked for)."""
    assert tenki_server.extra_env["TENKI_ARTIFACTS"].startswith("s3://")
    return tenki_server


@pytest.fixture(scope="module")
def client(s3_tenki: Any) -> Iterator[Any]:
    c = s3_tenki.client()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def snaps(client: Any) -> tuple[Any, Any]:
    """Two snapshots of one session with a file written (its session terminated)."""
    s = client.create_and_wait(name="s3-source", memory_mb=512, timeout=600)
    try:
        s.shell("echo from-the-bucket > /root/s3.txt && sync", timeout=60).check()
        first = client.create_snapshot_and_wait(s.id, "s3", timeout=600)
        second = client.create_snapshot_and_wait(s.id, "s3-to-corrupt", timeout=600)
    finally:
        s.terminate()
    return first, second


def test_a_snapshot_restores_from_the_bucket(s3_tenki: Any, s3_server: S3Server, prefix: str,
                                             client: Any, snaps: tuple[Any, Any]) -> None:
    snap = snaps[0]
    files = s3_tenki.artifacts(snap.id)
    bucket = s3_server.client()
    # READY: every file it needs is in the bucket, whole
    for kind, path in files.items():
        head = bucket.head_object(Bucket=s3_server.bucket, Key=f"{prefix}/sha256/{path.name}")
        assert head["Metadata"]["sha256"] == path.name, kind
        assert head["ContentLength"] == path.stat().st_size, kind
    # the host loses its copies of the snapshot's own files (the base image's stays: 1 GB)
    gone = {k: p for k, p in files.items() if k != "base"}
    for path in gone.values():
        path.unlink()
    r = client.create_and_wait(snapshot_id=snap.id, name="s3-copy", timeout=600)
    try:
        out = r.shell("cat /root/s3.txt", timeout=60).check().stdout.strip()
        assert out == "from-the-bucket"
    finally:
        r.terminate()
    for kind, path in gone.items():
        assert path.exists(), f"{kind} was not fetched back into the cache"
    log = s3_tenki.log_tail(200_000)
    assert "downloaded from s3://" in log
    assert s3_server.secret_key not in log


def test_a_corrupt_object_fails_the_restore(s3_tenki: Any, s3_server: S3Server, prefix: str,
                                            client: Any, snaps: tuple[Any, Any]) -> None:
    first, snap = snaps
    state = s3_tenki.artifacts(snap.id)["state"]
    assert state.name != s3_tenki.artifacts(first.id)["state"].name
    state.unlink()
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/sha256/{state.name}",
                                  Body=b"bit rot in the bucket")
    before = {x.id for x in client.list()}
    with pytest.raises(errors.SnapshotFailedError,
                       match=f"device state {state.name[:12]} is corrupt in s3://"):
        client.create_and_wait(snapshot_id=snap.id, timeout=300)
    got = client.get_snapshot(snap.id)
    assert got.state.value == "FAILED" and "damaged in storage" in (got.state_reason or "")
    assert not state.exists()  # nothing unverified reached the cache
    assert {x.id for x in client.list()} == before

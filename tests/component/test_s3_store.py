"""``S3ArtifactStore`` against a real S3 server (SeaweedFS, the ``s3_server`` fixture): every test
has a prefix of its own in the one bucket, and stores with caches of their own stand for hosts."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.s3server import S3Server
from support.s3server import load as s3_load
from support.s3server import up as s3_up

from tenkibox.artifacts.s3 import S3ArtifactStore, S3Location
from tenkibox.artifacts.store import ArtifactCorrupt, ArtifactMissing, ArtifactStore
from tenkibox.errors import InternalError

MiB = 1 << 20


def location(server: S3Server, prefix: str, **kw: Any) -> S3Location:
    return S3Location.parse(f"s3://{server.bucket}/{prefix}", endpoint=server.endpoint,
                            region=server.region, access_key=server.access_key,
                            secret_key=server.secret_key, **kw)


@pytest.fixture
def prefix() -> str:
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def make_store(s3_server: S3Server, prefix: str, tmp_path: Path
               ) -> Callable[..., S3ArtifactStore]:
    made = 0

    def make(**kw: Any) -> S3ArtifactStore:
        nonlocal made
        made += 1
        return S3ArtifactStore(tmp_path / f"host{made}", location(s3_server, prefix), **kw)
    return make


def requests_of(store: S3ArtifactStore) -> list[str]:
    """The S3 operations the store's client sends from now on, by name."""
    seen: list[str] = []
    store.client.meta.events.register(
        "before-call.s3", lambda model, **_: seen.append(model.name))
    return seen


def write(path: Path, data: bytes) -> tuple[Path, str]:
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_the_store_keeps_to_the_protocol(make_store: Callable[..., S3ArtifactStore]) -> None:
    store: ArtifactStore = make_store()  # mypy checks the protocol here
    assert store.strays() == []


def test_put_uploads_and_another_host_downloads_verified(
        make_store: Callable[..., S3ArtifactStore], s3_server: S3Server, prefix: str,
        tmp_path: Path) -> None:
    a, b = make_store(), make_store()
    src, digest = write(tmp_path / "f", os.urandom(100_000))
    assert not a.has(digest)
    assert a.put(src) == digest
    assert src.exists()  # not moved
    assert a.has(digest) and b.has(digest)
    assert a.size(digest) == b.size(digest) == a.allocated(digest) == 100_000
    head = s3_server.client().head_object(Bucket=s3_server.bucket,
                                          Key=f"{prefix}/sha256/{digest}")
    assert head["Metadata"]["sha256"] == digest
    # A keeps it in its cache; B fetches it on first use, verified
    assert a.cache.has(digest) and not b.cache.has(digest)
    seen = requests_of(b)
    path = b.local_path(digest)
    assert path.read_bytes() == src.read_bytes()
    assert "GetObject" in seen
    b.verify(digest)
    b.verify(digest, deep=True)
    assert [(e.digest, e.size_bytes) for e in b.entries()] == [(digest, 100_000)]
    assert b.strays() == []


def test_a_put_of_what_the_bucket_has_does_not_upload_again(
        make_store: Callable[..., S3ArtifactStore], tmp_path: Path) -> None:
    a, b = make_store(), make_store()
    src, digest = write(tmp_path / "f", os.urandom(50_000))
    seen_a = requests_of(a)
    a.put(src, digest=digest)
    assert seen_a.count("PutObject") == 1
    a.put(src, digest=digest)
    seen_b = requests_of(b)
    moved = tmp_path / "g"
    moved.write_bytes(src.read_bytes())
    assert b.put(moved, move=True) == digest
    assert not moved.exists()  # moved into B's cache
    assert seen_a.count("PutObject") == 1
    assert "PutObject" not in seen_b and "CreateMultipartUpload" not in seen_b
    assert b.cache.local_path(digest).read_bytes() == src.read_bytes()


def test_a_large_file_goes_in_parts_and_comes_back_whole(
        make_store: Callable[..., S3ArtifactStore], tmp_path: Path) -> None:
    a = make_store(multipart_threshold=5 * MiB, multipart_chunk=5 * MiB)
    b = make_store(multipart_threshold=5 * MiB, multipart_chunk=5 * MiB)
    src, digest = write(tmp_path / "big", os.urandom(11 * MiB + 17))
    seen = requests_of(a)
    a.put(src, digest=digest)
    assert seen.count("CreateMultipartUpload") == 1 and seen.count("UploadPart") == 3
    assert "CompleteMultipartUpload" in seen and "PutObject" not in seen
    assert b.local_path(digest).read_bytes() == src.read_bytes()
    assert b.size(digest) == 11 * MiB + 17


def test_a_wrong_digest_is_refused_by_the_server(
        make_store: Callable[..., S3ArtifactStore], tmp_path: Path) -> None:
    a = make_store()
    src, _ = write(tmp_path / "f", b"real content")
    lie = hashlib.sha256(b"other content").hexdigest()
    with pytest.raises(ArtifactCorrupt) as err:
        a.put(src, digest=lie)
    assert err.value.__cause__ is not None
    assert not a.has(lie) and not a.cache.has(lie)


def test_a_corrupt_object_is_found_on_download(
        make_store: Callable[..., S3ArtifactStore], s3_server: S3Server, prefix: str,
        tmp_path: Path) -> None:
    a, b = make_store(), make_store()
    src, digest = write(tmp_path / "f", os.urandom(30_000))
    a.put(src)
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/sha256/{digest}",
                                  Body=b"bit rot")
    with pytest.raises(ArtifactCorrupt, match="corrupt"):
        b.local_path(digest)
    assert b.damaged({digest: "RAM image"}) != {}
    assert "RAM image" in b.damaged({digest: "RAM image"})[digest]
    assert not b.cache.has(digest)
    assert list(b.cache.objects.iterdir()) == []  # no temporary left behind


def test_a_deep_verify_downloads_nothing(make_store: Callable[..., S3ArtifactStore],
                                         s3_server: S3Server, prefix: str,
                                         tmp_path: Path) -> None:
    a, b = make_store(), make_store()
    src, digest = write(tmp_path / "f", os.urandom(10_000))
    a.put(src)
    seen = requests_of(b)
    b.verify(digest, deep=True)
    assert "GetObject" not in seen and not b.cache.has(digest)
    a.verify(digest, deep=True)  # its copy re-hashed
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/sha256/{digest}")
    with pytest.raises(ArtifactMissing, match="missing from s3://"):
        b.verify(digest, deep=True)
    with pytest.raises(ArtifactMissing):
        a.verify(digest, deep=True)  # a cached copy does not hide a lost object


def test_eviction_never_guesses_what_is_in_use(make_store: Callable[..., S3ArtifactStore],
                                               tmp_path: Path) -> None:
    def changing() -> set[str]:
        raise RuntimeError("dictionary changed size during iteration")
    a = make_store(cache_bytes=1, in_use=changing)
    a.recent_s = 0.0
    digest = a.put(write(tmp_path / "f", b"x" * 5000)[0])
    a.put(write(tmp_path / "g", b"y" * 5000)[0])
    assert a.cache.has(digest)


def test_a_missing_object(make_store: Callable[..., S3ArtifactStore]) -> None:
    a = make_store()
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not a.has(digest)
    assert a.size(digest) == 0 and a.allocated(digest) == 0
    with pytest.raises(ArtifactMissing):
        a.local_path(digest)
    with pytest.raises(ArtifactMissing, match="disk layer"):
        a.verify(digest, "disk layer")
    with pytest.raises(ArtifactMissing):
        a.local_path("../../etc/passwd")
    assert not a.has("not-a-digest")


def test_a_damaged_cache_copy_is_fetched_again(
        make_store: Callable[..., S3ArtifactStore], tmp_path: Path) -> None:
    a = make_store()
    data = os.urandom(20_000)
    src, digest = write(tmp_path / "f", data)
    a.put(src)
    cached = a.cache.local_path(digest)
    cached.chmod(0o644)
    cached.write_bytes(b"x" + data[1:])
    a.verify(digest)
    assert a.local_path(digest).read_bytes() == data


def test_delete_and_collect_work_on_the_bucket(
        make_store: Callable[..., S3ArtifactStore], tmp_path: Path) -> None:
    a, b = make_store(), make_store()
    d = [a.put(write(tmp_path / f"f{i}", os.urandom(1000 + i))[0]) for i in range(3)]
    b.local_path(d[0])
    assert a.delete(d[0]) == 1000
    assert not a.has(d[0]) and not a.cache.has(d[0])
    assert a.delete(d[0]) == 0  # idempotent
    assert a.collect({d[1]}, grace_s=3600) == 0  # all younger than the grace
    assert a.collect({d[1]}, grace_s=0) == 1002
    assert {e.digest for e in a.entries()} == {d[1]}
    assert not a.cache.has(d[2]) and a.cache.has(d[1])
    # B's copy of an object gone from the bucket goes at its own collection
    b.collect({d[1]}, grace_s=0)
    assert not b.cache.has(d[0])


def test_the_cache_is_bounded_and_spares_what_is_in_use(
        make_store: Callable[..., S3ArtifactStore], tmp_path: Path) -> None:
    in_use: set[str] = set()
    a = make_store(cache_bytes=250_000, in_use=lambda: in_use)
    a.recent_s = 0.0
    digests = []
    for i in range(4):
        digests.append(a.put(write(tmp_path / f"f{i}", os.urandom(100_000))[0]))
        if i == 0:
            in_use.add(digests[0])
        time.sleep(0.01)
    cached = set(a.cached())
    assert sum(a.cached().values()) <= 250_000 + 4096 * 4
    assert digests[0] in cached  # in use: never evicted
    assert digests[3] in cached  # just put
    assert digests[1] not in cached  # the least recently used
    # an evicted artifact is still in the bucket: fetched again when needed
    assert a.has(digests[1])
    assert a.local_path(digests[1]).stat().st_size == 100_000
    assert digests[0] in a.cached()
    # used recently: spared even over the budget
    b = make_store(cache_bytes=1)
    for d in digests:
        b.local_path(d)
    assert set(b.cached()) == set(digests)


def test_strays_are_the_caches_temporaries(make_store: Callable[..., S3ArtifactStore]) -> None:
    a = make_store()
    tmp = a.temp_path()
    tmp.write_bytes(b"a crashed capture's")
    assert a.strays() == [tmp]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_errors_are_translated_without_secrets(s3_server: S3Server, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    unreachable = S3Location.parse("s3://tenki", endpoint=f"http://127.0.0.1:{_closed_port()}",
                                   access_key="AKID", secret_key="sekrit-value", max_attempts=2)
    store = S3ArtifactStore(tmp_path / "a", unreachable)
    for call in (store.check, lambda: store.has(digest), store.entries,
                 lambda: store.local_path(digest)):
        with pytest.raises(InternalError) as err:
            call()
        assert "could not connect" in err.value.message.lower()
        assert err.value.__cause__ is not None
        assert "sekrit" not in err.value.message
    assert "sekrit" not in repr(unreachable)
    wrong = S3Location.parse(f"s3://{s3_server.bucket}", endpoint=s3_server.endpoint,
                             access_key=s3_server.access_key, secret_key="sekrit-value",
                             max_attempts=1)
    with pytest.raises(InternalError) as err:
        S3ArtifactStore(tmp_path / "b", wrong).check()
    assert "sekrit" not in err.value.message and s3_server.secret_key not in err.value.message
    no_bucket = S3Location.parse("s3://no-such-bucket", endpoint=s3_server.endpoint,
                                 access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key)
    with pytest.raises(InternalError, match="no-such-bucket"):
        S3ArtifactStore(tmp_path / "c", no_bucket).check()


def test_the_server_fixture_is_authenticated_and_up_is_idempotent(s3_server: S3Server) -> None:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    again = s3_up(Path(s3_server.dir))
    assert (again.pid, again.endpoint) == (s3_server.pid, s3_server.endpoint)
    anonymous = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                             config=Config(signature_version=UNSIGNED))
    with pytest.raises(ClientError):
        anonymous.list_objects_v2(Bucket=s3_server.bucket)


def test_a_host_with_a_bucket_keeps_its_artifacts_there(s3_server: S3Server, prefix: str,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tenkibox.config import Layout
    from tenkibox.host.local import LocalHost

    monkeypatch.setenv("TENKI_RUN_ROOT", str(tmp_path / "run"))  # not the machine's /dev/shm

    host = LocalHost(Layout(tmp_path / "home"), "tcg", artifacts=location(s3_server, prefix),
                     artifact_cache_bytes=10 * MiB)
    store = host.store
    assert isinstance(store, S3ArtifactStore)
    assert store.cache_bytes == 10 * MiB and store.cache.root == host.paths.artifacts
    src, digest = write(tmp_path / "f", b"layer")
    store.put(src)
    assert set(store.in_use()) == set()  # no VM: nothing pinned
    assert {e.digest for e in S3ArtifactStore(tmp_path / "other",
                                              location(s3_server, prefix)).entries()} == {digest}


def test_serve_with_an_unreachable_bucket_fails_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "TENKI_HOME": str(tmp_path / "home"),
           "TENKI_RUN_ROOT": str(tmp_path / "run"), "AWS_ACCESS_KEY_ID": "AKID",
           "AWS_SECRET_ACCESS_KEY": "sekrit-value", "TENKI_LOG_LEVEL": "WARNING"}
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from tenkibox.cli.main import main; "
         "sys.argv[0] = 'tenki'; main()", "serve", "--grpc-port", "-1",
         "--artifacts", "s3://bkt/p", "--s3-endpoint", f"http://127.0.0.1:{_closed_port()}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    err = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "s3://bkt/p" in err[0] and "could not connect" in err[0].lower()
    assert "Traceback" not in run.stderr and "sekrit" not in run.stderr + run.stdout
    bad = subprocess.run(
        [sys.executable, "-c", "import sys; from tenkibox.cli.main import main; "
         "sys.argv[0] = 'tenki'; main()", "serve", "--artifacts", "bucket"],
        env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "s3://BUCKET" in bad.stderr


def test_scripts_s3_up_env_down(tmp_path: Path) -> None:
    """``scripts/s3``: up prints exports (and again when it runs), env repeats them, down stops
    it and leaves no socket behind."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "s3"
    env = {**os.environ, "TENKI_PYTHON": sys.executable}
    d = tmp_path / "s3"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args, "--dir", str(d)], env=env,
                              capture_output=True, text=True, timeout=180)
    try:
        first = run("up")
        assert first.returncode == 0, first.stderr
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in first.stdout.splitlines())
        assert exports["TENKI_ARTIFACTS"] == "s3://tenki"
        assert exports["TENKI_S3_ENDPOINT"].startswith("http://127.0.0.1:")
        assert run("up").stdout == first.stdout == run("env").stdout
        for name in ("s3.json", "s3-identities.json"):
            assert (d / name).stat().st_mode & 0o077 == 0
        server = s3_load(d)
        assert server is not None
    finally:
        down = run("down")
    assert down.returncode == 0 and "stopped" in down.stderr
    assert run("env").returncode == 1
    assert not Path(f"/proc/{server.pid}").exists()
    sockets = [Path(f"/tmp/seaweedfs-{c}-grpc-{server.ports[c + '.grpc']}.sock")
               for c in ("master", "volume", "filer", "s3")]
    assert not any(p.exists() for p in sockets)

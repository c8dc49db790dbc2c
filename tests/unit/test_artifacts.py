"""The artifact store (files by sha256 digest), the verified-key records that spare re-hashing,
and the RAM cache unpacked from stored RAM images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenkibox.artifacts import digests, ramfile
from tenkibox.artifacts import store as store_mod
from tenkibox.artifacts.digests import VerifiedKeys, sha256_file, stat_key
from tenkibox.artifacts.store import ArtifactCorrupt, ArtifactMissing, LocalArtifactStore
from tenkibox.host.api import CacheScrub
from tenkibox.host.ramcache import RamCache, content_digest, image_content_digest

MiB = 1 << 20
SHM = Path("/dev/shm")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def flip_byte(path: Path, offset: int) -> None:
    """Damage one byte through the file system and put the old mtime back (as ``touch -d``
    would): only the ctime tells."""
    st = os.stat(path)
    mode = st.st_mode & 0o7777
    os.chmod(path, mode | 0o200)
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)
    os.chmod(path, mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    path = SHM / f"tenki-test-{os.getpid()}-{os.urandom(4).hex()}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- put -----------------------------------------------------------------------------------------


def test_put_hashes_links_and_seals(store: LocalArtifactStore, tmp_path: Path) -> None:
    data = b"layer" * 1000
    src = write(tmp_path / "work" / "top-0.qcow2", data)
    d = store.put(src)
    assert d == sha(data) and store.has(d)
    dest = store.local_path(d)
    assert dest == store.objects / d and dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o444
    # same file system: a hard link (a frozen layer stays open in its VM under its old name)
    assert dest.stat().st_ino == src.stat().st_ino and src.exists()
    assert store.size(d) == len(data)
    store.verify(d)
    assert [e.digest for e in store.entries()] == [d] and store.strays() == []


def test_put_with_a_given_digest_does_not_hash(store: LocalArtifactStore, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(4096)
    src = write(tmp_path / "ram.zst", data)

    def no_hashing(_: Path) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(store_mod, "sha256_file", no_hashing)
    assert store.put(src, digest=sha(data)) == sha(data)
    store.verify(sha(data))  # its key was remembered at the put: no read
    monkeypatch.undo()
    store.verify(sha(data), deep=True)
    # the caller vouches for a given digest; a deep verify catches a false one
    lie = "0" * 64
    store.put(write(tmp_path / "other", b"other"), digest=lie)
    store.verify(lie)
    with pytest.raises(ArtifactCorrupt):
        store.verify(lie, deep=True)


def test_put_move_renames_on_the_same_file_system(store: LocalArtifactStore) -> None:
    tmp = store.temp_path()
    assert tmp.parent == store.objects and tmp.name.startswith(".")
    write(tmp, b"state")
    ino = tmp.stat().st_ino
    d = store.put(tmp, move=True)
    assert not tmp.exists() and store.local_path(d).stat().st_ino == ino
    assert store.strays() == []


def test_put_across_file_systems_copies(store: LocalArtifactStore, shm_dir: Path) -> None:
    assert os.stat(shm_dir).st_dev != os.stat(store.objects).st_dev
    kept = write(shm_dir / "state.bin", b"device state")
    d = store.put(kept)
    assert kept.exists() and store.local_path(d).read_bytes() == b"device state"
    assert store.local_path(d).stat().st_ino != kept.stat().st_ino
    moved = write(shm_dir / "ram", b"ram" * 10000)
    d2 = store.put(moved, move=True)
    assert not moved.exists() and store.local_path(d2).read_bytes() == b"ram" * 10000
    assert store.local_path(d2).stat().st_mode & 0o777 == 0o444
    assert store.strays() == []
    store.verify(d2, deep=True)


def test_put_of_a_read_only_source(store: LocalArtifactStore, tmp_path: Path) -> None:
    src = write(tmp_path / "base.qcow2", b"base")
    os.chmod(src, 0o444)
    assert store.put(src) == sha(b"base")


def test_put_again_is_idempotent(store: LocalArtifactStore, tmp_path: Path) -> None:
    data = b"same bytes"
    d = store.put(write(tmp_path / "a", data))
    dest = store.local_path(d)
    age(dest, 3600)
    old_ino = dest.stat().st_ino
    again = write(tmp_path / "b", data)
    assert store.put(again, move=True) == d
    assert not again.exists()  # moved: the duplicate is gone
    assert dest.stat().st_ino == old_ino and dest.read_bytes() == data
    assert time.time() - dest.stat().st_mtime < 60  # stored again: its time moved
    assert len(store.entries()) == 1
    third = write(tmp_path / "c", data)
    assert store.put(third) == d and third.exists()
    store.verify(d)


def test_local_path_refuses_what_is_not_a_digest(store: LocalArtifactStore) -> None:
    for bad in ("../../etc/passwd", "A" * 64, "0" * 63, ""):
        with pytest.raises(ArtifactMissing):
            store.local_path(bad)
    assert not store.has("f" * 64) and store.size("f" * 64) == 0


# -- verify ----------------------------------------------------------------------------------------


def test_verify_a_missing_artifact(store: LocalArtifactStore) -> None:
    d = sha(b"never stored")
    with pytest.raises(ArtifactMissing) as info:
        store.verify(d, "RAM image")
    assert "RAM image" in info.value.message and d[:12] in info.value.message
    assert info.value.digest == d and info.value.kind == "RAM image"


def test_verify_finds_corruption(store: LocalArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    d = store.put(write(tmp_path / "layer", data))
    store.verify(d)
    flip_byte(store.local_path(d), 1000)  # mtime put back: the ctime moved
    with pytest.raises(ArtifactCorrupt) as info:
        store.verify(d, "disk layer 1")
    assert "disk layer 1" in info.value.message and d[:12] in info.value.message
    assert info.value.kind == "disk layer 1"
    with pytest.raises(ArtifactCorrupt):  # stays found (nothing remembered it as good)
        store.verify(d)


def test_verify_deep_reads_what_the_stat_cannot_see(store: LocalArtifactStore,
                                                    tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    d = store.put(write(tmp_path / "layer", data))
    path = store.local_path(d)
    flip_byte(path, 5)
    # bit rot below the file system keeps the stat key: simulate by vouching for the new key
    store.keys.remember(path, d)
    store.verify(d)  # trusted: the key did not move
    with pytest.raises(ArtifactCorrupt):
        store.verify(d, deep=True)
    with pytest.raises(ArtifactCorrupt):  # and no longer trusted after that
        store.verify(d)


def test_verified_keys_survive_a_restart(store: LocalArtifactStore, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d = store.put(write(tmp_path / "base", os.urandom(8192)))
    hashed: list[Path] = []

    def counting(path: Path) -> str:
        hashed.append(path)
        return sha256_file(path)

    monkeypatch.setattr(store_mod, "sha256_file", counting)
    again = LocalArtifactStore(store.root)
    again.verify(d)
    assert hashed == []
    os.utime(again.local_path(d))  # looks changed: read once, then trusted again
    again.verify(d)
    again.verify(d)
    assert hashed == [again.local_path(d)]
    again.verify(d, deep=True)
    assert len(hashed) == 2


# -- VerifiedKeys ----------------------------------------------------------------------------------


def test_verified_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "f", b"hello")
    keys = VerifiedKeys(tmp_path / "keys")
    assert keys.known(f) is None and keys.known(tmp_path / "missing") is None
    keys.remember(f, sha(b"hello"))
    assert keys.known(f) == sha(b"hello")
    assert VerifiedKeys(tmp_path / "keys").known(f) == sha(b"hello")  # on disk
    key = stat_key(f)
    assert key.count(":") == 4
    write(f, b"HELLO")
    assert keys.known(f) is None and VerifiedKeys(tmp_path / "keys").known(f) is None
    reads: list[Path] = []
    real = digests.sha256_file

    def counting(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(digests, "sha256_file", counting)
    fresh = VerifiedKeys(tmp_path / "keys")
    assert fresh.digest(f) == sha(b"HELLO")
    assert VerifiedKeys(tmp_path / "keys").digest(f) == sha(b"HELLO")
    assert reads == [f]
    fresh.forget(f)
    assert fresh.known(f) is None and VerifiedKeys(tmp_path / "keys").known(f) is None
    assert list((tmp_path / "keys").iterdir()) == []
    # a damaged record is no record
    keys.remember(f, sha(b"HELLO"))
    for rec in (tmp_path / "keys").iterdir():
        rec.write_text("garbage")
    assert VerifiedKeys(tmp_path / "keys").known(f) is None


# -- collect -----------------------------------------------------------------------------------


def test_collect(store: LocalArtifactStore, tmp_path: Path) -> None:
    used = store.put(write(tmp_path / "used", b"used" * 2000))
    unused = store.put(write(tmp_path / "unused", b"unused" * 2000))
    fresh = store.put(write(tmp_path / "fresh", b"fresh"))
    crashed = write(store.temp_path(), b"half a put")
    age(crashed, 3600)
    writing = write(store.temp_path(), b"a put under way")
    records = len(list((store.root / ".verified").iterdir()))
    # recently stored: spared by the grace (a capture stores before its record names it)
    assert store.collect({used}, grace_s=3600) == 0
    assert all(store.has(d) for d in (used, unused, fresh))
    assert not crashed.exists() and writing.exists()
    freed = store.collect({used, fresh}, grace_s=0)
    assert freed > 0
    assert store.has(used) and store.has(fresh) and not store.has(unused)
    assert len(list((store.root / ".verified").iterdir())) == records - 1
    assert store.collect([], grace_s=0) > 0
    assert store.entries() == [] and store.strays() == [writing]


def test_collect_removes_crashed_verified_key_temporaries(store: LocalArtifactStore,
                                                          tmp_path: Path) -> None:
    """A verified-key record is written to ``.verified/.<name>.<rand>.tmp`` and renamed: a
    writer that died in between leaves the temporary, which collect removes once it is old
    enough that no writer can still rename it."""
    d = store.put(write(tmp_path / "kept", b"kept"))
    records = sorted(store.keys.directory.iterdir())
    crashed = write(store.keys.directory / f".{records[0].name}.0badc0de.tmp", b"1:2 x")
    age(crashed, 3600)
    writing = write(store.keys.directory / f".{records[0].name}.feedf00d.tmp", b"1:2 y")
    assert sorted(store.strays()) == sorted([crashed, writing])
    store.collect({d})
    assert not crashed.exists() and writing.exists()
    assert sorted(store.keys.directory.iterdir()) == sorted([*records, writing])
    assert store.has(d) and store.keys.known(store.local_path(d)) == d


def test_stored_at_is_when_it_entered_the_store(store: LocalArtifactStore,
                                                tmp_path: Path) -> None:
    """A hard link keeps the source's old mtime; the grace counts from the put (ctime)."""
    src = write(tmp_path / "image.qcow2", b"image")
    age(src, 86400)
    d = store.put(src)
    (info,) = store.entries()
    assert info.digest == d and time.time() - info.stored_at < 60
    assert store.collect(set()) == 0 and store.has(d)


# -- RAM cache ---------------------------------------------------------------------------------


def sparse_ram(path: Path, size: int = 16 * MiB) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in {0: b"boot" * 1000, 3 * MiB + 17: os.urandom(2 * MiB),
                          size - 4096: b"\xff" * 4096}.items():
            os.pwrite(f.fileno(), data, off)
    return path.read_bytes()


@pytest.fixture
def ram(store: LocalArtifactStore, tmp_path: Path) -> tuple[RamCache, str, bytes]:
    src = tmp_path / "guest-ram"
    content = sparse_ram(src)
    packed = store.temp_path()
    _, _, digest = ramfile.pack(src, packed)
    assert store.put(packed, digest=digest, move=True) == digest
    return RamCache(tmp_path / "ram-cache", store), digest, content


async def test_ram_cache_is_built_from_the_stored_image(
        ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, content = ram
    path = await cache.ensure(d)
    assert path == cache.path(d) and path.read_bytes() == content
    assert path.stat().st_blocks * 512 < 8 * MiB  # sparse
    meta = json.loads((cache.root / f"{d}.meta").read_text())
    assert meta == {"key": stat_key(path)}
    ino = path.stat().st_ino
    assert await cache.ensure(d) == path and path.stat().st_ino == ino  # not rebuilt
    assert cache.scrub(repair=True) == CacheScrub()
    assert path.stat().st_ino == ino


async def test_the_image_says_what_its_cache_must_hold(
        ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, _ = ram
    path = await cache.ensure(d)
    assert image_content_digest(cache.store.local_path(d)) == content_digest(path)
    flip_byte(path, 5 * MiB + 3)
    assert image_content_digest(cache.store.local_path(d)) != content_digest(path)


async def test_a_damaged_ram_cache_is_rebuilt(ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, content = ram
    path = await cache.ensure(d)
    flip_byte(path, 3 * MiB + 100)
    assert path.read_bytes() != content
    await cache.ensure(d)
    assert path.read_bytes() == content
    # a touch moves the key: the cache is not trusted, it is built again (a new file)
    ino = path.stat().st_ino
    os.utime(path)
    await cache.ensure(d)
    assert path.stat().st_ino != ino and path.read_bytes() == content
    assert json.loads((cache.root / f"{d}.meta").read_text())["key"] == stat_key(path)


async def test_scrub_finds_what_the_stat_cannot_see(ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, content = ram
    path = await cache.ensure(d)
    meta = cache.root / f"{d}.meta"
    flip_byte(path, 17)
    info = json.loads(meta.read_text())
    info["key"] = stat_key(path)  # bit rot: the stat key did not move
    meta.write_text(json.dumps(info))
    assert (await cache.ensure(d)).read_bytes() != content  # trusted on its key
    assert cache.scrub(repair=True) == CacheScrub(rebuilt=[d])
    assert path.read_bytes() == content
    assert cache.scrub(repair=True) == CacheScrub()


async def test_scrub_without_repair_reports_and_distrusts_but_does_not_rebuild(
        ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, content = ram
    path = await cache.ensure(d)
    meta = cache.root / f"{d}.meta"
    flip_byte(path, 17)
    info = json.loads(meta.read_text())
    info["key"] = stat_key(path)  # bit rot: the stat key did not move
    meta.write_text(json.dumps(info))
    ino = path.stat().st_ino
    found = cache.scrub(repair=False)
    assert found.rebuilt == [] and list(found.damaged) == [d]
    assert found.damaged[d].startswith(f"RAM cache {d[:12]} does not match its RAM image")
    assert path.stat().st_ino == ino and path.read_bytes() != content  # left as it was
    assert list(cache.scrub(repair=False).damaged) == [d]  # still damaged, still said
    # but no restore maps it: the next one rebuilds it first
    assert (await cache.ensure(d)).read_bytes() == content
    assert cache.scrub(repair=False) == CacheScrub()


async def test_a_ram_cache_that_cannot_be_rebuilt_is_not_trusted_again(
        ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, _ = ram
    path = await cache.ensure(d)
    meta = cache.root / f"{d}.meta"
    flip_byte(path, 17)
    info = json.loads(meta.read_text())
    info["key"] = stat_key(path)
    meta.write_text(json.dumps(info))
    flip_byte(cache.store.local_path(d), 40)  # the stored image is damaged too
    found = cache.scrub(repair=True)
    assert found.rebuilt == [] and list(found.damaged) == [d]  # nothing could be rebuilt
    assert "could not be rebuilt" in found.damaged[d]
    assert not path.exists() and not meta.exists()
    with pytest.raises(ArtifactCorrupt):
        await cache.ensure(d)  # never the damaged cache


async def test_the_cache_of_a_deleted_ram_image_is_not_damaged_only_unvouched(
        ram: tuple[RamCache, str, bytes]) -> None:
    """A snapshot's deletion removes its RAM image at once; its cache waits for the
    collector's grace. The scrub in between must not call it damaged (CI saw exactly that), and
    nothing may map it on its old key."""
    cache, d, _ = ram
    path = await cache.ensure(d)
    cache.store.delete(d)
    for repair in (False, True):
        assert cache.scrub(repair=repair) == CacheScrub()
    assert path.exists() and not (cache.root / f"{d}.meta").exists()
    with pytest.raises(ArtifactMissing):
        await cache.ensure(d)
    assert cache.collect(set(), grace_s=0) > 0 and list(cache.root.iterdir()) == []


async def test_a_damaged_ram_image_is_never_unpacked(ram: tuple[RamCache, str, bytes]) -> None:
    cache, d, _ = ram
    flip_byte(cache.store.local_path(d), 40)
    with pytest.raises(ArtifactCorrupt):
        await cache.ensure(d)
    assert not cache.path(d).exists()
    assert [p for p in cache.root.iterdir()] == []  # no temporary left either


async def test_ram_cache_collect(ram: tuple[RamCache, str, bytes], tmp_path: Path) -> None:
    cache, d, _ = ram
    await cache.ensure(d)
    crashed = write(cache.root / f".{d}.ram.1234.tmp", b"half")
    age(crashed, 3600)
    assert cache.collect({d}, grace_s=0) == 0
    assert cache.path(d).exists() and (cache.root / f"{d}.meta").exists()
    assert not crashed.exists()
    assert cache.collect(set()) == 0  # built just now: within the grace
    assert cache.collect(set(), grace_s=0) > 0
    assert list(cache.root.iterdir()) == []
    cache.clear_temporaries()
    RamCache(tmp_path / "nowhere", cache.store).clear_temporaries()
    assert RamCache(tmp_path / "nowhere", cache.store).collect(set()) == 0


def test_cache_content_digest_counts_a_chunk_with_two_extents_once(tmp_path: Path) -> None:
    """Two data extents inside one chunk (a hole between them) are one chunk, as when the RAM
    image is hashed; the scrub must not find such a cache damaged."""
    from tenkibox.host import ramcache

    path = tmp_path / "cache"
    with open(path, "wb") as f:
        f.truncate(4 * ramcache.CHUNK)
        f.seek(4096)
        f.write(b"a" * 4096)
        f.seek(64 * 4096)
        f.write(b"b" * 4096)
    hasher = ramcache._ChunkHasher(4 * ramcache.CHUNK)
    hasher.add(4096, b"a" * 4096)
    hasher.add(64 * 4096, b"b" * 4096)
    assert ramcache.content_digest(path) == hasher.hexdigest()

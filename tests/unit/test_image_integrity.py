"""A boot uses the image's files only as its build recorded them (``image.json``'s ``sha256``):
``HostContext.image_artifacts`` stores them under those digests and verifies the stored copies
with the store's own rules; a damaged file refuses the boot naming it. Small real files, a real
store; no VM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from support.images import CONTENT, DIGESTS, flip_byte, write_image

from tenkibox.artifacts import store as store_mod
from tenkibox.artifacts.store import LocalArtifactStore
from tenkibox.config import Layout
from tenkibox.host import context as context_mod
from tenkibox.host.api import ImageDamagedError
from tenkibox.host.context import HostContext
from tenkibox.host.ramcache import RamCache
from tenkibox.host.vm import HostLayout
from tenkibox.images import builder


def make_ctx(home: Path) -> HostContext:
    paths = HostLayout(Layout(home)).ensure()
    store = LocalArtifactStore(paths.artifacts)
    network: Any = None  # no boot runs here: only the image step
    return HostContext(paths, store, RamCache(paths.ram_cache, store), "tcg", network)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def recorded() -> tuple[str, str, str]:
    return DIGESTS["disk"], DIGESTS["kernel"], DIGESTS["initrd"]


def test_boot_stores_the_files_under_their_recorded_digests(home: Path) -> None:
    write_image(home)
    ctx = make_ctx(home)
    assert ctx.image_digests == set(recorded())  # kept from the GC before the first boot
    disk, kernel, initrd, cmdline = ctx.image_artifacts("sandbox")
    assert (disk, kernel, initrd) == recorded() and cmdline == builder.BOOT_CMDLINE
    assert sorted(e.digest for e in ctx.store.entries()) == sorted(recorded())
    assert ctx.store.local_path(disk).read_bytes() == CONTENT["disk"]


def test_a_file_damaged_before_it_was_stored_refuses_the_boot(home: Path) -> None:
    d = write_image(home)
    flip_byte(d / builder.DISK_FILE, 1000)
    ctx = make_ctx(home)
    with pytest.raises(ImageDamagedError) as err:
        ctx.image_artifacts("sandbox")
    # named by its path in the data directory (the message reaches API clients)
    assert f"its disk {(d / builder.DISK_FILE).relative_to(home)} is damaged" in err.value.message
    assert str(home) not in err.value.message
    assert f"its build recorded {recorded()[0][:12]}" in err.value.message
    # its new content is not stored under the digest it hashes to now (as a boot once did)
    assert recorded()[0] not in {e.digest for e in ctx.store.entries()}
    assert hashlib.sha256((d / builder.DISK_FILE).read_bytes()).hexdigest() not in {
        e.digest for e in ctx.store.entries()}


@pytest.mark.parametrize("kind", ["disk", "kernel", "initrd"])
def test_a_stored_file_damaged_since_refuses_the_boot(home: Path, kind: str) -> None:
    d = write_image(home)
    ctx = make_ctx(home)
    ctx.image_artifacts("sandbox")
    digest = DIGESTS[kind]
    # the image's file is the stored copy (a hard link): damage to one is damage to both
    flip_byte(ctx.store.local_path(digest), 7)
    with pytest.raises(ImageDamagedError) as err:
        ctx.image_artifacts("sandbox")
    path = (d / builder.BOOT_FILES[kind]).relative_to(home)
    assert err.value.message.startswith(f"image sandbox cannot be booted: its {kind} {path} "
                                        f"is damaged: stored copy {digest[:12]} is corrupt")
    # still refused at the next boot: the store no longer vouches for it
    with pytest.raises(ImageDamagedError):
        make_ctx(home).image_artifacts("sandbox")


def test_a_repeated_boot_reads_no_file_again(home: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(home)
    make_ctx(home).image_artifacts("sandbox")
    reads: list[Path] = []
    real = store_mod.sha256_file

    def counting(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(store_mod, "sha256_file", counting)
    monkeypatch.setattr(context_mod, "sha256_file", counting)
    # a restarted server too: the verified keys are on disk
    assert make_ctx(home).image_artifacts("sandbox")[:3] == recorded()
    assert reads == []


def test_a_rebuild_between_the_record_and_the_files_is_read_again(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record was read just before a rebuild swapped the image: its files match the new
    record, not the old one, and the boot takes the new one."""
    write_image(home)
    old = {k: hashlib.sha256(b"the previous build " + k.encode()).hexdigest()
           for k in builder.BOOT_FILES}
    answers = [old]
    real = builder.recorded_digests
    monkeypatch.setattr(builder, "recorded_digests",
                        lambda layout, image_id: answers.pop() if answers else real(layout,
                                                                                    image_id))
    assert make_ctx(home).image_artifacts("sandbox")[:3] == recorded()


def test_an_older_image_is_rebuilt(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(home, digests=False)
    built: list[str] = []
    monkeypatch.setattr(builder, "_check_prerequisites", lambda: None)

    def build(layout: Layout, image_id: str, *args: Any) -> Any:
        built.append(image_id)
        return builder.get_image(layout, image_id)

    monkeypatch.setattr(builder, "_build_locked", build)
    builder.ensure_image(Layout(home), "sandbox")
    assert built == ["sandbox"]


def test_an_older_image_that_cannot_be_rebuilt_has_its_digests_recorded_once(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_image(home, digests=False)

    def missing() -> None:
        raise builder.ImageBuildError("mmdebstrap: not found")

    monkeypatch.setattr(builder, "_check_prerequisites", missing)
    assert builder.recorded_digests(Layout(home), "sandbox") is None
    ctx = make_ctx(home)
    assert ctx.image_artifacts("sandbox")[:3] == recorded()
    meta = json.loads((d / builder.META_FILE).read_text())
    assert meta["sha256"] == DIGESTS
    assert meta["source_hash"] == builder.source_hash() and meta["id"] == "sandbox"
    assert (d / builder.META_FILE).stat().st_mode & 0o777 == 0o444
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [*builder.BOOT_FILES.values(), builder.META_FILE])  # no temporary left
    # recorded once: damage after it is refused like any other
    flip_byte(d / builder.KERNEL_FILE, 3)
    with pytest.raises(ImageDamagedError):
        ctx.image_artifacts("sandbox")
    assert json.loads((d / builder.META_FILE).read_text())["sha256"] == meta["sha256"]

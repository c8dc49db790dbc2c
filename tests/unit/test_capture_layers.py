"""Step 7's disk part of a capture (``capture._store_layers``), which runs in a thread of its
own beside the split and the compression, and ``capture._joined``, which makes a capture end
only after that thread, however it ends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tenkibox.artifacts.store import ArtifactCorrupt
from tenkibox.errors import SnapshotFailedError
from tenkibox.host import capture
from tenkibox.host.api import MachineShape
from tenkibox.host.vm import VMRecord
from tenkibox.steps import Steps


class Store:
    """Records puts; ``bad`` digests fail verify as a damaged file would."""

    def __init__(self, bad: set[str] | None = None) -> None:
        self.put_: list[str] = []
        self.verified: list[str] = []
        self.bad = bad or set()

    def put(self, src: Path, *, digest: str | None = None, move: bool = False) -> str:
        assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
        self.put_.append(digest)
        return digest

    def verify(self, digest: str, kind: str = "artifact", *, deep: bool = False) -> None:
        self.verified.append(digest)
        if digest in self.bad:
            raise ArtifactCorrupt(f"{kind} {digest[:12]} is corrupt", digest=digest, kind=kind)


def _vm(tmp_path: Path) -> Any:
    shape = MachineShape(2, 512, "console=ttyS0", "k" * 64, "i" * 64)
    (tmp_path / "top-1.qcow2").write_bytes(b"frozen at the capture")
    record = VMRecord("ses_x", shape, ["b" * 64], frozen=[("top-0.qcow2", "0" * 64),
                                                          ("top-1.qcow2", "")])
    return SimpleNamespace(record=record, disk_dir=tmp_path)


def test_the_new_layer_is_hashed_stored_and_noted(tmp_path: Path) -> None:
    vm, store, produced = _vm(tmp_path), Store(), set[str]()
    new = hashlib.sha256(b"frozen at the capture").hexdigest()
    layers, new_layers = capture._store_layers(SimpleNamespace(store=store), vm,
                                               Steps(logging.getLogger("t"), "snp"), produced)
    assert layers == ["b" * 64, "0" * 64, new] and new_layers == [new]
    assert store.put_ == [new] and new in produced  # produced before the GC could see it
    assert vm.record.frozen[-1] == ("top-1.qcow2", new)
    # the VM's note on disk says so (a capture killed later must not hash it again)
    assert VMRecord.load(tmp_path).frozen[-1] == ("top-1.qcow2", new)
    # every layer, the kernel and the initrd: nothing damaged is sealed over
    assert set(store.verified) == {"k" * 64, "i" * 64, "b" * 64, "0" * 64, new}


def test_a_damaged_older_layer_fails_the_capture(tmp_path: Path) -> None:
    store = Store(bad={"0" * 64})
    with pytest.raises(SnapshotFailedError, match="not sealing a snapshot over it"):
        capture._store_layers(SimpleNamespace(store=store), _vm(tmp_path),
                              Steps(logging.getLogger("t"), "snp"), set())


async def test_joined_waits_for_the_thread_even_when_cancelled() -> None:
    # the capture's files and the VM's note are the thread's to finish: a cancelled capture
    # (a terminate) must not return while it still writes them
    release = threading.Event()
    finished = threading.Event()

    def work() -> None:
        release.wait(10)
        finished.set()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    task = asyncio.ensure_future(capture._joined(future))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


async def test_joined_leaves_the_threads_failure_to_its_reader() -> None:
    def work() -> None:
        raise SnapshotFailedError("damaged")

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    await capture._joined(future)  # returns: the failure is _seal's to report
    with pytest.raises(SnapshotFailedError):
        future.result()

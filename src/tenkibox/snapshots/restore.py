"""Restore: a new VM that continues from the captured instant. Nothing boots.

Steps (each logged and timed):

1. ``verify``       every file the snapshot needs exists and matches its sha256.
2. ``overlay``      a new writable qcow2 on top of the snapshot's frozen chain.
3. ``load-ram``     the compressed RAM image is unpacked once per snapshot into a sparse file
                    (``$TENKI_HOME/ram-cache``); every restored VM maps it copy-on-write
                    (``share=off``), so clones share the snapshot's unchanged pages in the host's
                    page cache and nothing is copied per restore.
4. ``launch``       QEMU with exactly the captured device set, ``-incoming defer``.
5. ``load-state``   ``migrate-incoming`` of the device state (``x-ignore-shared``: RAM is the file).
6. ``resume``       ``cont`` (mandatory: an incoming VM stays paused).
7. ``agent``        the guest's agent process, still running from before, answers the new socket.
8. ``clock``        the guest clock is set to the host's (it is behind by the snapshot's age).
9. ``identity``     new hostname, machine-id and entropy, so clones do not share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ..engine import disks
from ..engine.agent import AgentClient, connect_agent
from ..engine.machine import LaunchOptions, Machine, MachineConfig, MachineFiles
from ..errors import SnapshotFailedError, TenkiError
from ..steps import Steps
from . import ramfile
from .capture import enable_snapshot_caps, wait_migration

log = logging.getLogger(__name__)

_verified: dict[str, tuple[str, str]] = {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _side(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def remember_digest(path: Path, digest: str) -> None:
    """Keep a file's digest while its inode, size and mtime stay the same: in memory, and in a
    ``.NAME.sha256`` file beside it so that a restarted server need not hash it again."""
    key = _stat_key(path)
    _verified[str(path)] = (key, digest)
    side = _side(path)
    # captures and restores may record the same file at once: each uses its own temporary file
    tmp = side.with_name(f"{side.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(f"{key} {digest}")
    os.replace(tmp, side)


def checked_digest(path: Path) -> str:
    """sha256 of a file, hashed again only when the file changed (any write moves its mtime)."""
    key = _stat_key(path)
    cached = _verified.get(str(path))
    if cached and cached[0] == key:
        return cached[1]
    with contextlib.suppress(OSError, ValueError):
        stored_key, digest = _side(path).read_text().split()
        if stored_key == key:
            _verified[str(path)] = (key, digest)
            return digest
    digest = sha256_file(path)
    remember_digest(path, digest)
    return digest


def verify_files(snapshot_id: str, manifest: dict[str, Any]) -> None:
    """Raise SnapshotFailedError naming the first missing or corrupt file."""
    for path, want in manifest.items():
        p = Path(path)
        if not p.exists():
            raise SnapshotFailedError(
                f"snapshot {snapshot_id} cannot be restored: {p.name} is missing")
        got = checked_digest(p)
        if got != want["sha256"]:
            raise SnapshotFailedError(
                f"snapshot {snapshot_id} cannot be restored: {p.name} is corrupt "
                f"(sha256 {got[:12]}..., expected {want['sha256'][:12]}...)")


_unpacking: dict[str, asyncio.Lock] = {}


async def ensure_ram_cache(ram_file: Path, cache: Path) -> None:
    """Unpack a snapshot's RAM image once; every restore maps that copy privately."""
    lock = _unpacking.setdefault(str(cache), asyncio.Lock())
    async with lock:
        if cache.exists():
            return
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        await asyncio.to_thread(ramfile.unpack, ram_file, tmp)
        os.replace(tmp, cache)


async def restore(*, snapshot_id: str, session_id: str, cfg: MachineConfig, chain: list[str],
                  manifest: dict[str, Any], ram_file: Path, state_file: Path, files: MachineFiles,
                  new_top: Path, steps: Steps, agent_timeout: float,
                  identity: tuple[str, str, bytes]) -> tuple[Machine, AgentClient]:
    """``cfg.ram_base`` names the unpacked copy of the snapshot's RAM that the VM maps."""
    with steps.step("verify"):
        await asyncio.to_thread(verify_files, snapshot_id, manifest)
    with steps.step("overlay"):
        await asyncio.to_thread(disks.create_overlay, new_top, Path(chain[-1]))
    files.run_dir.mkdir(parents=True, exist_ok=True)
    machine = Machine(session_id, files, cfg)
    agent = AgentClient(files.agent)
    try:
        with steps.step("load-ram"):
            try:
                assert cfg.ram_base is not None
                await ensure_ram_cache(ram_file, Path(cfg.ram_base))
            except (ramfile.RamFormatError, OSError) as exc:
                raise SnapshotFailedError(
                    f"snapshot {snapshot_id} cannot be restored: RAM image unreadable: {exc}"
                ) from exc
        with steps.step("launch"):
            await machine.launch(LaunchOptions(disk_chain=[*map(Path, chain), new_top],
                                               incoming=True))
        with steps.step("load-state"):
            await enable_snapshot_caps(machine)
            await machine.execute("migrate-incoming", {"uri": f"exec:cat {state_file}"})
            await wait_migration(machine)
        with steps.step("resume"):
            await machine.resume()
        with steps.step("agent"):
            await connect_agent(machine, agent, agent_timeout)
        with steps.step("clock"):
            await agent.set_time(time.time_ns())
        with steps.step("identity"):
            hostname, machine_id, entropy = identity
            await agent.reidentify(hostname, machine_id, entropy)
    except BaseException as exc:
        await agent.close()
        await machine.kill()
        if isinstance(exc, TenkiError) and not isinstance(exc, SnapshotFailedError):
            raise SnapshotFailedError(
                f"restore of {snapshot_id} failed at {steps.current or 'start'}: {exc.message}"
            ) from exc
        raise
    return machine, agent

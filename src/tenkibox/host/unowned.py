"""Removing files that nothing owns (``tenki admin verify --repair``, and the background scrub).

``LocalHost.unowned_files`` lists them as plain data (``Unowned``: a kind and a name, never a
host path); ``remove`` removes, of that list, what it can show that no one can still claim, and
returns exactly those entries, so that a report tells what was removed apart from what was only
found:

- ``artifact`` (a digest): referenced by nothing (asked again now, captures in flight included)
  and stored longer ago than the garbage collector's grace;
- ``temporary`` (a path in the data directory): a temporary file of the artifact store, still
  one of its strays, older than ``TEMP_MAX_AGE_S`` (a writer renames its own within it; start-up
  removes them all, as nothing writes then);
- ``vm`` (a session id): the run and disk directories of a VM that the host does not hold, that
  no live session record names, and that no process of ours serves (a QEMU or passt carrying
  that VM's token, ``engine.machine.vm_process_owner``): the directories of a VM that still
  runs (one being stopped, or a stray that start-up has not killed) stay.

An entry that names nothing of the kind now is left as it is (and stays in the report as found).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..artifacts.store import GC_GRACE_S, TEMP_MAX_AGE_S, ArtifactStore
from .api import Unowned
from .vm import HostLayout

log = logging.getLogger(__name__)


def temporary_name(path: Path, home: Path) -> str:
    """How ``Unowned`` names a temporary file of the store: its path in the data directory."""
    return str(path.relative_to(home)) if path.is_relative_to(home) else path.name


def remove(found: list[Unowned], *, store: ArtifactStore, paths: HostLayout,
           owned: Callable[[str], bool], referenced: set[str],
           processes: Callable[[Path], dict[int, tuple[str, str]]]) -> list[Unowned]:
    """Remove what may be of ``found`` (see the module docstring); the entries removed.
    ``owned(name)``: a VM of that session id is the host's or a live record's, asked right
    before its directories are removed. ``processes(run_root)``: pid -> (the VM it serves, its
    command line) of every live process of ours (``local.our_processes``)."""
    run_root = paths.layout.run
    busy: set[str] | None = None  # session ids whose directories a process uses
    stored_at: dict[str, float] | None = None  # digest -> when it entered the store
    temporaries: dict[str, Path] | None = None  # name -> the store's stray of that name
    removed: list[Unowned] = []
    now = time.time()
    for entry in found:
        if entry.kind == "artifact":
            if stored_at is None:
                stored_at = {a.digest: a.stored_at for a in store.entries()}
            if _remove_artifact(store, entry.name, referenced, stored_at.get(entry.name), now):
                removed.append(entry)
        elif entry.kind == "temporary":
            if temporaries is None:
                temporaries = {temporary_name(p, paths.layout.home): p for p in store.strays()}
            path = temporaries.get(entry.name)
            if path is not None and _remove_temporary(path, now):
                removed.append(entry)
        elif entry.kind == "vm":
            name = entry.name
            if not _plain_name(name) or name.startswith("cv-"):
                continue  # not a session's (a conversion's scratch is start-up's to remove)
            if busy is None:
                busy = _in_use(run_root, processes)
            if owned(name) or name in busy:
                log.info("VM %s: its files are left (a VM still uses them)", name)
                continue
            dirs = [paths.run_dir(name), paths.disk_dir(name)]
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            if not any(d.exists() for d in dirs):
                log.info("VM %s: no session owns its files, removed", name)
                removed.append(entry)
    return removed


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _remove_artifact(store: ArtifactStore, digest: str, referenced: set[str],
                     stored_at: float | None, now: float) -> bool:
    if digest in referenced or stored_at is None:
        return False  # referenced now, or gone already (or not a digest): nothing removed here
    if now - stored_at < GC_GRACE_S:
        return False  # stored again meanwhile (a capture's put): its record may follow
    store.delete(digest)
    log.info("artifact %s: unreferenced, removed", digest[:12])
    return not store.has(digest)


def _remove_temporary(path: Path, now: float) -> bool:
    try:
        if now - path.stat().st_mtime <= TEMP_MAX_AGE_S:
            return False  # its writer may still rename it into place
        path.unlink()
    except OSError:
        return False  # renamed or removed meanwhile
    return True


def _in_use(run_root: Path, processes: Callable[[Path], dict[int, tuple[str, str]]]) -> set[str]:
    """The session ids whose VM a live process of ours serves (QEMU, passt: by their token)."""
    return {owner for owner, _ in processes(run_root).values()}

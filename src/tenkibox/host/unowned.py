"""Removing files that nothing owns (``tenki admin verify --repair``, and the background scrub).

``LocalHost.unowned_files`` lists them; ``remove`` removes, of that list, what it can show that
no one can still claim, and returns exactly those entries, so that a report tells what was
removed apart from what was only found:

- ``artifact <digest>``: referenced by nothing (asked again now, captures in flight included)
  and stored longer ago than the garbage collector's grace;
- a temporary file of the artifact store older than ``TEMP_MAX_AGE_S`` (a writer renames its
  own within it; start-up removes them all, as nothing writes then);
- a run or disk directory of a VM that the host does not hold, that no live session record
  names, and that no process of this data directory uses: the directory of a VM that still runs
  (one being stopped, or a stray that start-up has not killed) stays.

An entry of any other kind is left as it is (and stays in the report as found).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..artifacts.store import GC_GRACE_S, TEMP_MAX_AGE_S, LocalArtifactStore
from ..engine.machine import pid_alive
from .vm import HostLayout

log = logging.getLogger(__name__)

ARTIFACT = "artifact "


def remove(found: list[str], *, store: LocalArtifactStore, paths: HostLayout,
           owned: Callable[[str], bool], referenced: set[str],
           processes: Callable[[Path], dict[int, str]]) -> list[str]:
    """Remove what may be of ``found`` (see the module docstring); the entries removed.
    ``owned(name)``: a VM of that session id is the host's or a live record's, asked right
    before its directories are removed. ``processes(run_root)``: pid -> command line of every
    process whose command line names the run root."""
    run_root = paths.layout.run
    busy: set[str] | None = None  # session ids whose directories a process uses
    removed: list[str] = []
    now = time.time()
    for entry in found:
        if entry.startswith(ARTIFACT):
            if _remove_artifact(store, entry.removeprefix(ARTIFACT), referenced, now):
                removed.append(entry)
            continue
        path = Path(entry)
        if path.parent in (store.objects, store.keys.directory):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > TEMP_MAX_AGE_S:
                    path.unlink()
                    removed.append(entry)
        elif path.parent in (run_root, paths.disks) and not path.name.startswith("cv-"):
            if busy is None:
                busy = _in_use(run_root, processes)
            if owned(path.name) or path.name in busy or _pids_alive(run_root / path.name):
                log.info("%s: left (a VM still uses it)", path)
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                log.info("%s: no session owns it, removed", path)
                removed.append(entry)
    return removed


def _remove_artifact(store: LocalArtifactStore, digest: str, referenced: set[str],
                     now: float) -> bool:
    if digest in referenced:
        return False
    try:
        stored_at = store.local_path(digest).stat().st_ctime
    except OSError:
        return False  # gone already, or not a digest: nothing removed here
    if now - stored_at < GC_GRACE_S:
        return False  # stored again meanwhile (a capture's put): its record may follow
    store.delete(digest)
    log.info("artifact %s: unreferenced, removed", digest[:12])
    return not store.has(digest)


def _in_use(run_root: Path, processes: Callable[[Path], dict[int, str]]) -> set[str]:
    """The session ids whose run directory a live process of this data directory names."""
    token = str(run_root) + "/"
    return {cmd.split(token, 1)[1].split("/", 1)[0]
            for cmd in processes(run_root).values() if token in cmd}


def _pids_alive(run_dir: Path) -> bool:
    """The VM's QEMU or network helper, noted in its machine.json before they start, still
    runs (a pid taken since by an unrelated process does not count)."""
    try:
        info = json.loads((run_dir / "machine.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict):
        return False
    for pid in (info.get("pid"), info.get("net_pid")):
        if not isinstance(pid, int) or not pid_alive(pid):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"passt" in cmd or str(run_dir.parent).encode() + b"/" in cmd:
            return True
    return False

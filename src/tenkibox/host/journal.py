"""The volume mounts of a worker's VMs, kept in its data directory (``mounts.json``).

``LocalHost.recover`` makes each VM hold exactly the mounts it is given (it unplugs any other
volume: an attach cut short). A worker that restarts recovers the VMs the control plane says
it owns, and the contract names them by session id only; the service therefore notes every
attach, detach, capture (volumes lost) and terminate it answers, so that recovery can give
each VM the mounts it had.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .api import VolumeMountSpec

log = logging.getLogger(__name__)


class MountJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._mounts: dict[str, dict[str, VolumeMountSpec]] = {}
        try:
            raw = json.loads(path.read_text())
            self._mounts = {s: {m["volume_id"]: VolumeMountSpec.from_json(m) for m in ms}
                            for s, ms in raw.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s): volume mounts start empty", path, exc)

    def mounts(self, session_id: str) -> list[VolumeMountSpec]:
        return list(self._mounts.get(session_id, {}).values())

    def attached(self, session_id: str, mount: VolumeMountSpec) -> None:
        self._mounts.setdefault(session_id, {})[mount.volume_id] = mount
        self._save()

    def detached(self, session_id: str, volume_ids: list[str]) -> None:
        held = self._mounts.get(session_id, {})
        removed = [v for v in volume_ids if held.pop(v, None) is not None]
        if removed:
            self._save()

    def record(self, session_id: str, mounts: list[VolumeMountSpec]) -> None:
        self._mounts[session_id] = {m.volume_id: m for m in mounts}
        self._save()

    def gone(self, session_id: str) -> None:
        if self._mounts.pop(session_id, None) is not None:
            self._save()

    def retain(self, session_ids: set[str]) -> None:
        """Forget every session but ``session_ids`` (after recovery: the VMs that run)."""
        if set(self._mounts) - session_ids:
            self._mounts = {s: m for s, m in self._mounts.items() if s in session_ids}
            self._save()

    def _save(self) -> None:
        data = {s: [m.to_json() for m in ms.values()] for s, ms in self._mounts.items() if ms}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

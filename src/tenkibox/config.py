"""Where tenki keeps its things, and how clients find the server.

``$TENKI_HOME`` (default ``~/.local/share/tenki``) holds durable state: the database, images,
session disk overlays, snapshots, volumes and the local server's ``server.json``.
Volatile per-VM files (guest RAM, QMP and agent sockets) live on tmpfs under ``run_dir()``, keyed
by a hash of the home so that two homes on one machine never collide and socket paths stay short.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "TENKI_HOME"
ENV_ENDPOINT = "TENKI_API_ENDPOINT"
ENV_API_KEY = "TENKI_API_KEY"
ENV_ACCEL = "TENKI_ACCEL"  # auto | kvm | tcg
ENV_RUN_ROOT = "TENKI_RUN_ROOT"  # tmpfs root for volatile files, default /dev/shm


def home() -> Path:
    raw = os.environ.get(ENV_HOME)
    path = Path(raw) if raw else Path.home() / ".local" / "share" / "tenki"
    return path.expanduser().absolute()


def home_tag(home_dir: Path | None = None) -> str:
    """A short name of a data directory: what names its machine-wide things (run directory,
    guest network namespaces and tables), so that two servers on one machine never touch
    each other's."""
    return hashlib.sha256(str(home_dir or home()).encode()).hexdigest()[:10]


def run_dir(home_dir: Path | None = None) -> Path:
    root = Path(os.environ.get(ENV_RUN_ROOT) or "/dev/shm")
    return root / f"tenki-{home_tag(home_dir)}"


@dataclass(frozen=True)
class Layout:
    """The paths inside one data directory."""

    home: Path

    @property
    def run(self) -> Path:
        return run_dir(self.home)

    @property
    def database(self) -> Path:
        return self.home / "tenki.db"

    @property
    def server_file(self) -> Path:
        return self.home / "server.json"

    @property
    def server_log(self) -> Path:
        return self.home / "server.log"

    @property
    def admin_key_file(self) -> Path:
        """The local admin key (``tk_...``, mode 0600), written by the server on first start
        and read by the CLI and ``Client()`` when they talk to this home's server."""
        return self.home / "admin.key"

    @property
    def layers(self) -> Path:
        """Immutable disk layers, kernels and initrds, shared by sessions and snapshots."""
        return self.home / "layers"

    @property
    def images(self) -> Path:
        return self.home / "images"

    @property
    def sessions(self) -> Path:
        return self.home / "sessions"

    @property
    def snapshots(self) -> Path:
        return self.home / "snapshots"

    @property
    def volumes(self) -> Path:
        return self.home / "volumes"

    def image_dir(self, image_id: str) -> Path:
        return self.images / image_id

    def session_dir(self, session_id: str) -> Path:
        return self.sessions / session_id

    def session_run_dir(self, session_id: str) -> Path:
        return self.run / session_id

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def ensure(self) -> Layout:
        for p in (self.home, self.layers, self.images, self.sessions, self.snapshots,
                  self.volumes, self.run):
            p.mkdir(parents=True, exist_ok=True)
        return self


def layout(home_dir: Path | None = None) -> Layout:
    return Layout(home_dir or home())

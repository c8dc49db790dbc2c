"""``LocalHost.unowned_files``: what the host stores that no record owns, named as plain data
(a digest, a session id, a path inside the data directory), never a host path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tenkibox.config import Layout
from tenkibox.host import local
from tenkibox.host.api import Unowned
from tenkibox.host.local import LocalHost


def test_unowned_files_are_named_without_host_paths(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENKI_RUN_ROOT", str(tmp_path / "run"))
    monkeypatch.setenv("TENKI_NET", "user")  # no probe of this machine's network tools
    monkeypatch.setattr(local, "GC_GRACE_S", -1.0)  # every artifact is old enough to count
    host = LocalHost(Layout(tmp_path / "home"), "tcg")
    src = tmp_path / "layer"
    src.write_bytes(os.urandom(64))
    kept = host.store.put(src)
    src.write_bytes(os.urandom(64))
    dropped = host.store.put(src)
    stray = host.paths.artifacts / "sha256" / ".new-0123.tmp"
    stray.write_bytes(b"half")
    for d in (host.paths.disk_dir("ses_gone"), host.paths.run_dir("ses_gone"),
              host.paths.disk_dir("cv-conversion")):  # a conversion's scratch: not listed
        d.mkdir(parents=True)

    found = host.unowned_files({kept})

    assert sorted(found, key=lambda u: u.kind) == [
        Unowned("artifact", dropped), Unowned("temporary", "artifacts/sha256/.new-0123.tmp"),
        Unowned("vm", "ses_gone")]
    assert not any(os.path.isabs(u.name) or str(tmp_path) in u.name for u in found)

"""Building the guest agent (``images/agentd.py``): the binary the image gets, the hash that makes
an image stale when the agent's sources change, and a failed build's error."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tenkibox.images import agentd, builder


def test_the_binary_is_static_and_answers_its_usage(agentd_binary: Path) -> None:
    # static: it runs in any guest, whatever the image's libc
    head = agentd_binary.read_bytes()[:4096]
    assert head[:4] == b"\x7fELF"
    assert b"ld-linux" not in agentd_binary.read_bytes()  # no program interpreter
    assert os.access(agentd_binary, os.X_OK)
    done = subprocess.run([str(agentd_binary), "--help"], capture_output=True, text=True,
                          timeout=10)
    assert "--wait-file" in done.stdout + done.stderr


def test_a_change_to_the_agent_makes_the_image_stale(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    before = builder.source_hash()
    copy = tmp_path / "agentd"
    shutil.copytree(agentd.SOURCE_DIR, copy)
    monkeypatch.setattr(agentd, "SOURCE_DIR", copy)
    assert builder.source_hash() == before  # the same files: the same hash
    (copy / "agent.go").write_text((copy / "agent.go").read_text() + "\n// changed\n")
    assert builder.source_hash() != before


def test_a_build_that_fails_names_the_command_and_the_compiler_output(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(agentd.SOURCE_DIR, copy)
    (copy / "broken.go").write_text("package main\n\nfunc broken() { undefinedThing() }\n")
    monkeypatch.setattr(agentd, "SOURCE_DIR", copy)
    out = tmp_path / "out" / "agentd"
    out.parent.mkdir()
    with pytest.raises(agentd.AgentBuildError) as ei:
        agentd.build(out)
    message = str(ei.value)
    assert "go build" in message and "undefinedThing" in message, message
    assert isinstance(ei.value.__cause__, subprocess.CalledProcessError)
    assert list(out.parent.iterdir()) == []  # nothing half-written left


def test_without_a_toolchain_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no go on it
    monkeypatch.setattr(agentd, "FALLBACK_GO", tmp_path / "no-go")
    with pytest.raises(agentd.AgentBuildError, match="golang-go"):
        agentd.find_go()

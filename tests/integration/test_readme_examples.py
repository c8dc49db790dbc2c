"""Every ```python block of the README's "Python SDK" section runs, as written, against a real
server (``TENKI_API_ENDPOINT``) in its own interpreter, and leaves nothing behind.

A comment ``# -> text`` on a line of an example states what it prints: ``text`` must appear in
the example's output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tenkibox import SessionState, SnapshotState

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- sdk-examples:start -->", "<!-- sdk-examples:end -->"
SPEC_CALLS = [
    "Client()",
    "AsyncClient()",
    "create_snapshot(",
    "create_snapshot_and_wait(",
    "get_snapshot(",
    "list_snapshots(",
    "wait_snapshot_ready(",
    "create(snapshot_id=",
    "name=",
    "create_and_wait(snapshot_id=",
    "delete_snapshot(",
    "except SnapshotFailedError",
    "except SnapshotNotFoundError",
]


def section() -> str:
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "the SDK section markers"
    body = text.split(START, 1)[1].split(END, 1)[0]
    return body


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```\s*$", section(), re.S | re.M)


BLOCKS = python_blocks()


def test_section_has_every_spec_example() -> None:
    text = section()
    assert "## Python SDK" in text
    assert "TENKI_API_ENDPOINT" in text and "TENKI_API_KEY" in text
    assert len(BLOCKS) >= 3, f"expected the Go, errors and async examples, got {len(BLOCKS)}"
    code = "\n".join(BLOCKS)
    missing = [call for call in SPEC_CALLS if call not in code]
    assert not missing, f"the README's SDK examples lack {missing}"
    assert any("asyncio.run(" in b and "AsyncClient" in b for b in BLOCKS)
    for block in BLOCKS:
        compile(block, "<README example>", "exec")


@pytest.mark.parametrize("index", range(max(len(BLOCKS), 1)))
def test_example_runs(tenki_server: Any, index: int, tmp_path: Path) -> None:
    assert index < len(BLOCKS), "no python example in the README's SDK section"
    code = BLOCKS[index]
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(code)
    env = dict(tenki_server.env, TENKI_API_ENDPOINT=tenki_server.url)
    res = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (
        f"README example {index} exited {res.returncode}\n--- code\n{code}\n"
        f"--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    )
    for expected in re.findall(r"#\s*->\s*(.+?)\s*$", code, re.M):
        assert expected in res.stdout, f"example {index} should print {expected!r}: {res.stdout}"
    assert res.stdout.strip(), "an example shows something"

    # it cleaned up after itself: no session left running, no snapshot left to delete
    with tenki_server.client() as c:
        live = [s.id for s in c.list()
                if s.state not in (SessionState.TERMINATED, SessionState.FAILED)]
        kept = [s.id for s in c.list_snapshots()
                if s.state not in (SnapshotState.DELETING, SnapshotState.DELETED)]
    assert not live, f"example {index} left sessions running: {live}"
    assert not kept, f"example {index} left snapshots: {kept}"

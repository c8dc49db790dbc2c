"""Who may touch what, checked on the source: only ``control/records.py`` writes rows, the host
depends on the ``ArtifactStore`` interface, and the API's routes reach nothing but the control
plane (and pure helpers)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import tenkibox

SRC = Path(tenkibox.__file__).parent


def modules(under: str = "") -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((SRC / under).rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        yield rel, ast.parse(path.read_text(), rel)


def imports(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(module, name) of every ``from X import name`` (relative ones resolved no further than
    their dots: ``..host.api`` stays ``host.api``), wherever it stands (in functions too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield (node.module or ""), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ""


def test_only_records_writes_rows() -> None:
    writers = []
    for rel, tree in modules():
        if rel == "control/records.py" or rel.startswith("store/migrations/"):
            continue
        for module, name in imports(tree):
            if module.startswith("sqlalchemy") and name in ("insert", "update", "delete"):
                writers.append(f"{rel}: imports sqlalchemy's {name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "orm"
                    and node.func.attr in ("add", "add_all", "delete", "merge")):
                writers.append(f"{rel}:{node.lineno}: orm.{node.func.attr}")
    assert writers == []


def test_the_host_depends_on_the_artifact_store_interface() -> None:
    found = []
    for rel, tree in modules("host"):
        for node in ast.walk(tree):
            annotations = []
            if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
                annotations.append(node.annotation)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
                annotations.append(node.returns)
            for ann in annotations:
                if "LocalArtifactStore" in ast.unparse(ann):
                    found.append(f"{rel}:{node.lineno}")
        if rel != "host/local.py":  # LocalHost chooses the implementation; nothing else
            found += [f"{rel}: imports it" for _, name in imports(tree)
                      if name == "LocalArtifactStore"]
    assert found == []


def test_the_routes_reach_only_the_control_plane() -> None:
    allowed = {"models", "errors", "_version", "control.workdir", "deps", "auth", ""}
    reached = [f"{rel}: {module}" for rel, tree in modules("api/routes")
               for module, _ in imports(tree)
               if not module.startswith(("fastapi", "starlette", "pydantic", "__future__",
                                         "collections", "typing", "json", "os"))
               and module not in allowed]
    assert reached == []

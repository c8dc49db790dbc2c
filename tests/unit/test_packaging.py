"""`pip install tenkibox` is the SDK and the CLI: neither imports a server dependency."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "qemu", "zstandard", "xxhash",
               "starlette")


def test_base_dependencies_are_the_client_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for name in SERVER_ONLY:
        assert name not in base
    server = " ".join(project["optional-dependencies"]["server"]).lower()
    for name in ("fastapi", "uvicorn", "sqlalchemy", "alembic", "qemu.qmp"):
        assert name in server


def test_sdk_and_cli_import_without_server_packages() -> None:
    # Server packages made unimportable: the SDK, the CLI and its help must still work.
    code = (
        "import sys\n"
        f"for name in {SERVER_ONLY!r}: sys.modules[name] = None\n"
        "import tenkibox, tenkibox.client, tenkibox.cli.main\n"
        "from tenkibox import Client, AsyncClient\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(tenkibox.cli.main.cli, ['sandbox', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(tenkibox.cli.main.cli, ['serve'])\n"
        "assert r.exit_code == 1 and 'tenkibox[server]' in r.output, r.output\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

"""Template specs (tenki.template.v1): checked with the field path named, compiled into a setup
script that a real shell runs (here /bin/sh on the test machine, in a temporary directory)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tenkibox import errors, models
from tenkibox.cli.main import cli
from tenkibox.client import _core
from tenkibox.control.template_spec import compile_spec, failed_step, setup_script, spec_hash

V1 = "tenki.template.v1"


def spec(**kw: Any) -> models.TemplateSpec:
    return _core.template_spec({"spec_version": V1, **kw})


@pytest.mark.parametrize(("data", "message"), [
    ({"spec_version": V1, "steps": [{"run": "true"}, {"run": "true"}, {"run": "true"},
                                    {"apt": {"packages": []}}]},
     "steps[3].apt.packages: must not be empty"),
    ({"spec_version": V1, "steps": [{"run": "true", "mkdir": {"path": "/x"}}]},
     "steps[0]: give exactly one of run, apt, pip, npm, write_file, mkdir; got run, mkdir"),
    ({"spec_version": V1, "stepz": []}, "stepz: unknown field"),
    ({"spec_version": V1, "runtime": {"ready_when": {"port": 0}}},
     "runtime.ready_when.port: input should be greater than or equal to 1"),
    ({"spec_version": "v9"}, "spec_version: input should be 'tenki.template.v1'"),
    ({}, "spec_version: is required"),
    ({"spec_version": V1, "steps": [{"apt": {"packages": ["curl; rm -rf /"]}}]},
     "steps[0].apt.packages[0]: string should match pattern"),
    ({"spec_version": V1, "steps": [{"write_file": {"path": "etc/x", "content": ""}}]},
     "steps[0].write_file.path: must be an absolute path"),
])
def test_errors_name_the_field_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        _core.template_spec(data)
    assert info.value.message.startswith(message), info.value.message


def shell(script: str, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    """``/bin/sh -se`` with the script; ``sudo`` (which the guest has and this machine may not)
    runs its command as is: the test is of the script, the guest's sudo is the integration
    test's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    sudo = bin_dir / "sudo"
    sudo.write_text('#!/bin/sh\nexec env "$@"\n')
    sudo.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["/bin/sh", "-se"], input=script.encode(), capture_output=True,
                          env=env)


def test_the_compiled_script_runs_in_a_real_shell(tmp_path: Path) -> None:
    s = spec(
        env={"A": "1"},
        steps=[{"name": "dirs", "mkdir": {"path": f"{tmp_path}/a b/c"}},
               {"write_file": {"path": f"{tmp_path}/a b/c/f.txt", "content": "x'$HOME\n",
                               "mode": 0o600}},
               {"run": f"echo ran > '{tmp_path}/ran'"}],
        runtime={"start_cmd": "sleep 1", "ready_when": {"command": "true"}, "env": {"B": "2"}},
        resources={"cpu": 1, "memory_mb": 512})
    fields = compile_spec(s)
    assert fields["env"] == {"A": "1", "B": "2"} and (fields["cpu"], fields["memory_mb"]) == (1,
                                                                                          512)
    script = fields["setup_script"]
    done = shell(script, tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.splitlines() == ["--- step 1/3: mkdir (dirs)", "--- step 2/3: write_file",
                                "--- step 3/3: run"]
    f = tmp_path / "a b" / "c" / "f.txt"
    assert f.read_text() == "x'$HOME\n" and f.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ran").read_text() == "ran\n"


def test_a_failing_step_is_named(tmp_path: Path) -> None:
    script = setup_script(spec(steps=[{"run": "true"}, {"name": "boom", "run": "exit 3"},
                                      {"run": "echo never"}]))
    assert script is not None
    r = shell(script, tmp_path)
    assert r.returncode == 3 and b"never" not in r.stdout
    assert failed_step(r.stdout.decode()) == "2/3: run (boom)"


def test_package_steps_quote_their_names() -> None:
    script = setup_script(spec(steps=[{"apt": {"packages": ["curl", "python3-venv"]}},
                                      {"pip": {"packages": ["requests==2.32.3"]}},
                                      {"npm": {"packages": ["@scope/pkg@1.2.3"]}}]))
    assert script is not None
    assert ("sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
            "curl python3-venv") in script
    assert "sudo python3 -m pip install --no-input --break-system-packages requests==2.32.3" \
        in script
    assert "sudo npm install --global --no-fund --no-audit @scope/pkg@1.2.3" in script


def test_the_hash_follows_the_fields() -> None:
    a = spec_hash({"setup_script": "x"}, {})
    assert a == spec_hash({"setup_script": "x"}, {})
    assert a != spec_hash({"setup_script": "y"}, {})
    assert a != spec_hash({"setup_script": "x"}, {"TOKEN": "1"})


def test_cli_spec_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "spec.yaml"
    bad.write_text("spec_version: tenki.template.v1\nsteps:\n  - run: 'true'\n  - run: 'true'\n"
                   "  - run: 'true'\n  - apt:\n      packages: []\n")
    r = CliRunner().invoke(cli, ["sandbox", "template", "create", "--name", "t", "--spec",
                                 str(bad)])
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: --spec: {bad}: steps[3].apt.packages: must not be "
                                "empty")
    broken = tmp_path / "broken.json"
    broken.write_text('{"spec_version": "tenki.template.v1", "steps": [}')
    r = CliRunner().invoke(cli, ["sandbox", "template", "create", "--name", "t", "--spec",
                                 str(broken)])
    assert r.exit_code == 2 and "line 1" in r.output, r.output
    r = CliRunner().invoke(cli, ["sandbox", "template", "create", "--name", "t", "--spec",
                                 str(bad), "--cpu", "2"])
    assert r.exit_code == 2 and "give --spec or the options, not both" in r.output

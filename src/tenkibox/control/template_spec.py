"""A declarative template spec (``tenki.template.v1``) compiled to a template's fields.

The script runs as the sandbox user (``tenki``, passwordless sudo): package steps install
system-wide with sudo; directories and files made outside its home belong to it.

The steps become one setup script (run by ``/bin/sh -se``, so the first failing step stops the
build); before each step a marker line (``--- step 3/5: apt (deps)``) goes to the build log, and
the failed step is named from the last marker. Every value reaches the shell quoted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import shlex
from typing import Any

from ..models import Step, TemplateSpec

MARKER = "--- step "


def _script_of(step: Step) -> str:
    q = shlex.quote
    if step.run is not None:
        return step.run
    if step.apt is not None:
        pkgs = " ".join(q(p) for p in step.apt.packages)
        return ("sudo DEBIAN_FRONTEND=noninteractive apt-get update -q\n"
                "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                f"--no-install-recommends {pkgs}")
    if step.pip is not None:
        pkgs = " ".join(q(p) for p in step.pip.packages)
        return f"sudo python3 -m pip install --no-input --break-system-packages {pkgs}"
    if step.npm is not None:
        pkgs = " ".join(q(p) for p in step.npm.packages)
        return f"sudo npm install --global --no-fund --no-audit {pkgs}"
    if step.write_file is not None:
        w = step.write_file
        data = base64.b64encode(w.content.encode()).decode()
        return (f"{_mkdir(posixpath.dirname(w.path) or '/')}\n"
                f"printf %s {q(data)} | base64 -d | sudo tee {q(w.path)} >/dev/null\n"
                f"sudo chown \"$(id -u):$(id -g)\" {q(w.path)}\n"
                f"sudo chmod {w.mode:o} {q(w.path)}")
    if step.mkdir is not None:
        return _mkdir(step.mkdir.path)
    raise ValueError("a step without an action")  # the model refuses it before


def _mkdir(path: str) -> str:
    """The directory and its missing parents, made for the user running the script (existing
    ones keep their owner: /etc stays root's)."""
    q = shlex.quote(path)
    return f'[ -d {q} ] || sudo install -d -o "$(id -u)" -g "$(id -g)" {q}'


def setup_script(spec: TemplateSpec) -> str | None:
    if not spec.steps:
        return None
    n = len(spec.steps)
    parts = []
    for i, step in enumerate(spec.steps, 1):
        label = f"{step.kind}" + (f" ({step.name})" if step.name else "")
        parts.append(f"echo {shlex.quote(f'{MARKER}{i}/{n}: {label}')}\n{_script_of(step)}\n")
    return "".join(parts)


def compile_spec(spec: TemplateSpec) -> dict[str, Any]:
    """The template fields (as ``TemplateCreate`` names them) of ``spec``."""
    runtime_env = {**spec.env, **spec.runtime.env}
    return {
        "base": spec.base,
        "setup_script": setup_script(spec),
        "start_cmd": spec.runtime.start_cmd,
        "ready_when": spec.runtime.ready_when,
        "env": runtime_env,
        "build_env": dict(spec.build_env),
        "cpu": spec.resources.cpu,
        "memory_mb": spec.resources.memory_mb,
        "tags": list(spec.tags),
    }


def spec_hash(spec: dict[str, Any], build_env: dict[str, str]) -> str:
    """What a build depends on, besides its base: the template's fields and build env."""
    text = json.dumps({"spec": spec, "build_env": build_env}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def failed_step(log: str) -> str | None:
    """The spec step the log was in when the setup failed (its last marker)."""
    for line in reversed(log.splitlines()):
        if line.startswith(MARKER):
            return line[len(MARKER):]
    return None

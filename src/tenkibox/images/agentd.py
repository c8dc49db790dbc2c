"""The guest agent, ``agentd``: compiled from ``guest/agentd`` (Go, standard library only).

A restored clone runs every code path for the first time in its new QEMU, whose translation
cache is empty; the agent's own code is on the path of every restore (ping, settle, the first
exec). As a Python program it was about a third of the guest code translated between the resume
and the first exec's answer; as a native binary, restore to first exec took 442 instead of
538 ms and ten clones at once 3.39 instead of 4.01 s (medians of 10 clones and 6 bursts each,
alternating, on one server).

The binary is static (cgo off): it needs nothing from the image and runs on any x86-64 guest.
It is built with the host's Go toolchain, which never downloads anything here: no toolchain
(``GOTOOLCHAIN=local``) and no module (``GOPROXY=off``; the agent imports the standard library
only)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import InternalError

SOURCE_DIR = Path(__file__).resolve().parent.parent / "guest" / "agentd"
#: Debian 12's golang-go: the oldest toolchain the sources are kept buildable with (go.mod)
MIN_GO = (1, 19)
#: where the toolchain is looked for when ``go`` is not on PATH (the upstream tarball's place)
FALLBACK_GO = Path("/usr/local/go/bin/go")
BUILD_TIMEOUT_S = 600


class AgentBuildError(InternalError):
    """``agentd`` could not be built; the message names the command and ends with its output."""


def sources() -> list[Path]:
    """The files the binary is built from (what a change to it is noticed by)."""
    return sorted([*SOURCE_DIR.glob("*.go"), SOURCE_DIR / "go.mod"])


def source_digest() -> bytes:
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.digest()


def find_go() -> str:
    """The Go toolchain's ``go``, or ``AgentBuildError`` saying how to get one."""
    found = shutil.which("go") or (str(FALLBACK_GO) if os.access(FALLBACK_GO, os.X_OK) else None)
    if found is None:
        raise AgentBuildError(
            "the Go toolchain is needed to build the guest agent (agentd) and was not found "
            f"(no `go` on PATH, no {FALLBACK_GO}): install it, e.g. `apt-get install golang-go` "
            "(scripts/setup does)")
    return found


def build(out: Path, *, cache_dir: Path | None = None,
          timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """Compile ``agentd`` to ``out`` (written whole, then renamed into place). ``cache_dir``:
    Go's build cache (compiling the standard library the first time takes ~10 s of two cores,
    then ~0.2 s); None: the toolchain's default cache when there is a home, else one in
    ``out``'s directory."""
    go = find_go()
    env = {**os.environ, "CGO_ENABLED": "0", "GOOS": "linux", "GOARCH": "amd64",
           "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "", "GOWORK": "off"}
    if cache_dir is not None:
        env["GOCACHE"] = str(cache_dir)
    elif not env.get("GOCACHE") and not env.get("HOME") and not env.get("XDG_CACHE_HOME"):
        env["GOCACHE"] = str(out.parent / ".go-cache")
    tmp = out.with_name(f".{out.name}.part")
    argv = [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(tmp), "."]
    try:
        subprocess.run(argv, cwd=SOURCE_DIR, env=env, capture_output=True, text=True,
                       check=True, timeout=timeout_s)
    except subprocess.CalledProcessError as e:
        tmp.unlink(missing_ok=True)
        output = "\n".join((e.stderr or e.stdout or "").strip().splitlines()[-25:])
        raise AgentBuildError(f"`{' '.join(argv)}` in {SOURCE_DIR} failed with status "
                              f"{e.returncode}:\n{output}") from e
    except subprocess.TimeoutExpired as e:
        tmp.unlink(missing_ok=True)
        raise AgentBuildError(f"`{' '.join(argv)}` did not finish within {timeout_s:g}s") from e
    except OSError as e:
        raise AgentBuildError(f"cannot run `{' '.join(argv)}`: {e}") from e
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out

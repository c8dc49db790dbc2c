"""Templates through the SDK (sync and async) and ``tenki sandbox template``, against the real
server in-process over the fake host (tests/support).

The fake host's ``sh`` knows ``sh -c`` only: the build's setup step (``/bin/sh -se`` with the
script on stdin) would run nothing there. ``scripts`` below teaches it ``sh -se`` (the script
read from stdin, then run by the fake ``sh -c``), and ``setsid``/``python3`` for the start and
ready steps; the real shell is the integration tests' (tests/integration).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from support.fake_host import FakeHost, FakeIO
from support.helpers import eventually
from support.server import InProcessServer

from tenkibox import AsyncClient, Client, errors, models
from tenkibox.cli import _common
from tenkibox.cli._common import CliState
from tenkibox.cli.main import cli
from tenkibox.client import AsyncTemplates, Templates, _core

Run = Callable[..., Result]

#: what the ``noisy`` program writes: terminal controls, a CRLF line end, a tab
NOISY = "\x1b[31mred\x1b[0m\r\nnext\tcol\x07\n"


@pytest.fixture
def client(inproc: InProcessServer) -> Iterator[Client]:
    with Client(endpoint=inproc.url) as c:
        yield c


@pytest.fixture
def run(inproc: InProcessServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """``tenki ARGS`` with ``TENKI_API_ENDPOINT`` set to the in-process server."""
    monkeypatch.setenv("TENKI_API_ENDPOINT", inproc.url)
    monkeypatch.setenv("TENKI_HOME", str(tmp_path / "cli-home"))  # never the user's
    monkeypatch.setenv("TENKI_API_KEY", inproc.api_key)

    def invoke(*args: str, input: bytes | str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), obj=CliState(), input=input)

    return invoke


@pytest.fixture
def scripts(fake_host: FakeHost) -> FakeHost:
    """The fake host runs setup scripts (``sh -se``), ``setsid -f`` and ``python3`` probes."""
    sh = fake_host.programs["sh"]

    async def sh_stdin(io: FakeIO) -> int:
        flag = io.argv[1] if len(io.argv) > 1 else ""
        if flag.startswith("-") and "s" in flag and not flag.endswith("c"):
            script = b""
            while (chunk := await io.read_stdin()) is not None:
                script += chunk
            return await sh(io.with_argv([io.argv[0], "-c", script.decode()]))
        return await sh(io)

    async def ok(io: FakeIO) -> int:
        return 0

    async def noisy(io: FakeIO) -> int:
        io.out(NOISY)
        return 0

    fake_host.programs.update(sh=sh_stdin, setsid=ok, python3=ok, noisy=noisy)
    return fake_host


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def _error(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def _sent(server: InProcessServer, method: str, suffix: str) -> list[Any]:
    return [json.loads(r.body) for r in server.requests.to(method, suffix)]


def _in_thread(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    t = threading.Timer(delay, fn)
    t.start()
    return t


# -- SDK: records -------------------------------------------------------------------------------


def test_template_crud(client: Client, inproc: InProcessServer) -> None:
    t = client.create_template(
        "web", base_image="sandbox", setup_script="echo hi\n", start_cmd="serve",
        ready_when={"port": 8080, "timeout_s": 30}, env={"A": "1"},
        build_env={"TOKEN": "secret"}, cpu=4, memory_mb=2048, tags=["py", "web"])
    assert _sent(inproc, "POST", "/v1/templates") == [{
        "name": "web", "base": {"image": "sandbox"}, "setup_script": "echo hi\n",
        "start_cmd": "serve", "ready_when": {"port": 8080, "timeout_s": 30.0},
        "env": {"A": "1"}, "build_env": {"TOKEN": "secret"}, "cpu": 4, "memory_mb": 2048,
        "tags": ["py", "web"]}]
    assert t.id.startswith("tpl_") and t.name == "web" and t.base.image == "sandbox"
    assert t.ready_when == models.ReadyCheck(port=8080, timeout_s=30)
    assert t.build_env_keys == ["TOKEN"] and "secret" not in t.model_dump_json()
    assert t.latest_build is None
    assert client.get_template(t.id) == t
    assert [x.id for x in client.list_templates()] == [t.id]

    # only what is given changes; None removes
    inproc.requests.clear()
    u = client.update_template(t.id, start_cmd=None, tags=["x"], name="web2",
                               ready_when=models.ReadyCheck(command="true"))
    assert _sent(inproc, "PATCH", t.id) == [
        {"start_cmd": None, "tags": ["x"], "name": "web2", "ready_when": {"command": "true"}}]
    assert (u.name, u.start_cmd, u.tags, u.setup_script) == ("web2", None, ["x"], "echo hi\n")
    assert u.ready_when is not None and u.ready_when.command == "true"
    u = client.update_template(t.id, base_image=None)  # back to the default image
    assert _sent(inproc, "PATCH", t.id)[-1] == {"base": None}
    assert u.base == models.TemplateBase()

    # the namespace spells the same calls
    assert client.templates.get(t.id).name == "web2"
    assert client.templates.create == client.create_template
    assert client.templates.log == client.build_log

    deleted = client.delete_template(t.id)
    assert deleted.id == t.id
    with pytest.raises(errors.TemplateNotFoundError):
        client.get_template(t.id)
    assert client.list_templates() == []


def test_template_name_is_unique(client: Client) -> None:
    client.create_template("same")
    with pytest.raises(errors.ConflictError) as exc:
        client.create_template("same")
    assert exc.value.field == "name" and "'same' exists already" in exc.value.message
    other = client.create_template("other")
    with pytest.raises(errors.ConflictError):
        client.update_template(other.id, name="same")


@pytest.mark.parametrize(
    "kwargs, field, message",
    [
        ({"ready_when": {"port": 0}}, "ready_when.port", "greater than or equal to 1"),
        ({"ready_when": {}}, "ready_when", "give exactly one of port, http_url, command; got none"),
        ({"ready_when": {"port": 1, "command": "x"}}, "ready_when",
         "exactly one of port, http_url, command; got port, command"),
        ({"ready_when": {"prot": 1}}, "ready_when.prot", "extra inputs are not permitted"),
        ({"ready_when": "8080"}, "ready_when", "expected a ReadyCheck or a mapping"),
        ({"base_image": "a", "from_snapshot": "b"}, "base",
         "give one of base_image, from_template, from_snapshot"),
        ({"from_template": "bad id"}, "base.template_id", "invalid id"),
        ({"cpu": 0}, "cpu", "greater than or equal to 1"),
        ({"env": {"1X": "y"}}, "env", "invalid variable name"),
        ({"tags": ["t" * 65]}, "tags.0", "at most 64 characters"),
    ],
)
def test_spec_errors_name_the_field(client: Client, inproc: InProcessServer,
                                    kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(errors.ValidationError) as exc:
        client.create_template("t", **kwargs)
    assert exc.value.field == field
    assert message in exc.value.message
    assert inproc.requests.to("POST", "/v1/templates") == []  # refused before sending


def test_update_errors(client: Client, inproc: InProcessServer) -> None:
    t = client.create_template("t")
    inproc.requests.clear()
    for fields, field in [({"cpu": None}, "cpu"), ({"name": None}, "name"),
                          ({"colour": "red"}, "colour"), ({"memory_mb": 1}, "memory_mb")]:
        with pytest.raises(errors.ValidationError) as exc:
            client.update_template(t.id, **fields)
        assert exc.value.field == field
    assert inproc.requests.to("PATCH", t.id) == []
    with pytest.raises(errors.ValidationError) as exc:
        client.update_template(t.id, from_template=t.id)  # the server's check
    assert exc.value.field == "base.template_id"


# -- SDK: builds --------------------------------------------------------------------------------


def test_build_and_wait_follows_the_log(client: Client, inproc: InProcessServer) -> None:
    t = client.create_template("plain")
    pieces: list[str] = []
    b = client.build_template_and_wait(t.id, timeout=30, on_log=pieces.append)
    assert b.state == models.BuildState.READY and b.snapshot_id and b.version == 1
    log = "".join(pieces)
    assert "step boot: started" in log and "step capture: done" in log
    assert f"build {b.id}: READY (golden snapshot {b.snapshot_id})" in log
    assert "step setup" not in log  # no setup script: boot and capture only
    # the log as stored, and through the iterator (from an offset too)
    assert "".join(client.build_log(t.id, b.id)) == log
    assert "".join(client.templates.log(t.id, b.id, offset=10)) == log[10:]
    assert client.get_build(t.id, b.id) == b
    assert client.list_builds(t.id) == [b]
    assert client.get_template(t.id).latest_build == b
    # unchanged: the build is reused; changed: a second build gets the next version, and the
    # newer one is what sessions start from
    assert client.templates.build_and_wait(t.id) == b
    client.update_template(t.id, env={"CHANGED": "1"})
    b2 = client.templates.build_and_wait(t.id)
    assert b2.version == 2 and client.get_template(t.id).latest_build == b2


def test_sessions_start_from_the_template(client: Client, inproc: InProcessServer) -> None:
    t = client.create_template("from")
    with pytest.raises(errors.ConflictError, match="has no READY build"):
        client.create(template_id=t.id)
    b = client.build_template_and_wait(t.id)
    inproc.requests.clear()
    s = client.create_and_wait(template_id=t.id, name="s1")
    assert _sent(inproc, "POST", "/v1/sessions") == [{"name": "s1", "template_id": t.id}]
    assert s.record.template_id == t.id and s.record.snapshot_id == b.snapshot_id
    assert s.state == models.SessionState.READY
    s2 = client.sessions.create(template_id=t.id)
    assert s2.record.template_id == t.id
    with pytest.raises(errors.ValidationError):
        client.create(template_id=t.id, snapshot_id=b.snapshot_id)
    with pytest.raises(errors.TemplateNotFoundError):
        client.create(template_id="tpl_nope")


def test_one_build_at_a_time(client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("busy")
    gate = fake_host.block("capture")
    b = client.build_template(t.id)
    assert b.state == models.BuildState.PENDING
    gate.wait_entered()
    with pytest.raises(errors.ConflictError, match="template build already in progress"):
        client.build_template(t.id)
    # waiting runs out: the error carries the build as it is
    started = time.monotonic()
    with pytest.raises(errors.WaitTimeoutError) as exc:
        client.wait_build(t.id, b.id, timeout=0.3)
    assert time.monotonic() - started < 5
    assert f"build {b.id} is still BUILDING after 0.3s" in exc.value.message
    assert exc.value.details["state"] == "BUILDING"
    # not without force while it runs
    with pytest.raises(errors.ConflictError, match="build in progress"):
        client.delete_template(t.id)
    gate.release()
    done = client.templates.wait_build(t.id, b.id, timeout=10)
    assert done.state == models.BuildState.READY


def test_build_and_wait_times_out(client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("slow")
    fake_host.block("capture")
    pieces: list[str] = []
    started = time.monotonic()
    with pytest.raises(errors.WaitTimeoutError, match=r"is still BUILDING after 0\.5s"):
        client.build_template_and_wait(t.id, timeout=0.5, on_log=pieces.append)
    assert time.monotonic() - started < 5
    assert "step capture: started" in "".join(pieces)


def test_build_and_wait_times_out_even_before_the_log_answers(
    client: Client, fake_host: FakeHost, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log's read bound is the wait's deadline: when the deadline passed before the log's
    answer even began (CI saw it on a loaded machine), it is the wait's timeout, not a
    ConnectionError."""
    t = client.create_template("slow-open")
    fake_host.block("capture")
    def bound_at_the_deadline(self: _core.BuildFollower, base: float | None) -> httpx.Timeout:
        self.deadline = time.monotonic()  # the clock runs out as the log is opened
        return httpx.Timeout(base, read=1e-6)

    monkeypatch.setattr(_core.BuildFollower, "stream_timeout", bound_at_the_deadline)
    with pytest.raises(errors.WaitTimeoutError, match=r"is still BUILDING after 0\.5s"):
        client.build_template_and_wait(t.id, timeout=0.5)


def test_build_and_wait_reconnects_a_silent_log(
    client: Client, inproc: InProcessServer, fake_host: FakeHost,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A log silent for longer than a long poll is opened again from where it was: nothing is
    lost or shown twice."""
    monkeypatch.setattr(_core, "LONG_POLL_S", 0.2)
    t = client.create_template("quiet")
    gate = fake_host.block("capture")

    def release_after_silence() -> None:
        # Released only once the build is held and the client has opened the silent log
        # again, whatever the machine's load: a fixed delay let a slow build reach the gate
        # after it had opened.
        try:
            gate.wait_entered(timeout=20)
            eventually(lambda: len(inproc.requests.to("GET", "/log")) >= 3, timeout=20,
                       interval=0.05, what="the log opened again")
        finally:
            gate.release()

    _in_thread(0.0, release_after_silence)
    pieces: list[str] = []
    b = client.build_template_and_wait(t.id, timeout=30, on_log=pieces.append)
    assert b.state == models.BuildState.READY
    offsets = [int(r.query["offset"]) for r in inproc.requests.to("GET", "/log")]
    assert len(offsets) >= 3 and offsets[0] == 0 and offsets[-1] > 0
    assert "".join(pieces) == "".join(client.build_log(t.id, b.id))


def test_failed_build_is_returned(client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("broken")
    fake_host.fail_next("boot", errors.InternalError("no kernel"))
    b = client.build_template_and_wait(t.id)
    assert b.state == models.BuildState.FAILED and b.failed_step == "boot"
    assert b.error is not None and b.error.startswith("boot: ") and "no kernel" in b.error
    assert client.wait_build(t.id, b.id) == b
    assert client.get_template(t.id).latest_build is None


def test_setup_script_runs_with_the_build_env(client: Client, scripts: FakeHost) -> None:
    t = client.create_template("scripted", setup_script="echo installing\nenv\n",
                               env={"MODE": "prod"}, build_env={"TOKEN": "s3"},
                               start_cmd="serve", ready_when={"port": 8000})
    pieces: list[str] = []
    b = client.build_template_and_wait(t.id, on_log=pieces.append)
    log = "".join(pieces)
    assert b.state == models.BuildState.READY, log
    assert "installing\n" in log and "MODE=prod\n" in log and "TOKEN=s3\n" in log
    for step in ("boot", "setup", "start", "ready", "capture"):
        assert f"step {step}: done" in log

    client.update_template(t.id, setup_script="echo one\nexit 3\n")
    b = client.build_template_and_wait(t.id)
    assert (b.state, b.failed_step) == (models.BuildState.FAILED, "setup")
    assert b.error == "setup: the setup script exited with 3"
    assert "one\n" in b.log_tail


def test_delete_with_force_cancels_the_build(client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("cancel")
    gate = fake_host.block("capture")
    b = client.build_template(t.id)
    gate.wait_entered()
    assert client.delete_template(t.id, force=True).id == t.id
    gate.release()
    with pytest.raises(errors.TemplateNotFoundError):
        client.get_build(t.id, b.id)


def test_templates_namespace_parity() -> None:
    c, a = Client(endpoint="http://x.test"), AsyncClient(endpoint="http://x.test")
    names = sorted(n for n in dir(Templates) if not n.startswith("_"))
    assert names == sorted(n for n in dir(AsyncTemplates) if not n.startswith("_"))
    for name in names:
        s_fn, a_fn = getattr(c.templates, name), getattr(a.templates, name)
        assert inspect.signature(s_fn).parameters == inspect.signature(a_fn).parameters, name
        assert inspect.isgeneratorfunction(s_fn) == inspect.isasyncgenfunction(a_fn), name


def test_async_client(inproc: InProcessServer, scripts: FakeHost) -> None:
    async def main() -> None:
        async with AsyncClient(endpoint=inproc.url) as client:
            t = await client.templates.create("async", setup_script="echo from-async\n")
            seen: list[str] = []

            async def on_log(text: str) -> None:
                seen.append(text)

            b = await client.build_template_and_wait(t.id, timeout=30, on_log=on_log)
            assert b.state == models.BuildState.READY
            assert "from-async\n" in "".join(seen)
            assert "".join([x async for x in client.build_log(t.id, b.id)]) == "".join(seen)
            assert await client.wait_build(t.id, b.id) == b
            assert await client.list_builds(t.id) == [b]
            s = await client.create_and_wait(template_id=t.id)
            assert s.record.template_id == t.id
            u = await client.update_template(t.id, tags=["a"])
            assert u.tags == ["a"] and (await client.get_template(t.id)).tags == ["a"]
            assert [x.id for x in await client.list_templates()] == [t.id]
            assert (await client.get_build(t.id, b.id)).id == b.id
            gate = scripts.block("capture")  # held: the build is in progress for sure
            b2 = await client.build_template(t.id)
            with pytest.raises(errors.ConflictError):
                await client.build_template(t.id)
            gate.release()
            assert (await client.wait_build(t.id, b2.id)).state == models.BuildState.READY
            await client.delete_template(t.id)

    asyncio.run(main())


# -- CLI: records -------------------------------------------------------------------------------


def test_cli_template_crud(run: Run, client: Client, inproc: InProcessServer,
                           tmp_path: Path) -> None:
    script = tmp_path / "setup.sh"
    script.write_text("apt-get install -y nginx\n")
    out = _ok(run("sandbox", "template", "create", "--name", "web", "--setup-script",
                  str(script), "--start-cmd", "nginx -g 'daemon off;'", "--ready-http",
                  "http://127.0.0.1/health", "--ready-status", "204", "--ready-timeout", "2m",
                  "--env", "A=1", "--build-env", "TOKEN=x", "--cpu", "4", "--memory-mb", "2048",
                  "--tag", "web", "--tag", "nginx", "--json"))
    t = models.Template.model_validate_json(out.stdout)
    assert _sent(inproc, "POST", "/v1/templates") == [{
        "name": "web", "setup_script": "apt-get install -y nginx\n",
        "start_cmd": "nginx -g 'daemon off;'",
        "ready_when": {"http_url": "http://127.0.0.1/health", "http_status": 204,
                       "timeout_s": 120.0},
        "env": {"A": "1"}, "build_env": {"TOKEN": "x"}, "cpu": 4, "memory_mb": 2048,
        "tags": ["web", "nginx"]}]
    assert t == client.get_template(t.id)

    # plain output: the id; the script from stdin
    out = _ok(run("sandbox", "template", "create", "--name", "py", "--from-template", t.id,
                  "--setup-script", "-", "--ready-port", "8000", input="pip install x\n"))
    py_id = out.stdout.strip()
    py = client.get_template(py_id)
    assert py.base.template_id == t.id and py.setup_script == "pip install x\n"
    assert py.ready_when == models.ReadyCheck(port=8000)

    listed = json.loads(_ok(run("sandbox", "template", "list", "--json")).stdout)
    assert [x["id"] for x in listed] == [t.id, py_id]
    table = _ok(run("sandbox", "template", "list")).stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "BASE", "READY", "BUILD", "TAGS", "CREATED"]
    assert table[1].startswith(f"{t.id}  web ") and "web,nginx" in table[1]
    fields = _ok(run("sandbox", "template", "get", t.id)).stdout
    assert f"id:           {t.id}\n" in fields
    assert "ready_when:   http://127.0.0.1/health answers 204 (within 2m)\n" in fields
    assert "build_env:    TOKEN\n" in fields and "latest_build: - (not built yet)\n" in fields
    got = json.loads(_ok(run("sandbox", "template", "get", t.id, "--json")).stdout)
    assert got == json.loads(t.model_dump_json())

    # update: what is given; --ready-timeout alone adjusts the check; --unset removes
    inproc.requests.clear()
    out = _ok(run("sandbox", "template", "update", t.id, "--ready-timeout", "30s",
                  "--unset", "start-cmd", "--unset", "build-env", "--json"))
    assert _sent(inproc, "PATCH", t.id) == [{
        "start_cmd": None, "build_env": None,
        "ready_when": {"http_url": "http://127.0.0.1/health", "http_status": 204,
                       "timeout_s": 30.0}}]
    u = models.Template.model_validate_json(out.stdout)
    assert u.start_cmd is None and u.build_env_keys == [] and u.setup_script
    out = _ok(run("sandbox", "template", "update", t.id, "--name", "web2", "--base-image",
                  "sandbox"))
    assert "name:         web2\n" in out.stdout and "base:         image sandbox\n" in out.stdout

    out = _ok(run("sandbox", "template", "delete", py_id))
    assert out.stdout == f"{py_id} deleted\n"
    deleted = json.loads(_ok(run("sandbox", "template", "delete", t.id, "--json")).stdout)
    assert deleted["id"] == t.id
    assert _ok(run("sandbox", "template", "list")).stderr == "no templates\n"
    line = _error(run("sandbox", "template", "get", t.id))
    assert line == f"error: template {t.id} not found"


def test_cli_name_taken(run: Run, client: Client) -> None:
    client.create_template("dup")
    line = _error(run("sandbox", "template", "create", "--name", "dup"))
    assert line == "error: a template named 'dup' exists already in this workspace"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ready-port", "0"], "error: --ready-port: must be between 1 and 65535, got 0"),
        (["--ready-port", "http"], "error: --ready-port: must be an integer between 1 and 65535"),
        (["--ready-port", "80", "--ready-cmd", "true"],
         "error: --ready-cmd: give only one of --ready-port, --ready-http, --ready-cmd"),
        (["--ready-status", "200"],
         "error: --ready-status: give a check too: --ready-port, --ready-http or --ready-cmd"),
        (["--ready-port", "80", "--ready-status", "200"],
         "error: --ready-status: only with --ready-http"),
        (["--ready-http", "http://x/", "--ready-status", "99"],
         "error: --ready-status: must be between 100 and 599, got 99"),
        (["--ready-http", "ftp://x/"], "error: --ready-http: must be an http:// or https:// URL"),
        (["--ready-timeout", "30s"], "error: --ready-timeout: give a check too"),
        (["--ready-cmd", "true", "--ready-timeout", "2h"],
         "error: --ready-timeout: must be at most 1h, got '2h'"),
        (["--ready-cmd", "true", "--ready-timeout", "soon"],
         "error: --ready-timeout: cannot parse 'soon'"),
        (["--base-image", "a", "--from-snapshot", "snp_x"],
         "error: --from-snapshot: give only one of --base-image, --from-template, "
         "--from-snapshot"),
        (["--from-template", "bad id"], "error: --from-template: invalid id 'bad id'"),
        (["--setup-script", "/nonexistent/setup.sh"],
         "error: --setup-script: cannot read /nonexistent/setup.sh: No such file"),
        (["--start-cmd", ""], "error: --start-cmd: must not be empty"),
        (["--env", "NOPE"], "error: --env: expected KEY=VALUE, got 'NOPE'"),
        (["--build-env", "1X=y"], "error: --build-env: invalid variable name '1X'"),
        (["--cpu", "0"], "error: --cpu: must be between 1 and 16, got 0"),
        (["--memory-mb", "lots"], "error: --memory-mb: must be an integer"),
        (["--tag", "t" * 65], "error: --tag: must be 1 to 64 characters"),
        (["--tag", "a\x1bb"], "error: --tag: must not contain control characters"),
    ],
)
def test_cli_spec_errors_name_the_option(run: Run, inproc: InProcessServer, args: list[str],
                                         message: str) -> None:
    inproc.requests.clear()
    line = _error(run("sandbox", "template", "create", "--name", "t", *args), 2)
    assert line.startswith(message), line
    assert inproc.requests.to("POST", "/v1/templates") == []


def test_cli_setup_script_checks(run: Run, inproc: InProcessServer, tmp_path: Path) -> None:
    big = tmp_path / "big.sh"
    big.write_bytes(b"#" * (models.SETUP_SCRIPT_MAX_BYTES + 1))
    line = _error(run("sandbox", "template", "create", "--name", "t", "--setup-script",
                      str(big)), 2)
    assert line == "error: --setup-script: must be at most 1.0 MiB"
    binary = tmp_path / "bin.sh"
    binary.write_bytes(b"echo \xff\n")
    line = _error(run("sandbox", "template", "create", "--name", "t", "--setup-script",
                      str(binary)), 2)
    assert line == f"error: --setup-script: {binary} is not UTF-8 text (byte 5)"
    assert inproc.requests.to("POST", "/v1/templates") == []


def test_cli_update_errors(run: Run, client: Client, inproc: InProcessServer) -> None:
    t = client.create_template("u", ready_when={"port": 80})
    inproc.requests.clear()
    line = _error(run("sandbox", "template", "update", t.id), 2)
    assert line.startswith("error: nothing to change")
    line = _error(run("sandbox", "template", "update", t.id, "--unset", "tags", "--tag", "x"), 2)
    assert line == "error: --unset: tags is also given a value"
    line = _error(run("sandbox", "template", "update", t.id, "--unset", "base",
                      "--from-snapshot", "snp_x"), 2)
    assert line == "error: --unset: base is also given a value"
    line = _error(run("sandbox", "template", "update", t.id, "--unset", "colour"), 2)
    assert "--unset" in line and "colour" in line
    line = _error(run("sandbox", "template", "update", t.id, "--ready-status", "200"), 2)
    assert line == "error: --ready-status: only with --ready-http"
    assert inproc.requests.to("PATCH", t.id) == []
    # the server's refusals name the option too
    line = _error(run("sandbox", "template", "update", t.id, "--from-template", t.id), 2)
    assert line == "error: --from-template: a template cannot be built from itself"
    line = _error(run("sandbox", "template", "create", "--name", "x", "--from-template",
                      "tpl_nope"))
    assert line == "error: template tpl_nope not found"


# -- CLI: builds --------------------------------------------------------------------------------


def test_cli_build_streams_the_log(run: Run, client: Client) -> None:
    t = client.create_template("plain")
    result = _ok(run("sandbox", "template", "build", t.id))
    b = client.list_builds(t.id)[-1]
    assert b.state == models.BuildState.READY
    assert result.stdout.startswith(f"{b.id} READY (version 1, template {t.id}): snapshot "
                                    f"{b.snapshot_id}, ")
    assert result.stdout.count("\n") == 1
    assert "step boot: started" in result.stderr and "step capture: done" in result.stderr
    assert result.stderr == "".join(client.build_log(t.id, b.id))  # as written, nothing else

    client.update_template(t.id, env={"CHANGED": "1"})  # unchanged, the build is reused
    result = _ok(run("sandbox", "template", "build", t.id, "--json"))
    b2 = models.TemplateBuild.model_validate_json(result.stdout)
    assert b2.version == 2 and b2.state == models.BuildState.READY

    builds = json.loads(_ok(run("sandbox", "template", "builds", t.id, "--json")).stdout)
    assert [x["id"] for x in builds] == [b.id, b2.id]
    table = _ok(run("sandbox", "template", "builds", t.id)).stdout.splitlines()
    assert table[0].split() == ["ID", "VERSION", "STATE", "SNAPSHOT", "ERROR", "CREATED", "TOOK"]
    assert table[1].startswith(f"{b.id}  1        READY")
    assert _ok(run("sandbox", "template", "log", t.id, b2.id)).stdout == "".join(
        client.build_log(t.id, b2.id))
    fields = _ok(run("sandbox", "template", "get", t.id)).stdout
    assert f"latest_build: {b2.id} READY (version 2, template {t.id})" in fields


def test_cli_build_log_is_escaped(run: Run, client: Client, scripts: FakeHost) -> None:
    t = client.create_template("noisy", setup_script="noisy\n")
    result = _ok(run("sandbox", "template", "build", t.id))
    assert "\\x1b[31mred\\x1b[0m\nnext\tcol\\x07\n" in result.stderr
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    out = _ok(run("sandbox", "template", "log", t.id, client.list_builds(t.id)[0].id)).stdout
    assert "\\x1b[31mred" in out and "\x1b" not in out


def test_cli_build_on_a_terminal(run: Run, client: Client, scripts: FakeHost,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With stderr a terminal, the log goes above a spinner line by line, still escaped."""
    monkeypatch.setattr(_common, "stderr_is_tty", lambda: True)
    t = client.create_template("tty", setup_script="noisy\n")
    result = _ok(run("sandbox", "template", "build", t.id))
    assert "step setup: started" in result.stderr
    # (rich expands the tab)
    assert "\\x1b[31mred\\x1b[0m\nnext    col\\x07\n" in result.stderr
    assert "\x1b[31m" not in result.stderr


def test_cli_build_failed(run: Run, client: Client, scripts: FakeHost) -> None:
    t = client.create_template("bad", setup_script="echo trying\nexit 7\n")
    result = run("sandbox", "template", "build", t.id)
    b = client.list_builds(t.id)[0]
    line = _error(result, 1)
    assert line == f"error: build {b.id} FAILED at step setup: the setup script exited with 7"
    assert result.stdout.startswith(f"{b.id} FAILED (version 1, template {t.id}): at step setup")
    assert "trying\n" in result.stderr
    result = run("sandbox", "template", "build", t.id, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["state"] == "FAILED"


def test_cli_second_build_is_refused(run: Run, client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("once")
    gate = fake_host.block("capture")
    out = _ok(run("sandbox", "template", "build", t.id, "--no-wait", "--json"))
    b = models.TemplateBuild.model_validate_json(out.stdout)
    assert b.state == models.BuildState.PENDING
    gate.wait_entered()
    line = _error(run("sandbox", "template", "build", t.id))
    assert line == "error: template build already in progress"
    line = _error(run("sandbox", "template", "delete", t.id))
    assert "has a build in progress" in line
    line = _error(run("sandbox", "template", "build", t.id, "--wait-timeout", "soon"), 2)
    assert line.startswith("error: --wait-timeout: cannot parse 'soon'")
    gate.release()
    assert client.wait_build(t.id, b.id).state == models.BuildState.READY
    client.update_template(t.id, env={"CHANGED": "1"})  # unchanged, the build is reused
    out = _ok(run("sandbox", "template", "build", t.id, "--no-wait"))
    assert out.stdout.endswith(f"PENDING (version 2, template {t.id})\n")


def test_cli_build_wait_timeout(run: Run, client: Client, fake_host: FakeHost) -> None:
    t = client.create_template("slow")
    fake_host.block("capture")
    line = _error(run("sandbox", "template", "build", t.id, "--wait-timeout", "1s"))
    assert "is still BUILDING after 1s; it continues in the background" in line


# -- CLI: sessions from a template --------------------------------------------------------------


def test_cli_sandbox_create_from_template(run: Run, client: Client) -> None:
    t = client.create_template("base")
    b = client.build_template_and_wait(t.id)
    vol = client.create_volume("data", "8MiB")
    out = _ok(run("sandbox", "create", "--template", t.id, "--volume", f"{vol.id}:/data",
                  "--json"))
    s = models.Session.model_validate_json(out.stdout)
    assert s.template_id == t.id and s.snapshot_id == b.snapshot_id
    assert s.state == models.SessionState.READY
    assert [(v.volume_id, v.path) for v in s.volumes] == [(vol.id, "/data")]
    fields = _ok(run("sandbox", "get", s.id)).stdout
    assert f"template:      {t.id}\n" in fields
    table = _ok(run("sandbox", "list")).stdout
    assert t.id in table

    out = _ok(run("sandbox", "create", "--template", t.id, "--no-wait"))
    assert client.get(out.stdout.strip()).record.template_id == t.id

    line = _error(run("sandbox", "create", "--template", t.id, "--snapshot", "snp_x"), 2)
    assert line == "error: --template: give --snapshot or --template, not both"
    empty = client.create_template("empty")
    line = _error(run("sandbox", "create", "--template", empty.id))
    assert "has no READY build; build it first" in line

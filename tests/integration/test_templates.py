"""Templates on real VMs (issue 12): a build runs its setup script, starts a server and waits
until it answers, captures a golden snapshot; a session from the template is a restore in
which the server already runs, with a fresh identity and the session's own env."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest
from support.server import AUTH

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SETUP = """\
echo "setup runs as $(id -un) in $PWD with GREETING=$GREETING"
echo "the build secret has ${#BUILD_SECRET} characters"
sudo install -d -o tenki -g tenki /srv/www
echo "hello from the template" > /srv/www/index.html
"""


def api(server: Any) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=120)


def wait_build(c: httpx.Client, tid: str, bid: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        b = c.get(f"/v1/templates/{tid}/builds/{bid}/wait", params={"timeout_s": 30}).json()
        if b["state"] in ("READY", "FAILED") or time.monotonic() > deadline:
            return b  # type: ignore[no-any-return]


def sh(c: httpx.Client, sid: str, command: str) -> tuple[int, str]:
    p = c.post(f"/v1/sessions/{sid}/processes", json={"command": command, "timeout_s": 30})
    assert p.status_code == 201, p.text
    out, code = b"", None
    with c.stream("GET", f"/v1/sessions/{sid}/processes/{p.json()['process_id']}/events") as r:
        import json

        for line in r.iter_lines():
            ev = json.loads(line)
            if ev["type"] in ("stdout", "stderr"):
                out += base64.b64decode(ev["data"])
            elif ev["type"] == "exit":
                code = ev["exit_code"]
    return code, out.decode()


def test_build_and_start_from_a_template(tenki_server: Any) -> None:
    with api(tenki_server) as c:
        r = c.post("/v1/templates", json={
            "name": "web", "setup_script": SETUP, "memory_mb": 512,
            "start_cmd": "cd /srv/www && exec python3 -m http.server 8080",
            "ready_when": {"port": 8080, "timeout_s": 60},
            "env": {"GREETING": "hi"}, "build_env": {"BUILD_SECRET": "s3cret"},
            "tags": ["demo"]})
        assert r.status_code == 201, r.text
        tpl = r.json()
        assert tpl["build_env_keys"] == ["BUILD_SECRET"] and "s3cret" not in r.text
        build = c.post(f"/v1/templates/{tpl['id']}/builds").json()
        assert build["state"] in ("PENDING", "BUILDING") and build["version"] == 1
        again = c.post(f"/v1/templates/{tpl['id']}/builds")
        assert again.status_code == 409
        assert again.json()["error"]["message"] == "template build already in progress"

        # the log as it is written, until the build ends
        with c.stream("GET", f"/v1/templates/{tpl['id']}/builds/{build['id']}/log") as r:
            text = "".join(r.iter_text())
        done = wait_build(c, tpl["id"], build["id"])
        assert done["state"] == "READY", (done, text)
        for step in ("boot", "setup", "start", "ready", "capture"):
            assert f"step {step}: done" in text, text
        assert "setup runs as tenki in /home/tenki with GREETING=hi" in text
        assert "the build secret has 6 characters" in text and "s3cret" not in text
        assert done["snapshot_id"] and done["completed_at"]
        # the golden snapshot is the template's: not among the user's snapshots
        assert done["snapshot_id"] not in [s["id"] for s in c.get("/v1/snapshots").json()]
        assert c.delete(f"/v1/snapshots/{done['snapshot_id']}").status_code == 409
        # the build session is gone
        states = {s["name"]: s["state"] for s in c.get("/v1/sessions").json()}
        assert states.get("build-web") == "TERMINATED", states

        # a session from the template: a restore in which the server already answers
        s = c.post("/v1/sessions", json={"template_id": tpl["id"], "env": {"MINE": "1"}})
        assert s.status_code == 201, s.text
        sid = s.json()["id"]
        ready = c.get(f"/v1/sessions/{sid}/wait", params={"timeout_s": 60}).json()
        assert ready["state"] == "READY" and ready["template_id"] == tpl["id"], ready
        code, out = sh(c, sid, "python3 -c \"import urllib.request as u; "
                       "print(u.urlopen('http://127.0.0.1:8080/index.html', timeout=2)"
                       ".read().decode(), end='')\"")
        assert (code, out) == (0, "hello from the template\n")
        code, out = sh(c, sid, "echo $GREETING $MINE ${BUILD_SECRET:-none}; hostname")
        lines = out.split()
        assert code == 0 and lines[:3] == ["hi", "1", "none"], out
        assert lines[3] == f"tenki-{sid.split('_', 1)[1][:8]}"  # its own identity
        assert c.delete(f"/v1/sessions/{sid}").json()["state"] == "TERMINATED"

        # unchanged, a build is reused; changed, a second build replaces the first; the
        # template can then go
        assert c.post(f"/v1/templates/{tpl['id']}/builds").json()["id"] == build["id"]
        assert c.patch(f"/v1/templates/{tpl['id']}",
                       json={"env": {"GREETING": "hello"}}).status_code == 200
        b2 = c.post(f"/v1/templates/{tpl['id']}/builds").json()
        assert wait_build(c, tpl["id"], b2["id"])["state"] == "READY"
        got = c.get(f"/v1/templates/{tpl['id']}").json()
        assert got["latest_build"]["id"] == b2["id"] and got["latest_build"]["version"] == 2
        old = c.get(f"/v1/snapshots/{done['snapshot_id']}").json()
        assert old["state"] in ("DELETING", "DELETED"), old
        assert c.delete(f"/v1/templates/{tpl['id']}").status_code == 200
        assert c.get(f"/v1/templates/{tpl['id']}").status_code == 404


def test_a_failing_setup_fails_the_build_naming_the_step(tenki_server: Any) -> None:
    with api(tenki_server) as c:
        tpl = c.post("/v1/templates", json={
            "name": "broken", "memory_mb": 512,
            "setup_script": "echo about to fail\nfalse\necho never\n"}).json()
        build = c.post(f"/v1/templates/{tpl['id']}/builds").json()
        done = wait_build(c, tpl["id"], build["id"])
        assert done["state"] == "FAILED" and done["failed_step"] == "setup", done
        assert done["error"] == "setup: the setup script exited with 1"
        assert "about to fail" in done["log_tail"] and "never" not in done["log_tail"]
        r = c.post("/v1/sessions", json={"template_id": tpl["id"]})
        assert r.status_code == 409 and "has no READY build" in r.text
        assert c.delete(f"/v1/templates/{tpl['id']}").status_code == 200


SPEC = """\
spec_version: tenki.template.v1
env:
  GREETING: hi
steps:
  - name: tools
    apt:
      packages: [jq]
  - mkdir:
      path: /srv/www
  - write_file:
      path: /srv/www/index.html
      content: "hello from a spec\\n"
runtime:
  start_cmd: cd /srv/www && exec python3 -m http.server 8080
  ready_when:
    http_url: http://127.0.0.1:8080/index.html
    timeout_s: 60
resources:
  cpu: 2
  memory_mb: 1024
"""


def test_a_spec_that_installs_a_package(tenki_server: Any, tmp_path: Any) -> None:
    """As a new user would: a spec file that installs a package (from Debian's mirror) and
    starts a server; the build streams its log and ends READY; a session from it answers
    ``curl localhost:8080`` at once. Building again, unchanged, reuses the build."""
    import json

    spec = tmp_path / "web.yaml"
    spec.write_text(SPEC)
    made = tenki_server.cli("sandbox", "template", "create", "--name", "spec-web", "--spec",
                            str(spec), "--json")
    assert made.returncode == 0, made.stderr
    tid = json.loads(made.stdout)["id"]
    built = tenki_server.cli("sandbox", "template", "build", tid, "--json", timeout=900)
    log = built.stderr.decode()
    assert built.returncode == 0, log[-3000:]
    build = json.loads(built.stdout)
    assert build["state"] == "READY" and "--- step 1/3: apt (tools)" in log
    assert "Setting up jq" in log, log[-3000:]
    made = tenki_server.cli("sandbox", "create", "--template", tid, "--json")
    assert made.returncode == 0, made.stderr
    sid = json.loads(made.stdout)["id"]
    got = tenki_server.cli("sandbox", "exec", "--session", sid, "sh", "-c",
                           "jq --version >&2 && curl -s http://localhost:8080/index.html")
    assert got.returncode == 0 and got.stdout == b"hello from a spec\n", got.stderr
    assert tenki_server.cli("sandbox", "terminate", "--session", sid).returncode == 0
    again = tenki_server.cli("sandbox", "template", "build", tid, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["id"] == build["id"]
    assert tenki_server.cli("sandbox", "template", "delete", tid).returncode == 0

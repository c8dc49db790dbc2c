"""Sessions on real VMs (TCG), driven through the real ``tenki`` CLI against a test server.

VMs are expensive here, so one session (``box``) is shared by most tests of this module, in
order: it is killed-and-adopted by the server restart test and terminated by the last test.
Two more VMs exist only as long as their test needs them (max-duration expiry, and the VM
whose QEMU dies while the server is down).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

import pytest
from support.server import AUTH

pytestmark = pytest.mark.integration

MEMORY_MB = "1024"  # guest RAM is lazily allocated, but keep the shared machine's tmpfs light


# -- helpers --------------------------------------------------------------------------------


def cli(server: Any, *args: str, input: bytes | None = None,
        timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
    return server.cli(*args, input=input, timeout=timeout)


def ok(res: subprocess.CompletedProcess[bytes]) -> str:
    """The stdout of a command that must succeed."""
    assert res.returncode == 0, (
        f"{res.args[3:]} exited {res.returncode}: {res.stderr.decode(errors='replace')}"
    )
    return res.stdout.decode()


def error_line(res: subprocess.CompletedProcess[bytes], exit_code: int | None = None) -> str:
    """A failed command printed exactly one ``error: ...`` line and no traceback."""
    err = res.stderr.decode(errors="replace")
    assert res.returncode != 0, f"{res.args[3:]} should have failed: {res.stdout!r}"
    if exit_code is not None:
        assert res.returncode == exit_code, (res.returncode, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def record(server: Any, session_id: str) -> dict[str, Any]:
    return json.loads(ok(cli(server, "sandbox", "get", session_id, "--json")))  # type: ignore[no-any-return]


def _ps() -> str:
    # -ww: without a terminal, ps cuts each line at 80 columns
    return subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True,
                          text=True).stdout


def qemu_pids(session_id: str) -> list[int]:
    """Live (non-zombie) QEMU processes of one session, found by their ``-name``."""
    out = _ps()
    pids = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and "qemu-system" in parts[2] and f"-name {session_id} " in parts[2] \
                and not parts[1].startswith("Z"):
            pids.append(int(parts[0]))
    return pids


def ps_qemu() -> list[str]:
    return [line[:200] for line in _ps().splitlines() if "qemu-system" in line]


def wait_gone(pids: list[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except OSError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def create(server: Any, *args: str) -> dict[str, Any]:
    out = ok(cli(server, "sandbox", "create", "--json", "--memory-mb", MEMORY_MB, *args))
    return json.loads(out)  # type: ignore[no-any-return]


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- the shared session ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def box_record(tenki_server: Any) -> dict[str, Any]:
    return create(tenki_server, "--name", "cli-box", "--cpu", "1", "--env", "FOO=bar",
                  "--env", "EMPTY=", "--metadata", "team=qa", "--metadata", "k=a=b",
                  "--max-duration", "30m")


@pytest.fixture(scope="module")
def box(box_record: dict[str, Any]) -> str:
    return str(box_record["id"])


def test_create_json_record(tenki_server: Any, box_record: dict[str, Any]) -> None:
    r = box_record
    assert r["id"].startswith("ses_") and len(r["id"]) > 8
    assert r["name"] == "cli-box"
    assert r["state"] == "READY"
    assert r["state_reason"] is None
    assert r["cpu"] == 1
    assert r["memory_mb"] == int(MEMORY_MB)
    assert r["base_image_id"] == "sandbox"
    assert sorted(r["env_keys"]) == ["EMPTY", "FOO"]
    assert "bar" not in json.dumps(r), "env values must not be shown, only their keys"
    assert r["metadata"] == {"team": "qa", "k": "a=b"}
    created, expires = parse_time(r["created_at"]), parse_time(r["expires_at"])
    assert created.tzinfo is not None
    assert abs((expires - created).total_seconds() - 1800) < 1
    assert r["ready_at"] is not None and parse_time(r["ready_at"]) >= created
    assert len(qemu_pids(r["id"])) == 1, (ps_qemu(), tenki_server.log_tail())


def test_create_defaults_plain_output(tenki_server: Any, box: str) -> None:
    # the default (no --json) output of create is just the id; checked on `get` for the box
    out = ok(cli(tenki_server, "sandbox", "get", box))
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["id"].strip() == box
    assert fields["state"].strip() == "READY"
    assert fields["cpu"].strip() == "1"
    assert fields["image"].strip() == "sandbox"
    assert fields["env"].strip() == "EMPTY, FOO"


# -- exec -----------------------------------------------------------------------------------


def test_exec_exit_code_and_output(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "sh", "-c", "echo hi; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == b"hi\n"
    assert res.stderr == b""


def test_exec_stdout_and_stderr_apart(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box,
              "sh", "-c", "echo out; echo err >&2; echo out2")
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"out\nout2\n"
    assert res.stderr == b"err\n"


def test_exec_options_after_command_belong_to_it(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "ls", "-d", "--", "/root")
    assert (res.returncode, res.stdout) == (0, b"/root\n"), res.stderr


def test_exec_piped_stdin(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "cat", input=b"data\n")
    assert (res.returncode, res.stdout) == (0, b"data\n"), res.stderr
    blob = os.urandom(300_000) + b"\x00\xff end"
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "sha256sum", input=blob)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()


def test_exec_empty_stdin_is_eof(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "wc", "-c", input=b"")
    assert (res.returncode, res.stdout.strip()) == (0, b"0"), res.stderr


def test_exec_timeout_exits_124(tenki_server: Any, box: str) -> None:
    t0 = time.monotonic()
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "--timeout", "1s",
              "sleep", "10")
    took = time.monotonic() - t0
    assert res.returncode == 124, res.stderr
    assert took < 9, f"the timeout did not cut the command short ({took:.1f}s)"


def test_exec_env_and_cwd(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "--env", "A=1",
              "--env", "B=x=y", "--cwd", "/tmp",
              "sh", "-c", 'echo "$A|$B|$FOO|${EMPTY-unset}"; pwd')
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines() == ["1|x=y|bar|", "/tmp"]
    # an exec's --env overrides the session's for that command only
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "--env", "FOO=mine",
              "sh", "-c", "echo $FOO")
    assert res.stdout == b"mine\n"
    assert cli(tenki_server, "sandbox", "exec", "--session", box,
               "sh", "-c", "echo $FOO").stdout == b"bar\n"


def test_exec_bad_cwd_and_missing_program(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "--cwd", "/nonexistent", "true")
    assert "cwd" in error_line(res) or "nonexistent" in error_line(res)
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "no-such-program-xyz")
    line = error_line(res)
    assert "no-such-program-xyz" in line or "argv" in line


# -- files ----------------------------------------------------------------------------------


def test_files_write_local_file_and_read(tenki_server: Any, box: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40 + "é\n".encode() + b"\x00"
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    out = ok(cli(tenki_server, "sandbox", "files", "write", "--session", box,
                 "/root/dir/blob.bin", str(local)))
    assert "/root/dir/blob.bin" in out
    res = cli(tenki_server, "sandbox", "files", "read", "--session", box, "/root/dir/blob.bin")
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    # the guest sees the same bytes
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "sha256sum",
              "/root/dir/blob.bin")
    assert res.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_files_write_from_stdin(tenki_server: Any, box: str) -> None:
    data = b"from stdin\n\x01\x02"
    res = cli(tenki_server, "sandbox", "files", "write", "--session", box, "--json",
              "/tmp/in.txt", "-", input=data)
    assert json.loads(ok(res)) == {"path": "/tmp/in.txt", "size_bytes": len(data)}
    res = cli(tenki_server, "sandbox", "files", "read", "--session", box, "/tmp/in.txt")
    assert (res.returncode, res.stdout) == (0, data), res.stderr


def test_files_read_what_exec_wrote(tenki_server: Any, box: str) -> None:
    ok(cli(tenki_server, "sandbox", "exec", "--session", box,
           "sh", "-c", "printf 'a\\nb' > /root/made.txt"))
    res = cli(tenki_server, "sandbox", "files", "read", "--session", box, "/root/made.txt")
    assert res.stdout == b"a\nb"


def test_files_errors(tenki_server: Any, box: str, tmp_path: Path) -> None:
    line = error_line(cli(tenki_server, "sandbox", "files", "read", "--session", box,
                          "/root/missing.txt"))
    assert "/root/missing.txt: no such file or directory" in line
    line = error_line(cli(tenki_server, "sandbox", "files", "write", "--session", box,
                          "/root/x", str(tmp_path / "absent")), 2)
    assert "absent" in line
    # a relative path is relative to the guest user's home (as on Tenki's wire)
    line = error_line(cli(tenki_server, "sandbox", "files", "read", "--session", box,
                          "relative.txt"), 1)
    assert "/home/tenki/relative.txt: no such file or directory" in line


# -- list and get ---------------------------------------------------------------------------


def test_list_json_and_table(tenki_server: Any, box: str) -> None:
    listed = json.loads(ok(cli(tenki_server, "sandbox", "list", "--json")))
    assert isinstance(listed, list)
    mine = [s for s in listed if s["id"] == box]
    assert len(mine) == 1 and mine[0]["state"] == "READY" and mine[0]["name"] == "cli-box"
    table = ok(cli(tenki_server, "sandbox", "list"))
    header, *rows = table.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "STATE"]
    assert any(r.split()[:3] == [box, "cli-box", "READY"] for r in rows), table
    only = json.loads(ok(cli(tenki_server, "sandbox", "list", "--state", "terminated", "--json")))
    assert box not in [s["id"] for s in only]


def test_get_json(tenki_server: Any, box: str, box_record: dict[str, Any]) -> None:
    r = record(tenki_server, box)
    assert r["id"] == box and r["state"] == "READY"
    assert r["created_at"] == box_record["created_at"]
    assert r == json.loads(ok(cli(tenki_server, "sandbox", "get", "--session", box, "--json")))


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ("sandbox", "get", "ses_x"),
    ("sandbox", "exec", "--session", "ses_x", "true"),
    ("sandbox", "files", "read", "--session", "ses_x", "/etc/hostname"),
    ("sandbox", "terminate", "--session", "ses_x"),
])
def test_unknown_session(tenki_server: Any, args: tuple[str, ...]) -> None:
    assert error_line(cli(tenki_server, *args)) == "error: session ses_x not found"


@pytest.mark.parametrize("args, field", [
    (("--cpu", "99"), "--cpu"),
    (("--cpu", "0"), "--cpu"),
    (("--cpu", "two"), "--cpu"),
    (("--memory-mb", "100"), "--memory-mb"),
    (("--memory-mb", "99999999"), "--memory-mb"),
    (("--env", "FOO"), "--env"),
    (("--env", "=v"), "--env"),
    (("--env", "1X=v"), "--env"),
    (("--metadata", "novalue"), "--metadata"),
    (("--max-duration", "-5m"), "--max-duration"),
    (("--max-duration", "abc"), "--max-duration"),
    (("--max-duration", "0s"), "--max-duration"),
])
def test_create_bad_input(tenki_server: Any, args: tuple[str, ...], field: str) -> None:
    before = {s["id"] for s in json.loads(ok(cli(tenki_server, "sandbox", "list", "--json")))}
    line = error_line(cli(tenki_server, "sandbox", "create", *args), 2)
    assert line.startswith(f"error: {field}: "), line
    after = {s["id"] for s in json.loads(ok(cli(tenki_server, "sandbox", "list", "--json")))}
    assert after == before, "bad input must not create a session"


@pytest.mark.parametrize("args, field", [
    (("--timeout", "-1s"), "--timeout"),
    (("--timeout", "soon"), "--timeout"),
    (("--env", "NOEQUALS"), "--env"),
])
def test_exec_bad_input(tenki_server: Any, box: str, args: tuple[str, ...], field: str) -> None:
    line = error_line(cli(tenki_server, "sandbox", "exec", "--session", box, *args, "true"), 2)
    assert line.startswith(f"error: {field}: "), line


# -- isolation ------------------------------------------------------------------------------

PROBE = r"""
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        print(target, "open")
    except OSError as exc:
        print(target, "closed", type(exc).__name__, exc)
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def host_http_server(tmp_path: Path) -> Iterator[int]:
    """A plain HTTP server on the host's loopback only (like any local dev service)."""
    (tmp_path / "secret.txt").write_text("host secret")

    def handler(*a: Any, **kw: Any) -> _Quiet:
        return _Quiet(*a, directory=str(tmp_path), **kw)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_guest_cannot_reach_host_loopback(tenki_server: Any, box: str,
                                          host_http_server: int) -> None:
    api_port = urlsplit(tenki_server.url).port
    assert api_port
    # both services answer on the host itself: the guest failing to reach them means something
    with urlopen(f"http://127.0.0.1:{host_http_server}/secret.txt", timeout=5) as resp:
        assert resp.read() == b"host secret"
    with urlopen(Request(f"{tenki_server.url}/v1/health", headers=AUTH), timeout=5) as resp:
        assert resp.status == 200
    ok(cli(tenki_server, "sandbox", "files", "write", "--session", box, "/root/probe.py", "-",
           input=PROBE.encode()))
    targets = [f"10.0.2.2:{api_port}", f"10.0.2.2:{host_http_server}",
               f"10.0.2.3:{api_port}", "deb.debian.org:80"]
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "python3", "/root/probe.py",
              *targets, timeout=120)
    assert res.returncode == 0, res.stderr
    seen = {line.split()[0]: line.split()[1] for line in res.stdout.decode().splitlines()}
    assert seen == {
        f"10.0.2.2:{api_port}": "closed",
        f"10.0.2.2:{host_http_server}": "closed",
        f"10.0.2.3:{api_port}": "closed",
        "deb.debian.org:80": "open",
    }, res.stdout.decode()
    # and no HTTP request from the guest reaches the host's services either
    fetch = (f"import urllib.request; urllib.request.urlopen("
             f"'http://10.0.2.2:{host_http_server}/secret.txt', timeout=5)")
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "python3", "-c", fetch)
    assert res.returncode != 0 and b"host secret" not in res.stdout


def test_guest_outbound_dns(tenki_server: Any, box: str) -> None:
    res = cli(tenki_server, "sandbox", "exec", "--session", box,
              "getent", "hosts", "deb.debian.org", timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"deb.debian.org" in res.stdout


# -- max duration ---------------------------------------------------------------------------


def test_max_duration_expiry(tenki_server: Any) -> None:
    r = create(tenki_server, "--name", "short", "--cpu", "1", "--max-duration", "20s",
               "--no-wait")
    sid = r["id"]
    assert r["state"] == "CREATING"
    created, expires = parse_time(r["created_at"]), parse_time(r["expires_at"])
    assert abs((expires - created).total_seconds() - 20) < 1
    pids: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = pids or qemu_pids(sid)
        r = record(tenki_server, sid)
        if r["state"] in ("TERMINATED", "FAILED"):
            break
        time.sleep(0.5)
    assert r["state"] == "TERMINATED", r
    assert pids, "the session's QEMU was never seen running"
    assert r["ready_at"] is not None, f"it expired before it ever ran: {r}"
    assert "max duration" in (r["state_reason"] or ""), r
    assert parse_time(r["terminated_at"]) >= expires
    assert wait_gone(pids), f"QEMU {pids} still runs after expiry"
    assert qemu_pids(sid) == []
    line = error_line(cli(tenki_server, "sandbox", "exec", "--session", sid, "true"), 1)
    assert sid in line and "TERMINATED" in line


# -- server restart -------------------------------------------------------------------------


def test_server_kill9_keeps_sessions(tenki_server: Any, box: str) -> None:
    victim = create(tenki_server, "--name", "victim", "--cpu", "1")["id"]
    boot_id = ok(cli(tenki_server, "sandbox", "exec", "--session", box,
                     "cat", "/proc/sys/kernel/random/boot_id")).strip()
    ok(cli(tenki_server, "sandbox", "exec", "--session", box,
           "sh", "-c", "echo before > /dev/shm/marker"))
    box_pids, victim_pids = qemu_pids(box), qemu_pids(victim)
    assert len(box_pids) == 1 and len(victim_pids) == 1

    # a command streaming its output when the server dies
    env = dict(tenki_server.env, TENKI_API_ENDPOINT=tenki_server.url)
    streaming = subprocess.Popen(
        [sys.executable, "-m", "tenkibox", "sandbox", "exec", "--session", box,
         "sh", "-c", "echo started; sleep 60"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert streaming.stdout is not None
        assert streaming.stdout.readline() == b"started\n"
        tenki_server.kill9()
        _, err = streaming.communicate(timeout=30)
    finally:
        if streaming.poll() is None:
            streaming.kill()
            streaming.wait()
    assert streaming.returncode == 1, err
    assert b"Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(b"error: "), err

    # the VMs outlive the server; one of them dies while no server watches it
    assert qemu_pids(box) == box_pids
    os.kill(victim_pids[0], signal.SIGKILL)
    assert wait_gone(victim_pids)
    res = cli(tenki_server, "sandbox", "get", box, timeout=60)
    assert res.returncode != 0 and b"Traceback" not in res.stderr  # no server answers
    tenki_server.start()

    r = record(tenki_server, box)
    assert r["state"] in ("READY", "RUNNING"), r
    assert qemu_pids(box) == box_pids, "the same QEMU must be adopted, not a new one"
    res = cli(tenki_server, "sandbox", "exec", "--session", box,
              "sh", "-c", "cat /dev/shm/marker /proc/sys/kernel/random/boot_id; exit 7")
    assert res.returncode == 7, res.stderr
    assert res.stdout.decode().split() == ["before", boot_id], "the VM was rebooted"
    res = cli(tenki_server, "sandbox", "exec", "--session", box, "cat", input=b"still piped")
    assert (res.returncode, res.stdout) == (0, b"still piped"), res.stderr

    v = record(tenki_server, victim)
    assert v["state"] == "TERMINATED", v
    assert v["state_reason"] and "restart" in v["state_reason"], v
    line = error_line(cli(tenki_server, "sandbox", "exec", "--session", victim, "true"), 1)
    assert victim in line and "TERMINATED" in line
    listed = {s["id"]: s["state"] for s in
              json.loads(ok(cli(tenki_server, "sandbox", "list", "--json")))}
    assert listed[victim] == "TERMINATED" and listed[box] in ("READY", "RUNNING")


# -- terminate (last: it ends the shared session) -------------------------------------------


def test_terminate_then_exec_conflicts(tenki_server: Any, box: str) -> None:
    pids = qemu_pids(box)
    assert pids
    out = ok(cli(tenki_server, "sandbox", "terminate", "--session", box))
    assert out.split() == [box, "TERMINATED"]
    assert wait_gone(pids), "QEMU still runs after terminate"
    assert record(tenki_server, box)["state"] == "TERMINATED"
    line = error_line(cli(tenki_server, "sandbox", "exec", "--session", box, "true"), 1)
    assert line == f"error: session {box} is TERMINATED, not running", line
    line = error_line(cli(tenki_server, "sandbox", "files", "read", "--session", box,
                          "/etc/hostname"), 1)
    assert "TERMINATED" in line
    # terminate is idempotent
    again = json.loads(ok(cli(tenki_server, "sandbox", "terminate", box, "--json")))
    assert again["state"] == "TERMINATED"
    left = [p for p in tenki_server.run_root.rglob("*") if box in p.parts]
    assert not left, f"run files left after terminate: {left}"

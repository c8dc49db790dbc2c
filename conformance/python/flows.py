#!/usr/bin/env python3
"""Conformance: the unmodified official Python SDK (PyPI ``tenki==1.4.1``) against a live server.

    TENKI_API_ENDPOINT=http://127.0.0.1:PORT TENKI_API_KEY=tk_... python conformance/python/flows.py

Only the environment configures the client (the endpoint is ``tenki serve``'s ``grpc_endpoint``).
Written from the package's README and its public API (``tenki.Client``, ``Sandbox``,
``client.snapshots``, ``client.volumes``). Prints one line per step; on the first failure it
says which step and why, cleans up, and exits 1. Everything it creates is terminated or deleted
before it exits, failure or not.
"""

from __future__ import annotations

import sys
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import Any

import tenki
from tenki import (
    Client,
    SnapshotFailedError,
    SnapshotNotFoundError,
)

TIMEOUT = 600.0  # seconds: sessions and snapshots under TCG on a busy machine are slow
MOUNT = "/home/tenki/cache"
T0 = time.monotonic()


class Failed(Exception):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failed(msg)


def step(name: str, fn: Callable[[], Any]) -> Any:
    t = time.monotonic()
    try:
        out = fn()
    except Exception as exc:
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
        if not isinstance(exc, Failed):
            traceback.print_exc()
        raise SystemExit(1) from exc
    extra = f": {out}" if isinstance(out, str) else ""
    print(f"ok   {name} ({time.monotonic() - t:.1f}s){extra}", flush=True)
    return out


class Made:
    """What this run created, undone in reverse order at the end."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sandboxes: list[Any] = []
        self.snapshots: list[str] = []
        self.volumes: list[str] = []

    def cleanup(self) -> bool:
        ok = True
        for sb in reversed(self.sandboxes):
            try:
                sb.close()  # TerminateSession
            except Exception as exc:
                ok = False
                print(f"cleanup: terminate {sb.id}: {type(exc).__name__}: {exc}", flush=True)
        for sid in reversed(self.snapshots):
            try:
                self.client.snapshots.delete(sid)
            except SnapshotNotFoundError:
                pass
            except Exception as exc:
                ok = False
                print(f"cleanup: delete snapshot {sid}: {type(exc).__name__}: {exc}", flush=True)
        for vid in reversed(self.volumes):
            try:
                self.client.volumes.delete(vid)
            except tenki.VolumeNotFoundError:
                pass
            except Exception as exc:
                ok = False
                print(f"cleanup: delete volume {vid}: {type(exc).__name__}: {exc}", flush=True)
        return ok


def flows(client: Client, made: Made) -> None:
    tag = uuid.uuid4().hex[:8]

    # -- volumes (created first: attached at create) --------------------------------------
    def volume_create() -> str:
        vol = client.volumes.create(name=f"conf-py-{tag}", size_bytes=64 * tenki.MiB)
        made.volumes.append(vol.id)
        check(vol.name == f"conf-py-{tag}", f"volume name {vol.name!r}")
        check(vol.size_bytes == 64 * tenki.MiB, f"volume size {vol.size_bytes}")
        got = client.volumes.wait_ready(vol.id, timeout=120)
        check(got.state == "AVAILABLE", f"volume state {got.state}")
        check(vol.id in {v.id for v in client.volumes.list()}, "volume not in volumes.list()")
        return vol.id

    vol_id = step("volumes.create / wait_ready / list", volume_create)

    # -- sessions ---------------------------------------------------------------------------
    def create() -> Any:
        sb = client.create(name=f"conf-py-{tag}", tags=["conformance"], timeout=TIMEOUT,
                           volumes=[{"volume_id": vol_id, "mount_path": MOUNT}])
        made.sandboxes.append(sb)
        check(sb.state == "RUNNING", f"state after create(wait=True): {sb.state}")
        check(client.get(sb.id).state == "RUNNING", "get(): not RUNNING")
        check(sb.id in {s.id for s in client.list()}, "the new sandbox is not in client.list()")
        return sb

    sb = step("create (wait) with a volume attached / get / list", create)

    def exec_plain() -> None:
        r = sb.exec("sh", "-c", "echo out; echo err >&2; exit 3")
        check(r.exit_code == 3, f"exit code {r.exit_code}, want 3 ({r})")
        check(r.stdout == b"out\n", f"stdout {r.stdout!r}")
        check(r.stderr == b"err\n", f"stderr {r.stderr!r}")
        check(not r.ok, "ok for exit 3")
        r = sb.exec("echo", "hello world")
        check(r.ok and r.stdout_text == "hello world\n", f"echo: {r}")
        r = sb.exec(["pwd"])
        check(r.stdout_text.strip() == "/home/tenki", f"default cwd {r.stdout_text!r}")
        r = sb.exec("sh", "-c", 'echo "$GREETING"', env={"GREETING": "hi there"})
        check(r.stdout_text == "hi there\n", f"env: {r.stdout_text!r}")

    step("exec: stdout, stderr, exit code, cwd, env", exec_plain)

    def exposed_port() -> str:
        # a web server in the sandbox, reached through the preview URL (inbound is the SDK's
        # default): with the URL's token it answers, without it the proxy refuses
        sb.exec("sh", "-c", "mkdir -p /home/tenki/www && echo hello-preview > "
                "/home/tenki/www/index.html && cd /home/tenki/www && (setsid python3 -m "
                "http.server 8080 >/dev/null 2>&1 < /dev/null &) && for i in $(seq 100); do "
                "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8080))' "
                "2>/dev/null && exit 0; sleep 0.1; done; exit 1", check=True)
        exposed = sb.expose_port(8080, ttl=600)
        check(exposed.port == 8080 and exposed.url.startswith("http"), f"exposed: {exposed}")
        # straight to the host's proxy, whatever proxy the environment names
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(exposed.url, timeout=30) as resp:
            body = resp.read()
        check(body == b"hello-preview\n", f"through the URL: {body!r}")
        try:
            direct.open(exposed.url.split("?", 1)[0], timeout=30)
            raise Failed("the URL without its token answered")
        except urllib.error.HTTPError as exc:
            check(exc.code == 401, f"without the token: {exc.code}")
        listed = [p.port for p in sb.list_exposed_ports()]
        check(listed == [8080], f"list_exposed_ports: {listed}")
        sb.unexpose_port(8080)
        check(sb.list_exposed_ports() == [], "still listed after unexpose_port")
        return exposed.url.split("?", 1)[0]

    step("expose_port: a web server reached through its URL, 401 without the token",
         exposed_port)

    def exec_stdin() -> None:
        r = sb.exec("cat", input=b"from stdin\n")
        check(r.ok and r.stdout == b"from stdin\n", f"exec(input=): {r}")
        proc = sb.start("sh", "-c", "read name; echo hello $name")
        proc.write_stdin("tenki\n")
        proc.close_stdin()
        out = b"".join(proc.stdout)
        res = proc.wait()
        res.check()
        check(out == b"hello tenki\n" or res.stdout == b"hello tenki\n",
              f"start/write_stdin: {out!r} / {res}")

    step("exec with stdin (exec(input=) and start/write_stdin/close_stdin)", exec_stdin)

    def files() -> None:
        sb.fs.write_text("conformance.txt", "written before the snapshot\n")
        check(sb.fs.read_text("conformance.txt") == "written before the snapshot\n",
              "read_text(relative) differs")
        check(sb.fs.read_text("/home/tenki/conformance.txt") == "written before the snapshot\n",
              "the relative path is not under /home/tenki")
        r = sb.exec("cat", "/home/tenki/conformance.txt")
        check(r.stdout == b"written before the snapshot\n", f"cat in the guest: {r}")
        sb.fs.write_bytes("sub/bin.dat", bytes(range(256)))
        check(sb.fs.read_bytes("sub/bin.dat") == bytes(range(256)), "binary round trip")
        info = sb.fs.stat("sub/bin.dat")
        check(info.size == 256, f"stat size {info.size}")
        try:
            sb.fs.read_text("does-not-exist.txt")
        except tenki.FileNotFoundError:
            pass
        else:
            raise Failed("reading a missing file did not raise FileNotFoundError")

    step("files: write/read (relative under /home/tenki), bytes, stat, missing", files)

    def volume_use() -> None:
        mounts = [m.mount_path for m in sb.info.volume_mounts]
        check(MOUNT in mounts, f"volume_mounts {mounts}")
        sb.fs.write_text("cache/v.txt", "on-the-volume\n")  # data plane WriteFile
        r = sb.exec("sh", "-c", f"cat {MOUNT}/v.txt && grep -q ' {MOUNT} ' /proc/mounts")
        check(r.ok and r.stdout == b"on-the-volume\n", f"file on the volume: {r}")
        # a new volume's root belongs to the sandbox user, whose commands run as it
        r = sb.exec("sh", "-c", f"echo by-the-guest-user > {MOUNT}/u.txt && id -un")
        check(r.ok and r.stdout == b"tenki\n", f"the guest user writes in its volume: {r}")
        got = client.volumes.get(vol_id)
        check(got.state == "IN_USE" or len(got.active_attachments) == 1,
              f"attached volume: state {got.state}, attachments {got.active_attachments}")
        try:
            client.volumes.delete(vol_id)
        except tenki.VolumeInUseError:
            pass
        else:
            raise Failed("deleting an attached volume did not raise VolumeInUseError")
        sb.detach_volume(vol_id, wait=120)
        r = sb.exec("sh", "-c", f"grep -c ' {MOUNT} ' /proc/mounts || true")
        check(r.stdout_text.strip() == "0", f"still mounted after detach: {r.stdout_text!r}")
        check(client.volumes.get(vol_id).state == "AVAILABLE", "volume not AVAILABLE after detach")
        client.volumes.delete(vol_id)
        made.volumes.remove(vol_id)
        try:
            client.volumes.get(vol_id)
        except tenki.VolumeNotFoundError:
            pass
        else:
            gone = client.volumes.get(vol_id)
            check(gone.state in ("DELETED", "DELETING"), f"deleted volume: {gone.state}")

    step("volumes: write on the mount, in-use delete refused, detach, delete", volume_use)

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot() -> Any:
        snap = client.snapshots.create_and_wait(sb.id, name=f"conf-py-{tag}", timeout=TIMEOUT)
        made.snapshots.append(snap.id)
        check(snap.state == "READY", f"state {snap.state}")
        check(snap.session_id == sb.id, f"session_id {snap.session_id}")
        check(snap.name == f"conf-py-{tag}", f"name {snap.name!r}")
        got = client.snapshots.get(snap.id)
        check(got.id == snap.id and got.state == "READY", f"get: {got}")
        check(snap.id in {s.id for s in client.snapshots.list()}, "not in snapshots.list()")
        check(snap.id in {s.id for s in client.snapshots.list_session(sb.id)},
              "not in snapshots.list_session()")
        return snap

    snap = step("snapshots.create_and_wait / get / list / list_session", snapshot)

    def snapshot_async() -> None:
        s2 = client.snapshots.create(sb.id, name=f"conf-py-{tag}-async", async_=True)
        made.snapshots.append(s2.id)
        check(s2.state in ("CREATING", "READY"), f"async create: {s2.state}")
        s2 = client.snapshots.wait_ready(s2.id, timeout=TIMEOUT)
        check(s2.state == "READY", f"wait_ready: {s2.state}")
        deleted = client.snapshots.delete(s2.id)
        made.snapshots.remove(s2.id)
        check(deleted.id == s2.id, f"delete answered {deleted.id}")
        try:
            got = client.snapshots.get(s2.id)
        except SnapshotNotFoundError:
            return
        check(got.state in ("DELETING", "DELETED"), f"deleted snapshot: {got.state}")
        check(s2.id not in {s.id for s in client.snapshots.list()}, "deleted one still listed")

    step("snapshots.create(async_=True) / wait_ready / delete", snapshot_async)

    def restore() -> Any:
        r = client.create(snapshot_id=snap.id, name=f"conf-py-{tag}-restored", timeout=TIMEOUT)
        made.sandboxes.append(r)
        check(r.id != sb.id, "the restore has the source's id")
        check(r.state == "RUNNING", f"restored state {r.state}")
        got = r.fs.read_text("conformance.txt")
        check(got == "written before the snapshot\n", f"file in the restore: {got!r}")
        # the restore is its own machine
        r.fs.write_text("conformance.txt", "changed in the restore\n")
        check(sb.fs.read_text("conformance.txt") == "written before the snapshot\n",
              "a write in the restore changed the source")
        return r

    restored = step("create(snapshot_id=) and read back the file written before it", restore)

    def not_found() -> None:
        unknown = "snp_doesnotexist000000"
        try:
            client.snapshots.get(unknown)
        except SnapshotNotFoundError:
            pass
        else:
            raise Failed("snapshots.get(unknown) did not raise SnapshotNotFoundError")
        try:
            extra = client.create(snapshot_id=unknown, timeout=120)
        except SnapshotNotFoundError:
            return
        made.sandboxes.append(extra)
        raise Failed("create(snapshot_id=unknown) did not raise SnapshotNotFoundError")

    step("SnapshotNotFoundError for an unknown snapshot id (get, create)", not_found)

    # -- a FAILED snapshot: terminate the session while its snapshot is being captured --------
    def failed() -> str:
        sb.exec("sh", "-c", "head -c 64M /dev/urandom > /dev/shm/noise", check=True)
        s3 = client.snapshots.create(sb.id, name=f"conf-py-{tag}-doomed", async_=True)
        made.snapshots.append(s3.id)
        sb.close()  # TerminateSession while the capture runs
        try:
            got = client.snapshots.wait_ready(s3.id, timeout=TIMEOUT)
        except SnapshotFailedError as exc:
            check(bool(exc.failure_reason), "SnapshotFailedError without failure_reason")
            check(client.snapshots.get(s3.id).state == "FAILED", "get: not FAILED")
            return f"failure_reason={exc.failure_reason!r}"
        raise Failed(f"the capture outlived its terminated session: {got.state}")

    step("SnapshotFailedError: a snapshot whose session is terminated mid-capture", failed)

    # -- pause / resume (on the restored session) ---------------------------------------------
    def pause_resume() -> None:
        restored.exec("sh", "-c", "echo kept-in-memory > /dev/shm/mem && "
                      "setsid sleep 3600 >/dev/null 2>&1 < /dev/null & echo $! > /home/tenki/pid",
                      check=True)
        restored.pause()
        check(client.get(restored.id).state == "PAUSED",
              f"after pause(): {client.get(restored.id).state}")
        restored.resume()
        check(client.get(restored.id).state == "RUNNING",
              f"after resume(): {client.get(restored.id).state}")
        r = restored.exec("sh", "-c", "cat /dev/shm/mem; kill -0 $(cat /home/tenki/pid) && "
                          "echo alive")
        check(r.stdout == b"kept-in-memory\nalive\n", f"after resume: {r}")

    step("pause / resume (memory and processes kept)", pause_resume)

    def terminate() -> None:
        for s in list(made.sandboxes):
            s.close()
            made.sandboxes.remove(s)
            st = client.get(s.id).state
            check(st in ("TERMINATING", "TERMINATED"), f"{s.id} after close(): {st}")
        for sid in list(made.snapshots):
            client.snapshots.delete(sid)
            made.snapshots.remove(sid)

    step("terminate the sessions, delete the snapshots", terminate)


def main() -> int:
    print(f"tenki SDK {metadata.version('tenki')} from {tenki.__file__}", flush=True)
    client = step("Client() from TENKI_API_ENDPOINT / TENKI_API_KEY", Client)
    made = Made(client)
    code = 0
    try:
        flows(client, made)
    except SystemExit as exc:
        code = int(exc.code or 1)
    finally:
        if not made.cleanup():
            code = code or 1
        client.close()
    print(("PASS" if code == 0 else "FAILED") + f" python conformance "
          f"({time.monotonic() - T0:.0f}s)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

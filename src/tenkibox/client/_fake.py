"""An in-memory fake of the REST API for unit tests of the SDK and the CLI.

    fake = FakeServer()
    client = Client(endpoint="http://fake", transport=fake.transport())
    aclient = AsyncClient(endpoint="http://fake", transport=fake.async_transport())

It follows docs/api.md (status codes, error bodies, NDJSON events) with no VM behind it: the
commands it "runs" are given by ``fake.programs`` (a few, such as ``echo``, ``cat`` and a tiny
``sh -c``, are built in). Never use it in integration tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pydantic

from .. import errors, models
from ..ids import new_id

#: A program: (argv, stdin bytes) -> (stdout, stderr, exit code)
Program = Callable[[list[str], bytes], tuple[bytes, bytes, int]]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FakeProcess:
    id: str
    session_id: str
    argv: list[str]
    streaming: bool  # "cat" with an open stdin pipe: echoes stdin as it arrives
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, event: dict[str, Any]) -> None:
        with self.cond:
            if self.done:
                return
            self.events.append(event)
            if event["type"] in ("exit", "error"):
                self.done = True
            self.cond.notify_all()

    def output(self, stream: str, data: bytes) -> None:
        if data:
            self.add({"type": stream, "data": base64.b64encode(data).decode()})

    def exit(self, code: int, timed_out: bool = False) -> None:
        self.add({"type": "exit", "exit_code": code, "timed_out": timed_out})


def _sh(argv: list[str], stdin: bytes) -> tuple[bytes, bytes, int]:
    """A tiny ``sh -c``: ``;``-separated ``echo [..] [>&2]``, ``exit N``, ``cat``, ``true``,
    ``false``."""
    out, err = bytearray(), bytearray()
    flags = [i for i, a in enumerate(argv[1:], 1) if a.startswith("-") and a.endswith("c")]
    script = argv[flags[0] + 1] if flags and flags[0] + 1 < len(argv) else ""
    for part in script.split(";"):
        words = shlex.split(part)
        if not words:
            continue
        to_err = words[-1] == ">&2"
        if to_err:
            words = words[:-1]
        target = err if to_err else out
        if words[0] == "echo":
            target.extend((" ".join(words[1:]) + "\n").encode())
        elif words[0] == "exit":
            return bytes(out), bytes(err), int(words[1]) if len(words) > 1 else 0
        elif words[0] == "cat":
            target.extend(stdin)
        elif words[0] == "true":
            continue
        elif words[0] == "false":
            return bytes(out), bytes(err), 1
        else:
            err.extend(f"sh: {words[0]}: not found\n".encode())
            return bytes(out), bytes(err), 127
    return bytes(out), bytes(err), 0


def _builtin_programs() -> dict[str, Program]:
    return {
        "echo": lambda argv, _in: ((" ".join(argv[1:]) + "\n").encode(), b"", 0),
        "cat": lambda _argv, data: (data, b"", 0),
        "true": lambda _argv, _in: (b"", b"", 0),
        "false": lambda _argv, _in: (b"", b"", 1),
        "sh": _sh,
        "/bin/sh": _sh,
        "bash": _sh,
    }


class FakeServer:
    """In-memory state plus an httpx handler speaking the REST API."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.sessions: dict[str, models.Session] = {}
        self.snapshots: dict[str, models.Snapshot] = {}
        self.volumes: dict[str, models.Volume] = {}
        self.images: list[models.Image] = [
            models.Image(id="sandbox", size_bytes=268 << 20, created_at=_now(), packages=[])
        ]
        self.files: dict[tuple[str, str], bytes] = {}
        self.processes: dict[str, FakeProcess] = {}
        self.programs: dict[str, Program] = _builtin_programs()
        #: what ``wait`` turns a CREATING session into ("READY", "FAILED", or "CREATING")
        self.session_outcome = "READY"
        self.session_failure_reason = "the VM could not boot"
        #: what ``wait`` turns a CREATING snapshot into
        self.snapshot_outcome = "READY"
        self.snapshot_failure_reason = "disk capture failed"
        #: (method, path, query params, body) of every request, in order
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        #: ``(code, message, field)`` answered to the next request instead of handling it
        self.fail_next: tuple[str, str, str | None] | None = None
        self.shutdown_requested = False
        self._lock = threading.Lock()

    # -- transports -----------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: self.handle(request, mode="sync"))

    def async_transport(self) -> httpx.MockTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            return self.handle(request, mode="async")

        return httpx.MockTransport(handler)

    def requests_to(self, method: str, suffix: str) -> list[tuple[str, str, dict[str, str], bytes]]:
        return [r for r in self.requests if r[0] == method and r[1].endswith(suffix)]

    # -- dispatch -------------------------------------------------------------------------

    def handle(self, request: httpx.Request, mode: str = "sync") -> httpx.Response:
        path = request.url.path
        params = dict(request.url.params)
        body = request.content
        with self._lock:
            self.requests.append((request.method, path, params, body))
        try:
            if self.api_key is not None and path != "/v1/health":
                if request.headers.get("authorization") != f"Bearer {self.api_key}":
                    raise errors.AuthenticationError("missing or wrong API key")
            if self.fail_next is not None:
                code, message, fld = self.fail_next
                self.fail_next = None
                cls = errors.ERROR_TABLE[code]
                status = cls.status
                return httpx.Response(
                    status,
                    json={"error": {"code": code, "message": message, "field": fld}},
                )
            return self._route(request.method, path.split("/")[2:], params, body, mode)
        except errors.TenkiError as exc:
            return httpx.Response(exc.status, json=exc.to_body())
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            fld = ".".join(str(p) for p in first["loc"])
            err = errors.ValidationError(first["msg"], field=fld)
            return httpx.Response(422, json=err.to_body())

    def _route(
        self, method: str, parts: list[str], params: dict[str, str], body: bytes, mode: str
    ) -> httpx.Response:
        def ok(model: Any, status: int = 200) -> httpx.Response:
            if isinstance(model, list):
                return httpx.Response(status, json=[m.model_dump(mode="json") for m in model])
            return httpx.Response(status, json=model.model_dump(mode="json"))

        match (method, parts):
            case ("GET", ["health"]):
                return ok(
                    models.ServerInfo(version="0.0-fake", pid=1, home="/fake", accelerator="tcg")
                )
            case ("POST", ["server", "shutdown"]):
                self.shutdown_requested = True
                return httpx.Response(202, json={"status": "stopping"})
            case ("GET", ["images"]):
                return ok(self.images)
            case ("POST", ["sessions"]):
                return ok(self._create_session(models.SessionCreate.model_validate_json(body)), 201)
            case ("GET", ["sessions"]):
                state = params.get("state")
                return ok([s for s in self.sessions.values() if state in (None, s.state.value)])
            case ("GET", ["sessions", sid]):
                return ok(self._session(sid))
            case ("GET", ["sessions", sid, "wait"]):
                return ok(self._wait_session(sid))
            case ("DELETE", ["sessions", sid]):
                s = self._session(sid)
                s = s.model_copy(
                    update={"state": models.SessionState.TERMINATED, "terminated_at": _now()}
                )
                self.sessions[sid] = s
                return ok(s)
            case ("POST", ["sessions", sid, "processes"]):
                req = models.ExecRequest.model_validate_json(body)
                return ok(self._start(sid, req), 201)
            case ("GET", ["sessions", sid, "processes", pid, "events"]):
                return self._events(self._process(sid, pid), mode)
            case ("POST", ["sessions", sid, "processes", pid, "stdin"]):
                self._stdin(self._process(sid, pid), body)
                return httpx.Response(204)
            case ("POST", ["sessions", sid, "processes", pid, "stdin", "close"]):
                self._stdin_close(self._process(sid, pid))
                return httpx.Response(204)
            case ("POST", ["sessions", sid, "processes", pid, "kill"]):
                proc = self._process(sid, pid)
                proc.exit(128 + int(params.get("signal", "9")))
                return httpx.Response(204)
            case ("GET", ["sessions", sid, "files"]):
                self._live(sid)
                key = (sid, params["path"])
                if key not in self.files:
                    raise errors.NotFoundError(f"{params['path']}: no such file")
                return httpx.Response(200, content=self.files[key])
            case ("PUT", ["sessions", sid, "files"]):
                self._live(sid)
                self.files[(sid, params["path"])] = body
                return ok(models.FileWritten(path=params["path"], size_bytes=len(body)))
            case ("POST", ["sessions", sid, "volumes"]):
                return ok(self._attach(sid, models.VolumeAttach.model_validate_json(body)))
            case ("DELETE", ["sessions", sid, "volumes", vid]):
                return ok(self._detach(sid, vid))
            case ("POST", ["snapshots"]):
                return ok(
                    self._create_snapshot(models.SnapshotCreate.model_validate_json(body)), 202
                )
            case ("GET", ["snapshots"]):
                of = params.get("session_id")
                return ok(
                    [
                        s
                        for s in self.snapshots.values()
                        if s.state != models.SnapshotState.DELETED and of in (None, s.session_id)
                    ]
                )
            case ("GET", ["snapshots", snap_id]):
                return ok(self._snapshot(snap_id))
            case ("GET", ["snapshots", snap_id, "wait"]):
                return ok(self._wait_snapshot(snap_id))
            case ("DELETE", ["snapshots", snap_id]):
                snap = self._snapshot(snap_id).model_copy(
                    update={"state": models.SnapshotState.DELETING}
                )
                self.snapshots[snap_id] = snap
                return ok(snap)
            case ("POST", ["volumes"]):
                vc = models.VolumeCreate.model_validate_json(body)
                vol = models.Volume(
                    id=new_id("volume"),
                    name=vc.name,
                    size_bytes=vc.size_bytes,
                    state=models.VolumeState.AVAILABLE,
                    created_at=_now(),
                )
                self.volumes[vol.id] = vol
                return ok(vol, 201)
            case ("GET", ["volumes"]):
                return ok(list(self.volumes.values()))
            case ("GET", ["volumes", vid]):
                return ok(self._volume(vid))
            case ("DELETE", ["volumes", vid]):
                vol = self._volume(vid)
                if vol.state == models.VolumeState.IN_USE:
                    raise errors.ConflictError(f"volume {vid} is attached to {vol.session_id}")
                vol = vol.model_copy(update={"state": models.VolumeState.DELETED})
                del self.volumes[vid]
                return ok(vol)
        return httpx.Response(404, json={"detail": "Not Found"})

    # -- sessions -------------------------------------------------------------------------

    def _create_session(self, req: models.SessionCreate) -> models.Session:
        cpu, memory = req.cpu, req.memory_mb
        if req.snapshot_id is not None:
            snap = self._snapshot(req.snapshot_id)
            if snap.state != models.SnapshotState.READY:
                raise errors.ConflictError(f"snapshot {snap.id} is {snap.state.value}, not READY")
            cpu, memory = snap.cpu, snap.memory_mb
        for mount in req.volumes:
            self._volume(mount.volume_id)
        s = models.Session(
            id=new_id("session"),
            name=req.name,
            state=models.SessionState.CREATING,
            cpu=cpu,
            memory_mb=memory,
            base_image_id=req.base_image_id or models.DEFAULT_IMAGE_ID,
            snapshot_id=req.snapshot_id,
            env_keys=sorted(req.env),
            metadata=req.metadata,
            volumes=[models.VolumeAttachment(**m.model_dump()) for m in req.volumes],
            created_at=_now(),
        )
        self.sessions[s.id] = s
        return s

    def _session(self, sid: str) -> models.Session:
        if sid not in self.sessions:
            raise errors.SessionNotFoundError(f"session {sid} not found")
        return self.sessions[sid]

    def _live(self, sid: str) -> models.Session:
        s = self._session(sid)
        if s.state not in models.LIVE_SESSION_STATES:
            raise errors.ConflictError(f"session {sid} is {s.state.value}")
        return s

    def _wait_session(self, sid: str) -> models.Session:
        s = self._session(sid)
        if s.state == models.SessionState.CREATING and self.session_outcome != "CREATING":
            update: dict[str, Any] = {"state": models.SessionState(self.session_outcome)}
            if self.session_outcome == "FAILED":
                update["state_reason"] = self.session_failure_reason
            else:
                update["ready_at"] = _now()
            s = s.model_copy(update=update)
            self.sessions[sid] = s
        return s

    def make_ready(self, sid: str) -> None:
        self.sessions[sid] = self.sessions[sid].model_copy(
            update={"state": models.SessionState.READY}
        )

    # -- processes ------------------------------------------------------------------------

    def _start(self, sid: str, req: models.ExecRequest) -> models.ProcessInfo:
        self._live(sid)
        argv = req.argv or ["/bin/sh", "-c", req.command or ""]
        name = argv[0].rsplit("/", 1)[-1] if argv[0] not in self.programs else argv[0]
        streaming = name == "cat" and req.stdin and req.stdin_data is None
        proc = FakeProcess(new_id("process"), sid, argv, streaming=bool(streaming))
        self.processes[proc.id] = proc
        if not streaming:
            stdin = base64.b64decode(req.stdin_data) if req.stdin_data else b""
            if req.stdin and req.stdin_data is None:
                return models.ProcessInfo(process_id=proc.id, session_id=sid, pid=100)
            self._run(proc, stdin)
        return models.ProcessInfo(process_id=proc.id, session_id=sid, pid=100)

    def _run(self, proc: FakeProcess, stdin: bytes) -> None:
        argv = proc.argv
        program = self.programs.get(argv[0]) or self.programs.get(argv[0].rsplit("/", 1)[-1])
        if program is None:
            proc.output("stderr", f"exec {argv[0]}: not found\n".encode())
            proc.exit(127)
            return
        out, err, code = program(argv, stdin)
        proc.output("stdout", out)
        proc.output("stderr", err)
        proc.exit(code, timed_out=code == 124)

    def _process(self, sid: str, pid: str) -> FakeProcess:
        proc = self.processes.get(pid)
        if proc is None or proc.session_id != sid:
            raise errors.NotFoundError(f"process {pid} not found")
        return proc

    def _stdin(self, proc: FakeProcess, data: bytes) -> None:
        if proc.done or proc.stdin_closed:
            raise errors.ConflictError(f"process {proc.id}: stdin is closed")
        proc.stdin.extend(data)
        if proc.streaming:
            proc.output("stdout", data)

    def _stdin_close(self, proc: FakeProcess) -> None:
        proc.stdin_closed = True
        if proc.streaming:
            proc.exit(0)
        elif not proc.done:
            self._run(proc, bytes(proc.stdin))

    @staticmethod
    def _line(event: dict[str, Any]) -> bytes:
        return (json.dumps(event) + "\n").encode()

    def _events(self, proc: FakeProcess, mode: str) -> httpx.Response:
        headers = {"content-type": "application/x-ndjson"}
        if proc.done:
            return httpx.Response(
                200, content=b"".join(map(self._line, proc.events)), headers=headers
            )

        def sync_lines() -> Iterator[bytes]:
            i = 0
            while True:
                with proc.cond:
                    while i >= len(proc.events) and not proc.done:
                        proc.cond.wait(timeout=5)
                    batch = proc.events[i:]
                for ev in batch:
                    yield self._line(ev)
                i += len(batch)
                if proc.done and i >= len(proc.events):
                    return

        async def async_lines() -> AsyncIterator[bytes]:
            i = 0
            while True:
                batch = proc.events[i:]
                for ev in batch:
                    yield self._line(ev)
                i += len(batch)
                if proc.done and i >= len(proc.events):
                    return
                if not batch:
                    await asyncio.sleep(0.002)

        content = sync_lines() if mode == "sync" else async_lines()
        return httpx.Response(200, content=content, headers=headers)

    # -- volumes --------------------------------------------------------------------------

    def _volume(self, vid: str) -> models.Volume:
        if vid not in self.volumes:
            raise errors.VolumeNotFoundError(f"volume {vid} not found")
        return self.volumes[vid]

    def _attach(self, sid: str, req: models.VolumeAttach) -> models.Session:
        s = self._live(sid)
        vol = self._volume(req.volume_id)
        if vol.state == models.VolumeState.IN_USE:
            raise errors.ConflictError(f"volume {vol.id} is attached to {vol.session_id}")
        self.volumes[vol.id] = vol.model_copy(
            update={"state": models.VolumeState.IN_USE, "session_id": sid, "path": req.path}
        )
        att = models.VolumeAttachment(volume_id=vol.id, path=req.path, read_only=req.read_only)
        s = s.model_copy(update={"volumes": [*s.volumes, att]})
        self.sessions[sid] = s
        return s

    def _detach(self, sid: str, vid: str) -> models.Session:
        s = self._session(sid)
        vol = self._volume(vid)
        if vol.session_id != sid:
            raise errors.ConflictError(f"volume {vid} is not attached to {sid}")
        self.volumes[vid] = vol.model_copy(
            update={"state": models.VolumeState.AVAILABLE, "session_id": None, "path": None}
        )
        s = s.model_copy(update={"volumes": [v for v in s.volumes if v.volume_id != vid]})
        self.sessions[sid] = s
        return s

    # -- snapshots ------------------------------------------------------------------------

    def _create_snapshot(self, req: models.SnapshotCreate) -> models.Snapshot:
        s = self._live(req.session_id)
        if req.expires_at is not None and req.expires_at <= _now():
            raise errors.ValidationError("must be in the future", field="expires_at")
        snap = models.Snapshot(
            id=new_id("snapshot"),
            session_id=s.id,
            name=req.name,
            state=models.SnapshotState.CREATING,
            base_image_id=s.base_image_id,
            cpu=s.cpu,
            memory_mb=s.memory_mb,
            created_at=_now(),
            expires_at=req.expires_at,
        )
        self.snapshots[snap.id] = snap
        return snap

    def _snapshot(self, snap_id: str) -> models.Snapshot:
        snap = self.snapshots.get(snap_id)
        if snap is None or snap.state == models.SnapshotState.DELETED:
            raise errors.SnapshotNotFoundError(f"snapshot {snap_id} not found")
        return snap

    def _wait_snapshot(self, snap_id: str) -> models.Snapshot:
        snap = self._snapshot(snap_id)
        if snap.state == models.SnapshotState.CREATING and self.snapshot_outcome != "CREATING":
            update: dict[str, Any] = {"state": models.SnapshotState(self.snapshot_outcome)}
            if self.snapshot_outcome == "FAILED":
                update["state_reason"] = self.snapshot_failure_reason
            else:
                update.update(ready_at=_now(), size_bytes=300 << 20, memory_bytes=128 << 20)
            snap = snap.model_copy(update=update)
            self.snapshots[snap_id] = snap
        return snap

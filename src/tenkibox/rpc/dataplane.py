"""``tenki.sandbox.v1.SandboxSessionDataPlaneService``: exec and files of one session.

Callers present a session credential (``credentials.py``), not an API key. As in the product,
commands run as the guest user ``tenki`` in ``/home/tenki`` unless ``privileged``; file paths
are resolved under ``/home/tenki`` and may not leave it (``control/workdir.py``). Everything is
streamed through the control plane's process and file calls, so a request holds one chunk at a
time; the unary ReadFile is bounded by the gRPC message size (larger files: ReadFileStream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ..control.plane import ControlPlane
from ..control.workdir import UID, USER, WORKDIR, resolve
from ..errors import (
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    TenkiError,
    ValidationError,
)
from ..models import ExecRequest
from . import proto
from .credentials import Grant

#: the largest ReadFile answer: below the 4 MiB a gRPC client accepts by default
READ_FILE_MAX = 4 * 1024 * 1024 - 64 * 1024
STREAM_CHUNK_DEFAULT, STREAM_CHUNK_MAX = 256 * 1024, 1024 * 1024
SIGNALS = {1: 15, 2: 9, 3: 2, 4: 1, 5: 10, 6: 12}  # RunSignal.Sig -> POSIX number
#: a signal's name as the guest's Go agent in the product reports it (the SDKs compare these)
SIGNAL_NAMES = {1: "hangup", 2: "interrupt", 6: "aborted", 9: "killed", 10: "user defined signal 1",
                11: "segmentation fault", 12: "user defined signal 2", 13: "broken pipe",
                15: "terminated"}

# One small program for the metadata calls (list, mkdir, remove), run as the guest user:
# one exec each, answering one JSON line.
_FS_SCRIPT = r"""
import json, os, shutil, stat, sys
op, path = sys.argv[1], sys.argv[2]
def info(p, st):
    return {"size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns,
            "is_dir": stat.S_ISDIR(st.st_mode)}
try:
    if op == "list":
        hidden = sys.argv[3] == "1"
        entries = []
        with os.scandir(path) as it:
            for e in it:
                if not hidden and e.name.startswith("."):
                    continue
                try:
                    st = e.stat()
                except OSError:
                    st = e.stat(follow_symlinks=False)
                d = info(e.path, st); d["name"] = e.name; entries.append(d)
        entries.sort(key=lambda d: d["name"])
        print(json.dumps({"entries": entries}))
    elif op == "mkdir":
        mode = int(sys.argv[3]) or 0o755
        if sys.argv[4] == "1":
            os.makedirs(path, mode=mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        print(json.dumps({"mtime_ns": os.stat(path).st_mtime_ns}))
    elif op == "remove":
        recursive = sys.argv[3] == "1"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            print(json.dumps({"removed": False, "count": 0})); sys.exit(0)
        count = 1
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                for _, dirs, files in os.walk(path):
                    count += len(dirs) + len(files)
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        print(json.dumps({"removed": True, "count": count}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": exc.strerror or str(exc)})); sys.exit(0)
"""


# "1|size|mode (hex)|mtime with ns|file type|symlink target" (of what a symlink points to), or
# "0" when nothing is there
_STAT_SH = (
    'p="$1"; [ -e "$p" ] || [ -L "$p" ] || { echo 0; exit 0; }; '
    't=""; [ -L "$p" ] && t=$(readlink -- "$p"); '
    'printf "1|%s|%s\\n" "$(stat -L -c "%s|%f|%.9Y|%F" -- "$p" 2>/dev/null '
    '|| stat -c "%s|%f|%.9Y|%F" -- "$p")" "$t"'
)


def M(name: str) -> Any:
    return proto.message(name)


def _os_error(path: str, errno: int, text: str) -> TenkiError:
    if errno == 2:
        return NotFoundError(f"{path}: no such file or directory")
    return ValidationError(f"{path}: {text}", field="path")


class DataPlane:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    @staticmethod
    def _session(grant: Grant, asked: str) -> str:
        if asked and asked != grant.session_id:
            raise PermissionDeniedError(f"the session credential is for session "
                                        f"{grant.session_id}, not {asked}")
        return grant.session_id

    async def _collect(self, grant: Grant, argv: list[str], *, as_root: bool = False,
                       limit: int = 8 << 20) -> bytes:
        """Run ``argv`` as the guest user (or root) to its end; its stdout, or the error with
        its stderr. More than ``limit`` bytes of output is refused, not cut."""
        ref = await self.plane.sessions.start_process(
            grant.session_id, ExecRequest(argv=argv, user="root" if as_root else USER),
            grant.workspace_id)
        out, err = bytearray(), bytearray()
        code: int | None = None
        async for ev in self.plane.sessions.process_events(grant.session_id, ref.process_id,
                                                           grant.workspace_id):
            if ev.type in ("stdout", "stderr"):
                buf = out if ev.type == "stdout" else err
                buf += ev.data
                if len(buf) > limit:
                    await self.plane.sessions.process_kill(grant.session_id, ref.process_id, 9,
                                                           grant.workspace_id)
                    raise PayloadTooLargeError(f"{argv[0]} printed more than {limit} bytes")
            elif ev.type == "exit":
                code = ev.exit_code
            elif ev.type == "error":
                raise TenkiError(ev.message or "process lost")
        if code != 0:
            raise ValidationError(f"{argv[0]} exited {code}: {err.decode(errors='replace')[:300]}")
        return bytes(out)

    async def _fs(self, grant: Grant, *args: str) -> dict[str, Any]:
        raw = await self._collect(grant, ["python3", "-c", _FS_SCRIPT, *args])
        answer: dict[str, Any] = json.loads(raw.decode().strip().splitlines()[-1])
        if "errno" in answer:
            raise _os_error(args[1], int(answer["errno"]), str(answer["error"]))
        return answer

    async def _chown(self, grant: Grant, path: str) -> None:
        """Files written into the workdir belong to the guest user, as if it wrote them."""
        await self._collect(grant, ["chown", f"{UID}:{UID}", "--", path], as_root=True)

    # -- exec --------------------------------------------------------------------------------
    async def Run(self, frames: AsyncIterator[Any], grant: Grant,
                  ctx: Any) -> AsyncIterator[Any]:
        first = await anext(aiter(frames), None)
        if first is None or first.frame.WhichOneof("payload") != "start":
            raise ValidationError("the first Run frame must be start", field="start")
        start = first.frame.start
        session_id = self._session(grant, start.session_id)
        argv = list(start.cmd)
        if not argv or not argv[0]:
            raise ValidationError("command must not be empty", field="cmd")
        cwd = resolve(start.cwd or WORKDIR, confined=False, field="cwd")  # exec is not confined
        req = ExecRequest(argv=argv, env=dict(start.env), cwd=cwd, stdin=True,
                          user="root" if start.privileged else USER,
                          timeout_s=start.timeout_ms / 1000 if start.timeout_ms else None)
        began = time.monotonic()
        try:
            ref = await self.plane.sessions.start_process(session_id, req, grant.workspace_id)
        except ValidationError as exc:
            if exc.field not in ("argv", "cwd"):
                raise
            # the product's answer to a command that cannot start: an exit, as a shell's
            # (127 not found, 126 not executable), with the errno and the reason
            missing = "no such file" in exc.message.lower() or exc.field == "cwd"
            msg = M("SandboxSessionDataPlaneServiceRunResponse")()
            msg.frame.exit.exit_code = 127 if missing else 126
            msg.frame.exit.errno = 2 if missing else 13
            msg.frame.exit.reason = exc.message
            msg.frame.exit.duration_ms = int((time.monotonic() - began) * 1000)
            yield msg
            return
        sessions, pid, ws = self.plane.sessions, ref.process_id, grant.workspace_id
        out = M("SandboxSessionDataPlaneServiceRunResponse")()
        out.frame.started.pid = ref.pid or 0
        yield out
        if not start.stream_stdin:
            await sessions.process_close_stdin(session_id, pid, ws)

        sent: set[int] = set()  # signals the client sent (the agent reports 128+n for them)

        async def pump() -> None:  # the client's frames, while the output flows back
            async for fr in frames:
                kind = fr.frame.WhichOneof("payload")
                if kind == "stdin":
                    await sessions.process_stdin(session_id, pid, fr.frame.stdin, ws)
                elif kind == "stdin_close":
                    await sessions.process_close_stdin(session_id, pid, ws)
                elif kind == "signal":
                    num = SIGNALS.get(int(fr.frame.signal.signal))
                    if num:
                        sent.add(num)
                        await sessions.process_kill(session_id, pid, num, ws)

        pumping = asyncio.ensure_future(pump())
        finished = False
        try:
            async for ev in sessions.process_events(session_id, pid, ws):
                msg = M("SandboxSessionDataPlaneServiceRunResponse")()
                if ev.type in ("stdout", "stderr"):
                    setattr(msg.frame, ev.type, ev.data)
                    yield msg
                    continue
                finished = True
                code = ev.exit_code
                ex = msg.frame.exit
                ex.duration_ms = int((time.monotonic() - began) * 1000)
                ex.timed_out = ev.timed_out
                if isinstance(code, int) and code < 0:
                    ex.signal = SIGNAL_NAMES.get(-code, f"signal {-code}")
                    ex.exit_code = 128 - code
                elif isinstance(code, int):
                    ex.exit_code = code
                    if code - 128 in sent and not ex.timed_out:  # it died of the signal sent
                        ex.signal = SIGNAL_NAMES.get(code - 128, f"signal {code - 128}")
                else:
                    ex.exit_code = -1
                if ev.type == "error":
                    state = self.plane.sessions.get(session_id, ws).state.value
                    why = ev.message or "process lost"
                    ex.reason = (f"session_terminated:{why}" if state in ("TERMINATED", "FAILED",
                                                                           "TERMINATING")
                                 else f"output_lost:{why}")
                yield msg
                return
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, TenkiError, Exception):
                await pumping
            if not finished:  # the client went away: so does its command
                with contextlib.suppress(TenkiError):
                    await sessions.process_kill(session_id, pid, 9, ws)

    # -- files -------------------------------------------------------------------------------
    async def ReadFile(self, req: Any, grant: Grant, ctx: Any) -> Any:
        inner = req.request
        self._session(grant, inner.session_id)
        path = resolve(inner.path, confined=True)
        chunks = await self.plane.sessions.read_file(grant.session_id, path, grant.workspace_id)
        data = bytearray()
        try:
            async for chunk in chunks:
                data += chunk
                if len(data) > READ_FILE_MAX:
                    raise PayloadTooLargeError(
                        f"{inner.path} is larger than {READ_FILE_MAX} bytes: read it with "
                        "ReadFileStream")
        finally:
            await chunks.aclose()
        out = M("SandboxSessionDataPlaneServiceReadFileResponse")()
        out.response.path = inner.path
        out.response.content = bytes(data)
        return out

    async def ReadFileStream(self, req: Any, grant: Grant,
                             ctx: Any) -> AsyncIterator[Any]:
        inner = req.request
        self._session(grant, inner.session_id)
        path = resolve(inner.path, confined=True)
        if inner.offset < 0 or inner.length < 0:
            raise ValidationError("offset and length must not be negative", field="offset")
        size = min(inner.chunk_bytes or STREAM_CHUNK_DEFAULT, STREAM_CHUNK_MAX)
        skip, left = inner.offset, inner.length or None
        total = 0
        chunks = await self.plane.sessions.read_file(grant.session_id, path, grant.workspace_id)
        pending = bytearray()
        try:
            async for chunk in chunks:
                total += len(chunk)
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
                if left is not None:
                    chunk = chunk[:left]
                    left -= len(chunk)
                pending += chunk
                while len(pending) >= size:
                    msg = M("SandboxSessionDataPlaneServiceReadFileStreamResponse")()
                    msg.response.data = bytes(pending[:size])
                    del pending[:size]
                    yield msg
                if left == 0:
                    break
        finally:
            await chunks.aclose()
        msg = M("SandboxSessionDataPlaneServiceReadFileStreamResponse")()
        msg.response.data = bytes(pending)
        msg.response.eof = True
        msg.response.total_size = total
        yield msg

    async def WriteFile(self, req: Any, grant: Grant, ctx: Any) -> Any:
        inner = req.request
        self._session(grant, inner.session_id)
        path = resolve(inner.path, confined=True)

        async def body() -> AsyncIterator[bytes]:
            yield bytes(inner.content)

        size = await self.plane.sessions.write_file(grant.session_id, path, body(), 0o644,
                                                    grant.workspace_id)
        await self._chown(grant, path)
        out = M("SandboxSessionDataPlaneServiceWriteFileResponse")()
        out.response.path = inner.path
        out.response.size_bytes = size
        return out

    async def WriteFileStream(self, frames: AsyncIterator[Any], grant: Grant,
                              ctx: Any) -> Any:
        it = aiter(frames)
        first = await anext(it, None)
        if first is None or first.frame.WhichOneof("payload") != "start":
            raise ValidationError("the first WriteFileStream frame must be start", field="start")
        start = first.frame.start
        self._session(grant, start.session_id)
        path = resolve(start.path, confined=True)

        async def body() -> AsyncIterator[bytes]:
            async for fr in it:
                if fr.frame.WhichOneof("payload") == "data":
                    yield bytes(fr.frame.data)

        size = await self.plane.sessions.write_file(grant.session_id, path, body(),
                                                    start.mode or 0o644, grant.workspace_id)
        await self._chown(grant, path)
        out = M("SandboxSessionDataPlaneServiceWriteFileStreamResponse")()
        out.response.bytes_written = size
        out.response.path = start.path
        return out

    async def Stat(self, req: Any, grant: Grant, ctx: Any) -> Any:
        inner = req.request
        self._session(grant, inner.session_id)
        path = resolve(inner.path, confined=True)
        # coreutils' stat, not the Python helper: the SDKs probe with Stat, so it is the one
        # metadata call on a hot path (about 4x faster to start under TCG)
        raw = await self._collect(grant, ["sh", "-c", _STAT_SH, "stat", path])
        out = M("SandboxSessionDataPlaneServiceStatResponse")()
        r = out.response
        fields = raw.decode(errors="replace").rstrip("\n").split("|", 5)
        if fields[0] != "1":
            return out  # exists = false: the SDKs raise their FileNotFoundError
        size, mode_hex, mtime, kind, target = fields[1:6]
        seconds, _, frac = mtime.partition(".")
        r.exists = True
        r.size = int(size)
        r.mode = int(mode_hex, 16) & 0o7777
        r.modified_unix_ns = int(seconds) * 1_000_000_000 + int((frac + "000000000")[:9])
        r.is_symlink = bool(target)
        r.symlink_target = target
        r.is_dir = kind == "directory"
        return out

    async def Mkdir(self, req: Any, grant: Grant, ctx: Any) -> Any:
        inner = req.request
        self._session(grant, inner.session_id)
        info = await self._fs(grant, "mkdir", resolve(inner.path, confined=True),
                              str(inner.mode), "1" if inner.recursive else "0")
        out = M("SandboxSessionDataPlaneServiceMkdirResponse")()
        out.response.modified_unix_ns = info["mtime_ns"]
        return out

    async def Remove(self, req: Any, grant: Grant, ctx: Any) -> Any:
        inner = req.request
        self._session(grant, inner.session_id)
        path = resolve(inner.path, confined=True)
        if path == WORKDIR:
            raise ValidationError(f"refusing to remove the workdir {WORKDIR}", field="path")
        info = await self._fs(grant, "remove", path, "1" if inner.recursive else "0")
        out = M("SandboxSessionDataPlaneServiceRemoveResponse")()
        out.response.removed = info["removed"]
        out.response.entries_removed = info["count"]
        return out

    async def List(self, req: Any, grant: Grant, ctx: Any) -> Any:
        inner = req.request
        self._session(grant, inner.session_id)
        info = await self._fs(grant, "list", resolve(inner.path, confined=True),
                              "1" if inner.include_hidden else "0")
        out = M("SandboxSessionDataPlaneServiceListResponse")()
        for e in info["entries"]:
            out.response.entries.add(name=e["name"], is_dir=e["is_dir"], size=e["size"],
                                     mode=e["mode"], modified_unix_ns=e["mtime_ns"])
        return out

"""Sessions: create (boot or restore), read, wait, terminate, pause, resume; processes; files;
volumes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from ...control.workdir import resolve
from ...errors import PermissionDeniedError
from ...models import (
    ExecRequest,
    FileWritten,
    ProcessEvent,
    ProcessInfo,
    Session,
    SessionCreate,
    SessionExtend,
    SessionState,
    SessionUpdate,
    VolumeAttach,
)
from ..deps import Caller, Plane
from . import errors, stream_of

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionId = Annotated[str, Query(max_length=64)]


@router.post("", response_model=Session, status_code=201, operation_id="createSession",
             responses=errors(403, 404, 409, 413, 429, 503))
async def create_session(body: SessionCreate, plane: Plane, caller: Caller) -> Session:
    """Boot a session, or restore one from a snapshot (``snapshot_id``) or a template's latest
    READY build (``template_id``); answers CREATING. ``host_id`` (a pin) needs an admin key."""
    if body.host_id is not None and not caller.admin:
        raise PermissionDeniedError("host_id: placing a session on a chosen host needs an "
                                    "admin key", field="host_id")
    return await plane.create_session(body, caller.workspace_id)


@router.get("", response_model=list[Session], operation_id="listSessions",
            responses=errors())
async def list_sessions(plane: Plane, caller: Caller, state: Annotated[SessionState | None, Query(
                            description="only sessions in this state")] = None,
                        ) -> list[Session]:
    return plane.sessions.query(caller.workspace_id, state.value if state else None)


@router.get("/{session_id}", response_model=Session, operation_id="getSession",
            responses=errors(404))
async def get_session(session_id: str, plane: Plane, caller: Caller) -> Session:
    return plane.sessions.get(session_id, caller.workspace_id)


@router.get("/{session_id}/wait", response_model=Session, operation_id="waitSession",
            responses=errors(404))
async def wait_session(session_id: str, plane: Plane, caller: Caller,
                       timeout_s: Annotated[float, Query(
                           ge=0, le=3600, description="seconds to wait for the session to leave "
                           "CREATING; answered as it is when they are up")] = 30.0) -> Session:
    """Answers as soon as the session is out of CREATING, PAUSING and RESUMING, or as it is
    when the time is up."""
    return await plane.sessions.wait(session_id, timeout_s, caller.workspace_id)


@router.patch("/{session_id}", response_model=Session, operation_id="updateSession",
              responses=errors(404, 409))
async def update_session(session_id: str, body: SessionUpdate, plane: Plane,
                         caller: Caller) -> Session:
    """Rename a session or replace its metadata (fields left out stay as they are)."""
    return await plane.sessions.update(session_id, body, caller.workspace_id)


@router.post("/{session_id}/extend", response_model=Session, operation_id="extendSession",
             responses=errors(404, 409))
async def extend_session(session_id: str, body: SessionExtend, plane: Plane,
                         caller: Caller) -> Session:
    """Move the session's expiry later by ``seconds`` (from now if it has none)."""
    return await plane.sessions.extend(session_id, body.seconds, caller.workspace_id)


@router.delete("/{session_id}", response_model=Session, operation_id="terminateSession",
               responses=errors(404))
async def terminate_session(session_id: str, plane: Plane, caller: Caller) -> Session:
    """Idempotent; wins over a boot or restore in progress."""
    return await plane.sessions.terminate(session_id, ws=caller.workspace_id)


@router.post("/{session_id}/pause", response_model=Session, operation_id="pauseSession",
             responses=errors(404, 409))
async def pause_session(session_id: str, plane: Plane, caller: Caller) -> Session:
    """Capture the session's memory and disk into a PAUSE snapshot and stop its VM (it then
    counts against no quota). Answers PAUSING (follow it with ``wait``: PAUSED, or back to READY
    with the reason if the capture failed); a PAUSED session is answered as it is."""
    return await plane.sessions.pause(session_id, caller.workspace_id, wait=False)


@router.post("/{session_id}/resume", response_model=Session, operation_id="resumeSession",
             responses=errors(404, 409, 429, 503))
async def resume_session(session_id: str, plane: Plane, caller: Caller) -> Session:
    """Restore a PAUSED session under its id (its processes keep their PIDs; its clock is
    set); quotas and the host's capacity are checked again. Answers RESUMING (follow it with
    ``wait``: READY, or FAILED with the reason); a running session is answered as it is."""
    return await plane.sessions.resume(session_id, caller.workspace_id, wait=False)


@router.post("/{session_id}/processes", response_model=ProcessInfo, status_code=201,
             operation_id="startProcess", responses=errors(404, 409))
async def start_process(session_id: str, body: ExecRequest, plane: Plane,
                        caller: Caller) -> ProcessInfo:
    ref = await plane.sessions.start_process(session_id, body, caller.workspace_id)
    return ProcessInfo(process_id=ref.process_id, session_id=session_id, pid=ref.pid)


@router.get("/{session_id}/processes/{process_id}/events", operation_id="processEvents",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": stream_of(ProcessEvent)},
                             "description": "NDJSON stream: one ProcessEvent per line"},
                       **errors(404, 409)})
async def process_events(session_id: str, process_id: str, plane: Plane,
                         caller: Caller) -> StreamingResponse:
    events = plane.sessions.process_events(session_id, process_id, caller.workspace_id)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                yield (json.dumps(ev.to_json()) + "\n").encode()
        finally:
            await events.aclose()  # a client that went away is noticed at once

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/{session_id}/processes/{process_id}/stdin", status_code=204,
             operation_id="writeProcessStdin", responses=errors(404, 409))
async def process_stdin(session_id: str, process_id: str, request: Request, plane: Plane,
                        caller: Caller) -> Response:
    async for chunk in request.stream():
        if chunk:
            await plane.sessions.process_stdin(session_id, process_id, chunk,
                                               caller.workspace_id)
    return Response(status_code=204)


@router.post("/{session_id}/processes/{process_id}/stdin/close", status_code=204,
             operation_id="closeProcessStdin", responses=errors(404, 409))
async def process_stdin_close(session_id: str, process_id: str, plane: Plane,
                              caller: Caller) -> Response:
    await plane.sessions.process_close_stdin(session_id, process_id, caller.workspace_id)
    return Response(status_code=204)


@router.post("/{session_id}/processes/{process_id}/kill", status_code=204,
             operation_id="killProcess", responses=errors(404, 409))
async def process_kill(session_id: str, process_id: str, plane: Plane, caller: Caller,
                       signal: Annotated[int, Query(
                           ge=1, le=64, description="the signal number sent (default 9, SIGKILL)"
                       )] = 9) -> Response:
    await plane.sessions.process_kill(session_id, process_id, signal, caller.workspace_id)
    return Response(status_code=204)


FilePath = Annotated[str, Query(min_length=1, max_length=4096,
                                description="path in the guest; a relative one is relative "
                                "to /home/tenki")]


@router.get("/{session_id}/files", operation_id="readFile", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the file's bytes, streamed"}, **errors(404, 409)})
async def read_file(session_id: str, path: FilePath, plane: Plane,
                    caller: Caller) -> StreamingResponse:
    """Streamed: the server holds one chunk at a time; a client that goes away stops it."""
    path = _guest_path(path)
    chunks = await plane.sessions.read_file(session_id, path, caller.workspace_id)
    first = await anext(chunks, b"")  # a missing file answers 404 before any byte is sent

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # a client that went away stops the reads in the guest

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.put("/{session_id}/files", response_model=FileWritten, operation_id="writeFile",
            responses=errors(404, 409),
            openapi_extra={"requestBody": {"content": {"application/octet-stream": {}},
                                           "required": True}})
async def write_file(session_id: str, path: FilePath, request: Request, plane: Plane,
                     caller: Caller, mode: Annotated[int, Query(
                         ge=0, le=0o7777, description="the file's permission bits (default 0644)"
                     )] = 0o644,
                     ) -> FileWritten:
    """Streamed into the guest; the file appears whole (renamed into place) or not at all."""
    path = _guest_path(path)
    size = await plane.sessions.write_file(session_id, path, request.stream(), mode,
                                           caller.workspace_id)
    return FileWritten(path=path, size_bytes=size)


def _guest_path(path: str) -> str:
    """A relative path is relative to the guest user's home, /home/tenki, as on Tenki's wire;
    this surface also reaches absolute paths anywhere (control/workdir.py). NUL, bad UTF-8 and
    length are refused for every parameter by api/errors.py."""
    return resolve(path, confined=False)


@router.post("/{session_id}/volumes", response_model=Session, operation_id="attachVolume",
             responses=errors(404, 409))
async def attach_volume(session_id: str, body: VolumeAttach, plane: Plane,
                        caller: Caller) -> Session:
    await plane.volumes.attach(session_id, body, caller.workspace_id)
    return plane.sessions.get(session_id, caller.workspace_id)


@router.delete("/{session_id}/volumes/{volume_id}", response_model=Session,
               operation_id="detachVolume", responses=errors(404, 409))
async def detach_volume(session_id: str, volume_id: str, plane: Plane,
                        caller: Caller) -> Session:
    await plane.volumes.detach(session_id, volume_id, caller.workspace_id)
    return plane.sessions.get(session_id, caller.workspace_id)

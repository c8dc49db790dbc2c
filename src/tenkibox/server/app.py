"""The REST API: a thin HTTP skin over the services (no logic lives here).

Errors are rendered from ``tenkibox.errors`` (code, HTTP status, message, field); request
validation failures become ``ValidationError`` naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .._version import __version__
from ..errors import AuthenticationError, TenkiError, ValidationError
from ..models import (
    ExecRequest,
    FileWritten,
    Image,
    ProcessInfo,
    ServerInfo,
    Session,
    SessionCreate,
    Snapshot,
    SnapshotCreate,
    Volume,
    VolumeAttach,
    VolumeCreate,
)
from .runtime import ServerRuntime


def _field_of(loc: tuple[Any, ...]) -> str:
    # the first element says where (body, query, path); a field may itself be called "path"
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)]
    return ".".join(parts) or "body"


def create_app(rt: ServerRuntime) -> FastAPI:
    app = FastAPI(title="tenki", version=__version__,
                  description="Self-hosted sandbox VMs with memory snapshots.")

    @app.exception_handler(TenkiError)
    async def _tenki_error(_req: Request, exc: TenkiError) -> JSONResponse:
        return JSONResponse(exc.to_body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "missing":
            msg = "is required"
        err = ValidationError(msg, field=field)
        return JSONResponse(err.to_body(), status_code=err.status)

    async def auth(request: Request) -> None:
        if rt.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {rt.api_key}":
            raise AuthenticationError("missing or wrong API key (Authorization: Bearer ...)")

    deps = [Depends(auth)]
    sessions, snapshots, volumes = rt.sessions, rt.snapshots, rt.volumes

    @app.get("/v1/health", response_model=ServerInfo)
    async def health() -> ServerInfo:
        return ServerInfo(version=__version__, pid=os.getpid(), home=str(rt.layout.home),
                          accelerator=rt.accel)

    # -- sessions -------------------------------------------------------------------------------
    @app.post("/v1/sessions", response_model=Session, status_code=201, dependencies=deps)
    async def create_session(body: SessionCreate) -> Session:
        return await sessions.create(body)

    @app.get("/v1/sessions", response_model=list[Session], dependencies=deps)
    async def list_sessions(state: str | None = None) -> list[Session]:
        return sessions.query(state)

    @app.get("/v1/sessions/{session_id}", response_model=Session, dependencies=deps)
    async def get_session(session_id: str) -> Session:
        return sessions.get(session_id)

    @app.get("/v1/sessions/{session_id}/wait", response_model=Session, dependencies=deps)
    async def wait_session(session_id: str,
                           timeout_s: Annotated[float, Query(ge=0)] = 30.0) -> Session:
        return await sessions.wait(session_id, timeout_s)

    @app.delete("/v1/sessions/{session_id}", response_model=Session, dependencies=deps)
    async def terminate_session(session_id: str) -> Session:
        return await sessions.terminate(session_id)

    @app.post("/v1/sessions/{session_id}/processes", response_model=ProcessInfo,
              status_code=201, dependencies=deps)
    async def start_process(session_id: str, body: ExecRequest) -> ProcessInfo:
        proc = await sessions.start_process(session_id, body)
        return ProcessInfo(process_id=proc.id, session_id=session_id, pid=proc.pid)

    @app.get("/v1/sessions/{session_id}/processes/{process_id}/events", dependencies=deps)
    async def process_events(session_id: str, process_id: str) -> StreamingResponse:
        proc = sessions.process(session_id, process_id)

        async def lines() -> AsyncIterator[bytes]:
            async for ev in proc.stream():
                yield (json.dumps(ev) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/sessions/{session_id}/processes/{process_id}/stdin", status_code=204,
              dependencies=deps)
    async def process_stdin(session_id: str, process_id: str, request: Request) -> Response:
        proc = sessions.process(session_id, process_id)
        await proc.agent_proc.write_stdin(await request.body())
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/processes/{process_id}/stdin/close", status_code=204,
              dependencies=deps)
    async def process_stdin_close(session_id: str, process_id: str) -> Response:
        await sessions.process(session_id, process_id).agent_proc.close_stdin()
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/processes/{process_id}/kill", status_code=204,
              dependencies=deps)
    async def process_kill(session_id: str, process_id: str,
                           signal: Annotated[int, Query(ge=1, le=64)] = 9) -> Response:
        await sessions.process(session_id, process_id).agent_proc.kill(signal)
        return Response(status_code=204)

    @app.get("/v1/sessions/{session_id}/files", dependencies=deps)
    async def read_file(session_id: str, path: str) -> Response:
        data = await sessions.read_file(session_id, path)
        return Response(data, media_type="application/octet-stream")

    @app.put("/v1/sessions/{session_id}/files", response_model=FileWritten, dependencies=deps)
    async def write_file(session_id: str, path: str, request: Request,
                         mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644) -> FileWritten:
        size = await sessions.write_file(session_id, path, await request.body(), mode)
        return FileWritten(path=path, size_bytes=size)

    @app.post("/v1/sessions/{session_id}/volumes", response_model=Session, dependencies=deps)
    async def attach_volume(session_id: str, body: VolumeAttach) -> Session:
        return await volumes.attach(session_id, body)

    @app.delete("/v1/sessions/{session_id}/volumes/{volume_id}", response_model=Session,
                dependencies=deps)
    async def detach_volume(session_id: str, volume_id: str) -> Session:
        return await volumes.detach(session_id, volume_id)

    # -- snapshots ------------------------------------------------------------------------------
    @app.post("/v1/snapshots", response_model=Snapshot, status_code=202, dependencies=deps)
    async def create_snapshot(body: SnapshotCreate) -> Snapshot:
        return await snapshots.create(body)

    @app.get("/v1/snapshots", response_model=list[Snapshot], dependencies=deps)
    async def list_snapshots(session_id: str | None = None) -> list[Snapshot]:
        return snapshots.query(session_id)

    @app.get("/v1/snapshots/{snapshot_id}", response_model=Snapshot, dependencies=deps)
    async def get_snapshot(snapshot_id: str) -> Snapshot:
        return snapshots.get(snapshot_id)

    @app.get("/v1/snapshots/{snapshot_id}/wait", response_model=Snapshot, dependencies=deps)
    async def wait_snapshot(snapshot_id: str,
                            timeout_s: Annotated[float, Query(ge=0)] = 30.0) -> Snapshot:
        return await snapshots.wait(snapshot_id, timeout_s)

    @app.delete("/v1/snapshots/{snapshot_id}", response_model=Snapshot, dependencies=deps)
    async def delete_snapshot(snapshot_id: str) -> Snapshot:
        return await snapshots.delete(snapshot_id)

    # -- images and volumes ----------------------------------------------------------------------
    @app.get("/v1/images", response_model=list[Image], dependencies=deps)
    async def list_images() -> list[Image]:
        from ..images.builder import list_images as _list

        return _list(rt.layout)

    @app.post("/v1/volumes", response_model=Volume, status_code=201, dependencies=deps)
    async def create_volume(body: VolumeCreate) -> Volume:
        return await volumes.create(body)

    @app.get("/v1/volumes", response_model=list[Volume], dependencies=deps)
    async def list_volumes() -> list[Volume]:
        return volumes.query()

    @app.get("/v1/volumes/{volume_id}", response_model=Volume, dependencies=deps)
    async def get_volume(volume_id: str) -> Volume:
        return volumes.get(volume_id)

    @app.delete("/v1/volumes/{volume_id}", response_model=Volume, dependencies=deps)
    async def delete_volume(volume_id: str) -> Volume:
        return await volumes.delete(volume_id)

    # -- server ---------------------------------------------------------------------------------
    @app.post("/v1/server/shutdown", status_code=202, dependencies=deps)
    async def shutdown() -> dict[str, str]:
        rt.request_stop()
        return {"status": "stopping"}

    return app

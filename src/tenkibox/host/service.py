"""The host API over HTTP: an ASGI app that serves any ``HostAPI`` object under ``/host/v1``.

``tenki host run`` serves its ``LocalHost`` with it; the control plane calls it through
``remote.RemoteHost``. One route per ``HostAPI`` method, the dataclasses as JSON
(``to_json``/``from_json``). Every call needs ``Authorization: Bearer <secret>`` (the secret the
worker gave the control plane at registration); anything else is 401.

Streams are never held whole: ``read_file`` answers a chunked body as the guest gives it,
``write_file`` hands the request body to the host as it arrives, ``process_events`` and ``watch``
are NDJSON, one object a line (a ``TenkiError`` met mid-stream is a line ``{"error": ...}``;
``watch`` sends ``{}`` while idle so a reader notices a dead connection).

``GET /host/v1/status`` is what ``RemoteHost`` answers its synchronous methods from: capacity,
VMs, memory and tmpfs use, running processes, references; with ``?unowned=1`` also what
``unowned_files(set())`` lists (a listing of the whole store: asked for by a verify only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import limits
from ..errors import (
    AuthenticationError,
    ConflictError,
    InternalError,
    TenkiError,
    ValidationError,
)
from .api import (
    BootSpec,
    CaptureSpec,
    ExecSpec,
    HostAPI,
    RestoreSpec,
    SpareHost,
    Started,
    Unowned,
    VolumeMountSpec,
)
from .journal import MountJournal
from .processes import ProcessTable
from .wire import KEEPALIVE, PREFIX, error_body, ndjson

log = logging.getLogger(__name__)

#: the largest JSON body a route reads (a recover or a GC names every live session or digest)
JSON_MAX_BYTES = 64 << 20
#: how often an idle ``watch`` stream says it is alive
WATCH_KEEPALIVE_S = 5.0

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")


def _error(exc: TenkiError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status)


def _guarded(fn: Handler, host: HostAPI) -> Handler:
    """Answer a route's ``TenkiError`` with its status (and the VMs the host runs after it: a
    failed capture may have lost its VM), and bad input with 422 (never a 500 for a malformed
    body); anything else is a 500 ``Internal`` whose traceback goes to the log."""

    async def run(request: Request) -> Response:
        try:
            return await fn(request)
        except TenkiError as exc:
            try:
                after = brief(host)
            except Exception:  # the error is the answer; the cache waits for the next one
                log.exception("cannot list the VMs after an error")
                after = {}
            return JSONResponse({**error_body(exc), **after}, status_code=exc.status)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            # named as the control plane names an error of an in-process host
            return _error(InternalError(f"{type(exc).__name__}: {exc}"))

    return run


async def _json(request: Request) -> Any:
    size = 0
    parts: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > JSON_MAX_BYTES:
            raise ValidationError(f"body over {JSON_MAX_BYTES} bytes", field="body")
        parts.append(chunk)
    try:
        data = json.loads(b"".join(parts) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"invalid JSON: {exc}", field="body") from exc
    if not isinstance(data, dict):
        raise ValidationError("expected a JSON object", field="body")
    return data


def _parsed(fn: Callable[[Any], T], data: Any) -> T:
    """``fn(data)``, a request's body or parameter read into its types: a value of the wrong
    shape is the caller's mistake (422), never a 500."""
    try:
        return fn(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValidationError(f"malformed request: {type(exc).__name__}: {exc}",
                              field="body") from exc


async def _body(request: Request, fn: Callable[[Any], T]) -> T:
    return _parsed(fn, await _json(request))


def _strings(raw: Any) -> set[str]:
    if not isinstance(raw, list | None):
        raise TypeError(f"expected a list, got {type(raw).__name__}")
    return {str(x) for x in raw or []}


def _mounts(raw: Any) -> list[VolumeMountSpec]:
    return [VolumeMountSpec.from_json(m) for m in raw or []]


def brief(host: HostAPI, *, full: bool = False) -> dict[str, Any]:
    """What changes with every VM: sent with each boot, restore, capture, terminate, error and
    status (``full``: with what the host's VMs and images use, which a start or a capture
    changes)."""
    vms = host.list_vms()
    out = {"vms": vms, "memory_used_mib": host.memory_used_mib(),
           "tmpfs": host.tmpfs_use().to_json(),
           "running_processes": {s: host.running_processes(s) for s in vms}}
    table = getattr(host, "processes", None)
    if isinstance(table, ProcessTable):
        # the processes whose events may still be asked for (RemoteHost refuses others at
        # once, as a host refuses them before a stream starts)
        out["processes"] = {s: [p.id for p in table.for_session(s)] for s in vms}
    if full:
        out["referenced_locally"] = sorted(host.referenced_locally())
        out["local_artifacts"] = [u.to_json() for u in host.local_artifacts()]
    return out


def status(host: HostAPI, *, unowned: bool = False) -> dict[str, Any]:
    out = {**brief(host, full=True), "capacity": host.capacity.to_json(),
           "network_enforced": bool(host.network_enforced)}
    if unowned:
        out["unowned"] = [u.to_json() for u in host.unowned_files(set())]
    return out


class _Auth:
    """401 for any caller without the host's secret (compared in constant time)."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "no credentials" if not given else "wrong credentials"
                await _error(AuthenticationError(f"host API: {what}"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _pump_first(gen: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Take the first item before the response starts, so that an error the host raises at
    once (no VM, no such file) is an error status rather than a broken body."""
    try:
        first = await anext(gen)
    except StopAsyncIteration:
        await gen.aclose()
        first = None

    async def rest() -> AsyncGenerator[bytes, None]:
        try:
            if first is None:
                return
            yield first
            async for chunk in gen:
                yield chunk
        finally:
            await gen.aclose()

    return rest()


def create_host_app(host: HostAPI, secret: str, *, journal: MountJournal | None = None
                    ) -> ASGIApp:
    """The host API of ``host``, for callers that know ``secret``; ``journal`` notes the
    volume mounts of its VMs as the calls change them (for a restarted worker's recovery)."""

    #: session id -> its boot or restore in flight: a terminate cancels it first (a local
    #: control plane cancels the task itself; over the wire, only the host can)
    starting: dict[str, asyncio.Task[Started]] = {}

    async def start(session_id: str, work: Awaitable[Started]) -> Response:
        if session_id in starting:
            raise ConflictError(f"session {session_id} is already starting on this host")
        task = asyncio.ensure_future(work)
        starting[session_id] = task
        try:
            started = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                task.cancel()  # the caller went away (the request itself is cancelled)
                raise
            raise ConflictError(f"the start of session {session_id} was cancelled by a "
                                "terminate") from None
        finally:
            if starting.get(session_id) is task:
                del starting[session_id]
        return JSONResponse({"started": started.to_json(), **brief(host, full=True)})

    async def get_status(request: Request) -> Response:
        return JSONResponse(status(host, unowned=request.query_params.get("unowned") == "1"))

    async def boot(request: Request) -> Response:
        spec = await _body(request, BootSpec.from_json)
        return await start(spec.session_id, host.boot(spec))

    async def restore(request: Request) -> Response:
        spec = await _body(request, RestoreSpec.from_json)
        return await start(spec.session_id, host.restore(spec))

    async def prepare_spare(request: Request) -> Response:
        spec = await _body(request, RestoreSpec.from_json)
        if not isinstance(host, SpareHost):
            raise ConflictError("this host prepares no spares")
        await host.prepare_spare(spec)
        return JSONResponse({}, status_code=202)

    async def drop_spare(request: Request) -> Response:
        if isinstance(host, SpareHost):
            await host.drop_spare(request.path_params["sid"])
        return JSONResponse({})

    async def capture(request: Request) -> Response:
        captured = await host.capture(await _body(request, CaptureSpec.from_json))
        if journal is not None:
            journal.detached(request.path_params["sid"], captured.lost_volumes)
        return JSONResponse({"captured": captured.to_json(), **brief(host, full=True)})

    async def terminate(request: Request) -> Response:
        volumes = await _body(request, lambda b: _mounts(b.get("volumes")))
        sid = request.path_params["sid"]
        in_flight = starting.get(sid)
        if in_flight is not None:
            # as LocalHost.terminate asks: the start is cancelled first (it stops what it
            # launched before its task ends)
            in_flight.cancel()
            await asyncio.wait([in_flight])  # its outcome is the boot route's to answer
        await host.terminate(sid, volumes)
        if journal is not None:
            journal.gone(sid)
        return JSONResponse(brief(host, full=True))

    async def recover(request: Request) -> Response:
        live = await _body(request, lambda b: {str(s): _mounts(m)
                                               for s, m in (b.get("live") or {}).items()})
        recovered = await host.recover(live)
        if journal is not None:
            for sid in recovered.found:
                journal.record(sid, live[sid])
            for sid in recovered.lost:
                journal.gone(sid)
        return JSONResponse({"recovered": recovered.to_json(), **brief(host, full=True)})

    async def watch(_request: Request) -> Response:
        return StreamingResponse(_watch_lines(host), media_type="application/x-ndjson")

    async def image_digest(request: Request) -> Response:
        return JSONResponse({"digest": await host.image_digest(request.path_params["image"])})

    async def list_images(_request: Request) -> Response:
        images = await host.list_images()
        return JSONResponse({"images": [i.model_dump(mode="json") for i in images]})

    async def port_address(request: Request) -> Response:
        addr, port = await host.port_address(request.path_params["sid"],
                                             int(request.path_params["port"]))
        return JSONResponse({"host": addr, "port": port})

    async def create_volume(request: Request) -> Response:
        size = await _body(request, lambda b: int(b["size_bytes"]))
        await host.create_volume(request.path_params["vid"], size)
        return JSONResponse({})

    async def delete_volume(request: Request) -> Response:
        await host.delete_volume(request.path_params["vid"])
        return JSONResponse({})

    async def volume_files(_request: Request) -> Response:
        return JSONResponse({"volumes": await host.volume_files()})

    async def attach_volume(request: Request) -> Response:
        mount = await _body(request, VolumeMountSpec.from_json)
        await host.attach_volume(request.path_params["sid"], mount)
        if journal is not None:
            journal.attached(request.path_params["sid"], mount)
        return JSONResponse({})

    async def detach_volume(request: Request) -> Response:
        mount = await _body(request, VolumeMountSpec.from_json)
        await host.detach_volume(request.path_params["sid"], mount)
        if journal is not None:
            journal.detached(request.path_params["sid"], [mount.volume_id])
        return JSONResponse({})

    async def start_process(request: Request) -> Response:
        sid = request.path_params["sid"]
        ref = await host.start_process(sid, await _body(request, ExecSpec.from_json))
        return JSONResponse({"process": ref.to_json(),
                             "running_processes": host.running_processes(sid)})

    async def process_events(request: Request) -> Response:
        events = host.process_events(request.path_params["sid"], request.path_params["pid"])
        return StreamingResponse(_event_lines(events), media_type="application/x-ndjson")

    async def process_stdin(request: Request) -> Response:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limits.STDIN_WRITE_MAX_BYTES:
                raise ValidationError(f"over {limits.STDIN_WRITE_MAX_BYTES} bytes",
                                      field="stdin")
        await host.process_stdin(request.path_params["sid"], request.path_params["pid"],
                                 bytes(data))
        return JSONResponse({})

    async def process_close_stdin(request: Request) -> Response:
        await host.process_close_stdin(request.path_params["sid"], request.path_params["pid"])
        return JSONResponse({})

    async def process_kill(request: Request) -> Response:
        signal = await _body(request, lambda b: int(b["signal"]))
        await host.process_kill(request.path_params["sid"], request.path_params["pid"], signal)
        return JSONResponse({})

    async def process_exit(request: Request) -> Response:
        sid = request.path_params["sid"]
        code = await host.process_exit(sid, request.path_params["pid"])
        return JSONResponse({"exit_code": code, "running_processes": host.running_processes(sid)})

    async def read_file(request: Request) -> Response:
        path = request.query_params.get("path")
        if not path:
            raise ValidationError("is required", field="path")
        body = await _pump_first(host.read_file(request.path_params["sid"], path))
        return StreamingResponse(body, media_type="application/octet-stream")

    async def write_file(request: Request) -> Response:
        path = request.query_params.get("path")
        if not path:
            raise ValidationError("is required", field="path")
        mode = _parsed(lambda m: int(m, 0), request.query_params.get("mode") or "0o644")
        written = await host.write_file(request.path_params["sid"], path, request.stream(), mode)
        return JSONResponse({"written": written})

    async def collect_garbage(request: Request) -> Response:
        def read(b: dict[str, Any]) -> tuple[set[str], float | None]:
            grace = b.get("grace_s")
            return _strings(b.get("referenced")), float(grace) if grace is not None else None

        referenced, grace_s = await _body(request, read)
        return JSONResponse({"freed": await host.collect_garbage(referenced, grace_s)})

    async def remove_unowned(request: Request) -> Response:
        def read(b: dict[str, Any]) -> tuple[list[Unowned], set[str], set[str]]:
            return ([Unowned.from_json(u) for u in b.get("found") or []],
                    _strings(b.get("referenced")), _strings(b.get("live_sessions")))

        found, referenced, live = await _body(request, read)
        removed = await host.remove_unowned(found, referenced, live)
        return JSONResponse({"removed": [u.to_json() for u in removed]})

    async def verify_artifacts(request: Request) -> Response:
        def read(b: dict[str, Any]) -> tuple[dict[str, str], bool]:
            return ({str(k): str(v) for k, v in (b.get("digests") or {}).items()},
                    bool(b.get("deep")))

        digests, deep = await _body(request, read)
        return JSONResponse({"bad": await host.verify_artifacts(digests, deep=deep)})

    async def cached_bytes(request: Request) -> Response:
        digests = await _body(request, lambda b: sorted(_strings(b.get("digests"))))
        return JSONResponse({"bytes": await host.cached_bytes(digests)})

    async def scrub_caches(request: Request) -> Response:
        repair = await _body(request, lambda b: bool(b.get("repair")))
        return JSONResponse((await host.scrub_caches(repair)).to_json())

    vm = PREFIX + "/vms/{sid}"
    proc = vm + "/processes/{pid}"
    table: list[tuple[str, str, Handler]] = [
        ("GET", "/status", get_status),
        ("POST", "/vms/boot", boot),
        ("POST", "/vms/restore", restore),
        ("POST", "/spares", prepare_spare),
        ("DELETE", "/spares/{sid}", drop_spare),
        ("POST", "/recover", recover),
        ("GET", "/watch", watch),
        ("GET", "/images", list_images),
        ("GET", "/images/{image}/digest", image_digest),
        ("GET", "/volumes", volume_files),
        ("PUT", "/volumes/{vid}", create_volume),
        ("DELETE", "/volumes/{vid}", delete_volume),
        ("POST", "/artifacts/collect", collect_garbage),
        ("POST", "/artifacts/remove-unowned", remove_unowned),
        ("POST", "/artifacts/verify", verify_artifacts),
        ("POST", "/caches/scrub", scrub_caches),
        ("POST", "/artifacts/cached-bytes", cached_bytes),
    ]
    per_vm: list[tuple[str, str, Handler]] = [
        ("POST", "/capture", capture),
        ("POST", "/terminate", terminate),
        ("GET", "/ports/{port:int}", port_address),
        ("POST", "/volumes/attach", attach_volume),
        ("POST", "/volumes/detach", detach_volume),
        ("POST", "/processes", start_process),
        ("GET", "/files", read_file),
        ("PUT", "/files", write_file),
    ]
    per_proc: list[tuple[str, str, Handler]] = [
        ("GET", "/events", process_events),
        ("POST", "/stdin", process_stdin),
        ("POST", "/close-stdin", process_close_stdin),
        ("POST", "/kill", process_kill),
        ("POST", "/exit", process_exit),
    ]
    routes = [Route(PREFIX + p, _guarded(f, host), methods=[m]) for m, p, f in table]
    routes += [Route(vm + p, _guarded(f, host), methods=[m]) for m, p, f in per_vm]
    routes += [Route(proc + p, _guarded(f, host), methods=[m]) for m, p, f in per_proc]

    async def not_found(request: Request, exc: Exception) -> Response:
        from ..errors import MethodNotAllowedError, NotFoundError

        code = getattr(exc, "status_code", 404)
        route = f"{request.method} {request.url.path[:200]}"
        return _error(MethodNotAllowedError(f"method not allowed: {route}") if code == 405
                      else NotFoundError(f"no such route: {route}"))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return _Auth(app, secret)


async def _event_lines(events: AsyncGenerator[Any, None]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield ndjson(event.to_json())
    except TenkiError as exc:
        yield ndjson(error_body(exc))
    finally:
        # a reader gone before it took anything lets the next one in (ProcessHandle.stream)
        await events.aclose()


async def _watch_lines(host: HostAPI) -> AsyncIterator[bytes]:
    """The host's ``watch()`` as NDJSON, with a keepalive line while nothing happens. A pump
    task reads the host's stream, so that a keepalive never cancels a read of it half-way."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def pump() -> None:
        async for gone in host.watch():
            await queue.put(ndjson(gone.to_json()))

    task = asyncio.create_task(pump(), name="host watch stream")
    try:
        while True:
            try:
                line = await asyncio.wait_for(queue.get(), WATCH_KEEPALIVE_S)
            except TimeoutError:
                line = KEEPALIVE
            yield line
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

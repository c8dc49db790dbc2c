"""The gRPC side of ``tenki serve``: Tenki's wire, for the official SDKs.

``Wire`` is what the daemon starts: a public port (``front.Front``) that answers gRPC and REST
alike, and behind it one ``grpc.aio`` server on the control plane's event loop serving both
services (h2c on loopback; the front terminates TLS when the server has a certificate).
Each method of the descriptors is registered: the ones ``SandboxService``/``DataPlane``
implement run behind authentication and one error boundary; every other one answers
UNIMPLEMENTED naming itself, and so does any unknown path. Authentication: the control plane
takes ``authorization: Bearer tk_…`` (the keys of the REST API); the data plane takes
``x-tenki-session-cert`` (a session credential) and nothing else. Every mutating
control-plane call is written to the audit log, as REST calls are.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor

from ..control.plane import ControlPlane
from ..errors import ConflictError, InternalError, TenkiError
from ..urls import local_url
from . import proto
from .credentials import HEADER, Credentials
from .dataplane import DataPlane
from .front import Front, tls_context
from .sandbox import SandboxService
from .status import status_of

log = logging.getLogger(__name__)

#: bounded memory per call: the largest message either way (WriteFile content, ReadFile answer)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_READ_ONLY = ("Get", "List", "Wait", "WhoAmI", "Resolve")


def _metadata(ctx: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in ctx.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


async def _abort(ctx: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if not isinstance(exc, TenkiError):
        log.exception("gRPC call failed", exc_info=exc)
        exc = InternalError(f"internal error: {type(exc).__name__}")
    code, message = status_of(exc)
    await ctx.abort(code, message)


class GrpcServer:
    """The gRPC server, on a loopback port of its own behind the ``Front``; ``endpoint`` is the
    public address clients are told for the data plane."""

    def __init__(self, plane: ControlPlane, credentials: Credentials, endpoint: str) -> None:
        self.plane = plane
        self.credentials = credentials
        self.endpoint = endpoint
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        self.port = int(self.server.add_insecure_port("127.0.0.1:0"))
        if not self.port:
            raise ConflictError("cannot listen for gRPC on loopback")
        self.control = SandboxService(plane, credentials, endpoint)
        self.data = DataPlane(plane)
        for name, impl in ((proto.CONTROL, self.control), (proto.DATA_PLANE, self.data)):
            handlers = {m.name: self._handler(name, m, impl) for m in proto.methods(name)}
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(name, handlers),))
        self.server.add_generic_rpc_handlers((_Unknown(),))

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.server.stop(grace_s)

    # -- one handler per method ----------------------------------------------------------------
    def _handler(self, service: str, m: MethodDescriptor, impl: Any) -> grpc.RpcMethodHandler:
        req_cls = proto.message(m.input_type.full_name)
        fn = getattr(impl, m.name, None)
        des, ser = req_cls.FromString, _serialize
        full = f"/{service}/{m.name}"
        if fn is None:
            return grpc.stream_stream_rpc_method_handler(
                _unimplemented(f"{service.rsplit('.', 1)[-1]}.{m.name}"),
                request_deserializer=des, response_serializer=ser)
        auth = self._caller if service == proto.CONTROL else self._grant
        audit = service == proto.CONTROL and not m.name.startswith(_READ_ONLY)
        if m.server_streaming:  # Run (bidi) and the server streams: answers as they come
            async def stream(request: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    who = await auth(ctx)
                    async for out in fn(request, who, ctx):
                        yield out
                except Exception as exc:
                    await _abort(ctx, exc)
            make = (grpc.stream_stream_rpc_method_handler if m.client_streaming
                    else grpc.unary_stream_rpc_method_handler)
            return make(stream, des, ser)
        if m.client_streaming:
            async def upload(requests: Any, ctx: grpc.aio.ServicerContext) -> Any:
                try:
                    return await fn(requests, await auth(ctx), ctx)
                except Exception as exc:
                    await _abort(ctx, exc)
            return grpc.stream_unary_rpc_method_handler(upload, des, ser)

        async def unary(req: Any, ctx: grpc.aio.ServicerContext) -> Any:
            who = None
            try:
                who = await auth(ctx)
                out = await fn(req, who, ctx)
            except Exception as exc:
                if audit:
                    await self._audit(full, m.name, who, req, exc)
                await _abort(ctx, exc)
            if audit:
                await self._audit(full, m.name, who, req, None)
            return out
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)

    async def _caller(self, ctx: grpc.aio.ServicerContext) -> Any:
        return await self.plane.keys.authenticate(_metadata(ctx, "authorization"))

    async def _grant(self, ctx: grpc.aio.ServicerContext) -> Any:
        return self.credentials.verify(_metadata(ctx, HEADER))

    async def _audit(self, path: str, action: str, who: Any, req: Any,
                     exc: BaseException | None) -> None:
        object_id = next((getattr(req, f) for f in ("session_id", "snapshot_id", "volume_id")
                          if getattr(req, f, "")), None)
        if isinstance(exc, TenkiError):
            status, outcome = exc.status, exc.code
        elif exc is not None:
            status, outcome = 500, "internal"
        else:
            status, outcome = 200, "ok"
        try:
            await self.plane.audit.record(
                workspace_id=who.workspace_id if who else None,
                key_prefix=who.key_prefix if who else None, action=action, method="GRPC",
                path=path, object_id=object_id, status=status, outcome=outcome)
        except Exception:  # the answer goes out: a failed audit write is logged, not raised
            log.exception("could not write the audit record of %s", path)


class Wire:
    """What ``tenki serve`` adds for the official SDKs: the public address (``Front``: gRPC and
    REST on one port, so one ``TENKI_API_ENDPOINT`` serves every client) and the gRPC server
    behind it. ``rest``: where the REST server listens (loopback reaches it)."""

    def __init__(self, plane: ControlPlane, credentials: Credentials, host: str, port: int, *,
                 rest: tuple[str, int], tls: tuple[Path, Path] | None = None,
                 advertise: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConflictError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                field="grpc_port") from exc
        self.port = int(sock.getsockname()[1])
        self.endpoint = advertise or local_url(host, self.port, "https" if tls else "http")
        self.grpc = GrpcServer(plane, credentials, self.endpoint)
        ctx = tls_context(str(tls[0]), str(tls[1])) if tls else None
        self.front = Front(sock, grpc=("127.0.0.1", self.grpc.port), rest=rest, tls=ctx,
                           rest_tls=tls is not None)

    async def start(self) -> None:
        await self.grpc.start()
        await self.front.start()

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.front.stop()
        await self.grpc.stop(grace_s)


def _serialize(msg: Any) -> bytes:
    return bytes(msg.SerializeToString())


def _unimplemented(name: str) -> Callable[..., Any]:
    async def handler(requests: Any, ctx: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await ctx.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by tenki")
        yield  # pragma: no cover - abort raises
    return handler


class _Unknown(grpc.GenericRpcHandler):
    """Any path no service has: UNIMPLEMENTED, naming the method asked for."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        name = str(getattr(details, "method", "") or "").lstrip("/").replace("/", ".")
        return grpc.stream_stream_rpc_method_handler(
            _unimplemented(name or "this method"),
            request_deserializer=lambda raw: raw, response_serializer=lambda raw: raw)

"""A stub control plane for host worker tests: ``POST /v1/hosts`` and
``POST /v1/hosts/{id}/heartbeat`` as the multi-host contract says them, recording what it is
sent and answering what the test says (``owned``, ``known``, ``refuse``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

KEY = "tk_admin_test"


class StubControl:
    """``POST /v1/hosts`` and ``POST /v1/hosts/{id}/heartbeat`` as the contract says them."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.owned: list[Any] = []
        self.known: set[str] = set()
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.refuse = False

        async def register(request: Request) -> JSONResponse:
            if (denied := self._denied(request)) is not None:
                return denied
            body = await request.json()
            self.registrations.append(body)
            host_id = body["host_id"] or "host-abc"
            self.known.add(host_id)
            return JSONResponse({"host_id": host_id, "address": body["address"],
                                 "state": "ACTIVE", "heartbeat_interval_s": self.interval_s,
                                 "owned": self.owned})

        async def heartbeat(request: Request) -> JSONResponse:
            if (denied := self._denied(request)) is not None:
                return denied
            host_id = request.path_params["host_id"]
            if host_id not in self.known:
                return JSONResponse({"error": {"code": "NotFound",
                                               "message": f"host {host_id} not found"}},
                                    status_code=404)
            self.heartbeats.append({"host_id": host_id, **await request.json()})
            return JSONResponse({"state": "ACTIVE", "owned": self.owned})

        self.app = Starlette(routes=[
            Route("/v1/hosts", register, methods=["POST"]),
            Route("/v1/hosts/{host_id}/heartbeat", heartbeat, methods=["POST"]),
        ])

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.refuse or request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"code": "Unauthorized", "message": "unknown key"}},
                                status_code=401)
        return None


def serve_in_thread(stub: StubControl) -> tuple[uvicorn.Server, threading.Thread, int]:
    """``stub`` on 127.0.0.1 (a free port) in a thread of its own: (server, thread, port);
    stop it with ``server.should_exit = True`` and ``thread.join()``."""
    config = uvicorn.Config(stub.app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]

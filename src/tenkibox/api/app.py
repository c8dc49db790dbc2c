"""The REST application: routers per resource over the control plane, one error format."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from .._version import __version__
from ..config import Layout
from ..control.plane import ControlPlane
from .errors import install_error_handlers
from .routes import server, sessions, snapshots, volumes


def create_app(plane: ControlPlane, *, layout: Layout, accel: str, api_key: str | None,
               request_stop: Callable[[], None]) -> FastAPI:
    app = FastAPI(title="tenki", version=__version__,
                  description="Self-hosted sandbox VMs with memory snapshots.")
    app.state.plane = plane
    app.state.layout = layout
    app.state.accel = accel
    app.state.api_key = api_key
    app.state.request_stop = request_stop
    install_error_handlers(app)
    for module in (sessions, snapshots, volumes, server):
        app.include_router(module.router)
    return app

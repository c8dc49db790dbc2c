"""The REST application: routers per resource over the control plane, one error format.

``application()`` is the contract alone (routes, models, errors), used to publish
``docs/openapi.json``; ``create_app`` binds it to a running control plane.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from .._version import __version__
from ..config import Layout
from ..control.plane import ControlPlane
from .auth import AccessMiddleware
from .errors import install_error_handlers
from .routes import (
    STREAM_ITEM_MODELS,
    access,
    hosts,
    ports,
    server,
    sessions,
    snapshots,
    templates,
    volumes,
)


def application() -> FastAPI:
    # no /docs or /redoc: every path needs a key, which a browser does not send; the contract
    # is docs/openapi.json (and /openapi.json, with a key)
    app = FastAPI(title="tenki", version=__version__, docs_url=None, redoc_url=None,
                  description="Self-hosted sandbox VMs with memory snapshots. Every call needs "
                  "Authorization: Bearer tk_<key>.")
    install_error_handlers(app)
    # added last, so it runs first: no request reaches anything else without a valid key
    app.add_middleware(AccessMiddleware)
    for module in (sessions, ports, snapshots, volumes, templates, access, hosts, server):
        app.include_router(module.router)
    _document_stream_items(app)
    return app


def _document_stream_items(app: FastAPI) -> None:
    """Put the models of streamed items (``routes.stream_of``) in the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = generate()  # kept as app.openapi_schema: the additions stay
        # every operation needs a key (api/auth.py enforces it before any route)
        doc.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http", "scheme": "bearer", "bearerFormat": "tk_<43 characters>",
            "description": "A workspace API key (tenki apikey create)"}
        doc["security"] = [{"apiKey": []}]
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, model in STREAM_ITEM_MODELS.items():
            schemas[name] = model.model_json_schema(
                mode="serialization", ref_template="#/components/schemas/{model}")
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(plane: ControlPlane, *, layout: Layout, accel: str,
               request_stop: Callable[[], None], grpc_endpoint: str | None = None) -> FastAPI:
    """``grpc_endpoint``: where the server's gRPC wire listens (``tenki server status``)."""
    app = application()
    app.state.grpc_endpoint = grpc_endpoint
    app.state.plane = plane
    app.state.layout = layout
    app.state.accel = accel
    app.state.request_stop = request_stop
    return app


def openapi_document() -> dict[str, Any]:
    """The published contract, without the version (so a release does not change it)."""
    doc = application().openapi()
    doc["info"].pop("version", None)
    return doc


def main() -> None:
    """``python -m tenkibox.api.app > docs/openapi.json``"""
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()

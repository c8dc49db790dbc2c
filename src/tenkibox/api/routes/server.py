"""The server itself: health, images, this host's capacity, administration."""

from __future__ import annotations

import os

from fastapi import APIRouter, Query, Request

from ..._version import __version__
from ...models import HostStatus, Image, ServerInfo, StoreReport
from ..deps import Admin, Caller, Plane
from . import errors

router = APIRouter(prefix="/v1", tags=["server"])


@router.get("/health", response_model=ServerInfo, operation_id="health", responses=errors())
async def health(request: Request, caller: Caller) -> ServerInfo:
    """The server's version, pid and accelerator; its data directory (a path on the server's
    machine) only to an admin key: a workspace's key learns nothing of the host."""
    state = request.app.state
    return ServerInfo(version=__version__, pid=os.getpid(),
                      home=str(state.layout.home) if caller.admin else None,
                      accelerator=state.accel,
                      grpc_endpoint=getattr(state, "grpc_endpoint", None))


@router.get("/images", response_model=list[Image], operation_id="listImages",
            responses=errors())
async def list_images(plane: Plane, _: Caller) -> list[Image]:
    return await plane.list_images()


@router.get("/host", response_model=HostStatus, operation_id="hostStatus",
            responses=errors(403))
async def host_status(plane: Plane, _: Admin) -> HostStatus:
    """Memory the hosts may promise to guests, have promised, and what they really hold (all
    hosts together; one host's: ``GET /v1/hosts/{host_id}``)."""
    return plane.host_status()


@router.post("/server/shutdown", status_code=202, operation_id="shutdownServer",
             responses=errors(403))
async def shutdown(request: Request, _: Admin) -> dict[str, str]:
    request.app.state.request_stop()
    return {"status": "stopping"}


@router.post("/admin/verify", response_model=StoreReport, operation_id="verifyStore",
             responses=errors(403))
async def verify(plane: Plane, _: Admin, repair: bool = Query(
        default=False, description="also repair: damaged snapshots FAILED, damaged RAM caches "
        "rebuilt, unowned files no one can claim removed")) -> StoreReport:
    """Re-read against its digest every stored artifact of every READY snapshot, of every built
    image and of every live session's VM, re-hash the derived RAM caches, and list files no
    record owns. ``repair`` marks snapshots with damaged artifacts FAILED, rebuilds damaged RAM
    caches and removes unowned files (listed in ``removed``); damaged images and sessions are
    reported only."""
    return StoreReport(**await plane.snapshots.verify(repair))

"""Dependencies shared by the routes: the control plane of this server, and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..control.plane import ControlPlane
from .auth import Principal, admin, principal


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


Plane = Annotated[ControlPlane, Depends(_plane)]
#: any valid key; its ``workspace_id`` scopes everything the route sees
Caller = Annotated[Principal, Depends(principal)]
#: an admin key (403 otherwise)
Admin = Annotated[Principal, Depends(admin)]

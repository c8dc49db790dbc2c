"""Templates: records, builds (asynchronous, one at a time), the build log as it is written.
A session starts from a template with ``POST /v1/sessions`` and ``template_id``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from ...models import Template, TemplateBuild, TemplateCreate, TemplateUpdate
from ..deps import Caller, Plane
from . import errors

router = APIRouter(prefix="/v1/templates", tags=["templates"])


@router.post("", response_model=Template, status_code=201, operation_id="createTemplate",
             responses=errors(404, 409))
async def create_template(body: TemplateCreate, plane: Plane, caller: Caller) -> Template:
    return await plane.templates.create(body, caller.workspace_id)


@router.get("", response_model=list[Template], operation_id="listTemplates",
            responses=errors())
async def list_templates(plane: Plane, caller: Caller) -> list[Template]:
    return plane.templates.query(caller.workspace_id)


@router.get("/{template_id}", response_model=Template, operation_id="getTemplate",
            responses=errors(404))
async def get_template(template_id: str, plane: Plane, caller: Caller) -> Template:
    return plane.templates.get(template_id, caller.workspace_id)


@router.patch("/{template_id}", response_model=Template, operation_id="updateTemplate",
              responses=errors(404, 409))
async def update_template(template_id: str, body: TemplateUpdate, plane: Plane,
                          caller: Caller) -> Template:
    """Only the fields given change; the next build uses them."""
    return await plane.templates.update(template_id, body, caller.workspace_id)


@router.delete("/{template_id}", response_model=Template, operation_id="deleteTemplate",
               responses=errors(404, 409))
async def delete_template(template_id: str, plane: Plane, caller: Caller,
                          force: bool = Query(
                              default=False, description="delete even while a build runs (it is "
                              "cancelled)")) -> Template:
    """Refused while a build runs, unless ``force`` (which cancels it). The golden snapshots
    go with it (their artifacts stay while sessions still need them)."""
    return await plane.templates.delete(template_id, caller.workspace_id, force)


@router.post("/{template_id}/builds", response_model=TemplateBuild, status_code=202,
             operation_id="buildTemplate", responses=errors(404, 409, 429, 503))
async def build_template(template_id: str, plane: Plane, caller: Caller) -> TemplateBuild:
    """Starts a build (PENDING); 409 "template build already in progress" while one runs."""
    return await plane.templates.build(template_id, caller.workspace_id)


@router.get("/{template_id}/builds", response_model=list[TemplateBuild],
            operation_id="listTemplateBuilds", responses=errors(404))
async def list_builds(template_id: str, plane: Plane, caller: Caller) -> list[TemplateBuild]:
    return plane.templates.builds(template_id, caller.workspace_id)


@router.get("/{template_id}/builds/{build_id}", response_model=TemplateBuild,
            operation_id="getTemplateBuild", responses=errors(404))
async def get_build(template_id: str, build_id: str, plane: Plane,
                    caller: Caller) -> TemplateBuild:
    return plane.templates.get_build(template_id, build_id, caller.workspace_id)


@router.get("/{template_id}/builds/{build_id}/wait", response_model=TemplateBuild,
            operation_id="waitTemplateBuild", responses=errors(404))
async def wait_build(template_id: str, build_id: str, plane: Plane, caller: Caller,
                     timeout_s: Annotated[float, Query(
                         ge=0, le=3600, description="seconds to wait for the build to end; "
                         "answered as it is when they are up")] = 30.0,
                     ) -> TemplateBuild:
    """Answers once the build is READY or FAILED, or as it is when the time is up."""
    return await plane.templates.wait_build(template_id, build_id, caller.workspace_id,
                                            timeout_s)


@router.get("/{template_id}/builds/{build_id}/log", operation_id="templateBuildLog",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/plain": {}},
                             "description": "the log from ``offset``, streamed as it is "
                             "written, until the build ends"}, **errors(404)})
async def build_log(template_id: str, build_id: str, plane: Plane, caller: Caller,
                    offset: Annotated[int, Query(
                        ge=0, description="the byte of the log to start from (to resume "
                        "following it)")] = 0) -> StreamingResponse:
    chunks = await plane.templates.follow_log(template_id, build_id, caller.workspace_id,
                                              offset)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for text in chunks:
                yield text.encode()
        finally:
            await chunks.aclose()

    return StreamingResponse(body(), media_type="text/plain; charset=utf-8")

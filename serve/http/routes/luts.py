"""`/v1/admin/projects/{name}/luts`: a project's .cube LUT looks (admin keys of the project, or studio
admins). A video's or storyboard's `look` names one; other projects cannot see or use it.

    PUT    /v1/admin/projects/{name}/luts/{look}   register or replace (400 `invalid_lut` names the line)
    GET    /v1/admin/projects/{name}/luts          the project's looks
    DELETE /v1/admin/projects/{name}/luts/{look}   unregister (videos admitted with it keep their version)
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.grade import LOOK_PATTERN
from pipeline.lut import MAX_SIZE, CubeError, Interpolation
from serve.http.deps import StateDep
from serve.http.errors import ApiError
from serve.http.routes.admin import Admin, managed_project
from serve.jobs.luts import LutRecord
from serve.jobs.models import unix
from serve.luts import ReservedLookName, register_lut

router = APIRouter(prefix="/v1/admin/projects/{name}/luts", tags=["admin"])
LookName = Annotated[str, Path(pattern=LOOK_PATTERN, description="The look's name in requests.")]


class LutUpload(BaseModel):
    """A .cube 3D LUT (Adobe / Resolve) as text, at most 4 MiB in the request (a 33³ LUT is ~1 MB; larger
    ones through the deployment's `luts:` config)."""

    model_config = ConfigDict(extra="forbid")

    cube: str = Field(description=f"The .cube file's text: LUT_3D_SIZE 2–{MAX_SIZE}, then its rows.")
    interpolation: Interpolation = Field(
        "tetrahedral",
        description="How the table is interpolated (the .cube format has no word for it): `tetrahedral` "
        "(as Resolve does) or `trilinear`.",
    )


class Lut(BaseModel):
    object: str = "lut"
    project: str
    name: str = Field(description="Name it by in a request's `look`.")
    size: int = Field(description="LUT_3D_SIZE: points per axis of the table.")
    interpolation: Interpolation
    sha256: str = Field(description="Of the .cube file.")
    created_at: int = Field(description="Unix seconds it was registered.")


class LutList(BaseModel):
    object: str = "list"
    data: list[Lut]


def _lut(record: LutRecord) -> Lut:
    return Lut(
        project=record.project,
        name=record.name,
        size=record.size,
        interpolation=record.interpolation,
        sha256=record.sha256,
        created_at=unix(record.created_at),
    )


@router.put(
    "/{look}",
    status_code=201,
    response_model=Lut,
    responses={200: {"model": Lut, "description": "Replaced the look of that name."}},
    summary="Register a LUT look",
)
async def put_lut(name: str, look: LookName, body: LutUpload, state: StateDep, who: Admin) -> JSONResponse:
    await managed_project(name, who, state.store)
    try:
        record, created = await asyncio.to_thread(
            register_lut, state.store, state.artifacts, name, look, body.cube, body.interpolation
        )
    except ReservedLookName as error:
        raise ApiError(400, "reserved_look_name", str(error), "look") from None
    except CubeError as error:
        raise ApiError(400, "invalid_lut", f"the .cube file is malformed: {error}", "cube") from None
    return JSONResponse(_lut(record).model_dump(mode="json"), status_code=201 if created else 200)


@router.get("", response_model=LutList, summary="List a project's LUT looks")
async def list_luts(name: str, state: StateDep, who: Admin) -> LutList:
    await managed_project(name, who, state.store)
    return LutList(data=[_lut(record) for record in await asyncio.to_thread(state.store.list_luts, name)])


@router.delete("/{look}", response_model=Lut, summary="Unregister a LUT look")
async def delete_lut(name: str, look: LookName, state: StateDep, who: Admin) -> Lut:
    await managed_project(name, who, state.store)
    record = await asyncio.to_thread(state.store.delete_lut, name, look)
    if record is None:
        raise ApiError(404, "not_found", f"project {name!r} has no look named {look!r}", "look")
    return _lut(record)

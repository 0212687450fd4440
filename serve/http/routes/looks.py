"""`/v1/looks`: the looks a video of the caller's project may name (`look`): the built-in ones and the
project's LUTs, for a composer's look field. Any key of the project reads it; registering a LUT stays an
admin's (`/v1/admin/projects/{name}/luts`)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from pipeline.grade import LOOKS
from serve.http.deps import CallerDep, StateDep

router = APIRouter(prefix="/v1/looks", tags=["looks"])


class Look(BaseModel):
    name: str = Field(description="What a video's `look` names.")
    kind: Literal["builtin", "lut"] = Field(
        description="`builtin` (none, film) or one of the project's LUTs."
    )


class LookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Look]


@router.get("", response_model=LookList, summary="List the looks a video may name")
async def list_looks(state: StateDep, caller: CallerDep) -> LookList:
    luts = await asyncio.to_thread(state.store.list_luts, caller.project)
    return LookList(
        data=[Look(name=name, kind="builtin") for name in LOOKS]
        + [Look(name=lut.name, kind="lut") for lut in luts]
    )

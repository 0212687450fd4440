"""`GET /v1/models` (the OpenAI models list: the one served model, with the sizes this deployment serves)
and `GET /`, which points people and tools at the API's documentation."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from pipeline.spec import RESOLUTION_PRESETS, SizeEnvelope
from serve.http.deps import CallerDep, StateDep
from serve.jobs.request import SERVED_MODEL

router = APIRouter(tags=["models"])


class ServedModel(BaseModel):
    id: str = Field(description="The name to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(0, description="Unix seconds (the model's release is not tracked: 0).")
    owned_by: str = "previz"
    presets: dict[str, str] = Field(description="Preset resolution -> `WxH` (16:9; 9:16 swaps them).")
    envelope: SizeEnvelope = Field(description="The sizes this deployment serves.")
    default_steps: int
    fps: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]


@router.get("/v1/models", response_model=ModelList, summary="List the served models")
async def list_models(state: StateDep, _caller: CallerDep) -> ModelList:
    presets = {name: f"{width}x{height}" for name, (width, height) in RESOLUTION_PRESETS.items()}
    served = ServedModel(
        id=SERVED_MODEL,
        presets=presets,
        envelope=state.args.envelope,
        default_steps=state.model.num_steps,
        fps=state.model.fps,
    )
    return ModelList(data=[served])


@router.get("/", include_in_schema=False)
async def root() -> dict[str, str]:
    return {"service": "previz", "docs": "/docs", "openapi": "/openapi.json", "api": "/v1"}

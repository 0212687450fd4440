"""`/v1/prompts/compile`: the prompt a create would send to the text encoder, compiled by the one
function every create uses (pipeline.prompt.compose_prompt), for a composer's live preview."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from pipeline.prompt import ShotSpec, compose_prompt
from serve.http.deps import CallerDep
from serve.http.errors import ApiError
from serve.http.schemas import MAX_PROMPT_CHARS

router = APIRouter(prefix="/v1/prompts", tags=["prompts"])


class PromptCompile(BaseModel):
    """A prompt, a shot, or both: as in a create."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="The free prompt.")
    shot: ShotSpec | None = Field(None, description="Structured shot fields, compiled before the prompt.")


class CompiledPrompt(BaseModel):
    object: Literal["prompt"] = "prompt"
    prompt: str = Field(description="The text the encoder gets: the shot's sentences, then the free prompt.")
    shot_prompt: str | None = Field(description="The shot's fields compiled alone; null without a shot.")


@router.post("/compile", response_model=CompiledPrompt, summary="Compile a prompt")
async def compile_prompt(body: PromptCompile, _caller: CallerDep) -> CompiledPrompt:
    """Nothing is stored or checked against the content policy: a create does that."""
    try:
        text = compose_prompt(body.prompt, body.shot)
    except ValueError as error:
        raise ApiError(400, "missing_field", str(error), "prompt") from None
    return CompiledPrompt(prompt=text, shot_prompt=body.shot.to_prompt() if body.shot is not None else None)

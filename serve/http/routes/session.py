"""`/v1/session`: who an API key is (its project and role), for a page that signs in with one."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from serve.auth import Role
from serve.http.deps import CallerDep

router = APIRouter(prefix="/v1/session", tags=["session"])


class Session(BaseModel):
    """The caller the request's key names."""

    object: Literal["session"] = "session"
    project: str = Field(description="Every video and storyboard the key creates or sees is this project's.")
    role: Role
    key_id: str = Field(description="The key's public id (what an admin revokes).")
    is_admin: bool = Field(description="The key may manage its project's keys, quotas and looks.")
    is_studio_admin: bool = Field(description="The key may manage every project.")


@router.get("", response_model=Session, summary="Retrieve the key's session")
async def get_session(caller: CallerDep) -> Session:
    """401 like every other route for a missing, unknown or revoked key: what a sign-in form shows."""
    return Session(
        project=caller.project,
        role=caller.role,
        key_id=caller.key_id,
        is_admin=caller.is_admin,
        is_studio_admin=caller.is_studio_admin,
    )

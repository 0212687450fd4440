"""`/v1/artifacts/{key}`: the signed, expiring links of a local artifact store (no API key needed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from serve.http.deps import StateDep
from serve.http.errors import ApiError
from serve.storage import ArtifactNotFoundError

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get(
    "/{key:path}",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}, "image/jpeg": {}}, "description": "The stored file."}},
    summary="Download through a signed link",
)
async def get_artifact(
    key: str,
    state: StateDep,
    expires: Annotated[int, Query(description="Unix seconds after which the link is refused.")],
    signature: Annotated[str, Query(max_length=128, description="HMAC-SHA256 of the key and expiry.")],
) -> FileResponse:
    """What `/v1/videos/{id}/content` redirects to: no API key needed, until `expires` (then 403
    `url_expired`; a changed key, expiry or signature is 403 `bad_signature`)."""
    if state.signer is None:
        raise ApiError(404, "not_found", "this deployment hands out its store's own links")
    problem = state.signer.check(key, expires, signature)
    if problem == "bad_signature":
        raise ApiError(403, problem, "the link's signature does not match; ask the API for a new link")
    if problem == "url_expired":
        raise ApiError(403, problem, "the link has expired; ask the API for the content again")
    try:
        path = state.artifacts.local_path(key)
    except (ArtifactNotFoundError, ValueError):
        raise ApiError(404, "artifact_missing", "the file is no longer stored") from None
    parts = key.split("/")
    job_id = parts[-2] if len(parts) > 1 else "artifact"
    if key.endswith(".jpg"):
        return FileResponse(path, media_type="image/jpeg", filename=f"{job_id}.jpg")
    return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

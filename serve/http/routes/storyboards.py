"""`/v1/storyboards`: shots × variants created at once through the one admission path, and their state."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve.auth import Caller
from serve.http.admission import BoardDraft, VideoDraft, admit, check_model, project_settings
from serve.http.deps import (
    CallerDep,
    IdempotencyKey,
    IngressState,
    StateDep,
    deleting,
    jobs_on_board,
    project_of,
    queue_waits,
)
from serve.http.errors import BLOCKED, ApiError, invalid
from serve.http.keyframes import keyframe_inputs, stored_keyframe_inputs
from serve.http.routes.videos import check_promotable, promotion_draft
from serve.http.schemas import VideoPromote
from serve.http.storyboards import (
    MAX_STORYBOARD_VIDEOS,
    PromotedTakes,
    Storyboard,
    StoryboardCreate,
    StoryboardDeleted,
    StoryboardList,
    StoryboardPromote,
    expand,
)
from serve.http.views import storyboard_view, video_view
from serve.jobs import JobRecord, StoryboardRecord, StoryboardRequest, deletion, new_storyboard_id
from serve.jobs.request import StoryboardPlace
from serve.jobs.storyboard import BoardShot

router = APIRouter(prefix="/v1/storyboards", tags=["storyboards"])


@router.post(
    "",
    status_code=201,
    response_model=Storyboard,
    responses={200: {"model": Storyboard, "description": "A replay of an Idempotency-Key."}, **BLOCKED},
    summary="Create a storyboard",
)
async def create_storyboard(
    body: StoryboardCreate, state: StateDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Every shot × variant (seeds × grid) becomes a video of the board's project, all created in one
    transaction (a full queue refuses all of them: 429). They share the project's fair share. A shot with
    `keyframes` or `continue` runs on the I2V model; a `continue` shot's takes wait for the shot they
    continue (see the shot's `continue`)."""
    model = check_model(body.model) if "model" in body.model_fields_set else None
    chain = chain_of(body)
    project = project_of(caller, body.project)
    if body.num_videos > MAX_STORYBOARD_VIDEOS:
        raise ApiError(
            400,
            "too_many_videos",
            f"the board asks for {body.num_videos} videos ({len(body.shots)} shots × "
            f"{body.variants.num_variants} variants); at most {MAX_STORYBOARD_VIDEOS} in one storyboard",
            "variants",
        )
    for index, shot in enumerate(body.shots):  # as the schema says: a grid varies a shot, it makes none
        if shot.shot is None and not (shot.prompt and shot.prompt.strip()):
            raise ApiError(
                400, "missing_field", "every shot needs a `prompt` or a `shot`", f"shots.{index}.prompt"
            )
    try:
        planned = expand(body)
    except ValidationError as error:
        raise invalid(list(error.errors()), "variants.grid.") from None
    stored = StoryboardRequest(
        title=body.title,
        shots=[
            BoardShot(name=shot.name, prompt=shot.prompt, continues=continues)
            for shot, continues in zip(body.shots, chain, strict=True)
        ],
        fps=body.fps,
        body=without_images(body.model_dump(mode="json")),
    )
    board = BoardDraft(id=new_storyboard_id(), title=body.title, request=stored)
    callback_url = str(body.callback_url) if body.callback_url else None
    panels = await asyncio.to_thread(
        lambda: [
            keyframe_inputs(shot.keyframes, None, f"shots.{index}.") for index, shot in enumerate(body.shots)
        ]
    )
    drafts = []
    for video in planned:
        shot = body.shots[video.shot_index]
        settings = video.settings
        if settings.quality is None and body.quality is not None:
            settings = settings.model_copy(update={"quality": body.quality})
        place = StoryboardPlace(
            id=board.id, shot=video.shot_index, variant=video.variant_index, name=shot.name, grid=video.grid
        )
        drafts.append(
            VideoDraft(
                settings=settings,
                priority=body.priority,
                labels={**body.labels, **shot.labels},
                prefix=f"shots.{video.shot_index}.",
                callback_url=callback_url,
                storyboard=place,
                model=model,
                keyframes=panels[video.shot_index],
                continues=chain[video.shot_index],
            )
        )
    admitted = await admit(
        state, project, drafts, body=board.request.body, idempotency_key=idempotency_key, board=board
    )
    view = await storyboard_of(admitted.storyboard.id, state, caller)
    headers = {} if admitted.created else {"Idempotent-Replayed": "true"}
    return JSONResponse(
        view.model_dump(mode="json"), status_code=201 if admitted.created else 200, headers=headers
    )


def without_images(body: dict[str, Any]) -> dict[str, Any]:
    """The board's body as kept with it: each panel's data URL replaced by its SHA-256 (the images are stored
    with the jobs; a board row must not hold megabytes of base64)."""
    for shot in body.get("shots", []):
        keyframes = shot.get("keyframes") or {}
        for which, value in keyframes.items():
            if isinstance(value, str):
                keyframes[which] = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return body


def chain_of(body: StoryboardCreate) -> list[int | None]:
    """Per shot, the index of the earlier shot it continues (`continue`: `previous` or a shot's name), or
    None; 400 `invalid_continue` for the first shot's `previous`, a name of no earlier shot, or a shot that
    also gives `keyframes.first` (its first frame is its predecessor's)."""
    chain: list[int | None] = []
    for index, shot in enumerate(body.shots):
        param = f"shots.{index}.continue"
        if shot.continues is None:
            chain.append(None)
            continue
        if shot.keyframes is not None and shot.keyframes.first is not None:
            raise ApiError(
                400,
                "invalid_continue",
                "a shot that continues another starts from that shot's last frame; drop its "
                "`keyframes.first` or its `continue`",
                param,
            )
        if shot.continues == "previous":
            if index == 0:
                raise ApiError(
                    400, "invalid_continue", "the first shot has no previous shot to continue", param
                )
            chain.append(index - 1)
            continue
        earlier = [i for i, other in enumerate(body.shots[:index]) if other.name == shot.continues]
        if not earlier:
            raise ApiError(
                400,
                "invalid_continue",
                f"`continue` must be `previous` or the name of an earlier shot, not {shot.continues!r}",
                param,
            )
        chain.append(earlier[-1])
    return chain


@router.get("", response_model=StoryboardList, summary="List storyboards")
async def list_storyboards(
    state: StateDep,
    caller: CallerDep,
    after: Annotated[
        str | None, Query(max_length=64, description="The last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Storyboards per page.")] = 20,
) -> StoryboardList:
    """The project's storyboards, newest first, each with its shots' videos and states."""
    if after is not None:
        cursor = await asyncio.to_thread(state.store.get_storyboard, after)
        if cursor is None or cursor.project != caller.project:
            raise ApiError(
                400,
                "invalid_cursor",
                f"`after` must be the id of one of the project's storyboards, not {after!r}",
                "after",
            )
    records = await asyncio.to_thread(
        state.store.list_storyboards, caller.project, after=after, limit=limit + 1
    )
    page = [storyboard_view(record, await jobs_on_board(state, record)) for record in records[:limit]]
    return StoryboardList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(records) > limit,
    )


@router.post(
    "/{storyboard_id}/promote",
    status_code=201,
    response_model=PromotedTakes,
    responses=BLOCKED,
    summary="Promote chosen takes of a storyboard",
)
async def promote_takes(
    storyboard_id: str, body: StoryboardPromote, state: StateDep, caller: CallerDep
) -> PromotedTakes:
    """The final take of each chosen draft of the board (as `POST /v1/videos/{id}/promote` makes one),
    created in one transaction: all of them or none (409 when one is final or promoted already)."""
    board = await storyboard_of(storyboard_id, state, caller)
    on_board = {video.video_id for shot in board.shots for video in shot.videos}
    settings = await project_settings(state.store, caller.project)
    # the options each take's promote gets, as set (an unset `cache` is the final tier's default)
    options = VideoPromote.model_validate(
        body.model_dump(include={"upscale", "look", "priority", "cache"}, exclude_unset=True)
    )
    drafts = []
    for index, video_id in enumerate(body.video_ids):
        param = f"video_ids.{index}"
        source = await asyncio.to_thread(state.store.get, video_id, project=caller.project)
        if source is None or video_id not in on_board:
            raise ApiError(404, "not_found", f"storyboard {storyboard_id} has no video {video_id!r}", param)
        check_promotable(source, param)
        keyframes = await asyncio.to_thread(stored_keyframe_inputs, state.artifacts, source)
        drafts.append(
            promotion_draft(source, options, settings.burn_label, prefix=f"{param}.", keyframes=keyframes)
        )
    admitted = await admit(
        state,
        caller.project,
        drafts,
        body={"promote_of": storyboard_id, **body.model_dump(mode="json")},
        idempotency_key=None,
        settings=settings,
    )
    jobs = admitted.jobs or ((admitted.job,) if admitted.job is not None else ())
    return PromotedTakes(data=[video_view(job) for job in jobs])


@router.delete("/{storyboard_id}", response_model=StoryboardDeleted, summary="Delete a storyboard")
async def delete_storyboard(
    storyboard_id: str,
    state: StateDep,
    caller: CallerDep,
    delete_videos: Annotated[
        bool,
        Query(
            description="Delete the board's videos too (queued and running ones are cancelled, then deleted, "
            "each as `DELETE /v1/videos/{id}` deletes a video). Default: they are kept, as videos of no "
            "board."
        ),
    ] = False,
) -> StoryboardDeleted:
    """Delete the board, its edit and its cut (the cut's mp4 and clips leave the artifact store, their
    signed links 404). Its takes are kept by default: they are videos of the project in their own right
    (listed, remixed, promoted, downloaded by editors) and a deleted take cannot be brought back, so
    deleting them is asked for with `delete_videos=true`. 503 `storage_unavailable` if the store fails
    (what was deleted stays deleted; delete the board again to finish)."""
    record, _jobs = await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
    outcome = await deleting(
        deletion.delete_storyboard, state.store, state.artifacts, record, delete_videos=delete_videos
    )
    if outcome is None:  # deleted meanwhile by another request
        raise ApiError(404, "not_found", f"no storyboard with id {storyboard_id!r}", param="storyboard_id")
    for video_id in outcome.cancelled:  # stop their runs; each run removes what it stored
        state.scheduler.cancel.remote(video_id)
    if outcome.cancelled:
        state.scheduler.wake.remote()
    return StoryboardDeleted(id=record.id, deleted_videos=outcome.deleted_videos)


@router.get("/{storyboard_id}", response_model=Storyboard, summary="Retrieve a storyboard")
async def get_storyboard(storyboard_id: str, state: StateDep, caller: CallerDep) -> Storyboard:
    return await storyboard_of(storyboard_id, state, caller)


async def storyboard_of(storyboard_id: str, state: IngressState, caller: Caller) -> Storyboard:
    record, jobs = await board_and_jobs(storyboard_id, state, caller)
    view = storyboard_view(record, jobs, await queue_waits(state, jobs))
    if view.cut_url is None:  # a first cut queued or rendering is followed at the same link
        latest = await asyncio.to_thread(state.store.latest_cut, storyboard_id)
        if latest is not None and not latest.is_finished:
            view.cut_url = f"/v1/storyboards/{storyboard_id}/cut"
    return view


async def board_and_jobs(
    storyboard_id: str, state: IngressState, caller: Caller, *, with_jobs: bool = True
) -> tuple[StoryboardRecord, list[JobRecord]]:
    """The caller's project's board and (unless not wanted) its videos in creation order; 404 else."""
    record = await asyncio.to_thread(state.store.get_storyboard, storyboard_id)
    if record is None or record.project != caller.project:
        raise ApiError(404, "not_found", f"no storyboard with id {storyboard_id!r}", param="storyboard_id")
    if not with_jobs:
        return record, []
    return record, await jobs_on_board(state, record)

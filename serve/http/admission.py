"""The one admission path: what every create (a video, a remix, a storyboard's videos) passes before its
rows are committed, in this order, and the one place that commits them.

    model -> project -> project settings -> label policy -> look (a project's LUT) -> quality tier (the
    project's default, else by priority), its step cache and LoRA adapters (this deployment's, the
    project's own or shared) -> typed request
    (envelope, then the shape rules of sharded experts) -> model by keyframes (an image without `model`
    runs on the I2V model) -> keyframes (fitted, frame-checked) -> content policy -> callback
    -> fingerprint -> keyframes stored under ids drawn now -> create (quotas checked inside the
    transaction; the stored keyframes removed again if nothing was created) -> 429 on refusal -> wake
    -> replay

Each check raises the ApiError the client gets; nothing is written until every video of the create passed
them all, so a refusal loses nothing and a storyboard is queued whole or not at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.denoise.calibration import has_curve
from pipeline.grade import LOOKS
from pipeline.prompt import PROMPT_COMPILER_VERSION, ShotSpec, compose_prompt
from pipeline.safety import ContentBlocked, PromptPolicy, SafetyCheckError
from pipeline.spec import (
    DISTILL_ADAPTER,
    DRAFT_CACHE_PROBLEM,
    LoraRef,
    ModelSpec,
    Quality,
    RequestSpec,
    SizeEnvelope,
    describe_validation_error,
)
from pipeline.upscale import upscale_target_size
from pipeline.video import DRAFT_LABEL
from serve.callbacks import CallbackPolicy, CallbackRefused
from serve.config import PrevizArgs
from serve.http.deps import IngressState, jobs_on_board
from serve.http.errors import ApiError, safety_unavailable
from serve.http.keyframes import CheckedKeyframes, KeyframeInputs, check_keyframes
from serve.http.schemas import (
    I2V_MODEL_ALIASES,
    SERVED_MODEL_ALIASES,
    GenerationSettings,
    LoraUse,
    StepCache,
)
from serve.jobs import (
    AlreadyPromoted,
    GpuQuotaExceeded,
    JobRecord,
    JobStore,
    QueueFull,
    StoryboardRecord,
    StoryboardRequest,
    new_job_id,
)
from serve.jobs.keyframes import PNG
from serve.jobs.models import Priority
from serve.jobs.projects import ProjectSettings
from serve.jobs.request import (
    I2V_MODEL,
    SERVED_MODEL,
    FinishSettings,
    JobRequest,
    Keyframes,
    KeyframeSource,
    LutRef,
    RequestSource,
    StoryboardPlace,
)
from serve.metrics import record_safety_block
from serve.sharding import ShapeRules
from serve.storage import JobArtifacts, StorageError

logger = logging.getLogger("ray.serve")

MAX_UPSCALED_SIDE = 3840


@dataclass(frozen=True, slots=True)
class VideoDraft:
    """One video a create asks for, before admission."""

    settings: GenerationSettings  # how to generate it (a remix fills these from its source)
    priority: Priority
    labels: dict[str, Any]
    prefix: str = ""  # where its fields sit in the body, for error `param`s (e.g. "shots.3.")
    callback_url: str | None = None
    storyboard: StoryboardPlace | None = None
    remixed_from: str | None = None
    promoted_from: str | None = None  # the draft this final take promotes (its `promoted_to` is set)
    # The take whose prompt this one repeats (a promote): its stored compiled prompt and compiler version
    # are used as they are, so a shot compiled by an older compiler version sends the same text again
    # instead of being compiled anew. (A remix always brings its own new prompt or shot.)
    repeats: JobRequest | None = None
    model: str | None = None  # the model the client named (canonical name); None: chosen by the keyframes
    keyframes: KeyframeInputs | None = None  # the images (or takes) it starts and may end from
    continues: int | None = None  # a chained board shot: the shot whose take's last frame it starts from


@dataclass(frozen=True, slots=True)
class BoardDraft:
    """The storyboard row a storyboard create writes with its videos."""

    id: str
    title: str | None
    request: StoryboardRequest  # the validated board (its `body_sha256` is set at admission)


@dataclass(frozen=True, slots=True)
class Admitted:
    """What a create committed, or found already committed under its Idempotency-Key (`created` False)."""

    created: bool
    job: JobRecord | None = None  # a video create, remix or promote
    storyboard: StoryboardRecord | None = None  # a storyboard create
    jobs: tuple[JobRecord, ...] = ()  # a storyboard's promote: one final take per chosen draft


def check_model(model: str, param: str = "model") -> str:
    """The canonical name of a served model the client named (an alias, any case); 400 otherwise."""
    if model.lower() in SERVED_MODEL_ALIASES:
        return SERVED_MODEL
    if model.lower() in I2V_MODEL_ALIASES:
        return I2V_MODEL
    raise ApiError(
        400,
        "unknown_model",
        f"Previz serves {SERVED_MODEL} and {I2V_MODEL}; `model` must name one of them (or be omitted) "
        f"but is {model!r}",
        param,
    )


def choose_model(draft: VideoDraft, model_param: str = "model") -> str:
    """The model a draft runs on: the one named, else I2V with keyframes and T2V without. Keyframes on the
    text-to-video model are 400 `keyframes_not_supported`; the I2V model without one `keyframe_required`."""
    given = draft.keyframes.items() if draft.keyframes is not None else []
    has_keyframes = bool(given) or draft.continues is not None
    if draft.model is None:
        return I2V_MODEL if has_keyframes else SERVED_MODEL
    if draft.model == SERVED_MODEL and has_keyframes:
        raise ApiError(
            400,
            "keyframes_not_supported",
            f"{SERVED_MODEL} makes video from text only and cannot start from an image; omit `model` (an "
            f"image selects {I2V_MODEL}) or name {I2V_MODEL!r}",
            given[0][1].param if given else f"{draft.prefix}continue",
        )
    if draft.model == I2V_MODEL and not has_keyframes:
        raise ApiError(
            400,
            "keyframe_required",
            f"{I2V_MODEL} starts from an image: give `input_reference` (or `keyframes.first`), or use "
            f"{SERVED_MODEL} for text alone",
            model_param,
        )
    return draft.model


def model_of(state: IngressState, served: str, param: str = "model") -> ModelSpec:
    """The sampling facts a request for the served model `served` is resolved with (the deployment's
    `sampling`, or its `i2v.sampling`); 400 `model_not_served` for I2V on a deployment without it."""
    if served != I2V_MODEL:
        return state.model
    if state.args.i2v is None:
        raise ApiError(
            400,
            "model_not_served",
            f"this deployment serves {SERVED_MODEL} only (no `i2v` in its config), so a shot cannot start "
            "from an image here; send text alone",
            param,
        )
    return state.args.i2v.sampling


def check_step_cache(state: IngressState, served: str, request: JobRequest, draft: VideoDraft) -> None:
    """400 `step_cache_not_supported` for a step cache (asked for, or the tier's default) on a model with
    no magnitude curve to decide skips by (real Wan2.2-I2V-A14B weights), before the denoiser sees it."""
    if request.resolved.cache is None:
        return
    i2v = state.args.i2v if served == I2V_MODEL else None
    if has_curve(i2v.model, "i2v") if i2v is not None else has_curve(state.args.model):
        return
    asked = "cache" in draft.settings.model_fields_set
    why = "`cache` asks for step caching" if asked else "the `final` tier's default step cache is on"
    raise ApiError(
        400,
        "step_cache_not_supported",
        f"{why}, but {served} has no step-cache curve here (MagCache's published ratios are for "
        "Wan2.2-T2V-A14B only), so every step must run; send `cache: null`",
        f"{draft.prefix}cache",
    )


async def with_keyframes(
    state: IngressState, project: str, draft: VideoDraft, request: JobRequest, served: str
) -> tuple[JobRequest, CheckedKeyframes | None]:
    """`request` on the model `served`, with its keyframes checked and fitted to the request's size."""
    request = request.model_copy(update={"model": served})
    if draft.keyframes is None or not draft.keyframes.items():
        if draft.continues is None:
            return request, None
        waiting = Keyframes(first=KeyframeSource(kind="continue", shot=draft.continues))
        return request.model_copy(update={"keyframes": waiting}), None
    checked = await check_keyframes(
        draft.keyframes,
        project=project,
        size=(request.resolved.width, request.resolved.height),
        store=state.store,
        artifacts=state.artifacts,
        frame_check=state.frame_check,
    )
    keyframes = checked.keyframes
    if draft.continues is not None:  # the first frame comes from the shot it continues, once it has one
        keyframes = keyframes.model_copy(
            update={"first": KeyframeSource(kind="continue", shot=draft.continues)}
        )
    return request.model_copy(update={"keyframes": keyframes}), checked


async def store_keyframes(
    state: IngressState, project: str, checked: list[CheckedKeyframes | None]
) -> tuple[list[str | None], list[str]]:
    """(per draft: the id drawn for its job, or None without keyframes; the keys written)."""
    ids: list[str | None] = []
    keys: list[str] = []
    try:
        for keyframes in checked:
            if keyframes is None:
                ids.append(None)
                continue
            job_id = new_job_id()
            ids.append(job_id)
            for which, data in keyframes.pngs.items():
                key = JobArtifacts(project, job_id).keyframe(which)
                await asyncio.to_thread(state.artifacts.put_bytes, key, data, PNG)
                keys.append(key)
    except StorageError as error:
        await remove_keys(state, keys)
        logger.exception("storing a create's keyframes failed")
        raise ApiError(503, "storage_unavailable", f"the keyframes could not be stored: {error}") from None
    return ids, keys


async def remove_keys(state: IngressState, keys: list[str]) -> None:
    for key in keys:
        try:
            await asyncio.to_thread(state.artifacts.delete, key)
        except StorageError:
            logger.exception("could not remove the keyframe %s of a create that was not made", key)


async def admit(
    state: IngressState,
    project: str,
    drafts: list[VideoDraft],
    *,
    body: dict[str, Any],
    idempotency_key: str | None,
    board: BoardDraft | None = None,
    settings: ProjectSettings | None = None,
) -> Admitted:
    """Check every draft, then create its job (or the board and all its jobs) in one transaction.

    `body` is the request as the client sent it (JSON): its fingerprint tells a replay of the same
    Idempotency-Key (200, the first result) from a different request under that key (409)."""
    if settings is None:  # a remix has read them already
        settings = await project_settings(state.store, project)
    body_sha256 = fingerprint(body)
    looks = await project_looks(state.store, project, drafts)
    requests = []
    checked: list[CheckedKeyframes | None] = []
    for draft in drafts:
        check_label(draft.settings.label, settings, f"{draft.prefix}label")
        check_callback(
            state.callbacks, draft.callback_url, "callback_url" if board else f"{draft.prefix}callback_url"
        )
        quality = choose_quality(state.args, draft, settings)
        check_adapters(state.args, project, draft.settings.loras, draft.prefix)
        served = choose_model(draft)
        request = job_request(
            draft,
            model_of(state, served, "model" if board or not draft.prefix else f"{draft.prefix}model"),
            body_sha256 if board is None else None,
            state.args.envelope,
            state.shapes,
            quality=quality,
            default_fps=settings.default_fps,
            lut=looks.get(draft.settings.look),
        )
        check_step_cache(state, served, request, draft)
        request, keyframes = await with_keyframes(state, project, draft, request, served)
        await check_content(state.safety, draft.settings.prompt, draft.settings.shot, draft.prefix)
        requests.append(request)
        checked.append(keyframes)
    bounds = queue_bounds(state.args, settings)
    job_ids, keyframe_keys = await store_keyframes(state, project, checked)
    try:
        admitted = await create_jobs(
            state, project, drafts, requests, job_ids, board, body_sha256, idempotency_key, bounds
        )
    except BaseException:
        await remove_keys(state, keyframe_keys)
        raise
    if not admitted.created:  # a replay: the first create's jobs have their own keyframes
        await remove_keys(state, keyframe_keys)
    if admitted.created:
        state.scheduler.wake.remote()
    return admitted


async def create_jobs(
    state: IngressState,
    project: str,
    drafts: list[VideoDraft],
    requests: list[JobRequest],
    job_ids: list[str | None],
    board: BoardDraft | None,
    body_sha256: str,
    idempotency_key: str | None,
    bounds: dict[str, Any],
) -> Admitted:
    """The one transaction of a create (after every check passed): its job, its board and jobs, or a
    board's promotions."""
    try:
        if board is None and len(drafts) > 1:  # a storyboard's promote: every take or none
            promotions = [
                (draft.promoted_from, draft.priority, request, draft.labels)
                for draft, request in zip(drafts, requests, strict=True)
            ]
            created_jobs = await asyncio.to_thread(
                state.store.create_promotions, project, promotions, job_ids=job_ids, **bounds
            )
            admitted = Admitted(True, jobs=tuple(created_jobs))
        elif board is None:
            (draft,) = drafts
            job, created = await asyncio.to_thread(
                state.store.create,
                project,
                draft.priority,
                requests[0],
                idempotency_key=idempotency_key,
                labels=draft.labels,
                storyboard_id=draft.storyboard.id if draft.storyboard is not None else None,
                promotes=draft.promoted_from,
                job_id=job_ids[0],
                **bounds,
            )
            if not created:
                check_replay("video", idempotency_key, job.request.body_sha256, body_sha256)
            admitted = Admitted(created, job=job)
        else:
            videos = [
                (draft.priority, request, draft.labels)
                for draft, request in zip(drafts, requests, strict=True)
            ]
            record, created = await asyncio.to_thread(
                state.store.create_storyboard,
                board.id,
                project,
                board.title,
                board.request.model_copy(update={"body_sha256": body_sha256}),
                videos,
                idempotency_key=idempotency_key,
                job_ids=job_ids,
                **bounds,
            )
            if not created:
                check_replay("storyboard", idempotency_key, record.request.body_sha256, body_sha256)
            admitted = Admitted(created, storyboard=record)
    except (QueueFull, GpuQuotaExceeded) as refused:
        raise refusal_error(refused) from None
    except AlreadyPromoted as promoted:
        raise ApiError(409, "already_promoted", f"{promoted}; promote a take once", "video_id") from None
    return admitted


def job_request(
    draft: VideoDraft,
    model: ModelSpec,
    body_sha256: str | None,
    envelope: SizeEnvelope,
    shapes: ShapeRules | None = None,
    *,
    quality: Quality = "final",
    default_fps: int | None = None,
    lut: LutRef | None = None,
) -> JobRequest:
    """The typed stored request of one draft, in tier `quality`; an ApiError (400) names the field at
    fault. `shapes`: the sizes the deployed experts' rank groups accept (None: every size the envelope
    allows); `default_fps`: the project's rate for a draft that names none (None: the model's)."""
    settings, prefix = draft.settings, draft.prefix
    if settings.seconds is not None and settings.duration is not None:
        raise ApiError(400, "invalid_value", "give `seconds` or `duration`, not both", f"{prefix}seconds")
    if settings.size is not None and settings.resolution is not None:
        raise ApiError(400, "invalid_value", "give `size` or `resolution`, not both", f"{prefix}size")
    compiler = PROMPT_COMPILER_VERSION
    if draft.repeats is not None:
        prompt, compiler = draft.repeats.spec.prompt, draft.repeats.source.compiler
    else:
        try:
            prompt = compose_prompt(settings.prompt, settings.shot)
        except ValueError as error:
            raise ApiError(400, "missing_field", str(error), f"{prefix}prompt") from None
    duration = settings.duration if settings.duration is not None else 5.0
    if settings.seconds is not None:
        duration = float(settings.seconds)
    given_size = next((value for value in (settings.size, settings.resolution) if value is not None), "480p")
    fields: dict[str, Any] = {
        "resolution": given_size,  # an empty one is refused by the spec, not read as the default
        "aspect": settings.aspect,
        "duration": duration,
        "steps": settings.steps,
        "seed": settings.seed,
        "quality": quality,
        "loras": tuple(LoraRef(name=lora.name, weight=lora.weight) for lora in settings.loras or ()),
    }
    if "cache" in settings.model_fields_set:  # not named: the tier's default (resolve); null: off
        if settings.cache is not None and quality == "draft":
            why = " (`quality` not named: the project's `default_quality`, else draft for interactive work)"
            defaulted = "" if settings.quality else why
            raise ApiError(
                400,
                "cache_not_for_draft",
                f"{DRAFT_CACHE_PROBLEM.removesuffix('.')}; this video's tier is draft{defaulted}",
                f"{prefix}cache",
            )
        fields["cache"] = settings.cache.model_dump() if settings.cache is not None else None
    if settings.negative_prompt is not None:
        fields["negative_prompt"] = settings.negative_prompt
    try:
        spec = RequestSpec(prompt=prompt, **fields)
    except ValidationError as error:
        location = error.errors()[0]["loc"]
        name = str(location[0]) if location else "aspect"  # RequestSpec's one cross-field rule: aspect
        renamed = {"duration": "seconds" if settings.seconds is not None else "duration"}
        renamed["resolution"] = "size" if settings.size is not None else "resolution"
        param = renamed.get(name, name)
        message = describe_validation_error(error).replace(f"`{name}`", f"`{param}`")
        # each field is within its own limit (the schema); only the shot and prompt together can be too long
        code = "prompt_too_long" if param == "prompt" else "invalid_value"
        raise ApiError(400, code, message, prefix + param) from None
    request = JobRequest.of(
        spec,
        model,
        finish=FinishSettings(
            upscale=settings.upscale,
            look=settings.look,
            label=DRAFT_LABEL if settings.label else None,
            fps=settings.fps or default_fps or model.fps,
            lut=lut,
        ),
        source=RequestSource(prompt=settings.prompt, shot=settings.shot, compiler=compiler),
        callback_url=draft.callback_url,
        storyboard=draft.storyboard,
        remixed_from=draft.remixed_from,
        promoted_from=draft.promoted_from,
        body_sha256=body_sha256,
    )
    resolved = request.resolved
    size_param = prefix + ("size" if settings.size is not None else "resolution")
    outside = envelope.problem(resolved.width, resolved.height, resolved.num_frames)
    if outside is not None:
        param = (
            size_param if "pixels" in outside else prefix + ("seconds" if settings.seconds else "duration")
        )
        raise ApiError(400, "outside_envelope", outside, param)
    unshardable = (
        shapes.size_problem(resolved.width, resolved.height, resolved.num_frames) if shapes else None
    )
    if unshardable is not None:
        raise ApiError(400, "size_not_shardable", unshardable, size_param)
    upscaled = upscale_target_size(settings.upscale, resolved.width, resolved.height)
    if settings.upscale != "none" and min(upscaled) <= min(resolved.width, resolved.height):
        raise ApiError(
            400,
            "upscale_not_enlarging",
            f"`upscale` {settings.upscale} only enlarges: {resolved.width}x{resolved.height} is already "
            f"{min(resolved.width, resolved.height)} pixels on its short side; use `upscale: none`",
            f"{prefix}upscale",
        )
    if max(upscaled) > MAX_UPSCALED_SIDE:
        raise ApiError(
            400,
            "upscale_not_enlarging",
            f"`upscale` {settings.upscale} of {resolved.width}x{resolved.height} gives "
            f"{upscaled[0]}x{upscaled[1]}; at most {MAX_UPSCALED_SIDE} pixels a side",
            f"{prefix}upscale",
        )
    return request


def choose_quality(args: PrevizArgs, draft: VideoDraft, settings: ProjectSettings) -> Quality:
    """The draft's tier: as asked, else the project's `default_quality`, else `draft` for interactive and
    `final` for batch work. A default of `draft` where the deployment serves no draft tier is `final`;
    asking for `draft` there is a 400."""
    asked = draft.settings.quality
    if asked == "draft" and not args.serves_draft:
        raise ApiError(
            400,
            "tier_unavailable",
            "this deployment serves no `draft` tier (it has no distill LoRA); use `quality: final`",
            f"{draft.prefix}quality",
        )
    if asked is not None:
        return asked
    default = settings.default_quality or ("draft" if draft.priority == "interactive" else "final")
    return default if args.serves_draft else "final"


def check_adapters(args: PrevizArgs, project: str, loras: list[LoraUse] | None, prefix: str = "") -> None:
    """Every LoRA named is loaded by this deployment and usable by `project` (its own, or shared), once."""
    seen: set[str] = set()
    for index, lora in enumerate(loras or ()):
        param = f"{prefix}loras.{index}.name"
        configured = args.lora(lora.name)
        if lora.name == DISTILL_ADAPTER or configured is None or configured.project not in (None, project):
            raise ApiError(
                400,
                "unknown_adapter",
                f"no LoRA adapter {lora.name!r} is available to project {project!r} on this deployment "
                "(`GET /v1/models` lists the adapters; `quality: draft` selects the distill one)",
                param,
            )
        if lora.name in seen:
            raise ApiError(400, "unknown_adapter", f"`loras` names {lora.name!r} twice", param)
        seen.add(lora.name)


async def project_looks(store: JobStore, project: str, drafts: list[VideoDraft]) -> dict[str, LutRef]:
    """look name -> the project's LUT of that name, for every draft's look that is not built in; 400
    `unknown_look` for a name the project has not registered (another project's LUTs do not count)."""
    found: dict[str, LutRef] = {}
    for draft in drafts:
        look = draft.settings.look
        if look in LOOKS or look in found:
            continue
        record = await asyncio.to_thread(store.get_lut, project, look)
        if record is None:
            raise ApiError(
                400,
                "unknown_look",
                f"`look` must be none, film or one of project {project!r}'s LUTs "
                f"(GET /v1/admin/projects/{project}/luts) but is {look!r}",
                f"{draft.prefix}look",
            )
        found[look] = LutRef(key=record.key, sha256=record.sha256, interpolation=record.interpolation)
    return found


def remix_settings(
    source: JobRequest, prompt: str | None, shot: ShotSpec | None, burn_label: bool
) -> GenerationSettings:
    """A remix's settings: the source's size, length, steps, seed, tier, LoRAs, negative prompt and
    finish, with a new prompt; the label stays on where the source had it or the project burns it."""
    spec = source.spec
    return GenerationSettings(
        prompt=prompt,
        shot=shot,
        negative_prompt=spec.negative_prompt,
        duration=spec.duration,
        resolution=spec.resolution,
        aspect=spec.aspect,
        steps=spec.steps,
        seed=spec.seed,
        upscale=source.finish.upscale,
        look=source.finish.look,
        label=source.finish.label is not None or burn_label,
        quality=source.resolved.quality,
        loras=[LoraUse(name=lora.name, weight=lora.weight) for lora in source.resolved.loras],
        cache=_step_cache(source),
        fps=source.finish.fps,
    )


def _step_cache(source: JobRequest) -> StepCache | None:
    """The source's step cache as it ran (None: every step ran), so a remix repeats it, default or not."""
    cache = source.resolved.cache
    return StepCache.model_validate(cache.model_dump()) if cache is not None else None


def promote_settings(
    source: JobRequest,
    burn_label: bool,
    *,
    size: str | None = None,
    upscale: str | None = None,
    look: str | None = None,
    cache: dict[str, Any] | None = None,
) -> GenerationSettings:
    """The final take of a draft: its seed, prompt, shot, negative prompt, length, size (unless `size`),
    LoRAs and finish (unless changed), with the `final` tier's steps, guidance and (unless `cache` is
    given: {"cache": settings or None}) step cache."""
    spec = source.spec
    return GenerationSettings(
        **(cache or {}),
        prompt=source.source.prompt if source.source.shot is not None else spec.prompt,
        shot=source.source.shot,
        negative_prompt=spec.negative_prompt,
        duration=spec.duration,
        size=size,
        resolution=None if size is not None else spec.resolution,
        aspect=None if size is not None else spec.aspect,
        seed=spec.seed,
        upscale=upscale or source.finish.upscale,
        look=look or source.finish.look,
        label=source.finish.label is not None or burn_label,
        quality="final",
        loras=[LoraUse(name=lora.name, weight=lora.weight) for lora in source.resolved.loras],
        fps=source.finish.fps,
    )


async def remix_place(state: IngressState, source: JobRecord) -> StoryboardPlace | None:
    """Where a remix of `source` sits: a new take (the next variant) of the source's shot on its board,
    or None for a video of no board. Two remixes of one shot at the same moment may share a variant
    number; each is still its own take of the shot."""
    place = source.request.storyboard
    if place is None:
        return None
    board = await asyncio.to_thread(state.store.get_storyboard, place.id)
    if board is None:
        return None
    takes = await jobs_on_board(state, board)
    variants = [job.request.storyboard.variant for job in takes if job.request.storyboard.shot == place.shot]
    return place.model_copy(update={"variant": max(variants, default=place.variant) + 1, "grid": {}})


async def check_content(
    policy: PromptPolicy, prompt: str | None, shot: ShotSpec | None, prefix: str = ""
) -> None:
    """Refuse a prompt the content policy blocks (422 `content_blocked`, `category` set) before any job
    exists. The message names the category, never the matched term; a failing classifier refuses too
    (503 `safety_unavailable`): the policy fails closed."""
    param = f"{prefix}prompt"
    try:
        verdict = await asyncio.to_thread(policy.check, compose_prompt(prompt, shot))
        if verdict is not None and shot is not None:  # name the field at fault: the shot or the prompt
            in_shot = not prompt or await asyncio.to_thread(policy.check, shot.to_prompt())
            param = f"{prefix}shot" if in_shot else param
    except SafetyCheckError:
        logger.exception("the content check failed; refusing the request")
        raise safety_unavailable(param) from None
    if verdict is not None:
        logger.info("refused a prompt: category %s at %s", verdict.category, param)
        record_safety_block("prompt", verdict.category)
        message = f"{ContentBlocked.of(verdict)}; nothing was queued"
        raise ApiError(422, "content_blocked", message, param, category=verdict.category)


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


async def project_settings(store: JobStore, project: str) -> ProjectSettings:
    record = await asyncio.to_thread(store.get_project, project)
    return record.settings if record is not None else ProjectSettings()


def queue_bounds(args: PrevizArgs, settings: ProjectSettings) -> dict[str, Any]:
    """The bounds JobStore.create / create_storyboard hold a new job to: the deployment's queue bounds,
    the smaller of its and the project's per-project bound, and the project's GPU seconds per day."""
    per_project = [bound for bound in (args.max_queued_jobs_per_project, settings.max_queued_jobs) if bound]
    return {
        "max_queued": args.max_queued_jobs,
        "max_queued_per_project": min(per_project) if per_project else None,
        "gpu_seconds_per_day": settings.gpu_seconds_per_day,
    }


def refusal_error(refused: QueueFull | GpuQuotaExceeded) -> ApiError:
    """The 429 of a create the store refused: `queue_full`, `project_queue_full` or `gpu_quota_exceeded`."""
    if isinstance(refused, GpuQuotaExceeded):
        code = "gpu_quota_exceeded"
    else:
        code = "queue_full" if refused.scope == "global" else "project_queue_full"
    return ApiError(429, code, str(refused), headers={"Retry-After": str(refused.retry_after_s)})


def check_label(label: bool, settings: ProjectSettings, param: str = "label") -> None:
    if not label and settings.burn_label:
        raise ApiError(
            400,
            "label_required",
            f"this project burns the {DRAFT_LABEL!r} label into every clip; `label: false` is not allowed",
            param,
        )


def check_callback(policy: CallbackPolicy, url: str | None, param: str) -> None:
    if url is None:
        return
    try:
        policy.check_url(url)
    except CallbackRefused as refused:
        raise ApiError(400, "invalid_callback_url", str(refused), param) from None


def check_replay(kind: str, key: str | None, stored: str | None, body_sha256: str) -> None:
    if stored not in (None, body_sha256):
        raise ApiError(
            409,
            "idempotency_key_reused",
            f"Idempotency-Key {key!r} was already used for a different {kind} request in this project",
            "Idempotency-Key",
        )

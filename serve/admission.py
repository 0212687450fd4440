"""What a create must pass before anything is queued: the content policy, the project's quotas and label
policy, and idempotent replays. Each check raises the ApiError the client gets; none writes anything."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

from pipeline.prompt import ShotSpec, compose_prompt
from pipeline.safety import ContentBlocked, PromptPolicy, SafetyCheckError
from serve.auth import LABEL_TEXT, ProjectSettings
from serve.config import PrevizArgs
from serve.errors import ApiError
from serve.jobs import GpuQuotaExceeded, JobStore, QueueFull
from serve.metrics import record_safety_block

logger = logging.getLogger("ray.serve")


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
        raise ApiError(
            503,
            "safety_unavailable",
            "the content check is unavailable, so nothing was queued; try again later",
            param,
        ) from None
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
            f"this project burns the {LABEL_TEXT!r} label into every clip; `label: false` is not allowed",
            param,
        )


def check_replay(kind: str, key: str | None, stored: dict[str, Any], fingerprint: str) -> None:
    if stored.get("body_sha256") not in (None, fingerprint):
        raise ApiError(
            409,
            "idempotency_key_reused",
            f"Idempotency-Key {key!r} was already used for a different {kind} request in this project",
            "Idempotency-Key",
        )

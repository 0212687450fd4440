"""Typed job requests for tests that write jobs straight into the store, as the admission path would."""

from __future__ import annotations

from pipeline.spec import ModelSpec, RequestSpec, StepCacheSettings
from serve.jobs.request import JobRequest


def job_request(
    prompt: str = "a lighthouse in a storm",
    *,
    resolution: str = "96x64",
    duration: float = 0.5,
    steps: int | None = 4,
    seed: int = 7,
    callback_url: str | None = None,
    cache: StepCacheSettings | None = None,
    quality: str = "final",
) -> JobRequest:
    spec = RequestSpec(
        prompt=prompt,
        resolution=resolution,
        duration=duration,
        steps=steps,
        seed=seed,
        cache=cache,
        quality=quality,
    )
    return JobRequest.of(spec, ModelSpec(), callback_url=callback_url)

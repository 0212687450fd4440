"""The stage table (pipeline.stages) is the one list of stages: the job status, progress, GPU-seconds,
the ETA, the CLI, the one-process pipeline, the deployment names and the capacity simulator read it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loadtest import capacity
from pipeline import local
from pipeline.stages import (
    STAGES,
    STEP_LABELS,
    accelerator_seconds,
    deployment_name,
    deployments,
    job_plan,
    overall_progress,
    progress_bands,
    stage,
)
from serve.jobs import PROGRESS_BANDS, RUNNING_STATUSES, JobStatus
from serve.jobs.projects import gpu_seconds
from serve.scheduling.eta import AFTER_DENOISE
from serve.sharding import DEPLOYMENT_NAMES

IMAGE_ENCODE = stage("encode_image")


def test_every_running_job_status_is_a_row_of_the_table_in_its_order() -> None:
    assert [(s.name, int(s)) for s in RUNNING_STATUSES] == [(r.status_name, r.status_value) for r in STAGES]
    assert all(JobStatus[row.status_name].stage_row == row for row in STAGES)
    assert JobStatus.QUEUED.stage_row is None and JobStatus.SUCCEEDED.stage_row is None


def test_progress_bands_follow_the_weights_and_end_below_100_until_the_clip_is_stored() -> None:
    bands = progress_bands()
    assert bands["encode"] == (0, 2) and bands["denoise_high"] == (2, 52) and bands["finish"] == (95, 100)
    assert list(PROGRESS_BANDS.values())[-1] == (95, 99)
    assert overall_progress("denoise_low", 0.5) == 67 and overall_progress("encode", 0.0) == 0


def test_an_optional_stage_runs_only_for_jobs_that_need_it_and_progress_spreads_over_the_plan() -> None:
    assert IMAGE_ENCODE in STAGES and IMAGE_ENCODE not in job_plan()
    with_keyframes = job_plan(has=frozenset({"keyframes"}))
    assert [row.name for row in with_keyframes][:3] == ["encode", "encode_image", "denoise_high"]
    assert progress_bands(with_keyframes)["encode_image"] == pytest.approx((2 / 1.06, 8 / 1.06))
    assert progress_bands(job_plan()) == progress_bands()
    assert PROGRESS_BANDS[JobStatus.ENCODING_IMAGE] == pytest.approx((2 / 1.06, 8 / 1.06))


def test_a_cut_job_runs_the_finisher_only_and_its_progress_spans_it() -> None:
    (row,) = job_plan(cut=True)
    assert row.name == "finish" and progress_bands((row,)) == {"finish": (0, 100)}


def test_the_deployment_of_a_stage_comes_from_the_layout_and_the_model() -> None:
    assert deployments() == {
        "encode": "TextEncoder",
        "denoise_high": "HighNoiseDenoiser",
        "denoise_low": "LowNoiseDenoiser",
        "decode": "VAEDecoder",
        "upscale": "Upscaler",
        "finish": "Finisher",
    }
    colocated = deployments(layout="colocated")
    assert colocated["denoise_high"] == colocated["denoise_low"] == "Denoiser"
    assert deployment_name(stage("decode"), model="I2V") == "I2VVAEDecoder"
    assert deployment_name(IMAGE_ENCODE) == "VAEEncoder"
    assert DEPLOYMENT_NAMES == {"high": "HighNoiseDenoiser", "low": "LowNoiseDenoiser"}
    with pytest.raises(ValueError, match="must name its `expert`"):
        deployment_name(replace(stage("denoise_high"), expert=None))


def test_gpu_seconds_bill_the_billed_rows_only() -> None:
    timings = {
        "encode": 1.0,
        "denoise_high": 2.0,
        "denoise_low": 3.0,
        "decode": 4.0,
        "upscale": 5.0,
        "finish": 6.0,
    }
    assert accelerator_seconds(timings) == gpu_seconds(timings) == 14.0


def test_the_cli_the_local_pipeline_the_eta_and_the_simulator_read_the_table() -> None:
    assert local.STAGES == (
        "encode", "denoise_high", "denoise_low", "decode", "upscale", "conform", "grade", "encode_video",
    )  # fmt: skip
    assert set(local.STAGES) <= set(STEP_LABELS)
    assert AFTER_DENOISE == ("decode", "upscale", "finish")
    assert capacity.STAGES == ("text", "high", "low", "decode", "finish")
    assert capacity.GPU_STAGES == ("text", "high", "low", "decode")
    with pytest.raises(KeyError, match="must be one of encode"):
        stage("interpolate")

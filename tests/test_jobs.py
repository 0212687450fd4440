"""The job store, specified against both backends: SQLite (a temporary file) and a real PostgreSQL server.

Concurrency is tested with threads: each thread holds its own database connection, which is what the
Ingress and Scheduler processes do, so the races below are the races of the cluster.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest

from serve.jobs import (
    AlreadyPromoted,
    CancelResult,
    GpuQuotaExceeded,
    JobRecord,
    JobStatus,
    JobStore,
    QueueFull,
    StoryboardRequest,
)
from serve.jobs.storyboard import BoardShot
from serve.webhooks import open_job_store
from tests.support.job_requests import job_request
from tests.support.servers.postgres import PostgresServer, postgres_server  # noqa: F401  (session fixture)

T = TypeVar("T")
REQUEST = job_request("a lighthouse in a storm, slow push-in", resolution="832x480", duration=5.0, steps=None)
BUCKET = "832x480x81"
BOARD = StoryboardRequest(title="act 1", shots=[BoardShot(name="1A", prompt="a lighthouse")])
NUM_THREADS = 8


def make_job(store: JobStore, project: str = "dune", **options: Any) -> JobRecord:
    job, created = store.create(project, options.pop("priority", "batch"), REQUEST, **options)
    assert created
    return job


def running_job(store: JobStore, project: str = "dune", scheduler_id: str = "scheduler-0") -> JobRecord:
    job = store.claim(make_job(store, project).id, scheduler_id)
    assert job is not None
    return job


def in_threads(task: Callable[[int], T], num_threads: int = NUM_THREADS) -> list[T]:
    """Run task(0..n-1) in n threads released at the same instant; results in thread order."""
    start = threading.Barrier(num_threads)

    def run(index: int) -> T:
        start.wait()
        return task(index)

    with ThreadPoolExecutor(num_threads) as pool:
        return list(pool.map(run, range(num_threads)))


def kinds(store: JobStore, job_id: str) -> list[str]:
    return [event.kind for event in store.events(job_id)]


# --- the status enum (no database) --------------------------------------------------------------------


def test_status_order_finished_states_and_api_states() -> None:
    assert list(JobStatus) == sorted(JobStatus)
    assert [status.name for status in JobStatus] == [
        "QUEUED",
        "ENCODING",
        "ENCODING_IMAGE",
        "DENOISING_HIGH",
        "DENOISING_LOW",
        "DECODING",
        "UPSCALING",
        "FINISHING",
        "SUCCEEDED",
        "CANCELLED",
        "FAILED",
    ]
    assert [status for status in JobStatus if status.is_finished] == [
        JobStatus.SUCCEEDED,
        JobStatus.CANCELLED,
        JobStatus.FAILED,
    ]
    assert {status: status.api_state for status in JobStatus} == {
        JobStatus.QUEUED: "queued",
        JobStatus.ENCODING: "in_progress",
        JobStatus.ENCODING_IMAGE: "in_progress",
        JobStatus.DENOISING_HIGH: "in_progress",
        JobStatus.DENOISING_LOW: "in_progress",
        JobStatus.DECODING: "in_progress",
        JobStatus.UPSCALING: "in_progress",
        JobStatus.FINISHING: "in_progress",
        JobStatus.SUCCEEDED: "completed",
        JobStatus.CANCELLED: "cancelled",
        JobStatus.FAILED: "failed",
    }


def test_in_memory_sqlite_is_refused_because_processes_could_not_share_it() -> None:
    with pytest.raises(ValueError, match="needs a SQLite file shared by all processes"):
        open_job_store("sqlite://")


# --- create, get, list ----------------------------------------------------------------------------------


def test_create_queues_a_job_that_get_returns(store: JobStore) -> None:
    deadline = datetime(2031, 5, 4, 18, 30, tzinfo=timezone(timedelta(hours=2)))
    job, created = store.create(
        "dune",
        "interactive",
        REQUEST,
        labels={"shot": "12A", "take": 3},
        deadline=deadline,
        storyboard_id="sb-7",
    )

    assert created
    assert job.id.startswith("vid_") and len(job.id) == 28
    assert (job.project, job.priority, job.request, job.bucket) == ("dune", "interactive", REQUEST, BUCKET)
    assert (job.status, job.api_state, job.is_finished) == (JobStatus.QUEUED, "queued", False)
    assert (job.progress, job.stage_progress, job.attempt, job.claimed_by) == (0, 0.0, 0, None)
    assert (job.started_at, job.finished_at, job.artifact_uri, job.error_code, job.seed) == (None,) * 5
    assert (job.labels, job.timings, job.storyboard_id) == ({"shot": "12A", "take": 3}, {}, "sb-7")
    assert job.deadline == deadline and job.deadline.utcoffset() == timedelta(0)  # stored as UTC
    assert store.get(job.id) == job
    assert store.get("vid_000000000000000000000000") is None


def test_timestamps_are_timezone_aware_utc(store: JobStore) -> None:
    before = datetime.now(UTC)
    job = make_job(store, deadline=datetime(2031, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5))))
    store.claim(job.id, "scheduler-0")
    store.succeed(job.id, 1, artifact_uri="file:///clips/a.mp4", artifact_bytes=1)
    stored = store.get(job.id)

    assert stored is not None
    stamps = [stored.created_at, stored.started_at, stored.finished_at, stored.updated_at, stored.deadline]
    stamps += [event.at for event in store.events(job.id)]
    for stamp in stamps:
        assert stamp is not None and stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
    assert stored.deadline == datetime(2031, 1, 1, 17, tzinfo=UTC)
    assert before <= stored.created_at <= stored.started_at <= stored.finished_at <= datetime.now(UTC)


def test_create_rejects_bad_arguments_with_actionable_messages(store: JobStore) -> None:
    with pytest.raises(ValueError, match="`priority` must be 'interactive' or 'batch' but is 'urgent'"):
        store.create("dune", "urgent", REQUEST)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`deadline` must be timezone-aware"):
        store.create("dune", "batch", REQUEST, deadline=datetime(2031, 1, 1))
    assert store.count_by_status()[JobStatus.QUEUED] == 0


def test_job_ids_sort_by_creation(store: JobStore) -> None:
    ids = [make_job(store).id for _ in range(30)]

    assert ids == sorted(ids) and len(set(ids)) == 30


def test_get_shows_a_job_only_to_its_own_project(store: JobStore) -> None:
    job = make_job(store, "dune")

    assert store.get(job.id, project="dune") == job
    assert store.get(job.id, project="arrival") is None


def test_list_pages_through_a_projects_jobs_newest_first(store: JobStore) -> None:
    ids = [make_job(store, "dune").id for _ in range(7)]
    make_job(store, "arrival")

    first = store.list(project="dune", limit=3)
    second = store.list(project="dune", limit=3, after=first[-1].id)
    third = store.list(project="dune", limit=3, after=second[-1].id)

    assert [job.id for job in first + second + third] == ids[::-1]
    assert len(third) == 1
    assert store.list(project="dune", limit=3, after=third[-1].id) == []
    assert len(store.list()) == 8


def test_list_pages_oldest_first_and_filters_by_status_and_storyboard(store: JobStore) -> None:
    ids = [make_job(store, storyboard_id="sb-1" if index % 2 else None).id for index in range(6)]
    store.claim(ids[0], "scheduler-0")
    store.claim(ids[3], "scheduler-0")

    first = store.list(order="asc", limit=4)
    rest = store.list(order="asc", limit=4, after=first[-1].id)
    assert [job.id for job in first + rest] == ids
    assert [job.id for job in store.list(statuses=[JobStatus.ENCODING], order="asc")] == [ids[0], ids[3]]
    assert [job.id for job in store.list(storyboard_id="sb-1", order="asc")] == [ids[1], ids[3], ids[5]]
    assert [job.id for job in store.list(storyboard_id="sb-1", statuses=[JobStatus.QUEUED])] == [
        ids[5],
        ids[1],
    ]
    with pytest.raises(ValueError, match="`limit` must be within 1..1000 but is 0"):
        store.list(limit=0)


# --- idempotency and queue bounds -----------------------------------------------------------------------


def test_same_idempotency_key_returns_the_existing_job(store: JobStore) -> None:
    first, created_first = store.create("dune", "batch", REQUEST, idempotency_key="shot-12")
    again, created_again = store.create("dune", "batch", REQUEST, idempotency_key="shot-12")
    other_project, created_other = store.create("arrival", "batch", REQUEST, idempotency_key="shot-12")

    assert (created_first, created_again, created_other) == (True, False, True)
    assert again == first
    assert other_project.id != first.id
    assert kinds(store, first.id) == ["created"]
    assert store.count_by_status()[JobStatus.QUEUED] == 2


def test_concurrent_creates_with_one_idempotency_key_make_one_job(store: JobStore) -> None:
    results = in_threads(lambda _: store.create("dune", "interactive", REQUEST, idempotency_key="take-3"))

    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert len(store.list(project="dune")) == 1


def test_queue_bound_refuses_beyond_max_queued_and_writes_nothing(store: JobStore) -> None:
    make_job(store, "dune", max_queued=2)
    make_job(store, "arrival", max_queued=2)

    with pytest.raises(QueueFull) as refused:
        store.create("dune", "batch", REQUEST, max_queued=2)

    assert (refused.value.scope, refused.value.limit) == ("global", 2)
    assert refused.value.retry_after_s >= 1
    assert (
        str(refused.value)
        == f"The queue is full (2 jobs waiting); retry in about {refused.value.retry_after_s} s."
    )
    assert len(store.list()) == 2


def test_only_queued_jobs_count_against_the_bound(store: JobStore) -> None:
    running_job(store)
    make_job(store, max_queued=1)

    with pytest.raises(QueueFull):
        make_job(store, max_queued=1)


def test_per_project_bound_refuses_only_that_project(store: JobStore) -> None:
    for _ in range(2):
        make_job(store, "dune", max_queued_per_project=2)

    with pytest.raises(QueueFull) as refused:
        store.create("dune", "batch", REQUEST, max_queued=100, max_queued_per_project=2)
    make_job(store, "arrival", max_queued=100, max_queued_per_project=2)

    assert refused.value.scope == "project"
    assert str(refused.value).startswith("This project's queue is full (2 jobs waiting)")
    assert store.count_by_status(project="dune")[JobStatus.QUEUED] == 2


def test_gpu_quota_refuses_new_jobs_of_that_project_but_answers_retries(store: JobStore) -> None:
    job, _ = store.create("dune", "batch", REQUEST, idempotency_key="shot-1", gpu_seconds_per_day=5)
    job = store.claim(job.id, "scheduler-a")
    store.succeed(job.id, job.attempt, artifact_uri="k", artifact_bytes=1, timings={"denoise_high": 6.0})

    with pytest.raises(GpuQuotaExceeded) as refused:
        store.create("dune", "batch", REQUEST, gpu_seconds_per_day=5)
    again, created = store.create("dune", "batch", REQUEST, idempotency_key="shot-1", gpu_seconds_per_day=5)
    with pytest.raises(GpuQuotaExceeded):
        store.create_storyboard("sb_1", "dune", None, BOARD, [("batch", REQUEST, {})], gpu_seconds_per_day=5)
    make_job(store, "arrival", gpu_seconds_per_day=5)

    assert str(refused.value).startswith("project 'dune' used 6.0 of its 5 GPU seconds today")
    assert 1 <= refused.value.retry_after_s <= 86_400
    assert (again.id, created) == (job.id, False)
    assert store.count_by_status(project="dune")[JobStatus.QUEUED] == 0


def test_retried_request_is_answered_even_when_the_queue_is_full(store: JobStore) -> None:
    job, _ = store.create("dune", "batch", REQUEST, idempotency_key="shot-1", max_queued=1)

    again, created = store.create("dune", "batch", REQUEST, idempotency_key="shot-1", max_queued=1)

    assert (again.id, created) == (job.id, False)


def test_concurrent_creates_never_overshoot_the_queue_bound(store: JobStore) -> None:
    def create(index: int) -> str:
        try:
            store.create(f"project-{index % 3}", "batch", REQUEST, max_queued=5)
        except QueueFull as refused:
            assert refused.scope == "global" and refused.retry_after_s >= 1
            return "refused"
        return "accepted"

    outcomes = Counter(in_threads(create))

    assert outcomes == {"accepted": 5, "refused": NUM_THREADS - 5}
    assert store.count_by_status()[JobStatus.QUEUED] == 5


# --- claim ------------------------------------------------------------------------------------------------


def test_claim_starts_a_queued_job_and_only_once(store: JobStore) -> None:
    job = make_job(store)

    claimed = store.claim(job.id, "scheduler-a")
    second = store.claim(job.id, "scheduler-b")

    assert claimed is not None and second is None
    assert (claimed.status, claimed.attempt, claimed.claimed_by) == (JobStatus.ENCODING, 1, "scheduler-a")
    assert claimed.api_state == "in_progress"
    assert claimed.started_at is not None
    assert store.get(job.id) == claimed
    assert store.queued() == []
    assert store.running_by_project() == {"dune": 1}


def test_claim_returns_none_for_cancelled_and_unknown_jobs(store: JobStore) -> None:
    job = make_job(store)
    store.cancel(job.id)

    assert store.claim(job.id, "scheduler-0") is None
    assert store.claim("vid_000000000000000000000000", "scheduler-0") is None
    assert store.get(job.id).status == JobStatus.CANCELLED  # type: ignore[union-attr]


def test_queued_lists_the_waiting_jobs_oldest_first(store: JobStore) -> None:
    ids = [make_job(store, project).id for project in ("dune", "arrival", "dune", "arrival")]
    store.claim(ids[1], "scheduler-0")

    assert [job.id for job in store.queued()] == [ids[0], ids[2], ids[3]]
    assert [job.id for job in store.queued(limit=2)] == [ids[0], ids[2]]


def test_racing_claimers_claim_each_job_exactly_once(store: JobStore) -> None:
    ids = {make_job(store, f"project-{index % 4}").id for index in range(20)}

    def claim_all(worker: int) -> list[str]:
        mine = []
        while candidates := store.queued():
            mine += [job.id for job in candidates if store.claim(job.id, f"scheduler-{worker}")]
        return mine

    claims = Counter(job_id for mine in in_threads(claim_all) for job_id in mine)

    assert set(claims) == ids
    assert set(claims.values()) == {1}
    assert all(store.get(job_id).attempt == 1 for job_id in ids)  # type: ignore[union-attr]
    assert all(kinds(store, job_id) == ["created", "claimed"] for job_id in ids)


# --- advance, succeed, fail -----------------------------------------------------------------------------


def test_advance_moves_a_running_job_through_its_stages(store: JobStore) -> None:
    job = running_job(store)

    assert store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=0.5, timing=("encode", 1.25))
    assert store.advance(job.id, 1, JobStatus.DENOISING_LOW, stage_progress=0.25, progress=70)
    stored = store.get(job.id)

    assert stored is not None
    assert (stored.status, stored.stage_progress, stored.progress) == (JobStatus.DENOISING_LOW, 0.25, 70)
    assert stored.timings == {"encode": 1.25}
    assert stored.updated_at >= job.updated_at


def test_engine_queue_position_shows_while_it_waits_and_the_next_advance_or_claim_clears_it(
    store: JobStore,
) -> None:
    job = running_job(store)
    assert store.advance(job.id, 1, JobStatus.DENOISING_HIGH, engine_queue_position=3)
    waiting = store.get(job.id)
    assert (waiting.engine_queue_position, waiting.num_ahead_in_engine, waiting.stage) == (3, 3, "queued")
    assert store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=0.1)
    running = store.get(job.id)
    assert (running.num_ahead_in_engine, running.stage) == (None, "denoising_high")
    assert store.advance(job.id, 1, JobStatus.DENOISING_HIGH, engine_queue_position=1)
    assert store.requeue(job.id, 1) == JobStatus.QUEUED
    assert store.get(job.id).num_ahead_in_engine is None  # an ended run's place is never shown
    assert store.claim(job.id, "scheduler-1").engine_queue_position is None
    with pytest.raises(ValueError, match=r"`engine_queue_position` must be >= 0 but is -1\."):
        store.advance(job.id, 2, JobStatus.DENOISING_HIGH, engine_queue_position=-1)


def test_progress_defaults_to_the_stage_band_and_never_goes_down(store: JobStore) -> None:
    job = running_job(store)

    store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=0.5)
    # the stage table's band: 2 + 0.5 * (52 - 2), the same progress the Scheduler reports
    assert store.get(job.id).progress == 27  # type: ignore[union-attr]
    store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=0.6, progress=10)
    assert store.get(job.id).progress == 27  # type: ignore[union-attr]


def test_advance_from_a_stale_attempt_is_ignored(store: JobStore) -> None:
    job = running_job(store)

    assert not store.advance(job.id, 0, JobStatus.DECODING)
    assert not store.advance(job.id, 2, JobStatus.DECODING)
    assert not store.succeed(job.id, 2, artifact_uri="s3://clips/x.mp4", artifact_bytes=10)
    assert not store.fail(job.id, 0, "oom", "CUDA out of memory")
    assert store.get(job.id) == job
    assert kinds(store, job.id) == ["created", "claimed"]


def test_status_never_moves_backwards(store: JobStore) -> None:
    job = running_job(store)
    store.advance(job.id, 1, JobStatus.DECODING, stage_progress=0.5)

    assert not store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=0.9)
    assert store.advance(job.id, 1, JobStatus.DECODING, stage_progress=0.75)
    stored = store.get(job.id)
    assert stored is not None and (stored.status, stored.stage_progress) == (JobStatus.DECODING, 0.75)


def test_advance_only_accepts_running_stages(store: JobStore) -> None:
    job = running_job(store)

    for status in (JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.FAILED):
        with pytest.raises(ValueError, match=f"got {status.name}; use succeed"):
            store.advance(job.id, 1, status)
    with pytest.raises(ValueError, match="`stage_progress` must be within 0..1 but is 1.5"):
        store.advance(job.id, 1, JobStatus.ENCODING, stage_progress=1.5)


def test_succeed_stores_the_clip_seed_and_timings(store: JobStore) -> None:
    job = running_job(store)
    store.advance(job.id, 1, JobStatus.DENOISING_HIGH, timing=("encode", 0.5))

    assert store.succeed(
        job.id, 1, artifact_uri="s3://clips/a.mp4", artifact_bytes=812_331, seed=42, timings={"decode": 3.0}
    )
    stored = store.get(job.id)

    assert stored is not None
    assert (stored.status, stored.api_state, stored.progress, stored.stage_progress) == (
        JobStatus.SUCCEEDED,
        "completed",
        100,
        1.0,
    )
    assert (stored.artifact_uri, stored.artifact_bytes, stored.seed) == ("s3://clips/a.mp4", 812_331, 42)
    assert stored.timings == {"encode": 0.5, "decode": 3.0}
    assert stored.finished_at is not None
    assert store.running_by_project() == {}


def test_fail_records_the_error(store: JobStore) -> None:
    job = running_job(store)

    assert store.fail(job.id, 1, "safety_blocked", "The clip did not pass the safety check.")
    stored = store.get(job.id)

    assert stored is not None
    assert (stored.status, stored.api_state) == (JobStatus.FAILED, "failed")
    assert (stored.error_code, stored.error_message) == (
        "safety_blocked",
        "The clip did not pass the safety check.",
    )
    assert stored.finished_at is not None


@pytest.mark.parametrize("finish", ["succeed", "fail", "cancel"])
def test_a_finished_job_never_changes_again(store: JobStore, finish: str) -> None:
    job = running_job(store)
    if finish == "succeed":
        store.succeed(job.id, 1, artifact_uri="s3://clips/a.mp4", artifact_bytes=1)
    elif finish == "fail":
        store.fail(job.id, 1, "decode_error", "VAE decode failed.")
    else:
        store.cancel(job.id)
    finished = store.get(job.id)

    assert not store.advance(job.id, 1, JobStatus.FINISHING)
    assert not store.succeed(job.id, 1, artifact_uri="s3://clips/b.mp4", artifact_bytes=2)
    assert not store.fail(job.id, 1, "late", "A late failure.")
    assert store.cancel(job.id) == CancelResult.ALREADY_FINISHED
    assert store.claim(job.id, "scheduler-1") is None
    assert store.requeue_in_flight() == []
    assert store.get(job.id) == finished


# --- cancel ---------------------------------------------------------------------------------------------


def test_cancel_a_queued_job(store: JobStore) -> None:
    job = make_job(store)

    assert store.cancel(job.id) == CancelResult.CANCELLED == "cancelled"
    stored = store.get(job.id)
    assert stored is not None
    assert (stored.status, stored.api_state) == (JobStatus.CANCELLED, "cancelled")
    assert stored.finished_at is not None
    assert store.queued() == []


def test_cancel_a_running_job_stops_its_pipeline_updates(store: JobStore) -> None:
    job = running_job(store)
    store.advance(job.id, 1, JobStatus.DENOISING_LOW)

    assert store.cancel(job.id) == CancelResult.CANCELLED
    assert not store.advance(job.id, 1, JobStatus.DECODING)  # the pipeline sees False and drops the job
    assert store.get(job.id).status == JobStatus.CANCELLED  # type: ignore[union-attr]
    assert store.events(job.id)[-1].data == {"from": "DENOISING_LOW"}


def test_cancel_reports_finished_and_unknown_jobs(store: JobStore) -> None:
    job = running_job(store)
    store.succeed(job.id, 1, artifact_uri="s3://clips/a.mp4", artifact_bytes=1)

    assert store.cancel(job.id) == CancelResult.ALREADY_FINISHED
    assert store.cancel("vid_000000000000000000000000") == CancelResult.NOT_FOUND
    assert store.get(job.id).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_cancel_cannot_reach_another_projects_job(store: JobStore) -> None:
    job = make_job(store, "dune")

    assert store.cancel(job.id, project="arrival") == CancelResult.NOT_FOUND
    assert store.get(job.id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    assert store.cancel(job.id, project="dune") == CancelResult.CANCELLED


def test_projects_see_only_their_own_jobs(store: JobStore) -> None:
    dune = make_job(store, "dune")
    arrival = make_job(store, "arrival")

    assert [job.id for job in store.list(project="dune")] == [dune.id]
    assert store.get(arrival.id, project="dune") is None
    assert store.count_by_status(project="arrival")[JobStatus.QUEUED] == 1


# --- recovery after a scheduler restart ---------------------------------------------------------------


def test_requeue_in_flight_puts_running_jobs_back_in_the_queue(store: JobStore) -> None:
    job = running_job(store)
    store.advance(job.id, 1, JobStatus.DENOISING_LOW, stage_progress=0.5)

    assert store.requeue_in_flight() == [job.id]
    stored = store.get(job.id)

    assert stored is not None
    assert (stored.status, stored.attempt, stored.claimed_by) == (JobStatus.QUEUED, 1, None)
    assert (stored.progress, stored.stage_progress) == (0, 0.0)
    assert stored.started_at == job.started_at
    assert [queued.id for queued in store.queued()] == [job.id]
    reclaimed = store.claim(job.id, "scheduler-1")
    assert reclaimed is not None and reclaimed.attempt == 2


def test_updates_from_before_a_requeue_are_fenced_off(store: JobStore) -> None:
    job = running_job(store)
    store.requeue_in_flight()

    assert not store.advance(job.id, 1, JobStatus.DECODING)  # the old task, while the job waits
    assert not store.fail(job.id, 1, "worker_died", "The replica died.")
    assert store.get(job.id).status == JobStatus.QUEUED  # type: ignore[union-attr]
    store.claim(job.id, "scheduler-1")
    assert not store.succeed(job.id, 1, artifact_uri="s3://clips/stale.mp4", artifact_bytes=1)
    assert store.advance(job.id, 2, JobStatus.DENOISING_HIGH)


def test_requeue_never_touches_queued_or_finished_jobs(store: JobStore) -> None:
    queued = make_job(store)
    succeeded, failed, cancelled, running = (running_job(store) for _ in range(4))
    store.succeed(succeeded.id, 1, artifact_uri="s3://clips/a.mp4", artifact_bytes=1)
    store.fail(failed.id, 1, "oom", "CUDA out of memory")
    store.cancel(cancelled.id)
    before = {job.id: store.get(job.id) for job in (queued, succeeded, failed, cancelled)}

    assert store.requeue_in_flight() == [running.id]
    assert {job_id: store.get(job_id) for job_id in before} == before


def test_requeue_fails_a_job_interrupted_max_attempts_times(store: JobStore) -> None:
    job = make_job(store)
    for attempt in (1, 2):
        store.claim(job.id, "scheduler-0")
        assert store.requeue_in_flight(max_attempts=3) == [job.id]
        assert store.get(job.id).attempt == attempt  # type: ignore[union-attr]
    store.claim(job.id, "scheduler-0")

    assert store.requeue_in_flight(max_attempts=3) == []
    stored = store.get(job.id)
    assert stored is not None
    assert (stored.status, stored.attempt, stored.error_code) == (JobStatus.FAILED, 3, "too_many_attempts")
    assert stored.finished_at is not None
    assert kinds(store, job.id) == ["created"] + ["claimed", "requeued"] * 2 + ["claimed", "failed"]


def test_requeue_for_one_scheduler_leaves_the_others_jobs_running(store: JobStore) -> None:
    mine = running_job(store, scheduler_id="scheduler-a")
    theirs = running_job(store, scheduler_id="scheduler-b")

    assert store.requeue_in_flight("scheduler-a") == [mine.id]
    assert store.get(theirs.id).status == JobStatus.ENCODING  # type: ignore[union-attr]


def test_requeue_gives_one_running_job_back_to_the_queue(store: JobStore) -> None:
    job = running_job(store)
    store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=0.5)

    assert store.requeue(job.id, 2) is None  # a stale attempt changes nothing
    assert store.requeue(job.id, 1, max_attempts=2) == JobStatus.QUEUED
    assert store.requeue(job.id, 1, max_attempts=2) is None  # not running any more
    stored = store.get(job.id)
    assert stored is not None and (stored.status, stored.attempt, stored.progress) == (JobStatus.QUEUED, 1, 0)
    store.claim(job.id, "scheduler-0")
    assert store.requeue(job.id, 2, max_attempts=2) == JobStatus.FAILED
    assert store.get(job.id).error_code == "too_many_attempts"  # type: ignore[union-attr]
    assert kinds(store, job.id) == ["created", "claimed", "stage", "requeued", "claimed", "failed"]


# --- event log --------------------------------------------------------------------------------------------


def test_event_log_records_every_transition_in_order(store: JobStore) -> None:
    job = running_job(store)
    stages = [JobStatus.DENOISING_HIGH, JobStatus.DENOISING_LOW, JobStatus.DECODING]
    stages += [JobStatus.UPSCALING, JobStatus.FINISHING]
    for stage in stages:
        store.advance(job.id, 1, stage)
    store.succeed(job.id, 1, artifact_uri="s3://clips/a.mp4", artifact_bytes=7)

    events = store.events(job.id)

    assert [event.kind for event in events] == ["created", "claimed"] + ["stage"] * 5 + ["succeeded"]
    assert [(event.data["from"], event.data["status"]) for event in events if event.kind == "stage"] == [
        ("ENCODING", "DENOISING_HIGH"),
        ("DENOISING_HIGH", "DENOISING_LOW"),
        ("DENOISING_LOW", "DECODING"),
        ("DECODING", "UPSCALING"),
        ("UPSCALING", "FINISHING"),
    ]
    assert events[1].data == {"scheduler_id": "scheduler-0", "attempt": 1}
    assert events[-1].data == {"attempt": 1, "artifact_uri": "s3://clips/a.mp4", "artifact_bytes": 7}
    assert [event.id for event in events] == sorted({event.id for event in events})
    assert [event.at for event in events] == sorted(event.at for event in events)
    assert {event.job_id for event in events} == {job.id}


def test_progress_events_are_written_only_at_ten_percent_steps(store: JobStore) -> None:
    job = running_job(store)

    for progress in range(1, 100):
        store.advance(job.id, 1, JobStatus.DENOISING_HIGH, stage_progress=progress / 100, progress=progress)

    events = store.events(job.id)
    assert [event.kind for event in events] == ["created", "claimed", "stage"] + ["progress"] * 9
    assert [event.data["progress"] for event in events[3:]] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert store.get(job.id).progress == 99  # type: ignore[union-attr]  # the row always has the latest


def test_events_stream_after_a_cursor(store: JobStore) -> None:
    job = running_job(store)
    seen = store.events(job.id)

    store.advance(job.id, 1, JobStatus.DENOISING_HIGH)
    store.fail(job.id, 1, "oom", "CUDA out of memory")
    new = store.events(job.id, after_id=seen[-1].id)

    assert [event.kind for event in new] == ["stage", "failed"]
    assert new[-1].data == {"attempt": 1, "code": "oom", "message": "CUDA out of memory"}
    assert store.events(job.id, after_id=new[-1].id) == []
    assert store.events(job.id, after_id=0, limit=1) == seen[:1]


# --- counts, schema, several processes ----------------------------------------------------------------


def test_counts_by_status_and_running_jobs_per_project(store: JobStore) -> None:
    make_job(store, "dune")
    running_job(store, "dune")
    running_job(store, "arrival")
    done = running_job(store, "arrival")
    store.succeed(done.id, 1, artifact_uri="s3://clips/a.mp4", artifact_bytes=1)

    counts = store.count_by_status()
    assert counts == {status: 0 for status in JobStatus} | {
        JobStatus.QUEUED: 1,
        JobStatus.ENCODING: 2,
        JobStatus.SUCCEEDED: 1,
    }
    assert store.count_by_status(project="arrival")[JobStatus.ENCODING] == 1
    assert store.running_by_project() == {"dune": 1, "arrival": 1}


def test_create_schema_is_idempotent_even_when_processes_race(store_url: str) -> None:
    stores = [open_job_store(store_url) for _ in range(4)]
    try:
        in_threads(lambda index: stores[index].create_schema(), num_threads=4)
        job = make_job(stores[0])
        stores[1].create_schema()
        assert stores[2].get(job.id) == job
    finally:
        for store in stores:
            store.close()


def test_two_stores_on_one_database_see_each_others_changes(store: JobStore, store_url: str) -> None:
    scheduler = open_job_store(store_url)  # as in another process: its own engine and connections
    try:
        job = make_job(store)
        claimed = scheduler.claim(job.id, "scheduler-0")
        assert store.get(job.id) == claimed
        assert store.cancel(job.id) == CancelResult.CANCELLED
        assert claimed is not None and not scheduler.advance(job.id, claimed.attempt, JobStatus.DECODING)
    finally:
        scheduler.close()


def test_a_draft_is_promoted_once_and_a_refused_promotion_writes_nothing(store: JobStore) -> None:
    draft, other = make_job(store), make_job(store)

    def promote(_: int) -> str:
        try:
            return store.create("dune", "batch", REQUEST, promotes=draft.id)[0].id
        except AlreadyPromoted as refused:
            return f"refused: {refused.promoted_to}"

    outcomes = in_threads(promote)
    (winner,) = [outcome for outcome in outcomes if not outcome.startswith("refused")]
    assert outcomes.count(f"refused: {winner}") == NUM_THREADS - 1  # each loser is told who won
    assert store.get(draft.id).promoted_to == winner
    with pytest.raises(AlreadyPromoted, match=winner):  # all or nothing: `other` stays unpromoted
        store.create_promotions("dune", [(other.id, "batch", REQUEST, {}), (draft.id, "batch", REQUEST, {})])
    assert store.get(other.id).promoted_to is None and len(store.list()) == 3
    (promoted,) = store.create_promotions("dune", [(other.id, "interactive", REQUEST, {"take": 2})])
    assert store.get(other.id).promoted_to == promoted.id and promoted.labels == {"take": 2}


def test_the_claim_loops_view_puts_interactive_jobs_first_then_takes_projects_in_turns(
    store: JobStore,
) -> None:
    backlog = [make_job(store, "dune").id for _ in range(4)]  # a deep batch backlog of one project
    other = make_job(store, "heat").id
    urgent = make_job(store, "heat", priority="interactive").id
    seen = [job.id for job in store.queued_candidates(3)]
    assert seen == [urgent, backlog[0], other]  # oldest-first would have been the backlog's first three
    assert [job.id for job in store.queued_candidates(10)] == [urgent, backlog[0], other, *backlog[1:]]
    first = store.queued_candidates(1)[0]
    assert (first.project, first.priority, first.created_at.utcoffset()) == (
        "heat",
        "interactive",
        timedelta(0),
    )

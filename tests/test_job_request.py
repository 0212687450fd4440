"""The typed stored request: round trips, the bucket key, and rows written by the previous version (format 1,
an untyped dict, in a database without the `poster_uri` column) loading and running to completion.

`tests/data/jobs-format1.db` was made by the code before JobRequest existed (commit 3778d7f): a video with a
callback, a film look and labels, and a one-shot storyboard, created through its HTTP API and left queued.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select, text

from pipeline.spec import ModelSpec
from serve.http.views import video_view
from serve.jobs import JobStatus, JobStore
from serve.jobs.request import Bucket, JobRequest
from serve.jobs.schema import ADDED_JOB_COLUMNS, jobs
from serve.webhooks import open_job_store
from tests.support.fake_stages import (
    FakeStages,
    run,
    run_until_finished,
    scheduler_args,
    start,
    stop,
    wait_for,
)
from tests.support.job_requests import job_request
from tests.support.job_stores import copy_of_database

FORMAT_1_DB = Path(__file__).parent / "data" / "jobs-format1.db"
OLD_VIDEO = "vid_01a233cc087037635e3d4912"  # the video
OLD_SHOT = "vid_01a233cc089d3c63f8b5e6e0"  # the storyboard's one video


def test_a_job_request_round_trips_through_its_stored_json() -> None:
    request = job_request(resolution="832x480", duration=5.0, steps=None, callback_url="https://h.example/x")
    stored = request.to_stored()
    assert stored["format"] == 2 and JobRequest.from_stored(stored) == request
    assert (request.resolved.steps, request.resolved.num_frames, str(request.bucket)) == (
        40,
        81,
        "832x480x81",
    )


def test_a_missing_seed_is_drawn_once_and_fixed_in_the_spec() -> None:
    request = job_request()
    unseeded = JobRequest.of(request.spec.model_copy(update={"seed": None}), ModelSpec())
    assert unseeded.spec.seed is not None and unseeded.spec.seed == unseeded.resolved.seed


@pytest.mark.parametrize("text", ["832x480", "832x480x", "axbxc", "832x480x81x1", "٨٣٢x480x81", ""], ids=repr)
def test_a_bucket_that_is_not_w_x_h_x_frames_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=f"not {text!r}"):
        Bucket.parse(text)


def test_a_bucket_formats_and_parses_back() -> None:
    bucket = Bucket(1280, 720, 81)
    assert (
        str(bucket) == "1280x720x81" and Bucket.parse("1280x720x81") == bucket and bucket.size == "1280x720"
    )


def test_format_1_rows_in_a_database_of_the_previous_version_load_with_their_resolved_values(
    tmp_path: Path,
) -> None:
    store, _ = old_database(tmp_path)
    video, shot = store.get(OLD_VIDEO), store.get(OLD_SHOT)
    assert video.status == JobStatus.QUEUED and video.poster_uri is None
    request = video.request
    assert (request.resolved.width, request.resolved.height, request.resolved.num_frames) == (96, 64, 9)
    assert (request.resolved.steps, request.resolved.seed, request.spec.seed) == (4, 7, 7)
    assert (request.finish.look, request.finish.label) == ("film", "AI-generated draft")
    assert request.callback_url == "https://hooks.example.com/previz" and request.body_sha256
    assert shot.request.storyboard.name == "1A" and shot.request.source.shot.character == "a fremen"
    view = video_view(video)
    assert (view.size, view.steps, view.num_frames, view.look, view.labels) == (
        "96x64",
        4,
        9,
        "film",
        {"shot": "12A"},
    )


def test_a_queued_format_1_job_runs_to_completion_after_the_upgrade(tmp_path: Path) -> None:
    database, url = old_database(tmp_path)
    args = scheduler_args(tmp_path, database_url=url)
    stages = FakeStages()

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            for job_id in (OLD_VIDEO, OLD_SHOT):
                done = await wait_for(database, job_id, lambda j: j.is_finished)
                assert done.status == JobStatus.SUCCEEDED and done.poster_uri is not None
        finally:
            stop(scheduler)
        looks = sorted(call.look for call in stages.calls["finish"])
        assert looks == ["film", "none"] and {call.seed for call in stages.calls["finish"]} >= {7}
        (delivery,) = database.webhook_deliveries(
            OLD_VIDEO
        )  # the old callback, announced with resolved values
        assert delivery.payload["data"]["steps"] == 4 and delivery.payload["data"]["size"] == "96x64"

    run(scenario)


def test_a_format_1_row_in_postgresql_loads_and_runs(
    postgres_server, postgres_database, tmp_path: Path
) -> None:
    url = postgres_server.create_schema(postgres_database)
    store = open_job_store(url)
    store.create_schema()
    old_columns = [column for column in jobs.c if column.name not in ADDED_JOB_COLUMNS]
    old = create_engine(f"sqlite:///{FORMAT_1_DB}")
    with old.connect() as conn:  # the row as the previous version stored it, typed by today's columns
        row = conn.execute(select(*old_columns).where(jobs.c.id == OLD_VIDEO)).mappings().one()
    old.dispose()
    assert "format" not in row["request"] and "resolved" not in row["request"]
    engine = create_engine(url)
    with engine.begin() as conn:  # the previous version's table: no poster_uri column, a format-1 request
        for name in ADDED_JOB_COLUMNS:
            conn.execute(text(f"ALTER TABLE jobs DROP COLUMN {name}"))
        conn.execute(insert(jobs).values(dict(row)))
    engine.dispose()
    store.create_schema()  # what the new version does on start: adds the missing column
    job = store.get(OLD_VIDEO)
    assert job.request.resolved.steps == 4 and job.poster_uri is None
    args = scheduler_args(tmp_path, database_url=url)
    stages = FakeStages()

    done = run_until_finished(args, stages, store, OLD_VIDEO)
    assert done.status == JobStatus.SUCCEEDED and done.poster_uri.endswith("poster-a1.jpg")
    store.close()


def old_database(tmp_path: Path) -> tuple[JobStore, str]:
    """A copy of the previous version's database, opened (and upgraded) by today's store, and its URL."""
    return copy_of_database(FORMAT_1_DB, tmp_path)

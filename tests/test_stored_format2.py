"""A job store written before the store became repositories (issue 22) still works after it, on both
backends: its queued job runs to completion, its completed job and its storyboard (request, edit, cut)
read as they were written, its project keeps its settings and its LUT.

`tests/data/jobs-format2.db` was made by `tests/data/make_jobs_format2.py` at commit 63c9c72, through that
code's HTTP API (the docstring there lists what it holds).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, insert, inspect, select

from serve.http.views import storyboard_view, video_view
from serve.jobs import JobStatus, JobStore
from serve.jobs.schema import metadata
from serve.webhooks import open_job_store
from tests.support.fake_stages import FakeStages, run_until_finished, scheduler_args
from tests.support.job_stores import copy_of_database

FORMAT_2_DB = Path(__file__).parent / "data" / "jobs-format2.db"
QUEUED = "vid_01a25049ce8f5db9445bbca9"  # studio-a, interactive, seed 1234, `warm` LUT, 24 fps, callback
COMPLETED = "vid_01a25049cea83bb13d698baa"  # default, 1.5 GPU seconds
BOARD = "sb_01a25049cec56fdef17bcf86"  # 2 shots x 1 take, both completed; order [1, 0], a 24 fps cut


def copied_store(tmp_path: Path) -> tuple[JobStore, str]:
    """A copy of the old database, opened (and upgraded) by today's store, and its URL."""
    return copy_of_database(FORMAT_2_DB, tmp_path)


def postgres_copy(postgres_server, postgres_database) -> tuple[JobStore, str]:  # noqa: ANN001
    """The old database's rows in a fresh PostgreSQL schema (every table, typed by today's columns)."""
    url = postgres_server.create_schema(postgres_database)
    store = open_job_store(url)
    store.create_schema()
    old = create_engine(f"sqlite:///{FORMAT_2_DB}")
    target = create_engine(url)
    with old.connect() as source, target.begin() as conn:
        for table in metadata.sorted_tables:
            if table.name == "api_keys":  # the bootstrap key of `default` is there already
                continue
            if not inspect(source).has_table(table.name):  # a table added since (e.g. take_notes)
                continue
            present = {column["name"] for column in inspect(source).get_columns(table.name)}
            columns = [column for column in table.columns if column.name in present]  # its columns then
            rows = [dict(row) for row in source.execute(select(*columns)).mappings()]
            if table.name == "projects":
                conn.execute(table.delete())
            if rows:
                conn.execute(insert(table), rows)
    old.dispose()
    target.dispose()
    store.create_schema()  # numbers the copied takes, as opening the old file does
    return store, url


def check_what_was_stored(store: JobStore) -> None:
    queued = store.get(QUEUED)
    assert (queued.status, queued.project, queued.priority) == (JobStatus.QUEUED, "studio-a", "interactive")
    assert (queued.idempotency_key, queued.labels) == ("shot-7c", {"shot": "7C", "artist": "mo"})
    request = queued.request
    assert (request.resolved.seed, request.resolved.steps, request.resolved.num_frames) == (1234, 4, 9)
    assert (request.finish.look, request.finish.fps) == ("warm", 24)
    assert request.finish.lut is not None and request.finish.lut.key == store.get_lut("studio-a", "warm").key
    assert request.callback_url == "https://hooks.example.com/previz"

    completed = store.get(COMPLETED)
    assert completed.status == JobStatus.SUCCEEDED and completed.gpu_seconds == 1.5
    assert completed.artifact_uri and completed.poster_uri and completed.request.resolved.seed == 5
    assert video_view(completed).status == "completed"

    project = store.get_project("studio-a")
    assert (project.settings.gpu_seconds_per_day, project.settings.default_fps) == (3600, 24)
    assert (project.settings.max_queued_jobs, project.settings.retention_days) == (50, 30)


def check_the_storyboard(store: JobStore) -> None:
    board = store.get_storyboard(BOARD)
    assert board.title == "act 2" and board.num_jobs == 2
    assert [shot.name for shot in board.request.shots] == ["2A", "2B"] and board.request.fps == 24
    assert board.request.body_sha256 and board.edit.order == [1, 0]
    takes = store.list(project="default", storyboard_id=BOARD)
    assert board.edit.takes == {"0": next(job.id for job in takes if job.request.storyboard.shot == 0)}
    assert [job.take for job in takes] == [1, 1]  # numbered when opened: the first take of each shot
    cut = board.cut
    assert (cut.fps, cut.num_frames, cut.stale) == (24, 28, None)
    assert [clip.name for clip in cut.clips] == ["2B", "2A"]
    view = storyboard_view(board, takes)
    assert (view.order, view.status, view.cut_url) == ([1, 0], "completed", f"/v1/storyboards/{BOARD}/cut")
    assert view.shots[0].selected_video_id == board.edit.takes["0"]


def test_a_format_2_store_reads_as_it_was_written(tmp_path: Path) -> None:
    store, _ = copied_store(tmp_path)
    check_what_was_stored(store)
    check_the_storyboard(store)
    store.close()


def test_its_queued_job_runs_to_completion_with_its_look_rate_and_callback(tmp_path: Path) -> None:
    store, url = copied_store(tmp_path)
    stages = FakeStages()
    done = run_until_finished(scheduler_args(tmp_path, database_url=url), stages, store, QUEUED)
    assert done.status == JobStatus.SUCCEEDED and done.seed == 1234 and done.poster_uri is not None
    (finish,) = stages.calls["finish"]
    assert (finish.look, finish.fps, finish.lut) == ("warm", 24, store.get(QUEUED).request.finish.lut)
    (delivery,) = store.webhook_deliveries(QUEUED)
    assert delivery.payload["data"]["status"] == "completed" and delivery.payload["data"]["seed"] == 1234
    store.close()


def test_the_same_rows_in_postgresql_read_and_run(postgres_server, postgres_database, tmp_path: Path) -> None:  # noqa: ANN001
    store, url = postgres_copy(postgres_server, postgres_database)
    check_what_was_stored(store)
    check_the_storyboard(store)
    stages = FakeStages()
    done = run_until_finished(scheduler_args(tmp_path, database_url=url), stages, store, QUEUED)
    assert done.status == JobStatus.SUCCEEDED and done.seed == 1234
    store.close()

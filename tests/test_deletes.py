"""Issue 23, item 2: a delete reaches every copy the studio serves. A take deleted after it went into a
board's cut takes the cut with it (marked stale, its mp4 and clips gone, its signed links 404, no timeline);
a video deleted while a stage runs leaves nothing on the store; the retention module's orphan sweep removes
what a crash left behind and nothing live; storyboards and their cuts can be deleted."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.frames import Frames
from serve.config import PrevizArgs
from serve.jobs import JobStatus, JobStore
from serve.jobs.models import utcnow
from serve.jobs.retention import OrphanSweeper, RetentionSweeper
from serve.jobs.storyboard import BoardShot, CutClip, CutRecord, StoryboardRequest
from serve.stages.finisher import FinisherStage
from serve.stages.payloads import FinishCall, FinishedClip, FrameBatch
from serve.storage import JobArtifacts, LocalArtifactStore, StorageSettings
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cli_run import previz
from tests.support.cuts import run_cuts
from tests.support.fake_stages import (
    WAIT_S,
    FakeStages,
    empty_store,
    run,
    scheduler_args,
    start,
    stop,
    wait_for,
)
from tests.support.job_requests import job_request
from tests.test_editorial_api import BOARD, cut_of, finish_with_clip, take
from tests.test_editorial_api import board as board  # a fixture: 3 shots × 2 finished takes


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


@pytest.fixture
def cut_board(api: LocalApi, request: pytest.FixtureRequest) -> dict:
    """The editorial tests' board of 3 shots × 2 finished takes, with its cut rendered at 24 fps."""
    board = request.getfixturevalue("board")
    cut_of(api, board["id"], {"fps": 24})
    return board


def stored_keys(api: LocalApi, prefix: str = "") -> set[str]:
    return {item.key for item in api.state.artifacts.list(prefix)}


def cut_keys(api: LocalApi, board_id: str) -> set[str]:
    cut = api.store.get_storyboard(board_id).cut
    return {cut.key, *(clip.key for clip in cut.clips)}


# --- a take in a cut ------------------------------------------------------------------------------------


def test_a_take_deleted_after_it_went_into_the_cut_stales_the_cut_and_removes_every_copy(
    api: LocalApi, cut_board: dict
) -> None:
    url = f"/v1/storyboards/{cut_board['id']}"
    cut = api.client.get(f"{url}/cut").json()
    links = [cut["content_url"], *(clip["content_url"] for clip in cut["clips"])]
    assert all(api.client.get(link).status_code == 200 for link in links)
    files = cut_keys(api, cut_board["id"])
    in_cut = take(cut_board, 0, 0)
    take_link = api.client.get(f"/v1/videos/{in_cut}/links").json()["video"]
    assert api.client.delete(f"/v1/videos/{take(cut_board, 1, 1)}").status_code == 200  # not in the cut
    assert files <= stored_keys(api) and api.client.get(f"{url}/cut").status_code == 200

    answer = api.client.delete(f"/v1/videos/{in_cut}")
    assert answer.status_code == 200, answer.text
    assert [api.client.get(link).status_code for link in [*links, take_link]] == [404] * (len(links) + 1)
    assert not files & stored_keys(api) and not stored_keys(api, f"default/{in_cut}/")
    for path in ("/cut", "/cut/content", "/timeline", "/timeline?format=edl", "/timeline?package=true"):
        error = api.client.get(url + path)
        assert (error.status_code, error.json()["error"]["code"]) == (409, "cut_stale"), path
        assert in_cut in error.json()["error"]["message"]
    assert api.client.get(url).json()["cut_url"] is None
    # rendering again uses what is left: the shot's other take
    again = cut_of(api, cut_board["id"], {"fps": 24})
    assert take(cut_board, 0, 1) in [c["video_id"] for c in again["clips"]]


def test_retention_expiring_a_take_in_the_cut_stales_the_cut_too(api: LocalApi, cut_board: dict) -> None:
    files = cut_keys(api, cut_board["id"])
    api.store.update_project("default", {"retention_days": 1})
    assert RetentionSweeper(api.store, api.state.artifacts).sweep_once(utcnow() + timedelta(days=2)) == 6
    assert not files & stored_keys(api)
    assert api.client.get(f"/v1/storyboards/{cut_board['id']}/cut").json()["error"]["code"] == "cut_stale"


# --- deleting boards and cuts ---------------------------------------------------------------------------


def test_deleting_a_board_keeps_its_videos_unless_asked_and_removes_its_cut(
    api: LocalApi, cut_board: dict
) -> None:
    videos = [video["video_id"] for shot in cut_board["shots"] for video in shot["videos"]]
    files = cut_keys(api, cut_board["id"])
    url = f"/v1/storyboards/{cut_board['id']}"
    assert api.client_for("other").delete(url).status_code == 404  # another project's key
    assert api.client.delete("/v1/storyboards/sb_nosuchboard").status_code == 404

    answer = api.client.delete(url)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": cut_board["id"], "object": "storyboard.deleted", "deleted": True,
                             "deleted_videos": []}  # fmt: skip
    assert api.client.get(url).status_code == 404 and api.client.delete(url).status_code == 404
    assert not files & stored_keys(api)
    for video_id in videos:  # kept, as videos of no board, with their clips
        video = api.client.get(f"/v1/videos/{video_id}").json()
        assert video["status"] == "completed" and video["storyboard_id"] is None
        assert api.client.get(f"/v1/videos/{video_id}/content", follow_redirects=False).status_code == 307
    remix = api.client.post(f"/v1/videos/{videos[0]}/remix", json={"prompt": "a door, at night"})
    assert remix.status_code == 201 and remix.json()["storyboard_id"] is None


def test_deleting_a_board_with_delete_videos_deletes_and_cancels_its_takes(api: LocalApi) -> None:
    created = api.client.post("/v1/storyboards", json=BOARD).json()
    videos = [video["video_id"] for shot in created["shots"] for video in shot["videos"]]
    for video_id in videos[:-1]:
        finish_with_clip(api, video_id, 40)
    running = api.store.claim(videos[-1], "test-scheduler")  # one take still runs
    assert running is not None
    api.client.post(f"/v1/storyboards/{created['id']}/cut", json={"fps": 24})  # not ready: 409, no cut

    answer = api.client.delete(f"/v1/storyboards/{created['id']}", params={"delete_videos": "true"})
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()["deleted_videos"]) == sorted(videos)
    assert all(api.client.get(f"/v1/videos/{video_id}").status_code == 404 for video_id in videos)
    assert stored_keys(api, "default/") == set()
    assert ("cancel", (videos[-1],)) in api.scheduler.calls  # its pipeline is stopped


def test_deleting_a_boards_cut_removes_its_files_and_a_second_delete_is_409(
    api: LocalApi, cut_board: dict
) -> None:
    url = f"/v1/storyboards/{cut_board['id']}/cut"
    files = cut_keys(api, cut_board["id"])
    link = api.client.get(url).json()["content_url"]
    assert api.client_for("other").delete(url).status_code == 404
    answer = api.client.delete(url)
    assert answer.status_code == 200 and answer.json()["deleted"] is True
    assert not files & stored_keys(api) and api.client.get(link).status_code == 404
    again = api.client.delete(url)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "no_cut")
    assert (
        api.client.get(f"/v1/videos/{take(cut_board, 0, 0)}/content", follow_redirects=False).status_code
        == 307
    )  # takes stay


def test_the_cli_deletes_a_board_and_with_a_flag_its_videos(
    api: LocalApi, cut_board: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = api.client.post("/v1/storyboards", json=BOARD).json()
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_SERVER", url)
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        code, out, err = previz(["delete-storyboard", cut_board["id"]], monkeypatch, capsys)
        assert code == 0 and out.split() == [cut_board["id"], "deleted;", "its", "6", "videos", "kept"], err
        code, out, err = previz(["delete-storyboard", other["id"], "--delete-videos"], monkeypatch, capsys)
        assert code == 0 and out.split()[-3:] == ["6", "videos", "deleted"], err
        code, _out, err = previz(["delete-storyboard", other["id"]], monkeypatch, capsys)
        assert code != 0 and "not_found" in err
    assert api.client.get(f"/v1/videos/{take(cut_board, 0, 0)}").status_code == 200


# --- a delete that races a running stage ----------------------------------------------------------------


class PublishingStages(FakeStages):
    """Fake stages whose Finisher stores the clip and the poster as the real one does."""

    def __init__(self, artifacts: LocalArtifactStore, when: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.artifacts, self.when = artifacts, when
        self.stored = asyncio.Event()
        self.release = asyncio.Event()
        self.on_stored: Any = None

    async def finish(self, frames: FrameBatch, call: FinishCall) -> FinishedClip:
        clip = await super().finish(frames, call)
        self.artifacts.put_bytes(clip.key, b"\x00\x00\x00\x18ftypmp42 clip", "video/mp4")
        self.artifacts.put_bytes(clip.poster_key, b"\xff\xd8\xff poster", "image/jpeg")
        self.stored.set()
        if self.when == "after_finisher_returned":
            self.on_stored()  # the DELETE lands after the upload, before the outcome is recorded
        else:
            await self.release.wait()  # the DELETE lands while the Finisher call is open
        return clip


@pytest.mark.parametrize("when", ["during_finisher_call", "after_finisher_returned"])
def test_a_video_deleted_while_finishing_leaves_nothing_on_the_store(tmp_path: Path, when: str) -> None:
    args = scheduler_args(tmp_path)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    stages = PublishingStages(artifacts, when)
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))
    stages.on_stored = lambda: store.cancel(job.id, project="dune")

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await asyncio.wait_for(stages.stored.wait(), WAIT_S)
            if when == "during_finisher_call":
                assert store.cancel(job.id, project="dune") == "cancelled"  # what DELETE does, then:
                await scheduler.cancel(job.id)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)

    run(scenario)
    assert store.get(job.id).status == JobStatus.CANCELLED
    assert [item.key for item in artifacts.list(JobArtifacts("dune", job.id).folder)] == []


def test_two_concurrent_deletes_of_a_running_job_leave_no_checkpoint(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)
    stages = FakeStages(hold_low=asyncio.Event())
    store = empty_store(args)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    job, _ = store.create("dune", "batch", job_request(steps=8))
    checkpoint = JobArtifacts("dune", job.id).checkpoint

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            # the high-noise stage writes the boundary checkpoint while the low-noise expert already runs
            await wait_for(
                store,
                job.id,
                lambda j: (
                    j.status == JobStatus.DENOISING_LOW
                    and "low" in stages.calls
                    and artifacts.exists(checkpoint)
                ),
            )
            # the first DELETE cancels; the second finds it cancelled and deletes it, both before the
            # Scheduler's cancel reaches the run
            assert store.cancel(job.id, project="dune") == "cancelled"
            assert store.cancel(job.id, project="dune") == "already_finished"
            assert store.mark_deleted(job.id, project="dune") is not None
            await scheduler.cancel(job.id)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)

    run(scenario)
    assert [item.key for item in artifacts.list(JobArtifacts("dune", job.id).folder)] == []


# --- the orphan sweep -----------------------------------------------------------------------------------


def test_the_orphan_sweep_removes_what_no_live_video_or_cut_owns_and_keeps_the_rest(
    api: LocalApi, cut_board: dict
) -> None:
    artifacts, store = api.state.artifacts, api.store
    live = stored_keys(api)
    done = take(cut_board, 1, 0)
    keys = JobArtifacts("default", done)
    stale_attempt = keys.clip(7)  # a crashed attempt's clip beside the recorded one
    deleted_job = JobArtifacts("default", take(cut_board, 2, 1))
    queued = api.client.post(
        "/v1/videos", json={"prompt": "a gate", "size": "96x64", "seconds": "0.5"}
    ).json()
    in_flight = JobArtifacts("default", queued["id"]).checkpoint  # a job not finished: its files are its own
    old_cut = f"default/{cut_board['id']}/cut_00000000deadbeef.mp4"  # a render that never recorded its cut
    unknown = "default/vid_0000000000000000000000ff/clip-a1.mp4"  # no such job at all
    for key in (stale_attempt, in_flight, old_cut, unknown):
        artifacts.put_bytes(key, b"x", "video/mp4")
    store.mark_deleted(deleted_job.job_id, project="default")  # a crash after the record, before the files
    lut = "default/luts/warm-0123456789ab.cube"  # a LUT file no look names and no job needs
    artifacts.put_bytes(lut, b"LUT_3D_SIZE 2\n", "text/plain")
    gone = {key for key in live if key.startswith(deleted_job.folder)} | {
        stale_attempt,
        old_cut,
        unknown,
        lut,
    }

    sweeper = OrphanSweeper(store, artifacts, grace=timedelta(hours=1))
    assert sweeper.sweep_once() == 0  # everything is younger than the grace period
    assert sweeper.sweep_once(now=utcnow() + timedelta(hours=2)) == len(gone)
    assert stored_keys(api) == (live - gone) | {in_flight}
    assert sweeper.sweep_once(now=utcnow() + timedelta(hours=2)) == 0
    assert api.client.get(f"/v1/storyboards/{cut_board['id']}/cut").status_code == 200
    assert api.client.get(f"/v1/videos/{done}/content", follow_redirects=False).status_code == 307


def test_the_orphan_sweep_removes_a_lut_file_once_no_look_and_no_unfinished_job_needs_it(
    api: LocalApi,
) -> None:
    from tests.test_editorial_api import warm_cube

    url = "/v1/admin/projects/default/luts"
    assert api.client.put(f"{url}/warm", json={"cube": warm_cube()}).status_code == 201
    first = stored_keys(api, "default/luts/")
    queued = api.client.post("/v1/videos", json={"prompt": "a door", **TINY, "look": "warm"}).json()
    assert (
        api.client.put(f"{url}/warm", json={"cube": warm_cube().replace('"warm"', '"warm 2"')}).status_code
        == 200
    )
    second = stored_keys(api, "default/luts/") - first  # the look's new version; the queued job keeps the old
    other = api.client.put("/v1/admin/projects/default/luts/cold", json={"cube": warm_cube()})
    assert other.status_code == 201 and len(second) == 1
    (other_key,) = stored_keys(api, "default/luts/") - first - second
    assert api.client.delete(f"{url}/warm").status_code == 200  # unregistered: no look names `second` now
    sweeper = OrphanSweeper(api.store, api.state.artifacts, grace=timedelta(hours=1))
    later = utcnow() + timedelta(hours=2)
    assert sweeper.sweep_once(now=later) == 1  # the new version: unregistered, no job was admitted with it
    assert stored_keys(api, "default/luts/") == first | {other_key}  # the queued job's version, and `cold`
    assert api.client.delete(f"/v1/videos/{queued['id']}", params={"cancel_only": "true"}).status_code == 200
    assert api.client.delete(f"{url}/cold").status_code == 200
    assert sweeper.sweep_once(now=later) == 2 and stored_keys(api, "default/luts/") == set()


def test_the_orphan_sweep_deletes_at_most_its_batch_per_pass(api: LocalApi) -> None:
    for index in range(5):
        api.state.artifacts.put_bytes(f"default/vid_{index:024x}/clip-a1.mp4", b"x", "video/mp4")
    sweeper = OrphanSweeper(api.store, api.state.artifacts, grace=timedelta(0), batch=3)
    later = utcnow() + timedelta(seconds=1)
    assert [sweeper.sweep_once(now=later) for _ in range(3)] == [3, 2, 0]


def test_a_cancelled_finisher_call_publishes_nothing_though_its_thread_stores_the_clip(
    tmp_path: Path,
) -> None:
    """A Serve cancel cannot stop the encode thread: the call waits for it, then deletes what it stored."""
    finisher = FinisherStage(PrevizArgs(storage=StorageSettings(local_root=tmp_path)))
    encode = finisher._finish
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def slow_finish(frames: Frames, call: FinishCall) -> FinishedClip:
        started.set()
        release.wait(10)
        try:
            return encode(frames, call)
        finally:
            ended.set()

    finisher._finish = slow_finish
    call = FinishCall(project="dune", job_id="vid_0001", attempt=1, seed=1, look="none", label=None,
                      metadata={})  # fmt: skip

    async def scenario() -> None:
        pixels = asyncio.get_running_loop().create_future()
        pixels.set_result(np.full((5, 64, 96, 3), 90, dtype=np.uint8))
        task = asyncio.ensure_future(finisher.finish(FrameBatch(ref=[pixels], fps=16, seconds=0.0), call))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()  # the job was deleted while its clip was encoding
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario)
    assert ended.wait(10)  # the thread has stored whatever it was going to store
    assert list(finisher.store.list("dune/")) == []


def test_the_store_refuses_a_cut_of_a_deleted_take_and_replaces_cuts_only_by_id(store: JobStore) -> None:
    board, _ = store.create_storyboard(
        "sb_0001",
        "dune",
        "act 1",
        StoryboardRequest(shots=[BoardShot(name="1A"), BoardShot(name="1B")]),
        [("batch", job_request(), {}), ("batch", job_request(), {})],
    )
    first, second = (job.id for job in store.list(project="dune", storyboard_id=board.id, order="asc"))
    for video_id in (first, second):
        claimed = store.claim(video_id, "test")
        assert store.succeed(
            video_id, claimed.attempt, artifact_uri=f"dune/{video_id}/clip-a1.mp4", artifact_bytes=1
        )
    cut = a_cut("cut_1", [first, second])
    assert store.save_cut(board.id, cut, [first, second])
    assert not store.replace_cut(board.id, "cut_0", None)  # not the board's cut any more: untouched
    assert store.mark_deleted(first, project="dune") is not None
    assert not store.save_cut(
        board.id, a_cut("cut_2", [first, second]), [first, second]
    )  # a render of a deleted take
    assert store.get_storyboard(board.id).cut == cut
    assert store.replace_cut(board.id, "cut_1", cut.model_copy(update={"stale": "its take was deleted"}))
    jobs, boards = store.artifact_owners([first, second, board.id, "vid_unknown"])
    assert set(jobs) == {first, second} and jobs[first].deleted_at is not None and set(boards) == {board.id}
    assert store.delete_storyboard(board.id, project="other") is None  # another project's board
    assert store.delete_storyboard(board.id, project="dune") is not None
    assert store.get_storyboard(board.id) is None and store.get(second).storyboard_id is None
    assert not store.save_cut(board.id, cut, [second])  # the board is gone


def a_cut(cut_id: str, video_ids: list[str]) -> CutRecord:
    """A cut record of one frame per take (what the store keeps; no files behind it)."""
    clips = [
        CutClip(shot=shot, name=f"shot {shot + 1}", video_id=video_id, take=1, key=f"{cut_id}-{shot}.mp4",
                start_frame=shot, num_frames=1, slate_frames=0)
        for shot, video_id in enumerate(video_ids)
    ]  # fmt: skip
    return CutRecord(id=cut_id, key=f"{cut_id}.mp4", fps=16, width=96, height=64,
                     num_frames=len(clips), slates=False, created_at=0.0, clips=clips)  # fmt: skip


def test_a_cut_whose_take_is_deleted_while_it_renders_is_refused_and_leaves_no_files(
    api: LocalApi, board: dict
) -> None:
    victim = take(board, 2, 0)
    queued = api.client.post(f"/v1/storyboards/{board['id']}/cut", json={"fps": 24})
    assert queued.status_code == 202, queued.text
    assert api.client.delete(f"/v1/videos/{victim}").status_code == 200  # lands before the cut is recorded
    run_cuts(api)
    cut = api.client.get(f"/v1/storyboards/{board['id']}/cut").json()
    assert (cut["status"], cut["error"]["code"]) == ("failed", "take_deleted")
    assert api.store.get_storyboard(board["id"]).cut is None
    assert stored_keys(api, f"default/{board['id']}/") == set()

"""The cut as a durable job, without Ray: the store's fenced transitions of a cut job, the API's 202, 409s,
cancel and event stream, and the Finisher's render call and the Scheduler's CutRunner stopping a cut
mid-render with nothing of it left."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from ray.exceptions import ActorDiedError

from pipeline.video import read_frames
from serve.editorial.cut import render_cut
from serve.jobs import JobStore
from serve.jobs.cuts import CutRequest, CutRunning, CutTake
from serve.jobs.storyboard import BoardShot, StoryboardRequest
from serve.scheduling import cuts as cuts_module
from serve.scheduling.cuts import CutRunner
from serve.stages.finisher import FinisherStage, make_interpolator
from serve.stages.payloads import CutCall, CutProgress, CutRendered
from tests.support.api_app import LocalApi, local_api
from tests.support.cuts import InProcessFinisher, Stream, cut_runner, run_cuts
from tests.support.job_requests import job_request
from tests.test_deletes import a_cut, stored_keys
from tests.test_editorial_api import board as board  # a fixture: 3 shots × 2 finished takes
from tests.test_editorial_api import cut_of, take


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def a_board(store: JobStore) -> tuple[str, list[str]]:
    """A board of 2 shots, one finished take each (no files: the store's view only)."""
    shots = StoryboardRequest(shots=[BoardShot(name="1A"), BoardShot(name="1B")])
    board, _ = store.create_storyboard(
        "sb_0001", "dune", "act 1", shots, [("batch", job_request(), {}), ("batch", job_request(), {})]
    )
    videos = [job.id for job in store.list(project="dune", storyboard_id=board.id, order="asc")]
    for video_id in videos:
        claimed = store.claim(video_id, "test")
        assert store.succeed(
            video_id, claimed.attempt, artifact_uri=f"dune/{video_id}/clip-a1.mp4", artifact_bytes=1
        )
    return board.id, videos


def cut_request(videos: list[str], repeat: int = 1) -> CutRequest:
    takes = [
        CutTake(shot=shot, name=f"{shot + 1}A", video_id=video_id, take=1, key=f"dune/{video_id}/clip-a1.mp4")
        for shot, video_id in enumerate(videos)
    ]
    return CutRequest(title="act 1", takes=takes * repeat, fps=24)


def test_a_cut_job_is_fenced_by_its_attempt_and_a_board_has_one_unfinished_cut(api: LocalApi) -> None:
    store = api.store
    board_id, videos = a_board(store)
    assert store.count_unfinished_cuts() == {}
    first = store.create_cut("cut_0000000000000001", board_id, "dune", cut_request(videos))
    assert (first.status, first.attempt, first.progress) == ("queued", 0, 0.0)
    assert store.count_unfinished_cuts() == {"queued": 1}  # what the previz_cuts gauge publishes
    with pytest.raises(CutRunning):
        store.create_cut("cut_0000000000000002", board_id, "dune", cut_request(videos))
    with pytest.raises(LookupError):
        store.create_cut("cut_0000000000000003", "sb_none", "dune", cut_request(videos))
    run1 = store.claim_cut(first.id, "scheduler-a")
    assert (run1.status, run1.attempt) == ("running", 1) and store.claim_cut(first.id, "scheduler-b") is None
    assert store.count_unfinished_cuts() == {"running": 1}
    assert store.advance_cut(first.id, 1, progress=0.5, eta_at=None)
    assert store.advance_cut(
        first.id, 1, progress=0.25, eta_at=None
    )  # accepted, but progress never goes down
    assert store.get_cut(first.id).progress == 0.5
    assert store.requeue_cut(first.id, 1, max_attempts=3) == "queued"  # its replica was lost
    assert store.get_cut(first.id).progress == 0.0
    run2 = store.claim_cut(first.id, "scheduler-a")
    assert run2.attempt == 2
    # the lost run can record nothing any more
    assert not store.advance_cut(first.id, 1, progress=1.0, eta_at=None)
    assert not store.succeed_cut(first.id, 1, a_cut(first.id, videos)).stored
    assert not store.fail_cut(first.id, 1, "cut_failed", "late")
    done = store.succeed_cut(first.id, 2, a_cut(first.id, videos))
    assert (done.stored, done.replaced) == (True, None)
    assert store.get_storyboard(board_id).cut.id == first.id
    assert (store.get_cut(first.id).status, store.get_cut(first.id).progress) == ("succeeded", 1.0)
    assert store.count_unfinished_cuts() == {}
    assert store.cancel_cut(board_id) is None  # nothing unfinished to cancel

    second = store.create_cut("cut_0000000000000002", board_id, "dune", cut_request(videos))
    assert store.latest_cut(board_id).id == second.id
    store.claim_cut(second.id, "scheduler-a")
    replaced = store.succeed_cut(second.id, 1, a_cut(second.id, videos)).replaced
    assert replaced is not None and replaced.id == first.id  # its files are the caller's to delete


def test_a_cut_interrupted_on_every_attempt_fails_and_a_restart_requeues_running_cuts(api: LocalApi) -> None:
    store = api.store
    board_id, videos = a_board(store)
    cut = store.create_cut("cut_0000000000000001", board_id, "dune", cut_request(videos))
    for attempt in (1, 2):
        assert store.claim_cut(cut.id, "scheduler-a").attempt == attempt
        interrupted = store.requeue_cuts_in_flight(max_attempts=3)  # a new scheduler started
        assert [(run.id, run.attempt) for run in interrupted] == [(cut.id, attempt)]
    store.claim_cut(cut.id, "scheduler-a")
    assert store.requeue_cut(cut.id, 3, max_attempts=3) == "failed"
    failed = store.get_cut(cut.id)
    assert (failed.status, failed.error_code) == ("failed", "too_many_attempts")
    assert store.requeue_cut(cut.id, 3, max_attempts=3) is None  # finished: stale


def test_the_api_refuses_a_second_cut_while_one_renders_and_cancels_it(api: LocalApi, board: dict) -> None:
    url = f"/v1/storyboards/{board['id']}"
    nothing = api.client.post(f"{url}/cut/cancel")
    assert (nothing.status_code, nothing.json()["error"]["code"]) == (409, "no_cut_running")
    queued = api.client.post(f"{url}/cut", json={"fps": 24})
    assert queued.status_code == 202 and ("wake", ()) in api.scheduler.calls
    busy = api.client.post(f"{url}/cut", json={"fps": 24})
    assert (busy.status_code, busy.json()["error"]["code"]) == (409, "cut_running")
    assert queued.json()["id"] in busy.json()["error"]["message"]
    assert api.client_for("other").post(f"{url}/cut/cancel").status_code == 404
    cancelled = api.client.post(f"{url}/cut/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["id"], cancelled.json()["status"]) == (queued.json()["id"], "cancelled")
    assert ("cancel_cut", (queued.json()["id"],)) in api.scheduler.calls
    run_cuts(api)  # nothing to run: the cancelled cut is never claimed
    assert api.client.get(f"{url}/cut").json()["status"] == "cancelled"
    assert stored_keys(api, f"default/{board['id']}/") == set()
    assert cut_of(api, board["id"], {"fps": 24})["num_clips"] == 3  # a new cut may be asked for


def test_the_cut_events_stream_its_status_then_done_with_the_cut(api: LocalApi, board: dict) -> None:
    url = f"/v1/storyboards/{board['id']}"
    assert api.client.get(f"{url}/cut/events").json()["error"]["code"] == "no_cut"
    cut = cut_of(api, board["id"], {"fps": 24})
    text = api.client.get(f"{url}/cut/events").text  # a finished cut: its last status, then done
    kinds = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    data = [
        json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")
    ]
    assert kinds == ["status", "done"]
    assert data[0] == {"id": cut["id"], "status": "succeeded", "progress": 100, "eta_seconds": None}
    assert data[1] == cut


def long_cut(api: LocalApi, board: dict) -> CutRequest:
    """A cut of the board's first takes, ten times over: 30 shots at 360p, so a shot takes a while."""
    videos = [take(board, shot, 0) for shot in range(3)]
    takes = [
        CutTake(
            shot=shot, name=f"s{shot}", video_id=video_id, take=1, key=api.store.get(video_id).artifact_uri
        )
        for shot, video_id in enumerate(videos)
    ]
    return CutRequest(title="long", takes=takes * 10, fps=24, size=(640, 360))


def test_a_cancelled_render_call_stops_after_the_shot_in_hand_and_deletes_what_it_stored(
    api: LocalApi, board: dict
) -> None:
    request = long_cut(api, board)
    finisher = InProcessFinisher(FinisherStage(api.state.args))

    async def scenario() -> tuple[list[CutProgress], bool]:
        stream = finisher.remote(CutCall("cut_00000000000000aa", 1, "default", board["id"], request))
        seen = [await stream.__anext__()]
        following = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        stream.cancel()
        try:
            seen.append(await following)
        except asyncio.CancelledError:
            return seen, True
        return seen, False

    seen, cancelled = asyncio.run(scenario())
    assert cancelled and isinstance(seen[0], CutProgress) and seen[0].total == 30
    assert stored_keys(api, f"default/{board['id']}/") == set()


def test_a_render_stream_closed_between_events_stops_and_deletes_what_it_stored(
    api: LocalApi, board: dict
) -> None:
    """A caller cancelled while it was not waiting on the stream (it was writing the progress) closes the
    generator at its yield: the render stops and its files go as after a cancel."""
    request = long_cut(api, board)
    stage = FinisherStage(api.state.args)

    async def scenario() -> CutProgress:
        events = stage.render_cut(CutCall("cut_00000000000000cc", 1, "default", board["id"], request))
        first = await anext(events)
        await events.aclose()
        return first

    first = asyncio.run(scenario())
    assert isinstance(first, CutProgress) and first.done == 1
    assert stored_keys(api, f"default/{board['id']}/") == set()


def watch_cut_outcomes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, float | None]]:
    """What the CutRunner records to the cut metrics (project, outcome, render seconds), each call passed
    on to serve.metrics as it is (Ray's metrics are read back only through a metrics agent: test_metrics)."""
    ended: list[tuple[str, str, float | None]] = []
    record = cuts_module.record_cut_finished

    def recording(project: str, outcome: str, render_seconds: float | None = None) -> None:
        ended.append((project, outcome, render_seconds))
        record(project, outcome, render_seconds)

    monkeypatch.setattr(cuts_module, "record_cut_finished", recording)
    return ended


def test_the_cut_runner_stops_a_cut_cancelled_mid_render_and_leaves_no_files(
    api: LocalApi, board: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = watch_cut_outcomes(monkeypatch)
    request = long_cut(api, board)
    cut = api.store.create_cut("cut_00000000000000bb", board["id"], "default", request)

    async def scenario() -> None:
        runner = cut_runner(api)
        await runner.start()
        deadline = time.monotonic() + 120
        while api.store.get_cut(cut.id).progress == 0:
            assert time.monotonic() < deadline, "the cut never progressed"
            await asyncio.sleep(0.02)
        assert api.store.cancel_cut(board["id"]).status == "cancelled"  # what the API does, then:
        assert runner.cancel(cut.id)
        await runner.settle()
        assert runner.in_flight == []
        await runner.finisher.settle()  # the replica's own clean-up, which Serve runs beside the Scheduler

    asyncio.run(scenario())
    stopped = api.store.get_cut(cut.id)
    assert stopped.status == "cancelled" and stopped.progress < 1.0
    assert ended == [("default", "cancelled", None)]
    assert api.store.get_storyboard(board["id"]).cut is None
    assert stored_keys(api, f"default/{board['id']}/") == set()


def test_a_render_through_the_finisher_equals_the_plain_render(api: LocalApi, board: dict) -> None:
    """The Finisher's streamed render stores the same cut as serve.editorial.cut.render_cut called plainly."""
    takes = [
        CutTake(
            shot=s,
            name=f"s{s}",
            video_id=take(board, s, 0),
            take=1,
            key=api.store.get(take(board, s, 0)).artifact_uri,
        )
        for s in range(3)
    ]
    request = CutRequest(title="eq", takes=takes, fps=24)
    plain = render_cut(
        api.state.artifacts,
        "cut_00000000000000cc",
        1,
        "default",
        board["id"],
        request,
        interpolator=make_interpolator(api.state.args),
    )
    finisher = InProcessFinisher(FinisherStage(api.state.args))

    async def served() -> list:
        return [
            event
            async for event in finisher.remote(
                CutCall("cut_00000000000000cc", 2, "default", board["id"], request)
            )
        ]

    events = asyncio.run(served())
    assert [event.done for event in events[:-1]] == [1, 2, 3] and isinstance(events[-1], CutRendered)
    rendered = events[-1].cut
    assert rendered.model_dump(exclude={"created_at", "key", "clips"}) == plain.model_dump(
        exclude={"created_at", "key", "clips"}
    )
    assert [c.model_dump(exclude={"key"}) for c in rendered.clips] == [
        c.model_dump(exclude={"key"}) for c in plain.clips
    ]
    frames = [read_frames(api.state.artifacts.local_path(cut.key)).pixels for cut in (rendered, plain)]
    assert frames[0].shape == (3 * 14, 64, 96, 3) and np.array_equal(*frames)


def test_deleting_a_board_cancels_its_queued_cut(api: LocalApi, board: dict) -> None:
    queued = api.client.post(f"/v1/storyboards/{board['id']}/cut", json={"fps": 24}).json()
    assert api.client.delete(f"/v1/storyboards/{board['id']}").status_code == 200
    assert api.store.get_cut(queued["id"]).status == "cancelled"
    run_cuts(api)  # never claimed: nothing renders for a board that is gone
    assert stored_keys(api, f"default/{board['id']}/") == set()


class _DiesBeforeItReports(InProcessFinisher):
    """The Finisher's render runs to its end (every file of its attempt stored), then the call fails as a
    call to a replica that died does: the files of a lost attempt, with nobody to delete them but the
    Scheduler."""

    def remote(self, call: CutCall) -> Stream:
        async def events() -> AsyncIterator[CutProgress]:
            async for event in self.stage.render_cut(call):
                if isinstance(event, CutRendered):
                    raise ActorDiedError()
                yield event

        return Stream(events())


def test_a_cut_whose_finisher_dies_is_requeued_its_files_deleted_and_rendered_again(
    api: LocalApi, board: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = watch_cut_outcomes(monkeypatch)
    url = f"/v1/storyboards/{board['id']}"
    queued = api.client.post(f"{url}/cut", json={"fps": 24}).json()
    runner = CutRunner(
        api.store,
        api.state.artifacts,
        _DiesBeforeItReports(FinisherStage(api.state.args)),
        "test-scheduler",
        max_in_flight=1,
        max_attempts=3,
    )

    async def lose_it() -> None:
        await runner.start()
        await runner.settle()

    asyncio.run(lose_it())
    lost = api.store.get_cut(queued["id"])
    assert (lost.status, lost.attempt, lost.progress) == ("queued", 1, 0.0)
    assert stored_keys(api, f"default/{board['id']}/") == set()  # the lost attempt's 4 files are gone
    assert ended == [("default", "requeued", None)]
    run_cuts(api)
    assert [(project, outcome) for project, outcome, _ in ended[1:]] == [("default", "succeeded")]
    assert ended[1][2] is not None and ended[1][2] > 0  # the render's seconds, for cut_render_seconds
    cut = api.client.get(f"{url}/cut").json()
    assert (cut["id"], cut["status"]) == (queued["id"], "completed")
    assert api.store.get_cut(queued["id"]).attempt == 2
    names = sorted(key.rsplit("/", 1)[1] for key in stored_keys(api, f"default/{board['id']}/"))
    assert [name for name in names if "-shot" not in name] == [f"{queued['id']}-a2.mp4"] and len(names) == 4


def test_a_board_links_its_first_cut_while_it_renders(api: LocalApi, board: dict) -> None:
    url = f"/v1/storyboards/{board['id']}"
    assert api.client.get(url).json()["cut_url"] is None
    api.client.post(f"{url}/cut", json={"fps": 24})
    assert api.client.get(url).json()["cut_url"] == f"{url}/cut"  # the page follows it there
    api.client.post(f"{url}/cut/cancel")
    assert api.client.get(url).json()["cut_url"] is None


def test_a_restarted_scheduler_deletes_what_the_cut_attempt_it_interrupted_stored(
    api: LocalApi, board: dict
) -> None:
    """A Scheduler stopped after its Finisher stored a cut attempt's files but before it recorded the cut:
    the next Scheduler requeues the cut and deletes those files at once (not the orphan sweep a day later);
    the board's cut, recorded by a later attempt, keeps its own."""
    url = f"/v1/storyboards/{board['id']}"
    prefix = f"default/{board['id']}/"
    first = api.client.post(f"{url}/cut", json={"fps": 24}).json()
    run_cuts(api)  # the board's cut now: attempt 1 of `first`
    served = stored_keys(api, prefix)
    queued = api.client.post(f"{url}/cut", json={"fps": 24}).json()
    run = api.store.claim_cut(queued["id"], "scheduler-that-stops")
    finisher = InProcessFinisher(FinisherStage(api.state.args))

    async def render() -> list:
        call = CutCall(run.id, run.attempt, "default", board["id"], run.request)
        return [event async for event in finisher.remote(call)]

    assert isinstance(asyncio.run(render())[-1], CutRendered)  # stored, never recorded
    assert stored_keys(api, prefix) == served | set(run.keys)

    assert cut_runner(api).requeue_in_flight() == [run.id]  # what a new Scheduler does first
    assert stored_keys(api, prefix) == served
    assert api.store.get_cut(run.id).status == "queued"
    assert api.store.get_storyboard(board["id"]).cut.id == first["id"]
    run_cuts(api)
    assert api.store.get_cut(run.id).attempt == 2
    assert stored_keys(api, prefix) == set(api.store.get_cut(run.id).keys)  # the replaced cut went too

"""Chained shots on a board (`continue`): created through the API, run by the real Scheduler on stand-in
stages (tests.support.fake_stages, whose decoder stores each clip's last frame as the real one does)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.safety import FrameCheck
from serve.editorial.cut import choose_takes
from serve.jobs import JobRecord, JobStatus, JobStore
from serve.jobs.keyframes import load_keyframes, load_last_frame, save_last_frame
from serve.jobs.request import I2V_MODEL, SERVED_MODEL
from serve.scheduling.continuity import release_chained
from tests.support.api_app import TINY, LocalApi, finish, local_api
from tests.support.fake_stages import FakeStages, run, scheduler_args, start, stop, wait_for
from tests.support.job_requests import job_request
from tests.support.safety_hooks import BLOCKED_WIDTH, block_bright_frames, broken_classifier
from tests.test_editorial_api import cut_of, finish_with_clip
from tests.test_images import encoded

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    # the same database and artifact folder as scheduler_args
    with local_api(tmp_path, i2v={"model": "tiny-i2v"}) as running:
        yield running


def board_of_three(api: LocalApi, **board: object) -> dict:
    shots = [
        {"name": "1A", "prompt": "the hero runs toward the fireball", **TINY},
        {"name": "1B", "prompt": "the hero leaps", **TINY, "continue": "previous"},
        {"name": "1C", "prompt": "the hero lands", **TINY, "continue": "1B"},
    ]
    response = api.client.post("/v1/storyboards", json={"shots": shots, **board})
    assert response.status_code == 201, response.text
    return response.json()


def takes_by_shot(store: JobStore, board_id: str) -> dict[int, JobRecord]:
    jobs = store.list(storyboard_id=board_id, limit=100, order="asc")
    return {job.request.storyboard.shot: job for job in jobs if job.request.storyboard is not None}


def test_a_three_shot_chain_runs_in_order_and_each_starts_from_its_predecessors_last_frame(
    api: LocalApi, tmp_path: Path
) -> None:
    board = board_of_three(api)
    assert [shot["continues"] for shot in board["shots"]] == [None, 0, 1]  # the board view shows the chain
    queued = takes_by_shot(api.store, board["id"])
    assert [queued[shot].request.model for shot in range(3)] == [SERVED_MODEL, I2V_MODEL, I2V_MODEL]
    assert [queued[shot].continues_shot for shot in range(3)] == [None, 0, 1]
    assert [job.id for job in api.store.queued_candidates()] == [queued[0].id]  # the chained ones wait
    # nor are they ahead of a later job of the same priority: its place counts shot 1's take alone
    later, _ = api.store.create(queued[0].project, queued[0].priority, job_request())
    assert api.store.queue_position(later) == 1
    assert api.store.queue_view(later).ahead_buckets == (queued[0].bucket,)
    api.store.cancel(later.id)
    waiting = api.client.get(f"/v1/videos/{queued[1].id}").json()
    assert (waiting["status"], waiting["waiting_for"], waiting["queue_position"]) == (
        "queued",
        "continuity",
        None,
    )
    args, stages = scheduler_args(tmp_path, i2v={"model": "tiny-i2v"}), FakeStages()

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(api.store, queued[2].id, lambda job: job.is_finished, timeout_s=60)
        finally:
            stop(scheduler)

    run(scenario)
    done = takes_by_shot(api.store, board["id"])
    assert all(job.status == JobStatus.SUCCEEDED for job in done.values())
    for shot in (1, 2):
        before, chained = done[shot - 1], done[shot]
        assert chained.started_at is not None and before.finished_at is not None
        assert chained.started_at >= before.finished_at  # waited for its predecessor
        first = chained.request.keyframes.first
        assert (first.kind, first.shot, first.video) == ("continue", shot - 1, before.id)
        condition, _last = load_keyframes(api.state.artifacts, "default", chained.id)
        predecessor_last = load_last_frame(api.state.artifacts, "default", before.id)
        assert condition is not None and predecessor_last is not None
        assert condition.tobytes() == predecessor_last.tobytes()  # the decoded frame, bit for bit
    assert not np.array_equal(
        load_last_frame(api.state.artifacts, "default", done[0].id),
        load_last_frame(api.state.artifacts, "default", done[1].id),
    )
    # a cut of the chained board drops the repeated first frame of shots 2 and 3
    record = api.store.get_storyboard(board["id"])
    cut = choose_takes(record, list(done.values()))
    assert [take.joins_previous for take in cut] == [False, True, True]


def test_a_chained_shot_waits_for_the_selected_take(api: LocalApi) -> None:
    shots = [
        {"name": "1A", "prompt": "a", **TINY},
        {"name": "1B", "prompt": "b", **TINY, "continue": "previous"},
    ]
    board = api.client.post("/v1/storyboards", json={"shots": shots, "variants": {"seeds": 2}}).json()
    first_takes = [video["video_id"] for video in board["shots"][0]["videos"]]
    chosen = first_takes[1]
    patched = api.client.patch(f"/v1/storyboards/{board['id']}", json={"takes": {"0": chosen}})
    assert patched.status_code == 200, patched.text
    finish(api, first_takes[0])  # not the selected one: the chain keeps waiting
    for take in first_takes:
        save_last_frame(api.state.artifacts, "default", take, np.full((64, 96, 3), len(take) % 7, np.uint8))
    assert run_release(api) == 0
    assert len(api.store.waiting_chained()) == 2
    finish(api, chosen)
    frame = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    save_last_frame(api.state.artifacts, "default", chosen, frame)
    assert run_release(api) == 2
    for video in board["shots"][1]["videos"]:
        job = api.store.get(video["video_id"])
        assert job.continues_shot is None and job.request.keyframes.first.video == chosen
        np.testing.assert_array_equal(load_keyframes(api.state.artifacts, "default", job.id)[0], frame)


def run_release(api: LocalApi, frame_check: FrameCheck | None = None) -> int:
    return asyncio.run(release_chained(api.store, api.state.artifacts, "test", frame_check))


@pytest.mark.parametrize(
    ("shade", "code"), [(40, None), (200, "continuity_frame_blocked")], ids=["dark", "bright"]
)
def test_a_chained_shots_frame_goes_through_the_frame_check_before_it_is_released(
    api: LocalApi, shade: int, code: str | None
) -> None:
    shots = [{"prompt": "a", **TINY}, {"prompt": "b", **TINY, "continue": "previous"}]
    board = api.client.post("/v1/storyboards", json={"shots": shots}).json()
    first, chained = (shot["videos"][0]["video_id"] for shot in board["shots"])
    finish(api, first)
    save_last_frame(api.state.artifacts, "default", first, np.full((64, 96, 3), shade, np.uint8))
    check = FrameCheck(block_bright_frames)  # frames brighter than mid-grey are `sexual_explicit`
    assert run_release(api, check) == (1 if code is None else 0)
    job = api.store.get(chained)
    stored, _last = load_keyframes(api.state.artifacts, "default", chained)
    assert api.store.waiting_chained() == []
    if code is None:
        assert job.status == JobStatus.QUEUED and job.request.keyframes.first.video == first
        np.testing.assert_array_equal(stored, np.full((64, 96, 3), shade, np.uint8))
    else:  # failed as a blocked keyframe is refused, its own code (not the finished frames'), nothing stored
        assert (job.status, job.error_code) == (JobStatus.FAILED, code)
        assert "sexual_explicit" in job.error_message and stored is None
        assert job.request.keyframes.first.sha256 is None


def test_a_chained_shot_waits_while_the_frame_check_fails_and_is_released_once_it_answers(
    api: LocalApi,
) -> None:
    shots = [{"prompt": "a", **TINY}, {"prompt": "b", **TINY, "continue": "previous"}]
    board = api.client.post("/v1/storyboards", json={"shots": shots}).json()
    first, chained = (shot["videos"][0]["video_id"] for shot in board["shots"])
    finish(api, first)
    save_last_frame(api.state.artifacts, "default", first, np.full((64, 96, 3), 40, np.uint8))
    assert run_release(api, FrameCheck(broken_classifier)) == 0  # fails closed: not released, not failed
    assert [job.id for job in api.store.waiting_chained()] == [chained]
    assert load_keyframes(api.state.artifacts, "default", chained) == (None, None)
    assert run_release(api, FrameCheck(block_bright_frames)) == 1  # the check is back: a dark frame passes


def test_the_scheduler_checks_a_chained_shots_frame_with_the_configured_frame_check(
    api: LocalApi, tmp_path: Path
) -> None:
    # the second shot is 80 wide: the predecessor's frame fitted to it is what the test hook blocks
    shots = [
        {"prompt": "a", **TINY},
        {"prompt": "b", **{**TINY, "size": f"{BLOCKED_WIDTH}x64"}, "continue": "previous"},
    ]
    board = api.client.post("/v1/storyboards", json={"shots": shots}).json()
    first, chained = (shot["videos"][0]["video_id"] for shot in board["shots"])
    safety = {"frame_check": "tests.support.safety_hooks:block_test_width"}
    args = scheduler_args(tmp_path, i2v={"model": "tiny-i2v"}, safety=safety)
    stages = FakeStages()

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(api.store, chained, lambda job: job.is_finished, timeout_s=60)
        finally:
            stop(scheduler)

    run(scenario)
    assert api.store.get(first).status == JobStatus.SUCCEEDED
    blocked = api.store.get(chained)
    assert (blocked.status, blocked.error_code) == (JobStatus.FAILED, "continuity_frame_blocked")
    assert "violence_graphic" in blocked.error_message
    assert stages.denoise_calls and all(call.request_id.startswith(first) for call in stages.denoise_calls)
    assert "encode_image" not in stages.calls  # no GPU work for the blocked take
    assert load_keyframes(api.state.artifacts, "default", chained) == (None, None)


def test_a_chain_whose_predecessor_has_no_completed_take_fails_with_a_code(api: LocalApi) -> None:
    shots = [{"prompt": "a", **TINY}, {"prompt": "b", **TINY, "continue": "previous"}]
    board = api.client.post("/v1/storyboards", json={"shots": shots}).json()
    first, second = (shot["videos"][0]["video_id"] for shot in board["shots"])
    api.client.delete(f"/v1/videos/{first}")  # cancelled: the shot will never have a take
    run_release(api)
    failed = api.store.get(second)
    assert failed.status == JobStatus.FAILED and failed.error_code == "continuity_broken"


@pytest.mark.parametrize(
    ("shots", "board", "code", "param"),
    [
        ([{"prompt": "a", **TINY, "continue": "previous"}], {}, "invalid_continue", "shots.0.continue"),
        (
            [{"name": "A", "prompt": "a", **TINY}, {"prompt": "b", **TINY, "continue": "Z"}],
            {},
            "invalid_continue",
            "shots.1.continue",
        ),
        (
            [{"prompt": "a", **TINY}, {"prompt": "b", **TINY, "continue": "previous"}],
            {"model": SERVED_MODEL},
            "keyframes_not_supported",
            "shots.1.continue",
        ),
    ],
    ids=["first shot", "unknown name", "t2v model"],
)
def test_a_bad_chain_is_a_400_and_nothing_is_created(
    api: LocalApi, shots: list, board: dict, code: str, param: str
) -> None:
    response = api.client.post("/v1/storyboards", json={"shots": shots, **board})
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == (400, code, param)
    assert api.store.list(limit=10) == [] and api.store.list_storyboards("default") == []


def test_a_boards_stored_body_keeps_no_panel_bytes(api: LocalApi) -> None:
    url = "data:image/png;base64," + base64.b64encode(encoded(Image.new("RGB", (32, 32), (9, 9, 9)))).decode()
    shots = [{"prompt": "a", **TINY, "keyframes": {"first": url}}]
    board = api.client.post("/v1/storyboards", json={"shots": shots})
    assert board.status_code == 201, board.text
    stored = api.store.get_storyboard(board.json()["id"]).request.body
    assert stored["shots"][0]["keyframes"]["first"].startswith("sha256:")
    assert board.json()["shots"][0]["videos"][0]["keyframe"] == "image"


def test_a_remix_with_rechain_starts_from_the_shot_it_continues_as_it_is_now(api: LocalApi) -> None:
    shots = [{"prompt": "a", **TINY}, {"prompt": "b", **TINY, "continue": "previous"}]
    board = api.client.post("/v1/storyboards", json={"shots": shots, "variants": {"seeds": 2}}).json()
    first_takes = [video["video_id"] for video in board["shots"][0]["videos"]]
    chained = board["shots"][1]["videos"][0]["video_id"]
    frames = {}
    for shade, take in enumerate(first_takes):
        finish(api, take)
        frames[take] = np.full((64, 96, 3), 30 + 40 * shade, np.uint8)
        save_last_frame(api.state.artifacts, "default", take, frames[take])
        if shade == 0:
            assert run_release(api) == 2  # both chained takes start from the first completed take
    assert api.store.get(chained).request.keyframes.first.video == first_takes[0]
    # the editor prefers the other take now: nothing re-runs, until a remix asks to re-chain
    api.client.patch(f"/v1/storyboards/{board['id']}", json={"takes": {"0": first_takes[1]}})
    assert run_release(api) == 0
    plain = api.client.post(f"/v1/videos/{chained}/remix", json={"prompt": "b again"}).json()
    assert api.store.get(plain["id"]).request.keyframes.first.video == first_takes[0]
    remix = api.client.post(f"/v1/videos/{chained}/remix", json={"prompt": "b, re-chained", "rechain": True})
    assert remix.status_code == 201, remix.text
    assert api.store.get(remix.json()["id"]).continues_shot == 0
    assert run_release(api) == 1
    released = api.store.get(remix.json()["id"])
    assert released.request.keyframes.first.video == first_takes[1]
    np.testing.assert_array_equal(
        load_keyframes(api.state.artifacts, "default", released.id)[0], frames[first_takes[1]]
    )
    refused = api.client.post(f"/v1/videos/{first_takes[0]}/remix", json={"prompt": "x", "rechain": True})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_continue"


def test_a_cut_of_a_chained_board_drops_the_repeated_first_frame(api: LocalApi) -> None:
    shots = [
        {"name": "1A", "prompt": "a", **TINY},
        {"name": "1B", "prompt": "b", **TINY, "continue": "previous"},
    ]
    board = api.client.post("/v1/storyboards", json={"shots": shots}).json()
    first, chained = (shot["videos"][0]["video_id"] for shot in board["shots"])
    finish_with_clip(api, first, 40)
    save_last_frame(api.state.artifacts, "default", first, np.full((64, 96, 3), 40, np.uint8))
    assert run_release(api) == 1
    finish_with_clip(api, chained, 80)
    cut = cut_of(api, board["id"], {"fps": 16})
    record = api.store.get_storyboard(board["id"]).cut
    assert [clip.num_frames for clip in record.clips] == [9, 8]  # 9 frames each; the join's repeat dropped
    assert [clip.content_start for clip in record.clips] == [0, 1]
    assert record.num_frames == 17 and cut["status"] == "completed"

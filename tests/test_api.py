"""The HTTP API's contract, on the FastAPI app in this process (real SQLite store, no Ray): the error
shape for bad input, idempotency, queue bounds, content, events, and the openai package's wire format."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve.config import PrevizArgs
from serve.http.app import app
from serve.http.deps import IngressState, current_state
from serve.jobs import JobStatus
from serve.scheduling.scheduler import Scheduler
from tests.support.api_app import TINY, LocalApi, finish, local_api

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as running:
        yield running


def create(api: LocalApi, **fields: Any) -> dict[str, Any]:
    client = api.client_for(fields["project"]) if "project" in fields else api.client
    response = client.post("/v1/videos", json={"prompt": "a lighthouse in a storm", **TINY, **fields})
    assert response.status_code == 201, response.text
    return response.json()


GOOD = {"prompt": "a lighthouse in a storm", **TINY}
UNKNOWN = "vid_000000000000000000000000"

# (name, method, path, request keyword arguments, expected status, error code, param)
BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str, str | None]] = [
    (
        "malformed JSON",
        "POST",
        "/v1/videos",
        {"content": b'{"prompt": ', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        None,
    ),  # noqa: E501
    ("JSON array", "POST", "/v1/videos", {"json": [GOOD]}, 400, "invalid_json", None),
    (
        "empty body",
        "POST",
        "/v1/videos",
        {"content": b"", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        None,
    ),  # noqa: E501
    (
        "plain text body",
        "POST",
        "/v1/videos",
        {"content": b"a lighthouse", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        None,
    ),  # noqa: E501
    ("no prompt nor shot", "POST", "/v1/videos", {"json": {**TINY}}, 400, "missing_field", "prompt"),
    (
        "blank prompt",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "prompt": "   "}},
        400,
        "missing_field",
        "prompt",
    ),
    (
        "prompt not a string",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "prompt": 123}},
        400,
        "invalid_type",
        "prompt",
    ),
    (
        "100 KB prompt",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "prompt": "rain " * 20_000}},
        400,
        "invalid_value",
        "prompt",
    ),  # noqa: E501
    (
        "NUL in prompt",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "prompt": "a\x00b"}},
        400,
        "invalid_value",
        "prompt",
    ),
    (
        "unknown field",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "colour": "red"}},
        400,
        "unknown_field",
        "colour",
    ),
    (
        "unknown shot field",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "shot": {"lens": "35mm"}}},
        400,
        "unknown_field",
        "shot.lens",
    ),  # noqa: E501
    (
        "shot not an object",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "shot": "dolly in"}},
        400,
        "invalid_type",
        "shot",
    ),
    ("unknown size", "POST", "/v1/videos", {"json": {**GOOD, "size": "huge"}}, 400, "invalid_value", "size"),
    (
        "empty resolution",
        "POST",
        "/v1/videos",
        {"json": {"prompt": "x", "resolution": ""}},
        400,
        "invalid_value",
        "resolution",
    ),
    (
        "storyboard empty board resolution",
        "POST",
        "/v1/storyboards",
        {"json": {"resolution": "", "shots": [{"prompt": "0"}]}},
        400,
        "invalid_value",
        "shots.0.resolution",
    ),
    (
        "size not multiple of 16",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "size": "1000x700"}},
        400,
        "invalid_value",
        "size",
    ),  # noqa: E501
    (
        "size too large",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "size": "4096x4096"}},
        400,
        "invalid_value",
        "size",
    ),
    (
        "size and resolution",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "resolution": "480p"}},
        400,
        "invalid_value",
        "size",
    ),  # noqa: E501
    (
        "duration too long",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "seconds": "12"}},
        400,
        "invalid_value",
        "seconds",
    ),
    (
        "seconds not a number",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "seconds": "four"}},
        400,
        "invalid_value",
        "seconds",
    ),  # noqa: E501
    (
        "seconds a list",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "seconds": [4]}},
        400,
        "invalid_type",
        "seconds",
    ),
    (
        "seconds and duration",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "duration": 1}},
        400,
        "invalid_value",
        "seconds",
    ),
    ("negative seed", "POST", "/v1/videos", {"json": {**GOOD, "seed": -1}}, 400, "invalid_value", "seed"),
    ("fractional seed", "POST", "/v1/videos", {"json": {**GOOD, "seed": 1.5}}, 400, "invalid_type", "seed"),
    ("zero steps", "POST", "/v1/videos", {"json": {**GOOD, "steps": 0}}, 400, "invalid_value", "steps"),
    (
        "steps not a number",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "steps": "many"}},
        400,
        "invalid_type",
        "steps",
    ),
    (
        "unknown priority",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "priority": "urgent"}},
        400,
        "invalid_value",
        "priority",
    ),  # noqa: E501
    (
        "unknown model",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "model": "sora-2"}},
        400,
        "unknown_model",
        "model",
    ),
    (
        "unknown upscale",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "upscale": "4k"}},
        400,
        "invalid_value",
        "upscale",
    ),
    (
        "aspect with WxH",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "aspect": "9:16"}},
        400,
        "invalid_value",
        "aspect",
    ),
    (
        "bad project name",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "project": "../etc"}},
        400,
        "invalid_value",
        "project",
    ),  # noqa: E501
    (
        "too many labels",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "labels": {f"k{i}": "v" for i in range(33)}}},
        400,
        "invalid_value",
        "labels",
    ),  # noqa: E501
    (
        "label not text",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "labels": {"take": [1]}}},
        400,
        "invalid_type",
        "labels.take",
    ),  # noqa: E501
    (
        "callback not http",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "callback_url": "ftp://studio/hook"}},
        400,
        "invalid_value",
        "callback_url",
    ),  # noqa: E501
    (
        "input_reference upload",
        "POST",
        "/v1/videos",
        {"data": {"prompt": "x"}, "files": {"input_reference": ("ref.png", b"png")}},
        400,
        "invalid_image",
        "input_reference",
    ),  # noqa: E501
    (
        "form field given twice",
        "POST",
        "/v1/videos",
        {"content": b"prompt=a&prompt=b", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        400,
        "invalid_form",
        "prompt",
    ),  # noqa: E501
    (
        "idempotency key too long",
        "POST",
        "/v1/videos",
        {"json": GOOD, "headers": {"Idempotency-Key": "k" * 300}},
        400,
        "invalid_value",
        "Idempotency-Key",
    ),  # noqa: E501
    (
        "25 MB body",
        "POST",
        "/v1/videos",
        {"json": {**GOOD, "prompt": "x" * (25 << 20)}},
        413,
        "request_too_large",
        None,
    ),  # noqa: E501
    ("unknown id", "GET", f"/v1/videos/{UNKNOWN}", {}, 404, "not_found", "video_id"),
    ("cancel unknown id", "DELETE", f"/v1/videos/{UNKNOWN}", {}, 404, "not_found", "video_id"),
    ("content of unknown id", "GET", f"/v1/videos/{UNKNOWN}/content", {}, 404, "not_found", "video_id"),
    ("events of unknown id", "GET", f"/v1/videos/{UNKNOWN}/events", {}, 404, "not_found", "video_id"),
    (
        "remix of unknown id",
        "POST",
        f"/v1/videos/{UNKNOWN}/remix",
        {"json": {"prompt": "x"}},
        404,
        "not_found",
        "video_id",
    ),  # noqa: E501
    ("list limit too large", "GET", "/v1/videos?limit=1000", {}, 400, "invalid_value", "limit"),
    ("list limit not a number", "GET", "/v1/videos?limit=ten", {}, 400, "invalid_type", "limit"),
    ("list unknown status", "GET", "/v1/videos?status=done", {}, 400, "invalid_value", "status"),
    (
        "storyboard without shots",
        "POST",
        "/v1/storyboards",
        {"json": {"shots": []}},
        400,
        "invalid_value",
        "shots",
    ),
    (
        "storyboard shot without prompt",
        "POST",
        "/v1/storyboards",
        {"json": {"shots": [GOOD, TINY]}},
        400,
        "missing_field",
        "shots.1.prompt",
    ),  # noqa: E501
    (
        "storyboard unknown grid field",
        "POST",
        "/v1/storyboards",
        {"json": {"shots": [GOOD], "variants": {"grid": {"lens": ["35mm"]}}}},
        400,
        "invalid_value",
        "variants.grid.lens",
    ),  # noqa: E501
    (
        "storyboard zero seeds",
        "POST",
        "/v1/storyboards",
        {"json": {"shots": [GOOD], "variants": {"seeds": 0}}},
        400,
        "invalid_value",
        "variants",
    ),  # noqa: E501
    (
        "storyboard too many videos",
        "POST",
        "/v1/storyboards",
        {"json": {"shots": [GOOD] * 20, "variants": {"seeds": 16}}},
        400,
        "too_many_videos",
        "variants",
    ),  # noqa: E501
    (
        "storyboard malformed JSON",
        "POST",
        "/v1/storyboards",
        {"content": b"{", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        None,
    ),  # noqa: E501
    (
        "unknown storyboard",
        "GET",
        "/v1/storyboards/sb_000000000000000000000000",
        {},
        404,
        "not_found",
        "storyboard_id",
    ),  # noqa: E501
    ("unknown route", "GET", "/v1/nothing-here", {}, 404, "not_found", None),
    ("wrong method", "PUT", "/v1/videos", {}, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_its_status_code_and_field(
    api: LocalApi, method: str, path: str, kwargs: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    response = api.client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message", "param"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"]
    assert api.store.list() == []  # nothing was queued


def test_state_bound_errors_name_the_video(api: LocalApi) -> None:
    video = create(api)
    not_ready = api.client.get(f"/v1/videos/{video['id']}/content")
    assert (not_ready.status_code, not_ready.json()["error"]["code"]) == (409, "video_not_ready")
    sprites = api.client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"})
    assert (sprites.status_code, sprites.json()["error"]["param"]) == (400, "variant")
    assert "'video' or 'thumbnail'" in sprites.json()["error"]["message"]
    no_prompt = api.client.post(f"/v1/videos/{video['id']}/remix", json={})
    assert (no_prompt.status_code, no_prompt.json()["error"]["code"]) == (400, "missing_field")
    assert api.client.delete(f"/v1/videos/{video['id']}").status_code == 200
    again = api.client.delete(f"/v1/videos/{video['id']}", params={"cancel_only": True})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "already_finished")


def test_not_ready_until_the_replica_is_initialised(api: LocalApi) -> None:
    app.dependency_overrides.pop(current_state)  # as in a replica whose constructor has not run yet
    assert IngressState.current is None
    try:
        response = api.client.get("/v1/videos")
        assert (response.status_code, response.json()["error"]["code"]) == (503, "not_ready")
        assert api.client.get("/readyz").status_code == 503
        created = api.client.post("/v1/videos", json={"prompt": "a storm", **TINY})
        assert (created.status_code, created.json()["error"]["code"]) == (503, "not_ready")
    finally:
        app.dependency_overrides[current_state] = lambda: api.state
    assert api.client.get("/readyz").json() == {"status": "ready"}
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_same_post_twice_with_one_idempotency_key_makes_one_job(api: LocalApi) -> None:
    headers = {"Idempotency-Key": "shot-12A-take-3"}
    body = {**GOOD, "project": "dune"}
    dune = api.client_for("dune")
    first = dune.post("/v1/videos", json=body, headers=headers)
    second = dune.post("/v1/videos", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    assert first.json()["seed"] == second.json()["seed"]
    assert [job.id for job in api.store.list()] == [first.json()["id"]]
    other = dune.post("/v1/videos", json={**body, "prompt": "another shot"}, headers=headers)
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_key_reused")
    elsewhere = api.client_for("heat").post("/v1/videos", json={**body, "project": "heat"}, headers=headers)
    assert elsewhere.status_code == 201  # keys are per project
    assert len(api.store.list()) == 2


def test_full_queue_answers_429_with_retry_after_and_drops_nothing(tmp_path: Path) -> None:
    with local_api(tmp_path, max_queued_jobs=4, max_queued_jobs_per_project=2) as api:
        accepted = [create(api, project="dune")["id"] for _ in range(2)]
        full = api.client_for("dune").post("/v1/videos", json={**GOOD, "project": "dune"})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "project_queue_full"
        accepted += [create(api, project="heat")["id"] for _ in range(2)]
        board = {"project": "noir", "shots": [GOOD], "variants": {"seeds": 1}}
        refused = api.client_for("noir").post("/v1/storyboards", json=board)
        assert refused.status_code == 429 and "Retry-After" in refused.headers  # global bound: 4 queued
        assert refused.json()["error"]["code"] == "queue_full"
        assert sorted(job.id for job in api.store.list()) == sorted(accepted)
        assert all(job.status == JobStatus.QUEUED for job in api.store.list())
        # A retried POST with a known key is answered even when the queue is full.
        api.client_for("dune").delete(f"/v1/videos/{accepted[0]}")
        keyed = api.client.post("/v1/videos", json=GOOD, headers={"Idempotency-Key": "k1"})
        assert keyed.status_code == 201
        replay = api.client.post("/v1/videos", json=GOOD, headers={"Idempotency-Key": "k1"})
        assert (replay.status_code, replay.json()["id"]) == (200, keyed.json()["id"])


def test_a_storyboard_that_does_not_fit_is_refused_whole(tmp_path: Path) -> None:
    with local_api(tmp_path, max_queued_jobs_per_project=5) as api:
        board = {"project": "dune", "shots": [GOOD, GOOD, GOOD], "variants": {"seeds": 2}}
        dune = api.client_for("dune")
        response = dune.post("/v1/storyboards", json=board)
        assert response.status_code == 429, response.text
        assert api.store.list() == []
        board["variants"]["seeds"] = 1
        assert dune.post("/v1/storyboards", json=board).status_code == 201
        assert len(api.store.list()) == 3


def test_storyboard_grid_makes_every_combination_and_groups_them_by_shot(api: LocalApi) -> None:
    board = {
        "project": "dune",
        "title": "chase",
        "priority": "interactive",
        "shots": [
            {"name": "1A", "shot": {"character": "a rider", "action": "gallops"}, **TINY},
            {"name": "1B", "prompt": "dust settles", "seed": 100, **TINY},
        ],
        "variants": {
            "seeds": 1,
            "grid": {"camera": ["dolly-in", "crane up", "handheld"], "look": ["none", "film"]},
        },
        "labels": {"scene": "4"},
    }
    dune = api.client_for("dune")
    response = dune.post("/v1/storyboards", json=board)
    assert response.status_code == 201, response.text
    state = response.json()
    assert (state["num_videos"], state["counts"], state["status"]) == (12, {"queued": 12}, "queued")
    first, second = state["shots"]
    assert [video["grid"] for video in first["videos"]][:2] == [
        {"camera": "dolly-in", "look": "none"},
        {"camera": "dolly-in", "look": "film"},
    ]
    assert {video["seed"] for video in second["videos"]} == {100}
    video = dune.get(first["videos"][1]["url"]).json()
    assert video["prompt"] == "a rider gallops. Camera: dolly-in."
    assert (video["look"], video["priority"], video["labels"], video["storyboard_id"]) == (
        "film",
        "interactive",
        {"scene": "4"},
        state["id"],
    )
    assert dune.get(f"/v1/storyboards/{state['id']}").json() == state


def test_openai_package_wire_format_multipart_create_and_cursor_paging(api: LocalApi) -> None:
    key = api.key_for("noir")
    client = openai.OpenAI(base_url=f"{api.client.base_url}/v1", api_key=key, http_client=api.client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        video = client.videos.create(
            prompt="a detective walks",
            size="96x64",
            seconds="4",
            extra_body={
                "steps": 4,
                "shot": {"camera": "dolly in"},
                "labels": {"take": "2"},
                "project": "noir",
            },
        )
        assert (video.status, video.size, video.seconds, video.prompt) == (
            "queued",
            "96x64",
            "4",
            "Camera: dolly in. a detective walks",
        )
        assert (video.model_extra or {})["labels"] == {"take": "2"}
        for _ in range(4):
            client.videos.create(
                prompt="another take", size="96x64", seconds="0.5", extra_body={"project": "noir"}
            )
        ids = [item.id for item in client.videos.list(limit=2, order="asc", extra_query={"project": "noir"})]
        raw = client.videos.with_raw_response.retrieve(video.id)
        with pytest.raises(openai.BadRequestError) as bad:
            client.videos.create(prompt="x", size="1792x1024", seconds="12")
    assert ids[0] == video.id and len(ids) == 5 and ids == sorted(ids)
    assert raw.headers["openai-poll-after-ms"] == "1000"
    assert bad.value.body == {  # type: ignore[comparison-overlap]
        "code": "invalid_value",
        "message": "`seconds` must be between 0.25 and 10.0 seconds but is 12.0.",
        "param": "seconds",
    }


def test_content_serves_the_mp4_and_its_poster_frame(api: LocalApi) -> None:
    video = create(api)
    finish(api, video["id"])
    done = api.client.get(f"/v1/videos/{video['id']}").json()
    assert (done["status"], done["progress"]) == ("completed", 100) and "openai-poll-after-ms" not in done
    clip = api.client.get(done["content_url"])
    assert clip.headers["content-type"] == "video/mp4" and clip.content.startswith(b"\x00\x00\x00\x18ftyp")
    poster = api.client.get(done["thumbnail_url"])
    assert poster.headers["content-type"] == "image/jpeg" and poster.content.startswith(b"\xff\xd8\xff")


def test_remix_keeps_seed_and_settings_with_a_new_prompt(api: LocalApi) -> None:
    video = create(api, seed=42, look="film", upscale="720p", project="noir", labels={"take": 1})
    noir = api.client_for("noir")
    remix = noir.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "what if he wore a blue coat"})
    assert remix.status_code == 201
    remix = remix.json()
    kept = ("seed", "size", "seconds", "steps", "look", "upscale", "project", "labels", "num_frames")
    assert {key: remix[key] for key in kept} == {key: video[key] for key in kept}
    assert (remix["prompt"], remix["remixed_from_video_id"]) == ("what if he wore a blue coat", video["id"])


def test_events_stream_the_log_and_step_progress_until_done(api: LocalApi) -> None:
    video = create(api)

    frames: list[tuple[str | None, int | None, dict]] = []

    def streamed(kind: str, **data: object) -> None:
        """Wait until the stream has sent a `kind` event with `data` (the stream polls the store: a step
        the writer overtook before a poll would not be streamed at all)."""
        deadline = time.monotonic() + 120
        while not any(k == kind and data.items() <= d.items() for k, _, d in list(frames)):
            assert time.monotonic() < deadline, f"the stream never sent {kind} {data}: {frames}"
            time.sleep(0.02)

    missed: list[AssertionError] = []

    def run_the_job() -> None:
        streamed("created")
        job = api.store.claim(video["id"], "test-scheduler")
        try:
            for step in range(1, 5):
                api.store.advance(job.id, job.attempt, JobStatus.DENOISING_HIGH, stage_progress=step / 4)
                streamed("status", stage="denoising_high", stage_progress=step / 4)
        except AssertionError as error:
            missed.append(error)
        finally:  # the stream ends with the job
            api.store.succeed(job.id, job.attempt, artifact_uri="dune/x/clip-a1.mp4", artifact_bytes=1)

    runner = threading.Thread(target=run_the_job)
    runner.start()
    with api.client.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = event_id = None
        for line in stream.iter_lines():
            if line.startswith("id: "):
                event_id = int(line.removeprefix("id: "))
            elif line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                frames.append((kind, event_id, json.loads(line.removeprefix("data: "))))
                event_id = None
    runner.join()
    assert not missed, missed
    kinds = [kind for kind, _, _ in frames]
    assert kinds[0] == "created" and kinds[-1] == "done" and "claimed" in kinds and "succeeded" in kinds
    steps = [
        data["stage_progress"]
        for kind, _, data in frames
        if kind == "status" and data["stage"] == "denoising_high"
    ]
    assert list(dict.fromkeys(steps)) == [0.25, 0.5, 0.75, 1.0] and steps == sorted(steps)  # each step once
    assert frames[-1][2]["status"] == "completed"
    # Resuming after an event id replays only what came after it.
    created_id = frames[0][1]
    resumed = api.client.get(f"/v1/videos/{video['id']}/events", headers={"Last-Event-ID": str(created_id)})
    assert "event: created" not in resumed.text and "event: succeeded" in resumed.text


def test_openapi_documents_the_studio_extensions(api: LocalApi) -> None:
    schema = api.client.get("/openapi.json").json()
    create_schema = schema["components"]["schemas"]["VideoCreate"]["properties"]
    for field in (
        "prompt",
        "model",
        "seconds",
        "size",
        "negative_prompt",
        "seed",
        "steps",
        "resolution",
        "aspect",
    ):
        assert field in create_schema
    for field in ("upscale", "look", "priority", "shot", "labels", "callback_url", "project"):
        assert create_schema[field].get("description"), field
    post = schema["paths"]["/v1/videos"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert any(parameter["name"] == "Idempotency-Key" for parameter in post["parameters"])
    assert "/v1/storyboards" in schema["paths"] and "/v1/videos/{video_id}/events" in schema["paths"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert api.client.get("/docs").status_code == 200
    assert app.openapi() is app.openapi()


class StuckStage:
    """Every stage call of this stand-in hangs until cancelled: jobs stay in flight as long as we like."""

    def options(self, **_options: Any) -> StuckStage:  # `stage.options(stream=True).method.remote(...)`
        return self

    def __getattr__(self, _method: str) -> Any:
        class _Call:
            @staticmethod
            def remote(*_args: Any, **_kwargs: Any) -> Any:
                return Hanging()

        return _Call


class Hanging:
    """A stage call that never answers, awaited or streamed."""

    def __await__(self) -> Any:
        return asyncio.Event().wait().__await__()

    def __aiter__(self) -> Hanging:
        return self

    async def __anext__(self) -> Any:
        await asyncio.Event().wait()

    def cancel(self) -> None:
        pass


class InProcessHandle:
    """`handle.method.remote(...)` of a Serve handle, run on this event loop against a local object."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        class _Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                return asyncio.get_running_loop().create_task(method(*args))

        return _Method()


def test_cancel_frees_the_slot_and_the_next_queued_job_starts(tmp_path: Path) -> None:
    async def scenario() -> None:
        args = PrevizArgs(
            envelope={"min_pixels": 64 * 64},
            database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
            storage={"kind": "local", "local_root": str(tmp_path / "artifacts")},
            max_jobs_in_flight=1,
            poll_interval_s=0.05,
        )
        stages = [StuckStage()] * 7  # Housekeeping and the six stages
        scheduler = Scheduler(args, args.sampling, *stages)
        state = IngressState(args, args.sampling, InProcessHandle(scheduler))
        app.dependency_overrides[current_state] = lambda: state
        transport = httpx.ASGITransport(app=app)
        key = state.store.ensure_default_project("default")
        try:
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://previz", headers=headers
            ) as http:
                first, second = [(await http.post("/v1/videos", json=GOOD)).json()["id"] for _ in range(2)]
                await wait_until(lambda: state.store.get(first).status == JobStatus.ENCODING)
                await asyncio.sleep(0.5)  # several scheduling passes: the one slot stays taken
                assert state.store.get(second).status == JobStatus.QUEUED
                assert (await http.delete(f"/v1/videos/{first}")).status_code == 200
                await wait_until(lambda: state.store.get(second).status == JobStatus.ENCODING)
                assert await scheduler.in_flight() == [second]
                assert state.store.get(first).status == JobStatus.CANCELLED
        finally:
            scheduler._loop_task.cancel()
            app.dependency_overrides.pop(current_state)

    asyncio.run(scenario())


async def wait_until(condition: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)

"""Regression tests from the hostile pass: the model's size envelope, one text policy for every stored string,
bodies refused before they are read, strict types, honest cursors, and the root and models routes."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from serve.http.limits import body_limit
from tests.support.api_app import TINY, LocalApi, finish, http_server, local_api

GOOD = {"prompt": "a lighthouse in a storm", **TINY}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


@pytest.fixture
def studio_api(tmp_path: Path) -> Iterator[LocalApi]:
    """The API with the default envelope (Wan2.2's sizes), not the tests' tiny one."""
    with local_api(tmp_path, envelope={}) as running:
        yield running


def refusal(response: httpx.Response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["param"]


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"size": "1920x1920"}, "outside_envelope", "size"),
        ({"size": "1920x1088"}, "outside_envelope", "size"),
        ({"size": "32x32"}, "outside_envelope", "size"),
        ({"resolution": "128x128"}, "outside_envelope", "resolution"),
        ({"size": "1280x720", "upscale": "720p"}, "upscale_not_enlarging", "upscale"),
        ({"size": "1280x720", "upscale": "1080p", "seconds": "0.5"}, None, None),
        ({"size": "832x480", "upscale": "720p", "seconds": "0.5"}, None, None),
        ({"resolution": "720p", "aspect": "9:16", "seconds": "0.5"}, None, None),
        ({"size": "512x512", "seconds": "10"}, None, None),
    ],
    ids=repr,
)
def test_sizes_outside_the_models_envelope_are_refused(
    studio_api: LocalApi, fields: dict[str, Any], code: str | None, param: str | None
) -> None:
    response = studio_api.client.post("/v1/videos", json={"prompt": "a lighthouse", "steps": 4, **fields})
    if code is None:
        assert response.status_code == 201, response.text
    else:
        assert refusal(response) == (400, code, param)
        assert studio_api.store.list(limit=5) == []


def test_the_envelope_is_in_the_models_list(studio_api: LocalApi) -> None:
    (model,) = studio_api.client.get("/v1/models").json()["data"]
    assert model["id"] == "wan2.2-t2v-a14b" and model["presets"] == {"480p": "832x480", "720p": "1280x720"}
    assert model["envelope"] == {"min_pixels": 65536, "max_pixels": 921600, "max_frames": 161}


@pytest.mark.parametrize("character", ["\x00", "\x07", "\x1b", "\x7f", "\x85"], ids=repr)
def test_control_characters_are_refused_in_every_stored_string(api: LocalApi, character: str) -> None:
    source = api.client.post("/v1/videos", json=GOOD).json()["id"]
    bad = f"a storm{character}at sea"
    cases = [
        ("/v1/videos", {**GOOD, "prompt": bad}, "prompt"),
        ("/v1/videos", {**GOOD, "labels": {bad: "x"}}, "labels"),
        ("/v1/videos", {**GOOD, "labels": {"take": bad}}, "labels.take"),
        (f"/v1/videos/{source}/remix", {"prompt": bad}, "prompt"),
        ("/v1/storyboards", {"title": bad, "shots": [GOOD]}, "title"),
        ("/v1/storyboards", {"shots": [{**GOOD, "prompt": bad}]}, "shots.0.prompt"),
        ("/v1/storyboards", {"shots": [{**GOOD, "shot": {"action": bad}}]}, "shots.0.shot.action"),
    ]
    for path, body, param in cases:
        response = api.client.post(path, json=body)
        assert refusal(response) == (400, "invalid_value", param), (path, response.text)
        assert f"U+{ord(character):04X}" in response.json()["error"]["message"]
    assert len(api.store.list(limit=10)) == 1  # only the source video exists


def test_tabs_and_line_breaks_are_text(api: LocalApi) -> None:
    assert api.client.post("/v1/videos", json={**GOOD, "prompt": "a storm\n\tat sea\r\n"}).status_code == 201


def test_a_body_declared_too_large_is_refused_before_it_is_read(api: LocalApi) -> None:
    with http_server() as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        with socket.create_connection((host, port), timeout=30) as connection:
            head = (
                "POST /v1/videos HTTP/1.1\r\nHost: previz\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {api.admin_key}\r\nContent-Length: {50 << 20}\r\n\r\n"
            )
            connection.sendall(head.encode() + b'{"prompt": "')  # 12 of the 52,428,800 bytes announced
            answer = connection.recv(65536).decode()  # the answer comes without the rest being sent
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"request_too_large"' in answer and "52,428,800 bytes" in answer


def test_a_streamed_body_is_cut_off_at_the_limit(api: LocalApi) -> None:
    limit = body_limit("POST", "/v1/videos", "application/json")
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = b" " * (256 << 10)
        for _ in range(2 * limit // len(chunk)):  # twice the route's limit, without a Content-Length
            sent += len(chunk)
            yield chunk

    headers = {"Authorization": f"Bearer {api.admin_key}"}
    with http_server() as url, httpx.Client(base_url=url, headers=headers) as client:
        try:
            response = client.post("/v1/videos", content=body(), headers={"Content-Type": "application/json"})
        except httpx.HTTPError:  # the server answered and closed while the client was still sending
            response = None
    if response is not None:
        assert refusal(response) == (413, "request_too_large", None)
    assert sent < 2 * limit and api.store.list(limit=5) == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seconds": True}, "seconds"),
        ({"steps": True}, "steps"),
        ({"steps": 4.5}, "steps"),
        ({"seed": "7"}, "seed"),
        ({"label": 0}, "label"),
        ({"duration": "1", "seconds": None}, "duration"),
        ({"size": "٩٦x٦٤"}, "size"),
        ({"size": "９６x６４"}, "size"),
    ],
    ids=repr,
)
def test_strict_types_refuse_what_only_looks_like_the_type(
    api: LocalApi, fields: dict[str, Any], param: str
) -> None:
    body = {key: value for key, value in {**GOOD, **fields}.items() if value is not None}
    status, _code, got = refusal(api.client.post("/v1/videos", json=body))
    assert (status, got) == (400, param)


def test_a_whole_number_written_with_a_fraction_is_the_whole_number(api: LocalApi) -> None:
    # JSON Schema's `integer` (what the OpenAPI publishes) holds 4.0; JSON parsers read it as a float
    response = api.client.post(
        "/v1/videos", json={**GOOD, "steps": 4.0, "seed": 7.0, "labels": {"take": 3.0}}
    )
    assert response.status_code == 201, response.text
    video = response.json()
    assert (video["steps"], video["seed"], video["labels"]) == (4, 7, {"take": 3})
    assert type(video["steps"]) is int and type(video["labels"]["take"]) is int


def test_a_label_of_the_wrong_type_says_what_a_label_may_be(api: LocalApi) -> None:
    response = api.client.post("/v1/videos", json={**GOOD, "labels": {"a": 1.5}})
    assert refusal(response) == (400, "invalid_type", "labels.a")
    assert (
        "a label value is text, a whole number or true/false, not float 1.5"
        in response.json()["error"]["message"]
    )


def test_a_form_still_sends_numbers_as_text(api: LocalApi) -> None:
    form = {
        "prompt": "a storm",
        "size": "96x64",
        "seconds": "0.5",
        "steps": "4",
        "seed": "7",
        "label": "true",
    }
    created = api.client.post("/v1/videos", data=form)
    assert created.status_code == 201, created.text
    assert (created.json()["steps"], created.json()["seed"]) == (4, 7)


def test_burn_label_must_be_a_boolean(api: LocalApi) -> None:
    response = api.client.patch("/v1/admin/projects/default", json={"burn_label": 0})
    assert refusal(response)[:2] == (400, "invalid_type")


@pytest.mark.parametrize("after", ["bogus", "vid_000000000000000000000000"])
def test_a_cursor_that_is_not_one_of_the_projects_videos_is_refused(api: LocalApi, after: str) -> None:
    api.client.post("/v1/videos", json=GOOD)
    response = api.client.get("/v1/videos", params={"after": after})
    assert refusal(response) == (400, "invalid_cursor", "after")


def test_a_real_cursor_pages_on(api: LocalApi) -> None:
    first, second = (api.client.post("/v1/videos", json=GOOD).json()["id"] for _ in range(2))
    page = api.client.get("/v1/videos", params={"after": second, "limit": 1}).json()
    assert [video["id"] for video in page["data"]] == [first]


def test_the_root_points_at_the_docs(api: LocalApi) -> None:
    response = api.client.get("/")
    assert response.status_code == 200 and response.json()["docs"] == "/docs"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_nothing_from_outside_the_cluster(api: LocalApi, page: str) -> None:
    html = api.client.get(page).text
    sources = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert sources and all(source.startswith("/") for source in sources), sources
    for source in sources:
        assert api.client.get(source).status_code == 200, source


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/videos/vid_x", "DELETE, GET"),
        ("PATCH", "/v1/videos", "GET, POST"),
        ("DELETE", "/v1/admin/projects/p", "GET, PATCH"),
    ],
)
def test_a_method_not_allowed_names_every_allowed_method(
    api: LocalApi, method: str, path: str, allowed: str
) -> None:
    response = api.client.request(method, path)
    assert refusal(response) == (405, "method_not_allowed", None)
    assert response.headers["allow"] == allowed


def test_an_unknown_query_parameter_is_refused_by_name(api: LocalApi) -> None:
    response = api.client.get("/v1/videos", params={"limt": 5})
    assert refusal(response) == (400, "unknown_parameter", "limt")
    assert "`limit`" in response.json()["error"]["message"]
    assert api.client.get("/v1/videos", params={"limit": 5}).status_code == 200


def test_a_form_may_send_an_object_as_one_json_part_and_null_as_text(api: LocalApi) -> None:
    fields = {"shot": '{"character": "a diver", "camera": "underwater"}', "size": "96x64", "seconds": "0.5"}
    fields |= {"steps": "4", "seed": "null", "labels": '{"take": 2}', "prompt": "null"}
    response = api.client.post("/v1/videos", files={name: (None, value) for name, value in fields.items()})
    assert response.status_code == 201, response.text
    video = response.json()
    assert video["prompt"] == "a diver, in underwater. null" or video["prompt"].endswith(" null")
    assert video["labels"] == {"take": 2} and isinstance(video["seed"], int)


def finished_video(api: LocalApi) -> dict[str, Any]:
    video = api.client.post("/v1/videos", json=GOOD).json()
    finish(api, video["id"])
    return api.client.get(f"/v1/videos/{video['id']}").json()


def assert_deleted(api: LocalApi, video: dict[str, Any]) -> None:
    job = api.store.get(video["id"])
    keys = (job.artifact_uri, job.poster_uri)
    assert all(api.state.artifacts.exists(key) for key in keys)
    response = api.client.delete(f"/v1/videos/{video['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": video["id"],
        "object": "video.deleted",
        "deleted": True,
        "status": "completed",
    }
    assert not any(api.state.artifacts.exists(key) for key in keys)  # gone from the store
    for path in (f"/v1/videos/{video['id']}", f"/v1/videos/{video['id']}/content"):
        assert refusal(api.client.get(path))[:2] == (404, "not_found")
    assert video["id"] not in [listed["id"] for listed in api.client.get("/v1/videos").json()["data"]]
    assert refusal(api.client.delete(f"/v1/videos/{video['id']}"))[:2] == (404, "not_found")


def test_deleting_a_finished_video_removes_its_clip_and_poster_locally(api: LocalApi) -> None:
    assert_deleted(api, finished_video(api))


def test_deleting_a_finished_video_removes_its_clip_and_poster_from_s3(
    tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = s3_server.fresh_storage("delete")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    with local_api(tmp_path, storage=storage) as s3_api:
        assert_deleted(s3_api, finished_video(s3_api))


def test_cancel_only_leaves_a_finished_video_alone(api: LocalApi) -> None:
    video = finished_video(api)
    response = api.client.delete(f"/v1/videos/{video['id']}", params={"cancel_only": True})
    assert refusal(response) == (409, "already_finished", "video_id")
    assert api.client.get(f"/v1/videos/{video['id']}/content", follow_redirects=False).status_code == 307


def test_a_queued_video_shows_how_many_are_ahead_of_it(api: LocalApi) -> None:
    batch = [api.client.post("/v1/videos", json=GOOD).json()["id"] for _ in range(3)]
    urgent = api.client.post("/v1/videos", json={**GOOD, "priority": "interactive"}).json()["id"]
    positions = [api.client.get(f"/v1/videos/{video_id}").json()["queue_position"] for video_id in batch]
    assert positions == [1, 2, 3]  # the interactive one goes first
    assert api.client.get(f"/v1/videos/{urgent}").json()["queue_position"] == 0
    finish(api, batch[0])
    assert api.client.get(f"/v1/videos/{batch[0]}").json()["queue_position"] is None
    assert api.client.get(f"/v1/videos/{batch[2]}").json()["queue_position"] == 2

"""`POST /v1/videos` with an image: the shapes the official `openai` package sends for `input_reference`,
the model it routes to, the keyframes stored with the job, and every refusal a 400 with its code that
leaves the job count and the artifact store as they were."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from pipeline.weights import build_preset, wan_pipeline
from serve.jobs.keyframes import fit_to_size, load_keyframes, save_last_frame
from serve.jobs.request import I2V_MODEL, SERVED_MODEL
from tests.support.api_app import TINY, LocalApi, finish, local_api
from tests.test_images import encoded, png_header_only

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
WIDTH, HEIGHT = 96, 64  # TINY's size


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    frame_check = {"frame_check": "tests.support.safety_hooks:block_bright_frames"}
    with local_api(tmp_path, safety=frame_check, i2v={"model": "tiny-i2v"}) as running:
        yield running


def panel(colour: tuple[int, int, int] = (40, 60, 90), size: tuple[int, int] = (300, 200)) -> Image.Image:
    """A dark panel (the test frame check blocks bright ones) with a white mark left of centre."""
    image = Image.new("RGB", size, colour)
    image.paste((250, 250, 250), (size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2))
    return image


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(encoded(image)).decode()


def stored_files(api: LocalApi) -> list[str]:
    return sorted(
        str(path.relative_to(api.artifacts_root))
        for path in api.artifacts_root.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    )


def num_jobs(api: LocalApi) -> int:
    return len(api.store.list(limit=100))


def first_keyframe(api: LocalApi, video_id: str) -> np.ndarray:
    job = api.store.get(video_id)
    assert job is not None
    first, _last = load_keyframes(api.state.artifacts, job.project, job.id)
    assert first is not None
    return first


def test_the_openai_sdk_uploads_a_panel_and_the_job_runs_on_the_i2v_model(
    api: LocalApi, tmp_path: Path
) -> None:
    path = tmp_path / "panel.png"
    panel().save(path)
    client = OpenAI(base_url="http://testserver/v1", api_key=api.admin_key, http_client=api.client)
    with path.open("rb") as file:
        video = client.videos.create(
            prompt="the hero leaps out of the fireball, slow motion",
            input_reference=file,
            size=f"{WIDTH}x{HEIGHT}",  # type: ignore[arg-type]  # Sora's sizes are typed; any WxH is sent
            seconds="0.5",  # type: ignore[arg-type]
            extra_body={"steps": 4},
        )
    assert video.status == "queued" and video.model == I2V_MODEL
    job = api.store.get(video.id)
    assert job is not None and job.request.model == I2V_MODEL
    assert job.request.keyframes is not None and job.request.keyframes.first is not None
    assert job.request.keyframes.first.kind == "image" and job.request.keyframes.last is None
    expected = np.asarray(fit_to_size(Image.open(path), WIDTH, HEIGHT))
    np.testing.assert_array_equal(first_keyframe(api, video.id), expected)


def test_an_image_url_data_url_as_json_and_as_bracketed_form_parts(api: LocalApi) -> None:
    # the installed openai package's videos.create refuses a dict client-side (its extract_files wants a
    # file at `input_reference`), so the object shape arrives as JSON, or as a form in its bracket notation
    url = data_url(panel())
    as_json = api.client.post(
        "/v1/videos", json={"prompt": "a panel", **TINY, "input_reference": {"image_url": url}}
    )
    assert as_json.status_code == 201, as_json.text
    form = {"prompt": "a panel", "size": "96x64", "seconds": "0.5", "input_reference[image_url]": url}
    as_form = api.client.post("/v1/videos", data=form)
    assert as_form.status_code == 201, as_form.text
    assert as_form.json()["model"] == I2V_MODEL
    np.testing.assert_array_equal(
        first_keyframe(api, as_json.json()["id"]), first_keyframe(api, as_form.json()["id"])
    )


def test_the_fit_rule_scales_to_cover_and_crops_the_centre(api: LocalApi) -> None:
    tall = panel(size=(100, 400))
    response = api.client.post(
        "/v1/videos", json={"prompt": "p", **TINY, "input_reference": {"image_url": data_url(tall)}}
    )
    assert response.status_code == 201, response.text
    # 100x400 covers 96x64 at 96x384: the middle 64 rows of that are kept
    expected = np.asarray(tall.resize((96, 384), Image.Resampling.LANCZOS))[160:224]
    assert np.abs(first_keyframe(api, response.json()["id"]).astype(int) - expected).max() <= 1


def test_a_file_id_names_a_finished_take_whose_last_frame_is_the_keyframe(api: LocalApi) -> None:
    take = api.client.post("/v1/videos", json={"prompt": "the take before", **TINY}).json()
    finish(api, take["id"])
    last = np.random.default_rng(1).integers(0, 120, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    save_last_frame(api.state.artifacts, "default", take["id"], last)
    response = api.client.post(
        "/v1/videos", json={"prompt": "and then", **TINY, "input_reference": {"file_id": take["id"]}}
    )
    assert response.status_code == 201, response.text
    job = api.store.get(response.json()["id"])
    assert job is not None and job.request.keyframes is not None and job.request.keyframes.first is not None
    assert job.request.keyframes.first.kind == "take" and job.request.keyframes.first.video == take["id"]
    np.testing.assert_array_equal(first_keyframe(api, job.id), last)


def test_keyframes_first_and_last_are_both_stored(api: LocalApi) -> None:
    first, last = panel((10, 20, 30)), panel((30, 20, 10))
    body = {"prompt": "p", **TINY, "keyframes": {"first": data_url(first), "last": data_url(last)}}
    response = api.client.post("/v1/videos", json=body)
    assert response.status_code == 201, response.text
    stored_first, stored_last = load_keyframes(api.state.artifacts, "default", response.json()["id"])
    assert stored_first is not None and stored_last is not None
    np.testing.assert_array_equal(stored_last, np.asarray(fit_to_size(last, WIDTH, HEIGHT)))


def test_a_remix_of_an_i2v_take_starts_from_the_same_image(api: LocalApi) -> None:
    body = {"prompt": "p", **TINY, "input_reference": {"image_url": data_url(panel())}}
    source = api.client.post("/v1/videos", json=body).json()
    remix = api.client.post(f"/v1/videos/{source['id']}/remix", json={"prompt": "in the rain"})
    assert remix.status_code == 201, remix.text
    assert remix.json()["model"] == I2V_MODEL
    np.testing.assert_array_equal(first_keyframe(api, remix.json()["id"]), first_keyframe(api, source["id"]))


def test_a_replayed_idempotent_create_stores_no_second_copy(api: LocalApi) -> None:
    body = {"prompt": "p", **TINY, "input_reference": {"image_url": data_url(panel())}}
    headers = {"Idempotency-Key": "panel-1"}
    first = api.client.post("/v1/videos", json=body, headers=headers)
    files = stored_files(api)
    again = api.client.post("/v1/videos", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert stored_files(api) == files and len(files) == 1


def test_text_alone_still_runs_on_the_t2v_model(api: LocalApi) -> None:
    response = api.client.post("/v1/videos", json={"prompt": "p", **TINY})
    assert response.json()["model"] == SERVED_MODEL


def _animated() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((10, 10, 10), (20, 20, 20))]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])


def _cmyk_is_fine() -> bytes:
    return encoded(Image.new("CMYK", (32, 32), (0, 0, 0, 200)), "JPEG")


# (name, input_reference as sent: bytes for an upload, else JSON, error code, param)
BAD_IMAGES: list[tuple[str, Any, str, str]] = [
    ("not an image", b"this is a text file", "invalid_image", "input_reference"),
    ("over the byte bound", b"\x89PNG" + b"\0" * (8 << 20), "image_too_large", "input_reference"),
    ("over the pixel bound", png_header_only(5000, 4000), "image_too_large", "input_reference"),
    ("decompression bomb", png_header_only(30000, 30000), "decompression_bomb", "input_reference"),
    ("animated", _animated(), "animated_image", "input_reference"),
    (
        "http url",
        {"image_url": "https://example.com/panel.png"},
        "image_url_not_allowed",
        "input_reference.image_url",
    ),
    ("not a data url", {"image_url": "panel.png"}, "invalid_data_url", "input_reference.image_url"),
    (
        "unknown file id",
        {"file_id": "vid_000000000000000000000000"},
        "invalid_take_reference",
        "input_reference",
    ),
]


@pytest.mark.parametrize(("name", "reference", "code", "param"), BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_a_bad_image_is_a_400_with_its_code_and_nothing_is_stored(
    api: LocalApi, name: str, reference: Any, code: str, param: str
) -> None:
    before = num_jobs(api)
    if isinstance(reference, bytes):
        response = api.client.post(
            "/v1/videos",
            data={"prompt": "p", "size": "96x64", "seconds": "0.5"},
            files={"input_reference": ("panel.png", reference, "image/png")},
        )
    else:
        response = api.client.post("/v1/videos", json={"prompt": "p", **TINY, "input_reference": reference})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert num_jobs(api) == before and stored_files(api) == []


def test_a_cmyk_jpeg_is_converted_not_refused(api: LocalApi) -> None:
    response = api.client.post(
        "/v1/videos",
        data={"prompt": "p", "size": "96x64", "seconds": "0.5"},
        files={"input_reference": ("panel.jpg", _cmyk_is_fine(), "image/jpeg")},
    )
    assert response.status_code == 201, response.text


def test_an_explicit_t2v_model_with_an_image_is_a_400(api: LocalApi) -> None:
    body = {"prompt": "p", **TINY, "model": SERVED_MODEL, "input_reference": {"image_url": data_url(panel())}}
    response = api.client.post("/v1/videos", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "keyframes_not_supported"
    assert num_jobs(api) == 0 and stored_files(api) == []


def test_keyframes_on_the_t2v_model_are_a_400(api: LocalApi) -> None:
    body = {"prompt": "p", **TINY, "model": "wan2.2", "keyframes": {"first": data_url(panel())}}
    response = api.client.post("/v1/videos", json=body)
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == (
        400,
        "keyframes_not_supported",
        "keyframes.first",
    )


def test_the_i2v_model_without_an_image_is_a_400(api: LocalApi) -> None:
    response = api.client.post("/v1/videos", json={"prompt": "p", **TINY, "model": I2V_MODEL})
    assert response.status_code == 400 and response.json()["error"]["code"] == "keyframe_required"
    assert num_jobs(api) == 0


def test_a_take_reference_to_another_projects_video_is_a_400(api: LocalApi) -> None:
    theirs = api.client_for("other").post("/v1/videos", json={"prompt": "theirs", **TINY}).json()
    finish(api, theirs["id"])
    save_last_frame(api.state.artifacts, "other", theirs["id"], np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    body = {"prompt": "p", **TINY, "keyframes": {"first": {"video": theirs["id"]}}}
    response = api.client.post("/v1/videos", json=body)
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) == (
        400,
        "invalid_take_reference",
        "keyframes.first",
    )


def test_a_take_reference_to_an_unfinished_take_is_a_400(api: LocalApi) -> None:
    queued = api.client.post("/v1/videos", json={"prompt": "still queued", **TINY}).json()
    before = num_jobs(api)
    body = {"prompt": "p", **TINY, "input_reference": {"file_id": queued["id"]}}
    response = api.client.post("/v1/videos", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "take_not_finished"
    assert num_jobs(api) == before


def test_the_frame_check_sees_the_image_before_any_job_exists(api: LocalApi) -> None:
    bright = Image.new("RGB", (64, 64), (250, 250, 250))
    body = {"prompt": "p", **TINY, "input_reference": {"image_url": data_url(bright)}}
    response = api.client.post("/v1/videos", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["category"], error["param"]) == (
        "content_blocked",
        "sexual_explicit",
        "input_reference",
    )
    assert num_jobs(api) == 0 and stored_files(api) == []


def test_input_reference_and_keyframes_first_together_are_a_400(api: LocalApi) -> None:
    url = data_url(panel())
    body = {"prompt": "p", **TINY, "input_reference": {"image_url": url}, "keyframes": {"first": url}}
    response = api.client.post("/v1/videos", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "keyframes.first"


def test_the_api_docs_state_the_rules(api: LocalApi) -> None:
    document = api.client.get("/openapi.json").json()
    bad_input = json.dumps(document["paths"]["/v1/videos"]["post"]["responses"]["400"])
    for code in ("image_url_not_allowed", "decompression_bomb", "animated_image", "keyframes_not_supported"):
        assert code in bad_input
    reference = document["components"]["schemas"]["VideoCreate"]["properties"]["input_reference"]
    assert "http(s) URL is refused" in reference["description"]


def test_the_keyframes_route_links_the_stored_panel_in_any_state(api: LocalApi) -> None:
    body = {"prompt": "p", **TINY, "input_reference": {"image_url": data_url(panel())}}
    video = api.client.post("/v1/videos", json=body).json()
    links = api.client.get(f"/v1/videos/{video['id']}/keyframes")
    assert links.status_code == 200, links.text
    assert links.json()["last"] is None and links.json()["first_from"] is None
    png = api.client.get(links.json()["first"])
    assert png.status_code == 200
    stored = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
    np.testing.assert_array_equal(stored, first_keyframe(api, video["id"]))
    text_only = api.client.post("/v1/videos", json={"prompt": "p", **TINY}).json()
    assert api.client.get(f"/v1/videos/{text_only['id']}/keyframes").json()["first"] is None


def test_an_image_on_a_deployment_without_the_i2v_model_is_a_400(tmp_path: Path) -> None:
    with local_api(tmp_path) as text_only:
        body = {"prompt": "p", **TINY, "input_reference": {"image_url": data_url(panel())}}
        response = text_only.client.post("/v1/videos", json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_served"
        assert num_jobs(text_only) == 0 and stored_files(text_only) == []


def test_a_step_cache_on_i2v_weights_without_a_curve_is_a_400(tmp_path: Path) -> None:
    """Real I2V weights (a Diffusers folder, here the tiny preset saved as one) have no step-cache curve:
    `cache` is refused at admission, and the models list says the model serves no step cache."""
    folder = tmp_path / "wan-i2v"
    wan_pipeline(build_preset("tiny-i2v")).save_pretrained(folder, safe_serialization=True)
    with local_api(tmp_path, i2v={"model": str(folder)}) as real:
        body = {
            "prompt": "p",
            **TINY,
            "quality": "final",
            "input_reference": {"image_url": data_url(panel())},
        }
        response = real.client.post("/v1/videos", json={**body, "cache": {"threshold": 0.1}})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("step_cache_not_supported", "cache")
        assert "cache: null" in error["message"]
        assert num_jobs(real) == 0 and stored_files(real) == []
        assert real.client.post("/v1/videos", json={**body, "cache": None}).status_code == 201
        models = {model["id"]: model for model in real.client.get("/v1/models").json()["data"]}
        assert [expert["step_cache"] for expert in models[I2V_MODEL]["experts"].values()] == [False, False]
        assert [expert["step_cache"] for expert in models[SERVED_MODEL]["experts"].values()] == [True, True]


def test_a_step_cache_on_the_i2v_preset_is_admitted(api: LocalApi) -> None:
    body = {"prompt": "p", **TINY, "quality": "final", "input_reference": {"image_url": data_url(panel())}}
    response = api.client.post("/v1/videos", json={**body, "cache": {"threshold": 0.1}})
    assert response.status_code == 201, response.text

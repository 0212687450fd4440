"""The compiled prompt through the API (issue 28): a Chinese shot sends Chinese connectives, the compiler
version is stored with each job, and a promote of a take compiled by an older version sends that take's
stored text again (a remix always brings its own new prompt or shot)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from pipeline.prompt import PROMPT_COMPILER_VERSION, ShotSpec
from serve.jobs.request import JobRequest
from serve.jobs.schema import jobs
from tests.support.api_app import TINY, LocalApi, local_api

CHINESE_SHOT = {
    "人物": "一个穿黑色风衣的男人",
    "动作": "从塔上跃下",
    "环境": "夜晚燃烧的炼油厂",
    "镜头": "低角度慢动作",
}
ENGLISH_GLUE = re.compile(r"\b(in|In|Camera|Style)\b|[,.:]")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def test_a_chinese_shot_is_compiled_with_chinese_connectives_and_its_compiler_version_stored(
    api: LocalApi,
) -> None:
    preview = api.client.post("/v1/prompts/compile", json={"shot": CHINESE_SHOT}).json()
    assert preview["prompt"] == "一个穿黑色风衣的男人从塔上跃下，在夜晚燃烧的炼油厂。镜头：低角度慢动作。"
    video = api.client.post("/v1/videos", json={"shot": CHINESE_SHOT, **TINY}).json()
    assert video["prompt"] == preview["prompt"] and not ENGLISH_GLUE.search(video["prompt"])
    stored = api.store.get(video["id"]).request
    assert stored.source.compiler == PROMPT_COMPILER_VERSION and stored.resolved.prompt == preview["prompt"]


def as_compiled_by_version_1(api: LocalApi, video_id: str) -> str:
    """Rewrite the stored job as the version-1 compiler had made it; its prompt then."""
    request = api.store.get(video_id).request
    old_text = request.source.shot.to_prompt(version=1)
    old = request.model_copy(
        update={
            "spec": request.spec.model_copy(update={"prompt": old_text}),
            "resolved": request.resolved.model_copy(update={"prompt": old_text}),
            "source": request.source.model_copy(update={"compiler": 1}),
        }
    )
    with api.store.db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == video_id).values(request=old.to_stored()))
    return old_text


def test_a_promote_of_a_take_compiled_by_version_1_sends_its_stored_prompt_again(api: LocalApi) -> None:
    draft = api.client.post(
        "/v1/videos", json={"shot": CHINESE_SHOT, **TINY, "quality": "draft", "priority": "interactive"}
    ).json()
    old_text = as_compiled_by_version_1(api, draft["id"])
    assert "Camera:" in old_text
    final = api.client.post(f"/v1/videos/{draft['id']}/promote", json={}).json()
    assert final["prompt"] == old_text and final["quality"] == "final"
    stored = api.store.get(final["id"]).request
    assert (stored.resolved.prompt, stored.source.compiler) == (old_text, 1)
    assert stored.source.shot == ShotSpec.model_validate(CHINESE_SHOT)  # the shot stays for a remix

    # a remix brings a new shot (or prompt): that is compiled by today's compiler
    fresh = api.client.post(f"/v1/videos/{draft['id']}/remix", json={"shot": CHINESE_SHOT}).json()
    assert fresh["prompt"] != old_text and not ENGLISH_GLUE.search(fresh["prompt"])
    assert api.store.get(fresh["id"]).request.source.compiler == PROMPT_COMPILER_VERSION


def test_a_stored_request_without_a_compiler_version_reads_as_version_1(api: LocalApi) -> None:
    video = api.client.post("/v1/videos", json={"shot": CHINESE_SHOT, **TINY}).json()
    data = api.store.get(video["id"]).request.to_stored()
    del data["source"]["compiler"]
    assert JobRequest.from_stored(data).source.compiler == 1

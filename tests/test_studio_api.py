"""The API the studio page stands on: sessions, the one prompt compiler, board lists, signed links, YAML
boards, remixes that stay on their board, and the page's files with their security headers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.prompt import ShotSpec, compose_prompt
from tests.support.api_app import TINY, LocalApi, finish, local_api


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as api:
        yield api


def board(api: LocalApi, **fields) -> dict:
    body = {"title": "heist", "shots": [{"name": "1A", "prompt": "a vault door", **TINY}], **fields}
    response = api.client.post("/v1/storyboards", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_session_names_the_keys_project_and_role(api: LocalApi) -> None:
    assert api.client.get("/v1/session").json() == {
        "object": "session",
        "project": "default",
        "role": "studio_admin",  # the bootstrap key
        "key_id": api.admin_key.split("_")[1],
        "is_admin": True,
        "is_studio_admin": True,
    }
    member = api.client_for("dune").get("/v1/session").json()
    assert (member["project"], member["role"], member["is_admin"]) == ("dune", "member", False)
    wrong = api.client_with("pvz_000000000000_nope").get("/v1/session")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_compile_is_the_prompt_a_create_encodes(api: LocalApi) -> None:
    shot = {"人物": "一位侦探", "环境": "雨夜的上海街头", "镜头": "缓慢推进"}
    compiled = api.client.post("/v1/prompts/compile", json={"prompt": "  noir ", "shot": shot}).json()
    expected = compose_prompt("  noir ", ShotSpec.model_validate(shot))
    assert (
        compiled["prompt"] == expected
        and compiled["shot_prompt"] == ShotSpec.model_validate(shot).to_prompt()
    )
    created = api.client.post("/v1/videos", json={"prompt": "  noir ", "shot": shot, **TINY}).json()
    assert created["prompt"] == compiled["prompt"]
    empty = api.client.post("/v1/prompts/compile", json={"prompt": "  "})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    assert api.store.list() == [api.store.get(created["id"])]  # compiling stored nothing


def test_storyboards_are_listed_newest_first_and_paged(api: LocalApi) -> None:
    first, second, third = (board(api, title=f"board {index}") for index in range(3))
    page = api.client.get("/v1/storyboards", params={"limit": 2}).json()
    assert [item["id"] for item in page["data"]] == [third["id"], second["id"]] and page["has_more"]
    rest = api.client.get("/v1/storyboards", params={"after": page["last_id"]}).json()
    assert [item["id"] for item in rest["data"]] == [first["id"]] and not rest["has_more"]
    assert api.client_for("dune").get("/v1/storyboards").json()["data"] == []  # another project sees none
    bad = api.client.get("/v1/storyboards", params={"after": "sb_nope"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"


def test_links_are_the_signed_links_content_redirects_to(api: LocalApi) -> None:
    created = board(api)
    video_id = created["shots"][0]["videos"][0]["video_id"]
    early = api.client.get(f"/v1/videos/{video_id}/links")
    assert early.status_code == 409 and early.json()["error"]["code"] == "video_not_ready"
    finish(api, video_id)
    links = api.client.get(f"/v1/videos/{video_id}/links").json()
    for variant in ("video", "thumbnail"):
        redirect = api.client.get(
            f"/v1/videos/{video_id}/content", params={"variant": variant}, follow_redirects=False
        )
        assert redirect.status_code == 307
        assert redirect.headers["location"].split("?")[0] == links[variant].split("?")[0]
        served = api.client_with(None).get(links[variant])  # no key: the link itself is the permission
        assert served.status_code == 200 and served.content[:4] in (b"\x00\x00\x00\x18", b"\xff\xd8\xff ")


def test_a_yaml_board_is_the_same_board_as_its_json(api: LocalApi) -> None:
    document = {
        "title": "yaml board",
        "shots": [{"prompt": "a lighthouse", **TINY}],
        "variants": {"seeds": [3, 4]},
    }
    from_yaml = api.client.post(
        "/v1/storyboards", content=yaml.safe_dump(document), headers={"Content-Type": "application/yaml"}
    )
    assert from_yaml.status_code == 201, from_yaml.text
    from_json = api.client.post("/v1/storyboards", json=document).json()
    shape = lambda body: [(v["seed"], v["status"]) for shot in body["shots"] for v in shot["videos"]]  # noqa: E731
    assert shape(from_yaml.json()) == shape(from_json) == [(3, "queued"), (4, "queued")]
    before = len(api.store.list())
    for text, code in (("shots: [unclosed", "invalid_yaml"), ("- a list", "invalid_yaml")):
        refused = api.client.post(
            "/v1/storyboards", content=text, headers={"Content-Type": "application/yaml"}
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == code, refused.text
    wrong = api.client.post(
        "/v1/storyboards",
        content=yaml.safe_dump({"shots": [{"prompt": "x", "steps": 0}]}),
        headers={"Content-Type": "application/yaml"},
    )
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "shots.0.steps"
    assert len(api.store.list()) == before  # refusals stored nothing


def test_a_remix_of_a_boards_take_is_a_new_take_of_the_same_shot(api: LocalApi) -> None:
    created = board(api, variants={"seeds": [7, 8]})
    source = created["shots"][0]["videos"][1]["video_id"]
    remix = api.client.post(f"/v1/videos/{source}/remix", json={"prompt": "a vault door, at dawn"}).json()
    assert remix["storyboard_id"] == created["id"] and remix["remixed_from_video_id"] == source
    shot = api.client.get(f"/v1/storyboards/{created['id']}").json()["shots"][0]
    assert [(take["variant"], take["seed"]) for take in shot["videos"]] == [(0, 7), (1, 8), (2, 8)]
    loose = api.client.post("/v1/videos", json={"prompt": "loose", **TINY}).json()
    assert (
        api.client.post(f"/v1/videos/{loose['id']}/remix", json={"prompt": "x"}).json()["storyboard_id"]
        is None
    )


def test_the_page_and_its_modules_are_served_with_a_same_origin_policy(api: LocalApi) -> None:
    page = api.client.get("/studio/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy
        and "default-src 'none'" in policy
        and "frame-ancestors 'none'" in policy
    )
    assert 'src="js/main.js"' in page.text and "http" not in page.text.split("<body>")[0].replace(
        "http-equiv", ""
    )
    module = api.client.get("/studio/js/main.js")
    assert module.status_code == 200 and "javascript" in module.headers["content-type"]
    assert module.headers["x-content-type-options"] == "nosniff"
    assert api.client.get("/studio", follow_redirects=False).headers["location"] == "/studio/"
    assert api.client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 303
    assert api.client.get("/").json()["studio"] == "/studio/"
    assert api.client.get("/studio/../serve/http/app.py").status_code == 404


def test_no_module_reaches_outside_the_origin() -> None:
    web = Path(__file__).resolve().parents[1] / "serve" / "web"
    for path in web.rglob("*"):
        if path.suffix in (".js", ".html", ".css"):
            text = path.read_text()
            assert "http://" not in text and "https://" not in text and ".innerHTML" not in text, path


def test_the_policy_allows_media_from_the_s3_endpoint() -> None:
    from serve.http.routes.web import content_security_policy
    from serve.storage import StorageSettings

    s3 = StorageSettings(kind="s3", s3_uri="s3://clips/previz", s3_endpoint_url="http://127.0.0.1:8333/x")
    policy = content_security_policy(s3)
    assert "media-src 'self' blob: http://127.0.0.1:8333;" in policy
    assert "script-src 'self';" in policy  # scripts stay same-origin whatever the store

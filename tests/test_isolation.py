"""Projects are isolated: another project's videos, storyboards and artifacts answer exactly like ids that
do not exist (404 `not_found`), listings never show them, and naming another project is 403."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serve.cli.client import PrevizApiError
from tests.support.api_app import TINY, LocalApi, finish, local_api
from tests.support.cluster import Cluster

GOOD = {"prompt": "a lighthouse in a storm", **TINY}
UNKNOWN_VIDEO = "vid_000000000000000000000000"
UNKNOWN_BOARD = "sb_000000000000000000000000"


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as running:
        yield running


def video_routes(video_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("GET", f"/v1/videos/{video_id}", {}),
        ("GET", f"/v1/videos/{video_id}/content", {}),
        ("GET", f"/v1/videos/{video_id}/content?variant=thumbnail", {}),
        ("GET", f"/v1/videos/{video_id}/events", {}),
        ("GET", f"/v1/videos/{video_id}/webhooks", {}),
        ("POST", f"/v1/videos/{video_id}/remix", {"json": {"prompt": "a blue coat"}}),
        ("DELETE", f"/v1/videos/{video_id}", {}),
    ]


def assert_same_404(client: TestClient, method: str, path: str, unknown_path: str, **kwargs: Any) -> None:
    """`path` (another project's id) answers as `unknown_path` (an id that never existed) does."""
    theirs = client.request(method, path, follow_redirects=False, **kwargs)
    unknown = client.request(method, unknown_path, follow_redirects=False, **kwargs)
    assert theirs.status_code == unknown.status_code == 404, (method, path, theirs.text)
    body, unknown_body = theirs.json()["error"], unknown.json()["error"]
    assert body["code"] == unknown_body["code"] == "not_found"
    assert body["param"] == unknown_body["param"]


def test_another_projects_videos_storyboards_and_artifacts_are_404_like_unknown_ids(api: LocalApi) -> None:
    alpha, beta = api.client_for("alpha"), api.client_for("beta")
    done = alpha.post("/v1/videos", json=GOOD).json()
    finish(api, done["id"])
    running = alpha.post("/v1/videos", json=GOOD).json()
    board = alpha.post("/v1/storyboards", json={"shots": [GOOD], "variants": {"seeds": 2}}).json()
    assert (done["project"], board["project"]) == ("alpha", "alpha")
    assert alpha.get(f"/v1/videos/{done['id']}/content", follow_redirects=False).status_code == 307

    for video_id in (done["id"], running["id"]):
        for (method, path, kwargs), (_, unknown_path, _) in zip(
            video_routes(video_id), video_routes(UNKNOWN_VIDEO), strict=True
        ):
            assert_same_404(beta, method, path, unknown_path, **kwargs)
    assert_same_404(beta, "GET", f"/v1/storyboards/{board['id']}", f"/v1/storyboards/{UNKNOWN_BOARD}")

    assert beta.get("/v1/videos").json()["data"] == []
    assert beta.get("/v1/videos", params={"storyboard_id": board["id"]}).json()["data"] == []
    assert api.client.get("/v1/videos").json()["data"] == []  # an admin key of "default" sees only "default"
    # Nothing was changed by beta's attempts: alpha's running video was not cancelled, no remix was made.
    assert alpha.get(f"/v1/videos/{running['id']}").json()["status"] == "queued"
    assert len(alpha.get("/v1/videos").json()["data"]) == 4  # two videos and the board's two
    assert alpha.get(f"/v1/storyboards/{board['id']}").json()["num_videos"] == 2


def test_naming_another_project_is_403_and_omitting_it_means_the_keys(api: LocalApi) -> None:
    beta = api.client_for("beta")
    mine = beta.post("/v1/videos", json=GOOD)
    assert (mine.status_code, mine.json()["project"]) == (201, "beta")
    named = beta.post("/v1/videos", json={**GOOD, "project": "beta"})
    assert named.status_code == 201
    for method, path, kwargs in [
        ("POST", "/v1/videos", {"json": {**GOOD, "project": "alpha"}}),
        ("POST", "/v1/videos", {"data": {"prompt": "x", "size": "96x64", "project": "alpha"}}),
        ("POST", "/v1/storyboards", {"json": {"project": "alpha", "shots": [GOOD]}}),
        ("GET", "/v1/videos?project=alpha", {}),
    ]:
        response = beta.request(method, path, **kwargs)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"] == {
            "code": "project_mismatch",
            "message": "the API key belongs to project 'beta', not 'alpha'",
            "param": "project",
        }
    assert [video["project"] for video in beta.get("/v1/videos?project=beta").json()["data"]] == ["beta"] * 2


@pytest.mark.cluster
def test_isolation_holds_on_the_live_cluster(cluster: Cluster, tmp_path: Path) -> None:
    alpha, beta = cluster.client("iso-alpha"), cluster.client("iso-beta")
    body = {"prompt": "a lighthouse keeper", "size": "96x64", "seconds": 0.25, "steps": 2}
    video = alpha.create({**body, "project": "iso-alpha"})
    board = alpha.create_storyboard({"project": "iso-alpha", "shots": [body]})
    cluster.wait_for([video["id"]])
    for call, args in [
        (beta.get, (video["id"],)),
        (beta.cancel, (video["id"],)),
        (beta.remix, (video["id"], "a blue coat")),
        (beta.download, (video["id"], tmp_path / "never-written.mp4")),
        (beta.get_storyboard, (board["id"],)),
    ]:
        with pytest.raises(PrevizApiError) as refused:
            call(*args)
        assert (refused.value.status, refused.value.code) == (404, "not_found"), call
    events = beta.http.get(f"/v1/videos/{video['id']}/events")
    assert (events.status_code, events.json()["error"]["code"]) == (404, "not_found")
    assert beta.list()["data"] == [] and beta.list(storyboard_id=board["id"])["data"] == []
    assert [item["id"] for item in alpha.list(storyboard_id=board["id"])["data"]] != []
    unauthenticated = beta.http.get("/v1/videos", headers={"Authorization": ""})
    assert (unauthenticated.status_code, unauthenticated.json()["error"]["code"]) == (401, "missing_api_key")

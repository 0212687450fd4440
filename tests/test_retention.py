"""Per-project retention (issue 12, point 7): `expires_at` on finished videos and the sweeper that deletes
them, locally and on S3, plus the settings and CLI that set it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from serve.jobs.models import utcnow
from serve.jobs.retention import RetentionSweeper
from serve.storage import StorageError
from tests.support.api_app import TINY, LocalApi, finish, http_server, local_api
from tests.support.cli_run import previz

GOOD = {"prompt": "a lighthouse in a storm", **TINY}
DAY = 86400


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as running:
        yield running


def finished(api: LocalApi) -> dict[str, Any]:
    video = api.client.post("/v1/videos", json=GOOD).json()
    finish(api, video["id"])
    return api.client.get(f"/v1/videos/{video['id']}").json()


def sweep(api: LocalApi, days_later: float) -> int:
    return RetentionSweeper(api.store, api.state.artifacts).sweep_once(utcnow() + timedelta(days=days_later))


def test_a_finished_video_expires_after_its_projects_retention(api: LocalApi) -> None:
    kept = finished(api)
    assert kept["expires_at"] is None  # no retention: kept until deleted
    assert api.client.patch("/v1/admin/projects/default", json={"retention_days": 7}).status_code == 200
    video = api.client.get(f"/v1/videos/{kept['id']}").json()
    assert video["expires_at"] == video["completed_at"] + 7 * DAY  # a new retention applies to all
    listed = api.client.get("/v1/videos").json()["data"]
    assert [item["expires_at"] for item in listed] == [video["expires_at"]]
    queued = api.client.post("/v1/videos", json=GOOD).json()
    assert api.client.get(f"/v1/videos/{queued['id']}").json()["expires_at"] is None  # not finished

    job = api.store.get(video["id"])
    keys = (job.artifact_uri, job.poster_uri)
    assert all(api.state.artifacts.exists(key) for key in keys)
    assert sweep(api, 6.9) == 0 and api.client.get(f"/v1/videos/{video['id']}").status_code == 200
    assert sweep(api, 7.1) == 1
    assert not any(api.state.artifacts.exists(key) for key in keys)
    assert api.client.get(f"/v1/videos/{video['id']}").status_code == 404
    assert api.client.get(f"/v1/videos/{video['id']}/content").status_code == 404
    assert api.client.get(f"/v1/videos/{queued['id']}").status_code == 200  # a queued one stays
    [deleted] = [event for event in api.store.events(video["id"]) if event.kind == "deleted"]
    assert deleted.data == {"status": "SUCCEEDED", "reason": "expired"}
    assert sweep(api, 30) == 0  # nothing left to delete


def test_other_projects_keep_their_videos(api: LocalApi) -> None:
    api.store.create_project("noir")
    api.store.update_project("default", {"retention_days": 1})
    noir = api.client_for("noir")
    video = noir.post("/v1/videos", json=GOOD).json()
    finish(api, video["id"])
    mine = finished(api)
    assert sweep(api, 2) == 1
    assert noir.get(f"/v1/videos/{video['id']}").status_code == 200
    assert api.client.get(f"/v1/videos/{mine['id']}").status_code == 404


def test_a_failing_artifact_store_leaves_the_video_whole_until_the_next_pass(
    api: LocalApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.store.update_project("default", {"retention_days": 1})
    video = finished(api)
    sweeper = RetentionSweeper(api.store, api.state.artifacts)

    def broken(key: str) -> None:
        raise StorageError(f"could not delete artifact {key!r}: disk is read-only")

    with monkeypatch.context() as patched:
        patched.setattr(api.state.artifacts, "delete", broken)
        assert sweeper.sweep_once(utcnow() + timedelta(days=2)) == 0
    assert api.client.get(f"/v1/videos/{video['id']}/content", follow_redirects=False).status_code == 307
    assert sweeper.sweep_once(utcnow() + timedelta(days=2)) == 1


def test_retention_on_s3(tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = s3_server.fresh_storage("retention")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    with local_api(tmp_path, storage=storage) as s3_api:
        s3_api.store.update_project("default", {"retention_days": 3})
        video = finished(s3_api)
        job = s3_api.store.get(video["id"])
        assert s3_api.state.artifacts.exists(job.artifact_uri)
        assert sweep(s3_api, 4) == 1
        assert not s3_api.state.artifacts.exists(job.artifact_uri)
        assert not s3_api.state.artifacts.exists(job.poster_uri)


@pytest.mark.parametrize("bad", [0, -1, 3651, 1.5, "7", True])
def test_a_bad_retention_is_a_400(api: LocalApi, bad: object) -> None:
    response = api.client.patch("/v1/admin/projects/default", json={"retention_days": bad})
    assert response.status_code == 400, (bad, response.text)
    assert api.store.get_project("default").settings.retention_days is None


def test_cli_sets_and_clears_the_retention(
    api: LocalApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        run = lambda *args: previz([*args, "--url", url], monkeypatch, capsys)  # noqa: E731
        code, out, err = run("admin", "project", "create", "heist", "--retention-days", "30")
        assert code == 0 and api.store.get_project("heist").settings.retention_days == 30, err
        code, out, err = run("admin", "project", "list")
        assert code == 0 and "30 d" in out, err
        code, out, err = run("admin", "project", "update", "heist", "--clear-retention-days")
        assert code == 0 and api.store.get_project("heist").settings.retention_days is None, err


def test_the_webhook_payload_says_when_the_video_expires(api: LocalApi) -> None:
    api.store.update_project("default", {"retention_days": 2})
    video = api.client.post("/v1/videos", json={**GOOD, "callback_url": "https://hooks.example.com/previz"})
    assert video.status_code == 201, video.text
    finish(api, video.json()["id"])
    [delivery] = api.store.webhook_deliveries(video.json()["id"])
    data = delivery.payload["data"]
    assert data["expires_at"] == data["completed_at"] + 2 * DAY

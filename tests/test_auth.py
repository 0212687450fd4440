"""API keys, roles, the admin API and CLI, project quotas, the label policy, signed artifact links, and the
`previz up` bootstrap of project `default`."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import update

from serve.cli import bootstrap_default_project
from serve.cli.client import PrevizClient
from serve.http.deps import IngressState
from serve.jobs import JobStatus, JobStore
from serve.jobs.projects import ProjectExists, ProjectSettings, seconds_to_utc_midnight
from serve.jobs.schema import api_keys, jobs
from serve.storage import ArtifactSigner
from serve.webhooks import open_job_store
from tests.support.api_app import TINY, LocalApi, finish, http_server, local_api
from tests.support.cli_run import previz
from tests.support.job_requests import job_request
from tests.support.servers.postgres import PostgresServer, postgres_server  # noqa: F401  (session fixture)

GOOD = {"prompt": "a lighthouse in a storm", **TINY}


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as running:
        yield running


def error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


# -- the store -------------------------------------------------------------------------------------------


def test_store_projects_keys_and_usage_on_both_backends(store: JobStore) -> None:
    created = store.create_project("heist", ProjectSettings(max_queued_jobs=3))
    assert len(created.webhook_secret) == 64 and store.webhook_secret("heist") == created.webhook_secret
    assert store.webhook_secret("nope") is None
    with pytest.raises(ProjectExists):
        store.create_project("heist")
    updated = store.update_project("heist", {"gpu_seconds_per_day": 5.0})
    assert updated.settings == ProjectSettings(max_queued_jobs=3, gpu_seconds_per_day=5.0)
    assert store.get_project("heist").settings == updated.settings and store.update_project("x", {}) is None
    record, key = store.create_key("heist", "member", "lead")
    assert store.authenticate(key).role == "member" and [k.id for k in store.list_keys("heist")] == [
        record.id
    ]
    first = store.revoke_key(record.id).revoked_at
    assert store.authenticate(key) == "revoked" and store.revoke_key(record.id).revoked_at == first
    assert store.authenticate("pvz_000000000000_" + "A" * 43) == "unknown"
    job, _ = store.create("heist", "batch", job_request())
    job = store.claim(job.id, "s")
    store.advance(job.id, job.attempt, JobStatus.DECODING, timing=("decode", 1.5))
    store.succeed(job.id, job.attempt, artifact_uri="a", artifact_bytes=1, timings={"denoise_high": 2.0})
    assert store.gpu_seconds_today("heist") == 3.5 and store.gpu_seconds_today("default") == 0.0
    assert store.gpu_seconds_today("heist", now=datetime.now(UTC) + timedelta(days=1)) == 0.0
    generated = store.ensure_default_project()
    assert generated is not None and store.ensure_default_project() is None
    assert [p.name for p in store.list_projects()] == ["default", "heist"]


# -- keys ------------------------------------------------------------------------------------------------


def test_every_v1_route_needs_a_valid_unrevoked_key(api: LocalApi) -> None:
    key = api.key_for("noir")
    revoked_id = key.split("_")[1]
    api.store.revoke_key(revoked_id)
    cases = {
        None: "missing_api_key",
        "pvz_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA": "invalid_api_key",
        "not-a-key": "invalid_api_key",
        key[:-1] + ("A" if key[-1] != "A" else "B"): "invalid_api_key",  # right id, wrong secret
        key: "revoked_api_key",
    }
    routes = [
        ("GET", "/v1/videos"),
        ("POST", "/v1/videos"),
        ("GET", "/v1/videos/vid_000000000000000000000000"),
        ("DELETE", "/v1/videos/vid_000000000000000000000000"),
        ("GET", "/v1/videos/vid_000000000000000000000000/content"),
        ("GET", "/v1/videos/vid_000000000000000000000000/events"),
        ("POST", "/v1/videos/vid_000000000000000000000000/remix"),
        ("POST", "/v1/storyboards"),
        ("GET", "/v1/storyboards/sb_000000000000000000000000"),
        ("GET", "/v1/admin/projects"),
    ]
    for sent, code in cases.items():
        client = api.client_with(sent)
        for method, path in routes:
            response = client.request(method, path, json=GOOD if method == "POST" else None)
            assert error(response) == (401, code), (sent, method, path)
            assert response.headers["WWW-Authenticate"] == "Bearer"
    open_client = api.client_with(None)
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert open_client.get(path).status_code == 200, path


def test_keys_are_stored_as_sha256_only_and_name_their_project_and_role(api: LocalApi) -> None:
    record, key = api.store.create_key("default", "member", "an artist")
    assert key.startswith(f"pvz_{record.id}_") and len(record.id) == 12 and len(key.split("_", 2)[2]) >= 43
    with api.store.db.read() as conn:
        row = conn.execute(api_keys.select().where(api_keys.c.id == record.id)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in [str(value) for value in row]
    caller = api.store.authenticate(key)
    assert (caller.project, caller.role, caller.key_id) == ("default", "member", record.id)
    assert api.store.get_key(record.id).last_used_at is not None
    assert api.store.authenticate(key + "x") == "unknown"


def test_member_keys_get_403_on_every_admin_route(api: LocalApi) -> None:
    member = api.client_for("noir")
    admin_key_id = api.admin_key.split("_")[1]
    for method, path, body in [
        ("POST", "/v1/admin/projects", {"name": "heist"}),
        ("GET", "/v1/admin/projects", None),
        ("GET", "/v1/admin/projects/noir", None),
        ("PATCH", "/v1/admin/projects/noir", {"burn_label": False}),
        ("POST", "/v1/admin/projects/noir/keys", {"role": "admin"}),
        ("GET", "/v1/admin/projects/noir/keys", None),
        ("DELETE", f"/v1/admin/keys/{admin_key_id}", None),
    ]:
        response = member.request(method, path, json=body)
        assert error(response) == (403, "forbidden"), (method, path)
    assert api.store.get_project("heist") is None and api.store.get_key(admin_key_id).revoked_at is None
    assert api.store.get_project("noir").settings.burn_label is True


def test_admin_creates_a_project_and_a_key_that_works_until_revoked(api: LocalApi) -> None:
    admin = api.client
    created = admin.post(
        "/v1/admin/projects", json={"name": "heist", "settings": {"max_queued_jobs": 5}, "admin_key": True}
    )
    assert created.status_code == 201, created.text
    project = created.json()
    assert project["name"] == "heist" and len(project["webhook_secret"]) == 64
    assert project["settings"] == {
        "max_queued_jobs": 5,
        "gpu_seconds_per_day": None,
        "retention_days": None,
        "burn_label": True,
        "default_quality": None,
        "default_fps": None,
    }
    assert project["api_key"]["role"] == "admin" and project["api_key"]["key"].startswith("pvz_")
    assert api.store.webhook_secret("heist") == project["webhook_secret"]
    assert error(admin.post("/v1/admin/projects", json={"name": "heist"})) == (409, "project_exists")
    assert error(admin.post("/v1/admin/projects", json={"name": "Heist!"}))[0] == 400
    listed = admin.get("/v1/admin/projects").json()["data"]
    assert [item["name"] for item in listed] == ["default", "heist"]
    assert all("webhook_secret" not in item for item in listed)

    patched = admin.patch("/v1/admin/projects/heist", json={"gpu_seconds_per_day": 600, "burn_label": False})
    assert patched.json()["settings"] == {
        "max_queued_jobs": 5,
        "gpu_seconds_per_day": 600.0,
        "retention_days": None,
        "burn_label": False,
        "default_quality": None,
        "default_fps": None,
    }
    assert admin.get("/v1/admin/projects/heist").json()["settings"]["burn_label"] is False
    assert error(admin.patch("/v1/admin/projects/heist", json={"max_queued_jobs": 0}))[0] == 400
    assert error(admin.get("/v1/admin/projects/nope")) == (404, "not_found")
    assert error(admin.post("/v1/admin/projects/nope/keys", json={})) == (404, "not_found")

    new = admin.post("/v1/admin/projects/heist/keys", json={"role": "member", "name": "ana"})
    assert new.status_code == 201
    key = new.json()
    member = api.client_with(key["key"])
    video = member.post("/v1/videos", json=GOOD)
    assert (video.status_code, video.json()["project"]) == (201, "heist")
    keys = admin.get("/v1/admin/projects/heist/keys").json()["data"]
    assert {item["id"]: (item["role"], item["name"]) for item in keys} == {
        project["api_key"]["id"]: ("admin", "first admin key"),
        key["id"]: ("member", "ana"),
    }
    assert all("key" not in item for item in keys)
    assert next(item for item in keys if item["id"] == key["id"])["last_used_at"] is not None

    revoked = admin.delete(f"/v1/admin/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert error(member.get("/v1/videos")) == (401, "revoked_api_key")
    assert error(admin.delete("/v1/admin/keys/000000000000")) == (404, "not_found")
    # The project's own admin key sees its own project only (tests/test_admin_scope.py has the rest).
    other_admin = api.client_with(project["api_key"]["key"])
    assert [item["name"] for item in other_admin.get("/v1/admin/projects").json()["data"]] == ["heist"]


# -- quotas ----------------------------------------------------------------------------------------------


def test_project_queue_quota_is_429_with_retry_after_and_the_smaller_bound_wins(tmp_path: Path) -> None:
    with local_api(tmp_path, max_queued_jobs_per_project=3) as api:
        api.store.create_project("heist")
        api.store.update_project("heist", {"max_queued_jobs": 2})
        heist = api.client_for("heist")
        assert [heist.post("/v1/videos", json=GOOD).status_code for _ in range(2)] == [201, 201]
        full = heist.post("/v1/videos", json=GOOD)
        assert error(full) == (429, "project_queue_full") and int(full.headers["Retry-After"]) >= 1
        assert "2 jobs waiting" in full.json()["error"]["message"]
        board = heist.post("/v1/storyboards", json={"shots": [GOOD]})
        assert error(board) == (429, "project_queue_full")
        remix = heist.post(f"/v1/videos/{api.store.list(project='heist')[0].id}/remix", json={"prompt": "x"})
        assert error(remix) == (429, "project_queue_full")
        # The deployment's per-project bound (3) holds where the project's own (10) is larger.
        api.store.update_project("heist", {"max_queued_jobs": 10})
        assert heist.post("/v1/videos", json=GOOD).status_code == 201
        assert error(heist.post("/v1/videos", json=GOOD)) == (429, "project_queue_full")
        assert len(api.store.list(project="heist")) == 3


def run_to_end(store: JobStore, job_id: str, timings: dict[str, float], *, fail: bool = False) -> None:
    job = store.claim(job_id, "test-scheduler")
    for stage, seconds in timings.items():
        store.advance(job.id, job.attempt, JobStatus.DENOISING_HIGH, timing=(stage, seconds))
    if fail:
        assert store.fail(job.id, job.attempt, "boom", "failed on purpose")
    else:
        assert store.succeed(job.id, job.attempt, artifact_uri="x/y/clip-a1.mp4", artifact_bytes=1)


def test_gpu_quota_counts_todays_finished_jobs_and_resets_at_utc_midnight(api: LocalApi) -> None:
    api.store.create_project("heist")
    api.store.update_project("heist", {"gpu_seconds_per_day": 10})
    heist = api.client_for("heist")
    first = heist.post("/v1/videos", json=GOOD, headers={"Idempotency-Key": "take-1"}).json()["id"]
    second = heist.post("/v1/videos", json=GOOD).json()["id"]
    run_to_end(api.store, first, {"encode": 50.0, "denoise_high": 3.0, "denoise_low": 2.0, "decode": 1.0})
    run_to_end(api.store, second, {"denoise_high": 3.0, "upscale": 0.5}, fail=True)
    assert (api.store.get(first).gpu_seconds, api.store.get(second).gpu_seconds) == (6.0, 3.5)
    assert api.store.gpu_seconds_today("heist") == 9.5
    third = heist.post("/v1/videos", json=GOOD)
    assert third.status_code == 201  # 9.5 of 10 used: still room
    run_to_end(api.store, third.json()["id"], {"denoise_low": 1.0})
    refused = heist.post("/v1/videos", json=GOOD)
    assert error(refused) == (429, "gpu_quota_exceeded")
    assert "10.5 of its 10 GPU seconds" in refused.json()["error"]["message"]
    assert abs(int(refused.headers["Retry-After"]) - seconds_to_utc_midnight()) <= 5
    assert error(heist.post("/v1/storyboards", json={"shots": [GOOD]})) == (429, "gpu_quota_exceeded")
    assert error(heist.post(f"/v1/videos/{first}/remix", json={"prompt": "x"})) == (429, "gpu_quota_exceeded")
    replay = heist.post("/v1/videos", json=GOOD, headers={"Idempotency-Key": "take-1"})
    assert (replay.status_code, replay.json()["id"]) == (200, first)  # a retried create is not a new job
    assert api.client.post("/v1/videos", json=GOOD).status_code == 201  # other projects are not held
    # Jobs that finished yesterday do not count.
    yesterday = datetime.now(UTC) - timedelta(days=1)
    with api.store.db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.project == "heist").values(finished_at=yesterday))
    assert heist.post("/v1/videos", json=GOOD).status_code == 201


def test_seconds_to_utc_midnight() -> None:
    assert seconds_to_utc_midnight(datetime(2026, 1, 1, 23, 59, 0, tzinfo=UTC)) == 60
    assert seconds_to_utc_midnight(datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)) == 86_400


# -- the burned label ------------------------------------------------------------------------------------


def test_the_label_is_required_unless_the_project_allows_it_off(api: LocalApi) -> None:
    refused = api.client.post("/v1/videos", json={**GOOD, "label": False})
    assert error(refused) == (400, "label_required") and refused.json()["error"]["param"] == "label"
    form = api.client.post("/v1/videos", data={"prompt": "x", "size": "96x64", "label": "false"})
    assert error(form) == (400, "label_required")
    board = api.client.post("/v1/storyboards", json={"shots": [GOOD, {**GOOD, "label": False}]})
    assert error(board) == (400, "label_required") and board.json()["error"]["param"] == "shots.1.label"
    labelled = api.client.post("/v1/videos", json=GOOD).json()
    assert api.store.get(labelled["id"]).request.finish.label == "AI-generated draft"
    assert api.store.list() and all(job.id == labelled["id"] for job in api.store.list())

    api.store.create_project("internal")
    api.store.update_project("internal", {"burn_label": False})
    internal = api.client_for("internal")
    unlabelled = internal.post("/v1/videos", json={**GOOD, "label": False}).json()
    assert api.store.get(unlabelled["id"]).request.finish.label is None
    still = internal.post("/v1/videos", json=GOOD).json()
    assert api.store.get(still["id"]).request.finish.label == "AI-generated draft"
    # Once the project requires the label again, a remix of an unlabelled video is labelled.
    api.store.update_project("internal", {"burn_label": True})
    remix = internal.post(f"/v1/videos/{unlabelled['id']}/remix", json={"prompt": "again"}).json()
    assert api.store.get(remix["id"]).request.finish.label == "AI-generated draft"


# -- signed artifact links -------------------------------------------------------------------------------


def test_content_redirects_to_a_signed_link_that_needs_no_key_until_it_expires(tmp_path: Path) -> None:
    with local_api(tmp_path, artifact_url_ttl_s=120) as api:
        video = api.client.post("/v1/videos", json=GOOD).json()
        finish(api, video["id"])
        redirect = api.client.get(f"/v1/videos/{video['id']}/content", follow_redirects=False)
        assert redirect.status_code == 307
        link = redirect.headers["location"]
        parts = urlsplit(link)
        query = {name: values[0] for name, values in parse_qs(parts.query).items()}
        assert parts.path == f"/v1/artifacts/default/{video['id']}/clip-a1.mp4"
        assert abs(int(query["expires"]) - (time.time() + 120)) <= 5

        anonymous = api.client_with(None)
        clip = anonymous.get(link)
        assert clip.status_code == 200 and clip.content.startswith(b"\x00\x00\x00\x18ftyp")
        assert (
            clip.headers["content-type"] == "video/mp4"
            and f"{video['id']}.mp4" in clip.headers["content-disposition"]
        )
        poster = api.client.get(f"/v1/videos/{video['id']}/content?variant=thumbnail", follow_redirects=False)
        assert anonymous.get(poster.headers["location"]).headers["content-type"] == "image/jpeg"

        tampered_signature = link[:-1] + ("0" if link[-1] != "0" else "1")
        other_key = link.replace("clip-a1.mp4", "poster-a1.jpg")
        longer = link.replace(f"expires={query['expires']}", f"expires={int(query['expires']) + 3600}")
        for bad in (tampered_signature, other_key, longer, link.replace(query["signature"], "é")):
            assert error(anonymous.get(bad)) == (403, "bad_signature"), bad
        expired = api.state.signer.url(f"default/{video['id']}/clip-a1.mp4", 60, now=time.time() - 120)
        assert error(anonymous.get(expired)) == (403, "url_expired")
        assert error(anonymous.get(parts.path)) == (400, "missing_field")


def test_every_ingress_on_the_node_shares_one_0600_signing_secret(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    first, second = ArtifactSigner.for_folder(root), ArtifactSigner.for_folder(root)
    secret_file = root / ".url-signing-key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert first.signature("a/b/c.mp4", 100) == second.signature("a/b/c.mp4", 100)
    assert ArtifactSigner.for_folder(tmp_path / "elsewhere").signature("a/b/c.mp4", 100) != first.signature(
        "a/b/c.mp4", 100
    )
    assert sorted(os.listdir(root)) == [".url-signing-key"]


def test_client_download_follows_the_signed_redirect_over_http(api: LocalApi, tmp_path: Path) -> None:
    video = api.client.post("/v1/videos", json=GOOD).json()
    finish(api, video["id"])
    with http_server() as url:
        client = PrevizClient(url, api_key=api.admin_key)
        path = client.download(video["id"], tmp_path / "clip.mp4")
        assert path.read_bytes().startswith(b"\x00\x00\x00\x18ftyp")
        poster = client.download(video["id"], tmp_path / "poster.jpg", variant="thumbnail")
        assert poster.read_bytes()[:3] == b"\xff\xd8\xff"


# -- the CLI ---------------------------------------------------------------------------------------------


def test_admin_cli_creates_lists_and_revokes(
    api: LocalApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        run = lambda *args: previz([*args, "--url", url], monkeypatch, capsys)  # noqa: E731
        code, out, err = run("admin", "project", "create", "heist", "--max-queued-jobs", "4",
                             "--gpu-seconds-per-day", "900", "--no-burn-label")  # fmt: skip
        assert code == 0, err
        assert "project heist" in out and api.store.webhook_secret("heist") in out
        settings = api.store.get_project("heist").settings
        assert (settings.max_queued_jobs, settings.gpu_seconds_per_day, settings.burn_label) == (
            4,
            900.0,
            False,
        )
        code, out, err = run("admin", "project", "list")
        assert code == 0 and "heist" in out and "900" in out and "default" in out, err

        code, out, err = run(
            "admin", "key", "create", "--project", "heist", "--role", "member", "--name", "ana"
        )
        assert code == 0 and "not shown again" in err, err
        key = out.strip()
        caller = api.store.authenticate(key)
        assert (caller.project, caller.role) == ("heist", "member")
        code, out, err = run("admin", "key", "list", "--project", "heist")
        assert code == 0 and caller.key_id in out and "ana" in out and key not in out, err

        code, out, err = previz(["ls", "--server", url, "--api-key", key], monkeypatch, capsys)
        assert code == 0, err
        code, out, err = run("admin", "key", "revoke", caller.key_id)
        assert code == 0 and f"revoked {caller.key_id}" in out, err
        assert api.store.authenticate(key) == "revoked"

        code, out, err = run("admin", "project", "create", "heist")
        assert code == 2 and "project_exists" in err and len(err.strip().splitlines()) == 1
        monkeypatch.setenv("PREVIZ_API_KEY", key)
        code, out, err = run("admin", "project", "list")
        assert code == 2 and "revoked_api_key" in err
        monkeypatch.delenv("PREVIZ_API_KEY")
        code, out, err = run("admin", "key", "list", "--project", "heist")
        assert code == 2 and "missing_api_key" in err


# -- `previz up` bootstrap -------------------------------------------------------------------------------


def test_up_bootstrap_generates_a_studio_admin_key_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PREVIZ_API_KEY", raising=False)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    key = bootstrap_default_project(url)
    shown = capsys.readouterr().err
    assert key is not None and key in shown and "Save this key, it is not shown again." in shown
    store = open_job_store(url)
    caller = store.authenticate(key)
    assert (caller.project, caller.role) == ("default", "studio_admin")
    assert bootstrap_default_project(url) is None and capsys.readouterr().err == ""
    assert len(store.list_keys("default")) == 1
    # The API never revokes the last studio_admin key; an operator who did it in SQL gets a new one.
    with store.db.write() as conn:
        conn.execute(
            update(api_keys).where(api_keys.c.id == caller.key_id).values(revoked_at=datetime.now(UTC))
        )
    again = bootstrap_default_project(url)
    assert again not in (None, key) and store.authenticate(again).role == "studio_admin"


def test_up_bootstrap_honours_previz_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    monkeypatch.setenv("PREVIZ_API_KEY", "studio-chosen-secret-key")
    assert bootstrap_default_project(url) == "studio-chosen-secret-key"
    assert bootstrap_default_project(url) == "studio-chosen-secret-key"
    assert capsys.readouterr().err == ""
    store = open_job_store(url)
    caller = store.authenticate("studio-chosen-secret-key")
    assert (caller.project, caller.role) == ("default", "studio_admin")
    assert len(store.list_keys("default")) == 1
    _, generated = store.create_key("default", "admin")
    monkeypatch.setenv("PREVIZ_API_KEY", generated)
    assert bootstrap_default_project(url) == generated and len(store.list_keys("default")) == 2


def test_ingress_replicas_over_one_store_agree(api: LocalApi) -> None:
    """A second Ingress state over the same database and folder accepts the first one's keys and links."""
    second = IngressState(api.state.args, api.state.model, api.scheduler)
    assert second.store.authenticate(api.admin_key).project == "default"
    link = api.state.signer.url("default/vid_x/clip-a1.mp4", 60)
    query = {name: values[0] for name, values in parse_qs(urlsplit(link).query).items()}
    assert second.signer.check("default/vid_x/clip-a1.mp4", int(query["expires"]), query["signature"]) is None

"""Project-scoped admin keys, the studio_admin role, the last-admin guard, key rotation and the role
migration of an earlier version's database (issue 12, point 4)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from serve.jobs import JobStore
from serve.jobs.projects import LastAdminKey
from serve.webhooks import open_job_store
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cli_run import previz
from tests.support.servers.postgres import PostgresServer

FORMAT_1_DB = Path(__file__).parent / "data" / "jobs-format1.db"
GOOD = {"prompt": "a lighthouse in a storm", **TINY}


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as running:
        running.store.create_project("heist")
        running.store.create_project("noir")
        yield running


def error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_the_bootstrap_key_is_a_studio_admin(api: LocalApi) -> None:
    assert api.store.authenticate(api.admin_key).role == "studio_admin"


def test_a_project_admin_key_manages_only_its_own_project(api: LocalApi) -> None:
    heist_admin = api.client_with(api.key_for("heist", "admin"))
    noir_member_id = api.store.authenticate(api.key_for("noir")).key_id
    studio_key_id = api.store.authenticate(api.admin_key).key_id
    refused = [
        # other projects do not exist for it, nor do their keys
        ("GET", "/v1/admin/projects/noir", None, (404, "not_found")),
        ("GET", "/v1/admin/projects/noir/keys", None, (404, "not_found")),
        ("POST", "/v1/admin/projects/noir/keys", {"role": "admin"}, (404, "not_found")),
        ("DELETE", f"/v1/admin/keys/{noir_member_id}", None, (404, "not_found")),
        ("POST", f"/v1/admin/keys/{noir_member_id}/rotate", None, (404, "not_found")),
        ("DELETE", f"/v1/admin/keys/{studio_key_id}", None, (404, "not_found")),
        # what only the studio decides (whichever project is named, so this tells nothing either)
        ("PATCH", "/v1/admin/projects/noir", {"burn_label": False}, (403, "forbidden")),
        ("POST", "/v1/admin/projects", {"name": "western"}, (403, "forbidden")),
        ("PATCH", "/v1/admin/projects/heist", {"gpu_seconds_per_day": 1e9}, (403, "forbidden")),
        ("PATCH", "/v1/admin/projects/heist", {"burn_label": False}, (403, "forbidden")),
        ("POST", "/v1/admin/projects/heist/keys", {"role": "studio_admin"}, (403, "forbidden")),
    ]
    for method, path, body, expected in refused:
        response = heist_admin.request(method, path, json=body)
        assert error(response) == expected, (method, path, response.text)
    assert api.store.get_project("western") is None
    assert api.store.get_project("noir").settings.burn_label is True
    assert api.store.get_project("heist").settings.gpu_seconds_per_day is None
    assert api.store.get_key(noir_member_id).revoked_at is None
    assert api.store.get_key(studio_key_id).revoked_at is None
    assert api.store.authenticate(api.admin_key).role == "studio_admin"

    # Its own project: read, keys created, listed, rotated and revoked.
    assert [p["name"] for p in heist_admin.get("/v1/admin/projects").json()["data"]] == ["heist"]
    assert heist_admin.get("/v1/admin/projects/heist").json()["name"] == "heist"
    created = heist_admin.post("/v1/admin/projects/heist/keys", json={"role": "member", "name": "ana"})
    assert created.status_code == 201 and created.json()["project"] == "heist"
    listed = heist_admin.get("/v1/admin/projects/heist/keys").json()["data"]
    assert created.json()["id"] in {key["id"] for key in listed}
    revoked = heist_admin.delete(f"/v1/admin/keys/{created.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None


def test_the_studio_admin_manages_every_project(api: LocalApi) -> None:
    studio = api.client
    assert {p["name"] for p in studio.get("/v1/admin/projects").json()["data"]} == {
        "default",
        "heist",
        "noir",
    }
    assert studio.patch("/v1/admin/projects/noir", json={"max_queued_jobs": 3}).status_code == 200
    made = studio.post("/v1/admin/projects/noir/keys", json={"role": "studio_admin", "name": "ops"})
    assert made.status_code == 201 and made.json()["role"] == "studio_admin"
    second = api.client_with(made.json()["key"])
    assert second.post("/v1/admin/projects", json={"name": "western"}).status_code == 201


def test_no_key_revokes_the_last_admin_key_of_its_project_or_studio(api: LocalApi) -> None:
    heist_key = api.key_for("heist", "admin")
    heist_id = api.store.authenticate(heist_key).key_id
    heist_admin = api.client_with(heist_key)
    for client in (heist_admin, api.client):  # itself, and the studio admin
        assert error(client.delete(f"/v1/admin/keys/{heist_id}")) == (409, "last_admin_key")
    assert api.store.authenticate(heist_key).role == "admin"
    studio_id = api.store.authenticate(api.admin_key).key_id
    refused = api.client.delete(f"/v1/admin/keys/{studio_id}")
    assert error(refused) == (409, "last_admin_key")
    assert "last usable admin key of project 'default'" in refused.json()["error"]["message"]
    api.key_for("default", "admin")  # the project keeps an admin, the studio would have none
    refused = api.client.delete(f"/v1/admin/keys/{studio_id}")
    assert error(refused) == (409, "last_admin_key")
    assert "last usable studio_admin key of the studio" in refused.json()["error"]["message"]
    # With a second admin key, the first one may go (even by its own hand).
    second = heist_admin.post("/v1/admin/projects/heist/keys", json={"role": "admin"}).json()
    assert heist_admin.delete(f"/v1/admin/keys/{heist_id}").status_code == 200
    assert error(api.client_with(second["key"]).delete(f"/v1/admin/keys/{second['id']}")) == (
        409,
        "last_admin_key",
    )


def test_store_guard_holds_on_both_backends(store: JobStore) -> None:
    store.create_project("heist")
    first, _ = store.create_key("heist", "admin")
    member, _ = store.create_key("heist", "member")
    with pytest.raises(LastAdminKey):
        store.revoke_key(first.id)
    assert store.revoke_key(member.id).revoked_at is not None
    second, _ = store.create_key("heist", "studio_admin")
    assert store.revoke_key(first.id).revoked_at is not None
    with pytest.raises(LastAdminKey) as refused:
        store.revoke_key(second.id)
    assert refused.value.scope == "project 'heist'"
    rotated, key = store.rotate_key(second.id)
    assert (rotated.project, rotated.role) == ("heist", "studio_admin") and rotated.id != second.id
    assert store.authenticate(key).role == "studio_admin" and store.get_key(second.id).revoked_at is not None
    assert store.rotate_key(second.id) is None  # a revoked key is not rotated again


def test_rotation_replaces_the_bootstrap_key_at_once(api: LocalApi) -> None:
    old_id = api.store.authenticate(api.admin_key).key_id
    rotated = api.client.post(f"/v1/admin/keys/{old_id}/rotate")
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert (new["project"], new["role"], new["name"]) == ("default", "studio_admin", "bootstrap")
    assert error(api.client.get("/v1/admin/projects")) == (401, "revoked_api_key")
    assert api.client_with(new["key"]).get("/v1/admin/projects").status_code == 200
    assert error(api.client_with(new["key"]).post(f"/v1/admin/keys/{old_id}/rotate")) == (409, "key_revoked")


def test_cli_rotates_a_key_and_updates_a_project(
    api: LocalApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        run = lambda *args: previz([*args, "--url", url], monkeypatch, capsys)  # noqa: E731
        code, out, err = run("admin", "project", "update", "heist", "--max-queued-jobs", "4",
                             "--gpu-seconds-per-day", "900", "--no-burn-label")  # fmt: skip
        assert code == 0 and "project heist" in out, err
        settings = api.store.get_project("heist").settings
        assert (settings.max_queued_jobs, settings.gpu_seconds_per_day, settings.burn_label) == (
            4,
            900,
            False,
        )
        code, out, err = run("admin", "project", "update", "heist", "--clear-max-queued-jobs")
        assert code == 0 and api.store.get_project("heist").settings.max_queued_jobs is None, err
        assert api.store.get_project("heist").settings.gpu_seconds_per_day == 900
        code, out, err = run("admin", "project", "update", "heist")
        assert code == 2 and "nothing to change" in err
        code, out, err = run("admin", "project", "update", "nope", "--max-queued-jobs", "2")
        assert code == 2 and "not_found" in err

        old_id = api.store.authenticate(api.admin_key).key_id
        code, out, err = run("admin", "key", "rotate", old_id)
        assert code == 0 and f"replaces {old_id}" in err, err
        new_key = out.strip()
        assert api.store.authenticate(new_key).role == "studio_admin"
        assert api.store.authenticate(api.admin_key) == "revoked"
        code, out, err = run("admin", "key", "rotate", old_id)
        assert code == 2 and "revoked_api_key" in err  # the caller's own key is the revoked one now
        monkeypatch.setenv("PREVIZ_API_KEY", new_key)
        code, out, err = run("admin", "key", "revoke", api.store.authenticate(new_key).key_id)
        assert code == 2 and "last_admin_key" in err


def test_a_database_of_the_earlier_version_gets_the_studio_admin_role(tmp_path: Path) -> None:
    """tests/data/jobs-format1.db has the earlier `role IN ('member', 'admin')` check; its bootstrap key
    (written here as that version wrote it) becomes a studio_admin key, and other admin keys stay."""
    path = tmp_path / "jobs.db"
    shutil.copy(FORMAT_1_DB, path)
    with sqlite3.connect(path) as db:
        jobs_before = db.execute("SELECT id, status FROM jobs ORDER BY id").fetchall()
        db.execute("INSERT OR IGNORE INTO projects VALUES ('default', '2026-11-01 00:00:00', '{}', 'ab')")
        db.execute("INSERT OR IGNORE INTO projects VALUES ('heist', '2026-11-01 00:00:00', '{}', 'cd')")
        for key_id, project, name in (
            ("b00000000001", "default", "bootstrap"),
            ("a00000000002", "heist", "x"),
        ):
            row = (key_id, project, "admin", "0" * 64, name, "2026-11-01 00:00:00")
            db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)", row)
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO api_keys VALUES ('c3', 'heist', 'studio_admin', 'h', NULL, '2026', NULL, NULL)"
            )
    store = open_job_store(f"sqlite:///{path}")
    store.create_schema()
    store.create_schema()  # idempotent
    assert store.ensure_default_project("default") is None  # the promoted bootstrap key is the studio's
    assert (
        store.get_key("b00000000001").role == "studio_admin" and store.get_key("a00000000002").role == "admin"
    )
    store.create_key("heist", "studio_admin")
    with pytest.raises(IntegrityError), store.db.write() as conn:
        conn.execute(text("UPDATE api_keys SET role = 'root' WHERE id = 'a00000000002'"))
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT id, status FROM jobs ORDER BY id").fetchall() == jobs_before != []


def test_postgres_role_check_of_the_earlier_version_is_replaced(
    postgres_server: PostgresServer, postgres_database: str
) -> None:
    store = open_job_store(postgres_server.create_schema(postgres_database))
    store.create_schema()
    with store.db.write() as conn:
        conn.execute(text("ALTER TABLE api_keys DROP CONSTRAINT ck_api_keys_role"))
        conn.execute(
            text("ALTER TABLE api_keys ADD CONSTRAINT ck_api_keys_role CHECK (role IN ('member', 'admin'))")
        )
    store.create_project("heist")
    with pytest.raises(IntegrityError):
        store.create_key("heist", "studio_admin")
    store.create_schema()
    assert store.authenticate(store.create_key("heist", "studio_admin")[1]).role == "studio_admin"
    with pytest.raises(IntegrityError), store.db.write() as conn:
        conn.execute(text("UPDATE api_keys SET role = 'root'"))
    store.close()

"""Review of takes: notes and statuses through the API and the job store, on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from serve.jobs import JobStore
from serve.jobs.schema import ADDED_JOB_COLUMNS
from serve.webhooks import open_job_store
from tests.support.api_app import TINY, LocalApi, local_api
from tests.support.job_requests import job_request


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def video(api: LocalApi, **extra: object) -> dict:
    answer = api.client.post("/v1/videos", json={"prompt": "a door opens", **TINY, **extra})
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_notes_round_trip_with_the_keys_name_the_time_and_a_frame_at_the_takes_rate(api: LocalApi) -> None:
    take = video(api, fps=24)  # 9 frames at 16 fps, delivered as 14 at 24
    client = api.client_with(api.store.create_key("default", "member", "dana (editor)")[1])
    first = client.post(f"/v1/videos/{take['id']}/notes", json={"text": "  hold longer on the door  "})
    assert first.status_code == 201, first.text
    second = client.post(f"/v1/videos/{take['id']}/notes", json={"text": "flare here", "frame": 12})
    assert (second.json()["frame"], second.json()["seconds"]) == (12, 0.5)
    listed = client.get(f"/v1/videos/{take['id']}/notes").json()["data"]
    assert [(note["text"], note["frame"], note["author"]) for note in listed] == [
        ("hold longer on the door", None, "dana (editor)"),
        ("flare here", 12, "dana (editor)"),
    ]
    assert all(note["created_at"] >= take["created_at"] for note in listed)


def test_a_note_past_the_takes_last_frame_or_empty_is_refused(api: LocalApi) -> None:
    take = video(api, fps=24)
    url = f"/v1/videos/{take['id']}/notes"
    past = api.client.post(url, json={"text": "x", "frame": 14})
    assert (past.status_code, past.json()["error"]["code"], past.json()["error"]["param"]) == (
        400,
        "invalid_frame",
        "frame",
    )
    assert "14 frames at 24 fps" in past.json()["error"]["message"]
    assert api.client.post(url, json={"text": "   "}).status_code == 400
    assert api.client.post(url, json={"text": "x", "frame": -1}).status_code == 400
    assert api.client.get(url).json()["data"] == []


def test_a_review_status_is_set_shown_listed_and_filtered(api: LocalApi) -> None:
    first, second, third = video(api), video(api), video(api)
    url = f"/v1/videos/{first['id']}/review"
    assert api.client.get(url).json()["status"] == "pending"
    answer = api.client.put(url, json={"status": "approved"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["status"], answer.json()["changed"]) == ("approved", True)
    assert api.client.put(url, json={"status": "approved"}).json()["changed"] is False
    api.client.put(f"/v1/videos/{second['id']}/review", json={"status": "needs-changes"})
    shown = api.client.get(f"/v1/videos/{first['id']}").json()
    assert shown["review"] == "approved" and shown["review_by"] and shown["reviewed_at"]

    def ids(status: str) -> list[str]:
        return [v["id"] for v in api.client.get("/v1/videos", params={"review": status}).json()["data"]]

    assert ids("approved") == [first["id"]]
    assert ids("needs-changes") == [second["id"]]
    assert ids("pending") == [third["id"]]
    assert ids("rejected") == []
    bad = api.client.put(url, json={"status": "maybe"})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "status")
    assert api.client.get("/v1/videos", params={"review": "maybe"}).status_code == 400
    events = [event.kind for event in api.store.events(first["id"])]
    assert events.count("review") == 1


def test_another_projects_key_can_neither_read_nor_write_a_takes_review(api: LocalApi) -> None:
    take = video(api)
    api.client.post(f"/v1/videos/{take['id']}/notes", json={"text": "mine"})
    other = api.client_for("other")
    for answer in (
        other.get(f"/v1/videos/{take['id']}/notes"),
        other.post(f"/v1/videos/{take['id']}/notes", json={"text": "theirs"}),
        other.get(f"/v1/videos/{take['id']}/review"),
        other.put(f"/v1/videos/{take['id']}/review", json={"status": "rejected"}),
    ):
        assert (answer.status_code, answer.json()["error"]["code"]) == (404, "not_found")
    notes = api.client.get(f"/v1/videos/{take['id']}/notes").json()["data"]
    assert [note["text"] for note in notes] == ["mine"]
    assert api.client.get(f"/v1/videos/{take['id']}/review").json()["status"] == "pending"
    assert other.get("/v1/videos", params={"review": "pending"}).json()["data"] == []


def test_a_status_change_queues_a_review_webhook_and_a_same_status_none(api: LocalApi) -> None:
    take = video(api, callback_url="https://hooks.example.com/previz")
    url = f"/v1/videos/{take['id']}/review"
    api.client.put(url, json={"status": "rejected"})
    api.client.put(url, json={"status": "rejected"})
    api.client.put(url, json={"status": "pending"})
    deliveries = api.store.webhook_deliveries(take["id"])
    assert [delivery.event for delivery in deliveries] == ["video.review_changed"] * 2
    assert [delivery.payload["data"]["review"] for delivery in deliveries] == ["rejected", "pending"]
    assert deliveries[0].url == "https://hooks.example.com/previz"
    listed = api.client.get(f"/v1/videos/{take['id']}/webhooks").json()["data"]
    assert [item["event"] for item in listed] == ["video.review_changed"] * 2


def test_the_board_lists_each_takes_review(api: LocalApi) -> None:
    body = {"shots": [{"name": "1A", "prompt": "a door", **TINY}], "variants": {"seeds": [1, 2]}}
    board = api.client.post("/v1/storyboards", json=body).json()
    first, second = (item["video_id"] for item in board["shots"][0]["videos"])
    api.client.put(f"/v1/videos/{second}/review", json={"status": "approved"})
    shown = api.client.get(f"/v1/storyboards/{board['id']}").json()["shots"][0]["videos"]
    reviews = [(item["video_id"], item["review"]) for item in shown]
    assert reviews == [(first, "pending"), (second, "approved")]


def queued_job(store: JobStore) -> str:
    return store.create("default", "batch", job_request())[0].id


def test_the_store_keeps_notes_and_statuses_per_project_on_both_backends(store: JobStore) -> None:
    store.create_project("default")
    video_id = queued_job(store)
    assert store.add_note(video_id, project="other", author="x", key_id="k", text="no", frame=None) is None
    note = store.add_note(video_id, project="default", author="dana", key_id="k1", text="tighter", frame=3)
    assert note is not None and store.take_notes([video_id])[video_id] == [note]
    assert store.set_review(video_id, "approved", project="other", author="x") is None
    job, changed = store.set_review(video_id, "approved", project="default", author="dana")
    assert changed and (job.review, job.review_by) == ("approved", "dana")
    assert [job.id for job in store.list(project="default", review="approved")] == [video_id]
    job, changed = store.set_review(video_id, "pending", project="default", author="dana")
    assert changed and job.review is None
    assert [job.id for job in store.list(project="default", review="pending")] == [video_id]


def test_a_store_of_an_earlier_version_gains_the_review_columns_and_the_notes_table(store_url: str) -> None:
    url = store_url
    store = open_job_store(url)
    store.create_schema()
    store.create_project("default")
    video_id = queued_job(store)
    store.close()
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:  # back to the previous version's tables
        conn.execute(text("DROP TABLE take_notes"))
        for name in ("review", "review_by", "review_at"):
            conn.execute(text(f"ALTER TABLE jobs DROP COLUMN {name}"))
    store = open_job_store(url)
    store.create_schema()
    columns = {column["name"] for column in inspect(engine).get_columns("jobs")}
    assert {"review", "review_by", "review_at"} <= columns
    assert {"review", "review_by", "review_at"} <= set(ADDED_JOB_COLUMNS)
    engine.dispose()
    assert store.get(video_id).review is None  # an old take reads as pending
    note = store.add_note(video_id, project="default", author="a", key_id="k", text="t", frame=None)
    assert note is not None
    store.close()

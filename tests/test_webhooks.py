"""Webhooks: the signature scheme, the job store's outbox (SQLite and PostgreSQL), the dispatcher against a
real HTTP receiver on loopback, the deliveries route, and one job on the cluster calling back."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, insert, select

from serve.callbacks import CallbackPolicy, CallbackRefused
from serve.config import PrevizArgs, WebhookSettings
from serve.jobs import JobRecord, JobStore
from serve.jobs.models import utcnow
from serve.jobs.outbox import WebhookDelivery
from serve.jobs.request import JobRequest
from serve.jobs.schema import projects
from serve.webhooks import (
    WebhookDispatcher,
    WebhookSignatureError,
    encode_payload,
    open_job_store,
    retry_delay_s,
    signature_headers,
    verify_signature,
)
from tests.support.api_app import TINY, local_api
from tests.support.cluster import Cluster
from tests.support.job_requests import job_request
from tests.support.servers.postgres import PostgresServer, postgres_server  # noqa: F401  (session fixture)

SECRET = "whsec_test_0123456789abcdef"
# the receivers of these tests listen on loopback: an internal receiver the deployment allows explicitly
LOOPBACK: dict[str, Any] = {"allow_http": True, "allowed_hosts": ["127.0.0.1/32"]}
BUCKET = "96x64x9"


def request_body(callback_url: str | None) -> JobRequest:
    """A stored job request as the Ingress writes it (what the webhook's video object is built from)."""
    return job_request(resolution="96x64", duration=0.5, steps=4, seed=7, callback_url=callback_url)


def ensure_project(database_url: str, name: str, secret: str | None = SECRET) -> None:
    """A `projects` row with this webhook secret (project creation itself belongs to the auth work)."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            if conn.scalar(select(projects.c.name).where(projects.c.name == name)) is None:
                conn.execute(
                    insert(projects).values(
                        name=name, created_at=utcnow(), settings={}, webhook_secret=secret
                    )
                )
    finally:
        engine.dispose()


def running_job(store: JobStore, callback_url: str | None, project: str = "dune") -> JobRecord:
    job, _ = store.create(project, "batch", request_body(callback_url), labels={"shot": "12A"})
    claimed = store.claim(job.id, "scheduler-0")
    assert claimed is not None
    return claimed


def finished_job(store: JobStore, callback_url: str | None, project: str = "dune") -> JobRecord:
    job = running_job(store, callback_url, project)
    assert store.succeed(job.id, job.attempt, artifact_uri="clips/x/clip-a1.mp4", artifact_bytes=10, seed=7)
    return job


# -- signing ---------------------------------------------------------------------------------------------


BODY = encode_payload({"id": "whd_1", "type": "video.completed", "data": {"id": "vid_1"}})
NOW = 1_764_043_200


def signed(secret: str = SECRET, body: bytes = BODY, timestamp: int = NOW) -> dict[str, str]:
    return signature_headers(secret, "whd_1", "video.completed", body, timestamp)


def test_a_signed_request_verifies_and_returns_its_timestamp() -> None:
    headers = signed()
    assert verify_signature(SECRET, headers, BODY, now=NOW + 10) == NOW
    assert headers["Previz-Timestamp"] == str(NOW)
    assert headers["Previz-Signature"].startswith(f"t={NOW},v1=")
    lowered = {name.lower(): value for name, value in headers.items()}  # as ASGI servers hand them over
    assert verify_signature(SECRET, lowered, BODY, now=NOW) == NOW


def test_a_tampered_body_is_rejected() -> None:
    with pytest.raises(WebhookSignatureError, match="no v1 signature matches"):
        verify_signature(SECRET, signed(), BODY.replace(b"vid_1", b"vid_2"), now=NOW)


def test_another_secret_is_rejected() -> None:
    with pytest.raises(WebhookSignatureError, match="no v1 signature matches"):
        verify_signature("whsec_other", signed(), BODY, now=NOW)


def test_a_stale_or_future_timestamp_is_rejected() -> None:
    with pytest.raises(WebhookSignatureError, match="at most 300 s"):
        verify_signature(SECRET, signed(), BODY, now=NOW + 301)
    with pytest.raises(WebhookSignatureError, match="at most 300 s"):
        verify_signature(SECRET, signed(), BODY, now=NOW - 301)
    assert verify_signature(SECRET, signed(), BODY, tolerance_s=600, now=NOW + 500) == NOW


def test_a_replayed_signature_with_a_new_timestamp_is_rejected() -> None:
    signature = signed()["Previz-Signature"].split(",v1=")[1]
    headers = {"Previz-Signature": f"t={NOW + 60},v1={signature}"}
    with pytest.raises(WebhookSignatureError, match="no v1 signature matches"):
        verify_signature(SECRET, headers, BODY, now=NOW + 60)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "header is missing"),
        ({"Previz-Signature": ""}, "header is missing"),
        ({"Previz-Signature": "garbage"}, "must look like"),
        ({"Previz-Signature": f"t={NOW}"}, "must carry"),
        ({"Previz-Signature": "v1=abcd"}, "must carry"),
        ({"Previz-Signature": "t=yesterday,v1=abcd"}, "non-integer"),
    ],
)
def test_a_malformed_signature_header_is_rejected(headers: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookSignatureError, match=message):
        verify_signature(SECRET, headers, BODY, now=NOW)


def test_retry_delays_double_with_jitter_up_to_the_cap() -> None:
    settings = WebhookSettings(retry_base_s=2.0, retry_cap_s=60.0)
    rng = random.Random(0)
    delays = [retry_delay_s(attempt, settings, rng) for attempt in range(1, 10)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(60.0, 2.0 * 2 ** (attempt - 1))
        assert 0.75 * nominal <= delay <= nominal
    assert all(later > earlier for earlier, later in zip(delays[:5], delays[1:6], strict=True))
    assert max(delays) <= 60.0


# -- the outbox, on both backends ------------------------------------------------------------------------


def test_succeeding_a_job_with_a_callback_queues_one_signed_payload(store: JobStore) -> None:
    job = finished_job(store, "https://hooks.example.com/previz")
    [delivery] = store.webhook_deliveries(job.id)
    assert (delivery.status, delivery.attempts, delivery.log) == ("pending", 0, [])
    assert (delivery.event, delivery.url, delivery.project) == (
        "video.completed",
        "https://hooks.example.com/previz",
        "dune",
    )
    assert delivery.id.startswith("whd_") and delivery.next_attempt_at is not None
    payload = delivery.payload
    assert (payload["id"], payload["type"]) == (delivery.id, "video.completed")
    video = payload["data"]
    assert (video["id"], video["status"], video["progress"], video["project"]) == (
        job.id,
        "completed",
        100,
        "dune",
    )
    assert (video["size"], video["seconds"], video["num_frames"], video["seed"]) == ("96x64", "0.5", 9, 7)
    assert video["labels"] == {"shot": "12A"} and video["error"] is None
    assert video["content_url"] == f"/v1/videos/{job.id}/content" and video["completed_at"] is not None


def test_a_job_without_a_callback_queues_nothing(store: JobStore) -> None:
    job = finished_job(store, None)
    failed = running_job(store, None)
    assert store.fail(failed.id, failed.attempt, "pipeline_error", "boom")
    assert store.webhook_deliveries(job.id) == [] and store.webhook_deliveries(failed.id) == []
    assert store.due_webhooks() == []


def test_failing_and_cancelling_queue_their_events(store: JobStore) -> None:
    failed = running_job(store, "https://hooks.example.com/a")
    assert store.fail(failed.id, failed.attempt, "pipeline_error", "RuntimeError: boom")
    [delivery] = store.webhook_deliveries(failed.id)
    assert delivery.event == "video.failed"
    assert delivery.payload["data"]["error"] == {
        "code": "pipeline_error",
        "message": "RuntimeError: boom",
        "param": None,
    }
    cancelled, _ = store.create("dune", "batch", request_body("https://hooks.example.com/b"))
    store.cancel(cancelled.id)
    [delivery] = store.webhook_deliveries(cancelled.id)
    assert (delivery.event, delivery.payload["data"]["status"]) == ("video.cancelled", "cancelled")


def test_a_job_failed_for_too_many_attempts_calls_back(store: JobStore) -> None:
    job = running_job(store, "https://hooks.example.com/a")
    store.requeue_in_flight(max_attempts=1)
    [delivery] = store.webhook_deliveries(job.id)
    assert delivery.event == "video.failed"
    assert delivery.payload["data"]["error"]["code"] == "too_many_attempts"


def test_a_stale_attempt_queues_no_webhook_and_an_outcome_is_announced_once(store: JobStore) -> None:
    first = running_job(store, "https://hooks.example.com/a")
    store.requeue_in_flight()
    second = store.claim(first.id, "scheduler-1")
    assert second is not None and second.attempt == first.attempt + 1
    assert not store.succeed(first.id, first.attempt, artifact_uri="k", artifact_bytes=1)
    assert not store.fail(first.id, first.attempt, "pipeline_error", "late")
    assert store.webhook_deliveries(first.id) == []
    assert store.succeed(second.id, second.attempt, artifact_uri="k", artifact_bytes=1)
    assert not store.succeed(second.id, second.attempt, artifact_uri="k", artifact_bytes=1)
    assert not store.fail(second.id, second.attempt, "pipeline_error", "late")
    store.cancel(second.id)  # already finished: no cancelled event either
    assert [delivery.event for delivery in store.webhook_deliveries(first.id)] == ["video.completed"]


def test_concurrent_dispatchers_never_lease_the_same_delivery(store: JobStore) -> None:
    jobs = [finished_job(store, f"https://hooks.example.com/{index}") for index in range(12)]
    num_threads = 6
    start = threading.Barrier(num_threads)
    leased: list[list[WebhookDelivery]] = [[] for _ in range(num_threads)]

    def claim(index: int) -> None:
        start.wait()
        leased[index] = store.due_webhooks(limit=3, lease_s=60)

    threads = [threading.Thread(target=claim, args=(index,)) for index in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [delivery.job_id for batch in leased for delivery in batch]
    assert len(ids) == len(set(ids)) == len(jobs)
    assert store.due_webhooks() == []  # all leased


def test_an_expired_lease_offers_the_delivery_again(store: JobStore) -> None:
    job = finished_job(store, "https://hooks.example.com/a")
    [first] = store.due_webhooks(lease_s=0.2)
    assert store.due_webhooks() == []
    time.sleep(0.3)  # the dispatcher holding it died: once its lease ends another one takes it
    [again] = store.due_webhooks(lease_s=60)
    assert again.id == first.id and again.job_id == job.id


def test_recording_attempts_moves_a_delivery_to_delivered_or_failed(store: JobStore) -> None:
    retried = finished_job(store, "https://hooks.example.com/a")
    [delivery] = store.due_webhooks()
    later = utcnow().replace(year=utcnow().year + 1)
    pending = store.record_webhook_attempt(
        delivery.id, ok=False, status_code=500, error="HTTP 500", seconds=0.1, next_attempt_at=later
    )
    assert pending is not None and (pending.status, pending.attempts, pending.leased_until) == (
        "pending",
        1,
        None,
    )
    assert pending.next_attempt_at == later and store.due_webhooks() == []  # not due before `later`
    delivered = store.record_webhook_attempt(
        delivery.id, ok=True, status_code=204, error=None, seconds=0.1, next_attempt_at=None
    )
    assert delivered is not None and (delivered.status, delivered.attempts) == ("delivered", 2)
    assert [entry["status_code"] for entry in delivered.log] == [500, 204]
    assert delivered.delivered_at is not None and delivered.next_attempt_at is None
    again = store.record_webhook_attempt(
        delivery.id, ok=True, status_code=200, error=None, seconds=0.1, next_attempt_at=None
    )
    assert again is None and store.webhook_deliveries(retried.id)[0].attempts == 2

    given_up = finished_job(store, "https://hooks.example.com/b")
    [delivery] = store.due_webhooks()
    failed = store.record_webhook_attempt(
        delivery.id, ok=False, status_code=None, error="ConnectError", seconds=0.0, next_attempt_at=None
    )
    assert failed is not None and failed.status == "failed" and failed.log[0]["error"] == "ConnectError"
    assert store.webhook_deliveries(given_up.id)[0].status == "failed"


def test_the_webhook_secret_is_the_projects(store: JobStore, store_url: str) -> None:
    assert store.webhook_secret("dune") is None
    ensure_project(store_url, "dune")
    assert store.webhook_secret("dune") == SECRET


# -- the dispatcher against a real receiver ---------------------------------------------------------------


@dataclass
class Received:
    monotonic: float
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    """An HTTP server on loopback that answers webhook POSTs with the next scripted status code (the last
    one repeats) and records each request and whether its signature verified."""

    statuses: list[int]
    secret: str = SECRET
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    body: bytes = b"ok"  # what every answer carries

    @property
    def codes_sent(self) -> list[int]:
        return self.statuses[: len(self.requests)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(statuses=[200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = dict(self.headers.items())
            try:
                verify_signature(state.secret, headers, body)
                verified = True
            except ValueError:
                verified = False
            state.requests.append(Received(time.monotonic(), headers, body, verified))
            status = state.statuses[min(len(state.requests), len(state.statuses)) - 1]
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/previz"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[JobStore]:
    store = open_job_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    ensure_project(f"sqlite:///{tmp_path / 'jobs.db'}", "dune")
    yield store
    store.close()


def dispatch_until_settled(
    store: JobStore,
    settings: WebhookSettings,
    job_id: str,
    policy: CallbackPolicy | None = None,
    public_url: str | None = None,
) -> WebhookDelivery:
    """Run a dispatcher until the job's delivery is no longer pending (a hang guard, not a timing check)."""

    async def main() -> WebhookDelivery:
        dispatcher = WebhookDispatcher(store, settings, policy, public_url=public_url)
        task = asyncio.create_task(dispatcher.run_forever())
        try:
            while True:
                [delivery] = await asyncio.to_thread(store.webhook_deliveries, job_id)
                if delivery.status != "pending":
                    return delivery
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    return asyncio.run(asyncio.wait_for(main(), timeout=300))


def test_the_payload_links_are_absolute_with_the_public_url(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    job = finished_job(sqlite_store, receiver.url)
    settings = WebhookSettings(poll_interval_s=0.05, **LOOPBACK)
    delivery = dispatch_until_settled(
        sqlite_store, settings, job.id, public_url="https://previz.studio.example/"
    )
    assert delivery.status == "delivered"
    [request] = receiver.requests
    video = json.loads(request.body)["data"]
    assert video["content_url"] == f"https://previz.studio.example/v1/videos/{job.id}/content"
    assert request.verified and delivery.payload["data"]["content_url"] == f"/v1/videos/{job.id}/content"


@pytest.mark.parametrize(
    "bad", ["previz.studio.example", "ftp://x.example", "https://x.example/?a=1", "https://u@x"]
)
def test_a_public_url_that_is_not_a_base_url_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="public_url"):
        PrevizArgs(public_url=bad)


def test_failed_attempts_are_retried_with_growing_gaps_until_delivered(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    receiver.statuses = [500, 500, 500, 200]
    job = finished_job(sqlite_store, receiver.url)
    settings = WebhookSettings(retry_base_s=0.5, retry_cap_s=10, poll_interval_s=0.05, **LOOPBACK)
    delivery = dispatch_until_settled(sqlite_store, settings, job.id)
    assert (delivery.status, delivery.attempts) == ("delivered", 4)
    assert [entry["status_code"] for entry in delivery.log] == [500, 500, 500, 200]
    assert delivery.log[0]["error"].startswith("HTTP 500") and delivery.log[-1]["error"] is None
    assert len(receiver.requests) == 4 and all(request.verified for request in receiver.requests)
    assert {request.body for request in receiver.requests} == {encode_payload(delivery.payload)}
    assert {request.headers["Previz-Delivery"] for request in receiver.requests} == {delivery.id}
    assert {request.headers["Previz-Event"] for request in receiver.requests} == {"video.completed"}
    sent = [request.monotonic for request in receiver.requests]
    gaps = [later - earlier for earlier, later in zip(sent, sent[1:], strict=False)]
    # exponential backoff: nominal delays 0.5, 1 and 2 s, each jittered down by at most a quarter
    assert gaps[0] < gaps[1] < gaps[2] and gaps[2] > 2 * gaps[0]
    payload = json.loads(receiver.requests[-1].body)
    assert (payload["type"], payload["data"]["id"], payload["data"]["status"]) == (
        "video.completed",
        job.id,
        "completed",
    )


def test_a_receiver_that_fails_twice_gets_the_third_try(sqlite_store: JobStore, receiver: Receiver) -> None:
    receiver.statuses = [500, 502, 200]
    job = finished_job(sqlite_store, receiver.url)
    settings = WebhookSettings(
        max_attempts=3, retry_base_s=0.05, retry_cap_s=0.2, poll_interval_s=0.02, **LOOPBACK
    )
    delivery = dispatch_until_settled(sqlite_store, settings, job.id)
    assert (delivery.status, delivery.attempts) == ("delivered", 3)
    assert [entry["status_code"] for entry in delivery.log] == [500, 502, 200]
    assert len(receiver.requests) == 3 and all(request.verified for request in receiver.requests)


def test_a_receiver_that_keeps_failing_gets_max_attempts_then_the_delivery_fails(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    receiver.statuses = [503]
    job = finished_job(sqlite_store, receiver.url)
    settings = WebhookSettings(
        max_attempts=3, retry_base_s=0.05, retry_cap_s=0.1, poll_interval_s=0.02, **LOOPBACK
    )
    delivery = dispatch_until_settled(sqlite_store, settings, job.id)
    assert (delivery.status, delivery.attempts, len(receiver.requests)) == ("failed", 3, 3)
    assert delivery.next_attempt_at is None and delivery.delivered_at is None
    assert "gave up after 3 attempts" in delivery.log[-1]["error"]


def test_redirects_are_not_followed(sqlite_store: JobStore, receiver: Receiver) -> None:
    receiver.statuses = [307, 200]
    job = finished_job(sqlite_store, receiver.url)
    delivery = dispatch_until_settled(
        sqlite_store, WebhookSettings(max_attempts=1, poll_interval_s=0.02, **LOOPBACK), job.id
    )
    assert (delivery.status, delivery.log[0]["status_code"], len(receiver.requests)) == ("failed", 307, 1)


def test_a_project_without_a_secret_fails_its_delivery_without_sending(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    job = finished_job(sqlite_store, receiver.url, project="nobody")
    delivery = dispatch_until_settled(sqlite_store, WebhookSettings(poll_interval_s=0.02, **LOOPBACK), job.id)
    assert delivery.status == "failed" and receiver.requests == []
    assert delivery.log[0]["error"] == "project 'nobody' has no webhook secret; the webhook cannot be signed"


# -- the deliveries route ---------------------------------------------------------------------------------


def test_a_videos_webhooks_are_listed_with_their_attempts(tmp_path: Path) -> None:
    with local_api(tmp_path) as api:
        client = api.client_for("dune")
        body = {
            "prompt": "a lighthouse",
            "project": "dune",
            "callback_url": "https://hooks.example.com/x",
            **TINY,
        }
        video = client.post("/v1/videos", json=body).json()
        assert client.get(f"/v1/videos/{video['id']}/webhooks").json() == {"object": "list", "data": []}
        job = api.store.claim(video["id"], "scheduler-0")
        assert job is not None
        api.store.fail(job.id, job.attempt, "pipeline_error", "boom")
        [delivery] = api.store.due_webhooks()
        api.store.record_webhook_attempt(
            delivery.id, ok=False, status_code=502, error="HTTP 502", seconds=0.25, next_attempt_at=utcnow()
        )
        answer = client.get(f"/v1/videos/{video['id']}/webhooks")
        assert answer.status_code == 200
        [listed] = answer.json()["data"]
        assert (listed["id"], listed["event"], listed["url"]) == (
            delivery.id,
            "video.failed",
            "https://hooks.example.com/x",
        )
        assert (listed["status"], listed["attempts"], listed["delivered_at"]) == ("pending", 1, None)
        assert isinstance(listed["next_attempt_at"], int) and isinstance(listed["created_at"], int)
        [attempt] = listed["log"]
        assert (attempt["status_code"], attempt["error"], attempt["seconds"]) == (502, "HTTP 502", 0.25)
        missing = client.get("/v1/videos/vid_000000000000000000000000/webhooks")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# -- on the cluster ---------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_a_finished_job_calls_back_signed_and_shows_the_delivery(
    cluster: Cluster, receiver: Receiver
) -> None:
    receiver.secret = "whsec_cluster_" + "5" * 24
    ensure_project(cluster.database_url, "hooks-e2e", receiver.secret)
    client = cluster.client("hooks-e2e")
    body = {"prompt": "a paper boat in the rain", "project": "hooks-e2e", "callback_url": receiver.url}
    video = client.create({**body, "resolution": "96x64", "duration": 0.5, "steps": 2})
    assert cluster.wait_for([video["id"]])[video["id"]]["status"] == "completed"
    deadline = time.monotonic() + 120  # hang guard: the dispatcher polls every second
    while client.webhooks(video["id"])["data"][0]["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
    [delivery] = client.webhooks(video["id"])["data"]
    assert (delivery["status"], delivery["event"], delivery["attempts"]) == (
        "delivered",
        "video.completed",
        1,
    )
    assert delivery["log"][0]["status_code"] == 200
    [request] = receiver.requests
    assert request.verified and request.headers["Previz-Delivery"] == delivery["id"]
    payload = json.loads(request.body)
    assert (payload["type"], payload["data"]["id"], payload["data"]["status"]) == (
        "video.completed",
        video["id"],
        "completed",
    )
    assert payload["data"]["project"] == "hooks-e2e"


# -- SSRF: where a callback may point ---------------------------------------------------------------------

REFUSED_CALLBACKS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://127.0.0.1:6379/",
    "http://localhost:8100/v1/admin/projects",
    "http://0.0.0.0:22/",
    "http://[::1]:8100/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://user:pass@example.com/",
    "https://10.0.0.8/hooks",
    "https://224.0.0.1/",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://receiver.localhost/",
    "https://intranet/hooks",
]


@pytest.mark.parametrize("url", REFUSED_CALLBACKS)
def test_a_callback_to_an_internal_address_is_refused_at_create_naming_the_rule(
    tmp_path: Path, url: str
) -> None:
    with local_api(tmp_path, webhooks={"allow_http": True}) as api:  # http allowed: the host rule refuses
        response = api.client.post("/v1/videos", json={"prompt": "a storm", **TINY, "callback_url": url})
        board = api.client.post(
            "/v1/storyboards", json={"shots": [{"prompt": "a storm", **TINY}], "callback_url": url}
        )
        for refused in (response, board):
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_callback_url", "callback_url")
            assert error["message"].startswith("`callback_url` ")
        assert api.store.list(limit=10) == []


def test_an_http_callback_is_refused_unless_the_deployment_allows_http(tmp_path: Path) -> None:
    body = {"prompt": "a storm", **TINY, "callback_url": "http://hooks.example.com/previz"}
    with local_api(tmp_path) as api:
        refused = api.client.post("/v1/videos", json=body)
        assert refused.status_code == 400 and "must use https" in refused.json()["error"]["message"]
        assert (
            api.client.post(
                "/v1/videos", json={**body, "callback_url": "https://hooks.example.com/p"}
            ).status_code
            == 201
        )


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/previz",
        "https://hooks.example.com:8443/a?b=c",
        "https://8.8.8.8.nip.example/",
    ],
)
def test_a_public_https_callback_passes_the_create_time_check(url: str) -> None:
    assert CallbackPolicy().check_url(url) == urlsplit(url).hostname


def test_a_name_that_resolves_to_loopback_at_send_time_is_refused_and_never_called(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    port = urlsplit(receiver.url).port
    job = finished_job(sqlite_store, f"http://rebind.example.com:{port}/hooks/previz")

    async def rebinding(host: str, _port: int) -> list[str]:  # public at create time, loopback now
        return ["127.0.0.1"] if host == "rebind.example.com" else []

    policy = CallbackPolicy(allow_http=True, resolver=rebinding)
    delivery = dispatch_until_settled(sqlite_store, WebhookSettings(poll_interval_s=0.02), job.id, policy)
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert "resolves to a non-public address" in delivery.log[0]["error"]
    assert receiver.requests == []  # nothing was sent


def test_localhost_is_refused_at_send_time_even_in_a_row_that_skipped_the_create_check(
    sqlite_store: JobStore,
) -> None:
    job = finished_job(sqlite_store, "http://localhost.:9/")  # a row written past the create-time check
    delivery = dispatch_until_settled(
        sqlite_store, WebhookSettings(poll_interval_s=0.02, allow_http=True), job.id
    )
    assert delivery.status == "failed" and "local or internal name" in delivery.log[0]["error"]


def test_a_receivers_answer_never_reaches_the_deliveries_log(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    receiver.statuses, receiver.body = [500], b"INTERNAL-ONLY: db_password=hunter2"
    job = finished_job(sqlite_store, receiver.url)
    settings = WebhookSettings(max_attempts=2, retry_base_s=0.05, poll_interval_s=0.02, **LOOPBACK)
    delivery = dispatch_until_settled(sqlite_store, settings, job.id)
    assert [entry["error"] for entry in delivery.log] == ["HTTP 500", "HTTP 500 (gave up after 2 attempts)"]
    assert "hunter2" not in repr(delivery) and "INTERNAL" not in repr(delivery.log)


def test_a_connection_failure_is_recorded_as_its_kind_only(sqlite_store: JobStore) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = finished_job(sqlite_store, f"http://127.0.0.1:{port}/x")
    delivery = dispatch_until_settled(sqlite_store, WebhookSettings(max_attempts=1, **LOOPBACK), job.id)
    assert delivery.log[0]["error"] == "connection failed (gave up after 1 attempts)"
    assert str(port) not in delivery.log[0]["error"]


def test_an_allowed_network_lets_an_internal_receiver_through() -> None:
    policy = CallbackPolicy(allowed_hosts=["10.20.0.0/16", "hooks.studio.internal"])
    assert policy.check_url("https://10.20.3.4/hooks") == "10.20.3.4"
    assert policy.check_url("https://hooks.studio.internal/x") == "hooks.studio.internal"
    with pytest.raises(CallbackRefused, match="DNS name"):
        policy.check_url("https://10.21.0.1/hooks")


# -- resolution failures are transient; NAT64, 6to4 and Teredo answers; port 0 and over-long names ------


def flaky_resolver(host: str, num_failures: int, calls: list[str]):
    """A resolver that fails `num_failures` times for `host` (as getaddrinfo does on a DNS blip), then
    answers loopback, where the test's receiver listens. `calls` records every lookup."""

    async def resolve(name: str, _port: int) -> list[str]:
        calls.append(name)
        if name == host and len(calls) <= num_failures:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return ["127.0.0.1"]

    return resolve


def test_a_host_that_does_not_resolve_at_send_time_is_retried_then_delivered(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    port = urlsplit(receiver.url).port
    job = finished_job(sqlite_store, f"http://hooks.example.com:{port}/hooks/previz")
    calls: list[str] = []
    policy = CallbackPolicy(
        allow_http=True,
        allowed_hosts=["127.0.0.1/32"],
        resolver=flaky_resolver("hooks.example.com", 2, calls),
    )
    settings = WebhookSettings(max_attempts=4, retry_base_s=0.05, retry_cap_s=0.2, poll_interval_s=0.02)
    delivery = dispatch_until_settled(sqlite_store, settings, job.id, policy)
    assert (delivery.status, delivery.attempts) == ("delivered", 3)
    assert [entry["error"] for entry in delivery.log] == [
        "`callback_url` host 'hooks.example.com' does not resolve",
        "`callback_url` host 'hooks.example.com' does not resolve",
        None,
    ]
    assert calls == ["hooks.example.com"] * 3
    [request] = receiver.requests
    assert request.verified and request.headers["Host"] == f"hooks.example.com:{port}"


def test_a_host_that_never_resolves_gets_max_attempts_then_the_delivery_fails(
    sqlite_store: JobStore, receiver: Receiver
) -> None:
    job = finished_job(sqlite_store, "https://gone.example.com/hooks")
    calls: list[str] = []
    policy = CallbackPolicy(resolver=flaky_resolver("gone.example.com", 1_000, calls))
    settings = WebhookSettings(max_attempts=3, retry_base_s=0.05, retry_cap_s=0.1, poll_interval_s=0.02)
    delivery = dispatch_until_settled(sqlite_store, settings, job.id, policy)
    assert (delivery.status, delivery.attempts, len(calls)) == ("failed", 3, 3)
    assert delivery.log[-1]["error"] == (
        "`callback_url` host 'gone.example.com' does not resolve (gave up after 3 attempts)"
    )
    assert receiver.requests == []


@pytest.mark.parametrize(
    "answer",
    [
        "64:ff9b::7f00:1",  # NAT64 (well-known prefix) of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254, the metadata service
        "64:ff9b::a00:8",  # NAT64 of 10.0.0.8
        "64:ff9b:1::808:808",  # the local-use NAT64 prefix: refused whatever it embeds
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:808:808::1",  # 6to4 of a public address: refused outright
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo (client 127.0.0.1)
        "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo (client 8.8.8.8)
        "::7f00:1",  # IPv4-compatible (deprecated) 127.0.0.1
    ],
)
def test_a_name_that_resolves_to_an_ipv4_translation_address_is_refused_at_send_time(answer: str) -> None:
    async def resolve(_host: str, _port: int) -> list[str]:
        return ["93.184.215.14", answer]  # one public answer does not excuse another

    with pytest.raises(CallbackRefused) as refused:
        asyncio.run(CallbackPolicy(resolver=resolve).target("https://hooks.example.com/x"))
    assert str(refused.value) == (
        "`callback_url` host 'hooks.example.com' resolves to a non-public address; refused"
    )


def test_a_nat64_answer_embedding_a_public_address_is_sent_there() -> None:
    async def resolve(_host: str, _port: int) -> list[str]:  # DNS64 on an IPv6-only cluster
        return ["64:ff9b::5db8:d70e"]  # 93.184.215.14

    target = asyncio.run(CallbackPolicy(resolver=resolve).target("https://hooks.example.com:8443/x"))
    assert (target.address, target.connect_url) == (
        "64:ff9b::5db8:d70e",
        "https://[64:ff9b::5db8:d70e]:8443/x",
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://hooks.example.com:0/x", "`callback_url` must not use port 0"),
        (
            f"https://{'a' * 64}.example.com/x",
            "`callback_url` host has a label of 64 characters; DNS allows at most 63",
        ),
        (
            "https://" + ".".join(["a" * 63] * 4) + ".com/x",
            "`callback_url` host name is 259 characters long; DNS allows at most 253",
        ),
        ("https://hooks..example.com/x", "`callback_url` host has an empty label"),
    ],
)
def test_port_0_and_over_long_dns_names_are_refused_at_create(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(CallbackRefused) as refused:
        CallbackPolicy().check_url(url)
    assert str(refused.value) == message
    with local_api(tmp_path) as api:
        answer = api.client.post("/v1/videos", json={"prompt": "a storm", **TINY, "callback_url": url})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == {
            "code": "invalid_callback_url",
            "message": message,
            "param": "callback_url",
        }


def test_a_63_character_label_and_a_253_character_name_pass_the_create_time_check() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57, "com"])
    assert len(longest) == 253
    assert CallbackPolicy().check_url(f"https://{longest}/x") == longest


def test_a_port_past_65535_is_refused_and_a_row_that_has_one_fails_instead_of_never_being_recorded(
    sqlite_store: JobStore,
) -> None:
    with pytest.raises(
        CallbackRefused, match="^`callback_url` has an invalid port in 'hooks.example.com:70000'$"
    ):
        CallbackPolicy().check_url("https://hooks.example.com:70000/x")
    job = finished_job(sqlite_store, "https://hooks.example.com:70000/x")  # written past the create check
    delivery = dispatch_until_settled(sqlite_store, WebhookSettings(poll_interval_s=0.02), job.id)
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.log[0]["error"] == "`callback_url` has an invalid port in 'hooks.example.com:70000'"

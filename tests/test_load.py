"""The load test of issue 7: a burst of 200 creates from 4 projects against a queue bound of 50.

Every answer is a 201 or a 429 with Retry-After; the store holds exactly the accepted jobs; every accepted
job completes. Run with -s to see the figures:

    PYTHONPATH=. python -m pytest tests/test_load.py -q -s -m slow
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from serve.jobs import JobStatus
from tests.support.cluster import Cluster

# slow: draining the accepted jobs takes minutes (an hour's bound); `make test-all` runs it
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NUM_PROJECTS = 4
JOBS_PER_PROJECT = 50
TINY = {"size": "96x64", "seconds": "0.5", "steps": 2, "upscale": "none"}
QUEUE_FULL_CODES = {"queue_full", "project_queue_full"}  # the global bound, or a project's own


async def _burst(clients: dict[str, httpx.AsyncClient], per_project: int) -> list[tuple[str, httpx.Response]]:
    """Every project's creates at once, interleaved: (project, answer) per request."""

    async def create(project: str, take: int) -> tuple[str, httpx.Response]:
        body = {"prompt": f"a crowd crosses a plaza at dusk, take {take}", "project": project, **TINY}
        return project, await clients[project].post("/v1/videos", json=body)

    return await asyncio.gather(
        *(create(project, take) for take in range(per_project) for project in clients)
    )


async def _run_burst(cluster: Cluster, projects: list[str]) -> list[tuple[str, httpx.Response]]:
    clients = {}
    for project in projects:
        sync = cluster.client(project)  # its base URL and headers (the project's key, once keys exist)
        clients[project] = httpx.AsyncClient(
            base_url=sync.base_url,
            headers={"Authorization": sync.http.headers["Authorization"]},
            timeout=300,
            limits=httpx.Limits(max_connections=JOBS_PER_PROJECT),
        )
    try:
        return await _burst(clients, JOBS_PER_PROJECT)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients.values()))


@pytest.mark.timeout(3600)  # draining the accepted jobs takes minutes on a shared CPU
def test_a_burst_of_200_creates_from_4_projects_meets_the_queue_bound_and_drops_nothing(
    cluster: Cluster,
) -> None:
    run = uuid.uuid4().hex[:6]
    projects = [f"load-{run}-{index}" for index in range(NUM_PROJECTS)]
    store = cluster.store()
    try:  # the bound counts every project's queued jobs: another test's still queued ones hold places too
        queued_before = store.count_by_status()[JobStatus.QUEUED]
    finally:
        store.close()
    started = time.monotonic()
    answers = asyncio.run(_run_burst(cluster, projects))
    burst_s = time.monotonic() - started

    accepted: dict[str, set[str]] = {project: set() for project in projects}
    rejected = 0
    for project, response in answers:
        assert response.status_code in (201, 429), response.text
        if response.status_code == 201:
            assert response.json()["project"] == project
            accepted[project].add(response.json()["id"])
            continue
        rejected += 1
        assert response.json()["error"]["code"] in QUEUE_FULL_CODES, response.text
        assert int(response.headers["Retry-After"]) >= 1
    accepted_ids = set().union(*accepted.values())
    assert len(answers) == NUM_PROJECTS * JOBS_PER_PROJECT
    assert len(accepted_ids) + rejected == len(answers)
    max_queued = cluster.config["applications"][0]["args"]["max_queued_jobs"]
    assert rejected >= 1 and len(accepted_ids) >= max_queued - queued_before, queued_before

    store = cluster.store()
    try:
        for project in projects:
            stored = {job.id for job in store.list(project=project, limit=1000)}
            assert stored == accepted[project], project  # exactly the 201s: none lost, none extra
    finally:
        store.close()

    drain_started = time.monotonic()
    finished = cluster.wait_for(sorted(accepted_ids), timeout_s=3000)
    drain_s = time.monotonic() - drain_started
    not_completed = {
        job_id: job["status"] for job_id, job in finished.items() if job["status"] != "completed"
    }
    assert not not_completed
    print(
        f"\nload: {len(answers)} creates from {NUM_PROJECTS} projects in {burst_s:.1f} s: "
        f"{len(accepted_ids)} accepted, {rejected} rejected (429); per project "
        f"{ {project: len(ids) for project, ids in accepted.items()} }; "
        f"all accepted completed {drain_s:.1f} s after the burst"
    )

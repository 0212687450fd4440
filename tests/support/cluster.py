"""The Previz app on a real local Ray instance, deployed from deploy/local.yaml with test overrides.

One cluster per test session (Ray start-up costs a minute on this CPU); tests isolate themselves by
project names and job ids.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve

from serve.auth import Role
from serve.cli import launch
from serve.cli.client import PrevizClient
from serve.jobs import JobStore
from serve.jobs.projects import ProjectExists
from serve.webhooks import open_job_store

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "deploy" / "local.yaml"
ARTIFACT_BUCKET = "previz-test-artifacts"
# the session app's I2V model (deploy/local.yaml): its experts' deployment and its keyframe encoder
I2V_DEPLOYMENTS = ("I2VDenoiser", "I2VHighNoiseDenoiser", "I2VLowNoiseDenoiser", "VAEEncoder")


@dataclass(slots=True)
class Cluster:
    url: str
    config: dict[str, Any]  # what is deployed now
    database_url: str
    keys: dict[str, str] = field(default_factory=dict)  # project -> a member key of it

    def client(self, project: str = "default") -> PrevizClient:
        """A client acting for `project` with a member key (the project is created when new)."""
        if project not in self.keys:
            self.keys[project] = self.key_for(project)
        return PrevizClient(self.url, api_key=self.keys[project], timeout_s=60)

    def key_for(self, project: str, role: Role = "member") -> str:
        """A new key of `project` (created when new), written straight into the cluster's job store."""
        store = self.store()
        try:
            if store.get_project(project) is None:
                with contextlib.suppress(ProjectExists):
                    store.create_project(project)
            return store.create_key(project, role, "test")[1]
        finally:
            store.close()

    def store(self) -> JobStore:
        return open_job_store(self.database_url)

    def redeploy(self, config: dict[str, Any]) -> None:
        launch.deploy(config)
        self.config = config
        time.sleep(1)  # let the controller pick up the new config before polling its status
        launch.wait_ready(self.url, timeout_s=600)

    @contextmanager
    def scaled(self, deployment: str, num_replicas: int) -> Iterator[None]:
        """The session app with `num_replicas` of `deployment` inside the block, as it was after it, also
        when the block fails: every later test, and every extra app (it copies `config`), sees the
        session's own replicas again, not those of a test that failed half-way."""
        before = self.config
        (entry,) = [d for d in before["applications"][0]["deployments"] if d["name"] == deployment]
        self.redeploy(with_replicas(before, deployment, num_replicas))
        wait_for_replicas(deployment, num_replicas)
        try:
            yield
        finally:
            self.redeploy(before)
            wait_for_replicas(deployment, entry["num_replicas"])

    def wait_for(self, job_ids: list[str], timeout_s: float = 600) -> dict[str, dict]:
        store = self.store()
        try:
            clients = {job_id: self.client(store.get(job_id).project) for job_id in job_ids}
        finally:
            store.close()
        deadline = time.monotonic() + timeout_s
        jobs: dict[str, dict] = {}
        while time.monotonic() < deadline:
            jobs = {job_id: clients[job_id].get(job_id) for job_id in job_ids}
            if all(job["status"] in ("completed", "failed", "cancelled") for job in jobs.values()):
                return jobs
            time.sleep(0.5)
        stuck = {job_id: (job["status"], job["stage"]) for job_id, job in jobs.items()}
        raise TimeoutError(f"jobs not finished after {timeout_s} s: {stuck}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_replicas(config: dict[str, Any], deployment: str, num_replicas: int) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    for entry in changed["applications"][0]["deployments"]:
        if entry["name"] == deployment:
            entry["num_replicas"] = num_replicas
    return changed


@contextmanager
def previz_cluster(workdir: Path, s3_server) -> Iterator[Cluster]:
    """Deploy the app with SQLite in `workdir` and artifacts on the test S3 server."""
    s3_server.client().create_bucket(Bucket=ARTIFACT_BUCKET)
    # Replicas inherit the driver's environment when this process starts Ray: S3 credentials go there.
    os.environ.update(
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_DEFAULT_REGION=s3_server.region,
    )
    database_url = f"sqlite:///{workdir / 'jobs.db'}"
    config = launch.load_config(
        LOCAL_CONFIG,
        port=free_port(),
        args_overrides={
            "database_url": database_url,
            "storage": {
                "kind": "s3",
                "s3_uri": f"s3://{ARTIFACT_BUCKET}/clips",
                "s3_endpoint_url": s3_server.endpoint_url,
                "s3_region": s3_server.region,
            },
            "max_jobs_in_flight": 8,
            "max_attempts": 5,  # test_faults kills a denoiser and the Scheduler under the same jobs: headroom
            "max_queued_jobs": 50,  # test_load's burst must meet the bound; other tests queue far fewer
            "poll_interval_s": 0.2,
            "envelope": {"min_pixels": 64 * 64},  # the tests' clips are tiny (96x64)
            "decoder": {"draft": "fast"},  # drafts decode with TAEHV (random preset weights), finals the VAE
            # test_webhooks' receiver listens on loopback: an internal receiver allowed explicitly
            "webhooks": {"allow_http": True, "allowed_hosts": ["127.0.0.1/32"]},
            # refuses only clips safety_hooks.BLOCKED_WIDTH wide (test_safety): no redeploy needed
            "safety": {"frame_check": "tests.support.safety_hooks:block_test_width"},
        },
    )
    url = launch.deploy(config)
    try:
        launch.wait_ready(url, timeout_s=900)
        yield Cluster(url=url, config=config, database_url=database_url)
    finally:
        launch.shutdown()


@dataclass(frozen=True, slots=True)
class ExtraApp:
    """A second Serve app beside the session's, for one test module (see `extra_app`)."""

    name: str
    url: str  # its base URL: the cluster's, under the app's route
    config: dict[str, Any]  # its application config as deployed
    database_url: str  # its own job store
    client: PrevizClient  # a member of project `extra` on it


@contextmanager
def extra_app(
    cluster: Cluster,
    name: str,
    workdir: Path,
    configure: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 600,
) -> Iterator[ExtraApp]:
    """Deploy the session app's config again as app `name` at route `/name` in the same Ray instance, with
    its own SQLite store in `workdir` and its own S3 prefix, changed by `configure(app_config)` (its `args`
    and `deployments`), and delete it afterwards. The session app is left as it is (a config change of it
    would restart all its replicas), so a module that needs other settings (sharded experts, another
    layout or model) costs one more app for its own duration, not a second cluster. Each of its
    deployments asks for 0.1 CPU so it fits beside the session app. It serves the T2V model only (the
    session app's I2V deployments are not copied: two replicas fewer per module); `configure` may add
    `i2v` back with its deployments."""
    session = cluster.config
    app = copy.deepcopy(session["applications"][0])
    app.update(name=name, route_prefix=f"/{name}")
    args = app["args"]
    args.pop("i2v", None)
    app["deployments"] = [entry for entry in app["deployments"] if entry["name"] not in I2V_DEPLOYMENTS]
    args["database_url"] = f"sqlite:///{workdir / f'{name}-jobs.db'}"
    args["storage"] = {**args["storage"], "s3_uri": args["storage"]["s3_uri"] + f"-{name}"}
    for entry in app["deployments"]:
        entry["ray_actor_options"] = {"num_cpus": 0.1}
    if configure is not None:
        configure(app)
    launch.deploy({**session, "applications": [*session["applications"], app]})
    url = f"{cluster.url}/{name}"
    try:
        launch.wait_ready(url, timeout_s=timeout_s, app_name=name)
        store = open_job_store(args["database_url"])
        try:
            store.create_project("extra")
            key = store.create_key("extra", "member", "test")[1]
        finally:
            store.close()
        client = PrevizClient(url, api_key=key, timeout_s=60)
        yield ExtraApp(name, url, app, args["database_url"], client)
    finally:
        launch.deploy(session)  # deletes the extra app, leaves the session's as it was
        deadline = time.monotonic() + timeout_s
        while name in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)


def replica_actor_names(deployment: str, app: str = "previz") -> list[str]:
    """The named actors of `app`'s `deployment` replicas: starting, running and still stopping ones (a
    replacement or a scale-down lists both for a while)."""
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")
    )


def wait_for_replicas(
    deployment: str, num_replicas: int, app: str = "previz", timeout_s: float = 600
) -> list[str]:
    """The replica actor names of `app`'s `deployment` once there are `num_replicas` of them (a replica
    Serve stopped leaves the list only when its actor is gone, some seconds after the app is RUNNING)."""
    deadline = time.monotonic() + timeout_s
    while len(names := replica_actor_names(deployment, app)) != num_replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app}#{deployment} lists {names} after {timeout_s} s, not {num_replicas}")
        time.sleep(0.5)
    return names

"""The Ingress's FastAPI app in this process, without Ray: a real SQLite job store, a local artifact
folder and a stand-in Scheduler handle that records what the routes ask of it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from fastapi.testclient import TestClient

from serve.auth import Role
from serve.config import PrevizArgs
from serve.http.app import app
from serve.http.deps import IngressState, current_state
from serve.jobs import JobStore
from serve.storage import JobArtifacts

TINY = {"size": "96x64", "seconds": "0.5", "steps": 4}
# the tests' clips are tiny (96x64): a deployment of the tiny preset serves sizes from 64x64
TEST_ENVELOPE = {"min_pixels": 64 * 64}


@dataclass
class RecordingScheduler:
    """Stands in for the Scheduler's DeploymentHandle: `handle.wake.remote()` etc. are recorded."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        calls = self.calls

        class _Method:
            @staticmethod
            def remote(*args: Any) -> None:
                calls.append((name, args))

        return _Method()


@dataclass
class LocalApi:
    client: TestClient  # acts for project "default" with an admin key
    store: JobStore
    state: IngressState
    scheduler: Any
    artifacts_root: Path
    admin_key: str
    clients: dict[str, TestClient] = field(default_factory=dict)  # project -> a member's client

    def client_for(self, project: str) -> TestClient:
        """A client acting for `project` with a member key (the project is created when new)."""
        if project not in self.clients:
            self.clients[project] = self.client_with(self.key_for(project))
        return self.clients[project]

    def key_for(self, project: str, role: Role = "member") -> str:
        """A new key of `project` (created when new)."""
        if self.store.get_project(project) is None:
            self.store.create_project(project)
        return self.store.create_key(project, role, "test")[1]

    def client_with(self, key: str | None) -> TestClient:
        """A client sending `key` (none: no Authorization header)."""
        return TestClient(app, headers={"Authorization": f"Bearer {key}"} if key else {})


def finish(api: LocalApi, video_id: str) -> None:
    """Run a queued job to SUCCEEDED by hand, with a stored clip and poster as the Finisher writes them."""
    job = api.store.claim(video_id, "test-scheduler")
    assert job is not None
    keys = JobArtifacts(job.project, job.id)
    clip, poster = keys.clip(job.attempt), keys.poster(job.attempt)
    api.state.artifacts.put_bytes(clip, b"\x00\x00\x00\x18ftypmp42 fake mp4", "video/mp4")
    api.state.artifacts.put_bytes(poster, b"\xff\xd8\xff fake", "image/jpeg")
    assert api.store.succeed(job.id, job.attempt, artifact_uri=clip, artifact_bytes=30, poster_uri=poster)


@contextmanager
def local_api(tmp_path: Path, scheduler: Any = None, **overrides: Any) -> Iterator[LocalApi]:
    fields: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'jobs.db'}",
        "storage": {"kind": "local", "local_root": str(tmp_path / "artifacts")},
        "envelope": TEST_ENVELOPE,
    }
    args = PrevizArgs(**{**fields, **overrides})
    scheduler = scheduler if scheduler is not None else RecordingScheduler()
    state = IngressState(args, args.sampling, scheduler)
    with serving(state):
        try:
            admin_key = state.store.ensure_default_project("default")
            with TestClient(app, headers={"Authorization": f"Bearer {admin_key}"}) as client:
                yield LocalApi(client, state.store, state, scheduler, tmp_path / "artifacts", admin_key)
        finally:
            state.store.close()


@contextmanager
def serving(state: IngressState) -> Iterator[IngressState]:
    """The app's routes (and its body policy and page) see `state` while inside, through FastAPI's
    `dependency_overrides` of `current_state`; what was there before comes back after."""
    previous = app.dependency_overrides.get(current_state)
    app.dependency_overrides[current_state] = lambda: state
    try:
        yield state
    finally:
        if previous is None:
            app.dependency_overrides.pop(current_state, None)
        else:
            app.dependency_overrides[current_state] = previous


@contextmanager
def http_server(asgi: Any = app) -> Iterator[str]:
    """The app (with whatever IngressState is current), or `asgi`, behind a real uvicorn server on
    loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the test HTTP server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def send_raw(url: str, request: bytes) -> tuple[str, bool]:
    """Send `request` as it is to the server at `url`; its first answer, and whether it then closed."""
    with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=30) as connection:
        connection.sendall(request)
        answer = connection.recv(65536).decode()
        return answer, connection.recv(65536) == b""

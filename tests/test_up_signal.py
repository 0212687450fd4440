"""`previz up` stops cleanly on SIGTERM (what a process manager or `docker stop` sends), as on Ctrl-C:
Serve and Ray are shut down and the exit status is 0, not a death in Ray's fatal-signal handler; its log
shows each deployment as it becomes ready and no warnings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_stops_previz_up_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PREVIZ_API_KEY": "", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "from serve.cli import main; main()", "up"]
    command += ["--config", str(REPO / "deploy" / "local.yaml"), "--port", str(free_port())]
    log = tmp_path / "up.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while "Ctrl-C (or SIGTERM) stops" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "previz up did not become ready"
                time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text()
    assert code == 0, text
    assert "Previz stopped" in text and "Traceback" not in text
    # a clean start and stop say what they do and nothing else: each deployment's readiness, no warnings
    for deployment in ("Ingress", "Scheduler", "TextEncoder", "VAEDecoder", "Finisher"):
        assert f"{deployment} ready (" in text, text
    assert "WARNING" not in text and "graceful_shutdown failed" not in text, text

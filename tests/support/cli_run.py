"""Running the `previz` CLI's `main()` in the test process (no interpreter start per case)."""

from __future__ import annotations

import sys

import pytest

from serve.cli import main


def previz(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `main()` run in this process."""
    monkeypatch.setattr(sys, "argv", ["previz", *args])
    try:
        main()
        code = 0
    except SystemExit as exited:
        code = int(exited.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err

"""`python -m loadtest.bench_vae` writes one row per variant, each against the one-device float32 decode."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loadtest.bench_vae import has_bf16, main


def test_bench_writes_a_row_per_variant(tmp_path: Path, capsys) -> None:
    out = tmp_path / "vae.json"
    assert main(["--preset", "tiny", "--size", "64x64", "--frames", "5", "--ranks", "1", "--repeats", "1",
                 "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["variants"]
    bf16 = ["bf16"] if has_bf16(torch.device("cpu")) else []  # a CPU with bf16 in hardware
    assert [row["name"] for row in rows] == ["1 rank", "tiled", "fast", *bf16]
    assert set(rows[0]) == {"name", "ranks", "decoder", "dtype", "seconds", "max_abs_diff"}
    assert rows[0]["max_abs_diff"] == 0.0 and rows[2]["decoder"] == "fast"
    assert "python -m loadtest.bench_vae --preset tiny" in capsys.readouterr().out

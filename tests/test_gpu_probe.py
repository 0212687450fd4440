"""The GPU probe: its entry point imports on a machine without diffusers and pydantic, finds them in the
wheel folder of scripts/gpu_wheels.sh, and a CPU dry run through that folder writes every field of the
JSON (the GPU figures null); FP8 asked for on the CPU is refused; FLOPs are counted as the note does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from loadtest import gpu_probe, probe_report
from pipeline.denoise.flops import wan_forward_flops
from tests.support.gpu_machine import SITECUSTOMIZE

REPO = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 64 * 2**20


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`bash scripts/gpu_wheels.sh DIR` for this interpreter's Python and platform (CI's own)."""
    folder = tmp_path_factory.mktemp("gpu-wheels")
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_wheels.sh"), str(folder)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a subprocess that sees only torch, transformers, peft, triton and their
    requirements of this interpreter's packages (tests/support/gpu_machine.py)."""
    folder = tmp_path_factory.mktemp("gpu-machine")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(folder), "CUDA_VISIBLE_DEVICES": ""}


def run_python(code_or_args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def test_the_wheel_set_holds_diffusers_pydantic_core_and_previz_under_64_mib(wheels: Path) -> None:
    names = {path.name.split("-")[0].lower() for path in wheels.glob("*.whl")}
    assert {"diffusers", "pydantic", "pydantic_core", "previz"} <= names
    assert not names & {"torch", "transformers", "peft", "triton", "numpy", "huggingface_hub"}
    assert sum(path.stat().st_size for path in wheels.glob("*.whl")) < MAX_WHEEL_BYTES


def test_the_entry_point_imports_without_diffusers_and_pydantic_and_finds_them_in_the_wheels(
    wheels: Path, gpu_machine: dict[str, str]
) -> None:
    code = f"""
import importlib, sys
from pathlib import Path
import loadtest.gpu_probe as probe
for name in ("diffusers", "pydantic", "pydantic_core"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{{name}} is importable before --wheels")
used, project = probe.use_wheels(Path({str(wheels)!r}))
import diffusers, pydantic, pydantic_core
print(diffusers.__file__, pydantic.__file__, pydantic_core.__file__, project, sep="\\n")
"""
    done = run_python(["-c", code], gpu_machine)
    assert done.returncode == 0, done.stderr[-3000:]
    *modules, project = done.stdout.split()
    assert all("previz-wheels-" in module and "site-packages" not in module for module in modules)
    assert project == "checkout"  # the probe runs this checkout's pipeline/, not an older wheel of it


def test_a_cpu_dry_run_through_the_wheels_writes_every_field_with_the_gpu_figures_null(
    wheels: Path, gpu_machine: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "dry.json"
    done = run_python(
        ["-m", "loadtest.gpu_probe", "--dry-run", "--wheels", str(wheels), "--out", str(out)], gpu_machine
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report) == [f.name for f in fields(probe_report.Report)]
    for key, record in [("device", probe_report.DeviceInfo), ("matmul", probe_report.MatmulRate)]:
        assert list(report[key]) == [f.name for f in fields(record)]
    for key, record in [("engine", probe_report.EngineRecord), ("fp8", probe_report.Fp8Record)]:
        assert list(report[key]) == [f.name for f in fields(record)]
    assert list(report["vae"]) == [f.name for f in fields(probe_report.VaeRecord)]
    forward_fields = [f.name for f in fields(probe_report.ForwardRecord)]
    assert all(list(forward) == forward_fields for forward in report["forwards"])
    assert report["dry_run"] and report["wheels"] and report["packages"]["diffusers"].startswith("0.42")

    # every planned measurement is listed: compiled first, then each default backend, each size and row count
    planned = [(f["mode"], f["backend"], f["size"], f["rows"]) for f in report["forwards"]]
    grid = [(size, rows) for size in ("480p", "720p") for rows in (1, 2)]
    modes = [("compiled", "native"), ("eager", "native"), ("eager", "_native_cudnn")]
    assert planned == [(mode, backend, size, rows) for mode, backend in modes for size, rows in grid]
    # the figures only a GPU can give are present and null
    assert report["matmul"]["bf16_flops_per_s"] is None and report["matmul"]["fp8_flops_per_s"] is None
    assert all(f["seconds"] is None and f["mfu_datasheet"] is None for f in report["forwards"])
    assert all(f["peak_memory_bytes"] is None for f in report["forwards"])
    assert {(fit["size"], fit["weights"]) for fit in report["memory_fit"]} == {
        (size, weights) for size in ("480p", "720p") for weights in ("one_expert", "both_experts")
    }
    assert all(fit["max_rows"] is None and fit["extrapolated"] for fit in report["memory_fit"])
    assert report["engine"]["engine_seconds"] is None and report["engine"]["bare_seconds"] is None
    assert report["fp8"]["psnr_db"] is None
    assert report["fp8"]["status"].startswith("unsupported: FP8 matmuls (torch._scaled_mm) need a CUDA GPU")
    # ...while the code behind them ran at the tiny shape
    checks = report["dry_run_checks"]
    assert all(checks[f"eager native {size} x{rows} s"] > 0 for size, rows in grid)
    assert checks["engine cached steps"] == 1 == report["engine"]["num_cached_steps"]  # the cached row served
    assert checks["engine iteration s"] > 0
    # the VAE: every variant ran at the tiny shape (2 ranks: on 2 gloo processes), its GPU figures null
    variant_fields = [f.name for f in fields(probe_report.VaeVariant)]
    variants = report["vae"]["variants"]
    names = ["full float32", "full bfloat16", "tiled bfloat16", "fast bfloat16", "2 ranks bfloat16"]
    assert [v["name"] for v in variants] == names and report["vae"]["status"] == "dry run"
    assert all(list(v) == variant_fields and v["status"] == "dry run" for v in variants)
    assert all(v["seconds"] is None and v["max_abs_diff"] is None for v in variants)
    # tiles of 64 pixels: the tiny 96 x 64 frame is cut in tiles, as 720p is in 256-pixel ones
    expected = [("vae", 1, None), ("vae", 1, None), ("vae", 1, 64), ("fast", 1, None), ("vae", 2, None)]
    assert [(v["decoder"], v["ranks"], v["tile"]) for v in variants] == expected
    three_latent_frames = 9  # the tiny 720p stand-in: every decoder gives the full VAE's frame count
    assert all(checks[f"vae {name} s"] > 0 for name in names)
    assert all(checks[f"vae {name} frames"] == three_latent_frames for name in names)
    # against the float32 frames: bf16 rounding moves a few uint8 levels (4 measured), a missing halo about
    # 88 (0.35: the 2-rank decode with Grid.with_halo padding zeros instead); tiles blend their overlaps,
    # another computation at the seams (0.22 measured), so the tiled row is only compared
    assert all(0 < checks[f"vae {name} max abs diff"] < 0.1 for name in ("full bfloat16", "2 ranks bfloat16"))
    assert checks["vae tiled bfloat16 max abs diff"] > 0 and "vae fast bfloat16 max abs diff" not in checks


def test_fp8_asked_for_on_the_cpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        gpu_probe.main(["--dry-run", "--fp8", "on", "--out", str(tmp_path / "never.json")])
    assert str(refused.value) == (
        "gpu_probe: --fp8 on: FP8 matmuls (torch._scaled_mm) need a CUDA GPU with FP8 tensor cores (compute "
        "capability 8.9+: Ada, Hopper, Blackwell), but the device is 'cpu'; set `fp8: false`."
    )
    assert not (tmp_path / "never.json").exists()


def test_without_a_gpu_the_probe_says_so_and_exits_0() -> None:
    done = run_python(["-m", "loadtest.gpu_probe"], {**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "gpu_probe: no CUDA GPU on this machine; nothing to probe (--dry-run checks the probe on CPU)."
    )


def test_the_memory_fit_is_a_least_squares_line_through_the_measured_rows() -> None:
    assert gpu_probe._line([(1, 5.0e9), (2, 8.0e9), (4, 14.0e9)]) == pytest.approx((2.0e9, 3.0e9))
    assert gpu_probe._line([(2, 8.0e9)]) == (0.0, 4.0e9)  # one row count: through the origin


def test_a14b_forward_flops_match_the_published_one_gpu_time_at_half_of_peak() -> None:
    row_720p = wan_forward_flops(75_600, dim=5120, ffn_dim=13824, num_layers=40)
    assert row_720p == pytest.approx(6.523e15, rel=1e-3)
    assert wan_forward_flops(32_760, dim=5120, ffn_dim=13824, num_layers=40, num_rows=2) == pytest.approx(
        2 * 1.678e15, rel=1e-3
    )
    # 40 guided steps (2 rows) at 50 % of an H100's 989 TFLOP/s: 1055 s against the published 1041.5 s
    assert 40 * 2 * row_720p / (0.5 * 989e12) == pytest.approx(1041.5, rel=0.02)


def test_a_vae_variant_that_fails_is_recorded_and_the_next_one_runs() -> None:
    probe = gpu_probe.Probe(gpu_probe.parse(["--dry-run"]), torch.device("cpu"))
    variant = probe_report.VaeVariant("full float32", "vae", "float32", 1, None, "ok")

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 GiB")

    failed = probe.vae_variant(variant, 1.0, out_of_memory, [])
    assert failed.status == "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 44.00 GiB"
    assert failed.seconds is None and probe.checks["vae full float32"] == failed.status


def test_the_two_rank_decode_says_skipped_with_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = gpu_probe.Probe(gpu_probe.parse([]), torch.device("cpu"))
    probe.device = torch.device("cuda", 0)  # what the probe runs on where a GPU is lent
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    latents = torch.zeros(16, 3, 8, 12)
    variant = gpu_probe.probe_vae_ranks(probe, None, latents, "bfloat16", [])
    assert (variant.name, variant.ranks, variant.status) == ("2 ranks bfloat16", 2, "skipped: 1 GPU")


def test_steps_pick_the_probes_steps_and_an_unknown_one_is_refused(capsys) -> None:
    assert gpu_probe.parse(["--steps", "matmul,vae"]).steps == ["matmul", "vae"]
    assert gpu_probe.parse([]).steps == list(gpu_probe.STEPS) and gpu_probe.parse([]).vae_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        gpu_probe.parse(["--steps", "vae,decode"])
    assert "--steps must name some of matmul, compile, eager, fp8, engine, vae, scaling but has decode" in (
        capsys.readouterr().err
    )

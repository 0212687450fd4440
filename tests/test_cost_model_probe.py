"""loadtest.cost_model refitted from a GPU probe report (`--from-probe FILE`): it recovers the throughputs
and the serial part that produced the report's seconds, and refuses a dry run's report, which has none."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest import cost_model
from loadtest.cost_model import A14B, FLOAT32_DECODE_FACTOR, SIZES, CostModel, from_probe
from loadtest.probe_report import FORMAT as PROBE_FORMAT


def probe_report(truth: CostModel | None, vae_s: float | None = None) -> dict:
    """The parts of a loadtest.gpu_probe report the refit reads; seconds from `truth` (None: a dry run)."""
    forwards = []
    for size in ("480p", "720p"):
        for rows in (1, 2):
            tokens = A14B.num_video_tokens(*SIZES[size], 81)
            seconds = None if truth is None else truth.forward_s(tokens, rows)
            forwards.append(
                {"mode": "eager", "backend": "native", "size": size, "rows": rows, "seconds": seconds}
            )
            slower = None if seconds is None else 1.3 * seconds  # another backend: the fastest one counts
            forwards.append(
                {"mode": "eager", "backend": "other", "size": size, "rows": rows, "seconds": slower}
            )
    peak = None if truth is None else truth.peak_flops
    return {
        "format": PROBE_FORMAT,
        "device": {
            "name": "NVIDIA H100 80GB HBM3" if truth else None,
            "type": "cuda" if truth else "cpu",
            "datasheet_bf16_flops_per_s": peak,
        },
        "matmul": {"bf16_flops_per_s": None if truth is None else 0.8 * peak},
        "forwards": forwards,
        "vae": {
            "size": "720p",
            "num_frames": 81,
            "variants": [  # the float32 decode twice as slow: the bf16 one is read first
                {"name": "full float32", "seconds": None if vae_s is None else 2.2 * vae_s},
                {"name": "full bfloat16", "seconds": vae_s},
                {"name": "tiled bfloat16", "seconds": None if vae_s is None else 1.3 * vae_s},
            ],
        },
    }


def test_the_refit_recovers_the_throughputs_and_serial_part_behind_a_probe_report() -> None:
    truth = CostModel(peak_flops=989e12, matmul_mfu=0.42, attention_mfu=0.63)
    fitted = from_probe(probe_report(truth, vae_s=9.0))
    assert fitted.matmul_mfu == pytest.approx(0.42, rel=1e-6)
    assert fitted.attention_mfu == pytest.approx(0.63, rel=1e-6)
    assert fitted.vae_decode_s_per_gigapixel == pytest.approx(9.0 / (1280 * 720 * 81 / 1e9))
    assert fitted.link_bandwidth == CostModel().link_bandwidth  # one GPU measures no collectives
    # without a bf16 figure (that variant failed), the float32 one over the model's factor
    report = probe_report(truth, vae_s=9.0)
    report["vae"]["variants"][1]["seconds"] = None
    assert from_probe(report).vae_decode_s_per_gigapixel == pytest.approx(
        2.2 * 9.0 / FLOAT32_DECODE_FACTOR / (1280 * 720 * 81 / 1e9)
    )
    assert fitted.clip_s(1280, 720) == pytest.approx(
        truth.clip_s(1280, 720) - truth.decode_s(1280, 720, 81) + 9.0
    )


def test_a_dry_run_report_or_one_size_only_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"no GPU figures \(a --dry-run\?\)"):
        from_probe(probe_report(None))
    report = probe_report(CostModel())
    report["forwards"] = [f for f in report["forwards"] if f["size"] == "720p"]
    with pytest.raises(ValueError, match="refitting needs both 480p and 720p"):
        from_probe(report)


def test_the_cli_prints_the_refit_and_exits_2_on_a_dry_run(tmp_path: Path, capsys) -> None:
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe_report(CostModel(matmul_mfu=0.4, attention_mfu=0.7), vae_s=12.0)))
    assert cost_model.main(["--from-probe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "matmul MFU 0.400, attention MFU 0.700" in out and "720p clip, 40 steps CFG, 1 GPU" in out
    path.write_text(json.dumps(probe_report(None)))
    assert cost_model.main(["--from-probe", str(path)]) == 2


def test_the_vae_stride_is_the_a14b_vaes_and_gives_the_published_token_counts() -> None:
    assert (A14B.vae_scale_temporal, A14B.vae_scale_spatial, A14B.patch_size) == (4, 8, (1, 2, 2))
    assert A14B.num_video_tokens(1280, 720, 81) == 75_600 and A14B.num_video_tokens(832, 480, 81) == 32_760


def test_the_serial_part_splits_into_decode_text_and_rest_and_only_decode_follows_the_choices() -> None:
    model, size = CostModel(), (1280, 720, 81)
    gigapixels = 1280 * 720 * 81 / 1e9
    # the split keeps the fitted total of 242.6 s per 1e9 pixel-frames, plus text encoding's FLOPs
    assert model.serial_s(*size) == pytest.approx(242.6 * gigapixels + model.text_encode_s())
    assert 0.01 < model.text_encode_s() < 0.1
    decode = model.decode_s(*size)
    assert decode == pytest.approx(170.0 * gigapixels)  # 12.5 s: bf16 on one GPU
    eight = replace(model, decode_ranks=8)
    assert decode / eight.decode_s(*size) == pytest.approx(2.72 / 0.83, rel=0.01)  # TensorRT-LLM's ratio
    assert replace(model, decode_dtype="float32").decode_s(*size) == pytest.approx(2 * decode)
    assert replace(model, decode_decoder="fast").decode_s(*size) == pytest.approx(decode * 0.25 / 5.5)
    rest = model.serial_s(*size) - decode
    assert eight.serial_s(*size) - eight.decode_s(*size) == pytest.approx(rest)

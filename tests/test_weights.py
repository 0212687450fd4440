"""Presets are seeded and identical; the Diffusers layout round-trips through folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.s3sync import upload_folder
from pipeline.spec import ModelSpec
from pipeline.weights import (
    WanComponents,
    build_preset,
    load_components,
    save_components,
    wan_scheduler,
)
from tests.support.wan_reference import MAX_ABS_DIFF, run_diffusers, run_staged, tiny_request


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    return build_preset("tiny")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny: WanComponents) -> Path:
    return save_components(tiny, tmp_path_factory.mktemp("models") / "wan-tiny")


def _state_dicts_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preset_is_identical_on_every_build(tiny: WanComponents) -> None:
    again = build_preset("tiny")
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        assert _state_dicts_equal(getattr(tiny, name), getattr(again, name)), name
    assert not _state_dicts_equal(tiny.transformer, tiny.transformer_2)


def test_preset_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_preset("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_preset_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"`model` preset must be one of tiny, small, tiny-i2v, small-i2v but is 'huge'\."
    ):
        build_preset("huge")


def test_saved_folder_has_the_diffusers_wan22_layout(tiny_folder: Path) -> None:
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["boundary_ratio"] == 0.875
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_folder / name).is_dir(), name


def test_folder_round_trip_loads_identical_weights_and_passes_equivalence(
    tiny: WanComponents, tiny_folder: Path
) -> None:
    loaded = load_components(str(tiny_folder), device="cpu")
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        assert _state_dicts_equal(getattr(tiny, name), getattr(loaded, name)), name
    request = tiny_request(seed=99)
    staged, _ = run_staged(loaded, request)
    reference, _ = run_diffusers(loaded, request)
    original, _ = run_staged(tiny, request)
    assert float(np.abs(staged - reference).max()) <= MAX_ABS_DIFF
    assert np.array_equal(staged, original)


def test_shipped_flow_shift_3_is_overridden_with_12_unless_kept(tmp_path: Path, tiny: WanComponents) -> None:
    shipped = WanComponents(**{f: getattr(tiny, f) for f in tiny.__slots__})
    shipped.scheduler = wan_scheduler(flow_shift=3.0)
    folder = save_components(shipped, tmp_path / "wan-shipped")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 3.0
    assert load_components(str(folder), device="cpu").scheduler.config.flow_shift == 12.0
    kept = load_components(str(folder), device="cpu", keep_shipped_flow_shift=True)
    assert kept.scheduler.config.flow_shift == 3.0 and kept.model.flow_shift == 3.0
    custom = load_components(str(folder), device="cpu", model=ModelSpec(flow_shift=5.0))
    assert custom.scheduler.config.flow_shift == 5.0


def test_folder_missing_a_component_is_named(tmp_path: Path, tiny_folder: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((tiny_folder / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"missing transformer, transformer_2, vae, text_encoder"):
        load_components(str(broken), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        load_components(str(tmp_path / "nowhere"), device="cpu")


def test_s3_round_trip_downloads_once_and_passes_equivalence(
    s3_server, tiny: WanComponents, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="previz-models")
    assert upload_folder(tiny_folder, "s3://previz-models/wan2.2/tiny", client=client) > 0
    # The user's path: endpoint and credentials come from the standard AWS_* environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    seen: list[tuple[int, int]] = []
    loaded = load_components(
        "s3://previz-models/wan2.2/tiny",
        device="cpu",
        cache_dir=tmp_path / "cache",
        progress=lambda *p: seen.append(p),
    )
    assert loaded.source == "s3://previz-models/wan2.2/tiny"
    assert seen and seen[-1][0] == seen[-1][1] > 0
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        assert _state_dicts_equal(getattr(tiny, name), getattr(loaded, name)), name
    request = tiny_request(seed=5)
    staged, _ = run_staged(loaded, request)
    reference, _ = run_diffusers(loaded, request)
    assert float(np.abs(staged - reference).max()) <= MAX_ABS_DIFF

    mirror = tmp_path / "cache" / "previz-models" / "wan2.2" / "tiny"
    weights = mirror / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    load_components("s3://previz-models/wan2.2/tiny", device="cpu", cache_dir=tmp_path / "cache")
    assert weights.stat().st_mtime_ns == stamp  # present and verified: not downloaded again

"""The second model on the serving side, without a cluster: the config names Wan2.2-I2V-A14B beside
Wan2.2-T2V-A14B (`i2v`), its args are the T2V fields with its own source, recipe, experts and adapters;
the app binds its experts (the T2V deployment classes under the `I2V` prefix, split or colocated) and a
VAEEncoder, sharing the text encoder, decoder, upscaler and finisher; `GET /v1/models` lists both."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve._compat import bound_deployment_names
from serve.app import build_app
from serve.cli import launch
from serve.config import PrevizArgs
from tests.support.api_app import local_api

REPO = Path(__file__).resolve().parents[1]
SHARED = ["Finisher", "Housekeeping", "Ingress", "Scheduler", "TextEncoder", "Upscaler", "VAEDecoder"]


def test_the_i2v_args_are_the_t2v_fields_with_the_i2v_models_own() -> None:
    args = PrevizArgs(i2v={"model": "tiny-i2v", "experts": {"layout": "colocated"}})
    i2v = args.for_i2v()
    assert (i2v.model, i2v.sampling.boundary_ratio, i2v.sampling.flow_shift) == ("tiny-i2v", 0.9, 5.0)
    assert (i2v.sampling.guidance_high, i2v.sampling.guidance_low) == (3.5, 3.5)
    assert i2v.experts.layout == "colocated" and args.experts.layout == "split"
    assert i2v.serves_draft and i2v.i2v is None and i2v.database_url == args.database_url
    # a real I2V model has no draft tier unless its distill LoRA is named, as for T2V
    assert not PrevizArgs(i2v={"model": "/models/wan22-i2v"}).for_i2v().serves_draft
    with pytest.raises(ValidationError, match="exists for the presets"):
        PrevizArgs(i2v={"model": "/models/wan22-i2v", "adapters": {"draft_lora": "builtin"}})
    with pytest.raises(ValueError, match="serves no image-to-video model"):
        PrevizArgs().for_i2v()


CACHE = {"threshold": 0.06, "max_skip": 2, "warmup_steps": 10}


def test_a_config_asking_a_final_step_cache_of_i2v_weights_without_a_curve_is_refused_at_load() -> None:
    """Real I2V weights have no step-cache curve: a config turning the final tier's cache on for them is
    refused when the app's args are read (`build_app`, as `serve run` and `previz up` do), not request by
    request at admission; the presets calibrate their own curve, so theirs is taken."""
    args = {"i2v": {"model": "/models/wan22-i2v", "sampling": {"final_cache": CACHE}}}
    with pytest.raises(ValidationError, match=r"set `i2v.sampling.final_cache: null`") as refused:
        build_app(args)
    assert "'/models/wan22-i2v'" in str(refused.value) and "no step-cache curve" in str(refused.value)
    assert PrevizArgs(i2v={"model": "tiny-i2v", "sampling": {"final_cache": CACHE}}).i2v.sampling.final_cache
    # a partial `sampling` keeps the I2V recipe (no cache, boundary 0.900), never T2V's defaults
    partial = PrevizArgs(i2v={"model": "/models/wan22-i2v", "sampling": {"num_steps": 30}}).i2v.sampling
    assert (partial.num_steps, partial.final_cache, partial.boundary_ratio, partial.flow_shift) == (
        30,
        None,
        0.9,
        5.0,
    )


@pytest.mark.parametrize(
    ("layout", "experts"),
    [("split", ["I2VHighNoiseDenoiser", "I2VLowNoiseDenoiser"]), ("colocated", ["I2VDenoiser"])],
)
def test_the_app_binds_the_i2v_experts_and_a_vae_encoder_beside_the_t2v_ones(
    layout: str, experts: list[str]
) -> None:
    app = build_app(
        {"model": "tiny", "device": "cpu", "i2v": {"model": "tiny-i2v", "experts": {"layout": layout}}}
    )
    t2v = ["HighNoiseDenoiser", "LowNoiseDenoiser"]
    assert bound_deployment_names(app) == sorted([*SHARED, *t2v, *experts, "VAEEncoder"])
    assert bound_deployment_names(build_app({"model": "tiny", "device": "cpu"})) == sorted([*SHARED, *t2v])


def test_the_local_config_serves_both_tiny_models() -> None:
    config = launch.load_config(REPO / "deploy" / "local.yaml")
    (app,) = config["applications"]
    args = PrevizArgs.model_validate(app["args"])
    assert (args.model, args.i2v.model) == ("tiny", "tiny-i2v")
    names = {deployment["name"] for deployment in app["deployments"]}
    assert {"I2VDenoiser", "VAEEncoder"} <= names
    assert set(bound_deployment_names(build_app(app["args"]))) == names


def test_the_models_list_shows_both_models_each_with_its_recipe_and_deployments(tmp_path: Path) -> None:
    with local_api(tmp_path, i2v={"model": "tiny-i2v", "experts": {"layout": "colocated"}}) as api:
        response = api.client.get("/v1/models")
        assert response.status_code == 200, response.text
        t2v, i2v = response.json()["data"]
    assert (t2v["id"], t2v["task"], t2v["keyframes"]) == ("wan2.2-t2v-a14b", "t2v", [])
    assert (i2v["id"], i2v["task"], i2v["keyframes"]) == ("wan2.2-i2v-a14b", "i2v", ["first", "last"])
    assert i2v["layout"] == "colocated" and t2v["layout"] == "split"
    assert {i2v["experts"][expert]["deployment"] for expert in ("high", "low")} == {"I2VDenoiser"}
    assert t2v["experts"]["high"]["deployment"] == "HighNoiseDenoiser"
    final = i2v["tiers"]["final"]
    assert (final["steps"], final["num_high_steps"], final["flow_shift"]) == (40, 15, 5.0)
    assert (final["guidance_high"], final["guidance_low"]) == (3.5, 3.5)
    assert t2v["tiers"]["final"]["num_high_steps"] == 26 and set(i2v["tiers"]) == {"draft", "final"}
    with local_api(tmp_path / "t2v-only") as api:
        (only,) = api.client.get("/v1/models").json()["data"]
        assert only["id"] == "wan2.2-t2v-a14b"

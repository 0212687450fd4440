"""`experts.layout`: `split` (a deployment per expert) or `colocated` (one `Denoiser` holding both experts
on every rank of one group); the config refuses what one group cannot hold and the other layout's
deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.cli import k8s_render, launch
from serve.config import PrevizArgs
from serve.sharding import ExpertsSettings, deployments_problem
from tests.support.api_app import local_api


def test_split_is_the_default_layout_with_a_deployment_per_expert() -> None:
    experts = PrevizArgs().experts
    assert experts.layout == "split"
    assert experts.deployment_names == ("HighNoiseDenoiser", "LowNoiseDenoiser")


def test_colocated_layout_serves_both_experts_from_one_denoiser() -> None:
    experts = ExpertsSettings.model_validate(
        {
            "layout": "colocated",
            "high": {"parallel": {"ulysses": 2}, "compile": True},
            "low": {"parallel": {"ulysses": 2}},
        }
    )
    assert experts.deployment("high") == experts.deployment("low") == "Denoiser"
    assert experts.deployment_names == ("Denoiser",)
    assert experts.high.compile and not experts.low.compile  # per-expert settings stay per expert


def test_colocated_experts_with_different_groups_are_refused_naming_both_fields() -> None:
    with pytest.raises(ValidationError) as error:
        ExpertsSettings.model_validate(
            {"layout": "colocated", "high": {"parallel": {"ulysses": 4}}, "low": {"parallel": {"cfg": 2}}}
        )
    message = str(error.value)
    assert "`experts.high.parallel` (ulysses 4, cfg 1" in message
    assert "`experts.low.parallel` (ulysses 1, cfg 2" in message


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValidationError, match="layout"):
        ExpertsSettings.model_validate({"layout": "pipelined"})


@pytest.mark.parametrize(
    ("layout", "names", "stray"),
    [
        ("colocated", ["TextEncoder", "HighNoiseDenoiser"], "HighNoiseDenoiser"),
        ("split", ["Denoiser", "LowNoiseDenoiser"], "Denoiser"),
    ],
)
def test_deployments_of_the_other_layout_are_refused(layout: str, names: list[str], stray: str) -> None:
    problem = deployments_problem(ExpertsSettings(layout=layout), names)
    assert problem is not None
    assert problem.startswith(f"`deployments` names {stray}, but `experts.layout: {layout}`")


def test_deployments_of_the_layout_pass() -> None:
    assert deployments_problem(ExpertsSettings(layout="colocated"), ["Denoiser", "VAEDecoder"]) is None
    assert deployments_problem(ExpertsSettings(), ["HighNoiseDenoiser", "LowNoiseDenoiser"]) is None


def test_a_serve_config_naming_the_other_layouts_deployments_is_refused_on_load(tmp_path: Path) -> None:
    config = {
        "applications": [
            {
                "name": "previz",
                "import_path": "serve.app:build_app",
                "args": {"experts": {"layout": "colocated"}},
                "deployments": [{"name": "HighNoiseDenoiser", "num_replicas": 2}],
            }
        ]
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(
        ValueError, match="`deployments` names HighNoiseDenoiser, but `experts.layout: colocated`"
    ):
        launch.load_config(path)


def test_models_list_names_the_layout_and_the_colocated_denoiser_for_both_experts(tmp_path: Path) -> None:
    with local_api(tmp_path, experts={"layout": "colocated"}) as api:
        response = api.client.get("/v1/models")
        assert response.status_code == 200, response.text
        (model,) = response.json()["data"]
        assert model["layout"] == "colocated"
        assert {model["experts"][expert]["deployment"] for expert in ("high", "low")} == {"Denoiser"}
    with local_api(tmp_path / "split") as api:
        (model,) = api.client.get("/v1/models").json()["data"]
        assert model["layout"] == "split"
        assert [model["experts"][expert]["deployment"] for expert in ("high", "low")] == [
            "HighNoiseDenoiser",
            "LowNoiseDenoiser",
        ]


SPLIT = {"layout": "split"}  # the studio overlay's cluster.yaml is colocated, Ulysses 4 for both experts


def test_a_k8s_overlay_naming_the_other_layouts_deployments_is_refused_when_rendered() -> None:
    settings = k8s_render.load_overlay("studio")
    split = settings.model_copy(
        update={
            "serve_overrides": k8s_render.merged(
                settings.serve_overrides,
                {"applications": [{"name": "previz", "args": {"experts": SPLIT}}]},
            )
        }
    )
    with pytest.raises(ValueError, match="`deployments` names Denoiser, but `experts.layout: split`"):
        k8s_render.serve_config(split)

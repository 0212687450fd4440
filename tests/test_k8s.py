"""k8s/: every overlay builds (kubectl kustomize), every object validates (built-in kinds with
kubernetes-validate, the custom resources against the real CRDs with unknown fields refused), the
generated parts equal what deploy/ says, and the worker pools hold the GPUs the Serve config asks for."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import uuid
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serve.cli import k8s_render
from serve.config import PrevizArgs, with_environment
from tests.support.cli_run import previz
from tests.support.servers.seaweedfs import S3Server

KUBERNETES_VERSION = "1.32"  # the oldest Kubernetes the manifests are meant for (KubeRay 1.x supports it)
# the CRDs the manifests are written against, as published (k8s/crds/README.md says which versions)
CRDS = k8s_render.K8S / "crds"
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (its built-in kustomize) is not installed"
)


@cache
def built(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize k8s/overlays/OVERLAY` builds."""
    out = subprocess.run(
        [KUBECTL, "kustomize", str(k8s_render.K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(item for item in yaml.safe_load_all(out) if item)


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [item for item in objects if item["kind"] == kind]
    return found


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever Kubernetes would prune them."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        preserved = schema.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in schema and "additionalProperties" not in schema and not preserved:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    version = api_version.split("/")[1]
    (served,) = [item for item in crd["spec"]["versions"] if item["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is checked by the API server
    return jsonschema.Draft7Validator(schema)


def test_the_generated_files_are_what_deploy_says() -> None:
    for overlay in k8s_render.OVERLAYS:
        assert k8s_render.stale(overlay) == [], f"run `previz k8s render {overlay}`"


def test_render_check_reports_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert previz(["k8s", "render", "dev", "--check"], monkeypatch, capsys)[0] == 0
    code, _out, err = previz(["k8s", "render", "nowhere"], monkeypatch, capsys)
    assert code == 2 and "no overlay 'nowhere'" in err
    shadow = tmp_path / "k8s"
    shutil.copytree(k8s_render.K8S, shadow)
    monkeypatch.setattr(k8s_render, "K8S", shadow)
    rendered = shadow / "overlays" / "dev" / "generated" / "rayservice.yaml"
    rendered.write_text(rendered.read_text().replace("maxReplicas: 1", "maxReplicas: 5"))
    assert k8s_render.stale("dev") == [rendered]
    assert k8s_render.write("dev") == [rendered] and k8s_render.stale("dev") == []


@needs_kubectl
@pytest.mark.parametrize("overlay", k8s_render.OVERLAYS)
def test_every_object_an_overlay_builds_validates(overlay: str) -> None:
    objects = built(overlay)
    kinds = {item["kind"] for item in objects}
    assert {"RayService", "PodMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    for item in objects:
        if item["kind"] in CRD_FILES:
            errors = [
                error.message for error in crd_validator(item["kind"], item["apiVersion"]).iter_errors(item)
            ]
            assert errors == [], (item["kind"], errors[:5])
        else:
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        assert item["metadata"].get("namespace", "previz") == "previz"


@needs_kubectl
def test_an_unknown_field_is_refused_where_the_crd_schema_refuses_it() -> None:
    service = copy.deepcopy(one(built("dev"), "RayService"))
    validator = crd_validator("RayService", service["apiVersion"])
    assert validator.is_valid(service)
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["replicaz"] = 1
    assert not validator.is_valid(service)
    bad_rule = copy.deepcopy(one(built("dev"), "PrometheusRule"))
    bad_rule["spec"]["groups"][0]["rules"][0]["severity"] = "page"
    assert not crd_validator("PrometheusRule", bad_rule["apiVersion"]).is_valid(bad_rule)


@needs_kubectl
@pytest.mark.parametrize("overlay", k8s_render.OVERLAYS)
def test_the_serve_config_is_the_deploy_file_with_the_overlays_stated_overrides(overlay: str) -> None:
    settings = k8s_render.load_overlay(overlay)
    embedded = yaml.safe_load(one(built(overlay), "RayService")["spec"]["serveConfigV2"])
    source = yaml.safe_load((k8s_render.ROOT / settings.source).read_text())
    assert embedded == k8s_render.merged(source, settings.serve_overrides)
    app, source_app = embedded["applications"][0], source["applications"][0]
    overridden = next(iter(settings.serve_overrides.get("applications", [])), {}).get("args", {})
    for key, value in source_app["args"].items():  # every other setting is the deploy file's
        assert app["args"][key] == overridden.get(key, value), key
    assert [item["name"] for item in app["deployments"]] == [
        item["name"] for item in source_app["deployments"]
    ]
    PrevizArgs.model_validate(app["args"])


def test_merging_overrides_by_key_and_by_name() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "apps": [{"name": "x", "v": 1, "w": 2}, {"name": "y", "v": 3}]}
    overrides = {"a": {"c": [3]}, "apps": [{"name": "y", "v": 4}, {"name": "z"}]}
    assert k8s_render.merged(base, overrides) == {
        "a": {"b": 1, "c": [3]},
        "apps": [{"name": "x", "v": 1, "w": 2}, {"name": "y", "v": 4}, {"name": "z"}],
    }
    assert base["apps"][1] == {"name": "y", "v": 3}  # nothing shared or changed in place


@needs_kubectl
def test_the_alerts_and_dashboards_are_deploys() -> None:
    objects = built("studio")
    alerts = yaml.safe_load(k8s_render.ALERTS.read_text())
    assert one(objects, "PrometheusRule")["spec"]["groups"] == alerts["groups"]
    dashboards = {path.name: path.read_text() for path in k8s_render.DASHBOARDS.glob("*.json")}
    maps = [
        item
        for item in objects
        if item["kind"] == "ConfigMap" and "grafana_dashboard" in item["metadata"]["labels"]
    ]
    assert {name: text for item in maps for name, text in item["data"].items()} == dashboards
    assert all(json.loads(text) for text in dashboards.values())


def gpus_asked(config: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """GPUs the Serve config's deployments ask for at their max replicas, per custom resource they need
    ("" for none), and every placement group (the bundles' resources summed)."""
    by_resource: dict[str, float] = defaultdict(float)
    groups = []
    for deployment in config["applications"][0]["deployments"]:
        replicas = deployment.get("autoscaling_config", {}).get(
            "max_replicas", deployment.get("num_replicas", 1)
        )
        bundles = deployment.get("placement_group_bundles")
        if bundles:
            group: dict[str, float] = defaultdict(float)
            for bundle in bundles:
                for name, amount in bundle.items():
                    group[name] += amount
            groups.append(dict(group))
            custom = [name for name in group if name not in ("GPU", "CPU", "memory")]
            need, custom_name = group.get("GPU", 0), (custom[0] if custom else "")
        else:
            need = deployment.get("ray_actor_options", {}).get("num_gpus", 0)
            custom_name = next(iter(deployment.get("ray_actor_options", {}).get("resources", {})), "")
        by_resource[custom_name] += replicas * need
    return dict(by_resource), groups


@needs_kubectl
@pytest.mark.parametrize("overlay", k8s_render.OVERLAYS)
def test_the_worker_pools_hold_the_gpus_the_serve_config_asks_for(overlay: str) -> None:
    cluster = one(built(overlay), "RayService")["spec"]["rayClusterConfig"]
    config = yaml.safe_load(one(built(overlay), "RayService")["spec"]["serveConfigV2"])
    asked, groups = gpus_asked(config)
    pools = []
    for group in cluster["workerGroupSpecs"]:
        params = group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus == int(params.get("num-gpus", 0)), group["groupName"]
        resources = json.loads(params.get("resources", "{}"))
        pools.append((group["maxReplicas"], gpus, int(params["num-cpus"]), resources))
    for resource, need in asked.items():
        have = sum(
            replicas * gpus for replicas, gpus, _, custom in pools if not resource or resource in custom
        )
        assert need <= have, (overlay, resource or "any", need, have)
    for group in groups:  # STRICT_PACK: a whole rank group on one pod
        assert any(
            group.get("GPU", 0) <= gpus
            and group.get("CPU", 0) <= cpus
            and all(group[name] <= custom.get(name, 0) for name in group if name not in ("GPU", "CPU"))
            for _, gpus, cpus, custom in pools
        ), (overlay, group)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no Ray work
    assert cluster["enableInTreeAutoscaling"] is True


@needs_kubectl
@pytest.mark.parametrize("overlay", k8s_render.OVERLAYS)
def test_pods_run_hardened(overlay: str) -> None:
    objects = built(overlay)
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        group["template"] for group in cluster["workerGroupSpecs"]
    ]
    for template in templates:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["resources"]["limits"] and container["resources"]["requests"]
            names = {item["name"] for item in container["env"]}
            assert "PREVIZ_DATABASE_URL" in names
        (ray,) = template["spec"]["containers"]
        assert ray["readinessProbe"]["httpGet"]["port"] == k8s_render.SERVE_PORT and "livenessProbe" in ray
    policy = one(objects, "NetworkPolicy")
    serve_rules = [
        rule for rule in policy["spec"]["ingress"] if any(p["port"] == 8000 for p in rule.get("ports", []))
    ]
    assert [rule["from"] for rule in serve_rules] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    ]
    budgets = {item["metadata"]["name"] for item in objects if item["kind"] == "PodDisruptionBudget"}
    assert budgets == {"previz-head", "previz-cpu-workers"}


@needs_kubectl
def test_gpu_pods_pull_the_weights_into_the_node_cache_first() -> None:
    settings = k8s_render.load_overlay("gpu-node")
    cluster = one(built("gpu-node"), "RayService")["spec"]["rayClusterConfig"]
    (gpu,) = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == "gpu"]
    (pull,) = gpu["template"]["spec"]["initContainers"]
    assert pull["command"][:5] == ["previz", "weights", "pull", "--cache-dir", settings.weights_cache]
    config = yaml.safe_load(one(built("gpu-node"), "RayService")["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    assert args["model"] in pull["command"] and str(args["model_cache_dir"]) == settings.weights_cache
    assert any(
        volume.get("hostPath", {}).get("path") == settings.weights_cache
        for volume in gpu["template"]["spec"]["volumes"]
    )


def test_the_job_store_url_may_come_from_the_environment() -> None:
    args = PrevizArgs(database_url="sqlite:///a.db")
    assert with_environment(args, {}).database_url == "sqlite:///a.db"
    url = "postgresql+psycopg://previz:secret@db:5432/previz"
    assert with_environment(args, {"PREVIZ_DATABASE_URL": url, **os.environ}).database_url == url


def test_weights_pull_mirrors_a_prefix_into_the_cache(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a GPU pod's init container runs, against a real S3 server, credentials from the environment."""
    bucket = f"weights-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="sr/realesr.pth", Body=b"weights")
    for name, value in {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_REGION": s3_server.region,
    }.items():
        monkeypatch.setenv(name, value)
    cache_dir = tmp_path / "cache"
    code, out, err = previz(
        ["weights", "pull", "--cache-dir", str(cache_dir), f"s3://{bucket}/sr"], monkeypatch, capsys
    )
    assert code == 0, err
    assert (cache_dir / bucket / "sr" / "realesr.pth").read_bytes() == b"weights"
    code, _out, err = previz(
        ["weights", "pull", "--cache-dir", str(cache_dir), "/local/path"], monkeypatch, capsys
    )
    assert code == 2 and "not an s3:// URI" in err
    code, _out, err = previz(
        ["weights", "pull", "--cache-dir", str(cache_dir), f"s3://{bucket}/none"], monkeypatch, capsys
    )
    assert code == 2 and "no objects" in err

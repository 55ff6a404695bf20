"""The deployment manifests: they parse, run real vitray commands with shipped configs, use
one image tag, request the GPUs their configs need, and hold no secrets."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from jobs.cli import COMMANDS
from jobs.config import load_config

from helpers import ROOT

INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))
IMAGE = re.search(r"-t (\S+) \.", (INFRA / "docker" / "Dockerfile").read_text()).group(1)
SECRET_KEYS = re.compile(r"password|secret|access_key|token", re.IGNORECASE)


class Resources(BaseModel):
    requests: dict[str, str | int]
    limits: dict[str, str | int]


class Container(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    image: str
    resources: Resources


class PodSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    containers: list[Container]


class Template(BaseModel):
    spec: PodSpec


class WorkerGroup(BaseModel):
    model_config = ConfigDict(extra="allow")
    groupName: str
    replicas: int
    template: Template


class HeadGroup(BaseModel):
    model_config = ConfigDict(extra="allow")
    template: Template


class RayClusterSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    rayVersion: str
    headGroupSpec: HeadGroup
    workerGroupSpecs: list[WorkerGroup]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def cluster_specs() -> list[tuple[str, dict, RayClusterSpec]]:
    found = []
    for path in (INFRA / "kuberay").glob("*.yaml"):
        for doc in documents(path):
            if doc["kind"] == "RayCluster":
                found.append((path.name, doc, RayClusterSpec.model_validate(doc["spec"])))
            elif doc["kind"] == "RayJob":
                spec = RayClusterSpec.model_validate(doc["spec"]["rayClusterSpec"])
                found.append((path.name, doc, spec))
    return found


def gpus(container: Container) -> int:
    return int(container.resources.limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(INFRA)) for p in MANIFESTS])
def test_manifest_parses_and_uses_the_one_image(path):
    docs = documents(path)
    assert docs
    text = path.read_text()
    images = set(re.findall(r"^\s*-?\s*image:\s*(\S+)", text, re.MULTILINE))
    images.discard("postgres:17")  # the database of the MLflow compose file
    assert images <= {IMAGE}, f"{path.name} uses {images - {IMAGE}}"


def test_kuberay_specs_match_the_schema_and_request_gpus_on_workers_only():
    specs = cluster_specs()
    assert {name for name, _, _ in specs} == {
        "raycluster.yaml",
        "rayjob-pretrain.yaml",
        "rayjob-tune.yaml",
    }
    for name, _, spec in specs:
        assert spec.rayVersion == "2.60.0", name
        head = spec.headGroupSpec.template.spec.containers
        assert all(gpus(c) == 0 for c in head), f"{name}: the head requests GPUs"
        for group in spec.workerGroupSpecs:
            for c in group.template.spec.containers:
                req = c.resources.requests.get("nvidia.com/gpu")
                assert req is not None and int(req) == gpus(c) > 0, f"{name}/{group.groupName}"


def test_rayjob_entrypoints_are_vitray_commands_with_shipped_configs_and_enough_gpus():
    commands = set(COMMANDS)
    for name, doc, spec in cluster_specs():
        if doc["kind"] != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "vitray" and argv[1] in commands, name
        config = argv[argv.index("--config") + 1]
        assert (ROOT / config).is_file(), f"{name}: {config} is not shipped"
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config(ROOT / config, sets)  # validates every key the job overrides
        assert cfg.scaling.use_gpu
        available = sum(
            g.replicas * sum(gpus(c) for c in g.template.spec.containers)
            for g in spec.workerGroupSpecs
        )
        concurrent = cfg.tune.max_concurrent if argv[1] == "tune" else 1
        assert available == cfg.scaling.num_workers * concurrent, name


def test_cluster_launcher_runs_the_image_on_gpu_workers():
    (launcher,) = documents(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    assert launcher["docker"]["image"] == IMAGE
    workers = launcher["available_node_types"]["gpu_worker"]
    assert workers["node_config"]["InstanceType"].startswith(("p4", "p5"))
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("127.0.0.1" in c for c in launcher["head_start_ray_commands"])


def test_no_manifest_ships_a_secret_and_servers_bind_locally():
    for path in MANIFESTS:
        for doc in documents(path):
            for key, value in walk(doc):
                if SECRET_KEYS.search(key) and isinstance(value, str):
                    assert value.startswith("${") or not value, f"{path.name}: {key}={value}"
    compose = documents(INFRA / "mlflow" / "docker-compose.yaml")[0]
    assert all(p.startswith("127.0.0.1:") for p in compose["services"]["mlflow"]["ports"])
    (service,) = [
        d for d in documents(INFRA / "mlflow" / "mlflow-k8s.yaml") if d["kind"] == "Service"
    ]
    assert service["spec"]["type"] == "ClusterIP"


def walk(node, key=""):
    """(key, value) for every leaf; list items of name/value env pairs keep the env name."""
    if isinstance(node, dict):
        if {"name", "value"} <= node.keys():
            yield node["name"], node["value"]
        for k, v in node.items():
            yield from walk(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)
    else:
        yield key, node

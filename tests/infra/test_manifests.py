"""The deployment manifests: they parse, run real vitray commands with shipped configs, use
one image tag, request the GPUs their configs need, hold no secrets, require authentication,
admit only what they must, and chain pretraining's registered model into the fine-tunes."""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel, ConfigDict

from jobs.cli import COMMANDS
from jobs.config import JobConfig, load_config

from helpers import ROOT, free_port, mlflow_job_runners, stop_group, wait_healthy

INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))
IMAGE = re.search(r"-t (\S+) \.", (INFRA / "docker" / "Dockerfile").read_text()).group(1)
SECRET_KEYS = re.compile(r"password|secret(?!Name)|access_key|token", re.IGNORECASE)
RAY_PORTS = {8265, 6379, 10001}  # Jobs API and dashboard, GCS, Ray Client
RWX_PROVISIONERS = {  # CSI drivers whose volumes can be ReadWriteMany
    "efs.csi.aws.com",
    "filestore.csi.storage.gke.io",
    "file.csi.azure.com",
    "nfs.csi.k8s.io",
}
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}  # the python3 of each release's archive
PINNED = ("torch", "torchvision", "ray", "mlflow", "pyarrow")


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


def cpus(container: Container) -> float:
    return float(container.resources.limits["cpu"])


def pod_templates(spec: RayClusterSpec) -> list[PodSpec]:
    return [spec.headGroupSpec.template.spec] + [g.template.spec for g in spec.workerGroupSpecs]


def job_config(doc: dict) -> JobConfig:
    """The config a RayJob's entrypoint runs, with its --set overrides."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(ROOT / argv[argv.index("--config") + 1], sets)


def rayjob(name: str) -> dict:
    (doc,) = documents(INFRA / "kuberay" / name)
    return doc


def base(kind: str) -> list[dict]:
    return [d for d in documents(INFRA / "kuberay" / "base.yaml") if d["kind"] == kind]


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
        assert any(gpus(c) for g in spec.workerGroupSpecs for c in g.template.spec.containers)
        for group in spec.workerGroupSpecs:
            for c in group.template.spec.containers:
                req = c.resources.requests.get("nvidia.com/gpu", 0)
                assert int(req) == gpus(c), f"{name}/{group.groupName}: GPU request != limit"


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
    for name, node_type in launcher["available_node_types"].items():
        # without one, Ray takes its default AMI: Ubuntu 18.04 and CUDA 11, no H100 driver
        assert node_type["node_config"].get("ImageId", "").startswith("ami-"), name


def test_the_launcher_heads_profile_can_start_workers_and_theirs_reads_s3_only():
    """The head's instance profile replaces the autoscaler's own role: with S3 alone, no
    worker ever starts and autoscaling jobs wait forever."""
    (launcher,) = documents(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    (template,) = documents(INFRA / "cluster-launcher" / "iam.yaml")
    resources = template["Resources"]
    profiles = {
        r["Properties"]["InstanceProfileName"]: r["Properties"]["Roles"][0]["Ref"]
        for r in resources.values()
        if r["Type"] == "AWS::IAM::InstanceProfile"
    }

    def actions(profile: str) -> set[str]:
        role = resources[profiles[profile]]["Properties"]
        statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
        listed = [
            s["Action"] if isinstance(s["Action"], list) else [s["Action"]] for s in statements
        ]
        return {a for actions in listed for a in actions}

    nodes = launcher["available_node_types"]
    head = nodes[launcher["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= actions(head)
    for name, node in nodes.items():
        if name != launcher["head_node_type"]:
            profile = node["node_config"]["IamInstanceProfile"]["Name"]
            assert not any(a.startswith(("ec2:", "iam:")) for a in actions(profile)), name


def test_no_manifest_ships_a_secret_and_servers_bind_locally():
    for path in MANIFESTS:
        for doc in documents(path):
            for key, value in walk(doc):
                if SECRET_KEYS.search(key) and isinstance(value, str):
                    # empty, a ${VARIABLE}, or a file in the user's home (a token's path)
                    assert value.startswith(("${", "~/")) or not value, f"{path.name}: {key}"
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


def test_every_ray_cluster_requires_a_token_from_the_secret_the_docs_create():
    names = set()
    for name, _, spec in cluster_specs():
        auth = spec.model_extra.get("authOptions") or {}
        assert auth.get("mode") == "token", f"{name}: no token authentication"
        names.add(auth.get("secretName"))
    (secret,) = names
    assert f"kubectl create secret generic {secret} " in (ROOT / "docs" / "cluster.md").read_text()


def test_network_policy_admits_the_ray_ports_only_from_pods_of_the_namespace():
    (policy,) = base("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}  # KubeRay's
    assert "Ingress" in spec["policyTypes"]
    from_namespace = set()
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])} or RAY_PORTS  # no ports: every port
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" in peer:  # the KubeRay operator, polling the job server
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == (
                    "kuberay-operator"
                )
                assert ports & RAY_PORTS <= {8265}, peer
            elif peer["podSelector"] == {}:
                from_namespace |= ports & RAY_PORTS
    assert from_namespace == RAY_PORTS


def test_ray_pods_reach_s3_through_their_service_account_and_keys_stay_optional():
    (account,) = base("ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/\S+", role)
    for name, _, spec in cluster_specs():
        for pod in pod_templates(spec):
            assert pod.model_extra.get("serviceAccountName") == account["metadata"]["name"], name
            for container in pod.containers:
                for env in container.model_extra.get("env", []):
                    if env["name"].startswith("AWS_"):
                        assert env["valueFrom"]["secretKeyRef"]["optional"] is True, name


def test_shared_volume_is_read_write_many_on_a_class_that_can_be():
    (claim,) = base("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    classes = {c["metadata"]["name"]: c for c in base("StorageClass")}
    assert classes[claim["spec"]["storageClassName"]]["provisioner"] in RWX_PROVISIONERS
    for name, _, spec in cluster_specs():
        for pod in pod_templates(spec):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.model_extra["volumes"]
                      if "persistentVolumeClaim" in v}  # fmt: skip
            assert claims == {claim["metadata"]["name"]}, name


def test_jobs_read_and_write_on_the_volume_every_pod_mounts():
    for name, doc, spec in cluster_specs():
        if doc["kind"] != "RayJob":
            continue
        cfg = job_config(doc)
        for pod in pod_templates(spec):
            claimed = {
                v["name"] for v in pod.model_extra["volumes"] if "persistentVolumeClaim" in v
            }
            for container in pod.containers:
                mounts = [
                    m["mountPath"] for m in container.model_extra["volumeMounts"]
                    if m["name"] in claimed
                ]  # fmt: skip
                for path in (cfg.data.dataset, cfg.run.storage_path):
                    assert any(path.startswith(m + "/") for m in mounts), f"{name}: {path}"


def shipped_gpu_configs() -> dict[str, JobConfig]:
    """Every shipped config that trains on GPUs (a fine-tune's start set to a placeholder)."""
    found = {}
    for path in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        if "use_gpu: true" in path.read_text():
            found[path.name] = load_config(path, ["init.checkpoint=models:/any@champion"])
    return found


def fits(cfg: JobConfig, node_cpus: float, node_gpus: int) -> bool:
    """A GPU node of the cluster holds its share of the workers and one decode task."""
    train = min(node_gpus, cfg.scaling.num_workers) * cfg.scaling.cpus_per_worker
    return train + cfg.data.cpus_per_task <= node_cpus


def test_a_cpu_group_decodes_and_gpu_workers_leave_a_decode_task_room():
    """Every shipped GPU config on every cluster the docs run it on: the KubeRay specs and
    the launcher's GPU node (a config that took all 64 CPUs of a GPU pod left its GPUs
    waiting for decode tasks that had no CPU to run on)."""
    configs = list(shipped_gpu_configs().items())
    assert {"vit-b16-i21k-pretrain.yaml", "vit-s16-i1k-pretrain.yaml"} <= dict(configs).keys()
    for name, doc, spec in cluster_specs():
        runs = [(name, job_config(doc))] if doc["kind"] == "RayJob" else configs
        groups = [(g, g.template.spec.containers[0]) for g in spec.workerGroupSpecs]
        decoders = [g for g, c in groups if gpus(c) == 0 and cpus(c) > 0]
        assert decoders and all(g.model_extra["maxReplicas"] > 0 for g in decoders), name
        for run, cfg in runs:
            for group, c in groups:
                assert fits(cfg, cpus(c), gpus(c)), f"{run} on {name}/{group.groupName}"
    (launcher,) = documents(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    p5 = launcher["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert p5 == "p5.48xlarge"  # 192 vCPUs, 8 H100s
    for run, cfg in configs:
        assert fits(cfg, 192, 8), f"{run} on the launcher's {p5}"


def test_every_rayjob_has_the_decode_cores_to_feed_its_gpus_at_half_their_peak():
    """The CPUs a RayJob's cluster leaves to decoding (its CPU pods, and what its GPU pods'
    train workers leave free), per GPU, against what one H100 SXM training the job's model
    at 50% MFU consumes at the measured per-core decode rate."""
    from jobs.training.mfu import DECODE_IMG_S_PER_CORE, gpu_images_per_s
    from vit import ViTConfig, forward_flops

    preset = job_config(rayjob("rayjob-pretrain.yaml")).model.preset  # the tune job's too
    for name in ("rayjob-pretrain.yaml", "rayjob-tune.yaml"):
        doc = rayjob(name)
        cfg = job_config(doc)
        spec = RayClusterSpec.model_validate(doc["spec"]["rayClusterSpec"])
        decode_cpus = total_gpus = 0.0
        for group in spec.workerGroupSpecs:
            c = group.template.spec.containers[0]
            train = gpus(c) * cfg.scaling.cpus_per_worker  # one worker per GPU
            decode_cpus += group.replicas * (cpus(c) - train)
            total_gpus += group.replicas * gpus(c)
        vit = ViTConfig.from_preset(preset, image_size=cfg.data.image_size)
        demand = gpu_images_per_s(3 * forward_flops(vit), "H100 SXM", at_mfu=0.5)
        needed = demand / DECODE_IMG_S_PER_CORE
        assert decode_cpus / total_gpus >= needed, f"{name}: {decode_cpus / total_gpus} < {needed}"


def test_the_tune_job_starts_from_the_model_pretraining_registers():
    pretrain = job_config(rayjob("rayjob-pretrain.yaml"))
    tune = job_config(rayjob("rayjob-tune.yaml"))
    assert pretrain.mlflow.register_as
    registered = f"models:/{pretrain.mlflow.register_as}@{pretrain.mlflow.alias}"
    assert tune.init.checkpoint == registered


def launcher_as_ray_reads_it() -> dict:
    """aws-gpu.yaml after Ray's own defaults and checks (`ray up`'s prepare_config and
    validate_config) and its AWS provider's reading of network interfaces, which moves
    their subnets and groups into the node config (ValueError where they conflict)."""
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config

    (launcher,) = documents(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    config = prepare_config(launcher)
    validate_config(config)
    return _configure_from_network_interfaces(config)


def test_launcher_requires_a_token_and_opens_no_port_to_the_internet():
    launcher = launcher_as_ray_reads_it()
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    for name, node_type in launcher["available_node_types"].items():
        # without a group of its own, `ray up` makes one whose SSH is open to the internet
        assert node_type["node_config"].get("SecurityGroupIds"), name
    (template,) = documents(INFRA / "cluster-launcher" / "security-group.yaml")
    resources = template["Resources"]
    (group,) = [k for k, r in resources.items() if r["Type"] == "AWS::EC2::SecurityGroup"]
    rules = resources[group]["Properties"].get("SecurityGroupIngress", []) + [
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"
    ]
    for rule in rules:
        itself = {"Fn::GetAtt": [group, "GroupId"]}
        assert rule.get("CidrIp") == {"Ref": "VpcCidr"} or rule.get("SourceSecurityGroupId") == (
            itself
        ), rule
    for path in (INFRA / "cluster-launcher").glob("*.yaml"):
        values = [v for d in documents(path) for _, v in walk(d)]
        assert "0.0.0.0/0" not in values and "::/0" not in values, path.name


def server_options(command: list[str]) -> dict[str, str]:
    """--flag value and --flag=value pairs of the `mlflow server` a container runs."""
    text = command[-1]
    argv = shlex.split(text[text.index("mlflow server") :])
    options = {}
    for i, token in enumerate(argv):
        key, sep, value = token.partition("=")
        if key.startswith("--"):
            options[key] = value if sep else argv[i + 1]
    return options


def test_mlflow_servers_authenticate_and_allow_the_hosts_clients_send():
    from mlflow.server.security_utils import is_allowed_host_header

    compose = documents(INFRA / "mlflow" / "docker-compose.yaml")[0]["services"]["mlflow"]
    (deployment,) = [
        d for d in documents(INFRA / "mlflow" / "mlflow-k8s.yaml") if d["kind"] == "Deployment"
    ]
    (k8s,) = deployment["spec"]["template"]["spec"]["containers"]
    ray_clients = {
        urlsplit(env["value"]).netloc
        for _, _, spec in cluster_specs()
        for pod in pod_templates(spec)
        for c in pod.containers
        for env in c.model_extra["env"]
        if env["name"] == "MLFLOW_TRACKING_URI"
    }
    forwarded = {"localhost:5000", "127.0.0.1:5000"}  # published or port-forwarded port 5000
    k8s_env = {e["name"]: e for e in k8s["env"]}
    (launcher,) = documents(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    (on_head,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    head_env = set(re.findall(r"\b(MLFLOW_[A-Z_]+)=", on_head))
    servers = [
        (compose["command"], set(compose["environment"]), forwarded | {"mlflow:5000"}),
        (k8s["command"], set(k8s_env), forwarded | ray_clients),
        ([on_head], head_env, forwarded | {"10.0.3.17:5000"}),  # a node of the VPC
    ]
    for command, env, clients in servers:
        options = server_options(command)
        assert options["--app-name"] == "basic-auth"
        assert {"MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= env
        allowed = options["--allowed-hosts"].split(",")
        assert all(is_allowed_host_header(allowed, host) for host in clients), clients
    no_job_runner = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"  # no idle GenAI job runners
    assert compose["environment"][no_job_runner] == k8s_env[no_job_runner]["value"] == "false"
    assert f"{no_job_runner}=false " in on_head
    for key in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in k8s_env[key]["valueFrom"]
    for _, _, spec in cluster_specs():  # the Ray pods log in
        for pod in pod_templates(spec):
            for c in pod.containers:
                names = {e["name"]: e for e in c.model_extra["env"]}
                for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    assert "secretKeyRef" in names[key]["valueFrom"]


def test_image_installs_its_distributions_python_pinned_versions_and_probe_tools():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-\S+-ubuntu(\d+\.\d+)", text, re.M)
    cuda, ubuntu = base.groups()
    apt = re.search(r"apt-get install -y --no-install-recommends ([^&]+)&&", text, re.S).group(1)
    packages = apt.replace("\\", " ").split()
    for package in packages:
        version = re.fullmatch(r"python(\d\.\d+)(?:-\w+)?", package)
        assert version is None or version.group(1) == UBUNTU_PYTHON[ubuntu], package
    assert {"python3", "python3-venv", "bash", "wget"} <= set(packages)  # probes: bash -c wget
    # the cluster launcher copies files in with rsync, reaches workers over ssh, and mounts
    # its files (the Ray token) under the image's HOME, which the ray user must own
    assert {"rsync", "openssh-client"} <= set(packages)
    assert text.index("ENV HOME=/home/ray") < text.index("USER ray")
    # torch from PyPI, the build the suite runs: its CUDA is the base image's
    import torch

    assert "--index-url" not in text and "--extra-index-url" not in text
    assert torch.__version__.split("+")[0] == re.search(r"torch==([\d.]+)", text).group(1)
    if torch.version.cuda:  # PyPI's Linux x86_64 wheel; a CPU build says nothing of it
        assert torch.version.cuda == cuda, f"torch {torch.__version__}, base image CUDA {cuda}"
    pins = dict(re.findall(r"\b([a-z]+)(?:\[[^\]]*\])?==([\d.]+)", text))
    project = [Requirement(r) for r in metadata.requires("vitray")]  # pyproject's, installed
    wanted = {r.name: r.specifier for r in project if r.marker is None}
    for package in PINNED:
        assert package in pins, f"{package} is not pinned"
        assert wanted[package].contains(pins[package]), f"{package}=={pins[package]}"


@pytest.mark.slow
def test_the_k8s_mlflow_command_refuses_strangers_and_serves_its_clients(tmp_path):
    """The Deployment's own command, run here (SQLite for PostgreSQL, local artifacts,
    127.0.0.1 on a free port, one worker): no credentials 401, a Host header it does not
    list refused, the admin of its environment at the in-cluster service name served."""
    (deployment,) = [
        d for d in documents(INFRA / "mlflow" / "mlflow-k8s.yaml") if d["kind"] == "Deployment"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port = free_port()
    script = container["command"][-1]
    for old, new in {
        "--host 0.0.0.0": "--host 127.0.0.1",
        "--port 5000": f"--port {port}",
        "--workers 4": "--workers 1",
        "s3://your-bucket/mlflow": str(tmp_path / "artifacts"),
    }.items():
        assert old in script, old
        script = script.replace(old, new)
    secrets = {
        "POSTGRES_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a-test-password-0123",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-session-key",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
    }
    env = {e["name"]: secrets.get(e["name"], e.get("value")) for e in container["env"]}
    env = {k: v for k, v in env.items() if v is not None}  # optional keys: no Secret here
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        container["command"][:-1] + [script],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", seconds=600)  # migrates two fresh stores

        def status(host: str, user: str = "", password: str = "") -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                "?experiment_name=Default",
                headers={"Host": host},
            )
            if user:
                login = base64.b64encode(f"{user}:{password}".encode()).decode()
                request.add_header("Authorization", f"Basic {login}")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        service = "mlflow.mlflow.svc.cluster.local:5000"
        admin = ("admin", secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
        assert mlflow_job_runners(proc.pid) == []  # only the server: no idle GenAI runners
        assert status(service) == 401
        assert status(service, "admin", "wrong") == 401
        assert status("attacker.example:5000", *admin) in (400, 403)
        assert status(service, *admin) == 200
        assert status("localhost:5000", *admin) == 200  # through kubectl port-forward
    finally:
        stop_group(proc)


def test_the_launcher_config_validates_against_rays_own_schema():
    """Ray's `ray-schema.json` (the one `ray up` checks with), strict where Ray is: a key
    Ray does not know fails here, not on the user's first `ray up`."""
    import jsonschema
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    (launcher,) = documents(INFRA / "cluster-launcher" / "aws-gpu.yaml")
    jsonschema.validate(launcher, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**launcher, "max_wrokers": 8}, schema)  # a misspelt key


K8S_VERSIONS = ("1.30", "1.37")  # the oldest Kubernetes KubeRay 1.6 supports, the newest


def kubernetes_objects() -> list[tuple[str, dict]]:
    """(where, object) for every Kubernetes object the manifests ship, and every pod
    template inside a RayCluster or RayJob as the core PodTemplate it is (KubeRay's own
    fields are not in Kubernetes' schemas)."""
    found = []
    for path in [*sorted((INFRA / "kuberay").glob("*.yaml")), INFRA / "mlflow" / "mlflow-k8s.yaml"]:
        for doc in documents(path):
            where = f"{path.name}: {doc['kind']} {doc['metadata']['name']}"
            if not doc["apiVersion"].startswith("ray.io/"):
                found.append((where, doc))
                continue
            spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
            groups = [("head", spec["headGroupSpec"])]
            groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
            for name, group in groups:
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
                found.append((f"{where}, group {name}", {**pod, "template": group["template"]}))
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_object_and_ray_pod_validates_strictly(version):
    """Against Kubernetes' own OpenAPI schemas (kubernetes-validate), unknown fields as
    errors: a misspelt or misplaced key is an error here, not a field the API server drops."""
    import kubernetes_validate

    objects = kubernetes_objects()
    assert len(objects) >= 12
    errors = []
    for where, obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {e.message} at {'.'.join(map(str, e.path))}")
    assert errors == []


EFA_DEVICES = {"p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16, "p4d.24xlarge": 4}
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_SOCKET_IFNAME": "^lo,docker"}


def test_gpu_nodes_reach_each_other_over_efa():
    """NCCL between GPU nodes over EFA wherever we ship them: the devices requested, the
    provider set, the plugin in the image, the traffic admitted."""
    for name, _, spec in cluster_specs():
        for group in spec.workerGroupSpecs:
            for c in group.template.spec.containers:
                if not gpus(c):
                    continue
                where = f"{name}/{group.groupName}"
                efa = c.resources.limits.get("vpc.amazonaws.com/efa")
                assert efa == c.resources.requests.get("vpc.amazonaws.com/efa") == "32", where
                env = {e["name"]: e.get("value") for e in c.model_extra["env"]}
                assert EFA_ENV.items() <= env.items(), where

    launcher = launcher_as_ray_reads_it()
    options = launcher["docker"]["worker_run_options"]
    assert {"--device=/dev/infiniband", "--ulimit memlock=-1:-1"} <= set(options)
    assert {f"--env {k}={v}" for k, v in EFA_ENV.items()} <= set(options)
    node = launcher["available_node_types"]["gpu_worker"]["node_config"]
    interfaces = node["NetworkInterfaces"]
    slots = [(i["NetworkCardIndex"], i["DeviceIndex"]) for i in interfaces]
    assert len(set(slots)) == len(slots)
    efa = [i for i in interfaces if i["InterfaceType"] in ("efa", "efa-only")]
    cards = sorted(i["NetworkCardIndex"] for i in efa)
    assert cards == list(range(EFA_DEVICES[node["InstanceType"]]))  # one EFA on every card
    (primary,) = [i for i in interfaces if (i["NetworkCardIndex"], i["DeviceIndex"]) == (0, 0)]
    assert primary["InterfaceType"] != "efa-only", "an EFA-only interface cannot be primary"
    # one IP address per node: an `efa` interface takes one each, 32 a node, a /24 for 8
    assert len([i for i in interfaces if i["InterfaceType"] != "efa-only"]) == 1
    assert len(set(node["SubnetIds"])) == 1, "EFA spans one subnet (one placement group zone)"
    assert node["Placement"]["GroupName"]

    (template,) = documents(INFRA / "cluster-launcher" / "security-group.yaml")
    resources = template["Resources"]
    itself = {"Fn::GetAtt": ["RayNodes", "GroupId"]}
    egress = [
        r["Properties"] for r in resources.values() if r["Type"] == "AWS::EC2::SecurityGroupEgress"
    ]
    assert any(
        e["DestinationSecurityGroupId"] == itself and e["IpProtocol"] == "-1" for e in egress
    )
    (placement,) = [r for r in resources.values() if r["Type"] == "AWS::EC2::PlacementGroup"]
    assert placement["Properties"]["Strategy"] == "cluster"

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"efa_installer\.sh .*--skip-kmod", dockerfile)
    assert re.search(r"efa_installer\.sh [^\n]*\n?.*ldconfig", dockerfile)  # its lib folders
    # the base image's LD_LIBRARY_PATH (GKE's driver mount) is kept, never replaced
    for value in re.findall(r"^ENV LD_LIBRARY_PATH=(\S+)", dockerfile, re.M):
        assert "$LD_LIBRARY_PATH" in value or "${LD_LIBRARY_PATH}" in value


def test_the_compose_file_parses_under_the_compose_spec():
    """Through a strict Compose spec parser (compose-spec: unknown keys, bad values and
    wrong types are errors), as `docker compose` would refuse them on the user's machine."""
    from compose_spec import PyCompose

    text = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    compose = PyCompose.from_yaml(text)
    assert set(compose.service_names()) == {"postgres", "mlflow"}
    for typo in (("healthcheck:", "healtcheck:"), ("ports:", "port:")):
        assert typo[0] in text
        with pytest.raises(ValueError):
            PyCompose.from_yaml(text.replace(*typo, 1))


KUBERAY_SCHEMA = Path(__file__).parent / "schemas" / "kuberay-1.6.json"


def test_every_ray_cluster_and_job_validates_strictly_against_kuberay_1_6():
    """KubeRay's own fields (the pod templates inside are core Kubernetes, checked above),
    unknown keys as errors: the API server would prune a misspelt one without a word."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(KUBERAY_SCHEMA.read_text()))
    ray_objects = [doc for name, doc, _ in cluster_specs()]
    assert {d["kind"] for d in ray_objects} == {"RayCluster", "RayJob"}
    for doc in ray_objects:
        errors = [e.message for e in validator.iter_errors(doc)]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"

    cluster = next(d for d in ray_objects if d["kind"] == "RayCluster")
    misspelt = yaml.safe_load(yaml.safe_dump(cluster).replace("maxReplicas:", "maxReplica:", 1))
    later = {**cluster, "spec": {**cluster["spec"], "tlsOptions": {}}}  # not a 1.6 field
    for bad in (misspelt, later):
        assert not validator.is_valid(bad)

"""`vitray submit -- COMMAND ...` and `vitray jobs ...`: vitray commands as Ray Jobs.

The Jobs API (Ray's dashboard, `RAY_ADDRESS` or `--address`) runs the command on the
cluster's head node. The job's directory holds the project's packages (an allowlist: no
virtualenv, data, runs, stores or secrets) and the files the command names, so a config in
the user's own directory works; `--image` names a container image that holds the code
instead. Ray's token auth stays on: the client sends the token Ray finds in
`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or ~/.ray/auth_token. The client's MLflow tracking
URI and credentials travel in a file of the job's directory (`inputs/credentials.json`, read
by the job's driver and workers at start), so the job logs to an authenticating MLflow
server as the client's user: not in the job's config, and not in Ray's runtime environment,
which Ray's runtime-env agent writes to its log and the dashboard shows. With `--image`
there is no job directory, and they travel in the runtime environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.secrets import CREDENTIALS_FILE_ENV, redact
from jobs.tracking.runs import tracking_uri

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("vit", "pipeline", "jobs")  # what a job needs of the project: its code, no more
INPUTS = "inputs"  # where the files a command names travel, inside the job's directory
CONFIG_PATHS = ("data.dataset", "init.checkpoint", "run.storage_path")
CREDENTIALS = f"{INPUTS}/credentials.json"
MLFLOW_ENV = (  # the tracking URI may carry a password too
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
FORWARDED_ENV = (
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_DATA_LOG_LEVEL",
    "VITRAY_DATA",
    "VITRAY_DEBUG",
)


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth, a non-Ray URL
        raise ConnectionError(f"cannot reach the Ray job server at {address}: {e}") from e


def runtime_env(image: str | None, working_dir: Path | None) -> dict[str, Any]:
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # as on nodes vitray starts
    if image:
        env_vars.update({k: os.environ[k] for k in MLFLOW_ENV if k in os.environ})
        return {"image_uri": image, "env_vars": env_vars}
    env_vars[CREDENTIALS_FILE_ENV] = CREDENTIALS  # relative: workers start in the job's dir
    return {"working_dir": str(working_dir), "env_vars": env_vars}


def write_credentials(directory: Path, uri: str | None) -> None:
    """The job's MLflow tracking URI (as the client resolves it: its config's or command
    line's, else its MLFLOW_TRACKING_URI, else its ./mlflow.db) and the client's MLflow
    credentials, in a file only its owner reads: out of Ray's logs and job records."""
    values = {k: os.environ[k] for k in MLFLOW_ENV if k in os.environ}
    if uri:
        values["MLFLOW_TRACKING_URI"] = uri
    path = directory / CREDENTIALS
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))


def client_path(value: str) -> str:
    """A path as the client meant it: relative paths made absolute against its cwd. URIs,
    MLflow references and `builtin:` datasets are left alone; `FORMAT:PATH` weights keep
    their format."""
    if "://" in value or value.startswith(("runs:/", "models:/", "builtin:")):
        return value
    fmt, sep, path = value.partition(":")
    if sep and fmt in ("timm", "hf", "torchvision", "jax"):
        return f"{fmt}:{Path(path).expanduser().resolve()}"
    return str(Path(value).expanduser().resolve())


def resolved_config(path: str, overrides: list[str]) -> tuple[str, str]:
    """The job's config as YAML, read and validated here (a bad key fails before anything
    is submitted), with its local paths made absolute; and its MLflow tracking URI as the
    client resolves it (its MLFLOW_TRACKING_URI or ./mlflow.db, not one in the job's
    temporary directory on the cluster), which travels with the credentials, not in the
    config."""
    import yaml

    from jobs.config import load_config, with_values

    cfg = load_config(path, overrides)
    tree = cfg.model_dump(mode="json")
    paths = {"mlflow.tracking_uri": None}
    for key in CONFIG_PATHS:
        section, field = key.split(".")
        if tree[section][field]:
            paths[key] = client_path(tree[section][field])
    resolved = with_values(cfg, paths).model_dump(mode="json")
    return yaml.safe_dump(resolved, sort_keys=False), tracking_uri(cfg.mlflow)


def stage(command: list[str], directory: Path) -> list[str]:
    """Write into `directory` the project's packages and the files `command` names; return
    the command rewritten to read them there. A `--config` is resolved with its `--set`
    overrides into one file; any other argument naming a local file travels as it is, and
    one naming a local directory is made absolute."""
    args, overrides, config = [], [], None
    words = iter(command)
    uri = None  # an MLflow URI named on the command line travels with the credentials
    for word in words:
        option, eq, value = word.partition("=")
        if option == "--config":
            config = value if eq else next(words, None)
        elif option == "--set":
            overrides.append(value if eq else next(words, ""))
        elif option == "--tracking-uri":
            uri = value if eq else next(words, None)
        else:
            args.append(word)
    if config is not None:
        resolved, uri = resolved_config(config, overrides)
    else:
        resolved = None
        named = [o.partition("=")[2] for o in overrides if o.startswith("mlflow.tracking_uri=")]
        overrides = [o for o in overrides if not o.startswith("mlflow.tracking_uri=")]
        uri = named[-1] if named else uri
    shown = [*args, *([] if resolved is not None else overrides)]  # the entrypoint's words
    if any(redact(word) != word for word in shown):
        raise ValueError(
            "a credential in the command would show in the job's entrypoint (`ray job list`, "
            "the dashboard): give it in the --config file, or in an environment variable"
        )
    for package in PACKAGES:
        shutil.copytree(
            PROJECT / package, directory / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (directory / INPUTS).mkdir()
    write_credentials(directory, uri)
    if resolved is not None:
        (directory / INPUTS / "config.yaml").write_text(resolved)
        args += ["--config", f"{INPUTS}/config.yaml"]
    else:
        args += [w for item in overrides for w in ("--set", item)]
    staged = []
    for i, word in enumerate(args):
        local = Path(word).expanduser()
        if i == 0 or word.startswith("-") or not local.exists() or word.startswith(INPUTS):
            staged.append(word)
        elif local.is_dir():
            staged.append(str(local.resolve()))
        else:
            target = directory / INPUTS / f"{i}-{local.name}"
            shutil.copyfile(local, target)
            staged.append(f"{INPUTS}/{target.name}")
    return staged


async def stream_logs(jobs: Any, job_id: str) -> str:
    seen = []
    async for lines in jobs.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
        seen.append(lines)
    return "".join(seen)


def mlflow_run_of(logs: str) -> str | None:
    """The run our jobs print at the end: 'MLflow run <id> at <uri>'."""
    found = re.findall(r"MLflow run ([0-9a-f]{32}) at (\S+)", logs)
    return f"{found[-1][1]} run {found[-1][0]}" if found else None


def submit_when_ready(jobs: Any, entrypoint: str, env: dict[str, Any], wait_s: float = 120) -> str:
    """Submit; a cluster that just started answers "No available agent" for a while."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env=env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("the cluster's job agent is not up yet; retrying", flush=True)
            time.sleep(3)


def submit(
    command: list[str], address: str | None, wait: bool = True, image: str | None = None
) -> int:
    """Submit `vitray COMMAND...`; with `wait`, stream its logs and return 0 on success."""
    if not command:
        raise ValueError("nothing to submit: vitray submit -- pretrain --config ...")
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="vitray-job-") as tmp:
        if not image:  # an image holds the code, and the command names files in it
            command = stage(command, Path(tmp))
        entrypoint = shlex.join(["python", "-m", "jobs.cli", *command])
        job_id = submit_when_ready(jobs, entrypoint, runtime_env(image, Path(tmp)))
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it: vitray jobs logs {job_id} --follow")
        return 0
    logs = asyncio.run(stream_logs(jobs, job_id))
    info = jobs.get_job_info(job_id)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    print(f"job {job_id}: {status}")
    link = mlflow_run_of(logs)
    if link:
        print(f"MLflow: {link}")
    if status != "SUCCEEDED":
        print(f"job {job_id} {status.lower()}: {info.message}", file=sys.stderr)
        return 1
    return 0

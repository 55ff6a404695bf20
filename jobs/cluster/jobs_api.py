"""`vitray submit -- COMMAND ...` and `vitray jobs ...`: vitray commands as Ray Jobs.

The Jobs API (Ray's dashboard, `RAY_ADDRESS` or `--address`) runs the command on the
cluster's head node. The runtime environment ships this project (the working directory,
minus the virtualenv, data, runs and stores) unless `--image` names a container image that
already holds it. Ray's token auth stays on: the client sends the token Ray finds in
`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]
EXCLUDES = [
    ".venv",
    ".git",
    ".vitray",
    "data",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "bench-results",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
]
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
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


def runtime_env(image: str | None) -> dict[str, Any]:
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if image:
        return {"image_uri": image, "env_vars": env_vars}
    return {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env_vars}


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
    entrypoint = shlex.join(["python", "-m", "jobs.cli", *command])
    job_id = submit_when_ready(jobs, entrypoint, runtime_env(image))
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

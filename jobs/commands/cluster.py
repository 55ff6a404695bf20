"""`vitray cluster local up|down`: a local multi-node Ray cluster and MLflow server."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.cluster.local import DEFAULT_STATE, auth_env, down, up


def run(args: argparse.Namespace) -> None:
    state_dir = Path(args.state)
    if args.action == "down":
        down(state_dir)
        return
    state = up(
        state_dir, args.workers, args.cpus, mlflow=not args.no_mlflow, mlflow_auth=args.mlflow_auth
    )
    print(f"Ray: head + {args.workers} worker node(s) at {state['ray_address']}")
    print(f"  dashboard and job server: {state['dashboard']}")
    if "mlflow" in state:
        print(f"  MLflow server:            {state['mlflow']}")
    print("use it (token auth is on; the token is in the state directory):")
    for key, value in auth_env(state_dir).items():
        print(f"  export {key}={value}")
    print(f"  export RAY_ADDRESS={state['dashboard']}")
    if "mlflow" in state:
        print(f"  export MLFLOW_TRACKING_URI={state['mlflow']}")
    if "mlflow_user" in state:  # the password itself is never printed
        print(f"  export MLFLOW_TRACKING_USERNAME={state['mlflow_user']}")
        print(f'  export MLFLOW_TRACKING_PASSWORD="$(cat {state["mlflow_password_file"]})"')
    print("  vitray submit -- pretrain --config jobs/configs/demo-pretrain.yaml")
    print(f"stop it: vitray cluster local down --state {state_dir}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("where", choices=["local"], help="only `local` (this machine) for now")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes beside the head")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each node offers")
    parser.add_argument("--no-mlflow", action="store_true", help="no MLflow server")
    parser.add_argument(
        "--mlflow-auth",
        action="store_true",
        help="MLflow with its basic-auth app: user admin, password made once and kept in the "
        "state directory (owner-only)",
    )
    parser.add_argument("--state", default=str(DEFAULT_STATE), help="where up records its pids")

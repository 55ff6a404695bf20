"""`vitray cluster local up|down`: a local multi-node Ray cluster and MLflow server;
`vitray cluster check`: the all-reduce bandwidth of the cluster Ray joins."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jobs.cluster.local import DEFAULT_STATE, auth_env, down, up


def run(args: argparse.Namespace) -> None:
    if args.where == "check":
        from jobs.cluster.netcheck import check

        if args.address:
            os.environ["RAY_ADDRESS"] = args.address
        check(args.size_mib, args.iterations, args.workers, args.cpus_per_worker)
        return
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
    where = parser.add_subparsers(dest="where", required=True, metavar="local|check")
    local = where.add_parser(
        "local", help="a Ray head, worker nodes and an MLflow server on 127.0.0.1"
    )
    local.add_argument("action", choices=["up", "down"])
    local.add_argument("--workers", type=int, default=1, help="worker nodes beside the head")
    local.add_argument("--cpus", type=int, default=1, help="CPUs each node offers")
    local.add_argument("--no-mlflow", action="store_true", help="no MLflow server")
    local.add_argument(
        "--mlflow-auth",
        action="store_true",
        help="MLflow with its basic-auth app: user admin, password made once and kept in the "
        "state directory (owner-only)",
    )
    local.add_argument("--state", default=str(DEFAULT_STATE), help="where up records its pids")
    check = where.add_parser(
        "check",
        help="all-reduce GB/s of the cluster's workers, over all and per pair of nodes",
        description="Before a long multi-node run: one Ray Train worker per GPU (NCCL), or one "
        "per node without GPUs (gloo), all-reduce a tensor; prints the bus bandwidth over all "
        "ranks and between each pair of nodes (nccl-tests' busbw). A pair far below the rest "
        "is a slow link: no EFA, NCCL on the wrong interface (docs/cluster.md). On a remote "
        "cluster, run it as a job: vitray submit -- cluster check.",
    )
    check.add_argument("--address", help="the cluster's GCS host:port (default: RAY_ADDRESS)")
    check.add_argument("--size-mib", type=int, default=256, help="tensor size (default 256)")
    check.add_argument("--iterations", type=int, default=10, help="timed all-reduces")
    check.add_argument("--workers", type=int, help="default: the GPUs, else the nodes")
    check.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves"
    )

"""`vitray bench all --json PATH`: every benchmark in one run, one JSON, one machine.

On a GPU: ViT-S/16 and B/16 at 224 in bf16, eager and compiled, ours against timm
(training and inference images/s, MFU, peak memory). On a CPU: ti/16, eager. Then the data,
train and finetune benchmarks with their defaults (`--quick`: smaller).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from jobs.bench import data, finetune, model, train
from jobs.bench.common import write_result


def parsed(add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> Any:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def plan(quick: bool) -> list[tuple[str, Any, list[str]]]:
    """(name, module, argv) for each benchmark this machine should run."""
    runs: list[tuple[str, Any, list[str]]] = []
    if torch.cuda.is_available():
        for preset in ("s/16", "b/16"):
            for compiled in (False, True):
                argv = ["--preset", preset, "--batch", "128", "--steps", "10" if quick else "30"]
                name = f"model {preset} {'compiled' if compiled else 'eager'}"
                runs.append((name, model, argv + ["--compile"] * compiled))
    else:
        runs.append(("model ti/16 eager", model, ["--steps", "4" if quick else "8"]))
    runs.append(("data", data, ["--images", "1000" if quick else "4000"]))
    runs.append(("train", train, ["--steps", "30" if quick else "60"]))
    seeds = ["--seeds", "1", "--pretrain-epochs", "15", "--epochs", "2"] if quick else []
    runs.append(("finetune", finetune, seeds))
    return runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name, module, argv in plan(args.quick):
        print(f"== bench {name}: {' '.join(argv)}", flush=True)
        result = module.run(parsed(module.add_arguments, argv))
        results[name] = {k: v for k, v in result.items() if k != "machine"}
    return write_result({"benchmark": "all", "quick": args.quick, "results": results}, args.json)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer steps, images and seeds")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")

"""The `vitray` command line: one subcommand per job, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from jobs.cluster.raynode import quiet_ray_notices
from jobs.secrets import load_job_credentials, mask_process_output

# name -> (module, help, description). Each module under jobs/commands defines
# add_arguments(parser) and run(args). Only the chosen command's module is imported:
# `vitray --help` does not wait for torch and Ray.
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "info": ("jobs.commands.info", "config, parameters and GFLOPs of a preset or checkpoint", None),
    "convert": (
        "jobs.commands.convert",
        "convert weights between timm/HF/torchvision/JAX and vitray checkpoints",
        "--from FORMAT IN OUT_DIR imports foreign weights into a vitray checkpoint directory; "
        "--to FORMAT CHECKPOINT OUT exports one (a directory for timm and hf, an .npz for jax).",
    ),
    "prepare": (
        "jobs.commands.prepare",
        "write images as Parquet shards of their original bytes + manifest.json",
        "SRC is an image folder (one subfolder per class), Hugging Face image Parquet, "
        "WebDataset .tar shards, builtin:digits or builtin:photos?n=N. Every image is decoded "
        "once to check it; bad files are skipped and listed in the manifest.",
    ),
    "pretrain": (
        "jobs.commands.pretrain",
        "distributed ViT training on Ray Train, tracked in MLflow",
        "Validate the config, build the Ray datasets, train with TorchTrainer. Re-running with "
        "the same run.name resumes from its latest checkpoint.",
    ),
    "finetune": (
        "jobs.commands.pretrain",
        "fine-tune a checkpoint at a new resolution (posemb interpolated, new head)",
        "Start from init.checkpoint (a vitray checkpoint directory, runs:/..., "
        "models:/NAME/VERSION or models:/NAME@ALIAS, timm:DIR, hf:DIR, torchvision:PATH[:WEIGHTS], "
        "jax:PATH.npz), resize the position embeddings to data.image_size, log the resized "
        "checkpoint to MLflow, then train as pretrain does.",
    ),
    "tune": (
        "jobs.commands.tune",
        "a Ray Tune search of fine-tunes (ASHA), best model registered in MLflow",
        "Sample the config keys in tune.space (loguniform, uniform, randint, choice, grid), "
        "run each trial as a full training run, stop weak ones early (ASHA), log a parent "
        "MLflow run with one nested run per trial, register the best checkpoint as "
        "tune.register_as@tune.alias. Re-running the same command resumes the search.",
    ),
    "demo": (
        "jobs.commands.demo",
        "prepare digits, pretrain at 16 px, tune fine-tunes at 32 px, register the best",
        "The paper's recipe end to end on scikit-learn's real digits with a local Ray and the "
        "local MLflow store (or MLFLOW_TRACKING_URI): what `make demo` runs.",
    ),
    "visualize": (
        "jobs.commands.visualize",
        "the paper's figures for a checkpoint: E's filters, posemb similarity, attention",
        "Principal components of the patch embedding, position-embedding similarity, and with "
        "--data mean attention distance per head and attention rollout on real images. PNGs "
        "under --out; with --mlflow-run also logged to that run.",
    ),
    "evaluate": (
        "jobs.commands.evaluate",
        "top-1/top-5, per-class accuracy and a confusion matrix, logged to MLflow",
        "Score a checkpoint on a split of a dataset (eval transforms at the checkpoint's image "
        "size); log the metrics and the confusion-matrix figure to --mlflow-run, or to a new "
        "run in --experiment.",
    ),
    "predict": (
        "jobs.commands.predict",
        "batch inference on Ray Data: Parquet with id, top-k labels and scores",
        "Read, decode and patchify on Ray Data tasks, classify on an actor pool (a GPU per "
        "actor when the cluster has GPUs), write Parquet. Images that do not decode are "
        "written with ok=false and counted, not fatal.",
    ),
    "submit": (
        "jobs.commands.submit",
        "run a vitray command as a Ray Job on a cluster, stream its logs",
        "vitray submit [--address URL] [--no-wait] -- pretrain --config ... ships this project "
        "(or uses --image), streams the job's logs, exits with its status and prints the "
        "MLflow run it logged to.",
    ),
    "jobs": ("jobs.commands.jobs", "list, status, logs [--follow], stop Ray Jobs", None),
    "cluster": (
        "jobs.commands.cluster",
        "a local multi-node Ray cluster + MLflow server; the all-reduce bandwidth of a cluster",
        "vitray cluster local up [--workers N] [--cpus C]: a Ray head and N worker nodes "
        "(dashboard and job server included) and an MLflow server (SQLite, local artifacts), "
        "all bound to 127.0.0.1; `down` stops exactly what `up` started. vitray cluster "
        "check: all-reduce GB/s over the workers of the cluster RAY_ADDRESS names.",
    ),
}
BENCHMARKS: dict[str, tuple[str, str, str | None]] = {
    "all": ("jobs.bench.all", "every benchmark, one JSON (GPU models when present)", None),
    "model": ("jobs.bench.model", "training step of our ViT vs timm's, same process", None),
    "data": ("jobs.bench.data", "Ray Data pipeline vs DataLoader vs one process", None),
    "train": ("jobs.bench.train", "Ray-Data-fed vs in-memory training, Ray Train cost", None),
    "finetune": ("jobs.bench.finetune", "posemb interpolated vs re-initialised vs scratch", None),
    "recipe": (
        "jobs.bench.recipe",
        "16 -> 28 px recipe vs 28 px scratch, Fashion-MNIST test",
        None,
    ),
    "scale": ("jobs.bench.scale", "planning and img/s from 100 to 10,000 shards on S3", None),
}


def entry_points(module_name: str) -> tuple[Callable[..., None], Callable[..., Any]]:
    """(add_arguments, run) of a command module."""
    module = importlib.import_module(module_name)
    return module.add_arguments, module.run


def add_commands(
    sub: Any, table: dict[str, tuple[str, str, str | None]], chosen: str | None
) -> None:
    """One subparser per entry; only the chosen one imports its module for its options."""
    for name, (module, help, description) in table.items():
        parser = sub.add_parser(name, help=help, description=description or help)
        if name == chosen:
            arguments, run = entry_points(module)
            arguments(parser)
            parser.set_defaults(func=run)


def chosen_commands(argv: list[str]) -> tuple[str | None, str | None]:
    """The command (and benchmark) named in argv, before argparse sees it."""
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else None
    benchmark = words[1] if command == "bench" and len(words) > 1 else None
    return command, benchmark


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Every command's help; options (and the module import) only for the one in argv."""
    parser = argparse.ArgumentParser(
        prog="vitray",
        description="Vision Transformers trained on Ray, tracked in MLflow.",
    )
    command, benchmark = chosen_commands(argv)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, COMMANDS, command)
    bench = sub.add_parser("bench", help="benchmarks; results printed and written as JSON")
    benches = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_commands(benches, BENCHMARKS, benchmark)
    return parser


PROGRESS_LINE = r"\bstep \d+/\d+ epoch \d"  # jobs.training.report's
CPP_LOG_LINE = r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \w+\.cc:\d+:"
# The raylet's warning that more worker processes started than the node has CPUs: on a small
# machine, the decode tasks' CPU fractions (data.cpus_per_task) start that many by design.
WORKER_START_WARNING = r"^WARNING: \d+ PYTHON worker processes have been started on node"


def main(argv: list[str] | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in logs as they come
    mask_process_output()  # before any handler holds the streams: no password printed
    load_job_credentials()  # a submitted job's MLflow credentials, from its package
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_ray_notices()
    # Before any command imports Ray Data, which reads it once: no "Dataset ... execution
    # finished" INFO line between the progress lines each time a dataset runs here.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    # Ray's C++ log lines from worker processes and the raylet's worker-start warning stay in
    # the session logs, off the console (a Ray Train run printed an ERROR about its own
    # PreemptionWatcher's arguments); errors that reach Python still show
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", f"{CPP_LOG_LINE}|{WORKER_START_WARNING}")
    # Every trial's progress line shows, each its own: Ray would fold two trials' lines into
    # "[repeated 9x across cluster]" with a notice about its deduplication
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINE)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # \r bars in logs
    # MLflow's INFO lines (database tables, system-metrics monitors, input validation):
    # read when MLflow configures its logger on import, after this
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow prints a run's URL each time a run ends, with the credentials of the tracking
    # URI in it; the commands print the run's URL themselves, the password masked.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as e:  # bad input: exit 2
        stop(args.command, "error", e, 2)
    except RuntimeError as e:  # the job ran and failed (a stalled search, no trial finished)
        stop(args.command, "failed", e, 1)


def stop(command: str, kind: str, error: BaseException, code: int) -> NoReturn:
    """One line naming the error; its traceback too under VITRAY_DEBUG=1."""
    if os.environ.get("VITRAY_DEBUG"):
        traceback.print_exc()
    print(f"vitray {command}: {kind}: {error}", file=sys.stderr)
    raise SystemExit(code) from error


if __name__ == "__main__":
    main()

"""`vitray bench scale --shards 100 1000 10000`: planning time, tasks per epoch and streaming
images/s as the number of small shards on object storage grows.

Each size N is a prepared dataset of N shards on S3: the shards of one small prepared
dataset (builtin:digits, `--rows-per-shard` rows each) copied under N names, and a manifest
that lists them all. The S3 server is the one AWS_ENDPOINT_URL names, else a local one
(moto's server mode) started on 127.0.0.1 and stopped by its process group. Planning
(`build_dataset` on the driver: manifest, units, tasks, the Ray Dataset) covers all N
shards; streaming reads the same number of images (`--images`) from the start of an epoch at
every size, so that the cost per image can be compared: it should not grow with N. The
cost is counted twice: wall time (images/s) and the CPU time that the driver and Ray's
processes spent per image, which a shared machine's other load does not inflate (the S3
server's own CPU time is counted apart). Sizes take turns each round (shared machines
drift), and each reports its best round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pyarrow.fs as pafs

from jobs.bench.common import write_result
from jobs.bench.s3server import moto_server
from pipeline.config import DataConfig
from pipeline.dataset import build_dataset, describe_dataset, plan_split, quiet_progress
from pipeline.prepare import prepare
from pipeline.sources import MANIFEST

BUCKET = "vitray-bench"
S3_VARIABLES = {  # moto accepts any credentials; real servers take the caller's own
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_endpoint() -> Iterator[tuple[str, int | None]]:
    """(endpoint, server pid): AWS_ENDPOINT_URL if set, else a moto server started on
    127.0.0.1 for the duration, with the AWS variables aimed at it (pyarrow and Ray's
    workers read them)."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield os.environ["AWS_ENDPOINT_URL"], None
        return
    with moto_server() as (endpoint, pid):
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, **S3_VARIABLES})
        yield endpoint, pid


def seed_shards(rows_per_shard: int, workdir: Path) -> tuple[Path, dict]:
    """builtin:digits prepared into shards of about `rows_per_shard` rows (~100 B each)."""
    out = workdir / "seed"
    size = rows_per_shard * 150  # digits' PNGs average ~150 bytes with their ids
    return out, prepare("builtin:digits", out, shard_size=size, progress=False)


def upload_sized(fs: pafs.FileSystem, seed: Path, manifest: dict, shards: int) -> str:
    """A dataset of `shards` train shards under s3://BUCKET/shards-N: the seed's train shards
    in turn under new names, the seed's val split, and a manifest listing them. Returns its
    URI."""
    root = f"{BUCKET}/shards-{shards}"
    seeds = manifest["splits"]["train"]["shards"]
    full = max(s["rows"] for s in seeds)
    seeds = [s for s in seeds if s["rows"] == full]  # equal shards: the last is smaller
    data = {s["file"]: (seed / s["file"]).read_bytes() for s in seeds}
    train = [{**seeds[i % len(seeds)], "file": f"train-{i:05d}.parquet"} for i in range(shards)]
    sized = copy.deepcopy(manifest)
    sized["splits"]["train"] = {"rows": sum(s["rows"] for s in train), "shards": train}
    writes = [(s["file"], data[seeds[i % len(seeds)]["file"]]) for i, s in enumerate(train)]
    writes += [
        (s["file"], (seed / s["file"]).read_bytes()) for s in manifest["splits"]["val"]["shards"]
    ]
    writes.append((MANIFEST, json.dumps(sized).encode()))

    def put(item: tuple[str, bytes]) -> None:
        with fs.open_output_stream(posixpath.join(root, item[0])) as f:
            f.write(item[1])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, writes))
    return f"s3://{root}"


def planning(cfg: DataConfig) -> tuple[float, int, Any]:
    """(seconds to build the train dataset on the driver, tasks per epoch, the dataset)."""
    start = time.perf_counter()
    ds = quiet_progress(build_dataset(cfg, "train", patch_size=16))
    seconds = time.perf_counter() - start
    tasks = len(plan_split(cfg, describe_dataset(cfg), "train"))
    return seconds, tasks, ds


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """CPU seconds so far of (this process and its descendants but `pid`: the driver and
    Ray's processes; `pid` alone: the S3 server we started)."""
    ours = server = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            if p.pid == pid:
                server += times.user + times.system
            else:
                ours += times.user + times.system
    return ours, server


def stream(ds: Any, images: int, batch: int, server: int | None) -> dict[str, float]:
    """The first `images` rows of an epoch, iterated as a train worker does: images/s and
    CPU milliseconds per image of the pipeline and of the S3 server."""
    cpu, server_cpu = cpu_seconds(server)
    start = time.perf_counter()
    seen = 0
    for b in ds.limit(images).iter_batches(batch_size=batch, batch_format="numpy"):
        seen += len(b["label"])
    seconds = time.perf_counter() - start
    cpu_after, server_after = cpu_seconds(server)
    return {
        "img_s": seen / seconds,
        "cpu_ms_per_image": 1000 * (cpu_after - cpu) / seen,
        "server_cpu_ms_per_image": 1000 * (server_after - server_cpu) / seen,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from jobs.cluster.raynode import set_node_env

    sizes = sorted(args.shards)
    if args.images > sizes[0] * args.rows_per_shard:
        raise ValueError(
            f"--images {args.images} is more than the smallest size holds "
            f"({sizes[0]} shards x {args.rows_per_shard} rows): lower it or raise --shards"
        )
    cores = args.cores or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp, s3_endpoint() as (endpoint, server):
        seed, manifest = seed_shards(args.rows_per_shard, Path(tmp))
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True
        )
        fs.create_dir(BUCKET)
        uris = {}
        for n in sizes:
            start = time.perf_counter()
            uris[n] = upload_sized(fs, seed, manifest, n)
            print(f"{n} shards uploaded to {uris[n]} in {time.perf_counter() - start:.1f} s")
        set_node_env(cores)  # as `ensure_ray` starts a job's local Ray
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            results = measure(args, uris, server)
        finally:
            ray.shutdown()
    smallest = results[sizes[0]]
    for r in results.values():
        r["wall_cost_vs_smallest"] = round(smallest["img_s"] / r["img_s"], 3)
        r["cpu_cost_vs_smallest"] = round(r["cpu_ms_per_image"] / smallest["cpu_ms_per_image"], 3)
    return write_result(
        {
            "benchmark": "scale",
            "endpoint": "local moto server" if server else "AWS_ENDPOINT_URL",
            "rows_per_shard": args.rows_per_shard,
            "images_streamed": args.images,
            "image_size": args.size,
            "cores": cores,
            "by_shards": {str(n): r for n, r in results.items()},
        },
        args.json,
    )


def measure(
    args: argparse.Namespace, uris: dict[int, str], server: int | None
) -> dict[int, dict[str, Any]]:
    """Each size in turn, `--rounds` times: planning, tasks, streaming; the best round of
    each measure."""
    rounds: dict[int, list[dict[str, float]]] = {n: [] for n in uris}
    for r in range(args.rounds):
        for n, uri in uris.items():
            cfg = DataConfig(dataset=uri, image_size=args.size)
            seconds, tasks, ds = planning(cfg)
            rounds[n].append(
                {
                    "planning_s": seconds,
                    "tasks": tasks,
                    **stream(ds, args.images, args.batch, server),
                }
            )
            got = rounds[n][-1]
            print(
                f"round {r + 1}, {n} shards: planned in {seconds:.2f} s, {tasks} tasks per "
                f"epoch; {args.images} images at {got['img_s']:.0f} img/s, "
                f"{got['cpu_ms_per_image']:.3f} CPU ms/image "
                f"(+{got['server_cpu_ms_per_image']:.3f} in the S3 server)",
                flush=True,
            )
    return {n: best(runs) for n, runs in rounds.items()}


def best(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The best round of each measure, and every round's."""
    return {
        "planning_s": round(min(r["planning_s"] for r in runs), 3),
        "tasks_per_epoch": int(runs[0]["tasks"]),
        "img_s": round(max(r["img_s"] for r in runs), 1),
        "cpu_ms_per_image": round(min(r["cpu_ms_per_image"] for r in runs), 4),
        "server_cpu_ms_per_image": round(min(r["server_cpu_ms_per_image"] for r in runs), 4),
        "rounds": [{k: round(v, 4) for k, v in r.items()} for r in runs],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", type=int, nargs="+", default=[100, 1000, 10000], help="dataset sizes"
    )
    parser.add_argument("--rows-per-shard", type=int, default=200, help="images per shard")
    parser.add_argument("--images", type=int, default=20000, help="images streamed at every size")
    parser.add_argument("--size", type=int, default=32, help="output image size")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="measurements of each size")
    parser.add_argument("--cores", type=int, help="Ray CPUs (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")

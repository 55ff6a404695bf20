"""`vitray prepare SRC OUT`: images as Parquet shards of their original bytes."""

from __future__ import annotations

import argparse

from pipeline.prepare import prepare


def run(args: argparse.Namespace) -> None:
    prepare(
        args.source,
        args.out,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        strict=args.strict,
        overwrite=args.overwrite,
        image_column=args.image_column,
        label_column=args.label_column,
        label_field=args.label_field,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC")
    p.add_argument("out", metavar="OUT", help="local output directory")
    p.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction held out as 'val' where the source has no splits",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the row order")
    p.add_argument("--strict", action="store_true", help="fail on the first bad image")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of prepare in OUT (never other files)",
    )
    p.add_argument(
        "--image-column",
        help="Parquet: the image column (default: the Hugging Face Image feature, else image); "
        "WebDataset: the image extension (default: any)",
    )
    p.add_argument(
        "--label-column",
        help="Parquet: the label column (default: the ClassLabel feature, else label); "
        "WebDataset: the label extension (default: cls, cls2, index, inx or id)",
    )
    p.add_argument("--label-field", help="WebDataset: the label's key in each sample's json")

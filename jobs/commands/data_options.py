"""The data options of the commands that feed images to a checkpoint (evaluate, predict,
visualize): not a command itself. Unset options follow the checkpoint's own config.json."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import DataConfig
from pipeline.dataset import ensure_prepared


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-crop-fraction",
        type=float,
        help="the center crop's share of the resized image (default: the checkpoint's, else 0.875)",
    )
    parser.add_argument(
        "--interpolation",
        choices=["bilinear", "bicubic", "nearest"],
        help="the resize filter (default: the checkpoint's, else bilinear)",
    )
    parser.add_argument(
        "--eval-crop-mode",
        choices=["center", "squash"],
        help="resize the shorter side (center) or both (squash); default: the checkpoint's",
    )
    parser.add_argument("--image-column", help="Parquet image column / WebDataset extension")
    parser.add_argument("--label-column", help="Parquet label column / WebDataset extension")
    parser.add_argument("--label-field", help="WebDataset: the label's key in its json")


def data_for(dataset: str, meta: dict[str, Any], args: argparse.Namespace, **more: Any):
    """The DataConfig that feeds the checkpoint of `meta` (its config.json) from `dataset`."""
    return DataConfig.for_checkpoint(
        ensure_prepared(dataset),
        meta,
        eval_crop_fraction=args.eval_crop_fraction,
        interpolation=args.interpolation,
        eval_crop_mode=args.eval_crop_mode,
        image_column=args.image_column,
        label_column=args.label_column,
        label_field=args.label_field,
        **more,
    )

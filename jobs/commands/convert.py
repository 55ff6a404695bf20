"""`vitray convert --from FORMAT IN OUT` / `--to FORMAT CHECKPOINT OUT`: foreign weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from vit import convert


def run(args: argparse.Namespace) -> None:

    if bool(args.source) == bool(args.target):
        raise SystemExit("vitray convert: give exactly one of --from or --to")
    if args.source:
        model = convert.import_weights(args.source, Path(args.input), Path(args.output))
        print(
            f"wrote {args.output}: {args.source} -> vitray, {model.num_params() / 1e6:.2f} M "
            f"params, image size {model.config.image_size}"
        )
    else:
        out = convert.export_weights(args.target, Path(args.input), Path(args.output))
        print(f"wrote {out}: vitray -> {args.target}")


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument("--from", dest="source", choices=convert.SOURCES, help="import this format")
    p.add_argument("--to", dest="target", choices=convert.TARGETS, help="export to this format")
    p.add_argument("input", help="weights file or directory to read")
    p.add_argument("output", help="where to write")

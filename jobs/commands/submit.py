"""`vitray submit [--address URL] -- COMMAND ...`: a vitray command as a Ray Job."""

from __future__ import annotations

import argparse

from jobs.cluster.jobs_api import submit


def run(args: argparse.Namespace) -> None:
    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    raise SystemExit(submit(command, args.address, wait=not args.no_wait, image=args.image))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the Ray dashboard URL (default: RAY_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--image", help="a container image holding vitray (else ship the code)")
    parser.add_argument(
        "command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="a vitray command"
    )

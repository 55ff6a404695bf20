"""`vitray jobs list|status|logs|stop`: the Ray Jobs of a cluster."""

from __future__ import annotations

import argparse
import asyncio

from jobs.cluster.jobs_api import client, stream_logs


def run(args: argparse.Namespace) -> None:
    jobs = client(args.address)
    if args.action == "list":
        for job in jobs.list_jobs():
            print(f"{job.submission_id}  {job.status}  {job.entrypoint}")
        return
    if not args.job_id:
        raise ValueError(f"vitray jobs {args.action} needs a job id")
    if args.action == "status":
        info = jobs.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status} {info.message or ''}".rstrip())
    elif args.action == "logs":
        if args.follow:
            asyncio.run(stream_logs(jobs, args.job_id))
        else:
            print(jobs.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        stopped = jobs.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "status", "logs", "stop"])
    parser.add_argument("job_id", nargs="?", help="a submission id (raysubmit_...)")
    parser.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    parser.add_argument("--address", help="the Ray dashboard URL (default: RAY_ADDRESS)")

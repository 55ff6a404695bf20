"""One driver per run directory. A second run of the same `run.name` would interleave its
checkpoints with the first's, and each would resume from whichever registered last."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold `run_dir` for the run's life, or refuse naming the holder. The kernel drops the
    lock when its process exits, however it exits, so a crash leaves no stale lock. Local
    and NFS directories only: object stores have no locks."""
    if "://" in run_dir:
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(
                f"another run of the same run.name ({holder(f.read())}) is using {run_dir}; "
                "wait for it to end, or give this run another run.name"
            ) from None
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        f.flush()
        yield


def holder(text: str) -> str:
    """Who holds the lock, as its file says (empty for the moment between taking the lock
    and writing it)."""
    try:
        found = json.loads(text)
        return f"pid {found['pid']} on {found['host']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"

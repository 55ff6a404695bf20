"""Where a worker writes a checkpoint before Ray stores it: a directory of its own under the
node's temp dir, named after the worker's pid. Ray deletes it once stored; a worker killed
before that leaves it behind (a whole checkpoint, optimiser state included), so every
worker that starts removes those whose process is gone."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psutil

PREFIX = "vitray-checkpoint-"


def staging_dir() -> Path:
    """A new, empty directory for one checkpoint of this process."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def remove_orphans(root: str | Path | None = None) -> list[Path]:
    """Remove the staging directories under `root` (the temp dir) whose process has ended;
    returns them. A directory of a live process, or named otherwise, is left alone."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed

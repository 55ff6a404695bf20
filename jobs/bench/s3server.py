"""A local S3-protocol server (moto's server mode) on 127.0.0.1, for `vitray bench scale`
and the tests that need object storage: one place, so both start and stop it the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

from jobs.cluster.local import free_port, wait_http


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """moto's S3 server on 127.0.0.1 for the duration, stopped by its process group:
    (endpoint, pid)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", 60, "the S3 server")
        yield endpoint, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""Rank 0's metrics sink and the retries that end a run: an MLflow server that stops and
comes back costs no training step and, within a bound, no metric.

Rank 0 makes its MLflow requests with short timeouts and one retry: MLflow's defaults wait
about 4 minutes per request (7 retries, backoff factor 2) while the other ranks wait at the
next all-reduce. A report that fails is kept, with the ones after it, and all are sent when
a later report gets through; past `buffer_reports` the oldest are dropped and counted, in a
warning and in the run's `vitray.dropped_metrics` tag. The driver's end-of-run calls (the
final checkpoint, the model, the figures) are retried with backoff for a bounded time.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jobs.environ import scoped_environ
from jobs.secrets import redact

if TYPE_CHECKING:
    from mlflow.entities import Metric

T = TypeVar("T")

RANK0_HTTP = {  # MLflow reads these at each request; a user's own values win
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
MAX_BATCH = 1000  # metrics per log_batch request, MLflow's limit
DROPPED_TAG = "vitray.dropped_metrics"
END_OF_RUN_RETRY_S = 300.0


def warn(text: str) -> None:
    """A warning that may quote the tracking URI or an error naming it: masked here as well
    as by the process's masked streams (jobs.secrets), for a process that lacks them."""
    print(f"vitray: {redact(text)}", file=sys.stderr, flush=True)


def is_outage(error: Exception) -> bool:
    """A failure worth waiting out: no answer, a server error or rate limiting. A request
    the server refuses (another 4xx) fails the same way again, so it is raised."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, OSError)  # requests' connection errors and timeouts among them


def retrying(what: str, call: Callable[[], T], for_s: float = END_OF_RUN_RETRY_S) -> T:
    """`call()` until it gets through or `for_s` has passed, waiting 1, 2, 4 ... 30 s
    between tries; the last error is raised. One warning per outage, not one per try."""
    started = time.monotonic()
    deadline, wait = started + for_s, 1.0
    while True:
        try:
            result = call()
        except Exception as e:
            if not is_outage(e) or time.monotonic() + wait > deadline:
                raise
            if wait == 1.0:
                warn(f"{what} failed ({e}); trying again for up to {for_s:.0f} s")
            time.sleep(wait)
            wait = min(2 * wait, 30.0)
            continue
        if wait > 1.0:
            warn(f"{what} got through after {time.monotonic() - started:.0f} s")
        return result


class MlflowMetrics:
    """Rank 0's metrics, logged to one run. The client is made where it is first used (on
    a Ray Train worker), so the object pickles."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        buffer_reports: int = 1000,
        retry_every_s: float = 15.0,
        final_retry_s: float = 120.0,
    ) -> None:
        self.uri, self.run_id, self.client = uri, run_id, None
        self.pending: deque[list[Metric]] = deque()
        self.buffer_reports, self.retry_every_s = buffer_reports, retry_every_s
        self.final_retry_s = final_retry_s
        self.down_since: float | None = None  # monotonic time of the outage's first failure
        self.next_try = 0.0
        self.dropped = self.dropped_tagged = self.dropped_reports = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "client": None}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send this report and any held back; during an outage, try once per
        `retry_every_s` and otherwise only keep it."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.append([Metric(k, float(v), now, step) for k, v in metrics.items()])
        if self.down_since is None or time.monotonic() >= self.next_try:
            self.flush()
        while len(self.pending) > self.buffer_reports:
            self.dropped += len(self.pending.popleft())
            self.dropped_reports += 1

    def close(self) -> None:
        """After the last report: what an outage held back, retried for `final_retry_s`;
        warnings say what never reached MLflow."""
        try:
            retrying("sending the last metrics", self.send_all, self.final_retry_s)
        except Exception as e:
            warn(f"{len(self.pending)} reports never reached MLflow at {self.uri} ({e})")
        if self.dropped:
            warn(
                f"{self.dropped} metric values of {self.dropped_reports} reports were dropped "
                f"while MLflow at {self.uri} was unreachable (the buffer holds the last "
                f"{self.buffer_reports} reports); the run's tag {DROPPED_TAG} counts them"
            )

    def flush(self) -> None:
        """Try to send what is pending; an outage is warned about once, when it starts."""
        held = len(self.pending)
        try:
            self.send_all()
        except Exception as e:
            if not is_outage(e):
                raise
            if self.down_since is None:
                self.down_since = time.monotonic()
                warn(
                    f"MLflow at {self.uri} is unreachable ({e}); training goes on, metrics "
                    f"are kept (the last {self.buffer_reports} reports) and sent when it is back"
                )
            self.next_try = time.monotonic() + self.retry_every_s
            return
        if self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            warn(f"MLflow at {self.uri} is back after {down_s:.0f} s: {held} reports sent")
            self.down_since = None

    def send_all(self) -> None:
        """The pending reports in batches, each removed once it is logged; then the count of
        dropped values, when it has grown."""
        from mlflow import MlflowClient

        if self.client is None:
            self.client = MlflowClient(self.uri)
        # RANK0_HTTP for the sink's own requests only, where the user set none
        with scoped_environ(**{k: v for k, v in RANK0_HTTP.items() if k not in os.environ}):
            while self.pending:
                rows = self.next_batch()
                self.client.log_batch(self.run_id, metrics=[m for row in rows for m in row])
                for _ in rows:
                    self.pending.popleft()
            if self.dropped > self.dropped_tagged:
                self.client.set_tag(self.run_id, DROPPED_TAG, str(self.dropped))
                self.dropped_tagged = self.dropped

    def next_batch(self) -> list[list[Metric]]:
        """The oldest pending reports, whole, up to MAX_BATCH values (at least one)."""
        rows, size = [], 0
        for row in self.pending:
            if rows and size + len(row) > MAX_BATCH:
                break
            rows.append(row)
            size += len(row)
        return rows

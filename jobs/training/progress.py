"""Rank 0's progress lines, printed by the driver: one clean line, without the prefix Ray
puts on every line a worker prints (`(RayTrainWorker pid=..., ip=...)`)."""

from __future__ import annotations

import threading
from typing import Any

from pipeline.console import ConsoleLine


class ProgressFeed:
    """A Ray queue that rank 0 puts (line, keep) into, and a driver thread that shows them
    on a `ConsoleLine` until the training run ends."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.line = ConsoleLine()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._show, daemon=True)

    def __enter__(self) -> Any:
        self.thread.start()
        return self.queue

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.line.close()
        if not self.thread.is_alive():
            self.queue.shutdown()

    def _show(self) -> None:
        from ray.util.queue import Empty

        while not (self.done.is_set() and self.queue.empty()):
            try:
                text, keep = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue is gone: no more lines, training goes on
                return
            self.line.show(text, keep)

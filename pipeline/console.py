"""One progress line for long work: rewritten in place on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ConsoleLine:
    """On a terminal the line is redrawn with a carriage return; elsewhere (a file, a CI log,
    a Ray job's log) carriage returns would pile up on one line, so it writes a plain line
    at most every `every_s` seconds, and every line asked to be kept."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 0.0) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s, self.last, self.open = every_s, float("-inf"), False

    def show(self, text: str, keep: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K" + ("\n" if keep else ""))
            self.open = not keep
        elif keep or now - self.last >= self.every_s:
            self.stream.write(f"{text}\n")
            self.last = now
        self.stream.flush()

    def close(self) -> None:
        """End a line left open on a terminal."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False

"""No password on the console or in a log: every URI's password is masked where a vitray
process writes (its stdout, its stderr, every log record), whoever wrote the message:
vitray, MLflow, requests, urllib3, Ray. One place, so that no call site can forget it."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

CREDENTIALS = re.compile(r"(://[^/@\s:]*:)[^/@\s]+@")  # the password of scheme://user:password@


def redact(text: str) -> str:
    """`text` with the password of every URI in it masked: what may be printed or logged."""
    return CREDENTIALS.sub(r"\1***@", text)


class MaskedStream:
    """A text stream that masks passwords in what is written to it, and is otherwise the
    stream it wraps (isatty, fileno, encoding, reconfigure...: not io.TextIOBase, whose
    own isatty would hide a terminal from the progress line)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def masked_record_factory(make: Any) -> Any:
    """A log record factory that masks the message once it is formatted with its args."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format: the logging module reports it
            return record
        record.msg, record.args = redact(message), None
        return record

    factory.masks = True  # type: ignore[attr-defined]
    return factory


def mask_process_output() -> None:
    """Mask this process's stdout, stderr and log records (idempotent). Called first thing
    by the `vitray` command, and by every worker of a local Ray it starts
    (`worker_process_setup_hook`), whose output reaches the console and the session logs."""
    if not isinstance(sys.stdout, MaskedStream):
        sys.stdout = MaskedStream(sys.stdout)
    if not isinstance(sys.stderr, MaskedStream):
        sys.stderr = MaskedStream(sys.stderr)
    make = logging.getLogRecordFactory()
    if not getattr(make, "masks", False):
        logging.setLogRecordFactory(masked_record_factory(make))

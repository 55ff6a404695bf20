"""No password on the console or in a log: every URI's password is masked where a vitray
process writes (its stdout, its stderr, every log record), whoever wrote the message:
vitray, MLflow, requests, urllib3, Ray. One place, so that no call site can forget it."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

# scheme://user:password@host: the password, up to the last @ before the path (a password
# may hold an unencoded @, as urllib reads it); scheme://token@host: the token
PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/\s\"'<>]+@")
TOKEN = re.compile(r"://[^/@\s:]+@")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked: what may be printed or logged."""
    return TOKEN.sub("://***@", PASSWORD.sub(r"\1***@", text))


@contextmanager
def masked_errors() -> Iterator[None]:
    """Re-raise an exception whose traceback quotes a credential (MLflow's errors quote the
    request's URL) as one whose text is that traceback masked: Ray writes a failed task's or
    trial's error to disk (Tune's error.txt) and to its logs, past every masked stream."""
    try:
        yield
    except Exception as e:
        told = "".join(traceback.format_exception(e))
        if redact(told) == told:
            raise
        raise RuntimeError(f"{type(e).__name__} (credentials masked):\n{redact(told)}") from None


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
        if record.exc_info:  # the traceback a handler would format: formatted here, masked
            told = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text, record.exc_info = redact(told), None
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


# A submitted job's MLflow credentials travel in a file of its package, never in Ray's runtime
# env (Ray's runtime-env agent logs that whole, and the dashboard shows it): jobs_api writes
# the file and names it here; the job's driver and every worker read it at start.
CREDENTIALS_FILE_ENV = "VITRAY_CREDENTIALS_FILE"


def load_job_credentials() -> None:
    """Set the variables of the job's credentials file in this process: what the client
    sent wins over what the node's environment holds (as Ray's runtime env would)."""
    path = os.environ.get(CREDENTIALS_FILE_ENV)
    if not path:
        return
    file = Path(path).resolve()
    if not file.is_file():  # MLflow would fall back to a store of its own, silently
        raise FileNotFoundError(f"{CREDENTIALS_FILE_ENV}={path}: no such file in {Path.cwd()}")
    os.environ.update(json.loads(file.read_text()))
    os.environ[CREDENTIALS_FILE_ENV] = str(file)  # for processes started from another cwd

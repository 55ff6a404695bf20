"""Environment variables set for one block of code: libraries that read a variable when a
call starts (Tune's fit, MLflow's requests) see it, and nothing after the block does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def scoped_environ(**values: str | None) -> Iterator[None]:
    """These variables set for the block (None: left as they are), then put back as they
    were: unset again, or their earlier value."""
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

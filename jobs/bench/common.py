"""What every benchmark shares: the machine description and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jobs.training import mfu


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def peak_tflops() -> float | None:
    """This machine's card's dense bf16 peak (jobs.training.mfu's table); None on a CPU."""
    if not torch.cuda.is_available():
        return None
    return mfu.peak_tflops(torch.cuda.get_device_name())


def time_call(fn: Callable[[], Any], sync: bool) -> float:
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(result: dict[str, Any], path: str | Path | None) -> dict[str, Any]:
    """Print the result and, when asked, write it as JSON together with the machine."""
    result = {**result, "machine": machine()}
    print(json.dumps(result, indent=2))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return result

"""MFU per report: each card's exact peak, and the first window after a start left out."""

from __future__ import annotations

import pytest
import torch

from jobs.training.mfu import peak_tflops
from jobs.training.report import Reporter


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),  # not an L4
        ("NVIDIA L4", 121.0),
        ("Tesla T4", None),
    ],
)
def test_each_card_gets_its_own_models_peak(device_name, peak):
    assert peak_tflops(device_name) == peak


def reporter(peak_flops: float | None) -> Reporter:
    return Reporter(
        rank=0, micro_batch=8, steps_per_epoch=100, total_steps=100, report_every=10,
        sink=None, progress=None, start_step=0, device=torch.device("cpu"),
        train_flops_per_image=3e9, peak_flops=peak_flops,
    )  # fmt: skip


def window(rep: Reporter, step: int) -> dict[str, float]:
    rep.add(torch.tensor(2.0, dtype=torch.float64), 80, torch.tensor(0.0, dtype=torch.float64))
    metrics = rep.metrics(step, 1e-3)
    rep.reset()
    return metrics


def test_mfu_is_the_models_flops_over_the_peak_from_the_second_window_on():
    rep = reporter(peak_flops=2e12)
    first, second = window(rep, 10), window(rep, 20)
    assert "mfu" not in first  # compile time and the pipeline's start
    assert second["mfu"] == pytest.approx(second["images_per_s"] * 3e9 / 2e12)


def test_no_mfu_without_a_known_peak():
    rep = reporter(peak_flops=None)
    assert "mfu" not in window(rep, 10) and "mfu" not in window(rep, 20)


def test_the_images_a_gpu_trains_follow_its_peak_and_an_unknown_card_is_named():
    from jobs.training.mfu import gpu_images_per_s

    sxm, pcie = gpu_images_per_s(1e9, "H100 SXM"), gpu_images_per_s(1e9, "NVIDIA H100 PCIe")
    assert sxm == pytest.approx(0.5 * 989e12 / 1e9) and pcie / sxm == pytest.approx(756 / 989)
    with pytest.raises(ValueError, match="'Tesla T4'.*known: H100 PCIe"):
        gpu_images_per_s(1e9, "Tesla T4")

"""Model FLOPs utilisation: the training FLOPs the model's images need (3 forwards: the
backward costs two) against the dense bf16 peak of the cards that ran them, the peak of each
card's exact model (an H100 PCIe is not an H100 SXM)."""

from __future__ import annotations

import torch

# Dense (not sparse) bf16 tensor-core peaks from the vendor datasheets, in TFLOP/s, keyed by
# a part of torch.cuda.get_device_name(); the first match wins, so variants come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),  # SXM4 and PCIe alike
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)

# Images/s one CPU core decodes, crops and patchifies through Ray Data at 224 px: `vitray
# bench data`, docs/benchmarks.md (2026-11-27: 1,490-1,519 img/s on 2 cores). What sizes the
# decode CPUs that feed a GPU; measure your own nodes' rate with that benchmark.
DECODE_IMG_S_PER_CORE = 750.0


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in the table."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """FLOP/s of `device` at its bf16 peak; None on a CPU or an unknown card."""
    if device.type != "cuda":
        return None
    peak = peak_tflops(torch.cuda.get_device_name(device))
    return peak * 1e12 if peak else None


def mfu(images_per_s: float, train_flops_per_image: float, peak_flops: float) -> float:
    return images_per_s * train_flops_per_image / peak_flops


def gpu_images_per_s(train_flops_per_image: float, card: str, at_mfu: float = 0.5) -> float:
    """Images/s one `card` trains at `at_mfu` of its peak: what its decode CPUs must feed."""
    peak = peak_tflops(card)
    if peak is None:
        known = ", ".join(part for part, _ in PEAK_BF16_TFLOPS)
        raise ValueError(f"no bf16 peak for the card {card!r}; known: {known}")
    return at_mfu * peak * 1e12 / train_flops_per_image

"""`vitray bench model`: a full training step of our ViT against timm's equal model.

Both models run in one process, interleaved step by step after warm-up, so that a noisy
shared machine slows both alike; the result is their ratio.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from jobs.bench.common import median, peak_tflops, time_call, write_result
from vit import ViT, ViTConfig, forward_flops
from vit.interop import to_timm


def timm_equal(config: ViTConfig) -> torch.nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # timm is a dev extra, needed only to compare against
        raise SystemExit("bench model compares against timm: pip install 'vitray[dev]'") from e
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
    )


def train_step_fn(model: torch.nn.Module, batch: int, config: ViTConfig, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, config.in_chans, *config.image_size, device=device)
    y = torch.randint(0, config.num_classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def infer_step_fn(model: torch.nn.Module, batch: int, config: ViTConfig, device: torch.device):
    x = torch.randn(batch, config.in_chans, *config.image_size, device=device)

    def step() -> None:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            model(x)

    return step


def interleaved_img_s(steps: dict, batch: int, warmup: int, count: int, sync: bool) -> dict:
    """Images/s of each step function, timed in ABBA order after warm-up (median)."""
    for _ in range(warmup):
        for step in steps.values():
            time_call(step, sync)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for i in range(count):
        for name in order if i % 2 == 0 else order[::-1]:  # ABBA: no first-mover bias
            times[name].append(time_call(steps[name], sync))
        print(
            f"step {i + 1}/{count}: "
            + ", ".join(f"{n} {batch / t[-1]:.1f} img/s" for n, t in times.items()),
            flush=True,
        )
    return {name: batch / median(t) for name, t in times.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ViTConfig.from_preset(args.preset, image_size=args.image_size)
    torch.manual_seed(0)
    ours = ViT(config)
    theirs = timm_equal(config)
    theirs.load_state_dict(to_timm(ours))  # the same numbers in both: only the code differs
    models = {"ours": ours, "timm": theirs}
    steps, infer = {}, {}
    for name, model in models.items():
        model = model.to(device).train()
        if args.compile:
            model = torch.compile(model)
        steps[name] = train_step_fn(model, args.batch, config, device)
        infer[name] = infer_step_fn(model, args.batch, config, device)
    sync = device.type == "cuda"
    img_s = interleaved_img_s(steps, args.batch, args.warmup, args.steps, sync)
    for model in models.values():
        model.eval()
    infer_img_s = interleaved_img_s(infer, args.batch, args.warmup, args.steps, sync)
    result: dict[str, Any] = {
        "benchmark": "model",
        "preset": args.preset,
        "image_size": args.image_size,
        "batch": args.batch,
        "compile": args.compile,
        "device": str(device),
        "ours_img_s": round(img_s["ours"], 2),
        "timm_img_s": round(img_s["timm"], 2),
        "ratio": round(img_s["ours"] / img_s["timm"], 3),
        "ours_infer_img_s": round(infer_img_s["ours"], 2),
        "timm_infer_img_s": round(infer_img_s["timm"], 2),
    }
    if peak := peak_tflops():
        train_flops = 3 * forward_flops(config)  # backward costs two forwards
        result["ours_mfu"] = round(img_s["ours"] * train_flops / (peak * 1e12), 3)
        result["timm_mfu"] = round(img_s["timm"] * train_flops / (peak * 1e12), 3)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return write_result(result, args.json)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="ti/16", help="model preset (default: ti/16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--json", metavar="PATH", help="also write the result here")

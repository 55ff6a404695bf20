"""Every architecture in timm's `vision_transformer` and `deit` modules, differentially:
timm builds it (depth 2, small, random weights), `save_for_hf` writes it as on the Hub, and
`vitray convert --from timm` must give timm's logits on the same uint8 images, or refuse
with a ValueError (exit 2) naming what vitray's ViT does not have. Never a silent
difference. Slow (all of timm's registry): marked, still run in CI."""

import re
from pathlib import Path

import pytest
import timm
import torch
from timm.models._hub import save_config_for_hf, save_for_hf

from vit import patchify
from vit.convert import import_weights
from vit.timm_config import vit_fields

pytestmark = pytest.mark.slow
NAMES = sorted(set(timm.list_models(module=["vision_transformer", "deit"])))


def small(name: str, device: str) -> tuple[torch.nn.Module, int]:
    """`name` at depth 2 and 4x4 patches, narrow where the architecture allows (timm's
    arguments, so its config.json records them), with random weights."""
    with torch.device("meta"):
        patch = timm.create_model(name, pretrained=False, depth=1).patch_embed.patch_size[0]
    shrunk = dict(depth=2, img_size=4 * patch)
    with torch.device(device):
        try:
            model = timm.create_model(name, pretrained=False, embed_dim=64, num_heads=2, **shrunk)
        except Exception:  # an architecture whose widths are fixed
            model = timm.create_model(name, pretrained=False, **shrunk)
    if device != "meta":
        with torch.no_grad():
            for parameter in model.parameters():  # no zero or one left: every weight matters
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval(), patch


def refusal(name: str) -> str | None:
    """Why vitray refuses `name` (None: it converts), from timm's model on the meta device."""
    try:
        vit_fields(name, small(name, "meta")[0])
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name", NAMES)
def test_timm_architecture_converts_exactly_or_is_refused(tmp_path: Path, name: str):
    why = refusal(name)
    if why is not None:  # refused before any weight is read: timm's config.json is enough
        theirs, _ = small(name, "meta")
        (tmp_path / "hub").mkdir()
        save_config_for_hf(theirs, tmp_path / "hub" / "config.json")
        (tmp_path / "hub" / "model.safetensors").write_bytes(b"")
        with pytest.raises(ValueError, match="cannot be converted exactly"):
            import_weights("timm", tmp_path / "hub", tmp_path / "ours")
        return
    theirs, patch = small(name, "cpu")
    save_for_hf(theirs, tmp_path / "hub", safe_serialization=True)
    try:
        ours = import_weights("timm", tmp_path / "hub", tmp_path / "ours").eval()
    except ValueError as e:  # a refusal (exit 2), saying why
        assert str(e)
        return
    cfg = theirs.pretrained_cfg
    images = torch.randint(0, 256, (2, 4 * patch, 4 * patch, 3), dtype=torch.uint8)
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    pixels = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        expected, got = theirs(pixels), ours(patchify(images, patch))
    # within 1e-5 of the logits' scale: wide models (the giants, 1,536 wide) sum in another
    # order than timm does, and random weights give logits of any size
    scale = float(expected.abs().max().clamp(min=1.0))
    assert torch.allclose(got, expected, atol=1e-5 * scale, rtol=1e-4), (got - expected).abs().max()


def test_the_registry_tally_covers_the_families_people_fine_tune_from(capsys):
    """The counts, printed (docs/benchmarks.md records them): at least 90% of the names
    convert, every DINOv2, CLIP, SigLIP, DeiT III, register and `gap` variant among them
    but those whose blocks vitray has not (differential attention, parallel blocks)."""
    refused = {name: why for name in NAMES if (why := refusal(name)) is not None}
    print(f"timm registry: {len(NAMES) - len(refused)} of {len(NAMES)} supported, "
          f"{len(refused)} refused")  # fmt: skip
    for name, why in sorted(refused.items()):
        print(f"  {name}: {why.split('does not have: ')[-1]}")
    assert len(refused) <= 0.1 * len(NAMES)
    family = re.compile(r"dinov2|clip|siglip|deit3|_reg\d|gap")
    blocks = re.compile(r"DiffAttention|Diff\w*Block|Parallel\w*Block|prefix")
    missed = [n for n, why in refused.items() if family.search(n) and not blocks.search(why)]
    assert missed == []

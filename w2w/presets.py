"""Layouts built from a UNet config alone (meta device: no weights, no download).

`sd15_layout("w2w")` is the paper's space: rank 1, alpha 27, to_q/to_v of attn1 and attn2 in all 16
transformer blocks of SD 1.5, D = 99,648.
"""

from __future__ import annotations

from dataclasses import dataclass

from w2w.layout import Layout, LayoutEntry, canonical_sort

# The UNet config of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


@dataclass(frozen=True)
class Preset:
    """Which Linear layers get a LoRA, and its rank and alpha."""

    name: str
    targets: tuple[str, ...]  # module-path suffixes
    rank: int
    alpha: float
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "w2w",
            ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v"),
            1,
            27.0,
            "the weights2weights space: rank 1, alpha 27, to_q/to_v of attn1 and attn2",
        ),
        Preset(
            "qkvo",
            tuple(f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")),
            1,
            1.0,
            "rank 1 on to_q/to_k/to_v/to_out.0 of attn1 and attn2",
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown layout preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def unet_layout(config: dict, targets: tuple[str, ...], rank: int, alpha: float) -> Layout:
    """The layout of a LoRA on `targets` of a UNet2DConditionModel built from `config` on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    found: dict[str, LayoutEntry] = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found[name] = LayoutEntry(name, (rank, mod.in_features), (mod.out_features, rank), float(alpha))
    if not found:
        raise ValueError(f"no Linear module of this UNet matches {targets}")
    return Layout(tuple(found[k] for k in canonical_sort(found)))


def sd15_layout(preset: str = "w2w") -> Layout:
    p = get_preset(preset)
    return unet_layout(SD15_UNET_CONFIG, p.targets, p.rank, p.alpha)

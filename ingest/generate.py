"""Images from models: the base pipeline with one LoRA merged into its UNet at a time.

Merging (W += alpha/r * B A) instead of loading an adapter per model keeps the UNet's speed and makes a
sweep over many models cheap; the original weights are copied once and put back exactly afterwards.
diffusers' own `load_lora_weights` reads the same files (tests/test_trainer.py checks that it agrees).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ingest.basemodel import BaseModel
from w2w.lora import LoRA


@contextmanager
def merged(base: BaseModel, lora: LoRA | None) -> Iterator[None]:
    """The base UNet with `lora` merged in, for the duration of the `with` (None: the base model itself)."""
    if lora is None:
        yield
        return
    unet = base.unet
    saved = {}
    try:
        with torch.no_grad():
            for name, layer in lora.layers.items():
                mod = unet.get_submodule(name)
                saved[name] = mod.weight.detach().clone()
                delta = torch.from_numpy(layer.delta()).reshape(mod.weight.shape)
                mod.weight += delta.to(mod.weight.device, mod.weight.dtype)
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                unet.get_submodule(name).weight.copy_(w)


@torch.no_grad()
def generate(
    base: BaseModel,
    lora: LoRA | None,
    prompt: str = "sks person",
    n: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 3.0,
) -> np.ndarray:
    """n images (n, H, W, 3) uint8 of `prompt` from the base model with `lora` merged; same seed, same noise."""
    g = torch.Generator().manual_seed(seed)
    with merged(base, lora):
        out = base.pipe(
            [prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np"
        ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

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
        return _run(base, [prompt] * n, steps, guidance, g)


def _run(base: BaseModel, prompts: list[str], steps: int, guidance: float, g, latents=None) -> np.ndarray:
    out = base.pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, latents=latents, output_type="np"
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


class _RowLoRALinear(torch.nn.Module):
    """A frozen Linear plus n LoRAs; batch row j goes through LoRA j % n (classifier-free guidance stacks the
    unconditional rows of every model, then the conditional ones: row j and row j + n are the same model)."""

    def __init__(self, base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.base, self.A, self.B, self.scale = base, A, B, scale  # (n, r, in), (n, out, r), (n,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(x.shape[0], device=x.device) % self.A.shape[0]
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.A.dtype)
        d = torch.bmm(torch.bmm(xs, self.A[idx].transpose(1, 2)), self.B[idx].transpose(1, 2))
        return self.base(x) + (d * self.scale[idx, None, None]).reshape(*x.shape[:-1], -1).to(x.dtype)


@torch.no_grad()
def generate_each(
    base: BaseModel,
    loras: list[LoRA],
    prompt: str = "sks person",
    seed: int = 0,
    steps: int = 25,
    guidance: float = 3.0,
    batch: int = 32,
) -> np.ndarray:
    """One image per LoRA (n, H, W, 3) uint8, `batch` models per pipeline run: every model starts from the same
    noise (that of `generate(..., n=1, seed=seed)`); a stochastic sampler's later noise differs per row, so an
    image is like generate()'s, not the same bits. For measuring many models (bench/bench_fidelity.py)."""
    from ingest.trainer import _Swap

    out = []
    for lo in range(0, len(loras), batch):
        group = loras[lo : lo + batch]
        n = len(group)
        layers = {}
        for name in group[0].layers:
            mod = base.unet.get_submodule(name)
            A = torch.from_numpy(np.stack([lo_.layers[name].a2d() for lo_ in group])).to(base.device)
            B = torch.from_numpy(np.stack([lo_.layers[name].b2d() for lo_ in group])).to(base.device)
            scale = torch.tensor([lo_.layers[name].scale for lo_ in group], device=base.device)
            layers[name] = _RowLoRALinear(mod, A, B, scale)
        g = torch.Generator().manual_seed(seed)
        unet = base.unet
        shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        noise = torch.randn(shape, generator=g).to(base.device, base.dtype).expand(n, *shape[1:]).contiguous()
        with _Swap(unet, layers):
            out.append(_run(base, [prompt] * n, steps, guidance, g, noise))
    return np.concatenate(out)

"""Plain helpers shared by the tests (importable as `from helpers import ...`; pytest puts tests/ on sys.path).

Everything here is tiny and built in code: no download, no network.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import numpy as np
import torch

from w2w.flatten import unflatten
from w2w.layout import Layout, LayoutEntry
from w2w.lora import LoRA
from w2w.presets import get_preset

# A UNet2DConditionModel small enough to build and run in milliseconds: 2 blocks, 2 transformer
# blocks (one down, one up) plus the mid block's, 8 attention modules x 2 (attn1, attn2).
TINY_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
TINY_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (8,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 8,
}
W2W_TARGETS: tuple[str, ...] = get_preset("w2w").targets
TINY_RANK, TINY_ALPHA = 2, 3.0  # alpha != rank on purpose: a reader that drops alpha gets scale 1, not 1.5
ALPHA_0_3 = float(np.float32(0.3))  # a non-integer alpha, as every format stores it (float32)


def random_lora(layout: Layout, seed: int, scale: float = 1.0) -> LoRA:
    """A LoRA with standard-normal (times `scale`) A and B in `layout`; B is nonzero, unlike a fresh PEFT init."""
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(layout.dim) * scale).astype(np.float32)
    lora = unflatten(v, layout)
    assert all(np.any(l.B != 0) for l in lora.layers.values())
    return lora


def mixed_layout(layout: Layout) -> Layout:
    """`layout` with per-module ranks 1/2/3 and alphas 3, 0.3 (float32), 7.5, 1 cycling over the modules."""
    ranks = (2, 1, 3, 2, 1)
    alphas = (3.0, ALPHA_0_3, 7.5, 3.0, 1.0)
    entries = []
    for i, e in enumerate(layout.entries):
        r = ranks[i % len(ranks)]
        entries.append(LayoutEntry(e.module, (r, e.a_shape[1]), (e.b_shape[0], r), alphas[i % len(alphas)]))
    return Layout(tuple(entries))


def unet_inputs(seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(sample, timestep, encoder_hidden_states) for a TINY_UNET_CONFIG UNet."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    enc = torch.randn(batch, 3, TINY_UNET_CONFIG["cross_attention_dim"], generator=g)
    return x, 10, enc


@torch.no_grad()
def unet_out(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x, t, enc = unet_inputs(seed)
    return unet(x, t, enc).sample


@torch.no_grad()
def apply_lora(unet: torch.nn.Module, lora: LoRA) -> torch.nn.Module:
    """A copy of `unet` with W += (alpha / r) B A on every LoRA'd module: our own reading of the LoRA."""
    out = copy.deepcopy(unet)
    for name, l in lora.layers.items():
        mod = out.get_submodule(name)
        mod.weight += torch.from_numpy(l.delta()).reshape(mod.weight.shape)
    return out


def tiny_tokenizer():
    """A CLIPTokenizer over single letters, built in code (transformers 5 takes vocab/merges objects)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_pipeline(unet: torch.nn.Module):
    """A real StableDiffusionPipeline around `unet` with a tiny VAE, CLIP text encoder and tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=TINY_UNET_CONFIG["cross_attention_dim"],
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=12,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# 12 rank-1 modules, D = 12 * (48 + 48) = 1,152: far more dimensions than the planted latent ones
PLANTED_LAYOUT = Layout(
    tuple(
        LayoutEntry(
            f"down_blocks.{i // 4}.attentions.{(i // 2) % 2}.transformer_blocks.0.attn{1 + i % 2}.to_q",
            (1, 48),
            (48, 1),
            27.0,
        )
        for i in range(12)
    )
)


def w2wreg(reg: Path, *args: str, code: int = 0):
    """`w2wreg --registry REG ARGS...` through click's runner; asserts its exit code."""
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["--registry", str(reg), *args], catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code} != {code}\n{result.output}"
    return result


def w2wreg_json(reg: Path, *args: str):
    """The parsed `--json` output of a w2wreg command."""
    return json.loads(w2wreg(reg, *args, "--json").stdout)


def mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    kb, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            inside = len(head) == 6 and head[5] == str(path.resolve())
        elif inside and line.startswith("Rss:"):
            kb += int(line.split()[1])
    return kb

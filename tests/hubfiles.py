"""Tiny SD 1.5-like and SDXL-like pipelines built in code, and LoRA files as the real tools write them.

The UNets have the real block structure (SD 1.5: four down blocks, the last without attention, two layers per
block, transformer depth 1; SDXL: three down blocks, the first without attention, transformer depth 1 and 2,
linear projections, text_time added conditioning, two text encoders) with tiny channel counts, so every key
name a file of the real model has exists here too. The files' expected updates are computed here from the raw
tensors, independently of w2w's readers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from helpers import TINY_VAE_CONFIG, tiny_tokenizer

SD15_LIKE: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 12,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
TE_HIDDEN = 8  # each SDXL-like text encoder; the UNet's cross-attention sees both: 16
SDXL_LIKE: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "cross_attention_dim": 2 * TE_HIDDEN,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": TE_HIDDEN + 6 * 4,  # pooled text embeds + 6 time ids x 4
}


def _clip(hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    cfg = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def sd15_pipeline():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG).eval(),
        text_encoder=_clip(SD15_LIKE["cross_attention_dim"]),
        tokenizer=tiny_tokenizer(),
        unet=UNet2DConditionModel(**SD15_LIKE).eval(),
        scheduler=DDPMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG).eval(),
        text_encoder=_clip(TE_HIDDEN),
        text_encoder_2=_clip(TE_HIDDEN, projection=True),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=UNet2DConditionModel(**SDXL_LIKE).eval(),
        scheduler=EulerDiscreteScheduler(num_train_timesteps=100),
    )


def lora_targets(pipe) -> dict[str, torch.nn.Module]:
    """Canonical module name -> layer, for what kohya trains with conv_dim set: the transformers' Linear layers,
    the resnets', down- and upsamplers' convs, and the text encoders' attention and MLP."""
    out = {}
    for name, mod in pipe.unet.named_modules():
        layer = isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
        if layer and any(part in name for part in (".attentions.", ".resnets.", "samplers.")):
            out[name] = mod
    for comp in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, comp, None)
        for name, mod in te.named_modules() if te is not None else ():
            if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
                out[te_name(comp, name)] = mod
    return out


def te_name(comp: str, name: str) -> str:
    """The canonical name of a text-encoder module: transformers 5 dropped CLIPTextModel's `text_model.` level,
    which every LoRA file (and transformers 4) still has."""
    return f"{comp}.{name}" if name.startswith("text_model.") else f"{comp}.text_model.{name}"


# --- the SGM (LDM) names of diffusers modules: the inverse of the mapping under test, written out separately ----


def to_sgm(module: str) -> str:
    """The SGM path of a diffusers UNet module path (layers_per_block 2)."""
    p = module.split(".")
    res = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    res["conv_shortcut"] = "skip_connection"
    if p[0] == "mid_block":
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        rest = ".".join(p[3:])
        return f"middle_block.{idx}.{res.get(rest, rest) if p[1] == 'resnets' else rest}"
    block, kind = int(p[1]), p[2]
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{3 * block + 3}.0.op"
        i = 3 * block + int(p[3]) + 1
        rest = ".".join(p[4:])
        return f"input_blocks.{i}.0.{res[rest]}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if kind == "upsamplers":  # after the resnet and, in an attention block, the attention
        return f"output_blocks.{3 * block + 2}.{2 if _HAS_ATTN[block] else 1}.conv"
    i = 3 * block + int(p[3])
    rest = ".".join(p[4:])
    return f"output_blocks.{i}.0.{res[rest]}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"


_HAS_ATTN = {0: True, 1: True, 2: False}  # SDXL's up blocks


# --- files ---------------------------------------------------------------------------------------------------


def _shape(mod: torch.nn.Module) -> tuple[int, int, tuple[int, ...]]:
    w = mod.weight
    return w.shape[0], w.shape[1], tuple(w.shape[2:])


class Want(NamedTuple):
    """A module's expected update, float64 (out, in*kh*kw), and the same sum over absolute values (|dW| <= ref):
    the scale of the rounding errors two float32 evaluations of the update may differ by."""

    delta: np.ndarray
    ref: np.ndarray


def kohya_file(targets: dict, naming: str, dtype: torch.dtype, seed: int, rank: int = 2, sdxl: bool = False):
    # (diffusers 0.42's own kohya conversion scales some attention modules wrongly when alphas vary per module
    # beyond kohya's two values: the oracle check on the original file keeps to what kohya writes)
    """(tensors, expected Want per canonical module) of a kohya LoRA of `targets`.

    naming "diffusers" spells the UNet as kohya does for SD 1.x; "sgm" as kohya does for SDXL."""
    g = torch.Generator().manual_seed(seed)
    tensors, want = {}, {}
    for module, mod in targets.items():
        out, inp, k = _shape(mod)
        if module.startswith("text_encoder_2."):
            stem = "lora_te2_" + module.removeprefix("text_encoder_2.").replace(".", "_")
        elif module.startswith("text_encoder."):
            stem = ("lora_te1_" if sdxl else "lora_te_") + module.removeprefix("text_encoder.").replace(".", "_")
        else:
            stem = "lora_unet_" + (to_sgm(module) if naming == "sgm" else module).replace(".", "_")
        # as kohya trains: network_dim / network_alpha for Linear layers, conv_dim / conv_alpha for convs
        r = rank + (0 if k else 1)
        down = torch.randn(r, inp, *k, generator=g).to(dtype)
        up = torch.randn(out, r, *([1, 1] if k else []), generator=g).to(dtype)
        alpha = torch.tensor(1.0 if k else 4.0).to(dtype)
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha}
        U, D, s = up.double().reshape(out, r), down.double().reshape(r, -1), float(alpha.double()) / r
        want[module] = Want(s * (U @ D).numpy(), abs(s) * (U.abs() @ D.abs()).numpy())
    return tensors, want


def loha_tensors(mod, stem: str, g, r: int, alpha: float, tucker: bool) -> tuple[dict, Want]:
    """LoHa factors for one module and their update, as LyCORIS (loha.py, functional/loha.py) computes it."""
    out, inp, k = _shape(mod)
    if tucker:
        t1, t2 = (torch.randn(r, r, *k, generator=g) for _ in range(2))
        w1a, w2a = (torch.randn(r, out, generator=g) for _ in range(2))
        w1b, w2b = (torch.randn(r, inp, generator=g) for _ in range(2))

        def rebuild(t, wb, wa, f=lambda x: x.double()):
            return torch.einsum("i j ..., j r, i p -> p r ...", f(t), f(wb), f(wa))

        d = rebuild(t1, w1b, w1a) * rebuild(t2, w2b, w2a) * (alpha / r)
        ref = rebuild(t1, w1b, w1a, _abs) * rebuild(t2, w2b, w2a, _abs) * (alpha / r)
        extra = {"hada_t1": t1, "hada_t2": t2}
    else:
        cols = inp * int(np.prod(k)) if k else inp
        w1a, w2a = (torch.randn(out, r, generator=g) for _ in range(2))
        w1b, w2b = (torch.randn(r, cols, generator=g) for _ in range(2))
        d = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (alpha / r)
        ref = (_abs(w1a) @ _abs(w1b)) * (_abs(w2a) @ _abs(w2b)) * (alpha / r)
        extra = {}
    t = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, **extra}
    t["alpha"] = torch.tensor(alpha)
    return {f"{stem}.{k_}": v for k_, v in t.items()}, Want(d.reshape(out, -1).numpy(), ref.reshape(out, -1).numpy())


def _abs(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs()


def lokr_tensors(mod, stem: str, g, variant: str, alpha: float) -> tuple[dict, Want]:
    """LoKr factors (w1 (a, c), w2 (b, d[, kh, kw]) with a b = out, c d = in) and their update as LyCORIS's
    make_kron computes it: kron(w1 unsqueezed to w2's rank, w2) * scale."""
    out, inp, k = _shape(mod)
    a, c = 2, 2
    b, d = out // a, inp // c
    r = 2
    t: dict[str, torch.Tensor] = {}
    if variant == "w1_full_w2_lora":
        w1 = t["lokr_w1"] = torch.randn(a, c, generator=g)
        t["lokr_w2_a"] = torch.randn(b, r, generator=g)
        t["lokr_w2_b"] = torch.randn(r, d * int(np.prod(k)) if k else d, generator=g)
        w2 = (t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()).reshape(b, d, *k)
        scale = alpha / r
    elif variant == "both_lora":
        t["lokr_w1_a"], t["lokr_w1_b"] = torch.randn(a, 1, generator=g), torch.randn(1, c, generator=g)
        w1 = t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()
        t["lokr_w2_a"] = torch.randn(b, r, generator=g)
        t["lokr_w2_b"] = torch.randn(r, d * int(np.prod(k)) if k else d, generator=g)
        w2 = (t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()).reshape(b, d, *k)
        scale = alpha / r
    elif variant == "tucker":
        w1 = t["lokr_w1"] = torch.randn(a, c, generator=g)
        t["lokr_t2"] = torch.randn(r, r, *k, generator=g)
        t["lokr_w2_a"], t["lokr_w2_b"] = torch.randn(r, b, generator=g), torch.randn(r, d, generator=g)
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"].double(), t["lokr_w2_a"].double(),
                          t["lokr_w2_b"].double())  # fmt: skip
        scale = alpha / r
    else:  # both full: LyCORIS uses scale 1 whatever alpha says
        w1 = t["lokr_w1"] = torch.randn(a, c, generator=g)
        w2 = t["lokr_w2"] = torch.randn(b, d, *k, generator=g)
        scale = 1.0
    w1 = w1.double()
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    dw = torch.kron(w1, w2.double().contiguous()) * scale  # as make_kron: kron wants a contiguous w2
    # |dW| bound: the factors' products over absolute values (w2's own inner sum included)
    ref = torch.kron(w1.abs(), _abs_w2(t, b, d, k).contiguous()) * scale
    t["alpha"] = torch.tensor(alpha)
    return {f"{stem}.{k_}": v for k_, v in t.items()}, Want(dw.reshape(out, -1).numpy(), ref.reshape(out, -1).numpy())


def _abs_w2(t: dict, b: int, d: int, k: tuple) -> torch.Tensor:
    if "lokr_w2" in t:
        return _abs(t["lokr_w2"])
    if "lokr_t2" in t:
        return torch.einsum("i j ..., i p, j r -> p r ...", _abs(t["lokr_t2"]), _abs(t["lokr_w2_a"]),
                            _abs(t["lokr_w2_b"]))  # fmt: skip
    return (_abs(t["lokr_w2_a"]) @ _abs(t["lokr_w2_b"])).reshape(b, d, *k)


def pipeline_deltas(pipe, adapter: str) -> dict[str, np.ndarray]:
    """Canonical module -> the update diffusers/PEFT applies (get_delta_weight), float64 (out, in*kh*kw)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        for name, mod in model.named_modules() if model is not None else ():
            if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
                key = name if comp == "unet" else te_name(comp, name)
                out[key] = mod.get_delta_weight(adapter).detach().double().reshape(mod.out_features, -1).numpy()
    return out

"""Module names: kohya's underscored keys and the SGM/LDM UNet naming, mapped to one canonical naming.

The canonical name of a UNet module is its diffusers path (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.
to_q`); of a text-encoder module, `text_encoder.` or `text_encoder_2.` and its transformers path
(`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`), as diffusers' pipelines name them.

kohya trains SD 1.x/2.x on the diffusers UNet, so its keys are diffusers paths with `_` for `.`; SDXL it
trains on the SGM (LDM) UNet, whose modules are numbered differently:

| SGM                                   | diffusers (layers_per_block = 2, as in SD 1.5, 2.x and SDXL)        |
|---------------------------------------|---------------------------------------------------------------------|
| input_blocks.0.0                      | conv_in                                                             |
| input_blocks.i.0 (i >= 1)             | down_blocks.b.resnets.l, b = (i-1) // 3, l = (i-1) % 3 (l < 2)      |
| input_blocks.i.1                      | down_blocks.b.attentions.l                                          |
| input_blocks.i.0.op (l = 2)           | down_blocks.b.downsamplers.0.conv                                   |
| middle_block.0 / .1 / .2              | mid_block.resnets.0 / mid_block.attentions.0 / mid_block.resnets.1  |
| output_blocks.i.0                     | up_blocks.b.resnets.l, b = i // 3, l = i % 3                        |
| output_blocks.i.1                     | up_blocks.b.attentions.l (an up block without attention: upsampler) |
| output_blocks.i.{1,2}.conv            | up_blocks.b.upsamplers.0.conv                                       |
| time_embed.0 / .2, label_emb.0.0 / .2 | time_embedding.linear_1 / _2, add_embedding.linear_1 / _2           |
| out.2                                 | conv_out                                                            |
| resnet in_layers.2, out_layers.3,     | conv1, conv2, time_emb_proj, conv_shortcut                          |
| emb_layers.1, skip_connection         |                                                                     |

Inside a transformer (proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, ...) both namings agree.
(Learnt from diffusers' lora_conversion_utils and kohya's sdxl_model_util; the SD 1.5 up block 0 has no
attention, so its upsampler is output_blocks.2.1.conv, a case diffusers' own mapping gets wrong.)
"""

from __future__ import annotations

import re
from functools import lru_cache

# Multi-word names, longest first so that greedy matching takes the whole name.
_COMPOUNDS = sorted(
    [
        # diffusers UNet
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "conv_norm_out",
        "time_emb_proj",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "class_embedding",
        "norm_out",
        "add_k_proj",
        "add_v_proj",
        "add_q_proj",
        "to_add_out",
        "single_transformer_blocks",
        "pos_embed",
        # SGM UNet
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        # CLIP text encoders (transformers)
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "text_projection",
    ],
    key=lambda s: -s.count("_"),
)

# kohya key prefix -> canonical prefix of the module
KOHYA_PREFIXES = {
    "lora_unet_": "",
    "lora_te_": "text_encoder.",
    "lora_te1_": "text_encoder.",
    "lora_te2_": "text_encoder_2.",
}
TEXT_ENCODERS = ("text_encoder.", "text_encoder_2.")

_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj"}
_LPB = 2  # layers per block of every SD 1.x/2.x/XL UNet; SGM numbers blocks with it
_SGM_TOP = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")

# Every module of an SD 1.x/2.x/XL UNet that a LoRA can adapt (Linear and Conv layers), in diffusers naming.
_ATTN = (
    r"attentions\.\d+\.(?:proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
)
_RES = r"resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut)"
UNET_MODULE = re.compile(
    rf"^(?:conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]"
    rf"|(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(?:{_ATTN}|{_RES}|downsamplers\.0\.conv|upsamplers\.0\.conv))$"
)
TEXT_MODULE = re.compile(
    r"^text_encoder(?:_2)?\.(?:text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
    r"|text_projection)$"
)


@lru_cache(maxsize=16384)  # every file of a hub spells the same few hundred modules
def demangle(name: str) -> str:
    """Undo kohya's mangling: down_blocks_0_attentions_0_..._attn1_to_q -> down_blocks.0.attentions.0....attn1.to_q"""
    toks = name.split("_")
    out, i = [], 0
    while i < len(toks):
        for comp in _COMPOUNDS:
            n = comp.count("_") + 1
            if "_".join(toks[i : i + n]) == comp:
                out.append(comp)
                i += n
                break
        else:
            out.append(toks[i])
            i += 1
    return ".".join(out)


def sgm_to_diffusers(path: str) -> str | None:
    """The diffusers path of an SGM UNet module path (see the table above); None when it names none."""
    for sgm, diff in _SGM_TOP.items():
        if path == sgm:
            return diff
    m = _SGM_MIDDLE.match(path)
    if m:  # middle_block.I.<module>: no inner index
        where = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}.get(int(m[1]))
        return None if where is None else f"mid_block.{where}.{_resnet(m[2]) if 'resnets' in where else m[2]}"
    m = _SGM_BLOCK.match(path)
    if not m:
        return None
    kind, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
    if kind == "input_blocks":
        if i == 0:
            return None
        block, layer = divmod(i - 1, _LPB + 1)
        if layer == _LPB:
            return f"down_blocks.{block}.downsamplers.0.conv" if (j, rest) == (0, "op") else None
        if j == 0:
            return f"down_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{block}.attentions.{layer}.{rest}" if j == 1 else None
    block, layer = divmod(i, _LPB + 1)
    if j == 0:
        return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
    if rest == "conv" and j in (1, 2):  # an attention module has no `conv` child: this is the upsampler
        return f"up_blocks.{block}.upsamplers.0.conv"
    return f"up_blocks.{block}.attentions.{layer}.{rest}" if j == 1 else None


def _resnet(rest: str) -> str:
    if rest == "skip_connection":
        return "conv_shortcut"
    return _RESNET.get(rest, rest)


def is_sgm(path: str) -> bool:
    return path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out."))


def kohya_module(key_stem: str) -> tuple[str, str] | None:
    """(canonical module, kohya prefix) of a kohya key stem (`lora_unet_input_blocks_4_1_proj_in`), or None when
    the stem has no kohya prefix. The module may still be unknown: check it with `known_module`."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if key_stem.startswith(prefix):
            path = demangle(key_stem[len(prefix) :])
            if prefix == "lora_unet_" and is_sgm(path):
                path = sgm_to_diffusers(path) or f"(SGM) {path}"
            return KOHYA_PREFIXES[prefix] + path, prefix
    return None


def kohya_stem(module: str, sdxl_text: bool) -> str:
    """The kohya key stem of a canonical module (diffusers spelling of the UNet, as kohya writes SD 1.x)."""
    if module.startswith("text_encoder_2."):
        return "lora_te2_" + module.removeprefix("text_encoder_2.").replace(".", "_")
    if module.startswith("text_encoder."):
        return ("lora_te1_" if sdxl_text else "lora_te_") + module.removeprefix("text_encoder.").replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


def known_module(module: str) -> bool:
    """Whether `module` names a LoRA-able layer of an SD 1.x/2.x/XL UNet or CLIP text encoder."""
    return bool(UNET_MODULE.match(module) or TEXT_MODULE.match(module))


def with_text_model(module: str) -> str:
    """A text-encoder module with CLIP's `text_model.` level, which transformers 5 dropped from CLIPTextModel
    (files saved from it lack it; kohya files and transformers 4 have it): the canonical name keeps it."""
    comp, _, rest = module.partition(".")
    return f"{comp}.text_model.{rest}" if f"{comp}." in TEXT_ENCODERS and rest.startswith("encoder.") else module


def is_text_encoder(module: str) -> bool:
    return module.startswith(TEXT_ENCODERS)

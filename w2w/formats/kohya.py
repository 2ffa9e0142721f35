"""kohya (sd-scripts) LoRA files: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`.

kohya flattens the module path with underscores, which is ambiguous (`to_q`, `transformer_blocks`).
We undo it with the vocabulary of diffusers UNet names: the longest known compound wins.
"""

from __future__ import annotations

import re

import numpy as np

from w2w.errors import UnknownFormatError
from w2w.formats.common import LayerParts, assemble, refuse_text_encoder
from w2w.formats.tensorfile import TensorFile
from w2w.lora import LoRA

NAME = "kohya"
_KEY = re.compile(r"^lora_unet_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TE = ("lora_te_", "lora_te1_", "lora_te2_")
# Multi-word names in diffusers UNets, longest first so that greedy matching takes the whole name.
_COMPOUNDS = sorted(
    [
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
    ],
    key=lambda s: -s.count("_"),
)


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


def mangle(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def looks_like(keys: list[str]) -> bool:
    return any(k.startswith(("lora_unet_",) + _TE) for k in keys)


def parse(tf: TensorFile, base_model: str | None = None, drop_text_encoder: bool = False) -> LoRA:
    te = [k for k in tf.tensors if k.startswith(_TE)]
    refuse_text_encoder(te, tf.path, drop_text_encoder)
    parts: dict[str, LayerParts] = {}
    for key, t in tf.tensors.items():
        if key.startswith(_TE):
            continue
        m = _KEY.match(key)
        if not m:
            raise UnknownFormatError(tf.path, f"key {key!r} is no kohya LoRA key")
        p = parts.setdefault(demangle(m[1]), LayerParts())
        if m[2] == "alpha":
            p.alpha = float(np.asarray(t).reshape(-1)[0])
        elif m[2].startswith("lora_down"):
            p.A = t
        else:
            p.B = t
    return assemble(parts, tf.path, None, None, base_model)


def to_tensors(lora: LoRA) -> tuple[dict, dict[str, str]]:
    tensors = {}
    for m, l in lora.layers.items():
        k = mangle(m)
        tensors[f"{k}.lora_down.weight"] = l.A
        tensors[f"{k}.lora_up.weight"] = l.B
        tensors[f"{k}.alpha"] = np.asarray(l.alpha, dtype=np.float32)
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if lora.base_model:
        metadata["base_model"] = lora.base_model
    return tensors, metadata

"""diffusers LoRA files: `unet.`-prefixed keys, PEFT (lora_A/lora_B) or old (lora.down/lora.up) spelling.

Alpha and per-module ranks come from the `lora_adapter_metadata` header that diffusers writes
(`unet.lora_alpha`, `unet.alpha_pattern`, ...); without it, diffusers itself applies alpha = rank,
and so do we. Per-module `.alpha` tensors (from converted kohya files) are honoured too.
"""

from __future__ import annotations

import json
import re

from w2w.errors import UnknownFormatError
from w2w.formats.common import (
    LayerParts,
    as_int_if_whole,
    assemble,
    pattern_lookup,
    refuse_text_encoder,
    split_default_and_pattern,
)
from w2w.formats.tensorfile import TensorFile
from w2w.lora import LoRA

NAME = "diffusers"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

_SUFFIXES = (
    (re.compile(r"^(.*)\.lora_A(?:\.default)?\.weight$"), "A"),
    (re.compile(r"^(.*)\.lora_B(?:\.default)?\.weight$"), "B"),
    (re.compile(r"^(.*)\.lora\.down\.weight$"), "A"),
    (re.compile(r"^(.*)\.lora\.up\.weight$"), "B"),
    (re.compile(r"^(.*)\.lora_down\.weight$"), "A"),
    (re.compile(r"^(.*)\.lora_up\.weight$"), "B"),
    (re.compile(r"^(.*)\.alpha$"), "alpha"),
)
# The old attention-processor spelling: ...attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
_PREFIXES = ("unet.", "base_model.model.")


def split_key(key: str) -> tuple[str, str] | None:
    """(module path without prefix, 'A'|'B'|'alpha'), or None when the key is no LoRA factor."""
    m = _PROCESSOR.match(key)
    if m:
        module = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
        return strip_prefixes(module), "A" if m[3] == "down" else "B"
    for rx, kind in _SUFFIXES:
        m = rx.match(key)
        if m:
            return strip_prefixes(m[1]), kind
    return None


def strip_prefixes(module: str) -> str:
    """A module path without its `unet.` / `base_model.model.` prefixes (however many are stacked)."""
    # repeatedly: a file saved from a PEFT-wrapped UNet has `unet.base_model.model.` keys
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if module.startswith(p):
                module, stripped = module[len(p) :], True
    return module


def looks_like(keys: list[str]) -> bool:
    return any(split_key(k) for k in keys if not k.startswith("lora_"))


def parse(tf: TensorFile, base_model: str | None = None, drop_text_encoder: bool = False) -> LoRA:
    te = [k for k in tf.tensors if k.startswith(_TE_PREFIXES)]
    refuse_text_encoder(te, tf.path, drop_text_encoder)
    parts: dict[str, LayerParts] = {}
    unknown = []
    for key, t in tf.tensors.items():
        if key.startswith(_TE_PREFIXES):
            continue
        sk = split_key(key)
        if sk is None:
            unknown.append(key)
            continue
        module, kind = sk
        p = parts.setdefault(module, LayerParts())
        if kind == "alpha":
            p.alpha = float(t.reshape(-1)[0])
        else:
            setattr(p, kind, t)
    if unknown and not parts:
        raise UnknownFormatError(
            tf.path, f"no LoRA keys found (first key: {unknown[0]!r})", "is it a LoRA in diffusers, PEFT or kohya form?"
        )
    if unknown:
        raise UnknownFormatError(tf.path, f"has {len(unknown)} keys that are no LoRA factor, e.g. {unknown[0]!r}")
    default_alpha, alpha_pattern = None, {}
    raw = tf.metadata.get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        for flag in ("use_dora", "use_rslora"):  # diffusers builds its LoraConfig from this header
            if meta.get(f"unet.{flag}", meta.get(flag)):
                raise UnknownFormatError(
                    tf.path, f"uses {flag}, whose update is not alpha/r * B A", "export it as plain LoRA"
                )
        default_alpha = meta.get("unet.lora_alpha", meta.get("lora_alpha"))
        alpha_pattern = meta.get("unet.alpha_pattern", meta.get("alpha_pattern")) or {}
    alpha_for = {m: a for m in parts if (a := pattern_lookup(alpha_pattern, m)) is not None} if alpha_pattern else None
    return assemble(parts, tf.path, default_alpha, alpha_for, base_model)


def adapter_metadata(lora: LoRA) -> dict:
    """A PEFT LoraConfig dict for the LoRA, as diffusers writes it (before the `unet.` prefix)."""
    r, rank_pattern = split_default_and_pattern({m: l.rank for m, l in lora.layers.items()})
    alpha, alpha_pattern = split_default_and_pattern({m: l.alpha for m, l in lora.layers.items()})
    return {
        "r": int(r),
        "lora_alpha": as_int_if_whole(alpha),
        "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
        "alpha_pattern": {k: as_int_if_whole(v) for k, v in alpha_pattern.items()},
        "target_modules": list(lora.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def to_tensors(lora: LoRA) -> tuple[dict, dict[str, str]]:
    tensors = {}
    for m, l in lora.layers.items():
        tensors[f"unet.{m}.lora_A.weight"] = l.A
        tensors[f"unet.{m}.lora_B.weight"] = l.B
    meta = {f"unet.{k}": v for k, v in adapter_metadata(lora).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    if lora.base_model:
        metadata["base_model"] = lora.base_model
    return tensors, metadata

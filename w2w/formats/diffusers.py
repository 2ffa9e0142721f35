"""diffusers LoRA files: `unet.`-prefixed keys, PEFT (lora_A/lora_B) or old (lora.down/lora.up) spelling.

Alpha and per-module ranks come from the `lora_adapter_metadata` header that diffusers writes
(`unet.lora_alpha`, `unet.alpha_pattern`, `text_encoder.lora_alpha`, ...); without it, diffusers itself
applies alpha = rank, and so do we. Per-module `.alpha` tensors (from converted kohya files) are honoured too.
Text-encoder parts (`text_encoder.`, `text_encoder_2.`) are kept as modules of those names.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from w2w.errors import UnknownFormatError
from w2w.formats.common import LayerParts, as_int_if_whole, assemble, pattern_lookup, split_default_and_pattern
from w2w.formats.lycoris import refuse_methods
from w2w.formats.names import is_text_encoder, with_text_model
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
    (re.compile(r"^(.*)\.lora_linear_layer\.down\.weight$"), "A"),
    (re.compile(r"^(.*)\.lora_linear_layer\.up\.weight$"), "B"),
    (re.compile(r"^(.*)\.alpha$"), "alpha"),
)
# The old attention-processor spelling: ...attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# the old text-encoder processor spelling: ...self_attn.to_q_lora.down.weight
_TE_PROCESSOR = re.compile(r"^(.*\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_TE_ALIASES = {"te1.": "text_encoder.", "te.": "text_encoder.", "te2.": "text_encoder_2."}
_PREFIXES = ("unet.", "base_model.model.")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def split_key(key: str) -> tuple[str, str] | None:
    """(module path without prefix, 'A'|'B'|'alpha'), or None when the key is no LoRA factor."""
    for alias, canonical in _TE_ALIASES.items():
        if key.startswith(alias):
            key = canonical + key[len(alias) :]
    m = _TE_PROCESSOR.match(key)
    if m:
        return f"{m[1]}.{_TE_PROJ[m[2]]}", "A" if m[3] == "down" else "B"
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


def component(module: str) -> str:
    """The pipeline component a canonical module belongs to: unet, text_encoder or text_encoder_2."""
    head = module.split(".", 1)[0]
    return head if head in COMPONENTS[1:] else "unet"


def parse(tf: TensorFile, base_model: str | None = None, drop_text_encoder: bool = False) -> LoRA:
    refuse_methods(tf.tensors, tf.path)
    parts: dict[str, LayerParts] = {}
    unknown = []
    for key, t in tf.tensors.items():
        sk = split_key(key)
        if sk is None:
            unknown.append(key)
            continue
        module, kind = sk
        if is_text_encoder(module):
            if drop_text_encoder:
                continue
            module = with_text_model(module)
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
    meta = _adapter_metadata(tf)
    alpha_for: dict[str, float] = {}
    for module in parts:
        comp = component(module)
        default = meta.get(f"{comp}.lora_alpha", meta.get("lora_alpha") if comp == "unet" else None)
        pattern = meta.get(f"{comp}.alpha_pattern", meta.get("alpha_pattern") if comp == "unet" else None) or {}
        inner = module if comp == "unet" else module[len(comp) + 1 :]
        alpha = pattern_lookup(pattern, inner) if pattern else None
        if alpha is None and default is not None:
            alpha = float(default)
        if alpha is not None:
            alpha_for[module] = alpha
    return assemble(parts, tf.path, None, alpha_for, base_model)


def _adapter_metadata(tf: TensorFile) -> dict:
    """diffusers' `lora_adapter_metadata` header as a dict ({} when absent or unreadable); refuses DoRA/rsLoRA."""
    raw = tf.metadata.get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        return {}
    for flag, why in (("use_dora", "DoRA: its update depends on the base weights"), ("use_rslora", "rsLoRA")):
        # diffusers builds its LoraConfig from this header
        if any(meta.get(f"{c}.{flag}") for c in COMPONENTS) or meta.get(flag):
            raise UnknownFormatError(
                tf.path, f"uses {flag} ({why}), whose update is not alpha/r * B A", "export it as plain LoRA"
            )
    return meta


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


def split_components(lora: LoRA) -> dict[str, LoRA]:
    """The LoRA's modules per pipeline component, each named as inside that component."""
    out: dict[str, dict] = {}
    for m, l in lora.layers.items():
        comp = component(m)
        out.setdefault(comp, {})[m if comp == "unet" else m[len(comp) + 1 :]] = l
    return {c: LoRA(layers, lora.base_model) for c, layers in out.items()}


# the CLIP class diffusers' pipelines load for each text encoder (SDXL's second one has the projection)
_CLIP_CLASS = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


@lru_cache(maxsize=2)
def _has_text_model(cls_name: str) -> bool:
    """Whether the installed transformers' CLIP class nests its layers under `text_model.` (transformers 4 both
    classes; transformers 5 only CLIPTextModelWithProjection). Built on the meta device: no memory, ~10 ms."""
    import torch
    import transformers

    cfg = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(cfg)
    return any(n.startswith("text_model.") for n, _ in model.named_modules())


def installed_clip_paths(part: LoRA, component: str) -> LoRA:
    """A text encoder's part with module names as the installed transformers' CLIP class has them (our canonical
    names keep `text_model.`; PEFT needs a saved key to equal the model's own path)."""
    if _has_text_model(_CLIP_CLASS.get(component, "CLIPTextModel")):
        return part
    return LoRA({m.removeprefix("text_model."): l for m, l in part.layers.items()}, part.base_model)


def to_tensors(lora: LoRA) -> tuple[dict, dict[str, str]]:
    tensors, meta = {}, {}
    for comp, part in split_components(lora).items():
        for m, l in part.layers.items():
            tensors[f"{comp}.{m}.lora_A.weight"] = l.A
            tensors[f"{comp}.{m}.lora_B.weight"] = l.B
        # PEFT matches target_modules and patterns as suffixes: without CLIP's `text_model.` (which transformers 5
        # dropped from CLIPTextModel) they match text encoders with and without it; diffusers strips the tensors'
        meta |= {f"{comp}.{k}": v for k, v in adapter_metadata(installed_clip_paths(part, comp)).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    if lora.base_model:
        metadata["base_model"] = lora.base_model
    return tensors, metadata

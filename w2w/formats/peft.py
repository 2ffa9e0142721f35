"""PEFT adapter folders: adapter_model.safetensors + adapter_config.json, `base_model.model.` keys.

rank_pattern / alpha_pattern are honoured with PEFT's own matching rule. DoRA and rsLoRA adapters
are refused: their update is not (alpha / r) * B @ A. An adapter of a CLIP text encoder (`text_model.` keys)
is the model's `text_encoder` part; a UNet adapter's folder may hold its text encoders' adapters in the
subfolders text_encoder/ and text_encoder_2/ (what `export --format peft` writes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from w2w.errors import CorruptFileError, UnknownFormatError
from w2w.formats import diffusers as dfmt
from w2w.formats.common import LayerParts, as_int_if_whole, assemble, pattern_lookup
from w2w.formats.lycoris import refuse_methods
from w2w.formats.tensorfile import TensorFile, read_tensor_file
from w2w.lora import LoRA

NAME = "peft"
WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
        assert isinstance(cfg, dict)
    except (OSError, ValueError, AssertionError):
        raise CorruptFileError(folder / CONFIG, "is not a readable JSON object") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnknownFormatError(folder, f"is a PEFT {cfg.get('peft_type')} adapter, not a LoRA")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise UnknownFormatError(
                folder, f"uses {flag}, whose update is not alpha/r * B A", "export it as plain LoRA"
            )
    return cfg


TEXT_ENCODER_DIRS = ("text_encoder", "text_encoder_2")
# a CLIP text encoder's module, with or without the `text_model.` level (transformers 4 / 5)
_TEXT_KEY = re.compile(r"(^|\.)(text_model\.|encoder\.layers\.\d+\.(self_attn|mlp)\.)")


def _weights(folder: Path) -> Path:
    weights = folder / WEIGHTS
    if not weights.exists() and (folder / PICKLED_WEIGHTS).exists():
        weights = folder / PICKLED_WEIGHTS
    if not weights.exists():
        raise CorruptFileError(folder, f"has {CONFIG} but no {WEIGHTS}")
    return weights


def read(folder: Path, base_model: str | None = None, allow_pickle: bool = False, drop_text_encoder: bool = False):
    """Read an adapter folder (and its text encoders' adapter subfolders) -> (LoRA, TensorFile of its weights)."""
    folder = Path(folder)
    cfg = read_config(folder)
    tf = read_tensor_file(_weights(folder), allow_pickle=allow_pickle)
    lora = parse(tf, cfg, base_model or cfg.get("base_model_name_or_path"), drop_text_encoder)
    for sub in TEXT_ENCODER_DIRS if not drop_text_encoder else ():
        if is_adapter_dir(folder / sub):
            sub_tf = read_tensor_file(_weights(folder / sub), allow_pickle=allow_pickle)
            part = parse(sub_tf, read_config(folder / sub), None, False, component=sub)
            lora = LoRA({**lora.layers, **part.layers}, lora.base_model, lora.meta)
    return lora, tf


def parse(
    tf: TensorFile, cfg: dict, base_model: str | None = None, drop_text_encoder: bool = False, component: str = ""
) -> LoRA:
    """The LoRA in a PEFT adapter's weights. `component` names the text encoder of a subfolder's adapter."""
    refuse_methods(tf.tensors, tf.path)
    text = component or ("text_encoder" if any(_TEXT_KEY.search(k) for k in tf.tensors) else "")
    if text and drop_text_encoder:
        raise UnknownFormatError(tf.path, "is a text-encoder adapter; it has no UNet part to import")
    parts: dict[str, LayerParts] = {}
    for key, t in tf.tensors.items():
        sk = dfmt.split_key(key)
        if sk is None or sk[1] == "alpha":
            raise UnknownFormatError(tf.path, f"key {key!r} is no PEFT LoRA factor")
        module, kind = sk
        if text and not module.startswith("text_model."):  # saved from a transformers 5 CLIPTextModel
            module = f"text_model.{module}"
        setattr(parts.setdefault(f"{text}.{module}" if text else module, LayerParts()), kind, t)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    default_alpha = cfg.get("lora_alpha", cfg.get("r"))
    inner = (lambda m: m[len(text) + 1 :].removeprefix("text_model.")) if text else (lambda m: m)
    alpha_for = {m: a for m in parts if (a := pattern_lookup(alpha_pattern, inner(m))) is not None}
    return assemble(parts, tf.path, default_alpha, alpha_for, base_model)


def to_folders(lora: LoRA) -> dict[str, tuple[dict, dict[str, str], dict]]:
    """Subfolder ("" for the top) -> (tensors, metadata, adapter_config): the UNet's adapter at the top, each text
    encoder's in its subfolder (at the top when there is no UNet part)."""
    parts = dfmt.split_components(lora)
    return {
        ("" if comp == "unet" or len(parts) == 1 else comp): to_files(
            part if comp == "unet" else dfmt.installed_clip_paths(part, comp)
        )
        for comp, part in parts.items()
    }


def to_files(lora: LoRA) -> tuple[dict, dict[str, str], dict]:
    """(tensors, safetensors metadata, adapter_config) of one adapter folder."""
    tensors = {}
    for m, l in lora.layers.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = l.A
        tensors[f"base_model.model.{m}.lora_B.weight"] = l.B
    meta = dfmt.adapter_metadata(lora)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": lora.base_model,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **meta,
        "lora_alpha": as_int_if_whole(meta["lora_alpha"]),
    }
    return tensors, {"format": "pt"} | ({"base_model": lora.base_model} if lora.base_model else {}), config

"""kohya (sd-scripts) and LyCORIS files: `lora_unet_<path with _>.<factor>`, `lora_te[12]_...`, `.alpha`.

Factors: LoRA/LoCon `lora_down.weight`, `lora_up.weight` (and a Tucker `lora_mid.weight`), LoHa `hada_*`,
LoKr `lokr_*`; LyCORIS's are converted exactly into LoRA factors (w2w/formats/lycoris.py). Both UNet namings
(diffusers and SGM) and the text encoders map to the canonical module names of w2w/formats/names.py; a key
that maps to no module of an SD 1.x/2.x/XL UNet or CLIP text encoder is refused, naming it.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from w2w import family as wfamily
from w2w.errors import UnknownFormatError
from w2w.formats import lycoris, names
from w2w.formats.common import LayerParts, assemble
from w2w.formats.tensorfile import TensorFile
from w2w.lora import LoRA

NAME = "kohya"
_FACTORS = {"lora_down.weight": "A", "lora_up.weight": "B"}
_SUFFIXES = set(_FACTORS) | {"alpha"} | set(lycoris.LOHA_KEYS) | set(lycoris.LOKR_KEYS) | {"lora_mid.weight"}
# 3x3 convs of the SD UNets (LoHa/LoKr store conv factors flat, so the kernel comes from the module's name)
_CONV3 = ("conv1", "conv2", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv")

demangle = names.demangle  # kept importable from here


def mangle(module: str) -> str:
    """The kohya key stem of a UNet module (diffusers spelling, as kohya writes SD 1.x)."""
    return names.kohya_stem(module, sdxl_text=False)


# modules whose per-module alpha diffusers' kohya loader (0.42) does not apply, giving them the most common alpha
# of their component instead (its alpha names keep spellings such as `processor.to_q_lora` that match no module):
# the UNet's attention projections and every text-encoder module
_ALPHA_LOST = re.compile(r"(\.attn[12]\.to_(q|k|v|out\.0)$|^text_encoder)")


def loadable_alphas(lora: LoRA) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """module -> (A, B, alpha) to write: a module of _ALPHA_LOST whose alpha differs from its component's most
    common one gets that alpha, its B scaled by alpha / common (same dW up to two roundings), so diffusers loads
    the file's update. Files kohya trains (one alpha per layer kind) are written unchanged."""
    from w2w.formats.diffusers import component

    out = {m: (l.A, l.B, l.alpha) for m, l in lora.layers.items()}
    for comp in {component(m) for m in out}:
        mods = [m for m in out if component(m) == comp]
        counts = Counter(out[m][2] for m in mods).most_common()
        common = counts[0][0]
        folded = [m for m in mods if out[m][2] != common and _ALPHA_LOST.search(m)]
        after = Counter(common if m in folded else out[m][2] for m in mods).most_common(2)
        if len(after) > 1 and after[0][1] == after[1][1]:  # a tie: diffusers might pick the other; fold them all
            folded = [m for m in mods if out[m][2] != common]
        for m in folded:
            A, B, alpha = out[m]
            out[m] = (A, (B * np.float32(alpha / common)).astype(np.float32), common)
    return out


def looks_like(keys: list[str]) -> bool:
    return any(k.startswith(tuple(names.KOHYA_PREFIXES)) for k in keys)


def _kernel(module: str, sd1: bool) -> tuple[int, int] | None:
    """The conv kernel of a module, from its name; proj_in/out are 1x1 convs in SD 1.x only (Linear later)."""
    if module.endswith(_CONV3):
        return (3, 3)
    if module.endswith("conv_shortcut"):
        return (1, 1)
    if module.endswith(("proj_in", "proj_out")) and not names.is_text_encoder(module):
        return (1, 1) if sd1 else None
    return None


def _sd1(groups: dict[str, dict[str, np.ndarray]], metadata: dict[str, str], path) -> bool:
    """Whether the file is for SD 1.x, whose proj_in/out are 1x1 convs that LoHa/LoKr store flattened: from
    the metadata, else from the cross-attention input width (SD 1.x 768, SD 2.x 1024, SDXL 2048)."""
    if metadata.get("ss_base_model_version", "").startswith("sd_v1") or metadata.get(
        "modelspec.architecture", ""
    ).startswith("stable-diffusion-v1"):
        return True
    for module, g in groups.items():
        if module.endswith(("attn2.to_k", "attn2.to_v")) and not names.is_text_encoder(module):
            g = {k: v for k, v in g.items() if k != "alpha"}
            A = g.get("lora_down.weight")
            if A is None:
                A = lycoris.to_lora(g, None, None, module, path)[0]
            return wfamily.from_cross_width(A.reshape(A.shape[0], -1).shape[1]) == "sd15"
    return False


def parse(tf: TensorFile, base_model: str | None = None, drop_text_encoder: bool = False) -> LoRA:
    lycoris.refuse_methods(tf.tensors, tf.path)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tf.tensors.items():
        stem, _, suffix = key.partition(".")
        named = names.kohya_module(stem)
        if named is None or suffix not in _SUFFIXES:
            raise UnknownFormatError(tf.path, f"key {key!r} is no kohya or LyCORIS LoRA key")
        module = named[0]
        if drop_text_encoder and names.is_text_encoder(module):
            continue
        if not names.known_module(module):
            raise UnknownFormatError(
                tf.path,
                f"key {key!r} maps to {module!r}, no LoRA-able module of an SD 1.x/2.x/XL UNet or CLIP text encoder",
                "is it a LoRA for another model?",
            )
        groups.setdefault(module, {})[suffix] = t
    parts: dict[str, LayerParts] = {}
    kinds = set()
    sd1 = _sd1(groups, tf.metadata, tf.path)
    for module, g in groups.items():
        p = parts[module] = LayerParts()
        alpha = float(np.asarray(g.pop("alpha")).reshape(-1)[0]) if "alpha" in g else None
        kind = lycoris.kind_of(set(g))
        if kind == "lora" and "lora_mid.weight" not in g:
            p.A, p.B, p.alpha = g.get("lora_down.weight"), g.get("lora_up.weight"), alpha
            if p.A is not None and p.A.ndim == 4 and p.A.shape[2:] != (1, 1):
                kind = "locon"
        else:
            p.A, p.B, p.alpha = lycoris.to_lora(g, alpha, _kernel(module, sd1), module, tf.path)
            kind = "locon" if kind == "lora" else kind
        kinds.add(kind)
    lora = assemble(parts, tf.path, None, None, base_model)
    lora.meta["source_kind"] = next(k for k in ("lokr", "loha", "locon", "lora") if k in kinds or k == "lora")
    return lora


def to_tensors(lora: LoRA) -> tuple[dict, dict[str, str]]:
    tensors = {}
    sdxl_text = any(m.startswith("text_encoder_2.") for m in lora.layers)
    for m, (A, B, alpha) in loadable_alphas(lora).items():
        k = names.kohya_stem(m, sdxl_text)
        tensors[f"{k}.lora_down.weight"] = A
        tensors[f"{k}.lora_up.weight"] = B
        tensors[f"{k}.alpha"] = np.asarray(alpha, dtype=np.float32)
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if lora.base_model:
        metadata["base_model"] = lora.base_model
    return tensors, metadata

"""The base-model family of a LoRA: which UNet architecture its update applies to.

Two LoRAs are comparable (their dW can be subtracted, module by module) exactly when they share a
family, whatever their ranks, alphas, targets or file format. The family comes from the shapes when
they settle it (the cross-attention input width is the text encoder's width: 768 for SD 1.x, 1024
for SD 2.x, 2048 for SDXL; 64 for the embedded toy base), else from metadata (kohya `ss_*`,
`modelspec.architecture`, a PEFT `base_model_name_or_path`, our own `base_model`), else `unknown`.
Shapes win over metadata that contradicts them: a file name in `ss_sd_model_name` can lie, a 2048-wide
cross-attention cannot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from w2w.layout import Layout

FAMILIES = ("sd15", "sd2", "sdxl", "toy", "unknown")
UNKNOWN = "unknown"
TOY_BASE_ID = "w2wreg/toy-faces-base"  # ingest.basemodel's id of the embedded toy base (w2w may not import ingest)

# input width of the cross-attention to_k / to_v = the text encoder's hidden width
_CROSS_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl", 64: "toy"}
# text encoder q_proj width: CLIP-L (SD 1.x, and SDXL's first encoder), OpenCLIP-H (SD 2.x), OpenCLIP-G (SDXL)
_TEXT_WIDTH = {1024: "sd2", 1280: "sdxl"}
_CROSS_KV = re.compile(r"attn2\.to_[kv]$")
# SDXL's UNet has no attention in its first down block and up to 10 transformer blocks per attention;
# SD 1.x/2.x have attention at 320 channels (down_blocks.0 / up_blocks.3) and one transformer block each.
_SDXL_ONLY = re.compile(r"transformer_blocks\.[1-9]\.")
_SD_1_2_ONLY = re.compile(r"^(unet\.)?(down_blocks\.0|up_blocks\.3)\.attentions\.")

# metadata values, lower-cased, first match wins (sdxl before the generic v1/v2 patterns)
_NAME_PATTERNS = (
    (re.compile(r"toy-faces-base"), "toy"),
    (re.compile(r"sdxl|stable-diffusion-xl|[-_ ]xl[-_ ]|sd_xl|xl[-_]base|xl-v1|pony|illustrious"), "sdxl"),
    (re.compile(r"stable-diffusion-v?2|sd_?v?2|sd-?2\.|sd2|v2-[01]|2-1|2\.1"), "sd2"),
    (re.compile(r"stable-diffusion-v1|sd_?v?1|sd-?1\.|sd15|v1-5|1\.5|1-5|v1-4|stable-diffusion-v1-5"), "sd15"),
)
# metadata keys that name the base, most specific first
_META_KEYS = (
    "modelspec.architecture",
    "ss_base_model_version",
    "base_model",
    "base_model_name_or_path",
    "ss_sd_model_name",
    "ss_sd_model_hash",
)


def from_name(text: str | None) -> str | None:
    """The family a base-model name or architecture string names, or None."""
    if not text:
        return None
    t = str(text).strip().lower()
    for pattern, family in _NAME_PATTERNS:
        if pattern.search(t):
            return family
    return None


def from_metadata(meta: Mapping[str, str] | None, base_model: str | None = None) -> str | None:
    """The family named by a file's metadata (and/or a base model id), or None."""
    meta = dict(meta or {})
    if str(meta.get("ss_v2", "")).lower() == "true":
        return "sd2"
    for text in [meta.get(k) for k in _META_KEYS[:2]] + [base_model] + [meta.get(k) for k in _META_KEYS[2:]]:
        found = from_name(text)
        if found:
            return found
    return None


def from_cross_width(width: int) -> str | None:
    """The family whose UNet cross-attention takes `width`-wide text embeddings, or None."""
    return _CROSS_WIDTH.get(width)


def from_shapes(layout: Layout) -> str | None:
    """The family the module names and shapes settle, or None when they do not."""
    votes: set[str] = set()
    for e in layout.entries:
        name = e.module
        if name.startswith("text_encoder_2."):
            votes.add("sdxl")
        elif name.startswith("text_encoder.") and name.endswith("q_proj"):
            width = e.a_shape[1] if len(e.a_shape) == 2 else None
            if width in _TEXT_WIDTH:
                votes.add(_TEXT_WIDTH[width])
        elif _CROSS_KV.search(name):
            width = e.a_shape[1] if len(e.a_shape) == 2 else None
            if width in _CROSS_WIDTH:
                votes.add(_CROSS_WIDTH[width])
        elif _SDXL_ONLY.search(name):
            votes.add("sdxl")
    if len(votes) == 1:
        return votes.pop()
    if not votes and any(_SD_1_2_ONLY.search(e.module) for e in layout.entries):
        # SD 1.x or 2.x; SD 2.x's proj_in is a Linear, SD 1.x's a 1x1 conv
        proj = [e for e in layout.entries if e.module.endswith("proj_in")]
        if proj:
            return "sd15" if len(proj[0].a_shape) == 4 else "sd2"
    return None


def detect(layout: Layout, base_model: str | None = None, meta: Mapping[str, str] | None = None) -> str:
    """The family of a LoRA with this layout, base model id and file metadata (see the module doc)."""
    return from_shapes(layout) or from_metadata(meta, base_model) or UNKNOWN


def check(family: str) -> str:
    """A family name given by a user, validated."""
    if family not in FAMILIES:
        raise ValueError(f"unknown base-model family {family!r}; known: {', '.join(FAMILIES)}")
    return family

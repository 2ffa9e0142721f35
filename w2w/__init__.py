"""Weight-space math for customized diffusion models: LoRA formats, layouts, flattening, distances."""

from w2w.errors import W2WError
from w2w.layout import Layout, LayoutEntry
from w2w.lora import LoRA, LoRALayer

__all__ = ["LoRA", "LoRALayer", "Layout", "LayoutEntry", "W2WError"]

"""Images of registered models: each model's LoRA merged into its base model's UNet, drawn as a labelled grid.

A model renders on the base model it records (the embedded toy base needs nothing) or on the one given
(`base_model`: a diffusers folder or hub id of an SD 1.x/2.x or SDXL pipeline). Every model gets the same
seeds, so the columns of a grid share their noise and the rows differ only by their models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ingest.basemodel import BaseModel, load_base
from ingest.generate import merged
from w2w.errors import W2WError
from w2w.flatten import unflatten
from w2w.lora import LoRA

CELL_PX = 128  # tiles are upscaled (nearest-neighbour, whole factors) to about this size: 32 px toy faces x4


class RenderError(W2WError):
    """A model that cannot be rendered as asked (no base model known, or a LoRA that does not fit it)."""


@dataclass(frozen=True)
class Settings:
    """How every image of one render is made (the w2w paper's identity prompt by default)."""

    prompt: str = "sks person"
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 25
    guidance: float = 3.0
    device: str = "cpu"
    dtype: str = "fp32"


def base_of(model, base_model: str | None) -> str:
    """What to load for `model`: `base_model` when given, else the base model the model records."""
    if base_model is not None:
        return base_model
    if model.base_model is None:
        raise RenderError(
            f"model {model.name!r} records no base model; pass --base-model PATH|HUB_ID (or toy, the embedded one)"
        )
    return model.base_model


def check_fits(base: BaseModel, lora: LoRA, what: str, hint: str = "pass the --base-model it was made for") -> None:
    """Refuse, in one line, a LoRA whose modules the base UNet lacks or whose shapes differ from them."""
    for name, layer in lora.layers.items():
        try:
            weight = base.unet.get_submodule(name).weight
        except AttributeError:
            raise RenderError(f"{what} does not fit base model {base.ref!r}: its UNet has no {name}; {hint}") from None
        n_out, n_in = layer.B.shape[0], int(np.prod(layer.A.shape[1:]))
        if weight.shape[0] != n_out or weight.numel() != n_out * n_in:
            raise RenderError(
                f"{what} does not fit base model {base.ref!r}: {name} is {tuple(weight.shape)} there, "
                f"{n_out} x {n_in} in the LoRA; {hint}"
            )


def load_for(model, lora: LoRA, settings: Settings, base_model: str | None = None) -> BaseModel:
    """The base model to render `model` on, loaded (cached per process) and checked against its LoRA."""
    base = load_base(base_of(model, base_model), settings.device, settings.dtype)
    check_fits(base, lora, f"model {model.name!r}")
    return base


@torch.no_grad()
def images(
    base: BaseModel,
    lora: LoRA | None,
    settings: Settings,
    on_step: Callable[[], None] | None = None,
    size: int | None = None,
) -> np.ndarray:
    """(len(seeds), H, W, 3) uint8: one image per seed, each seed's noise independent of the others'.
    `size`: the side in pixels (default: the base model's own)."""
    # one generator per image: seed s draws the same noise whatever else is in the batch (the pixels can
    # differ by a level: batched kernels round differently)
    gens = [torch.Generator().manual_seed(int(s)) for s in settings.seeds]
    extra = {} if size is None else {"height": size, "width": size}
    if on_step is not None:

        def tick(pipe, i, t, kwargs):
            on_step()
            return kwargs

        extra["callback_on_step_end"] = tick
    with merged(base, lora):
        out = base.pipe(
            [settings.prompt] * len(gens),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=gens,
            output_type="np",
            **extra,
        ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def render_models(
    reg, refs: Sequence[str], settings: Settings, base_model: str | None = None, progress: bool = True
) -> list[tuple[object, np.ndarray]]:
    """[(model row, images (len(seeds), H, W, 3))] for each model, on its base model (or `base_model`).

    Every model and base model is resolved and checked before the first image, so a typo fails at once.
    """
    from tqdm.auto import tqdm

    models = [reg.get(r) for r in refs]
    loras = [reg.lora(m) for m in models]
    bases = [load_for(m, lora, settings, base_model) for m, lora in zip(models, loras, strict=True)]
    out = []
    with tqdm(total=len(models) * settings.steps, desc="rendering", unit="step", disable=not progress) as bar:
        for m, lora, base in zip(models, loras, bases, strict=True):
            bar.set_postfix_str(m.name, refresh=False)
            out.append((m, images(base, lora, settings, lambda: bar.update(1))))
    return out


def scale_for(rows: Sequence[tuple[str, Sequence[np.ndarray | None]]]) -> int:
    """The whole upscaling factor that brings the largest tile to about CELL_PX (1 for 512 px images)."""
    side = max((max(im.shape[:2]) for _, ims in rows for im in ims if im is not None), default=CELL_PX)
    return max(1, round(CELL_PX / side))


def write_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray | None]]], path: Path, columns: Sequence[str] | None = None
) -> Path:
    """A labelled PNG grid (toyfaces.contact_sheet), tiles upscaled to about CELL_PX."""
    from ingest.toyfaces import contact_sheet

    return contact_sheet(list(rows), path, scale=scale_for(rows), columns=columns)


def strength_labels(strengths: dict[str, float], multiples: Sequence[float]) -> list[str]:
    """Column labels of an edit strip: 'original' at 0, each direction's strength elsewhere, '(saved)' at 1."""
    out = []
    for t in multiples:
        if t == 0:
            out.append("original")
            continue
        text = " ".join(f"{a} {t * s:+g}" for a, s in strengths.items())
        out.append(text + (" (saved)" if t == 1 else ""))
    return out


def edit_strip(
    reg,
    model: str,
    strengths: dict[str, float],
    path: Path,
    settings: Settings,
    multiples: Sequence[float] = (-2, -1, 0, 1, 2),
    base_model: str | None = None,
    progress: bool = True,
) -> Path:
    """A PNG strip of `model` edited by t * strengths for each t in `multiples` (0: as it is; 1: what `edit`
    saves), one row per seed, every image of a row from the same noise, so the difference is the edit."""
    from tqdm.auto import tqdm

    from registry import edits

    m = reg.get(model)
    layout = reg.layout(m.space_id)
    vectors = edits.edit_vectors(reg, m, strengths, multiples)
    loras = [unflatten(v.astype(np.float32), layout, m.base_model) for v in vectors]
    base = load_for(m, loras[0], settings, base_model)
    cols = []
    with tqdm(total=len(loras) * settings.steps, desc="preview", unit="step", disable=not progress) as bar:
        for lora in loras:
            cols.append(images(base, lora, settings, lambda: bar.update(1)))
    rows = [(f"{m.name} seed {s}", [c[i] for c in cols]) for i, s in enumerate(settings.seeds)]
    return write_grid(rows, path, strength_labels(strengths, multiples))

"""One image of one model, as PNG bytes: what `w2wreg serve` draws for its page (server.previews).

A model renders on the embedded toy base when it records that base, and on the one base the operator
configured (`serve --render-base PATH|HUB_ID`) otherwise, if its LoRA fits it. Never on a base a model
merely records: a model pushed by a stranger would name what the server loads from its disk or the Hub.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ingest.basemodel import TOY_BASE_ID
from w2w.errors import W2WError
from w2w.lora import LoRA


class PreviewUnavailable(W2WError):
    """A model this server cannot draw (its base model is not one it runs, or its LoRA does not fit it)."""


@dataclass(frozen=True)
class Base:
    ref: str  # what the base was loaded from: part of a render's identity
    resolution: int  # its native image side in pixels


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the `with` (None: left alone).

    A toy render is many tiny kernels: on a busy machine two spinning threads take ~30x longer than one
    (0.43 s -> 10-16 s for 20 steps at 32 px on 2 shared cores)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Previewer:
    """Draws models on the toy base and on at most one configured base (`base_model`), on one device.

    Not safe for concurrent renders on one base (a render merges the LoRA into the shared UNet): callers
    serialize `png` (server.previews does)."""

    def __init__(
        self,
        base_model: str | None = None,
        device: str = "cpu",
        dtype: str = "fp32",
        cpu_threads: int | None = 1,
    ):
        self.base_model, self.device, self.dtype = base_model, device, dtype
        self.cpu_threads = cpu_threads if device == "cpu" else None
        self._loading = threading.Lock()  # two first requests load a base once, not twice

    def describe(self) -> str:
        extra = f" and {self.base_model}" if self.base_model else ""
        return f"the embedded toy base{extra}, on {self.device}"

    def _load(self, model):
        from ingest.basemodel import load_base

        if model.base_model == TOY_BASE_ID:
            ref = "toy"
        elif self.base_model is not None:
            ref = self.base_model
        else:
            raise PreviewUnavailable(
                f"this server does not run base model {model.base_model or '(none recorded)'!r} of {model.name!r}: "
                "it draws models of the embedded toy base; an operator can add one with `serve --render-base "
                "PATH|HUB_ID`"
            )
        with self._loading:
            return load_base(ref, self.device, self.dtype)

    def base(self, model, lora: LoRA) -> Base:
        """The base `model` renders on here (loaded on first use), checked against its LoRA."""
        from ingest.render import RenderError, check_fits

        base = self._load(model)
        try:
            check_fits(base, lora, f"model {model.name!r}", hint="this server draws it on no other base")
        except RenderError as e:
            raise PreviewUnavailable(str(e)) from None
        return Base(base.ref, base.resolution)

    def warm(self) -> None:
        """Load the configured base now (a first preview would otherwise wait for it)."""
        from ingest.basemodel import load_base

        with self._loading:
            load_base("toy", self.device, self.dtype)
            if self.base_model is not None:
                load_base(self.base_model, self.device, self.dtype)

    def png(self, model, lora: LoRA, prompt: str, seed: int, steps: int, size: int) -> bytes:
        """One image (size x size) of `model` drawn with `lora` merged into its base, as PNG bytes."""
        from PIL import Image

        from ingest.render import Settings, images

        base = self._load(model)
        settings = Settings(prompt=prompt, seeds=(seed,), steps=steps, device=self.device, dtype=self.dtype)
        with torch_threads(self.cpu_threads):
            (im,) = images(base, lora, settings, size=size)  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im)).save(buf, format="PNG")
        return buf.getvalue()

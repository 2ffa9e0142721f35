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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from w2w.errors import W2WError
from w2w.family import TOY_BASE_ID
from w2w.lora import LoRA

if TYPE_CHECKING:  # torch and diffusers load with the first base model, not with this module (a server at rest)
    from ingest.basemodel import BaseModel


class PreviewUnavailable(W2WError):
    """A model this server cannot draw (its base model is not one it runs, or its LoRA does not fit it)."""


class BaseLoading(W2WError, TimeoutError):
    """A base model is still loading: a moment later the same request can be answered."""


@dataclass
class _Load:
    """One base model being loaded: done once it is (or failed: `error`)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


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
        self._bases: dict[str, BaseModel] = {}
        self._loads: dict[str, _Load] = {}  # bases being loaded, by ref
        self._loads_lock = threading.Lock()
        self._loading = threading.Lock()  # one base loads at a time (an SD pipeline is GBs)

    def describe(self) -> str:
        extra = f" and {self.base_model}" if self.base_model else ""
        return f"the embedded toy base{extra}, on {self.device} (loaded at the first preview)"

    def _ref(self, model) -> str:
        if model.base_model == TOY_BASE_ID:
            return "toy"
        if self.base_model is not None:
            return self.base_model
        raise PreviewUnavailable(
            f"this server does not run base model {model.base_model or '(none recorded)'!r} of {model.name!r}: "
            "it draws models of the embedded toy base; an operator can add one with `serve --render-base "
            "PATH|HUB_ID`"
        )

    def _get(self, ref: str, wait: bool = False) -> BaseModel:
        """The loaded base `ref`, loaded in a thread of its own at the first request for it. While it loads (an
        SD model takes minutes) a request waits at most 2 s, then gets BaseLoading, so that requests do not
        pile up behind it (`wait`: wait for it in any case). A load that failed raises its error to the
        requests waiting for it; the next request tries again."""
        base = self._bases.get(ref)
        if base is not None:
            return base
        with self._loads_lock:
            if ref in self._bases:  # loaded meanwhile (its job is gone)
                return self._bases[ref]
            job = self._loads.get(ref)
            if job is None:
                job = self._loads[ref] = _Load()
                threading.Thread(target=self._load, args=(ref, job), daemon=True, name=f"load-{ref}").start()
        if not job.done.wait(None if wait else 2.0):
            raise BaseLoading(f"the base model {ref!r} is loading; retry in a moment")
        if job.error is not None:
            raise job.error
        return self._bases[ref]

    def _load(self, ref: str, job: _Load) -> None:
        from ingest.basemodel import load_base

        try:
            with self._loading:
                self._bases[ref] = load_base(ref, self.device, self.dtype)
        except Exception as e:  # noqa: BLE001 (given to the requests that wait for this load)
            job.error = e
        finally:
            with self._loads_lock:
                del self._loads[ref]
            job.done.set()

    def base(self, model, lora: LoRA) -> Base:
        """The base `model` renders on here (loaded on first use), checked against its LoRA."""
        from ingest.render import RenderError, check_fits

        base = self._get(self._ref(model))
        try:
            check_fits(base, lora, f"model {model.name!r}", hint="this server draws it on no other base")
        except RenderError as e:
            raise PreviewUnavailable(str(e)) from None
        return Base(base.ref, base.resolution)

    def warm(self) -> None:
        """Load the base models now (`serve` does not: a server that only moves files need not hold them)."""
        self._get("toy", wait=True)
        if self.base_model is not None:
            self._get(self.base_model, wait=True)

    def png(self, model, lora: LoRA, prompt: str, seed: int, steps: int, size: int) -> bytes:
        """One image (size x size) of `model` drawn with `lora` merged into its base, as PNG bytes."""
        from PIL import Image

        from ingest.render import Settings, images

        base = self._get(self._ref(model))
        settings = Settings(prompt=prompt, seeds=(seed,), steps=steps, device=self.device, dtype=self.dtype)
        with torch_threads(self.cpu_threads):
            (im,) = images(base, lora, settings, size=size)  # (H, W, 3) uint8
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im)).save(buf, format="PNG")
        return buf.getvalue()

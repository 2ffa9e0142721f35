"""What a stranger may ask the server to draw, and how much: the bounds, the cache and the queue of previews.

Every image is one seed of one model (or of an edit of it), at most `max_steps` denoising steps, at most
`max_size` pixels a side, edits within +-`max_strength` standard deviations. Renders run one at a time
(a render merges its LoRA into the shared UNet) outside the registry's lock, so the rest of the server
answers while one runs; at most `max_waiting` requests wait for the renderer, others get a 503 at once.
Images are cached by what determines them: the base, the weights drawn (an edit's vector, not its name),
the prompt, seed, steps and size; the cache holds at most `cache_bytes`.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from registry.catalog import ModelRow
from w2w.errors import W2WError
from w2w.lora import LoRA

DEFAULT_PROMPT = "sks person"  # the w2w paper's identity prompt, as `w2wreg render`'s
_DIRECTION = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class BaseInfo(Protocol):
    ref: str
    resolution: int


class Renderer(Protocol):
    """What draws the images (ingest.preview.Previewer; the server does not know diffusers)."""

    def base(self, model: ModelRow, lora: LoRA) -> BaseInfo:
        """The base `model` renders on; W2WError when there is none here, TimeoutError while it is loading."""
        ...

    def png(self, model: ModelRow, lora: LoRA, prompt: str, seed: int, steps: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class Limits:
    default_steps: int = 20  # 0.43 s for a 32 px toy face on one CPU thread
    max_steps: int = 50
    max_size: int | None = None  # pixels a side; None: each base's own resolution
    max_strength: float = 5.0  # standard deviations of an attribute's score
    max_prompt: int = 200
    max_waiting: int = 4  # requests waiting for the renderer (besides the one it runs)
    wait_s: float = 60.0  # the longest a request waits for its turn
    cache_bytes: int = 64 << 20

    def size_limit(self, base: BaseInfo) -> int:
        return self.max_size or base.resolution


class Busy(W2WError, TimeoutError):
    """The renderer's queue is full, or a request waited too long for its turn (a 503: retry)."""


class Gate:
    """One render at a time, and at most `max_waiting` callers waiting for it."""

    def __init__(self, max_waiting: int, wait_s: float):
        self.max_waiting, self.wait_s = max_waiting, wait_s
        self._turn = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._count:
            if self.waiting >= self.max_waiting:
                raise Busy(f"the renderer is busy ({self.waiting} previews waiting); retry in a moment")
            self.waiting += 1
        try:
            if not self._turn.acquire(timeout=self.wait_s):
                raise Busy(f"no preview slot within {self.wait_s:g} s; retry in a moment")
        finally:
            with self._count:
                self.waiting -= 1
        try:
            yield
        finally:
            self._turn.release()


class ImageCache:
    """PNG bytes by key, least recently used first out, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(data) - (len(old) if old is not None else 0)
            self._items[key] = data
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


def parse_edit(text: str | None, max_strength: float) -> dict[str, float]:
    """'glasses=1.5,smile=-0.5' -> {'glasses': 1.5, 'smile': -0.5}; '' or None -> {} (the model itself)."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not _DIRECTION.match(name):
            raise W2WError(f"edit item {item[:120]!r}: expected ATTRIBUTE=STRENGTH, e.g. glasses=1.5")
        if name in out:
            raise W2WError(f"edit names {name!r} twice")
        try:
            s = float(value)
        except ValueError:
            raise W2WError(f"edit strength {value[:40]!r} of {name!r} is not a number") from None
        if not math.isfinite(s) or abs(s) > max_strength:
            raise W2WError(f"edit strength of {name!r} must be within +-{max_strength:g} standard deviations")
        out[name] = s
    return out


def check_size(size: int | None, base: BaseInfo, limits: Limits) -> int:
    """The image side to draw: `size`, else the base's own; a multiple of 8 up to the server's bound."""
    if size is None:
        return base.resolution
    top = limits.size_limit(base)
    if size % 8 or not 8 <= size <= top:
        raise W2WError(f"size {size}: previews here are multiples of 8 from 8 to {top} pixels")
    return size


def image_key(base: BaseInfo, weights: bytes, prompt: str, seed: int, steps: int, size: int) -> str:
    """What determines an image, hashed: the base, the weights drawn, and how."""
    h = hashlib.sha256()
    for part in (base.ref, prompt, seed, steps, size):
        h.update(repr(part).encode() + b"\0")
    h.update(weights)
    return h.hexdigest()


@dataclass
class Previews:
    """The server's previews: a renderer (None: this server draws nothing), its bounds, cache and queue."""

    renderer: Renderer | None
    limits: Limits

    def __post_init__(self):
        self.cache = ImageCache(self.limits.cache_bytes)
        self.gate = Gate(self.limits.max_waiting, self.limits.wait_s)

    def base(self, model: ModelRow, lora: LoRA) -> BaseInfo:
        if self.renderer is None:
            raise W2WError("this server draws no previews (it was started with --no-previews, or without a renderer)")
        return self.renderer.base(model, lora)

    def draw(self, model: ModelRow, lora: LoRA, key: str, prompt: str, seed: int, steps: int, size: int) -> bytes:
        """The image of `key`: from the cache, else rendered in turn (Busy when the queue is full)."""
        data = self.cache.get(key)
        if data is not None:
            return data
        assert self.renderer is not None, "draw() after base() succeeded"
        with self.gate.turn():
            data = self.cache.get(key)  # drawn while this request waited
            if data is None:
                data = self.renderer.png(model, lora, prompt, seed, steps, size)
                self.cache.put(key, data)
        return data

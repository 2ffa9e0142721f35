"""Reading many LoRA files of one shape straight into vectors, at close to the speed of reading them.

A folder of LoRAs made by one tool has the same safetensors header in every file: same keys, shapes,
dtypes and offsets (and metadata). The first file of each header goes through the ordinary reader;
from it we compile a *plan*: the index, in the file's float32 data, of every element of the model's
vector in layout order. The plan is found by running the same parser on a copy of the tensors whose
values are their own (negated) positions, so it follows the parser's rules exactly, alphas included.
The next files with that header cost one gather, one NaN check and a hash. Anything unusual (other
dtypes, a pickle, a PEFT folder, a value check that fails) takes the ordinary path, which also gives
the precise error message.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2w.errors import LoRAFileError
from w2w.flatten import flatten
from w2w.formats.tensorfile import PICKLE_SUFFIXES, TensorFile, header_bytes, parse_safetensors
from w2w.layout import Layout
from w2w.lora import check_lora

MAX_PLANS = 64
_MAX_MARKED = 1 << 24  # float32 holds every integer up to 2**24 exactly


@dataclass
class VectorRead:
    """A LoRA file read as a vector in its layout."""

    path: Path
    format: str
    layout: Layout
    vector: np.ndarray  # (D,) float32
    base_model: str | None
    sha256: str  # of the file
    meta: dict[str, str]  # the LoRA's meta: header metadata, source_dtype, source_kind


@dataclass(frozen=True)
class _Plan:
    fmt: str
    layout: Layout
    base_model: str | None
    meta: dict[str, str]
    body_offset: int
    body_floats: int
    gather: np.ndarray  # (D,) int64 positions in the float32 body
    alpha_at: np.ndarray  # positions of alpha scalars read from the body
    alpha_values: np.ndarray  # the values they had when the plan was made


_plans: OrderedDict[tuple, _Plan] = OrderedDict()
# headers read once: a plan is compiled (a second parse, as long as the first) on a header's second file, since
# on a hub of mixed LoRAs most headers come once and a plan made for them would never be used
_seen: OrderedDict[tuple, None] = OrderedDict()
MAX_SEEN = 4096
_lock = threading.Lock()


def _header_digest(header: bytes) -> bytes:
    """A digest of a header up to the order of its metadata entries, which safetensors writes in hash-map order
    (two files of one layout and metadata may differ there alone; their offsets and lengths do not)."""
    import json

    info = json.loads(header)
    return hashlib.sha256(json.dumps(info, sort_keys=True, separators=(",", ":")).encode()).digest()


_canonical: OrderedDict[bytes, bytes] = OrderedDict()  # digest of a header's bytes -> _header_digest


def _remember(table: OrderedDict, key, value, limit: int) -> None:
    """Insert, dropping the oldest entries beyond `limit` (callers hold _lock)."""
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


def _plan_key(header: bytes, base_model: str | None, drop_text_encoder: bool) -> tuple:
    raw = hashlib.sha256(header).digest()  # ~10 us; the canonical digest parses the JSON (~0.3 ms per 10 KB)
    canon = _canonical.get(raw)
    if canon is None:
        canon = _header_digest(header)
        with _lock:
            _remember(_canonical, raw, canon, MAX_SEEN)
    return (canon, base_model, drop_text_encoder)


def _seen_before(key: tuple) -> bool:
    with _lock:
        if key in _seen:
            return True
        _remember(_seen, key, None, MAX_SEEN)
        return False


def read_vector(
    path: str | Path, base_model: str | None = None, allow_pickle: bool = False, drop_text_encoder: bool = False
) -> VectorRead:
    """Read a LoRA file or adapter folder as (layout, vector), using a compiled plan when one fits."""
    from w2w.formats import detect_format, parse_file, read_lora

    path = Path(path)
    if path.is_dir() or path.suffix.lower() in PICKLE_SUFFIXES:
        rr = read_lora(path, base_model, allow_pickle, drop_text_encoder)
        lora = rr.lora
        return VectorRead(path, rr.format, lora.layout(), flatten(lora), lora.base_model, rr.sha256, lora.meta)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoRAFileError(path, f"cannot be read ({e.strerror})") from None
    sha = hashlib.sha256(data).hexdigest()
    header = header_bytes(data)
    key = _plan_key(header, base_model, drop_text_encoder) if header is not None else None
    plan = _plans.get(key) if key is not None else None
    if plan is not None and len(data) == plan.body_offset + 4 * plan.body_floats:
        body = np.frombuffer(data, dtype=np.float32, offset=plan.body_offset, count=plan.body_floats)
        vector = body[plan.gather]  # (D,) copy, in layout order
        if np.array_equal(body[plan.alpha_at], plan.alpha_values) and np.isfinite(vector).all():
            return VectorRead(path, plan.fmt, plan.layout, vector, plan.base_model, sha, dict(plan.meta))
    # the ordinary path: parse, check, and compile a plan for the next files with this header
    tensors, metadata, dtype = parse_safetensors(data, path)
    tf = TensorFile(path, tensors, metadata, sha, dtype)
    fmt = detect_format(tf)
    lora = parse_file(tf, fmt, base_model, drop_text_encoder)
    check_lora(lora, path)
    layout = lora.layout()
    vector = flatten(lora, layout)
    if header is not None and fmt != "peft" and _seen_before(key):
        new = _compile(data, header, tf, fmt, layout, vector, lora.meta, base_model, drop_text_encoder)
        if new is not None:
            with _lock:
                _remember(_plans, key, new, MAX_PLANS)
    return VectorRead(path, fmt, layout, vector, lora.base_model, sha, lora.meta)


def _compile(
    data: bytes, header: bytes, tf: TensorFile, fmt: str, layout: Layout, vector: np.ndarray, meta, base_model, drop_te
) -> _Plan | None:
    import json

    from w2w.formats import parse_file

    info = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    if any(v["dtype"] != "F32" for v in info.values()):
        return None
    body_offset = 8 + len(header)
    body_floats = (len(data) - body_offset) // 4
    if body_floats >= _MAX_MARKED or (len(data) - body_offset) % 4:
        return None
    marked = {}
    for key, v in info.items():
        start = v["data_offsets"][0]
        if start % 4:
            return None
        n = int(np.prod(v["shape"])) if v["shape"] else 1
        # element i of the body is marked -(i + 1): negative, so a marked alpha is told from a real one
        marked[key] = -(np.arange(start // 4, start // 4 + n, dtype=np.float32) + 1).reshape(v["shape"])
    lora = parse_file(TensorFile(tf.path, marked, tf.metadata, tf.sha256), fmt, base_model, drop_te)
    mlayout = lora.layout()
    if [e.module for e in mlayout.entries] != [e.module for e in layout.entries]:
        return None
    marks = -flatten(lora).astype(np.float64) - 1
    gather = marks.astype(np.int64)
    body = np.frombuffer(data, dtype=np.float32, offset=body_offset, count=body_floats)
    # a converted module (LoHa, LoKr, a Tucker LoCon) computes its factors: no element is a copy, no plan fits
    if not (np.array_equal(marks, gather) and gather.min() >= 0 and gather.max() < body_floats):
        return None
    if not np.array_equal(body[gather], vector):
        return None
    alpha_at = np.array([-int(m.alpha) - 1 for m in mlayout.entries if m.alpha < 0], dtype=np.int64)
    alphas = body[alpha_at].copy()
    return _Plan(fmt, layout, lora.base_model, dict(meta), body_offset, body_floats, gather, alpha_at, alphas)

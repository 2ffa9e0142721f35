"""A LoRA's weight update dW as a point of its family's space: norms, inner products, distances, sketches.

Every module's update is dW = s B A (s = alpha / r; a conv's A flattened to (r, in*kh*kw)). Two LoRAs of
one family are compared over the union of their modules, a module one of them lacks contributing its
dW alone, so ranks, alphas and target sets need not agree. Nothing builds an (out, in) matrix:

    <s1 B1 A1, s2 B2 A2>_F = s1 s2 sum((B1^T B2) * (A1 A2^T))        r1 x r2 Grams, O((out + in) r1 r2)
    ||dW1 - dW2||^2 = ||dW1||^2 + ||dW2||^2 - 2 <dW1, dW2>            (float64: see `Factors`)

A sketch is a fixed-size vector whose L2 distances estimate these Frobenius distances: per module a
seeded two-sided Gaussian sketch G_L dW G_R^T / side = (G_L s B)(A G_R^T) / side, summed over modules.
Its maps depend only on the module's name and shape, so every LoRA of a family shares them, and the
sketch is linear in dW: E ||sk(x) - sk(y)||^2 = ||dW_x - dW_y||^2 (independent maps per module keep
the cross terms at zero mean).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from w2w.errors import LayoutMismatchError
from w2w.layout import Layout
from w2w.lora import LoRA, LoRALayer

SKETCH_SIDE = 32  # sketch = side x side = 1,024 floats (4 KB) per model


@lru_cache(maxsize=1)
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the many small products here on one BLAS thread: OpenBLAS threads on (r x out) @ (out x r)
    products cost more than they give, and on a loaded machine (or under the importer's reader threads)
    they made a model's sketch take 0.3-3 s instead of 20 ms."""
    with _blas().limit(limits=1, user_api="blas"):
        yield


@dataclass
class Factors:
    """A LoRA's updates as float64 (B scaled by s, A) per module: float32 factors widen exactly, so the
    Grams' rounding (~1e-16 relative) leaves distances good far below fp16's rounding (~1e-4)."""

    parts: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (s B (out, r), A (r, in'))
    sq_norm: float

    @classmethod
    def of(cls, lora: LoRA | Views, sq_norm: float | None = None) -> Factors:
        """The factors of `lora`; `sq_norm`, when known (stored), saves computing its Grams."""
        parts = {}
        total = 0.0
        for name, l in lora.layers.items():
            B = l.b2d().astype(np.float64) * l.scale
            A = l.a2d().astype(np.float64)
            parts[name] = (B, A)
            if sq_norm is None:
                total += float(np.sum((B.T @ B) * (A @ A.T)))
        return cls(parts, total if sq_norm is None else sq_norm)


def _shape_error(name: str, x: tuple[int, int], y: tuple[int, int]) -> None:
    raise LayoutMismatchError(
        f"module {name}: dW shapes {x} and {y} differ; the two LoRAs are not of one base model family"
    )


def _module_inner(x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray], name: str) -> float:
    (bx, ax), (by, ay) = x, y
    if bx.shape[0] != by.shape[0] or ax.shape[1] != ay.shape[1]:
        _shape_error(name, (bx.shape[0], ax.shape[1]), (by.shape[0], ay.shape[1]))
    return float(np.sum((bx.T @ by) * (ax @ ay.T)))  # (rx, ry) Grams


def inner(x: Factors, y: Factors) -> float:
    """<dW_x, dW_y>_F summed over the modules both have (the others contribute 0)."""
    return sum(_module_inner(x.parts[n], y.parts[n], n) for n in x.parts.keys() & y.parts.keys())


def distance(x: Factors, y: Factors) -> float:
    """||dW_x - dW_y||_F over the union of both LoRAs' modules."""
    return float(np.sqrt(max(x.sq_norm + y.sq_norm - 2.0 * inner(x, y), 0.0)))


def cosine_distance(x: Factors, y: Factors) -> float:
    """1 - cos(dW_x, dW_y)."""
    return 1.0 - inner(x, y) / max(np.sqrt(x.sq_norm * y.sq_norm), 1e-300)


def relative_distance(x: Factors, y: Factors) -> float:
    """||dW_x - dW_y|| / max(||dW_x||, ||dW_y||): 0 for copies, ~1e-4 for an fp16 copy, ~2^-8 for bf16."""
    return distance(x, y) / max(np.sqrt(max(x.sq_norm, y.sq_norm)), 1e-300)


METRICS = {"delta": distance, "delta-cosine": cosine_distance}


@dataclass(eq=False)
class Views:
    """A LoRA's layers as views into its flat vector: no copy and no re-sorting, for the many reads of a search.
    The layers are made when first asked for: LoRAs of one layout are compared from the vectors themselves."""

    vector: np.ndarray
    layout: Layout

    @classmethod
    def of(cls, vector: np.ndarray, layout: Layout) -> Views:
        return cls(vector, layout)

    @cached_property
    def layers(self) -> dict[str, LoRALayer]:
        layers, v = {}, self.vector
        for e, start in zip(self.layout.entries, self.layout.offsets, strict=True):
            mid = start + e.a_size
            layers[e.module] = LoRALayer(
                v[start:mid].reshape(e.a_shape), v[mid : start + e.size].reshape(e.b_shape), e.alpha
            )
        return layers


def inner32(x: LoRA | Views, y: LoRA | Views) -> float:
    """<dW_x, dW_y>_F from float32 Grams of the factors as stored (no copies), summed in float64.

    ~7x faster than `inner` on Factors (no float64 copies); each Gram entry carries float32 rounding,
    ~sqrt(n) 6e-8 relative, so the result is within ~1e-6 of ||dW_x|| ||dW_y||: enough to rank, not to
    measure distances far below the norms (near copies: see `sq_distance`)."""
    return float(inner32_many(x, [y])[0])


def shapes_agree(x: LoRA | Views, y: LoRA | Views) -> bool:
    """Whether every module both LoRAs have has one dW shape in both (else they are not of one family)."""
    if isinstance(x, Views) and isinstance(y, Views) and x.layout.fingerprint == y.layout.fingerprint:
        return True
    for name in x.layers.keys() & y.layers.keys():
        lx, ly = x.layers[name], y.layers[name]
        if lx.B.shape[0] != ly.B.shape[0] or lx.a2d().shape[1] != ly.a2d().shape[1]:
            return False
    return True


def inner32_many(x: LoRA | Views, ys: list[LoRA | Views]) -> np.ndarray:
    """`inner32(x, y)` for every y at once. Views that share a layout (a registry's models of one space) are
    stacked and taken per module in two products over all of them (`_inner32_stacked`); the others per module of
    x, against the factors of every y that has it side by side ((rx, sum r_y) Grams). A module whose shapes
    differ raises LayoutMismatchError (`shapes_agree` tells beforehand)."""
    out = np.zeros(len(ys))
    groups: dict[str, list[int]] = {}
    for j, y in enumerate(ys):
        if isinstance(y, Views):
            groups.setdefault(y.layout.fingerprint, []).append(j)
    rest = set(range(len(ys)))
    for js in groups.values():
        if len(js) > 1:  # one y gains nothing from a stack (a copy): the per-module path takes it with the rest
            out[js] = _inner32_stacked(x, ys[js[0]].layout, np.stack([ys[j].vector for j in js]))
            rest -= set(js)
    if rest:
        js = sorted(rest)
        out[js] = _inner32_by_module(x, [ys[j] for j in js])
    return out


def _inner32_stacked(x: LoRA | Views, layout: Layout, ys: np.ndarray) -> np.ndarray:
    """<dW_x, dW_y> for (n, D) vectors ys of one layout: per module x has, the Grams of all ys as two
    (n r, in) @ (in, rx) and (n r, out) @ (out, rx) products (views of the stack at rank 1: no Python per y)."""
    n = len(ys)
    out = np.zeros(n)
    for e, start in zip(layout.entries, layout.offsets, strict=True):
        lx = x.layers.get(e.module)
        if lx is None:
            continue
        r, mid, end = e.rank, start + e.a_size, start + e.size
        bx, ax = lx.b2d(), lx.a2d()  # (out, rx), (rx, in')
        if bx.shape[0] != e.b_shape[0] or ax.shape[1] * r != e.a_size:
            _shape_error(e.module, (bx.shape[0], ax.shape[1]), (e.b_shape[0], e.a_size // r))
        ay = ys[:, start:mid].reshape(n * r, -1)  # rows (y, i): a copy only at r > 1
        by = ys[:, mid:end].reshape(n, -1, r).transpose(0, 2, 1).reshape(n * r, -1)  # rows (y, i) of B_y^T
        g = (ay @ ax.T) * (by @ bx)  # (n r, rx): [(y, i), j] = <a_yi, a_xj> <b_yi, b_xj>
        out += np.add.reduce(g.reshape(n, -1), axis=1, dtype=np.float64) * (lx.scale * e.alpha / r)
    return out


def _inner32_by_module(x: LoRA | Views, ys: list[LoRA | Views]) -> np.ndarray:
    out = np.zeros(len(ys))
    for name, lx in x.layers.items():
        have = [(j, y.layers[name]) for j, y in enumerate(ys) if name in y.layers]
        bx, ax = lx.b2d(), lx.a2d()
        for _, ly in have:
            if ly.B.shape[0] != bx.shape[0] or ly.a2d().shape[1] != ax.shape[1]:
                _module_inner((bx, ax), (ly.b2d(), ly.a2d()), name)  # raises the shape error
        if len(have) == 1:  # one y: its own factors, no side-by-side copy
            j, ly = have[0]
            g = (bx.T @ ly.b2d()) * (ax @ ly.a2d().T)  # (rx, ry)
            out[j] += float(np.add.reduce(g, axis=None, dtype=np.float64)) * lx.scale * ly.scale
        elif have:
            B = np.concatenate([ly.b2d() for _, ly in have], axis=1)  # (out, sum r_y)
            A = np.concatenate([ly.a2d() for _, ly in have], axis=0)  # (sum r_y, in)
            cols = np.add.reduce((bx.T @ B) * (ax @ A.T), axis=0, dtype=np.float64)  # (sum r_y,)
            per_y = np.add.reduceat(cols, np.cumsum([0] + [ly.rank for _, ly in have[:-1]]))
            out[[j for j, _ in have]] += per_y * lx.scale * np.array([ly.scale for _, ly in have])
    return out


# below this share of ||dW_x||^2 + ||dW_y||^2, a float32 distance is mostly rounding: recompute in float64
CANCELLATION = 1e-3


def metric_from_sq_distance(metric: str, d2: float, x_sq: float, y_sq: float) -> float:
    """`metric` from ||dW_x - dW_y||^2 and both ||dW||^2: 1 - cos = (d2 - (|x| - |y|)^2) / (2 |x| |y|), which
    stays exact for near copies where 1 - <x, y> / (|x| |y|) would be rounding."""
    if metric == "delta":
        return float(np.sqrt(max(d2, 0.0)))
    nx, ny = np.sqrt(x_sq), np.sqrt(y_sq)
    return float((d2 - (nx - ny) ** 2) / max(2.0 * nx * ny, 1e-300))


def sq_distance(x: LoRA | Views, y: LoRA | Views, x_sq: float, y_sq: float) -> float:
    """||dW_x - dW_y||^2 of two LoRAs with known ||dW||^2 (see `sq_distances`)."""
    return float(sq_distances(x, [y], x_sq, [y_sq])[0])


def sq_distances(x: LoRA | Views, ys: list[LoRA | Views], x_sq: float, y_sqs: list[float]) -> np.ndarray:
    """||dW_x - dW_y||^2 for every y, given the ||dW||^2 of all: from float32 Grams side by side (`inner32_many`),
    in float64 from the factors where those would cancel (below CANCELLATION of the norms: near copies)."""
    d2 = x_sq + np.asarray(y_sqs, dtype=np.float64) - 2.0 * inner32_many(x, ys)
    for j in np.flatnonzero(d2 < CANCELLATION * (x_sq + np.asarray(y_sqs))):
        d2[j] = distance(Factors.of(x, x_sq), Factors.of(ys[j], y_sqs[j])) ** 2
    return d2


def search_distance(metric: str, x: LoRA | Views, y: LoRA | Views, x_sq: float, y_sq: float) -> float:
    """`metric` between two LoRAs with known ||dW||^2."""
    return metric_from_sq_distance(metric, sq_distance(x, y, x_sq, y_sq), x_sq, y_sq)


@lru_cache(maxsize=8192)
def _maps(module: str, out: int, inn: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(G_L (side, out), G_R^T (in, side)): standard normal, seeded by the module's name and shape."""
    seed = int.from_bytes(hashlib.sha256(f"{module}|{out}|{inn}|{side}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    gl = rng.standard_normal((side, out), dtype=np.float32)
    gr = rng.standard_normal((inn, side), dtype=np.float32)
    return gl, gr


def sketch(lora: LoRA | Views, side: int = SKETCH_SIDE) -> np.ndarray:
    """(side * side,) float32 sketch of dW whose L2 distances estimate ||dW_x - dW_y||_F (see module doc)."""
    acc = np.zeros((side, side), dtype=np.float64)
    for name, l in lora.layers.items():
        B, A = l.b2d(), l.a2d()
        gl, gr = _maps(name, B.shape[0], A.shape[1], side)
        acc += (gl @ (B * np.float32(l.scale))) @ (A @ gr)  # (side, r) @ (r, side)
    return (acc / side).astype(np.float32).ravel()

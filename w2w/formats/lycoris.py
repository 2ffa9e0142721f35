"""LyCORIS modules (LoCon, LoHa, LoKr) converted exactly into LoRA factors (B, A), scale folded into B.

The math, from LyCORIS (lycoris/modules/loha.py, lokr.py, functional/) as A1111 and ComfyUI apply it:

- LoCon: dW = alpha/r * up @ down; with a CP/Tucker middle (`lora_mid`, (r, r, kh, kw); down and up 1x1)
  dW[o,i,h,w] = alpha/r * sum_ab up[o,a] mid[a,b,h,w] down[b,i]: A = mid x down, rank r.
- LoHa: dW = alpha/r * (w1a @ w1b) * (w2a @ w2b) (elementwise), r = w1b.shape[0]. With Tucker factors
  (`hada_t1/t2`, (r, r, kh, kw); w1a (r, out), w1b (r, in)) each term is einsum("ijhw,jr,ip->prhw", t, wb, wa).
  The Hadamard product of two low-rank matrices is low-rank (face-splitting product):
  (B1 A1) * (B2 A2) = (B1 .row B2) (A1 .col A2), rank r1 r2.
- LoKr: dW = scale * kron(W1, W2), W1 = lokr_w1 or w1_a @ w1_b, W2 = lokr_w2, w2_a @ w2_b or the Tucker rebuild
  of lokr_t2; scale = alpha / r with r the inner dimension of a decomposed factor, and 1 when both are full.
  For a conv, W1 (a, c) is kron'd over (out, in) only, which in the flattened (out, in*kh*kw) form is
  kron(W1, W2 flat). kron(B1 A1, B2 A2) = kron(B1, B2) kron(A1, A2), rank r1 r2.

When the exact rank exceeds min(out, in*kh*kw), the dense update is cheaper: A = dW, B = I (out <= in) or
B = dW, A = I. Either form is exact up to float32 rounding of the products.
"""

from __future__ import annotations

import numpy as np

from w2w.errors import ShapeError, UnknownFormatError

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
LOCON_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
# weight suffixes of methods whose update depends on the base weights or is no matrix update: refused by name
REFUSED = {
    "dora_scale": ("DoRA", "its update rescales the base weights' columns, which a LoRA registry does not hold"),
    "lora_magnitude_vector": ("DoRA", "its update rescales the base weights' columns, which a registry does not hold"),
    "oft_blocks": ("OFT", "its update rotates the base weights, which a LoRA registry does not hold"),
    "oft_diag": ("OFT", "its update rotates the base weights, which a LoRA registry does not hold"),
    "oft_R": ("BOFT", "its update rotates the base weights, which a LoRA registry does not hold"),
    "on_input": ("(IA)3", "its update scales the base weights, which a LoRA registry does not hold"),
    "a1.weight": ("GLoRA", "its update multiplies the base weights, which a LoRA registry does not hold"),
    "w_norm": ("a norm-layer adapter", "only Linear and Conv updates are LoRA-shaped"),
    "b_norm": ("a norm-layer adapter", "only Linear and Conv updates are LoRA-shaped"),
    "diff_b": ("a bias update", "only weight updates are LoRA-shaped"),
    "bias_indices": ("a bias update", "only weight updates are LoRA-shaped"),
}


def refusal(key: str, path: object) -> UnknownFormatError | None:
    """The error for a key of a method w2wreg cannot hold (DoRA, OFT, ...), or None."""
    dotted = f".{key}."
    for name, (method, why) in REFUSED.items():
        if f".{name}." in dotted:
            return UnknownFormatError(path, f"is a {method} file (key {key!r}): {why}", "not supported")
    return None


def refuse_methods(keys, path: object) -> None:
    """Raise the refusal of the first key of a method w2wreg cannot hold."""
    for key in keys:
        err = refusal(key, path)
        if err is not None:
            raise err


def kind_of(suffixes: set[str]) -> str:
    if suffixes & set(LOHA_KEYS):
        return "loha"
    if suffixes & set(LOKR_KEYS):
        return "lokr"
    return "lora"


def to_lora(
    parts: dict[str, np.ndarray], alpha: float | None, kernel: tuple[int, int] | None, module: str, path: object
) -> tuple:
    """(A, B, alpha) of one module's LyCORIS tensors (suffix -> float32 array), exactly.

    `kernel` is the module's conv kernel when it is a conv (LoHa and LoKr store conv factors flattened to
    (r, in*kh*kw), which does not say kh and kw), None for a Linear."""
    try:
        if "hada_w1_a" in parts:
            return _loha(parts, alpha, kernel)
        if any(k.startswith("lokr_") for k in parts):
            return _lokr(parts, alpha, kernel)
        return _locon(parts, alpha)
    except (KeyError, ValueError) as e:
        raise ShapeError(path, f"{module}: LyCORIS factors {sorted(parts)} do not fit together ({e})") from None


def _tucker(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B (out, r), A (r, in, kh, kw)) of einsum("ijhw,ip,jr->prhw", t, wa, wb): wa (r, out), wb (r', in)."""
    A = np.einsum("ijhw,jr->irhw", t, wb)  # (r, in, kh, kw)
    return np.ascontiguousarray(wa.T), A


def _locon(parts: dict[str, np.ndarray], alpha: float | None) -> tuple:
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    r = down.shape[0]
    if "lora_mid.weight" in parts:
        mid = parts["lora_mid.weight"]  # (r, r, kh, kw); down (r, in, 1, 1), up (out, r, 1, 1)
        down = np.einsum("abhw,bi->aihw", mid, down.reshape(r, -1))  # (r, in, kh, kw)
    return down, up, float(alpha if alpha is not None else r)


def _loha(parts: dict[str, np.ndarray], alpha: float | None, kernel) -> tuple:
    w1a, w1b, w2a, w2b = (parts[k] for k in LOHA_KEYS[:4])
    r = w1b.shape[0]
    if "hada_t1" in parts:
        B1, A1 = _tucker(parts["hada_t1"], w1a, w1b)
        B2, A2 = _tucker(parts["hada_t2"], w2a, w2b)
        conv_shape = A1.shape[1:]
    else:
        B1, A1, B2, A2 = w1a.reshape(w1a.shape[0], -1), w1b, w2a.reshape(w2a.shape[0], -1), w2b
        conv_shape = _conv_shape(A1.shape[1], kernel)
    scale = (alpha if alpha is not None else r) / r
    A1f, A2f = A1.reshape(A1.shape[0], -1), A2.reshape(A2.shape[0], -1)  # (r1, in'), (r2, in')
    if A1f.shape[1] != A2f.shape[1] or B1.shape[0] != B2.shape[0]:
        raise ValueError(f"w1 {B1.shape[0]}x{A1f.shape[1]} and w2 {B2.shape[0]}x{A2f.shape[1]} differ")
    out, cols, rank = B1.shape[0], A1f.shape[1], A1f.shape[0] * A2f.shape[0]
    if rank > min(out, cols):
        dense = scale * ((B1 @ A1f) * (B2 @ A2f))  # (out, in')
        return _dense(dense, conv_shape)
    B = (B1[:, :, None] * B2[:, None, :]).reshape(out, rank) * scale  # face-splitting: row-wise Kronecker
    A = (A1f[:, None, :] * A2f[None, :, :]).reshape(rank, cols)  # column-wise Kronecker (Khatri-Rao)
    return _shaped(A, B, conv_shape)


def _factor(full, a, b) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(B, A, inner rank or None) of one LoKr factor: a full matrix is B = I or A = I, whichever is smaller."""
    if full is not None:
        m = full.reshape(full.shape[0], -1)
        if m.shape[0] <= m.shape[1]:
            return np.eye(m.shape[0], dtype=np.float32), m, None
        return m, np.eye(m.shape[1], dtype=np.float32), None
    return a, b.reshape(b.shape[0], -1), b.shape[0]


def _lokr(parts: dict[str, np.ndarray], alpha: float | None, kernel) -> tuple:
    if "lokr_t1" in parts:  # LyCORIS lists it but never builds it: a file with one is no LoKr we know
        raise ValueError("a Tucker w1 (lokr_t1) is not supported")
    g = parts.get
    B1, A1, r1 = _factor(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"))
    if "lokr_t2" in parts:
        B2, A2 = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        r2, kernel = parts["lokr_w2_b"].shape[0], tuple(A2.shape[2:])
        A2 = A2.reshape(A2.shape[0], -1)
    else:
        w2 = g("lokr_w2")
        if w2 is not None and w2.ndim == 4:
            kernel = tuple(w2.shape[2:])
        B2, A2, r2 = _factor(w2, g("lokr_w2_a"), g("lokr_w2_b"))
    r = r2 if r2 is not None else r1  # the decomposed factor's inner dimension, as ComfyUI and LyCORIS take it
    scale = 1.0 if r is None else (alpha if alpha is not None else r) / r
    out, rank = B1.shape[0] * B2.shape[0], A1.shape[0] * A2.shape[0]
    cols = A1.shape[1] * A2.shape[1]  # c * (d kh kw): column j1 (d kh kw) + j2' is channel j1 d + j2, tap j2'
    conv_shape = _conv_shape(cols, kernel)
    if rank > min(out, cols):
        return _dense(scale * np.kron(B1 @ A1, B2 @ A2), conv_shape)  # (out, c d kh kw)
    return _shaped(np.kron(A1, A2), np.kron(B1, B2) * scale, conv_shape)  # (r1 r2, c d kh kw), (a b, r1 r2)


def _conv_shape(cols: int, kernel) -> tuple[int, int, int] | None:
    """(in, kh, kw) of a conv whose factors are flattened to `cols` columns; None for a Linear."""
    if kernel is None:
        return None
    taps = int(np.prod(kernel))
    if cols % taps:
        raise ValueError(f"{cols} columns are no whole number of {kernel[0]}x{kernel[1]} kernels")
    return (cols // taps, *kernel)


def _dense(dense: np.ndarray, conv_shape) -> tuple:
    """The exact factors of a dense update (out, in'): the identity on the smaller side."""
    out, cols = dense.shape
    if out <= cols:
        return _shaped(dense, np.eye(out, dtype=np.float32), conv_shape)
    return _shaped(np.eye(cols, dtype=np.float32), dense, conv_shape)


def _shaped(A: np.ndarray, B: np.ndarray, conv_shape) -> tuple:
    """(A, B, alpha = rank): A as (r, in, kh, kw) for a conv, B as (out, r, 1, 1); the scale lives in B."""
    r = A.shape[0]
    A, B = A.astype(np.float32), B.astype(np.float32)
    if conv_shape is not None and len(conv_shape) == 3:
        A = A.reshape(r, *conv_shape)
        B = B.reshape(B.shape[0], r, 1, 1)
    return A, B, float(r)

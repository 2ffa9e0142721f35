"""LoRAs with real SD 1.5 / SD 2.x / SDXL UNet module names and shapes, built in code (a few modules each).

`lora_on(modules, rank, alpha, seed)` draws factors; `spectrum` sets the singular values of each module's
dW (B A = U diag(spectrum) V^T), so a rank-r resize of it has a known error.
"""

from __future__ import annotations

import numpy as np

from w2w.lora import LoRA, LoRALayer

# module -> (out, in, conv): SD 1.5 (cross-attention input 768, proj_in/out 1x1 convs at 320..1280 channels)
SD15 = {
    "down_blocks.0.attentions.0.proj_in": (320, 320, True),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320, False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768, False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (320, 768, False),
    "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2": (640, 2560, False),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (1280, 1280, False),
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_q": (320, 320, False),
}
SD2_CROSS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 1024, False)}
SD2_PROJ = {
    "down_blocks.0.attentions.0.proj_in": (320, 320, False),  # a Linear in SD 2.x
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320, False),
}
SDXL_CROSS = {"down_blocks.2.attentions.0.transformer_blocks.5.attn2.to_v": (1280, 2048, False)}
SDXL_BLOCKS = {"down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q": (1280, 1280, False)}
MID_ONLY = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280, False)}  # no family clue


def lora_on(
    modules: dict[str, tuple[int, int, bool]],
    rank: int,
    alpha: float,
    seed: int,
    spectrum: np.ndarray | None = None,
    base_model: str | None = None,
) -> LoRA:
    rng = np.random.default_rng(seed)
    layers = {}
    for name, (out, inn, conv) in modules.items():
        if spectrum is None:
            B = rng.standard_normal((out, rank)) / np.sqrt(out)
            A = rng.standard_normal((rank, inn)) / np.sqrt(inn)
        else:
            U = np.linalg.qr(rng.standard_normal((out, rank)))[0]
            V = np.linalg.qr(rng.standard_normal((inn, rank)))[0]
            B, A = U * spectrum[:rank], V.T
        B = B * (rank / alpha)  # dW = (alpha / rank) B A: the drawn update, whatever the alpha
        A, B = A.astype(np.float32), B.astype(np.float32)
        if conv:
            A, B = A.reshape(rank, inn, 1, 1), B.reshape(out, rank, 1, 1)
        layers[name] = LoRALayer(A, B, float(alpha))
    return LoRA(layers, base_model)


def dense(lora: LoRA) -> dict[str, np.ndarray]:
    """Every module's dW as a dense float64 matrix: the independent check of the factor math."""
    return {
        n: (l.alpha / l.rank) * (l.B.reshape(l.B.shape[0], -1).astype(np.float64) @ l.a2d().astype(np.float64))
        for n, l in lora.layers.items()
    }


def dense_distance(x: LoRA, y: LoRA) -> float:
    dx, dy = dense(x), dense(y)
    total = 0.0
    for n in dx.keys() | dy.keys():
        a = dx.get(n, 0.0)
        b = dy.get(n, 0.0)
        total += float(np.sum((a - b) ** 2))
    return float(np.sqrt(total))


def resize(lora: LoRA, rank: int) -> LoRA:
    """kohya resize_lora's result: each module's best rank-`rank` approximation (dense SVD, tiny shapes only)."""
    layers = {}
    for n, d in dense(lora).items():
        l = lora.layers[n]
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        B = (u[:, :rank] * s[:rank]).astype(np.float32)
        A = vt[:rank].astype(np.float32)
        if l.A.ndim == 4:
            A, B = A.reshape(rank, -1, 1, 1), B.reshape(-1, rank, 1, 1)
        layers[n] = LoRALayer(A, B, float(rank))
    return LoRA(layers, lora.base_model)


def rounded(lora: LoRA, dtype) -> LoRA:
    """The LoRA as a file in `dtype` holds it: every factor rounded to that float."""
    import torch

    def r(x: np.ndarray) -> np.ndarray:
        return torch.from_numpy(x).to(dtype).to(torch.float32).numpy()

    return LoRA({n: LoRALayer(r(l.A), r(l.B), l.alpha) for n, l in lora.layers.items()}, lora.base_model)

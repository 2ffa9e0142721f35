"""Inversion: one image into a model inside the w2w space (the paper's third application).

The model is w(c) = mean + std * (V[:, :K] c): only the first K subspace coefficients are free, so the
result stays in the span of the space. c is fitted with Adam on the diffusion loss of the image (MSE on
the noise at random timesteps, the identity prompt), optionally weighted by a mask, exactly as the paper;
the LoRA factors are a differentiable function of c, applied to the frozen base UNet.

Beyond the paper: `batch_timesteps` (several timesteps and noises of the image per step: a less noisy
gradient for the same number of steps) and `init="nearest"` (start from the registered model whose
coefficients are nearest to a short first-pass estimate, among the few that best denoise the image).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ingest.basemodel import BaseModel
from ingest.trainer import _Swap
from w2w.errors import W2WError
from w2w.layout import Layout


class InversionError(W2WError):
    """An inversion that cannot run: bad image or mask, no subspace, K too large."""


@dataclass(frozen=True)
class InvertConfig:
    components: int = 1000
    steps: int = 400
    lr: float = 0.1
    batch_timesteps: int = 1
    init: str = "mean"  # mean | nearest
    seed: int = 0
    prompt: str = "sks person"
    first_pass_steps: int = 50  # init="nearest": steps of the estimate the start is chosen from
    shortlist: int = 8  # init="nearest": candidates nearest to the estimate, ranked by their loss

    def describe(self) -> dict:
        return asdict(self)


class SubspaceLoRALinear(torch.nn.Module):
    """A frozen Linear plus a LoRA whose factors are read, each forward, from a shared differentiable dict."""

    def __init__(self, base: torch.nn.Linear, name: str, factors: dict, scale: float):
        super().__init__()
        self.base, self.name, self.factors, self.scale = base, name, factors, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors[self.name]
        return self.base(x) + (x.to(A.dtype) @ A.T @ B.T * self.scale).to(x.dtype)


def read_image(path: Path, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]; a clear error for anything Pillow cannot decode."""
    from ingest.dataset import load_images

    try:
        arr = load_images([Path(path)], size)
    except W2WError as e:
        raise InversionError(str(e)) from None
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def read_mask(path: Path, size: int) -> torch.Tensor:
    """(1, 1, size, size) in [0, 1]: any image file, as grey levels, resized to the latent size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError) as e:
        raise InversionError(f"{path}: is not a readable mask image ({e}); pass a PNG/JPEG, white = keep") from None
    m = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
    if float(m.max()) == 0.0:
        raise InversionError(f"{path}: the mask is black everywhere (nothing to fit); white marks what to fit")
    return m


class Inverter:
    """The frozen base UNet wearing a LoRA that is a function of K subspace coefficients."""

    def __init__(self, base: BaseModel, layout: Layout, mean: np.ndarray, std: np.ndarray, V: np.ndarray):
        self.base, self.layout = base, layout
        dev = base.device
        self.mean = torch.from_numpy(np.asarray(mean, np.float32)).to(dev)
        self.std = torch.from_numpy(np.asarray(std, np.float32)).to(dev)
        V = np.ascontiguousarray(V, np.float32)  # (D, K); a subspace's components are a read-only file map
        if V.flags.writeable or torch.device(dev).type != "cpu":
            with warnings.catch_warnings():  # read-only: .to(a GPU) copies it, nothing writes to it
                warnings.simplefilter("ignore", UserWarning)
                self.V = torch.from_numpy(V).to(dev)
        else:
            self.V = torch.tensor(V)  # on the CPU its own copy: a write to read-only memory would crash the process
        self.factors: dict = {}
        unet = base.unet
        self.layers = {
            e.module: SubspaceLoRALinear(unet.get_submodule(e.module), e.module, self.factors, e.alpha / e.a_shape[0])
            for e in layout.entries
        }

    def vector(self, c: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * (self.V @ c)

    def set(self, c: torch.Tensor) -> None:
        w = self.vector(c)
        for e, start in zip(self.layout.entries, self.layout.offsets, strict=True):
            mid = start + e.a_size
            self.factors[e.module] = (
                w[start:mid].reshape(e.a_shape[0], -1),
                w[mid : start + e.size].reshape(e.b_shape[0], -1),
            )

    def loss(self, c, latents, enc, t, noise, mask) -> torch.Tensor:
        """Mean over the batch of the (masked) noise-prediction MSE, the UNet wearing w(c)."""
        self.set(c)
        noisy = self.base.pipe.scheduler.add_noise(latents.expand(len(t), -1, -1, -1), noise, t)
        pred = self.base.unet(noisy, t, enc.expand(len(t), -1, -1)).sample
        err = F.mse_loss(pred.float(), noise.float(), reduction="none")
        if mask is None:
            return err.mean()
        return (err * mask).sum() / (mask.sum() * err.shape[1] * len(t))


def invert(
    base: BaseModel,
    layout: Layout,
    mean: np.ndarray,
    std: np.ndarray,
    V: np.ndarray,
    image: torch.Tensor,
    config: InvertConfig,
    mask: torch.Tensor | None = None,
    c0: np.ndarray | None = None,
    on_step: Callable[[int, float], None] | None = None,
    eval_draws: tuple | None = None,
    eval_every: int = 10,
    trace: list | None = None,
    inv: Inverter | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Coefficients (K,) fitted to the image, and the training loss per step.

    With `eval_draws` (see `eval_draws()`), the loss on those fixed timesteps and noises is appended to
    `trace` as (steps done, loss) every `eval_every` steps: the figure to compare runs by. `inv`, when given,
    is an Inverter already built for (base, layout, mean, std, V): one per inversion, not one per pass.
    """
    inv = inv or Inverter(base, layout, mean, std, V)
    K = V.shape[1]
    c = torch.zeros(K) if c0 is None else torch.as_tensor(c0, dtype=torch.float32).clone()
    c = c.to(base.device)
    c.requires_grad_(True)
    opt = torch.optim.Adam([c], lr=config.lr)
    latents = base.encode_images(image)
    enc = base.encode_prompt([config.prompt])
    m = None if mask is None else F.interpolate(mask, size=latents.shape[-2:], mode="bilinear").to(latents.device)
    g = torch.Generator().manual_seed(config.seed)
    T = base.pipe.scheduler.config.num_train_timesteps
    losses = []
    with _Swap(base.unet, inv.layers):
        for step in range(config.steps):
            b = config.batch_timesteps
            t = torch.randint(0, T, (b,), generator=g).to(base.device)
            noise = torch.randn((b, *latents.shape[1:]), generator=g).to(base.device, latents.dtype)
            loss = inv.loss(c, latents, enc, t, noise, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if eval_draws is not None and trace is not None and ((step + 1) % eval_every == 0 or step == 0):
                with torch.no_grad():
                    trace.append((step + 1, float(inv.loss(c, latents, enc, *eval_draws, m))))
            if on_step:
                on_step(step, losses[-1])
    return c.detach().cpu().numpy().astype(np.float32), losses


def eval_draws(base: BaseModel, n: int = 32, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of (timesteps, noises) to compare losses across runs on equal terms."""
    g = torch.Generator().manual_seed(seed)
    T = base.pipe.scheduler.config.num_train_timesteps
    h = base.unet.config.sample_size
    t = torch.linspace(0, T - 1, n).round().long()
    noise = torch.randn((n, base.unet.config.in_channels, h, h), generator=g)
    return t.to(base.device), noise.to(base.device, base.dtype)  # a bf16 UNet takes bf16 noisy latents


@torch.no_grad()
def shortlist_by_loss(
    base: BaseModel, layout: Layout, mean, std, V, image, config: InvertConfig, candidates: np.ndarray, inv=None
) -> int:
    """Index of the candidate coefficient row (n, K) whose model best denoises the image on fixed draws."""
    inv = inv or Inverter(base, layout, mean, std, V)
    latents = base.encode_images(image)
    enc = base.encode_prompt([config.prompt])
    t, noise = eval_draws(base, 8, seed=config.seed)
    with _Swap(base.unet, inv.layers):
        scores = [
            float(inv.loss(torch.from_numpy(c).to(base.device), latents, enc, t, noise, None)) for c in candidates
        ]
    return int(np.argmin(scores))


def image_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def invert_into_registry(
    reg,
    image_path: Path,
    config: InvertConfig,
    *,
    mask_path: Path | None = None,
    name: str | None = None,
    base_model: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    space_id: str | None = None,
    progress: bool = True,
) -> dict:
    """Invert an image in a fitted space and register the result as a derived model (nothing on error)."""
    from tqdm.auto import tqdm

    from ingest.basemodel import load_base
    from registry import wspace
    from registry.registry import validate_name

    image_path = Path(image_path)
    if name is not None:
        validate_name(name)
    space_id = wspace.pick_space(reg, space_id)
    sm = wspace.current(reg, space_id)
    if sm is None:
        raise InversionError(f"space {space_id} has no fitted subspace; run `w2wreg fit` first")
    K = config.components
    if not 1 <= K <= sm.sub.k:
        raise InversionError(f"--components {K} is outside 1..{sm.sub.k}, the size of subspace {sm.id}")
    if config.init not in ("mean", "nearest"):
        raise InversionError(f"--init must be mean or nearest, not {config.init!r}")
    space = reg.space(space_id)
    base = load_base(base_model if base_model is not None else _base_of(space.base_model), device, dtype)
    image = read_image(image_path, base.resolution)
    mask = read_mask(mask_path, base.resolution) if mask_path else None
    layout = reg.layout(space_id)
    V = sm.sub.components[:, :K]
    t0 = time.perf_counter()
    inv = Inverter(base, layout, sm.sub.mean, sm.sub.std, V)
    c0, start = None, "mean"
    if config.init == "nearest":
        c0, start = nearest_start(reg, sm, base, layout, image, config, mask, inv)
    bar = tqdm(total=config.steps, desc="inverting", unit="step", disable=not progress)

    def tick(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        c, losses = invert(base, layout, sm.sub.mean, sm.sub.std, V, image, config, mask, c0, tick, inv=inv)
    finally:
        bar.close()
    w = sm.sub.mean + sm.sub.std * (V @ c)
    params = {
        "subspace": sm.id,
        "image": image_path.name,
        "image_sha256": image_sha256(image_path),
        "mask_sha256": image_sha256(mask_path) if mask_path else None,
        "start": start,
        "final_loss": losses[-1],
        **config.describe(),
    }
    new_name = name or f"inverted-{params['image_sha256'][:8]}"
    (new_id,) = wspace.register_derived(
        reg, space_id, [(new_name, w.astype(np.float32), "inverted", [(None, "invert", params)])]
    )
    return {
        "id": new_id,
        "name": new_name,
        "subspace": sm.id,
        "components": K,
        "start": start,
        "loss_first": losses[0],
        "loss_final": losses[-1],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def nearest_start(reg, sm, base: BaseModel, layout: Layout, image, config: InvertConfig, mask=None, inv=None):
    """(coefficients, model name) to start from: a short first pass from the mean gives an estimate; of
    the registered models nearest to it (the coefficient index's query), the one that best denoises the image."""
    from registry import wspace

    K = config.components
    V = sm.sub.components[:, :K]
    inv = inv or Inverter(base, layout, sm.sub.mean, sm.sub.std, V)
    first = InvertConfig(**{**config.describe(), "steps": config.first_pass_steps, "init": "mean"})
    est, _ = invert(base, layout, sm.sub.mean, sm.sub.std, V, image, first, mask, inv=inv)
    cands = _nearest_models(reg, sm, est, config.shortlist)
    C = wspace.coefficients(reg, sm, cands)[:, :K].astype(np.float32)
    best = shortlist_by_loss(base, layout, sm.sub.mean, sm.sub.std, V, image, config, C, inv=inv)
    return C[best], reg.get(int(cands[best])).name


def _nearest_models(reg, sm, c_est: np.ndarray, n: int) -> np.ndarray:
    """Ids of the n registered models nearest (in weight space, the subspace part) to the model whose first
    K coefficients are the estimate and the rest the mean's: a query of the coefficient index, as search
    does; a registry without an index (an interrupted fit) compares every model's coefficients."""
    from registry import wspace

    c = np.zeros(sm.sub.k, dtype=np.float32)
    c[: len(c_est)] = c_est
    index = wspace.load_index(sm, reg._cache)
    if index is not None:
        return wspace.candidates(reg, sm, index, sm.index_coords(c), n, None, None)
    ids = np.array([m.id for m in reg.ls() if m.space_id == sm.space_id], dtype=np.int64)
    Y = sm.index_coords(wspace.coefficients(reg, sm, ids))
    d = ((Y - sm.index_coords(c)[None]) ** 2).sum(1)
    return ids[np.argsort(d)[:n]]


def _base_of(recorded: str | None) -> str | None:
    """The base model to load for a space: the embedded toy model when the space says so."""
    from ingest.basemodel import TOY_BASE_ID

    return None if recorded in (None, TOY_BASE_ID) else recorded

"""DreamBooth-LoRA training of identity models, one at a time (PEFT) or B at a time (batched LoRA layers).

One identity alone goes through PEFT exactly as diffusers' DreamBooth-LoRA script does
(`unet.add_adapter(LoraConfig(...))`). B identities at once share the frozen base model's forward: each
target Linear becomes a `BatchedLoRALinear` holding B sets of factors, and sample j of the batch goes
through the factors of the identity it belongs to. Every identity draws its images, timesteps and noise
from its own generator seeded alike, its loss is its own mean, its gradient is clipped by its own norm and
AdamW is elementwise: so a batch of B gives the LoRAs that B separate runs give (tests/test_trainer.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ingest.basemodel import BaseModel
from w2w.errors import W2WError
from w2w.lora import LoRA, LoRALayer


@dataclass(frozen=True)
class Recipe:
    """How one identity's LoRA is trained."""

    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]  # module-path suffixes, as in w2w.presets
    steps: int
    lr: float
    batch_size: int  # instance images per identity per step
    resolution: int | None  # None: the base model's native size
    random_crop: bool
    grad_clip: float
    seed: int  # one seed for every identity: all start from the same LoRA and see the same noise
    instance_prompt: str = "sks person"
    class_prompt: str = "person"
    prior_weight: float = 0.0  # prior preservation: 0 turns it off
    class_images: int = 0  # generated once by the base model and cached
    weight_decay: float = 1e-2
    train_a: bool = True  # False: A stays at the shared initialisation and only B learns (LoRA-FA)
    frame: str = "factors"  # how the trained LoRA is registered: "factors" as trained, "shared" (A = I, B = dW)

    def registered(self, lora: LoRA) -> LoRA:
        """The trained LoRA as it is registered: as trained, or in the shared frame (w2w.factor_mix.shared_frame)."""
        from w2w.factor_mix import shared_frame

        return shared_frame(lora) if self.frame == "shared" else lora

    def describe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


W2W_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")
RECIPES: dict[str, Recipe] = {
    # The paper's recipe for a real SD 1.5 base (w2w-method.md): meant for a GPU.
    "w2w": Recipe(
        "w2w",
        rank=1,
        alpha=27.0,
        targets=W2W_TARGETS,
        steps=800,
        lr=1e-4,
        batch_size=1,
        resolution=512,
        random_crop=True,
        grad_clip=1.0,
        seed=0,
        prior_weight=1.0,
        class_images=100,
    ),
    # The embedded toy-faces base: same targets and rank, fewer steps and a larger rate (its faces are
    # 32 px and the LoRA is tiny), no prior preservation (its class drift costs nothing in the toy world).
    # Registered in the shared frame: at this rate A moves 1-5x its initial norm, so the flattened factors
    # are no linear frame for means, draws and edits (README, "Why edits and samples failed in the toy world").
    "toy": Recipe(
        "toy",
        rank=1,
        alpha=1.0,
        targets=W2W_TARGETS,
        steps=150,
        lr=3e-2,
        batch_size=4,
        resolution=None,
        random_crop=False,
        grad_clip=1.0,
        seed=0,
        frame="shared",
    ),
}


class TrainingError(W2WError):
    """Training could not run (bad recipe, no target modules, images that do not fit)."""


FRAMES = ("factors", "shared")


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise TrainingError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    if overrides.get("frame") not in (None, *FRAMES):
        raise TrainingError(f"unknown frame {overrides['frame']!r}; known: {', '.join(FRAMES)}")
    r = RECIPES[name]
    return replace(r, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Identity:
    """What the trainer needs of one identity: a name and its images (n, 3, H, W) in [-1, 1]."""

    name: str
    images: torch.Tensor


@dataclass
class TrainResult:
    name: str
    lora: LoRA
    losses: list[float]  # per step
    seconds: float


# --- images ----------------------------------------------------------------------------------------


def to_tensor(images: np.ndarray | Sequence[np.ndarray], resolution: int) -> torch.Tensor:
    """uint8 (n, H, W, 3) images -> float (n, 3, h, w) in [-1, 1], resized so the shorter side is `resolution`."""
    out = []
    for im in images:
        t = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        h, w = t.shape[1:]
        if min(h, w) != resolution:
            s = resolution / min(h, w)
            size = (max(resolution, round(h * s)), max(resolution, round(w * s)))
            t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(t)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:  # mixed aspect ratios: centre-crop each to a square (random crops need one shape)
        out = [_crop(t, resolution, (t.shape[1] - resolution) // 2, (t.shape[2] - resolution) // 2) for t in out]
    return torch.stack(out)


def _crop(t: torch.Tensor, res: int, top: int, left: int) -> torch.Tensor:
    return t[..., top : top + res, left : left + res]


def _draw(ident: Identity, recipe: Recipe, res: int, g: torch.Generator) -> torch.Tensor:
    """This step's instance images for one identity: random picks, then a random or centre crop."""
    idx = torch.randint(len(ident.images), (recipe.batch_size,), generator=g)
    imgs = ident.images[idx]
    h, w = imgs.shape[-2:]
    if recipe.random_crop:
        top = int(torch.randint(h - res + 1, (1,), generator=g))
        left = int(torch.randint(w - res + 1, (1,), generator=g))
    else:
        top, left = (h - res) // 2, (w - res) // 2
    return _crop(imgs, res, top, left)


# --- LoRA layers -----------------------------------------------------------------------------------


def target_modules(unet: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    names = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    ]
    if not names:
        raise TrainingError(f"the base model's UNet has no Linear module matching {', '.join(targets)}")
    return names


def initial_factors(unet: torch.nn.Module, names: Sequence[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A for every module, as PEFT initialises it (Kaiming uniform, a = sqrt(5)), from one seed; B is zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        fan_in = unet.get_submodule(n).in_features
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
        out[n] = (torch.rand(rank, fan_in, generator=g) * 2 - 1) * bound
    return out


class BatchedLoRALinear(torch.nn.Module):
    """A frozen Linear plus n independent rank-r LoRAs; the batch is n equal groups, group i uses LoRA i."""

    def __init__(self, base: torch.nn.Linear, n: int, A0: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(A0.expand(n, *A0.shape).clone())
        self.B = torch.nn.Parameter(torch.zeros(n, base.out_features, A0.shape[0], device=A0.device))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        n = self.A.shape[0]
        xs = x.to(self.A.dtype).reshape(n, -1, x.shape[-1])  # (n, group * tokens, in)
        d = torch.bmm(torch.bmm(xs, self.A.transpose(1, 2)), self.B.transpose(1, 2))
        return y + (d * self.scale).reshape(y.shape).to(y.dtype)


class _Swap:
    """Puts BatchedLoRALinear layers into the UNet for the duration of a `with`, then the originals back."""

    def __init__(self, unet: torch.nn.Module, layers: dict[str, BatchedLoRALinear]):
        self.unet, self.layers = unet, layers

    def __enter__(self):
        for n, layer in self.layers.items():
            parent, _, attr = n.rpartition(".")
            setattr(self.unet.get_submodule(parent), attr, layer)
        return self

    def __exit__(self, *exc):
        for n, layer in self.layers.items():
            parent, _, attr = n.rpartition(".")
            setattr(self.unet.get_submodule(parent), attr, layer.base)


# --- the loop --------------------------------------------------------------------------------------


def _target(base: BaseModel, latents, noise, t):
    kind = base.pipe.scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return base.pipe.scheduler.get_velocity(latents, noise, t)
    raise TrainingError(f"prediction type {kind!r} of this base model's scheduler is not supported")


def _samples(base: BaseModel, ident: Identity, recipe: Recipe, res: int, g: torch.Generator, class_latents):
    """One identity's (noisy latents, timesteps, targets, prompt slots) for this step, in draw order."""
    sched = base.pipe.scheduler
    x0 = base.encode_images(_draw(ident, recipe, res, g))
    groups = [x0]
    if recipe.prior_weight:
        groups.append(class_latents[torch.randint(len(class_latents), (recipe.batch_size,), generator=g)])
    lat = torch.cat(groups)
    noise = torch.randn(lat.shape, generator=g).to(lat.device, lat.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(lat),), generator=g).to(lat.device)
    return sched.add_noise(lat, noise, t), t, _target(base, lat, noise, t)


def _loss(pred: torch.Tensor, target: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """An identity's loss: MSE on its instance samples, plus prior_weight times MSE on its class samples."""
    b = recipe.batch_size
    loss = F.mse_loss(pred[:b].float(), target[:b].float())
    if recipe.prior_weight:
        loss = loss + recipe.prior_weight * F.mse_loss(pred[b:].float(), target[b:].float())
    return loss


def _prompts(base: BaseModel, recipe: Recipe) -> torch.Tensor:
    """Prompt embeddings for one identity's group: instance rows, then class rows."""
    emb = base.encode_prompt([recipe.instance_prompt, recipe.class_prompt])
    rows = [emb[0:1].expand(recipe.batch_size, -1, -1)]
    if recipe.prior_weight:
        rows.append(emb[1:2].expand(recipe.batch_size, -1, -1))
    return torch.cat(rows)


def train_batch(
    base: BaseModel,
    identities: Sequence[Identity],
    recipe: Recipe,
    class_latents: torch.Tensor | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[TrainResult]:
    """Train one LoRA per identity, all in one loop (B = len(identities)); B = 1 goes through PEFT."""
    if recipe.prior_weight and class_latents is None:
        raise TrainingError("prior preservation needs class images (see ingest.trainer.class_latents)")
    if len(identities) == 1:
        return [_train_peft(base, identities[0], recipe, class_latents, on_step)]
    return _train_batched(base, identities, recipe, class_latents, on_step)


def _optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999), weight_decay=recipe.weight_decay, eps=1e-8)


def _train_batched(base, identities, recipe, class_latents, on_step) -> list[TrainResult]:
    unet, n, res = base.unet, len(identities), recipe.resolution or base.resolution
    names = target_modules(unet, recipe.targets)
    A0 = initial_factors(unet, names, recipe.rank, recipe.seed)
    layers = {
        m: BatchedLoRALinear(unet.get_submodule(m), n, A0[m].to(base.device), recipe.alpha / recipe.rank) for m in names
    }
    params = [p for layer in layers.values() for p in ((layer.A, layer.B) if recipe.train_a else (layer.B,))]
    if not recipe.train_a:
        for layer in layers.values():
            layer.A.requires_grad_(False)
    opt = _optimizer(params, recipe)
    gens = [torch.Generator().manual_seed(recipe.seed) for _ in identities]
    enc = _prompts(base, recipe).repeat(n, 1, 1)
    losses: list[list[float]] = [[] for _ in identities]
    t0 = time.perf_counter()
    with _Swap(unet, layers):
        for step in range(recipe.steps):
            parts = [
                _samples(base, ident, recipe, res, g, class_latents) for ident, g in zip(identities, gens, strict=True)
            ]
            noisy, t, target = (torch.cat(x) for x in zip(*parts, strict=True))
            pred = unet(noisy, t, enc).sample
            per = [_loss(p, q, recipe) for p, q in zip(pred.chunk(n), target.chunk(n), strict=True)]
            opt.zero_grad(set_to_none=True)
            torch.stack(per).sum().backward()  # identity i's gradient is that of its own loss
            _clip_per_identity(params, recipe.grad_clip)
            opt.step()
            step_losses = [float(v.detach()) for v in per]
            for i, v in enumerate(step_losses):
                losses[i].append(v)
            if on_step:
                on_step(step, step_losses)
    seconds = (time.perf_counter() - t0) / n
    out = []
    for i, ident in enumerate(identities):
        lora = LoRA(
            {m: LoRALayer(_np(layers[m].A[i]), _np(layers[m].B[i]), float(recipe.alpha)) for m in names},
            base_model=base.ref,
        )
        out.append(TrainResult(ident.name, lora, losses[i], seconds))
    return out


@torch.no_grad()
def _clip_per_identity(params: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_'s rule, applied to each identity's slice (dim 0) on its own."""
    sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *[1] * (p.grad.dim() - 1)).to(p.grad.dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32, copy=True)


def _train_peft(base, ident, recipe, class_latents, on_step) -> TrainResult:
    from peft import LoraConfig

    unet, res = base.unet, recipe.resolution or base.resolution
    names = target_modules(unet, recipe.targets)
    A0 = initial_factors(unet, names, recipe.rank, recipe.seed)
    adapter = "w2wreg_training"
    unet.add_adapter(
        LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=names, init_lora_weights=True),
        adapter_name=adapter,
    )
    try:
        with torch.no_grad():
            for m in names:
                mod = unet.get_submodule(m)
                mod.lora_A[adapter].weight.copy_(A0[m])
                mod.lora_B[adapter].weight.zero_()
        params = [p for n, p in unet.named_parameters() if adapter in n]
        for p in params:
            p.data = p.data.float()  # LoRA factors train in float32 whatever the base's dtype
        if not recipe.train_a:
            params = [p for n, p in unet.named_parameters() if adapter in n and "lora_B" in n]
        for p in params:
            p.requires_grad_(True)
        opt = _optimizer(params, recipe)
        g = torch.Generator().manual_seed(recipe.seed)
        enc = _prompts(base, recipe)
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(recipe.steps):
            noisy, t, target = _samples(base, ident, recipe, res, g, class_latents)
            loss = _loss(unet(noisy, t, enc).sample, target, recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(step, [losses[-1]])
        layers = {
            m: LoRALayer(
                _np(unet.get_submodule(m).lora_A[adapter].weight),
                _np(unet.get_submodule(m).lora_B[adapter].weight),
                float(recipe.alpha),
            )
            for m in names
        }
        return TrainResult(ident.name, LoRA(layers, base_model=base.ref), losses, time.perf_counter() - t0)
    finally:
        unet.unload_lora()  # unwraps the PEFT layers: the cached base model is shared by every identity
        unet.requires_grad_(False)


# --- prior preservation ----------------------------------------------------------------------------


@torch.no_grad()
def class_latents(base: BaseModel, recipe: Recipe, cache_dir: Path | None = None, steps: int = 25) -> torch.Tensor:
    """Latents of `recipe.class_images` images of the class prompt, generated by the base model once.

    Cached as PNGs under cache_dir (as diffusers' DreamBooth script keeps its class_data_dir), so every
    identity, rerun and worker shares them.
    """
    from PIL import Image

    res = recipe.resolution or base.resolution
    n = recipe.class_images
    if n <= 0:
        raise TrainingError("prior preservation is on but the recipe asks for 0 class images")
    files = []
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        files = sorted(cache_dir.glob("class-*.png"))[:n]
    if len(files) < n:
        g = torch.Generator(base.device).manual_seed(recipe.seed)
        images = []
        for start in range(0, n, 8):
            out = base.pipe(
                [recipe.class_prompt] * min(8, n - start),
                num_inference_steps=steps,
                generator=g,
                height=res,
                width=res,
                output_type="np",
            ).images
            images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        if cache_dir is not None:
            for i, im in enumerate(images):
                tmp = cache_dir / f".class-{i:05d}.png.tmp"
                Image.fromarray(im).save(tmp, format="PNG")
                tmp.replace(cache_dir / f"class-{i:05d}.png")
    else:
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return base.encode_images(to_tensor(images, res))

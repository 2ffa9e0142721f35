"""An attribute detector for toy-face images: what do generated samples and edits contain?

A tiny CNN (three 3x3 conv layers, ~30k parameters) trained on rendered toy faces under heavy
augmentation (blur, noise, colour and contrast jitter, shifts) so that it also reads the blurry,
off-colour, shifted faces a tiny diffusion model makes. The weights ship as safetensors in
ingest/assets/, with their training settings and held-out accuracy in the header; `train()` remakes
them from a fixed seed:

    python -m ingest.detector train      # 2-5 min on 2 CPU cores; rewrites the shipped weights
    python -m ingest.detector evaluate   # per-attribute accuracy on held-out identities
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ingest.toyfaces import ATTRIBUTES, random_faces, render_set
from w2w.errors import DatasetError

SIZE = 32
WEIGHTS = Path(__file__).parent / "assets" / "toyfaces_detector.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    identities: int = 1500
    images: int = 4  # jittered renders per identity
    seed: int = 1234  # faces, augmentation and initialisation
    epochs: int = 14
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class EvalConfig:
    identities: int = 500  # faces from another seed than training: held-out identities
    images: int = 2
    seed: int = 98765


class Net(nn.Module):
    def __init__(self, n_out: int = len(ATTRIBUTES)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (n, 16, 16, 16)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (n, 32, 8, 8)
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (n, 32, 4, 4)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, 3, 32, 32) in [-0.5, 0.5] -> (n, attrs) logits
        return self.head(self.features(x))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0 - 0.5)


# --- augmentation ------------------------------------------------------------------------------------


def blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian blur with one sigma (px) per image; float (n, H, W, 3) in and out."""
    taps = np.arange(-3, 4)
    k = np.exp(-(taps[None, :] ** 2) / (2 * np.maximum(sigma[:, None], 1e-3) ** 2))
    k /= k.sum(axis=1, keepdims=True)  # (n, 7)
    H, W = images.shape[1:3]
    for axis, n in ((1, H), (2, W)):
        pad = [(0, 0)] * 4
        pad[axis] = (3, 3)
        padded = np.pad(images, pad, mode="edge")
        images = sum(k[:, t, None, None, None] * np.take(padded, range(t, t + n), axis=axis) for t in range(len(taps)))
    return images


def move(images: np.ndarray, rng: np.random.Generator, px: float = 2.0, zoom: float = 0.1) -> np.ndarray:
    """Shift each image by up to `px` pixels and scale it by up to +-`zoom` (bilinear), filling with its corner."""
    from PIL import Image

    n, H, W = images.shape[:3]
    out = np.empty_like(images)
    for i in range(n):
        s, (dx, dy) = rng.uniform(1 - zoom, 1 + zoom), rng.uniform(-px, px, size=2)
        # output (u, v) samples input ((u - W/2 - dx) / s + W/2, ...): a zoom about the centre, then the shift
        coeffs = (1 / s, 0, W / 2 - (W / 2 + dx) / s, 0, 1 / s, H / 2 - (H / 2 + dy) / s)
        fill = tuple(int(c) for c in images[i, 0, 0])
        im = Image.fromarray(images[i]).transform((W, H), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                                                  fillcolor=fill)  # fmt: skip
        out[i] = np.asarray(im)
    return out


def augment(images: np.ndarray, rng: np.random.Generator, colour: bool = True, shift: bool = True) -> np.ndarray:
    """Blur (sigma up to 1.6 px), noise (std up to 14), and optionally colour/contrast jitter, shifts and zooms."""
    n = len(images)
    x = (move(images, rng) if shift else images).astype(np.float32)
    if colour:
        grey = x.mean(axis=3, keepdims=True)
        x = grey + rng.uniform(0.6, 1.3, size=(n, 1, 1, 1)) * (x - grey)  # saturation
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + rng.uniform(0.7, 1.15, size=(n, 1, 1, 1)) * (x - mean)  # contrast
        x = x * rng.uniform(0.85, 1.15, size=(n, 1, 1, 3)) + rng.uniform(-20, 20, size=(n, 1, 1, 1))
    x = blur(x, rng.uniform(0.0, 1.6, size=n) * (rng.random(n) < 0.8))
    x = x + rng.normal(size=x.shape) * rng.uniform(0, 14, size=(n, 1, 1, 1))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --- training and evaluation -------------------------------------------------------------------------


def _labels(identities: int, images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    faces = random_faces(identities, seed)
    y = np.array([[f.has(a) for a in ATTRIBUTES] for f in faces], dtype=np.float32).repeat(images, axis=0)
    return render_set(faces, images, seed, SIZE), y  # (n, 32, 32, 3), (n, attrs)


def train(config: TrainConfig = TrainConfig(), path: Path | None = WEIGHTS, log=print) -> Net:
    """Train from config.seed (same settings, same weights on one machine) and save to `path` with its accuracy."""
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # a small model: more threads only contend
    try:
        t0 = time.perf_counter()
        rng = np.random.default_rng(config.seed)
        images, y = _labels(config.identities, config.images, config.seed)
        torch.manual_seed(config.seed)
        net = Net()
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = config.epochs * -(-len(images) // config.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
        target = torch.from_numpy(y)
        for epoch in range(config.epochs):
            x = _to_tensor(augment(images, rng))  # fresh augmentation every epoch
            order = torch.from_numpy(rng.permutation(len(images)))
            net.train()
            total = 0.0
            for i in range(0, len(order), config.batch):
                idx = order[i : i + config.batch]
                loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach().item() * len(idx)
            log(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(images):.4f} ({time.perf_counter() - t0:.0f}s)")
        net.eval()
        accuracy = evaluate(net)
        log("held-out accuracy: " + json.dumps(accuracy))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {
                "attributes": json.dumps(list(ATTRIBUTES)),
                "size": str(SIZE),
                "train_config": json.dumps(dataclasses.asdict(config)),
                "eval_config": json.dumps(dataclasses.asdict(EvalConfig())),
                "accuracy": json.dumps(accuracy),
                "made_by": "python -m ingest.detector train",
            }
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
            log(f"wrote {path}")
        return net
    finally:
        torch.set_num_threads(threads)


def evaluate(net: Net | None = None, config: EvalConfig = EvalConfig()) -> dict[str, dict[str, float]]:
    """Accuracy per attribute on held-out identities: clean renders, + blur and noise, + colour jitter and shifts."""
    images, y = _labels(config.identities, config.images, config.seed)
    rng = np.random.default_rng(config.seed)
    sets = {
        "clean": images,
        "blur+noise": augment(images, rng, colour=False, shift=False),
        "all augmentations": augment(images, rng),
    }
    out = {}
    for name, ims in sets.items():
        scores = detect(ims, net)
        out[name] = {a: round(float(((scores[a] > 0.5) == y[:, i]).mean()), 4) for i, a in enumerate(ATTRIBUTES)}
    return out


# --- detection ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load(path: Path = WEIGHTS) -> Net:
    """The shipped detector (trained here, a few minutes, if the file is missing)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        warnings.warn(f"{path} is missing; training the toy-faces detector (a few minutes)", stacklevel=2)
        try:
            return train(log=lambda _: None)
        except OSError:  # a read-only install: keep the model in memory
            return train(path=None, log=lambda _: None)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("attributes", "[]")) != list(ATTRIBUTES):
        raise DatasetError(
            path,
            f"detects {meta.get('attributes')}, not the toy-faces attributes {list(ATTRIBUTES)}",
            "retrain it with `python -m ingest.detector train`",
        )
    net = Net()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def _prepare(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    assert images.ndim == 4 and images.shape[-1] == 3, f"expected (n, H, W, 3) images, got {images.shape}"
    if images.dtype != np.uint8:  # float images in [0, 1] (a pipeline's output_type="np")
        images = np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    if images.shape[1:3] != (SIZE, SIZE):
        from PIL import Image

        from ingest.dataset import square

        images = np.stack([np.asarray(square(Image.fromarray(im), SIZE)) for im in images])
    return images


def detect(images: np.ndarray, net: Net | None = None) -> dict[str, np.ndarray]:
    """{attribute: (n,) float32 score in [0, 1]} for (n, H, W, 3) RGB images (uint8, or float in [0, 1])."""
    images = _prepare(images)
    net = net or load()
    with torch.no_grad():
        logits = torch.cat([net(_to_tensor(images[i : i + 512])) for i in range(0, len(images), 512)] or [
            torch.zeros(0, len(ATTRIBUTES))
        ])  # fmt: skip
    probs = torch.sigmoid(logits).numpy().astype(np.float32)  # (n, attrs)
    return {a: probs[:, i] for i, a in enumerate(ATTRIBUTES)}


def detect_bool(images: np.ndarray, net: Net | None = None) -> dict[str, np.ndarray]:
    """{attribute: (n,) bool}: score > 0.5."""
    return {a: s > 0.5 for a, s in detect(images, net).items()}


def main(argv: list[str]) -> None:
    if argv[:1] == ["train"]:
        train()
    elif argv[:1] == ["evaluate"]:
        print(json.dumps(evaluate(load()), indent=2))
    else:
        print("usage: python -m ingest.detector train|evaluate", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])

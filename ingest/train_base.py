"""Train the embedded toy-faces base model from scratch, reproducibly, on CPU.

    python -m ingest.train_base --vae-steps 600 --unet-steps 2500 --threads 1 --out /tmp/stage1
    python -m ingest.train_base --unet-steps 1500 --lr 3e-4 --seed 1 --threads 1 --init-from /tmp/stage1

(the two stages that made the shipped model, recorded in its w2wreg-base.json; --out defaults to
ingest/assets/toy-base).

Three stages, each seeded: (1) the VAE learns to reconstruct rendered toy faces (32 px -> 16 x 16 x 4
latents); (2) the latents' spread sets the VAE's scaling factor, as SD's 0.18215 was set; (3) the UNet and
the text encoder learn to denoise those latents conditioned on captions ("a smiling person with glasses"),
with 10% of captions dropped so classifier-free guidance works. The result is an ordinary diffusers
StableDiffusionPipeline folder (safetensors). At the end it generates faces for a few captions and
reports how often the attribute detector finds the attributes the captions ask for.

Same seeds, same torch version and thread count: the same weights. About 37 + 18 minutes of one core
here (the machine was shared; uncontended it is roughly half).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ingest import toyfaces
from ingest.basemodel import TOY_BASE_DIR, TOY_SCHEDULER_CONFIG, build_toy_pipeline


def _batches(n: int, batch: int, g: torch.Generator):
    while True:
        yield from torch.randperm(n, generator=g).split(batch)


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, log) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    it = _batches(len(images), batch, g)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 2e-3)
        x = images[next(it)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae  step {step:5d}/{steps}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f}s)")
    vae.eval()


def train_denoiser(
    pipe, latents: torch.Tensor, captions: list[str], steps: int, batch: int, seed: int, log, peak_lr: float = 1e-3
) -> None:
    unet, te, tok, sched = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=1e-2)
    unet.train()
    te.train()
    it = _batches(len(latents), batch, g)
    t0 = time.perf_counter()
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, peak_lr)
        b = next(it)
        x0 = latents[b]
        text = ids.input_ids[b].clone()
        drop = torch.rand(len(b), generator=g) < 0.1
        text[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(b),), generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, te(text)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step:5d}/{steps}  loss {running:.4f}  ({time.perf_counter() - t0:.0f}s)")
    unet.eval()
    te.eval()


@torch.no_grad()
def check(pipe, seed: int = 0, per_caption: int = 6) -> dict:
    """Generate faces for captions naming each attribute alone (and none), score them with the detector."""
    from ingest import detector

    report = {}
    g = torch.Generator().manual_seed(seed)
    for attr in (None, *toyfaces.ATTRIBUTES):
        face = toyfaces.random_faces(1, seed=0)[0]
        prompt = toyfaces.caption(replace(face, attributes={a: a == attr for a in toyfaces.ATTRIBUTES}))
        imgs = pipe([prompt] * per_caption, num_inference_steps=25, generator=g, output_type="np").images
        found = detector.detect_bool((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
        report[prompt] = {a: float(found[a].mean()) for a in toyfaces.ATTRIBUTES}
    return report


def _previous_stages(folder: Path | None) -> list:
    if folder is None or not (folder / "w2wreg-base.json").exists():
        return []
    meta = json.loads((folder / "w2wreg-base.json").read_text())
    return meta.get("stages", [meta.get("args")])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TOY_BASE_DIR)
    ap.add_argument("--faces", type=int, default=3000, help="distinct random faces to train on")
    ap.add_argument("--images", type=int, default=4, help="jittered renders per face")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the denoiser")
    ap.add_argument(
        "--init-from", type=Path, help="continue from this model folder (its VAE kept): a second, gentler stage"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    # A population disjoint from the datasets `toyfaces make` draws by default (seeds 0..): the base
    # model knows toy faces in general, not the demo's identities.
    faces = toyfaces.random_faces(args.faces, seed=10_000 + args.seed)
    rendered = toyfaces.render_set(faces, args.images, seed=10_000 + args.seed)
    captions = [toyfaces.caption(f) for f in faces for _ in range(args.images)]
    images = torch.from_numpy(rendered).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    log(f"{len(images)} images of {len(faces)} faces rendered ({time.perf_counter() - t0:.0f}s)")

    if args.init_from:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            args.init_from, safety_checker=None, requires_safety_checker=False
        )
        pipe.unet.train()
        pipe.text_encoder.train()
        scale = float(pipe.vae.config.scaling_factor)
        with torch.no_grad():
            lat = torch.cat([pipe.vae.encode(x).latent_dist.mean for x in images.split(256)])
    else:
        pipe = build_toy_pipeline(seed=args.seed)
        train_vae(pipe.vae, images, args.vae_steps, 64, args.seed, log)
        with torch.no_grad():
            lat = torch.cat([pipe.vae.encode(x).latent_dist.mean for x in images.split(256)])
        scale = float(1.0 / lat.std())
        pipe.vae.register_to_config(scaling_factor=scale)
        log(f"latent scaling factor {scale:.4f}")
    train_denoiser(pipe, lat * scale, captions, args.unet_steps, args.batch, args.seed + 1, log, args.lr)

    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler(**TOY_SCHEDULER_CONFIG, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    report = check(pipe)
    meta = {
        "made_by": "python -m ingest.train_base",
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "stages": [*_previous_stages(args.init_from), {k: str(v) for k, v in vars(args).items() if k != "out"}],
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "detector_on_generated": report,
    }
    (args.out / "w2wreg-base.json").write_text(json.dumps(meta, indent=2) + "\n")
    for prompt, r in report.items():
        log(f"{prompt:45s} " + "  ".join(f"{a} {v:.2f}" for a, v in r.items()))
    log(f"saved to {args.out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()

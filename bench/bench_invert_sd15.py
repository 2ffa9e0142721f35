"""Seconds per inversion at the paper's scale: the paper's loop vs ours, on an SD 1.5-shaped pipeline.

    python bench/bench_invert_sd15.py --device cuda --dtype bf16 [--components 10000] [--steps 400]
    python bench/bench_invert_sd15.py --resolution 64 --components 64 --steps 4   # CPU smoke run

Speed only (the quality comparison is bench_invert.py, on the toy world): the UNet, VAE and text encoder
are SD 1.5's shapes with random weights (no download; the time does not depend on the weights), the space
is the w2w layout (D = 99,648) with a random orthonormal basis of --components columns. Timed, after one
warm-up step each:
  * paper - 400 steps from the mean, one timestep per step (the paper: 55 s on an A100);
  * ours  - the `--init nearest --batch-timesteps 4` inversion: a 50-step first pass, 8 candidate starts
            scored on 8 fixed draws, then 400 steps of 4 timesteps each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import sd15_base  # noqa: E402
from common import emit_result, env_info, log, print_table  # noqa: E402

PAPER_A100_S = 55.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--components", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--resolution", type=int, default=512, help="image size (64 for a CPU smoke run)")
    args = ap.parse_args()

    from ingest.invert import InvertConfig, Inverter, invert, shortlist_by_loss
    from w2w.presets import sd15_layout

    base = sd15_base(args.device, args.dtype)
    if args.resolution != base.resolution:
        base.pipe.unet.register_to_config(sample_size=args.resolution // base.pipe.vae_scale_factor)
    layout = sd15_layout("w2w")
    D, K = layout.dim, args.components
    rng = np.random.default_rng(0)
    mean = (rng.standard_normal(D) * 1e-3).astype(np.float32)
    std = np.full(D, 1e-3, np.float32)
    V = np.linalg.qr(rng.standard_normal((D, K)).astype(np.float32))[0] if K <= 2048 else None
    if V is None:  # a D x 10,000 QR on the host is slow; columns of a Gaussian are orthonormal enough at D ~ 1e5
        V = (rng.standard_normal((D, K), dtype=np.float32) / np.sqrt(D)).astype(np.float32)
    image = torch.rand(1, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    log(f"{base.ref} on {args.device} ({args.dtype}), D = {D:,}, K = {K:,}, {args.steps} steps")

    t0 = time.perf_counter()
    inv = Inverter(base, layout, mean, std, V)
    _sync(base.device)
    setup = time.perf_counter() - t0
    paper = InvertConfig(components=K, steps=args.steps, batch_timesteps=1)
    ours = InvertConfig(components=K, steps=args.steps, batch_timesteps=4, init="nearest")
    for cfg in (paper, ours):  # warm-up: kernels chosen, memory pools filled
        invert(
            base, layout, mean, std, V, image, InvertConfig(**{**cfg.describe(), "steps": 2, "init": "mean"}), inv=inv
        )

    def run_paper() -> None:
        invert(base, layout, mean, std, V, image, paper, inv=inv)

    def run_ours() -> None:
        first = InvertConfig(**{**ours.describe(), "steps": ours.first_pass_steps, "init": "mean"})
        est, _ = invert(base, layout, mean, std, V, image, first, inv=inv)
        cands = est[None] + rng.standard_normal((ours.shortlist, K)).astype(np.float32) * 0.1
        best = shortlist_by_loss(base, layout, mean, std, V, image, ours, cands, inv=inv)
        invert(base, layout, mean, std, V, image, ours, c0=cands[best], inv=inv)

    rows, data = [], {}
    for side, fn, samples in (
        ("paper", run_paper, args.steps),
        ("ours", run_ours, 4 * (ours.first_pass_steps + args.steps) + 8 * ours.shortlist),
    ):
        _sync(base.device)
        t0 = time.perf_counter()
        fn()
        _sync(base.device)
        sec = time.perf_counter() - t0
        log(f"{side}: {sec:.1f} s")
        rows.append((side, sec, samples, 1e3 * sec / samples, sec / PAPER_A100_S))
        data[side] = {"seconds": sec, "unet_samples": samples}
    peak = torch.cuda.max_memory_allocated() / 2**30 if base.device.type == "cuda" else float("nan")
    print_table(
        ["side", "s/inversion", "UNet samples", "ms/sample", "vs paper's 55 s (A100)"],
        rows,
        title=f"inversion, SD 1.5 shape, {args.resolution} px, K = {K:,}, on {args.device} ({args.dtype}); "
        f"setup {setup:.1f} s, peak GPU memory {peak:.1f} GiB",
    )
    gpu = torch.cuda.get_device_name() if base.device.type == "cuda" else None
    emit_result(
        {
            "bench": "invert_sd15",
            "device": args.device,
            "gpu": gpu,
            "dtype": args.dtype,
            "K": K,
            "steps": args.steps,
            "by_side": data,
            "peak_gpu_gib": peak,
            "env": env_info(),
        }
    )


if __name__ == "__main__":
    main()

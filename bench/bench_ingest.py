"""Identities per hour of LoRA training, one identity at a time (PEFT) vs B at a time (batched LoRA layers).

    python bench/bench_ingest.py [--identities 16] [--steps 30] [--batches 1,4,16] [--rounds 2]
    python bench/bench_ingest.py --sd15 --device cuda --dtype bf16 --steps 20 --batches 1,4   # GPU: w2w recipe

Default: the embedded toy-faces world (its base model, the toy recipe, 32 px) on this machine's CPU. The
same identities are trained with each B, in rotating order over --rounds so machine noise hits every side
alike; the best round per B counts. Prints seconds per identity, identities per hour and the ratio to
B = 1, and checks that every B gave the same LoRAs (max abs difference to B = 1).

--sd15: the paper's w2w recipe (rank 1, to_q/to_v, 512 px, prior preservation, batch 1) on an SD 1.5-shaped
pipeline built from its configs with random weights (speed does not depend on them; no download). Each
identity step is timed and scaled to the recipe's 800 steps, to compare with the paper's 220 s per identity
on an A100.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, env_info, log, print_table  # noqa: E402


def toy_identities(n: int, images: int):
    from ingest import toyfaces
    from ingest.basemodel import TOY_SIZE
    from ingest.trainer import Identity, to_tensor

    faces = toyfaces.random_faces(n, seed=0)
    arr = toyfaces.render_set(faces, images, seed=0)
    return [Identity(f.name, to_tensor(arr[i * images : (i + 1) * images], TOY_SIZE)) for i, f in enumerate(faces)]


def sd15_base(device: str, dtype: str):
    """An SD 1.5-shaped StableDiffusionPipeline from configs, random weights, as a BaseModel."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ingest.basemodel import DTYPES, BaseModel, word_tokenizer
    from w2w.presets import SD15_UNET_CONFIG

    tok = word_tokenizer(["sks", "person", "a", "photo", "of"])
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok.get_vocab()),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device, DTYPES[dtype])
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    return BaseModel("sd15-shaped-random", pipe, torch.device(device), DTYPES[dtype])


def timed(base, ids, recipe, b: int, cls=None) -> tuple[float, list]:
    from ingest.trainer import train_batch

    if base.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(ids), b):
        out += train_batch(base, ids[i : i + b], recipe, cls)
    if base.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def max_diff(a, b) -> float:
    return max(
        float(np.abs(getattr(x.lora.layers[k], f) - getattr(y.lora.layers[k], f)).max())
        for x, y in zip(a, b, strict=True)
        for k in x.lora.layers
        for f in ("A", "B")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=16)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--resolution", type=int, default=512, help="--sd15 only: image size (64 for a CPU smoke run)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from ingest.trainer import Identity, get_recipe

    cls = None
    if args.sd15:
        base = sd15_base(args.device, args.dtype)
        res = args.resolution
        recipe = replace(get_recipe("w2w"), steps=args.steps, class_images=4, resolution=res)
        g = torch.Generator().manual_seed(0)
        ids = [Identity(f"id{i}", torch.rand(4, 3, res, res, generator=g) * 2 - 1) for i in range(args.identities)]
        with torch.no_grad():
            cls = base.encode_images(torch.rand(4, 3, res, res, generator=g) * 2 - 1)
    else:
        from ingest.basemodel import load_base

        base = load_base(None, args.device, args.dtype)
        recipe = get_recipe("toy", steps=args.steps)
        ids = toy_identities(args.identities, args.images)
    log(f"{len(ids)} identities, {recipe.name} recipe at {args.steps} steps, B in {batches}, {args.rounds} rounds")
    best: dict[int, float] = {}
    results: dict[int, list] = {}
    for r in range(args.rounds):
        order = batches if r % 2 == 0 else batches[::-1]
        for b in order:
            sec, out = timed(base, ids, recipe, b, cls)
            log(f"round {r}: B = {b:3d}  {sec:7.1f}s  ({sec / len(ids):.2f} s/identity)")
            best[b] = min(best.get(b, float("inf")), sec)
            results.setdefault(b, out)
    ref = batches[0]
    scale = (800 / args.steps) if args.sd15 else 1.0
    rows, data = [], {}
    for b in batches:
        per = best[b] / len(ids)
        diff = max_diff(results[b], results[ref]) if b != ref else 0.0
        rows.append((b, per, per * scale, 3600 / per / scale, best[ref] / best[b], f"{diff:.1e}"))
        data[b] = {
            "s_per_identity": per,
            "identities_per_hour": 3600 / per / scale,
            "speedup": best[ref] / best[b],
            "max_abs_diff_vs_B1": diff,
        }
    head = [
        "B",
        f"s/identity ({args.steps} steps)",
        "s/identity (recipe steps)" if args.sd15 else "same",
        "identities/hour",
        f"speed-up vs B={ref}",
        "max |LoRA - B=1 LoRA|",
    ]
    print_table(
        head, rows, title=f"{'w2w recipe, SD 1.5 shape' if args.sd15 else 'toy recipe'} on {args.device} ({args.dtype})"
    )
    emit_result(
        {
            "bench": "ingest",
            "sd15": args.sd15,
            "device": args.device,
            "dtype": args.dtype,
            "steps": args.steps,
            "identities": len(ids),
            "by_B": data,
            "env": env_info(),
        }
    )


if __name__ == "__main__":
    main()

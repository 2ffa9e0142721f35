"""A hub of SD 1.5 LoRAs in every layout: cross-layout dW search, near copies, import speed.

    python bench/bench_hub_search.py [--n 1000] [--blocks 4] [--queries 20] [--chunk 500] [--out DIR] [--keep]
    python bench/bench_hub_search.py --n 10000 --blocks 2 --keep      # then, on a quiet machine:
    python bench/bench_hub_search.py --n 10000 --blocks 2 --reuse     # times the searches again

Builds, seeded, n LoRAs on real SD 1.5 UNet modules and shapes (from the UNet config on the meta device):
attention to_q/to_k/to_v/to_out.0 of attn1 and attn2 in the first `--blocks` of the 16 transformer blocks
(16 = all), plus for some models ff.net.0.proj/ff.net.2, proj_in/proj_out (1x1 convs) or the resnets'
3x3 convs (LoCon-style); ranks 4-64 (log-uniform), alphas 1..rank, written as diffusers, kohya and PEFT.
Models come from max(50, n/20) "concepts" (~18 models each at any n): a model's dW is its concept's (spectrum
0.5^j, floor 3e-4) with singular vectors perturbed by 10-30%, so same-concept models are neighbours but no two
are within 1%. Planted near copies (~8% of n): fp16 and bf16 files of a model, its resize (truncated SVD to the
smallest of ranks 8, 12, 16, 24, 32 whose dW error is < 0.5%, as kohya resize_lora's sv_fro does), and the same
dW with another alpha in another format. Files are made and imported `--chunk` at a time (each model has a seeded
generator of its own, so a copy's original is made again rather than kept): the disk holds one chunk of files
and the registry. Measures:
  * import: `import_paths` of every file vs safetensors.torch.load_file of every file (the floor);
  * near copies: the copies `add` reported against the planted ones (recall, precision);
  * search: `search --metric delta -k 10` from registered models (sketch candidates + exact re-rank, with the
    pairs kept at add: registry.delta_pairs), each query timed once after one search from another model warmed
    what all share, vs an exhaustive exact float64 scan over all models (recall@10), p50/p95 latency; the same
    from files (`--like FILE`: no kept pairs); and the factor distances vs dense dW on sampled pairs.
Sizes: 1,000 models at --blocks 4 make a 4.6 GB registry; all 16 blocks at n = 10,000 would be ~150 GB, more
than this machine's disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_OUT, emit_result, env_info, log, pct, print_table, rounded  # noqa: E402

CONCEPTS = 50  # at least; and one per PER_CONCEPT models, so a query has ~20 same-concept neighbours at any n
PER_CONCEPT = 20
COPY_SHARE = 0.08
TARGET_RECALL, TARGET_P50_MS, TARGET_NEAR_RECALL, TARGET_NEAR_PRECISION = 1.0, 10.0, 1.0, 0.99


def sd15_modules(blocks: int) -> dict[str, dict[str, tuple]]:
    """Module groups of SD 1.5's UNet: name -> (out, in, kernel) for Linear (kernel 0) and Conv2d layers."""
    import torch
    from diffusers import UNet2DConditionModel

    from w2w.layout import canonical_sort
    from w2w.presets import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    attn_parents = canonical_sort(
        {n.split(".transformer_blocks")[0] for n, _ in unet.named_modules() if ".transformer_blocks." in n}
    )
    keep = set(attn_parents[:blocks])
    groups: dict[str, dict[str, tuple]] = {"attn": {}, "ff": {}, "proj": {}, "conv": {}}
    for name, mod in unet.named_modules():
        parent = name.split(".transformer_blocks")[0]
        if isinstance(mod, torch.nn.Linear) and parent in keep:
            if any(name.endswith(f"{a}.{m}") for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")):
                groups["attn"][name] = (mod.out_features, mod.in_features, 0)
            elif name.endswith(("ff.net.0.proj", "ff.net.2")):
                groups["ff"][name] = (mod.out_features, mod.in_features, 0)
        if isinstance(mod, torch.nn.Conv2d):
            if name.endswith(("proj_in", "proj_out")) and name.rsplit(".", 1)[0] in keep:
                groups["proj"][name] = (mod.out_channels, mod.in_channels, 1)
            elif ".resnets.0.conv" in name and name.startswith(("down_blocks.0", "up_blocks.3")):
                groups["conv"][name] = (mod.out_channels, mod.in_channels, 3)
    return groups


def concept_factor(c: int, name: str, rows: int, r: int) -> np.ndarray:
    import zlib

    rng = np.random.default_rng([c, zlib.crc32(name.encode()), rows])
    return rng.standard_normal((rows, 64), dtype=np.float32)[:, :r] / np.sqrt(rows)


def make_model(i: int, modules: dict[str, tuple], concept: int, rank: int, alpha: float, rng):
    """A LoRA whose dW per module is the concept's top-`rank` part (spectrum 0.5^j), vectors perturbed."""
    from w2w.lora import LoRA, LoRALayer

    # 0.5^j down to a floor (a real LoRA's spectrum flattens; 0.5^63 would also make float32 products subnormal,
    # which x86 computes ~100x slower): a rank-8 resize of a rank >= 12 model then keeps all but <= 0.3% of dW
    spectrum = np.maximum(0.5 ** np.arange(rank), 3e-4).astype(np.float32)
    delta = 0.1 + 0.2 * rng.random()
    layers = {}
    for name, (out, inn, k) in modules.items():
        fan_in = inn * k * k if k else inn
        U = concept_factor(concept, name + "U", out, rank) + delta * rng.standard_normal(
            (out, rank), np.float32
        ) / np.sqrt(out)
        V = concept_factor(concept, name + "V", fan_in, rank) + delta * rng.standard_normal(
            (fan_in, rank), np.float32
        ) / np.sqrt(fan_in)
        B = U * spectrum * (rank / alpha)  # dW = (alpha / rank) B A = U diag(spectrum) V^T
        A = V.T.copy()
        if k:
            A, B = A.reshape(rank, inn, k, k), B.reshape(out, rank, 1, 1)
        layers[name] = LoRALayer(A.astype(np.float32), B.astype(np.float32), float(alpha))
    return LoRA(layers)


def write_in(lora, path: Path, fmt: str, dtype: str = "fp32") -> Path:
    """Write with our writers (fp32), or as a kohya file holding fp16/bf16 tensors."""
    from w2w.formats import write_lora

    if dtype == "fp32":
        write_lora(lora, path if fmt != "peft" else path.with_suffix(""), fmt)
        return path if fmt != "peft" else path.with_suffix("")
    import torch
    from safetensors.torch import load_file, save_file

    write_lora(lora, path, "kohya")
    tensors = load_file(path)
    save_file(
        {k: v.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])) for k, v in tensors.items()}, path
    )
    return path


def _params(seed: int, i: int, concepts: int):
    """(rng, rank, alpha, target group, concept) of original model i: a generator of its own, so any model can be
    made again (a copy's original) without keeping thousands in memory."""
    rng = np.random.default_rng([seed, i])
    rank = int(np.clip(round(np.exp(rng.uniform(np.log(4), np.log(64)))), 4, 64))
    alpha = float(rng.choice([1.0, rank / 2, rank]))
    extra = int(rng.integers(0, 4))  # attention only / + ff / + proj / + convs
    return rng, rank, alpha, extra, int(rng.integers(concepts))


def original(seed: int, i: int, groups, concepts: int):
    rng, rank, alpha, extra, concept = _params(seed, i, concepts)
    modules = dict(groups["attn"]) | [{}, groups["ff"], groups["proj"], groups["conv"]][extra]
    return make_model(i, modules, concept, rank, alpha, rng)


def write_copy(j: int, seed: int, made: int, groups, concepts: int, folder: Path) -> tuple[str, str, Path]:
    """Planted copy j of one of the first `made` originals: (copy name, original name, file)."""
    from w2w.factor_mix import truncate

    rng = np.random.default_rng([seed, 10**9 + j])
    kind = ("fp16", "bf16", "resize", "alpha")[j % 4]
    while True:
        i = int(rng.integers(made))
        if kind != "resize" or _params(seed, i, concepts)[1] >= 12:
            break
    src, src_name = original(seed, i, groups, concepts), f"m{i:05d}"
    name = f"c{j:05d}-{kind}-of-{src_name}"
    if kind in ("fp16", "bf16"):
        return name, src_name, write_in(src, folder / f"{name}.safetensors", "kohya", kind)
    if kind == "resize":  # like kohya resize_lora's sv_fro: the smallest rank keeping all but 0.5% of dW
        resized = next(t for r in (8, 12, 16, 24, 32, 64) for t, e in [truncate(src, r)] if e < 0.005)
        return name, src_name, write_in(resized, folder / f"{name}.safetensors", "diffusers")
    other = type(src)({k: type(l)(l.A, l.B * (l.alpha / 1.0), 1.0) for k, l in src.layers.items()})
    return name, src_name, write_in(other, folder / f"{name}.safetensors", "peft")


def chunks(n: int, chunk: int, blocks: int, folder: Path, seed: int = 0):
    """Yield (files, {copy: original}) chunk by chunk: originals m00000... and the planted copies (~8%) of
    originals made so far, spread evenly, so the files on disk at once stay bounded."""
    groups = sd15_modules(blocks)
    concepts = max(CONCEPTS, n // PER_CONCEPT)
    n_copies = int(round(n * COPY_SHARE))
    n_orig = n - n_copies
    formats = ("diffusers", "kohya", "peft")
    j = 0
    for lo in range(0, n_orig, chunk):
        hi = min(lo + chunk, n_orig)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        files, planted = [], {}
        for i in range(lo, hi):
            lora = original(seed, i, groups, concepts)
            files.append(write_in(lora, folder / f"m{i:05d}.safetensors", formats[i % 3]))
        while j < n_copies and j * n_orig < hi * n_copies:
            name, src, path = write_copy(j, seed, hi, groups, concepts, folder)
            files.append(path)
            planted[name] = src
            j += 1
        log(f"generated {hi}/{n_orig} models and {j}/{n_copies} copies")
        yield files, planted


def build(work: Path, args) -> dict:
    """Generate and import the hub chunk by chunk; what the measures need of it (JSON-able)."""
    from safetensors.torch import load_file  # numpy cannot hold the bf16 copies

    from ingest.importer import import_paths
    from registry.registry import Registry

    shutil.rmtree(work, ignore_errors=True)
    reg = Registry.init(work / "registry")
    folder = work / "loras"
    state = {"planted": {}, "added": [], "near_copies": [], "skipped": [], "bytes": 0, "files": 0, "truth": {}}
    state |= {"read_s": 0.0, "import_s": 0.0, "generate_s": 0.0}
    t0 = time.perf_counter()
    for files, planted in chunks(args.n, args.chunk, args.blocks, folder):
        state["generate_s"] += time.perf_counter() - t0
        state["bytes"] += sum(f.stat().st_size for p in files for f in ([p] if p.is_file() else p.iterdir()))
        t0 = time.perf_counter()
        for p in files:
            load_file(str(p if p.is_file() else p / "adapter_model.safetensors"))
        state["read_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        report = import_paths(reg, [folder], progress=True)
        state["import_s"] += time.perf_counter() - t0
        assert not report.errors, report.errors[:3]
        state["planted"] |= planted
        state["added"] += [name for name, _ in report.added]
        state["near_copies"] += [(c["name"], c["of"]) for c in report.near_copies]
        state["skipped"] += [Path(w).stem for w, _ in report.skipped]
        state["files"] += len(files)
        t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    log(f"generated {state['files']} files ({state['bytes'] / 1e9:.2f} GB) in {state['generate_s']:.0f} s, imported "
        f"in {state['import_s']:.0f} s (safetensors read: {state['read_s']:.0f} s)")  # fmt: skip
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=4, help="transformer blocks (of 16) the models target")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--chunk", type=int, default=500, help="files generated and imported at a time (bounds the disk)")
    ap.add_argument("--keep", action="store_true", help="keep the registry (under --out)")
    ap.add_argument("--reuse", action="store_true", help="time the searches again on a kept registry (kept again)")
    args = ap.parse_args()

    from registry import sketches
    from registry.registry import Registry
    from w2w import delta
    from w2w.formats import write_lora

    work = args.out / f"hub-{args.n}-{args.blocks}"
    state_path = work / "state.json"
    if args.reuse and state_path.exists():  # the registry of an earlier run: only the searches are timed again
        state = json.loads(state_path.read_text())
        reg = Registry.open(work / "registry")
    else:
        state = build(work, args)
        state_path.write_text(json.dumps(state))
        reg = Registry.open(work / "registry")
    planted, size, n_files = state["planted"], state["bytes"], state["files"]
    floor_s, import_s = state["read_s"], state["import_s"]

    # near copies: a planted copy counts as found when reported as a copy of its original or of another copy of it
    group = {name: planted.get(name, name) for name in state["added"]} | {s: planted.get(s, s) for s in planted}
    reported = {(a, b) for a, b in state["near_copies"]}
    skipped = set(state["skipped"])
    # files import in name order: a copy (c...) may come before its original (m...), which is then the one
    # reported, so a pair counts in either direction
    right = {(a, b) for a, b in reported if group.get(a) == group.get(b)}
    found = {x for pair in right for x in pair}
    # a copy identical to its original (an alpha copy of an alpha-1 model, the same resize drawn twice) is
    # skipped as a duplicate, it or its original, whichever came second
    true_pos = sum(1 for c, o in planted.items() if c in found or c in skipped or o in skipped)
    near_recall = true_pos / max(len(planted), 1)
    near_precision = len(right) / max(len(reported), 1)

    # search: sketch candidates + exact re-rank vs an exhaustive exact scan of every model
    table = reg.catalog.model_table()
    ids = sorted(table.rows)
    rng = np.random.default_rng(1)
    queries = [int(q) for q in state["truth"]][: args.queries]  # those of an earlier run first (their truth is kept)
    queries += [int(q) for q in rng.permutation(ids) if str(q) not in state["truth"]][: args.queries - len(queries)]
    lat, recalls = [], []
    # warm what every search shares (the family's sketch index, the kept pairs, the memory maps) with a model that
    # is not a query: each query is then timed once, its candidates' layers read for it (nothing of it cached)
    reg.search(next(i for i in ids if i not in queries), k=10, metric="delta")
    for q in queries:
        t0 = time.perf_counter()
        got = reg.search(q, k=10, metric="delta")
        lat.append(time.perf_counter() - t0)
        if str(q) not in state["truth"]:  # kept in state.json: a --reuse run does not scan again
            fq = sketches.factors(reg, q)
            exact = sorted((delta.distance(fq, sketches.factors(reg, j)), j) for j in ids if j != q)[:10]
            state["truth"][str(q)] = [j for _, j in exact]
            state_path.write_text(json.dumps(state))
        truth = set(state["truth"][str(q)])
        recalls.append(len(truth & {h.model.id for h in got.hits}) / 10)
        log(f"query {len(recalls)}/{len(queries)}: recall {recalls[-1]:.2f}, {lat[-1] * 1e3:.1f} ms")
    # a file's search (`search --like FILE` of a file not registered): no kept pairs, every exact pair computed
    file_lat = []
    files = work / "query-files"
    files.mkdir(exist_ok=True)
    for q in queries[: max(3, len(queries) // 2)]:
        path = files / f"q{q}.safetensors"
        write_lora(reg.lora(q), path, "diffusers")
        t0 = time.perf_counter()
        reg.search(path, k=11, metric="delta")  # itself at 0 and its 10 neighbours
        file_lat.append(time.perf_counter() - t0)
    shutil.rmtree(files)
    # the factor distances against dense dW on a few pairs
    worst = 0.0
    for a, b in zip(queries[:3], queries[3:6], strict=False):
        la, lb = reg.lora(a), reg.lora(b)
        da = {n: l.delta().astype(np.float64) for n, l in la.layers.items()}
        db = {n: l.delta().astype(np.float64) for n, l in lb.layers.items()}
        dense = np.sqrt(sum(float(np.sum((da.get(n, 0) - db.get(n, 0)) ** 2)) for n in da.keys() | db.keys()))
        worst = max(worst, abs(delta.distance(sketches.factors(reg, a), sketches.factors(reg, b)) - dense) / dense)

    n_models = len(ids)
    print(f"\nhub: {n_models} SD 1.5 LoRAs ({len(planted)} planted copies), {args.blocks} of 16 transformer blocks, "
          f"ranks 4-64, {len(reg.spaces())} layouts, {size / 1e9:.2f} GB of files")  # fmt: skip
    print_table(
        ["measure", "value", "target / comparison"],
        [
            ("import (files/s)", rounded(n_files / import_s), f"safetensors read {rounded(n_files / floor_s)}/s"),
            ("import / read ratio", rounded(floor_s / import_s), "-"),
            ("near-copy recall", rounded(near_recall), TARGET_NEAR_RECALL),
            ("near-copy precision", rounded(near_precision), f">= {TARGET_NEAR_PRECISION}"),
            ("delta search recall@10", rounded(float(np.mean(recalls))), TARGET_RECALL),
            ("delta search p50 (ms)", rounded(pct(lat, 50) * 1e3), f"< {TARGET_P50_MS}"),
            ("delta search p95 (ms)", rounded(pct(lat, 95) * 1e3), "-"),
            ("delta search from a file, p50 (ms)", rounded(pct(file_lat, 50) * 1e3), "no kept pairs"),
            ("factor vs dense distance, max rel. diff", f"{worst:.1e}", "float64 rounding"),
        ],
    )
    emit_result(
        {
            "bench": "hub_search",
            "n": n_models,
            "blocks": args.blocks,
            "planted": len(planted),
            "layouts": len(reg.spaces()),
            "import_files_per_s": n_files / import_s,
            "read_files_per_s": n_files / floor_s,
            "near_recall": near_recall,
            "near_precision": near_precision,
            "recall_at_10": float(np.mean(recalls)),
            "p50_ms": pct(lat, 50) * 1e3,
            "p95_ms": pct(lat, 95) * 1e3,
            "file_query_p50_ms": pct(file_lat, 50) * 1e3,
            "factor_vs_dense": worst,
            "env": env_info(),
        }
    )
    if not (args.keep or args.reuse):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

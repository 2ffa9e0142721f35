"""Registering the w2w release's own space (`w2wreg fit --from-w2w-release`) at the paper's k: peak memory and time.

Writes a release folder of the authors' structure (N rows of D = 99,648, weight_dimensions.pt, adapter_config.json,
mean.pt, std.pt and an orthonormal V.pt of D x k float32: 4 GB at k = 10,000), imports the rows, then times
`w2wreg fit --from-w2w-release` in a fresh process and reads its peak RSS. The figure's comparison is the size of
the components themselves (what any reader of V.pt must hold): peak RSS / that size.

    python bench/bench_release_basis.py --k 10000        # the paper's space (~5 GB of disk under bench/out/)
    python bench/bench_release_basis.py --k 1000 --n 64  # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_OUT, emit_result, env_info, log, print_table  # noqa: E402


def write_release(folder: Path, n: int, k: int, seed: int = 0) -> None:
    import torch

    from w2w.presets import sd15_layout

    layout = sd15_layout("w2w")
    shapes = {}
    for e in layout.entries:
        shapes[f"base_model.model.{e.module}.lora_A.weight"] = e.a_shape
        shapes[f"base_model.model.{e.module}.lora_B.weight"] = e.b_shape
    dims = {key: (torch.Size([math.prod(shapes[key])]), torch.Size(shapes[key])) for key in sorted(shapes)}
    D = layout.dim
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy((rng.standard_normal((n, D)) * 0.01).astype(np.float32)), folder / "all_weights.pt")
    torch.save(dims, folder / "weight_dimensions.pt")
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 27, "target_modules": ["to_q", "to_v"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.save(torch.zeros(D), folder / "mean.pt")
    torch.save(torch.full((D,), 0.01), folder / "std.pt")
    # orthonormal without an SVD of a D x k matrix: k distinct coordinate axes, in random order
    V = torch.zeros(D, k)
    V[torch.from_numpy(rng.choice(D, size=k, replace=False)), torch.arange(k)] = 1.0
    torch.save(V, folder / "V.pt")


def open_both_ways(reg: Path, reps: int = 3) -> dict[str, float]:
    """Best-of-reps seconds to open the registered subspace: as the registry does (its components a memory map
    of the file, read only where used) and as it did (every array read into memory)."""
    from safetensors.numpy import load_file

    from w2w.subspace import SUBSPACE_FILE, Subspace

    path = next(reg.rglob(SUBSPACE_FILE))
    best = {"mapped": math.inf, "read": math.inf}
    for _ in range(reps):
        for name, fn in (("mapped", lambda: Subspace.load(path.parent)), ("read", lambda: load_file(str(path)))):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=10_000)
    p.add_argument("--n", type=int, default=32, help="release rows (models) imported before the space")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    work = args.out / f"release-basis-{args.n}-{args.k}"
    shutil.rmtree(work, ignore_errors=True)
    log(f"writing a release of {args.n} rows and a D x {args.k} V.pt under {work}")
    write_release(work / "release", args.n, args.k)
    from ingest.w2w_release import import_release
    from registry.registry import Registry

    import_release(Registry.init(work / "reg"), work / "release", progress=False)  # here: the child's peak is alone
    w2wreg = [sys.executable, "-m", "cli"]
    log("importing the space (a fresh process)")
    t0 = time.perf_counter()
    res = subprocess.run([*w2wreg, "--registry", str(work / "reg"), "fit", "--from-w2w-release",
                          str(work / "release"), "--json"], capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    if res.returncode:
        sys.exit(res.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    info = json.loads(res.stdout)
    v_bytes = 99_648 * args.k * 4
    print_table(
        ["k", "models", "V.pt", "peak RSS", "peak / V", "seconds"],
        [
            [
                args.k,
                args.n,
                f"{v_bytes / 2**30:.2f} GiB",
                f"{peak / 2**30:.2f} GiB",
                f"{peak / v_bytes:.2f}x",
                round(seconds, 1),
            ]
        ],  # fmt: skip
        title="fit --from-w2w-release",
    )
    opened = open_both_ways(work / "reg")
    print_table(
        ["mapped (Subspace.load)", "read whole (safetensors load_file)", "ratio"],
        [[f"{opened['mapped']:.4f} s", f"{opened['read']:.3f} s", f"{opened['read'] / opened['mapped']:.0f}x"]],
        title="opening the registered subspace (as commands do; page cache warm; a projection still reads all of V)",
    )
    emit_result({"k": info["k"], "n": args.n, "peak_rss_bytes": peak, "v_bytes": v_bytes, "seconds": seconds,
                 "open_seconds": opened, "env": env_info()})  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

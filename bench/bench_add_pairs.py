"""What keeping exact dW pairs at add costs (registry.delta_pairs): import with and without them, side by side.

    python bench/bench_add_pairs.py [--n 500] [--blocks 2] [--rounds 2]

Makes n SD 1.5 LoRA files as bench_hub_search does (every layout, planted near copies), then imports them into
fresh registries, alternating with pairs kept (PAIRS_AT_ADD nearest models a model) and without (0), `--rounds`
times each; prints files/s of both and their ratio (the machine is noisy: the ratio is the figure).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hub_search import chunks  # noqa: E402
from common import DEFAULT_OUT, emit_result, env_info, log, print_table, rounded  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    from ingest.importer import import_paths
    from registry import delta_pairs
    from registry.registry import Registry

    work = args.out / f"add-pairs-{args.n}-{args.blocks}"
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "loras"
    n_files = sum(len(files) for files, _ in chunks(args.n, args.n, args.blocks, folder))
    kept = delta_pairs.PAIRS_AT_ADD
    times: dict[int, list[float]] = {kept: [], 0: []}
    for r in range(args.rounds):
        for pairs in (kept, 0):
            delta_pairs.PAIRS_AT_ADD = pairs
            reg = Registry.init(work / f"reg-{pairs}-{r}")
            t0 = time.perf_counter()
            report = import_paths(reg, [folder])
            times[pairs].append(time.perf_counter() - t0)
            assert not report.errors, report.errors[:3]
            log(f"round {r + 1}: {pairs} pairs a model: {n_files / times[pairs][-1]:.1f} files/s")
            shutil.rmtree(work / f"reg-{pairs}-{r}")
    delta_pairs.PAIRS_AT_ADD = kept
    shutil.rmtree(work, ignore_errors=True)
    with_s, without_s = min(times[kept]), min(times[0])
    print_table(
        ["import", "files/s (best round)", "ratio"],
        [
            (f"keeping {kept} exact pairs a model", rounded(n_files / with_s), rounded(without_s / with_s)),
            ("keeping none", rounded(n_files / without_s), 1.0),
        ],
    )
    emit_result(
        {
            "bench": "add_pairs",
            "files": n_files,
            "pairs_at_add": kept,
            "with_files_per_s": n_files / with_s,
            "without_files_per_s": n_files / without_s,
            "ratio": without_s / with_s,
            "env": env_info(),
        }
    )


if __name__ == "__main__":
    main()

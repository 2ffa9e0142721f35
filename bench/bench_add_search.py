"""The sketch-neighbour search of `add`: a window of models at once (FamilySketches.nearest_many) vs a scan each.

    python bench/bench_add_search.py [--n 8192 65536] [--window 64] [--repeats 3]

For each N: a family of N random sketches (1,024 floats, as registry.sketches keeps them) and a window of models
near some of them; times finding the 24 nearest sketches of every model in the window, best of `--repeats`:
  * per model - one `index.search` each on one thread (add's path for a lone model, and every model's before);
  * window    - `FamilySketches.nearest_many` (one product with the stored sketches, then direct sums).
Checks both find the same neighbours; prints ms and the ratio per-model / window, then a RESULT JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, env_info, print_table, rounded  # noqa: E402

NEAREST = 24  # registry.delta_pairs.PAIRS_AT_ADD: what add searches for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from registry import index as coeff_index
    from registry.sketches import FamilySketches
    from w2w.delta import SKETCH_SIDE

    rows, results = [], []
    for n in args.n:
        rng = np.random.default_rng(0)
        stored = rng.standard_normal((n, SKETCH_SIDE**2), dtype=np.float32)
        fam = FamilySketches.build("bench", np.arange(n), np.ones(n), stored)
        window = stored[: args.window] + 0.01 * rng.standard_normal((args.window, SKETCH_SIDE**2), dtype=np.float32)
        per_model, batched = np.inf, np.inf
        for _ in range(args.repeats):
            t = time.perf_counter()
            with coeff_index.single_thread():
                one = [fam.index.search(q[None, :], NEAREST)[1][0] for q in window]
            per_model = min(per_model, time.perf_counter() - t)
            t = time.perf_counter()
            _, ids = fam.nearest_many(window, NEAREST)
            batched = min(batched, time.perf_counter() - t)
        assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(one, ids, strict=True))
        rows.append((n, rounded(per_model * 1e3), rounded(batched * 1e3), rounded(per_model / batched)))
        results.append({"n": n, "per_model_ms": per_model * 1e3, "window_ms": batched * 1e3})
    print_table([f"stored sketches ({args.window} models)", "one scan each, ms", "window, ms", "ratio"], rows)
    emit_result({"bench": "add_search", "window": args.window, "results": results, "env": env_info()})


if __name__ == "__main__":
    main()

"""Who is alike, by each search metric: hubs and shared labels among a registry's trained identities.

    w2wreg demo --out /tmp/demo                                  # a registry of toy identities with labels
    python bench/bench_search_alike.py /tmp/demo/registry [--where "kind = 'trained'"]

For every model matching --where, its nearest other such model by each metric (l2, cosine, delta on the raw
weights; w2w in the fitted subspace, which `w2wreg fit` made). Prints per metric: the largest number of
models one model is the nearest of (a hub), how many distinct models are someone's nearest, and the share of
binary labels a model has in common with its nearest, beside the share two models have in common by chance
(the mean over all pairs). The comparison of the issue: w2w against the raw-weight metrics, side by side.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, env_info, print_table  # noqa: E402

from registry.registry import Registry  # noqa: E402

METRICS = ("l2", "cosine", "delta", "w2w")


def labels(models) -> tuple[list[str], np.ndarray]:
    """The binary attributes every model carries, and (n, a) bool."""
    keys = sorted(set.intersection(*(set(k for k, v in m.attributes.items() if isinstance(v, bool)) for m in models)))
    return keys, np.array([[m.attributes[k] for k in keys] for m in models], dtype=bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("registry", type=Path)
    ap.add_argument("--where", default="kind = 'trained'")
    args = ap.parse_args()
    reg = Registry.open(args.registry)
    models = reg.ls(args.where)
    keys, Y = labels(models)
    if len(models) < 3 or not keys:
        sys.exit(
            f"{args.registry}: {len(models)} models match with {len(keys)} common binary labels; need >= 3 and >= 1"
        )
    at = {m.name: i for i, m in enumerate(models)}
    same = (Y[:, None, :] == Y[None, :, :]).mean(axis=2)
    chance = float(same[~np.eye(len(Y), dtype=bool)].mean())
    rows, out = [], {}
    for metric in METRICS:
        nearest = [reg.search(m.name, k=1, where=args.where, metric=metric).hits[0].model.name for m in models]
        hubs = Counter(nearest)
        shared = float(np.mean([same[i, at[n]] for i, n in enumerate(nearest)]))
        out[metric] = {"largest_hub": hubs.most_common(1)[0][1], "distinct": len(hubs), "shared_labels": shared}
        rows.append((metric, hubs.most_common(1)[0][1], len(hubs), f"{100 * shared:.1f}%"))
    print_table(
        ["metric", "nearest of at most", "distinct nearest", "labels shared with the nearest"],
        rows,
        title=f"{len(models)} models ({args.where}); labels {', '.join(keys)}; shared by chance {100 * chance:.1f}%",
    )
    emit_result({"env": env_info(), "models": len(models), "chance": chance, "metrics": out})


if __name__ == "__main__":
    main()

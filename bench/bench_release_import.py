"""Importing a w2w release (`w2wreg ingest --from-w2w-release`): models/s against the work every row needs anyway.

    python bench/bench_release_import.py [--n 1024] [--rounds 2] [--profile]
    python bench/bench_release_import.py --n 8192 --rounds 1     # 3.2 GB of rows; the paper's 64,974 is 8x that

Writes a release of n random rows in the paper's layout (SD 1.5 to_q/to_v at rank 1, D = 99,648:
bench_release_basis.write_release), then, alternating, `--rounds` times each:
  * import  - ingest.w2w_release.import_release into a fresh registry, as the command does (every model compared
              exactly with its PAIRS_AT_ADD sketch-nearest models: registry.delta_pairs);
  * no pairs - the same with PAIRS_AT_ADD = 0 (what keeping the pairs costs);
  * floor   - the rows read from the release and digested (sha256, norms, family, dW sketch: NewModel.digest) on
              the import's two threads, with nothing registered.
The release's file is read into the page cache before each side. Prints models/s (best round) and the ratios
import/floor and import/no-pairs, then a RESULT JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_release_basis import write_release  # noqa: E402
from common import DEFAULT_OUT, emit_result, env_info, log, print_table, rounded, warm_page_cache  # noqa: E402


def floor(folder: Path, chunk_rows: int, limit: int | None = None) -> float:
    """Seconds to read and digest every row (the first `limit`) as import_release does, registering nothing."""
    from ingest.w2w_release import BASE_MODEL, read_release
    from registry.registry import NewModel

    t0 = time.perf_counter()
    release = read_release(folder)
    n = len(release) if limit is None else min(limit, len(release))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, n, chunk_rows):
            block = release.rows(start, min(start + chunk_rows, n))
            models = [NewModel(f"r{i}", row, release.layout, BASE_MODEL) for i, row in enumerate(block)]
            for _ in pool.map(NewModel.digest, models):
                pass
    return time.perf_counter() - t0


def imported(folder: Path, reg_dir: Path, profile: Path | None) -> float:
    from ingest.w2w_release import import_release
    from registry.registry import Registry

    shutil.rmtree(reg_dir, ignore_errors=True)
    reg = Registry.init(reg_dir)
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    report = import_release(reg, folder, progress=False)
    if prof:
        prof.disable()
    seconds = time.perf_counter() - t0
    assert not report.errors and report.added, report.errors[:3]
    if prof:
        prof.dump_stats(profile)
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(15)
    shutil.rmtree(reg_dir)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="cProfile the first import (prints its top 15)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    from ingest.w2w_release import CHUNK_ROWS
    from registry import delta_pairs

    work = args.out / f"release-import-{args.n}"
    folder = work / "release"
    if not (folder / "all_weights.pt").exists():
        log(f"writing a release of {args.n} rows to {folder}")
        write_release(folder, args.n, 1)
    kept = delta_pairs.PAIRS_AT_ADD
    times: dict[str, list[float]] = {"import": [], "no pairs": [], "floor": []}
    # a process's first pass over this much data costs ~2x the CPU of later ones (new memory's page faults, as
    # malloc's mmap threshold settles): untimed, so that no side pays it
    floor(folder, CHUNK_ROWS, limit=1024)
    for r in range(args.rounds):
        warm_page_cache([folder / "all_weights.pt"])  # each side reads the rows from memory, not the disk
        times["floor"].append(floor(folder, CHUNK_ROWS))
        for side, pairs in (("import", kept), ("no pairs", 0)):
            warm_page_cache([folder / "all_weights.pt"])
            delta_pairs.PAIRS_AT_ADD = pairs
            try:
                profile = work / "import.prof" if args.profile and r == 0 and side == "import" else None
                times[side].append(imported(folder, work / "reg", profile))
            finally:
                delta_pairs.PAIRS_AT_ADD = kept
        log(f"round {r + 1}: " + ", ".join(f"{s} {args.n / t[-1]:.1f} models/s" for s, t in times.items()))
    best = {s: min(t) for s, t in times.items()}
    print_table(
        ["release rows", "models/s (best round)", "seconds", "floor / this"],
        [
            (
                f"import ({kept} exact pairs a model)",
                rounded(args.n / best["import"]),
                rounded(best["import"]),
                rounded(best["floor"] / best["import"]),
            ),
            (
                "import keeping no pairs",
                rounded(args.n / best["no pairs"]),
                rounded(best["no pairs"]),
                rounded(best["floor"] / best["no pairs"]),
            ),
            ("floor: read + digest", rounded(args.n / best["floor"]), rounded(best["floor"]), 1.0),
        ],
    )
    print(
        f"import runs at {best['floor'] / best['import']:.2f}x the floor's rate; keeping pairs costs "
        f"{best['import'] / best['no pairs']:.2f}x the import without them"
    )
    emit_result(
        {
            "bench": "release_import",
            "n": args.n,
            "pairs_at_add": kept,
            "models_per_s": args.n / best["import"],
            "no_pairs_models_per_s": args.n / best["no pairs"],
            "floor_models_per_s": args.n / best["floor"],
            "ratio_to_floor": best["floor"] / best["import"],
            "env": env_info(),
        }
    )


if __name__ == "__main__":
    main()

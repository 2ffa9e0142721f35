"""Import throughput: `w2wreg add` of a folder of w2w-shaped LoRA files vs just reading them with safetensors.

    python bench/bench_import.py [--n 2000] [--out DIR] [--repeats 2] [--no-cli] [--profile]

Measures, on files already in the page cache:
  * floor     - safetensors.numpy.load_file and safetensors.torch.load_file of every file (the faster is
                the floor); measured before, between and after the imports so drift shows;
  * import    - ingest.importer.import_paths(registry, [folder], attrs_csv=csv) on a fresh registry,
                in-process, into a fresh registry each repeat;
  * CLI       - `w2wreg --registry DIR add FOLDER --attrs-csv CSV` once, via subprocess (includes the
                interpreter start-up and imports; `w2wreg --version` is timed too, as the start-up cost).
Reports files/s (best and median) and the ratio import/floor (target >= 0.5), then a RESULT JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_OUT,
    emit_result,
    ensure_loras,
    env_info,
    log,
    print_table,
    rounded,
    scratch_dir,
    warm_page_cache,
)

TARGET_RATIO = 0.5


def time_floor(files: list[Path], loader) -> float:
    t0 = time.perf_counter()
    for f in files:
        loader(str(f))
    return time.perf_counter() - t0


def time_import(folder: Path, csv_path: Path, out: Path, n: int, profile: bool = False) -> float:
    from ingest.importer import import_paths
    from registry.registry import Registry

    root = scratch_dir(out, "import")
    try:
        prof = cProfile.Profile() if profile else None
        registry = Registry.init(root)  # `w2wreg init` is its own command: not part of `add`
        # Start from clean page cache state: the previous run's 800 MB of dirty pages would otherwise be
        # written back during this one, and the kernel throttles writers while it does (the import writes
        # its vectors; the floor only reads), which made the figure swing 2x between runs.
        os.sync()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        report = import_paths(registry, [folder], attrs_csv=csv_path)
        if prof:
            prof.disable()
        dt = time.perf_counter() - t0
        assert report.committed and len(report.added) == n, report.to_json()
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            print("\nprofile of one import (main thread only; reader threads are not profiled), by tottime:")
            print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
        return dt
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cli_command() -> list[str]:
    exe = shutil.which("w2wreg")
    return [exe] if exe else [sys.executable, "-m", "cli"]


def time_cli(folder: Path, csv_path: Path, out: Path, n: int) -> tuple[float, float]:
    """(seconds for `w2wreg add`, best seconds for `w2wreg --version`)."""
    cmd = cli_command()
    startup = min(_run([*cmd, "--version"]) for _ in range(3))
    root = scratch_dir(out, "cli")
    try:
        _run([*cmd, "--registry", str(root), "init"])
        dt = _run([*cmd, "--registry", str(root), "add", str(folder), "--attrs-csv", str(csv_path)])
        from registry.registry import Registry

        count = sum(s.n_models for s in Registry.open(root).spaces())
        assert count == n, f"CLI import registered {count} models, expected {n}"
        return dt, startup
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of LoRA files (default 2000)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache/scratch folder (default bench/out)")
    ap.add_argument("--repeats", type=int, default=2, help="in-process imports, alternated with floor reads")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI subprocess timing")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra import and print the top lines")
    args = ap.parse_args(argv)

    import safetensors.numpy
    import safetensors.torch

    folder, csv_path, files = ensure_loras(args.n, args.out)
    n = len(files)
    nbytes = warm_page_cache([*files, csv_path])
    log(f"{n} files, {nbytes / 1e6:,.1f} MB, page cache warmed")
    loaders = {"numpy": safetensors.numpy.load_file, "torch": safetensors.torch.load_file}
    for load in loaders.values():
        load(str(files[0]))  # first-call costs (imports, allocator) outside the timings

    floor: dict[str, list[float]] = {k: [] for k in loaders}
    imports: list[float] = []

    def floor_round() -> None:
        for name, load in loaders.items():
            floor[name].append(time_floor(files, load))
        log(f"floor: numpy {n / floor['numpy'][-1]:,.0f} files/s, torch {n / floor['torch'][-1]:,.0f} files/s")

    floor_round()
    for r in range(args.repeats):  # floor, import, floor, import, floor: drift hits both sides
        imports.append(time_import(folder, csv_path, args.out, n))
        log(f"import {r + 1}/{args.repeats}: {imports[-1]:.2f} s = {n / imports[-1]:,.1f} files/s")
        floor_round()
    if args.profile:
        time_import(folder, csv_path, args.out, n, profile=True)

    cli_s = startup_s = None
    if not args.no_cli:
        cli_s, startup_s = time_cli(folder, csv_path, args.out, n)
        log(f"CLI add: {cli_s:.2f} s (start-up alone {startup_s:.2f} s)")

    def fps(times: list[float]) -> tuple[float, float]:
        return n / min(times), n / sorted(times)[len(times) // 2]  # best, median (upper median)

    np_best, np_med = fps(floor["numpy"])
    th_best, th_med = fps(floor["torch"])
    floor_name = "numpy" if np_best >= th_best else "torch"
    fl_best, fl_med = (np_best, np_med) if floor_name == "numpy" else (th_best, th_med)
    im_best, im_med = fps(imports)
    ratio_best, ratio_med = im_best / fl_best, im_med / fl_med

    rows = [
        ["floor: safetensors.numpy.load_file", np_best, np_med, len(floor["numpy"])],
        ["floor: safetensors.torch.load_file", th_best, th_med, len(floor["torch"])],
        ["import_paths (in-process)", im_best, im_med, len(imports)],
    ]
    if cli_s is not None:
        rows.append(["CLI `w2wreg add` (incl. start-up)", n / cli_s, n / cli_s, 1])
        rows.append(["CLI minus `w2wreg --version` time", n / max(cli_s - startup_s, 1e-9), None, 1])
    print_table(
        ["files/s", "best", "median", "runs"],
        rows,
        title=f"import of {n} w2w LoRA files ({nbytes / 1e6:,.0f} MB, page cache warm)",
    )
    print(
        f"\nfloor = {floor_name}.  import/floor ratio: best {ratio_best:.3f}, median {ratio_med:.3f} "
        f"(target >= {TARGET_RATIO}) -> {'OK' if ratio_best >= TARGET_RATIO else 'BELOW TARGET'}"
    )
    if cli_s is not None:
        print(f"CLI add took {cli_s:.2f} s; `w2wreg --version` alone {startup_s:.2f} s")

    emit_result(
        {
            "bench": "import",
            "n": n,
            "bytes": nbytes,
            "floor": floor_name,
            "floor_numpy_fps": {"best": rounded(np_best), "median": rounded(np_med)},
            "floor_torch_fps": {"best": rounded(th_best), "median": rounded(th_med)},
            "import_fps": {"best": rounded(im_best), "median": rounded(im_med)},
            "import_seconds": [rounded(t) for t in imports],
            "ratio_import_over_floor": {"best": rounded(ratio_best), "median": rounded(ratio_med)},
            "target_ratio": TARGET_RATIO,
            "meets_target": ratio_best >= TARGET_RATIO,
            "cli_seconds": rounded(cli_s) if cli_s is not None else None,
            "cli_fps": rounded(n / cli_s) if cli_s is not None else None,
            "cli_startup_seconds": rounded(startup_s) if startup_s is not None else None,
            "env": env_info(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

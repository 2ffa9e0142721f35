"""Shared helpers for the benchmarks: cached synthetic LoRA folders and registries, tables, RESULT lines.

The benchmarks are run as scripts (`python bench/bench_import.py`), so this file is imported as a
top-level module from the bench/ folder. Generated data lives under bench/out/ (git-ignored):

    bench/out/loras-<n>/       n w2w-shaped diffusers LoRA files + attributes.csv (+ .bench-complete)
    bench/out/registry-<n>/    a registry built from them by ingest.importer.import_paths

Both are reused across runs when present and complete; delete them to regenerate.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out"
MARKER = ".bench-complete"
PREFIX = "identity"

if str(REPO_ROOT) not in sys.path:  # run from anywhere, even without the editable install
    sys.path.insert(0, str(REPO_ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- cached inputs -------------------------------------------------------------------------------


def _complete(folder: Path, n: int) -> bool:
    marker = folder / MARKER
    return marker.exists() and marker.read_text().strip() == str(n)


def ensure_loras(n: int, out: Path = DEFAULT_OUT) -> tuple[Path, Path, list[Path]]:
    """(folder, attributes.csv, LoRA files) of n synthetic w2w LoRAs (diffusers format, D=99,648).

    Generated once with ingest.synthetic.Population(sd15_layout("w2w")).write(...) into a temporary
    folder that is renamed into place when complete, then reused.
    """
    folder = Path(out) / f"loras-{n}"
    if not _complete(folder, n):
        from ingest.synthetic import Population
        from w2w.presets import sd15_layout

        log(f"generating {n} LoRA files in {folder} (once; reused afterwards)")
        t0 = time.perf_counter()
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".loras-{n}-", dir=folder.parent))
        Population(sd15_layout("w2w")).write(tmp, n, formats=("diffusers",), prefix=PREFIX)
        (tmp / MARKER).write_text(f"{n}\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        log(f"generated {n} files in {time.perf_counter() - t0:.1f} s")
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == n, f"{folder} holds {len(files)} LoRA files, expected {n}; delete it to regenerate"
    return folder, folder / "attributes.csv", files


def code_digest() -> str:
    """Short sha256 of the library's sources (w2w, registry, ingest, cli): ties figures to a code state."""
    h = hashlib.sha256()
    for pkg in ("w2w", "registry", "ingest", "cli"):
        for p in sorted((REPO_ROOT / pkg).rglob("*.py")):
            h.update(str(p.relative_to(REPO_ROOT)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def ensure_registry(n: int, out: Path = DEFAULT_OUT) -> Path:
    """A registry holding the n LoRAs of ensure_loras(n), built by the real import path.

    Reused while the library's code is unchanged (its digest is kept next to the marker); rebuilt otherwise,
    so a change to how models are stored never leaves the search benchmark on a stale registry.
    """
    from ingest.importer import import_paths
    from registry.registry import Registry

    root = Path(out) / f"registry-{n}"
    digest = code_digest()
    stamp = root / ".bench-code"
    if _complete(root, n) and stamp.exists() and stamp.read_text().strip() == digest:
        return root
    folder, csv_path, _ = ensure_loras(n, out)
    log(f"building registry {root} by importing {n} files (reused until the library code changes)")
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    report = import_paths(Registry.init(root), [folder], attrs_csv=csv_path)
    assert report.committed and len(report.added) == n, report.to_json()
    stamp.write_text(f"{digest}\n")
    (root / MARKER).write_text(f"{n}\n")
    log(f"built registry in {time.perf_counter() - t0:.1f} s")
    return root


def read_attributes(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def warm_page_cache(paths: Sequence[Path]) -> int:
    """Read every file once so later reads come from the page cache. Returns bytes read."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def scratch_dir(out: Path, prefix: str) -> Path:
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"tmp-{prefix}-", dir=out))


# --- figures -------------------------------------------------------------------------------------


def pct(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def env_info() -> dict:
    import duckdb
    import safetensors

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "duckdb": duckdb.__version__,
        "safetensors": safetensors.__version__,
        "cpus": os.cpu_count(),
        "code_digest": code_digest(),
        "git_head": _git_head(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def _git_head() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def print_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:,.3f}" if abs(c) < 100 else f"{c:,.1f}"
    return str(c)


def emit_result(data: dict) -> None:
    print("RESULT " + json.dumps(data, sort_keys=True, default=_json_default), flush=True)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def rounded(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")

"""`w2wreg serve`: a push (huggingface_hub upload_file -> commit -> indexed) against a local `w2wreg add` of
the same file, and a pull (hf_hub_download) against reading the file from disk, side by side.

    python bench/bench_serve.py [--n 100]
    python bench/bench_serve.py --large [--size-mb 2048] [--path default|lfs|both] [--profile-client]
                                                                                     (bench/serve_large.py)

Data: the first n of bench/out/loras-2000-style w2w LoRA files (diffusers format, D = 99,648, 400 KB
each; made once by common.ensure_loras). The server runs in this process on a loopback port (uvicorn in a
thread), on a fresh registry; the client is the unmodified huggingface_hub HfApi. Sides, per model:
  push   create_repo + upload_file of pytorch_lora_weights.safetensors (preupload, NDJSON commit, the
         LoRA checked, stored, committed, then registered in the server's registry)
  add    ingest.importer.import_paths of the same file into another fresh registry, one call per file (what a user
         running `w2wreg add FILE` per model gets, minus the process start)
  pull   hf_hub_download of the pushed file into an empty cache
  read   reading the file's bytes from disk (page cache warm)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, ensure_loras, env_info, log, print_table  # noqa: E402

TOKEN = "bench-token-0123"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--pool", type=int, default=2000, help="the LoRA folder to take them from (loras-POOL)")
    ap.add_argument("--large", action="store_true", help="one big file up and down instead (bench/serve_large.py)")
    ap.add_argument("--size-mb", type=int, default=2048, help="--large: the file's size")
    ap.add_argument("--path", choices=["default", "lfs", "both"], default="both", help="--large: the client's path")
    ap.add_argument("--dir", type=Path, default=None, help="--large: where the file and the hub go (default: temp)")
    ap.add_argument("--profile-client", action="store_true", help="--large: where hf_hub_download's time goes")
    args = ap.parse_args()
    if args.large:
        import serve_large

        return serve_large.main(args)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

    import uvicorn
    from huggingface_hub import HfApi, hf_hub_download

    from ingest.importer import import_paths
    from registry.registry import Registry
    from server.app import create_app

    _, _, files = ensure_loras(args.pool)
    files = files[: args.n]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        hub_reg = Registry.init(tmp / "hub")
        server = uvicorn.Server(uvicorn.Config(create_app(hub_reg, {TOKEN: "bench"}), port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        api = HfApi(endpoint=url, token=TOKEN)
        local = Registry.init(tmp / "local")
        times: dict[str, list[float]] = {"push": [], "add": [], "pull": [], "read": []}
        log(f"{len(files)} LoRAs of {files[0].stat().st_size / 1e3:.0f} KB; server at {url}")
        for i, f in enumerate(files):
            repo = f"bench/m{i:05d}"
            # alternate which side goes first: neither always gets the warmer cache
            for side in ("push", "add") if i % 2 == 0 else ("add", "push"):
                t0 = time.perf_counter()
                if side == "push":
                    api.create_repo(repo)
                    api.upload_file(path_or_fileobj=str(f), path_in_repo="pytorch_lora_weights.safetensors",
                                    repo_id=repo)  # fmt: skip
                else:
                    report = import_paths(local, [f])
                    assert report.committed and report.added, report.to_json()
                times[side].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = hf_hub_download(repo, "pytorch_lora_weights.safetensors", endpoint=url, cache_dir=tmp / "cache")
            times["pull"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            f.read_bytes()
            times["read"].append(time.perf_counter() - t0)
            assert Path(got).read_bytes() == f.read_bytes()
        n_indexed = len(hub_reg.ls())
        same = all(
            np.array_equal(hub_reg.vector(f"bench.m{i:05d}"), local.vector(files[i].stem)) for i in range(len(files))
        )
        server.should_exit = True
        thread.join()

    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    push, add, pull, read = (p50[k] for k in ("push", "add", "pull", "read"))
    rows = [
        ("push (HTTP commit + index)", f"{push:.1f}", f"{1e3 / push:.0f}", f"{push / add:.2f}x add"),
        ("add (local, same file)", f"{add:.1f}", f"{1e3 / add:.0f}", "1.00x"),
        ("pull (hf_hub_download)", f"{pull:.1f}", f"{1e3 / pull:.0f}", f"{pull / read:.0f}x read"),
        ("read (file from disk)", f"{read:.2f}", f"{1e3 / read:.0f}", "1x"),
    ]
    print_table(["side", "p50 ms/model", "models/s", "ratio"], rows)
    print(f"indexed on push: {n_indexed}/{len(files)}; vectors identical to a local add: {same}")
    emit_result({"bench": "serve", "n": len(files), "p50_ms": p50, "indexed": n_indexed, "identical": same,
                 "env": env_info()})  # fmt: skip


if __name__ == "__main__":
    main()

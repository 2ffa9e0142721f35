"""The page's previews: one toy-base image through `w2wreg serve`, against the bare render, a cached answer,
and the render on torch's default thread count (what `serve` would do without setting one thread).

    python bench/bench_preview.py [--n 10] [--steps 20]

Data: 8 random LoRAs of the toy recipe's layout (rank 1, D = 2,912) on the embedded toy base, fitted, with a
direction; the server runs in this process on a loopback port (uvicorn in a thread). Sides, per image
(n seeds, each a new image; the median and p90 of n):
  http        GET /api/w2w/models/M/preview.png?seed=S&edit=glasses=1.5: weights read and edited under the
              registry's lock, the render in turn, the PNG (what the edit panel's slider waits for)
  render      ingest.preview.Previewer.png of the same model: the render alone, on one CPU thread
  cached      the same GET again: answered from the server's image cache
  threads     the bare render on torch's default thread count (the comparison for the one-thread choice)
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit_result, env_info, log, pct, print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="images per side (one seed each)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import torch
    import uvicorn

    from ingest.basemodel import TOY_BASE_ID, TOY_UNET_CONFIG
    from ingest.preview import Previewer
    from registry import edits, wspace
    from registry.registry import NewModel, Registry
    from server.app import create_app
    from w2w.flatten import unflatten
    from w2w.layout import Layout
    from w2w.lora import LoRA
    from w2w.presets import get_preset, unet_layout

    layout: Layout = unet_layout(TOY_UNET_CONFIG, get_preset("w2w").targets, rank=1, alpha=1.0)  # the toy recipe's
    rng = __import__("numpy").random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        reg = Registry.init(Path(tmp) / "reg")
        reg.add_models(
            NewModel.from_lora(
                f"toy-{i}",
                unflatten((rng.standard_normal(layout.dim) * 0.25).astype("float32"), layout),
                base_model=TOY_BASE_ID,
                attributes={"glasses": i % 2 == 0},
            )
            for i in range(8)
        )
        wspace.fit_space(reg, components=3)
        edits.fit_direction(reg, "glasses")
        previewer = Previewer()
        previewer.warm()
        server = uvicorn.Server(uvicorn.Config(create_app(reg, {}, renderer=previewer), port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]

        def get(seed: int) -> float:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            t0 = time.perf_counter()
            conn.request("GET", f"/api/w2w/models/toy-1/preview.png?seed={seed}&steps={args.steps}&edit=glasses=1.5")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            conn.close()
            return time.perf_counter() - t0

        m = reg.get("toy-1")
        lora: LoRA = reg.lora(m)
        seeds = range(1000, 1000 + args.n)
        log(f"{args.n} images per side, {args.steps} steps, 32 px")
        times = {
            "http": [get(s) for s in seeds],
            "cached": [get(s) for s in seeds],
            "render": [_timed(lambda s=s: previewer.png(m, lora, "sks person", s, args.steps, 32)) for s in seeds],
        }
        slow = Previewer(cpu_threads=None)
        slow.warm()
        times["threads"] = [_timed(lambda s=s: slow.png(m, lora, "sks person", s, args.steps, 32)) for s in seeds]
        server.should_exit = True
        thread.join(timeout=20)

    base = pct(times["render"], 50)
    rows = [(side, pct(t, 50), pct(t, 90), pct(t, 50) / base) for side, t in times.items()]
    print_table(
        ["side", "median s", "p90 s", "x render"],
        rows,
        f"one 32 px toy preview, {args.steps} steps (torch default threads: {torch.get_num_threads()})",
    )
    emit_result({"bench": "preview", "n": args.n, "steps": args.steps, "seconds": times, "env": env_info()})


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

"""One commit of many small files to `w2wreg serve`, against writing the same files to a folder.

    python bench/bench_commit_many.py [--n 100000] [--size 64] [--per-object-fsync]

Sides (each on a fresh folder of the same file system, under --dir, default a temp folder):
  folder   the n files written to a folder (open/write/close each), then one syncfs: the floor
  store    RepoStore.put_objects + commit of the same files: what the server does once the body is parsed
  commit   the whole push: HfApi.create_commit of n CommitOperationAdd (preupload in chunks of 256, the
           NDJSON body) to a server in this process, on loopback (--skip-http leaves it out)
--per-object-fsync stores each object with its own fsync, as the store did before (issue 14): the "before".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import emit_result, env_info, log, print_table  # noqa: E402

TOKEN = "bench-token-0123"


def files_of(n: int, size: int) -> dict[str, bytes]:
    # distinct contents (a content-addressed store would write equal files once), spread over folders
    return {f"d{i % 100:02d}/f{i:06d}.txt": (b"%08d" % i) * (size // 8) for i in range(n)}


def per_object_fsync(store_cls) -> None:
    """The store as it was before: an fsync per object."""
    store_cls.put_objects = lambda self, files: {p: self.put_object(d, fsync=True) for p, d in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=64, help="bytes per file")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--per-object-fsync", action="store_true", help="the store before issue 14, for comparison")
    ap.add_argument("--skip-http", action="store_true", help="time the store only, not the HTTP push")
    args = ap.parse_args()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

    from registry.hubs.store import RepoStore, sync_filesystem

    if args.per_object_fsync:
        per_object_fsync(RepoStore)
    files = files_of(args.n, args.size)
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-commit-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        log(f"{args.n} files of {args.size} bytes in {tmp}; per-object fsync: {args.per_object_fsync}")

        t0 = time.perf_counter()
        for p, data in files.items():
            (tmp / "folder" / p).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "folder" / p).write_bytes(data)
        sync_filesystem(tmp)
        times["folder"] = time.perf_counter() - t0

        store = RepoStore(tmp / "store")
        store.create("bench/many")
        t0 = time.perf_counter()
        store.commit("bench/many", store.put_objects(files), message="many")
        times["store"] = time.perf_counter() - t0
        assert len(store.resolve("bench/many").files) == args.n

        if not args.skip_http:
            times["commit"] = push_over_http(tmp, files)

    base = times["folder"]
    rows = [(side, f"{t:.2f}", f"{len(files) / t:,.0f}", f"{t / base:.1f}x") for side, t in times.items()]
    print_table(["side", "seconds", "files/s", "vs folder"], rows)
    emit_result({"bench": "commit_many", "n": args.n, "size": args.size, "per_object_fsync": args.per_object_fsync,
                 "seconds": times, "env": env_info()})  # fmt: skip


def push_over_http(tmp: Path, files: dict[str, bytes]) -> float:
    import uvicorn
    from huggingface_hub import CommitOperationAdd, HfApi

    from registry.registry import Registry
    from server.app import create_app

    reg = Registry.init(tmp / "hub")
    app = create_app(reg, {TOKEN: "bench"}, max_upload=4 << 30)
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        api = HfApi(endpoint=f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", token=TOKEN)
        api.create_repo("bench/many")
        ops = [CommitOperationAdd(p, d) for p, d in files.items()]
        t0 = time.perf_counter()
        api.create_commit("bench/many", ops, commit_message="many")
        took = time.perf_counter() - t0
        assert len(api.list_repo_files("bench/many")) == len(files) + 1  # and .gitattributes
        return took
    finally:
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()

"""`python bench/bench_serve.py --large`: one big file through `w2wreg serve`, against a plain local copy.

    python bench/bench_serve.py --large [--size-mb 2048] [--path default|lfs|both] [--dir DIR]

The server is a `w2wreg serve` subprocess (so its memory is its own: peak RSS from /proc/PID/status VmHWM,
reset before each side through /proc/PID/clear_refs); the clients are the unmodified `hf` CLI and
huggingface_hub, each in its own process. Sides, on the same random file of --size-mb:
  copy            shutil.copyfile of the file to another file of the same folder (what `cp` does): the
                  comparison, timed just before and just after each side (mean of the two)
  upload          `hf upload NS/NAME FILE`: preupload, then (default path) the file base64-encoded in the
                  NDJSON commit body, or (lfs path: `serve --lfs` and HF_HUB_DISABLE_XET=1) the Git LFS
                  batch API (multipart for big files), then the commit
  download        hf_hub_download of it into an empty cache
  plain download  the same GET of `resolve` read by http.client into an 8 MiB buffer and written to a file:
                  a client that does no more than a copy does, so this row is the server's own speed (the
                  difference to the hf_hub_download row is the client's)
Each row: seconds, MB/s, copy time / side time (1.0 = as fast as a copy; the target is >= 0.5), and the
server's peak RSS during that side (the target is < 300 MB whatever the file size), and the CPU seconds the
server and the client used (on a machine shared with other work, wall time is noisy; CPU time less so).
The download rows also give the call alone, timed inside the client process ("call s", "x copy (call)",
"call CPU s"): without the interpreter's start and the import of huggingface_hub, which a script that
downloads has paid already (the process's own seconds include them: ~0.7 CPU-s here). "bound" is the
copy's CPU seconds over the client's (its call's, where timed): about the best "x copy speed" that client
can reach however fast the server, since its transfer runs in one thread (wall >= its CPU) and a cached
copy is CPU-bound (wall a little over its CPU); unlike wall times it holds on a loaded machine.
The title gives the server's RSS at rest (it loads no preview machinery until a preview is asked for) and
after one preview of a toy model (torch, diffusers and the toy base then loaded).

--profile-client runs the hf_hub_download side once more under cProfile (not timed) and prints where the
client's time goes: its file writes, its socket reads, httpx's assembling of 10 MiB chunks, h11's parsing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit_result, env_info, log, print_table

TOKEN = "bench-large-token-0123"
TOY = "toy-0"  # a model of the embedded toy base in the served registry: what the one preview draws
REPO = "bench/large"
BIN = Path(sys.executable).parent  # the venv's `w2wreg` and `hf`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 24)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            block = block[1:] + block[:1]  # not the same 16 MB over and over (no dedup anywhere helps)
            left -= n


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: the peak RSS starts again from the current RSS


class Server:
    def __init__(self, root: Path, lfs: bool, max_upload_mb: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(BIN / "w2wreg"), "--registry", str(root / "hub"), "serve", "--port", str(self.port),
               "--token", TOKEN, "--max-upload-mb", str(max_upload_mb), "--log-level", "warning"]  # fmt: skip
        self.log = root / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd + (["--lfs"] if lfs else []), stderr=log)
        deadline = time.monotonic() + 120
        while True:  # listening (it loads its preview base at the first preview, which this does not ask for)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("w2wreg serve did not start") from None
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _client_env(url: str, lfs: bool) -> dict:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    if lfs:
        env["HF_HUB_DISABLE_XET"] = "1"  # the client's LFS path (with hf_xet it would go to Xet)
    return env


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used: /proc/PID/stat fields 14 and 15, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


CLIENT_COPIES = 6  # huggingface_hub's commit of a "regular" file: the bytes, base64, its str, the JSON, its bytes


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _copy_seconds(src: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain copy of the file (then removed): the comparison, made next to each
    side so that both meet the same page cache and the same load (this VM's first touch of fresh memory is
    slow: copies vary 5x). The copy is sendfile in the kernel, CPU-bound on a cached file: its CPU seconds
    are about its wall time on an idle machine, and are much less disturbed by other work than wall time."""
    dst = src.with_name("copy.bin")
    c0, t0 = _self_cpu(), time.perf_counter()
    shutil.copyfile(src, dst)
    took, cpu = time.perf_counter() - t0, _self_cpu() - c0
    dst.unlink()
    return took, cpu


def _timed(server: Server, cmd: list[str], env: dict, src: Path) -> dict:
    """Wall seconds, the server's peak RSS, the CPU seconds of the server and of the client, and the mean of
    a plain copy's seconds just before and just after."""
    before = _copy_seconds(src)
    _reset_peak(server.proc.pid)
    cpu0, client0 = _cpu(server.proc.pid), _children_cpu()
    t0 = time.perf_counter()
    printed = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    took = time.perf_counter() - t0
    out = {"s": took, "peak_rss": _peak_rss(server.proc.pid), "server_cpu": _cpu(server.proc.pid) - cpu0,
           "client_cpu": _children_cpu() - client0}  # fmt: skip
    if printed and printed[-1].startswith('{"call_s"'):  # the client timed its call (CALL_TIMER)
        out |= json.loads(printed[-1])
    after = _copy_seconds(src)
    return out | {"copy_s": (before[0] + after[0]) / 2, "copy_cpu": (before[1] + after[1]) / 2}


CALL_TIMER = """
import json, resource, time
def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
_c0, _t0 = _cpu(), time.perf_counter()
"""
CALL_REPORT = """
print(json.dumps({"call_s": time.perf_counter() - _t0, "call_cpu": _cpu() - _c0}))
"""
# the call alone is timed too (CALL_*): what a script that already imported huggingface_hub pays, without
# the interpreter's start and the import (~0.7 CPU-s on this machine)
DOWNLOAD = (
    "import sys\nfrom huggingface_hub import hf_hub_download\n"
    + CALL_TIMER
    + "hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3])\n"
    + CALL_REPORT
)
PLAIN_DOWNLOAD = (
    """
import http.client, os, sys
port, repo, path, out = sys.argv[1:]
"""
    + CALL_TIMER
    + """
conn = http.client.HTTPConnection("127.0.0.1", int(port))
conn.request("GET", f"/{repo}/resolve/main/{path}", headers={"Authorization": "Bearer " + os.environ["HF_TOKEN"]})
resp = conn.getresponse()
assert resp.status == 200, resp.status
buf = bytearray(8 << 20)
with open(out, "wb", buffering=0) as f:
    while n := resp.readinto(buf):
        f.write(memoryview(buf)[:n])
"""
    + CALL_REPORT
)


def _toy_registry(path: Path) -> None:
    """A registry holding one model of the embedded toy base (so that the server has something to preview)."""
    import numpy as np

    from ingest.basemodel import TOY_BASE_ID, TOY_UNET_CONFIG
    from registry.registry import NewModel, Registry
    from w2w.flatten import unflatten
    from w2w.presets import get_preset, unet_layout

    layout = unet_layout(TOY_UNET_CONFIG, get_preset("w2w").targets, rank=1, alpha=1.0)  # the toy recipe's
    w = (np.random.default_rng(0).standard_normal(layout.dim) * 0.25).astype(np.float32)
    Registry.init(path).add_models([NewModel.from_lora(TOY, unflatten(w, layout), base_model=TOY_BASE_ID)])


def _rss_after_preview(server: Server) -> int:
    """The server's RSS once it drew one preview (503 while the toy base loads: asked again)."""
    import http.client

    deadline = time.monotonic() + 300
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        conn.request("GET", f"/api/w2w/models/{TOY}/preview.png?steps=2")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status == 200:
            break
        if resp.status != 503 or time.monotonic() > deadline:
            raise RuntimeError(f"the preview answered {resp.status}")
        time.sleep(0.5)
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


PROFILE_GROUPS = [  # (group, what in a cProfile row's function names it): the client's own code paths
    ("file writes (the .incomplete file)", "method 'write' of '_io.BufferedWriter'"),
    ("socket reads (64 KiB recv)", "method 'recv' of '_socket.socket'"),
    ("httpx: 10 MiB chunks assembled (BytesIO)", "method 'write' of '_io.BytesIO'"),
    ("httpx: chunk slicing", "_decoders.py"),
    ("h11 parsing", "h11/"),
]


def profile_client(root: Path, env: dict) -> list[tuple[str, float, float]]:
    """(group, seconds, share) of one hf_hub_download under cProfile, by the functions' own time."""
    import pstats

    script, out = root / "download.py", root / "download.prof"
    script.write_text(DOWNLOAD)
    cache = root / "profile-cache"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), str(script), REPO, "big.bin", str(cache)],
                   env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)
    stats = pstats.Stats(str(out)).stats  # {(file, line, name): (calls, ncalls, own time, cumulative, callers)}
    total = sum(v[2] for v in stats.values())
    rows = []
    for group, needle in PROFILE_GROUPS:
        own = sum(v[2] for k, v in stats.items() if needle in f"{k[0]}:{k[2]}")
        rows.append((group, own, own / total))
    rest = total - sum(r[1] for r in rows)
    return [*rows, ("the rest (start, imports, HEAD, ...)", rest, rest / total), ("total", total, 1.0)]


def run_path(tmp: Path, src: Path, lfs: bool, size_mb: int, profile: bool = False) -> tuple[list[dict], list]:
    name = "lfs" if lfs else "default"
    root = tmp / name
    root.mkdir()
    _toy_registry(root / "hub")
    server = Server(root, lfs=lfs, max_upload_mb=size_mb + 64)
    try:
        env = _client_env(server.url, lfs)
        subprocess.run([str(BIN / "hf"), "repos", "create", REPO], env=env, check=True, stdout=subprocess.DEVNULL)
        idle = _peak_rss(server.proc.pid)
        up = _timed(server, [str(BIN / "hf"), "upload", REPO, str(src), "big.bin"], env, src)
        down = _timed(server, [sys.executable, "-c", DOWNLOAD, REPO, "big.bin", str(root / "cache")], env, src)
        got = next((root / "cache").rglob("snapshots/*/big.bin"))
        assert got.stat().st_size == src.stat().st_size, "the download is not the file"
        got.unlink()  # (the blob it links to stays: a file system of the size of two copies is enough)
        plain_cmd = [sys.executable, "-c", PLAIN_DOWNLOAD, str(server.port), REPO, "big.bin", str(root / "plain.bin")]
        plain = _timed(server, plain_cmd, env, src)
        assert (root / "plain.bin").stat().st_size == src.stat().st_size, "the download is not the file"
        (root / "plain.bin").unlink()
        prof = profile_client(root, env) if profile else []
        previewed = _rss_after_preview(server)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    at_rest = {"idle_rss": idle, "preview_rss": previewed}
    return [
        {"path": name, "side": "upload (hf upload)", **at_rest, **up},
        {"path": name, "side": "download (hf_hub_download)", **at_rest, **down},
        {"path": name, "side": "download (plain HTTP)", **at_rest, **plain},
    ], prof


def main(args) -> None:
    size = args.size_mb << 20
    with tempfile.TemporaryDirectory(prefix="bench-serve-large-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        src = tmp / "big.bin"
        log(f"writing {args.size_mb} MB of random bytes to {src}")
        _random_file(src, size)
        rows, profiles = [], []
        for lfs in {"default": [False], "lfs": [True], "both": [False, True]}[args.path]:
            if not lfs and _available() < CLIENT_COPIES * size:
                need, have = CLIENT_COPIES * size >> 20, _available() >> 20
                log(f"skipping the default path: its client would hold ~{need} MB, {have} MB are free")
                continue
            log(f"{'lfs' if lfs else 'default'} path: server, upload, download")
            got, prof = run_path(tmp, src, lfs, args.size_mb, profile=args.profile_client and not profiles)
            rows += got
            profiles += prof
    mb = size / 1e6
    table = [
        (
            r["path"],
            r["side"],
            r["s"],
            mb / r["s"],
            r["copy_s"],
            r["copy_s"] / r["s"],
            r["peak_rss"] / 1e6,
            r["server_cpu"],
            r["client_cpu"],
            r.get("call_s", float("nan")),
            r["copy_s"] / r.get("call_s", float("nan")),
            r.get("call_cpu", float("nan")),
            r["copy_cpu"],
            r["copy_cpu"] / r.get("call_cpu", r["client_cpu"]),
        )  # fmt: skip
        for r in rows
    ]
    heads = ["client path", "side", "seconds", "MB/s", "copy s", "x copy speed", "server peak RSS MB", "server CPU s",
             "client CPU s", "call s", "x copy (call)", "call CPU s", "copy CPU s", "bound"]  # fmt: skip
    idle, previewed = rows[-1]["idle_rss"] / 1e6, rows[-1]["preview_rss"] / 1e6
    load = os.getloadavg()[0]
    title = f"{args.size_mb} MB file (server RSS at rest {idle:.0f} MB, after one preview {previewed:.0f} MB; "
    title += f"load {load:.1f})"
    print_table(heads, table, title=title)
    if profiles:
        print_table(["hf_hub_download's time (cProfile, own time)", "seconds", "share"], profiles,
                    title="where the client's time goes")  # fmt: skip
    emit_result({"bench": "serve_large", "size_mb": args.size_mb, "rows": rows, "client_profile": profiles,
                 "load": load, "env": env_info()})  # fmt: skip

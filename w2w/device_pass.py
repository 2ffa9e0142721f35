"""The Gram pass in torch on a device (`fit --device cuda`): P = Z^T Z G with the blocks streamed from the
source through host buffers, standardized and multiplied on the device, summed there in place.

Two host buffers per block size, filled by a reader thread while the device works on the other: block i+1
goes into the buffer block i-1 used, once that block's copy to the device has finished (a CUDA event).
The buffers are pinned (page-locked) only when the device is CUDA, where pinning is what lets the copy
run asynchronously; on the CPU the "copy" is the buffer itself and it is standardized in place. The code
is the same on both, so the tests run it on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from w2w.errors import DeviceError


def resolve_device(device: str) -> Any:
    """torch.device(device), or a one-line DeviceError when it is a CUDA device torch cannot use here."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}: use cpu or cuda (cuda:N for the N-th GPU)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"--device {device}: torch {torch.__version__} ({built}) sees no CUDA GPU here; "
            "run the fit with --device cpu or without --device"
        )
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device}: only cpu and cuda are supported")
    return dev


def stream_blocks(source: Any, specs: list[Any], dev: Any) -> Iterator[Any]:
    """The source's blocks as float32 (b, D) tensors on `dev`, each one's to modify in place."""
    import torch

    cuda = dev.type == "cuda"
    buffers: dict[int, list[Any]] = {}
    copied: dict[int, Any] = {}  # id(buffer) -> the CUDA event after its last copy to the device

    def load(spec: Any) -> Any:
        b = spec[-1] - spec[-2]
        if b not in buffers:
            buffers[b] = [torch.empty((b, source.dim), dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
        pair = buffers[b]
        pair.reverse()  # the other one than last time
        buf = pair[0]
        if id(buf) in copied:
            copied.pop(id(buf)).synchronize()  # its previous block is on the device: it may be overwritten
        arr = buf.numpy()
        if hasattr(source, "load_into"):
            source.load_into(spec, arr)
        else:
            arr[...] = source.load(spec)
        return buf

    if not specs:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, specs[0])
        for i in range(len(specs)):
            host = nxt.result()
            Z = host.to(dev, non_blocking=True)  # on the CPU: host itself
            if cuda:
                event = torch.cuda.Event()
                event.record()
                copied[id(host)] = event
            if i + 1 < len(specs):
                nxt = pool.submit(load, specs[i + 1])
            yield Z


def torch_stats_pass(source: Any, specs: list[Any], seed: int, l: int, device: str) -> Iterator[tuple]:
    """subspace.block_stats of every block, computed on `device`: (count, mean, M2, sketch^T, colsum of
    Omega) per block as float64 numpy arrays, for subspace.merge_stats. Omega's rows are drawn on the host
    from (seed, lo) as the numpy pass draws them, so both passes sketch with the same matrix."""
    import torch

    from w2w.subspace import sketch_rows

    dev = resolve_device(device)
    for spec, W in zip(specs, stream_blocks(source, specs, dev), strict=True):
        b = W.shape[0]
        mean = W.sum(dim=0, dtype=torch.float64) / b  # (D,)
        omega = torch.from_numpy(sketch_rows(seed, spec, l)).to(dev)  # (b, l)
        sketch_t = omega.T @ W  # (l, D)
        W.sub_(mean.float()).square_()
        m2 = W.sum(dim=0, dtype=torch.float64)
        yield b, mean.cpu().numpy(), m2.cpu().numpy(), sketch_t.cpu().numpy(), omega.sum(dim=0).double().cpu().numpy()


def torch_gram_pass(
    source: Any,
    specs: list[Any],
    mean: np.ndarray,
    std: np.ndarray,
    G: np.ndarray,
    device: str,
    Y: Any = None,
    full: bool = True,
) -> np.ndarray | None:
    """Z^T Z G (D, l) float32 for Z the standardized rows of `source`, the products on `device`; Z G goes
    into Y's rows (`Y[lo:hi] = rows`) at the end of the pass. Without `full` Z G alone (None is returned)."""
    import torch

    dev = resolve_device(device)
    mean_d, std_d = torch.from_numpy(mean).to(dev), torch.from_numpy(std).to(dev)
    G_d = torch.from_numpy(np.ascontiguousarray(G, dtype=np.float32)).to(dev)  # (D, l)
    acc = torch.zeros((G.shape[1], source.dim), dtype=torch.float32, device=dev) if full else None  # P^T (l, D)
    ZG = torch.empty((source.n, G.shape[1]), dtype=torch.float32, device=dev)  # to the host once, not per block
    for spec, Z in zip(specs, stream_blocks(source, specs, dev), strict=True):
        Z.sub_(mean_d).div_(std_d)  # (b, D)
        Yb = ZG[spec[-2] : spec[-1]]
        torch.matmul(Z, G_d, out=Yb)  # (b, l)
        if acc is not None:
            acc.addmm_(Yb.T, Z)  # += Y^T Z, in place (no (l, D) product per block)
    del G_d
    if Y is not None:
        step = max(1, (64 << 20) // (4 * max(G.shape[1], 1)))  # 64 MB of host memory at a time
        for lo in range(0, source.n, step):
            Y[lo : lo + step] = ZG[lo : lo + step].cpu().numpy()
    return None if acc is None else np.ascontiguousarray(acc.cpu().numpy().T)  # (D, l)

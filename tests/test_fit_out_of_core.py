"""The fit with its Krylov basis on disk, its memory plan, its in-place Rayleigh-Ritz step and its device pass."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PLANTED_LAYOUT, w2wreg, w2wreg_json

from ingest.synthetic import Population
from registry import wspace
from registry.integrity import verify
from registry.registry import NewModel, Registry
from w2w.fit_plan import GB, FitPlan, choose
from w2w.krylov_basis import chunk_rows
from w2w.rayleigh_ritz import ritz
from w2w.subspace import ArraySource, FitConfig, SubspaceError, fit

# The paths run the same float32 operations on the same values (chunks read back from disk are exact copies
# of the blocks; torch and numpy both sum float32 products); only the order of the float32 sums may differ
# (BLAS kernels chosen by alignment, torch summing all blocks into one accumulator). An entry of a product
# over c terms then moves by at most c u sum|a_i b_i| (u = 2^-24): c <= max(N, D) = 600 gives 3.6e-5 of the
# entries' scale. Weyl bounds the Ritz values' move by ||dM|| (theta = sigma^2, so sigma moves by half that,
# relative): RTOL = 3.6e-5. A Ritz vector moves by ||dM|| / gap: the top components' relative gaps in
# theta are >= 0.15 here (sigma spaced by 10^(2/60) ~ 8%), hence ATOL = 3.6e-5 / 0.15 ~ 2.4e-4 per cosine.
RTOL, ATOL = 3.6e-5, 2.4e-4
TOP = 12  # components compared one by one (the tail of a 32-dimensional Krylov space is not converged)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    """600 x 500 with a decaying spectrum and per-column scales spanning 3 decades (as LoRA weights)."""
    rng = np.random.default_rng(0)
    n, D = 600, 500
    X = (rng.standard_normal((n, 60)) * np.logspace(0, -2, 60)) @ rng.standard_normal((60, D))
    X += 0.01 * rng.standard_normal((n, D))
    return (X * np.exp(rng.uniform(np.log(1e-3), 0, D))).astype(np.float32)


CFG = {"components": 24, "block": 8, "depth": 4}  # a Krylov fit, not the small-data exact path


def assert_same_fit(a, b, data: np.ndarray) -> None:
    np.testing.assert_allclose(b.singular_values, a.singular_values, rtol=RTOL)
    cos = np.abs(np.sum(np.asarray(a.components)[:, :TOP] * np.asarray(b.components)[:, :TOP], axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=ATOL)
    # the stats, each rounded to float32 at the end (half an ulp each: 2^-23 relative apart). The mean: the
    # numpy pass corrects a float32 mean by the float64 sum of the deviations from it, each rounded by u of
    # its size (u = 2^-24), so it is exact to u max|x - mean| per column (the torch pass sums in float64:
    # exact to ~1e-13); the std: M2 of float32 deviations summed in float32 over 64-row blocks, <= 64 u
    # relative per block
    x64 = data.astype(np.float64)
    dev = np.abs(x64 - x64.mean(0)).max(0)
    np.testing.assert_array_less(np.abs(b.mean - a.mean), 2**-23 * np.abs(a.mean) + 2**-23 * dev + 1e-30)
    np.testing.assert_allclose(b.std, a.std, rtol=64 * 2**-24)


def test_out_of_core_fit_equals_the_in_ram_fit(data, tmp_path):
    ram = fit(ArraySource(data, 64), FitConfig(**CFG))
    disk = fit(ArraySource(data, 64), FitConfig(**CFG, out_of_core=True, workdir=str(tmp_path)))
    assert not ram.config["out_of_core"] and disk.config["out_of_core"]
    assert isinstance(disk.components, np.memmap) and not disk.components.flags.writeable
    assert_same_fit(ram, disk, data)
    assert list(tmp_path.iterdir()) == []  # the basis and the components were unlinked files
    # and both are as accurate as each other against the exact SVD
    Z = (data - data.mean(0, dtype=np.float64)) / data.std(0, ddof=1, dtype=np.float64)
    s = np.linalg.svd(Z, compute_uv=False)[: CFG["components"]]
    err_ram, err_disk = (np.abs(f.singular_values - s) / s for f in (ram, disk))
    np.testing.assert_allclose(err_disk, err_ram, atol=RTOL)


@pytest.mark.parametrize("out_of_core", [False, True])
def test_device_pass_on_the_cpu_equals_the_numpy_pass(data, tmp_path, out_of_core):
    """The torch pass (the code `--device cuda` runs, here on the CPU: no pinning, same path)."""
    ram = fit(ArraySource(data, 64), FitConfig(**CFG))
    cfg = FitConfig(**CFG, device="cpu", out_of_core=out_of_core, workdir=str(tmp_path))
    assert_same_fit(ram, fit(ArraySource(data, 64), cfg), data)


def test_small_data_exact_path_out_of_core(tmp_path):
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((40, 5)) @ rng.standard_normal((5, 300)) + 0.01 * rng.standard_normal((40, 300))).astype(
        np.float32
    )
    a = fit(ArraySource(X, 16), FitConfig(components=10))
    b = fit(ArraySource(X, 16), FitConfig(components=10, out_of_core=True, workdir=str(tmp_path)))
    np.testing.assert_allclose(b.singular_values, a.singular_values, rtol=RTOL)


def test_a_failure_mid_fit_leaves_no_files_and_no_open_basis(data, tmp_path):
    def stop(msg: str) -> None:
        if msg.startswith("pass 4"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(ArraySource(data, 64), FitConfig(**CFG, out_of_core=True, workdir=str(tmp_path)), progress=stop)
    assert list(tmp_path.iterdir()) == []
    assert not [f for f in open_files() if "krylov-" in f]


def open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the descriptor listdir itself used is gone
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def test_plan_puts_the_basis_on_disk_above_the_budget():
    # the paper's fit: k = 10,000 at N = 64,974, D = 99,648 (l = 2,016, 7 blocks, 384-row data blocks)
    plan = FitPlan(64974, 99648, 10000, 2016, 7, 384)
    assert plan.guarded(False) > 8 * GB > plan.guarded(True)
    assert choose(plan, None, 8.0).out_of_core
    assert not choose(FitPlan(64974, 99648, 10000, 2016, 7, 384), None, None).out_of_core  # no budget: RAM
    with pytest.raises(ValueError, match="even with its Krylov basis on disk"):
        choose(FitPlan(64974, 99648, 10000, 2016, 7, 384), None, 2.0)
    with pytest.raises(ValueError, match="or pass --out-of-core"):
        choose(FitPlan(64974, 99648, 10000, 2016, 7, 384), False, 8.0)


def test_plan_takes_the_faster_eigensolver_where_its_workspace_fits():
    # k = 1,000 (m = 1,750): dsyevd's 2 m^2 doubles are 49 MB, inside any budget that holds the passes
    small = choose(FitPlan(8192, 99648, 1000, 350, 5, 673), None, 8.0)
    assert small.ritz_driver == "evd" and "final step by evd" in small.describe()
    assert small.peak() == small.peak(ritz_driver="evr")  # it does not raise the peak: a pass is larger
    # the paper's fit in 8 GB (m = 16,750): 24 m^2 bytes = 6.7 GB of eigenproblem do not fit beside the rest
    paper = choose(FitPlan(64974, 99648, 10000, 3350, 5, 673, base=int(0.35 * GB)), None, 8.0)
    assert paper.out_of_core and paper.ritz_driver == "evr" and paper.guarded(ritz_driver="evd") > 8 * GB
    assert choose(FitPlan(64974, 99648, 10000, 3350, 5, 673), True, 16.0).ritz_driver == "evd"
    # all pairs by MRRR hold the m x m eigenvectors (2.2 GB here); a budget without them takes the top k only
    tight = choose(FitPlan(64974, 99648, 10000, 3350, 5, 673, base=int(0.35 * GB)), None, 7.0)
    assert tight.ritz_driver == "evr-range" and "final step by evr-range" in tight.describe()
    assert tight.guarded(ritz_driver="evr") > 7.0 * GB >= tight.guarded()


def test_fit_refuses_a_budget_it_cannot_keep(data):
    with pytest.raises(SubspaceError, match=r"needs ~[\d.]+ GB even with its Krylov basis on disk"):
        fit(ArraySource(data, 64), FitConfig(**CFG, max_memory_gb=1e-3))


@pytest.mark.parametrize("driver", ["evr", "evd", "evr-range"])
def test_ritz_equals_the_generalized_eigenproblem_and_survives_a_dependent_column(driver):
    from scipy.linalg import eigh

    rng = np.random.default_rng(2)
    A = rng.standard_normal((300, 300))
    A = A @ A.T
    # K as the fit makes it: blocks orthogonal to each other, each block's columns not quite orthonormal
    Qs = np.split(np.linalg.qr(rng.standard_normal((300, 40)))[0], 4, axis=1)
    for dependent in (False, True):
        Cs = [np.eye(10) + 0.3 * rng.standard_normal((10, 10)) for _ in Qs]
        if dependent:
            Cs[1][:, 7] = Cs[1][:, 3]  # block 1 spans only 9 dimensions: whitening drops one
        K = np.hstack([Q @ C for Q, C in zip(Qs, Cs, strict=True)])
        M, S = K.T @ A @ K, K.T @ K
        theta, Q, how = ritz(np.triu(M), [C.T @ C for C in Cs], 10, driver)
        suffix = "" if driver == "evr" else f", {driver}"
        assert how == ("block-diagonal, 39 of 40" if dependent else "block-diagonal") + suffix
        V = K @ Q
        # float64 throughout: a few hundred ulps of ||M|| (each block's cond(S_i) ~ 10)
        np.testing.assert_allclose(V.T @ V, np.eye(10), atol=1e-10)
        np.testing.assert_allclose(V.T @ A @ V, np.diag(theta), atol=1e-10 * theta[0])
        if not dependent:
            # the same pairs by another route: a few hundred ulps times cond(S_i) ~ 10 each way, ~1e-12
            np.testing.assert_allclose(theta, eigh(M, S, eigvals_only=True)[::-1][:10], rtol=1e-11)


@pytest.mark.parametrize("driver", ["evr", "evd", "evr-range"])
def test_ritz_holds_no_more_than_the_plan_counts(driver):
    """Beside M (its caller's), ritz holds what fit_plan's ritz phase counts for it: with evr the m x m
    eigenvectors (Q is made in their last k columns and reversed as a view), with evr-range the k eigenvectors
    (Q likewise), each with one block row and the whiteners; with evd its workspace and Q. numpy's arrays are
    traced exactly by tracemalloc. (A new Q and its reordered copy had put 8 m k x 2 more beside M: 7.7 GB at
    the paper's k = 10,000 where the plan said 5.4.)"""
    import tracemalloc

    depth, l, k = 4, 300, 900
    m = depth * l
    rng = np.random.default_rng(3)
    A = rng.standard_normal((m, m))
    M = A @ A.T
    del A
    plan = FitPlan(10_000, 5_000, k, l, depth, 64, out_of_core=True)
    plan.ritz_driver = driver
    K = 4 * chunk_rows(m) * m  # the basis's read buffers, counted in the phase too
    counted = plan.phases(True)["ritz"] - K - 8 * m * m
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        theta, Q, _ = ritz(M, [np.eye(l) for _ in range(depth)], k, driver)
        held = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert Q.shape == (m, k) and np.all(np.diff(theta) <= 0)
    assert held <= counted + 2**20, f"ritz held {held / 1e6:.1f} MB beside M, the plan counts {counted / 1e6:.1f}"


# --- through the registry and the CLI -------------------------------------------------------------------


@pytest.fixture
def small_registry(tmp_path) -> Registry:
    pop = Population(PLANTED_LAYOUT, latent=6, seed=5, noise=0.002)
    reg = Registry.init(tmp_path / "reg")
    reg.add_models(NewModel(f"m{i:03d}", pop.vector(i), PLANTED_LAYOUT, "planted/base") for i in range(80))
    return reg


CRASH = """
import os, signal, sys
from registry import wspace
from registry.registry import Registry
from w2w.subspace import FitConfig

def say(msg):
    if msg.startswith(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup of any kind runs

cfg = FitConfig(components=12, block=4, depth=4, out_of_core=True)
wspace.fit_space(Registry.open(sys.argv[1]), components=12, config=cfg, say=say)
"""


@pytest.mark.parametrize("stage", ["pass 3", "Rayleigh-Ritz"])
def test_a_crash_mid_fit_leaves_no_half_written_subspace(small_registry, stage):
    reg = small_registry
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH), str(reg.root), stage], capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    space = reg.spaces()[0].id
    assert wspace.current(reg, space) is None
    assert not (reg.root / "subspaces").exists() or list((reg.root / "subspaces").iterdir()) == []
    assert list((reg.root / "tmp").iterdir()) == []  # the basis files were unlinked when made
    report = verify(reg)
    assert report.ok and report.findings == [], report.findings
    # and the next fit runs
    info = w2wreg_json(reg.root, "fit", "-k", "12", "--out-of-core")
    assert info["k"] == 12 and wspace.current(reg, space) is not None


def test_cli_fit_out_of_core_with_a_budget(small_registry):
    info = w2wreg_json(small_registry.root, "fit", "-k", "12", "--max-memory-gb", "64", "--device", "cpu")
    sm = wspace.require(small_registry, info["space"])
    assert sm.sub.k == 12 and sm.sub.config["device"] == "cpu"


def test_cli_fit_refuses_an_impossible_budget_in_one_line(small_registry):
    out = w2wreg(small_registry.root, "fit", "-k", "12", "--max-memory-gb", "0.1", code=1).output
    assert out.strip().count("\n") == 0 and "even with its Krylov basis on disk (budget 0.1 GB)" in out
    assert wspace.current(small_registry, small_registry.spaces()[0].id) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: --device cuda runs")
def test_cli_fit_on_cuda_without_cuda_is_a_one_line_error(small_registry):
    out = w2wreg(small_registry.root, "fit", "-k", "12", "--device", "cuda", code=1).output
    assert out.strip().count("\n") == 0 and "sees no CUDA GPU here" in out, out
    assert not Path(small_registry.root / "subspaces").exists()

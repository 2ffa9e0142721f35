"""How a fit will run and the memory it will take: block size and depth, basis in RAM or on disk.

The peak is the largest of the fit's phases, each a sum of the arrays alive in it (bytes; f32 = 4, f64 = 8;
D columns, m = depth * l Krylov columns, b data rows per block, c = krylov_basis.chunk_rows(m) rows of K
per chunk):
  kept    the block columns of M = K^T Z^T Z K, the diagonal blocks of K^T K:  8 l^2 (depth (depth + 1) / 2 + depth)
  pass    G (in RAM it is K's own block; on disk K holds a copy), the product's sum, two data buffers,
          a block's Z_b G: 4 D l (+ 4 D l on disk) + 2 * 4 b D + 4 b l (blocks used where they lie, a
          memory-mapped file's, need no buffer but hold one block's pages: 4 b D less when every block is;
          the plan keeps the buffers' bound)
  orth    P (made into R, then into the next G, in its own buffer), K^T P and K^T R:  4 D l + 2 * 8 m l
  ritz    M, the whiteners of K^T K's diagonal blocks (8 l^2 depth), and the eigensolver's arrays
          (w2w.rayleigh_ritz): evd (dsyevd, all pairs in M's buffer) its workspace of 2 m^2 doubles, then Q:
          8 m^2 + 16 m^2 + 8 m k; evr (dsyevr, all pairs by MRRR) the m x m eigenvectors, Q made in their
          last k columns a block row at a time: 8 m^2 + 8 m^2 + 8 l k; evr-range (dsyevr, the top k only)
          the k eigenvectors and one block row: 8 m^2 + 8 m k + 8 l k
  out     Q in float64 (with evr: the m x m eigenvectors it is a view of) and float32, two chunks of V:
          12 m k + 8 c k (evr: 8 m^2 + 4 m k + 8 c k)
In RAM, K (4 D m) is alive throughout and V (4 D k) at the end. On disk neither is, but a chunk of K's
read buffers (4 c m) is.
In RAM, Z K (4 n m: every pass's Z G, kept for M's last block column) is alive in the pass and orth
phases; on disk Z K is written as it is made, and a chunk of its read buffers (4 c' m, c' = min(c, n)) is
alive in the last pass.
`base` is the process before the fit (interpreter, libraries), measured, not modelled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from w2w.krylov_basis import chunk_rows
from w2w.rayleigh_ritz import DRIVERS

GB = 1e9
# The process holds more than the arrays the formula counts (allocator slack, library buffers): measured
# 1.04-1.8x the estimate plus nothing larger than 0.4 GB (README, "The w2w space"). A budget is checked
# against estimate * SLACK_RATIO + SLACK_BYTES, which covers every measured peak.
SLACK_RATIO, SLACK_BYTES = 1.2, int(0.4 * GB)


def rss_bytes() -> int:
    """This process's resident set size now (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class FitPlan:
    n: int
    dim: int
    k: int
    block: int  # Krylov block size l
    depth: int  # Gram passes
    rows: int  # data rows per block
    out_of_core: bool = False
    base: int = 0
    ritz_driver: str = "evr"  # the final eigenproblem's LAPACK driver (choose: evd where memory allows)

    @property
    def m(self) -> int:
        return self.depth * self.block

    def phases(self, out_of_core: bool, ritz_driver: str | None = None) -> dict[str, int]:
        """Bytes alive in each phase (the module docstring's formula)."""
        D, l, m, k, b, c = self.dim, self.block, self.m, self.k, self.rows, chunk_rows(self.m)
        kept = 8 * l * l * (self.depth * (self.depth + 1) // 2 + self.depth)
        K, V = (4 * c * m, 0) if out_of_core else (4 * D * m, 4 * D * k)
        driver = ritz_driver or self.ritz_driver
        solver = {"evd": 16 * m * m + 8 * m * k, "evr": 8 * m * m + 8 * l * k, "evr-range": 8 * m * k + 8 * l * k}
        Q64 = 8 * m * m if driver == "evr" else 8 * m * k
        ZK = 4 * min(c, self.n) * m if out_of_core else 4 * self.n * m
        return {
            "pass": kept + K + ZK + 4 * D * l * (2 if out_of_core else 1) + 2 * 4 * b * D + 4 * b * l,
            "orth": kept + K + (0 if out_of_core else ZK) + 4 * D * l + 2 * 8 * m * l,
            "ritz": K + 8 * l * l * self.depth + 8 * m * m + solver[driver],
            "out": K + V + Q64 + 4 * m * k + 8 * c * k,
        }

    def peak(self, out_of_core: bool | None = None, ritz_driver: str | None = None) -> int:
        ooc = self.out_of_core if out_of_core is None else out_of_core
        return self.base + max(self.phases(ooc, ritz_driver).values())

    def guarded(self, out_of_core: bool | None = None, ritz_driver: str | None = None) -> int:
        """The peak a budget is checked against: the estimate with the measured slack."""
        return int(self.peak(out_of_core, ritz_driver) * SLACK_RATIO) + SLACK_BYTES

    def describe(self) -> str:
        where = "on disk" if self.out_of_core else "in RAM"
        ph = self.phases(self.out_of_core)
        parts = ", ".join(f"{name} {v / GB:.2f}" for name, v in ph.items())
        return (
            f"plan: l = {self.block}, depth {self.depth} (m = {self.m}), Krylov basis {where}; "
            f"final step by {self.ritz_driver}; "
            f"estimated peak {self.peak() / GB:.2f} GB = {self.base / GB:.2f} now + max({parts}) GB "
            f"(budgeted as {self.guarded() / GB:.2f} GB with the allocator's slack)"
        )


def choose(plan: FitPlan, out_of_core: bool | None, max_memory_gb: float | None) -> FitPlan:
    """Decide where the basis lives: as asked, else on disk when the in-RAM peak would pass the budget.
    Raises ValueError when the chosen path's estimate is over the budget."""
    budget = None if max_memory_gb is None else max_memory_gb * GB
    if out_of_core is None:
        out_of_core = budget is not None and plan.guarded(False) > budget
    plan.out_of_core = out_of_core
    # the final step's eigensolver: the fastest whose memory the budget (or, without one, half this machine's
    # memory) still holds (bench/bench_ritz.py, m = 8,000, top 4,800: evd 49 s, evr 53 s, evr-range 114 s)
    room = budget if budget is not None else 0.5 * physical_memory()
    fits = [d for d in DRIVERS if plan.guarded(ritz_driver=d) <= room]
    plan.ritz_driver = fits[0] if fits else DRIVERS[-1]
    if budget is not None and plan.guarded() > budget:
        raise ValueError(
            f"a fit of k = {plan.k} over D = {plan.dim:,} needs ~{plan.guarded() / GB:.1f} GB "
            f"{'even with its Krylov basis on disk' if out_of_core else 'with its Krylov basis in RAM'} "
            f"(budget {max_memory_gb:g} GB): lower -k, raise --max-memory-gb"
            + ("" if out_of_core else " or pass --out-of-core")
        )
    return plan

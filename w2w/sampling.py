"""Drawing new coefficient vectors from a fitted space: the paper's Gaussian, or the population's own spread.

    gaussian     c = m + T * s * z                                   (an independent Gaussian per coefficient)
    population   c = m + T * (sqrt(1 - h^2) * (c_j - m) + h * s * z)  (c_j: a fitted model drawn at random)

m, s: the coefficients' mean and standard deviation over the fitted models; z ~ N(0, I); T: temperature.
The second is a smoothed bootstrap (a Gaussian kernel density of bandwidth h * s, shrunk towards the mean
so that every coefficient keeps variance s^2): it keeps what a Gaussian per coefficient loses, that
attributes come in two kinds (with or without glasses), not as a blend. h = 1 is the Gaussian; h -> 0
returns the fitted models themselves. bench/bench_fidelity.py measures both.

The fitted models c_j are drawn in rounds, each a shuffle of all of them (every model seeds one sample before
any seeds two), not independently. If a share p of the N models has an attribute, n independent picks have
it at a rate of variance p (1 - p) / n; picks within a round, (N - n) / (N - 1) times that, and whole rounds
exactly p: the samples' mix of attributes is the population's rather than a chance reweighting of it (48
independent picks: +-7 points, one sd). Picks and noise come from two streams spawned from `rng`, so row i
is the same draw whatever n.
"""

from __future__ import annotations

import numpy as np

from w2w.errors import W2WError

SAMPLERS = ("gaussian", "population")


def draw(
    rng: np.random.Generator,
    n: int,
    mean: np.ndarray,
    std: np.ndarray,
    temperature: float = 1.0,
    fitted: np.ndarray | None = None,
    bandwidth: float | None = None,
) -> np.ndarray:
    """n coefficient vectors (n, k): Gaussian when `bandwidth` is None, else a smoothed bootstrap of `fitted` (N, k)."""
    if temperature < 0:
        raise W2WError(f"--temperature must be >= 0, got {temperature}")
    if bandwidth is None:
        return mean + temperature * std * rng.standard_normal((n, len(mean)))
    if not 0 < bandwidth <= 1:
        raise W2WError(f"--bandwidth must be in (0, 1], got {bandwidth}")
    if fitted is None or len(fitted) == 0:
        raise W2WError("sampling from the population needs the fitted models' coefficients")
    picks, noise = rng.spawn(2)
    z = noise.standard_normal((n, len(mean)))
    j = rounds(picks, n, len(fitted))
    return mean + temperature * (np.sqrt(1 - bandwidth**2) * (fitted[j] - mean) + bandwidth * std * z)


def rounds(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """n indices into `count` items (n,): shuffles of all of them one after another, so that each is picked
    once before any is picked twice; the first i are the same for any n >= i."""
    return np.concatenate([rng.permutation(count) for _ in range(-(-n // count))] or [np.zeros(0, int)])[:n]

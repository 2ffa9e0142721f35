"""Drawing new coefficient vectors from a fitted space: the paper's Gaussian, or the population's own spread.

    gaussian     c = m + T * s * z                                   (an independent Gaussian per coefficient)
    population   c = m + T * (sqrt(1 - h^2) * (c_j - m) + h * s * z)  (c_j: a fitted model drawn at random)

m, s: the coefficients' mean and standard deviation over the fitted models; z ~ N(0, I); T: temperature.
The second is a smoothed bootstrap (a Gaussian kernel density of bandwidth h * s, shrunk towards the mean
so that every coefficient keeps variance s^2): it keeps what a Gaussian per coefficient loses, that
attributes come in two kinds (with or without glasses), not as a blend. h = 1 is the Gaussian; h -> 0
returns the fitted models themselves. bench/bench_fidelity.py measures both.
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
    z = rng.standard_normal((n, len(mean)))
    if bandwidth is None:
        return mean + temperature * std * z
    if not 0 < bandwidth <= 1:
        raise W2WError(f"--bandwidth must be in (0, 1], got {bandwidth}")
    if fitted is None or len(fitted) == 0:
        raise W2WError("sampling from the population needs the fitted models' coefficients")
    j = rng.integers(0, len(fitted), n)
    return mean + temperature * (np.sqrt(1 - bandwidth**2) * (fitted[j] - mean) + bandwidth * std * z)

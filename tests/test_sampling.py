"""w2w.sampling: the smoothed bootstrap's picks come in rounds, and a draw's row i does not depend on n."""

from __future__ import annotations

import numpy as np

from w2w.sampling import draw, rounds


def test_rounds_pick_each_item_once_before_any_twice_and_keep_their_prefix():
    picks = rounds(np.random.default_rng(3), 2 * 7 + 3, 7)
    assert sorted(picks[:7]) == list(range(7)) and sorted(picks[7:14]) == list(range(7))
    assert len(set(picks[14:])) == 3  # the last, incomplete round repeats nothing
    assert list(rounds(np.random.default_rng(3), 5, 7)) == list(picks[:5])
    assert rounds(np.random.default_rng(3), 0, 7).shape == (0,)


def test_population_draw_row_is_the_same_whatever_n_and_uses_every_fitted_model():
    rng = np.random.default_rng(0)
    fitted = rng.standard_normal((10, 4))
    mean, std = fitted.mean(0), fitted.std(0)
    many = draw(np.random.default_rng(5), 30, mean, std, fitted=fitted, bandwidth=0.3)
    few = draw(np.random.default_rng(5), 2, mean, std, fitted=fitted, bandwidth=0.3)
    assert np.array_equal(many[:2], few)
    # h -> 0 returns the fitted models themselves: the first 10 draws are all 10 of them, each once
    exact = draw(np.random.default_rng(5), 10, mean, std, fitted=fitted, bandwidth=1e-12)
    near = np.abs(exact[:, None] - fitted[None]).max(-1).argmin(1)
    assert sorted(near) == list(range(10))
    # the Gaussian keeps the seed's one stream (as before): row i of z is row i of rng.standard_normal((n, k))
    g = draw(np.random.default_rng(5), 3, mean, std)
    assert np.allclose(g, mean + std * np.random.default_rng(5).standard_normal((3, 4)))

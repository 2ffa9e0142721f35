"""Search stays exact at the scale of a real registry: 1,000 models in the w2w SD 1.5 layout (D = 99,648).

The models are generated to files one at a time and imported from the folder, so neither the
generator nor the registry ever holds all of them in memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from ingest.importer import import_paths
from ingest.synthetic import Population
from registry.registry import Registry
from w2w.presets import sd15_layout

N = 1000


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    layout = sd15_layout("w2w")
    assert layout.dim == 99_648
    folder = tmp_path_factory.mktemp("w2w-loras")
    csv_path = Population(layout, seed=5).write(folder, N, base_model="runwayml/stable-diffusion-v1-5")
    reg = Registry.init(tmp_path_factory.mktemp("reg"))
    report = import_paths(reg, [folder], attrs_csv=csv_path)
    assert report.committed and len(report.added) == N
    return reg, layout


def brute_force(reg: Registry, query: str, k: int, names: set[str] | None):
    """Plain numpy: every candidate vector read and compared, one block at a time."""
    models = [m for m in reg.ls() if m.name != query and (names is None or m.name in names)]
    store = reg.store(reg.space(models[0].space_id))
    q = reg.vector(query).astype(np.float64)
    d = np.empty(len(models))
    for lo in range(0, len(models), 100):
        X = store.read([m.row_idx for m in models[lo : lo + 100]]).astype(np.float64)
        d[lo : lo + len(X)] = np.linalg.norm(X - q, axis=1)
    order = np.argsort(d, kind="stable")[:k]
    return [models[i].name for i in order], d[order]


@pytest.mark.slow
@pytest.mark.parametrize("where", [None, "age > 45", "glasses AND NOT beard"])
def test_search_returns_exactly_the_brute_force_neighbours(big, where):
    reg, _ = big
    names = {m.name for m in reg.ls(where)} if where else None
    if names is not None:
        assert 10 < len(names) < N
    for query in ("identity_00000", "identity_00421", "identity_00999"):
        res = reg.search(query, k=10, where=where)
        expected, dists = brute_force(reg, query, 10, names)
        assert [h.model.name for h in res.hits] == expected
        # both float64 sums of D = 99,648 non-negative squares (of exact float32 differences): each within
        # D u64 = 1.1e-11 relative of the true d^2, in any summation order; float32 kernel distances would be ~1e-6 off
        assert np.allclose([h.distance for h in res.hits], dists, rtol=1e-9)
        if names is not None:
            assert all(h.model.name in names for h in res.hits)


@pytest.mark.slow
def test_vectors_are_the_files_and_verify_is_clean(big):
    reg, layout = big
    pop = Population(layout, seed=5)
    for i in (0, 500, 999):
        assert np.array_equal(reg.vector(f"identity_{i:05d}"), pop.vector(i))
    from registry.integrity import verify

    report = verify(reg)
    assert report.ok and report.models == N

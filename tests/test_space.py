"""The w2w space on planted data: fit, project, sample, directions, edits, arithmetic, search after a fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import PLANTED_LAYOUT

from cli.main import cli
from ingest.synthetic import ATTRIBUTES, Population
from registry import edits, wspace
from registry.integrity import verify
from registry.registry import NewModel, Registry
from w2w.errors import DirectionError, ExpressionError, UnknownModelError, W2WError
from w2w.subspace import ArraySource, FitConfig, Subspace, SubspaceError, fit

LAYOUT = PLANTED_LAYOUT  # D = 1,152
N = 400
BASE = "planted/base"


def run(reg, *args, code=0):
    result = CliRunner().invoke(cli, ["--registry", str(reg), *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    pop = Population(LAYOUT, latent=8, seed=3, noise=0.002)
    reg = Registry.init(tmp_path_factory.mktemp("space"))
    reg.add_models(NewModel(f"m{i:04d}", pop.vector(i), LAYOUT, BASE, attributes=pop.attributes(i)) for i in range(N))
    info = wspace.fit_space(reg, components=40)
    for a in ATTRIBUTES:
        edits.fit_direction(reg, a)
    return reg, pop, info


def planted_basis(pop: Population, sm: wspace.SpaceModel) -> np.ndarray:
    """The planted subspace in standardized coordinates, orthonormal (D, latent)."""
    Q, _ = np.linalg.qr(pop.basis / sm.sub.std[:, None])
    return Q


def test_fit_matches_dense_svd_on_small_data():
    rng = np.random.default_rng(0)
    X = (
        rng.standard_normal((120, 6)) @ rng.standard_normal((6, 500)) * np.logspace(-3, 0, 500)
        + 0.01 * rng.standard_normal((120, 500))
    ).astype(np.float32)
    sub = fit(ArraySource(X, 32), FitConfig(components=30))
    Z = (X - X.mean(0)) / X.std(0, ddof=1)
    _, s, Vt = np.linalg.svd(Z, full_matrices=False)
    # Weyl: |d sigma_j| <= ||dZ|| ~ sqrt(D) u sigma_1 (float32 Z, u = 2^-24); sigma_1 / sigma_30 ~ 7: ~1e-5 relative
    assert np.allclose(sub.singular_values, s[:30], rtol=1e-4)
    cosines = np.linalg.svd(sub.components[:, :6].T @ Vt[:6].T, compute_uv=False)
    assert cosines.min() > 0.9999
    assert np.allclose(sub.explained_variance_ratio, s[:30] ** 2 / (s**2).sum(), rtol=1e-4)


class ReusedBuffers(ArraySource):
    """A source with load_into: a pass reads into buffers it reuses, and block functions write into them."""

    def __init__(self, X: np.ndarray, block_rows: int):
        super().__init__(X, block_rows)
        self.filled: list[int] = []

    def load_into(self, spec, out):
        out[...] = self.X[spec[0] : spec[1]]
        self.filled.append((id(out if out.base is None else out.base), len(out)))  # its buffer (of a chunk)
        return out


def test_fit_reading_into_reused_buffers_equals_fresh_blocks():
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((700, 10)) @ rng.standard_normal((10, 300)) + 5.0).astype(np.float32)
    X += 0.01 * rng.standard_normal(X.shape).astype(np.float32)
    source = ReusedBuffers(X.copy(), 64)  # 10 blocks of 64 and one of 60
    cfg = FitConfig(components=12, block=8, depth=3)  # a Krylov fit (not the small-data exact path)
    fresh, reused = fit(ArraySource(X.copy().astype(np.float64), 64), cfg), fit(source, cfg)
    # the stats pass reads every block where it lies (ArraySource.view); per Gram pass: one buffer for the
    # 64-row blocks, whatever their number (reads from memory do not wait, so each is made in line, by chunks,
    # into the buffer the last block used; a second only if a read was held up), and one for the last block;
    # every row read once a pass
    assert sum(rows for _, rows in source.filled) == 700 * 3
    first = source.filled[: len(source.filled) // 3]
    assert sum(rows for _, rows in first) == 700 and len({buf for buf, _ in first}) in (2, 3)
    assert np.array_equal(source.X, X)  # the source's own data untouched
    np.testing.assert_allclose(reused.singular_values, fresh.singular_values, rtol=1e-5)
    np.testing.assert_allclose(np.abs(reused.components.T @ fresh.components), np.eye(12), atol=1e-3)
    np.testing.assert_allclose(reused.mean, X.astype(np.float64).mean(0), rtol=1e-6)


def test_fit_recovers_the_planted_subspace(planted):
    reg, pop, info = planted
    sm = wspace.require(reg, info["space"])
    cosines = np.linalg.svd(planted_basis(pop, sm).T @ sm.sub.components[:, :8], compute_uv=False)
    assert cosines.min() > 0.99, cosines  # principal angles near 0
    assert info["n_models"] == N and info["k"] == 40


def test_model_inside_space_reconstructs_up_to_noise(planted):
    reg, pop, info = planted
    sm = wspace.require(reg, info["space"])
    w = pop.vector(5)
    err = float(sm.sub.relative_error(w)[0])
    noise_share = np.linalg.norm(pop.noise * np.ones(LAYOUT.dim) / sm.sub.std) / np.linalg.norm(
        (w - sm.sub.mean) / sm.sub.std
    )
    assert err < 3 * noise_share
    exact = sm.sub.reconstruct(sm.sub.project(w))
    assert float(sm.sub.relative_error(exact)[0]) < 1e-4


def test_edit_moves_along_the_planted_attribute(planted):
    reg, pop, _ = planted
    for j, attr in enumerate(ATTRIBUTES):
        out = edits.edit(reg, "m0007", {attr: 2.0}, name=f"m0007-{attr}-up")
        dw = reg.vector(out["name"]).astype(np.float64) - pop.vector(7)
        dz, *_ = np.linalg.lstsq(pop.basis.astype(np.float64), dw, rcond=None)  # the change in planted latent space
        cos = dz @ pop.attr_weights[j] / (np.linalg.norm(dz) * np.linalg.norm(pop.attr_weights[j]))
        assert cos > 0.9, (attr, cos)


def test_edit_strength_is_one_standard_deviation(planted):
    reg, _, info = planted
    out = edits.edit(reg, "m0011", {"beard": 1.0}, name="m0011-beard1")
    assert out["scores"]["beard"]["after"] - out["scores"]["beard"]["before"] == pytest.approx(1.0, abs=1e-6)
    # measured independently: the new model, projected when added, scores one sd higher
    sm = wspace.require(reg, info["space"])
    d = edits.load_direction(reg, sm, "beard")
    c0, c1 = wspace.coefficients(reg, sm, [reg.get("m0011").id, out["id"]])
    assert (d.scores(c1) - d.scores(c0)) / d.score_std == pytest.approx(1.0, abs=1e-3)
    show = json.loads(run(reg.root, "show", "m0011-beard1", "--json").stdout)
    assert show["lineage"][0]["parent"] == "m0011" and show["lineage"][0]["params"]["directions"] == {"beard": 1.0}
    assert show["kind"] == "edit" and show["projection"]["well_explained"]


def test_debiased_direction_is_orthogonal(planted):
    reg, _, info = planted
    edits.fit_direction(reg, "smile", debias=("glasses", "hat"))
    sm = wspace.require(reg, info["space"])
    smile = edits.load_direction(reg, sm, "smile")
    assert smile.debiased_against == ("glasses", "hat")
    for other in ("glasses", "hat"):
        from w2w.directions import fit_direction

        ids, y = edits.labelled(reg, sm, other)
        o = fit_direction(wspace.coefficients(reg, sm, ids), y, smile.method, other)
        assert abs(float(smile.vector @ o.vector)) < 1e-8
    edits.fit_direction(reg, "smile")  # restore the plain one for other tests


def test_direction_over_the_first_components_via_the_cli(planted):
    reg, _, info = planted
    args = ("direction", "fit", "hat", "--components", "3", "--debias", "beard")
    out = json.loads(run(reg.root, *args, "--json").stdout)
    assert out["components"] == 3 and out["debiased_against"] == ["beard"]
    hat = edits.load_direction(reg, wspace.require(reg, info["space"]), "hat")
    assert hat.components == 3 and not hat.vector[3:].any()  # stored as it was fitted: zero beyond the first 3
    edit = edits.edit(reg, "m0013", {"hat": 1.0}, name="m0013-hat-k3")["scores"]["hat"]
    assert edit["after"] - edit["before"] == pytest.approx(1.0, abs=1e-6)  # still one std of its own score
    assert "first 3 coefficients" in run(reg.root, "direction", "fit", "hat", "--components", "3").stdout
    edits.fit_direction(reg, "hat")  # restore the plain one for other tests
    assert edits.load_direction(reg, wspace.require(reg, info["space"]), "hat").components > 3


def test_samples_follow_the_fitted_gaussians(planted):
    reg, _, info = planted
    made = wspace.sample(reg, n=300, seed=4, prefix="draw")
    sm = wspace.require(reg, info["space"])
    C = wspace.coefficients(reg, sm, [m["id"] for m in made])  # projected when added
    se = sm.coeff_std / np.sqrt(300)
    assert np.all(np.abs(C.mean(0) - sm.coeff_mean) < 5 * se + 1e-3)
    assert np.allclose(C.std(0), sm.coeff_std, rtol=0.25, atol=1e-3)
    # a draw is named by what drew it: asking again returns the registered models, whatever the prefix
    again = wspace.sample(reg, n=2, seed=4, prefix="again")
    assert [(m["id"], m["existing"]) for m in again] == [(m["id"], True) for m in made[:2]]
    assert not any(m.name.startswith("again") for m in reg.ls())
    # ... and one more than before adds only the new index (the random stream is the seed's, whatever n)
    more = wspace.sample(reg, n=301, seed=4, prefix="draw")
    assert [m["existing"] for m in more] == [True] * 300 + [False] and more[300]["name"] == "draw-s4-300"
    assert float(sm.sub.relative_error(reg.vector(made[0]["id"]))[0]) < 1e-4  # samples lie in the space
    cold = wspace.sample(reg, n=1, seed=5, temperature=0.0, prefix="cold")
    assert np.allclose(wspace.coefficients(reg, sm, [cold[0]["id"]])[0], sm.coeff_mean, atol=1e-3)


def test_population_samples_keep_the_spread_and_stay_near_the_fitted_models(planted):
    """--bandwidth h: a fitted model's coefficients shrunk by sqrt(1 - h^2) plus h s z, so each coefficient keeps
    its variance (1 - h^2) s^2 + h^2 s^2 = s^2; and a sample lies within about h of a fitted model."""
    reg, _, info = planted
    sm = wspace.require(reg, info["space"])
    fitted = wspace.coefficients(reg, sm, sm.sub.model_ids)
    made = wspace.sample(reg, n=300, seed=4, prefix="pop", bandwidth=0.3)
    C = wspace.coefficients(reg, sm, [m["id"] for m in made])
    # the mean of 300 draws is within 5 standard errors (each draw's spread is s); the std within 25% (as above)
    assert np.all(np.abs(C.mean(0) - sm.coeff_mean) < 5 * sm.coeff_std / np.sqrt(300) + 1e-3)
    assert np.allclose(C.std(0), sm.coeff_std, rtol=0.25, atol=1e-3)
    # nearest fitted model: the noise h s z has squared length h^2 sum(s^2) on average, the shrink moves the
    # model by (1 - sqrt(1 - h^2)) |c_j - m| ~ h^2 / 2 |c_j - m|: well within twice that in the median
    near = np.sqrt(((C[:, None] - fitted[None]) ** 2).sum(-1)).min(1)
    assert np.median(near) < 2 * 0.3 * np.sqrt((sm.coeff_std**2).sum())
    (step,) = reg.catalog.lineage(made[0]["id"])
    assert step["params"]["bandwidth"] == 0.3
    # a Gaussian draw of the same seed is another draw, not this one found again (and the reverse)
    gauss = wspace.sample(reg, n=1, seed=4, prefix="g", bandwidth=None)
    assert gauss[0]["id"] != made[0]["id"]
    assert wspace.sample(reg, n=1, seed=4, bandwidth=0.3)[0]["id"] == made[0]["id"]
    with pytest.raises(W2WError, match="bandwidth"):
        wspace.sample(reg, n=1, seed=4, bandwidth=1.5)


def test_a_sample_is_the_same_bits_whatever_was_drawn_beside_it():
    """Forced on purpose (the reuse above does not need it): row i of a draw is reconstructed in a block of one
    fixed shape, so it does not depend on how many rows were drawn with it."""
    rng = np.random.default_rng(0)
    V = np.linalg.qr(rng.standard_normal((500, 7)))[0].astype(np.float32)  # (D, k)
    mean, std = rng.standard_normal(500).astype(np.float32), rng.random(500).astype(np.float32) + 0.5
    sub = Subspace(mean, std, V, np.ones(7, np.float32), 1.0, 100)
    C = rng.standard_normal((37, 7)).astype(np.float32)
    # the same rows at the same places of a block, drawn with 34 others or alone: the same bits
    np.testing.assert_array_equal(wspace._reconstruct_rows(sub, C)[:3], wspace._reconstruct_rows(sub, C[:3]))


def test_mix_expressions(planted):
    reg, _, info = planted
    sm = wspace.require(reg, info["space"])
    ids = [reg.get(n).id for n in ("m0001", "m0002", "m0003")]
    c1, c2, c3 = wspace.coefficients(reg, sm, ids).astype(np.float64)
    out = edits.mix(reg, "m0001 + 0.8*glasses", name="mixed-1")
    glasses = edits.load_direction(reg, sm, "glasses")
    residual = reg.vector("m0001") - sm.sub.reconstruct(c1.astype(np.float32))
    expected = sm.sub.reconstruct((c1 + 0.8 * glasses.step(1.0)).astype(np.float32)) + residual
    # float32 reconstructions of one set of coefficients by two routes (k-term dot products, * std, + mean, + the
    # residual): each element within (k + 4) u max|w| of the other (u = 2^-24)
    tol = (sm.sub.k + 4) * 2**-24 * float(np.abs(expected).max())
    assert np.allclose(reg.vector("mixed-1"), expected, rtol=0, atol=tol)
    edits.edit(reg, "m0001", {"glasses": 0.8}, name="edited-1")
    assert np.allclose(reg.vector("edited-1"), reg.vector("mixed-1"), rtol=0, atol=tol)  # mix and edit agree
    assert out["coefficients"] == {"m0001": 1.0, "glasses": 0.8}
    edits.mix(reg, "lerp(m0001, m0002, 0.3)", name="mixed-2", mode="raw")
    lerp = 0.7 * reg.vector("m0001").astype(np.float64) + 0.3 * reg.vector("m0002")
    assert np.allclose(reg.vector("mixed-2"), lerp, rtol=0, atol=4 * 2**-24 * float(np.abs(lerp).max()))  # 3 roundings
    edits.mix(reg, "m0001 - m0002 + m0003", name="mixed-3")
    assert np.allclose(wspace.coefficients(reg, sm, [reg.get("mixed-3").id])[0], c1 - c2 + c3, atol=1e-3)
    lineage = reg.catalog.lineage(reg.get("mixed-3").id)
    assert {l["parent"]: l["params"]["weight"] for l in lineage} == {"m0001": 1.0, "m0002": -1.0, "m0003": 1.0}
    with pytest.raises(ExpressionError) as e:
        edits.mix(reg, "m0001 + * m0002")
    assert e.value.column == 8
    with pytest.raises(UnknownModelError):
        edits.mix(reg, "m0001 + nobody")
    result = run(reg.root, "mix", "m0001 * m0002", code=1)
    assert "^" in result.stderr and "cannot multiply" in result.stderr


def test_search_after_fit_uses_the_index_and_stays_exact(planted):
    reg, _, _ = planted
    for query in ("m0000", "m0123", "m0399"):
        for where in (None, "glasses AND NOT hat"):
            fast = [h.model.name for h in reg.search(query, k=10, where=where).hits]
            exact = [h.model.name for h in reg.search(query, k=10, where=where, exact=True).hits]
            assert fast == exact


def test_new_models_are_projected_and_outliers_flagged(planted):
    reg, pop, info = planted
    reg.add_models([NewModel("late", pop.vector(N + 1), LAYOUT, BASE)])
    assert wspace.projection_info(reg, reg.get("late").id)["well_explained"]
    rng = np.random.default_rng(9)
    odd = pop.mean + rng.standard_normal(LAYOUT.dim).astype(np.float32) * 0.05
    reg.add_models([NewModel("outlier", odd, LAYOUT, BASE)])
    info_odd = wspace.projection_info(reg, reg.get("outlier").id)
    assert not info_odd["well_explained"]
    assert "POORLY" in run(reg.root, "project", "outlier").stdout
    out = json.loads(run(reg.root, "project", "late", "--json").stdout)  # projected after the fit: stored coefficients
    assert out["nearest_metric"] == "w2w"
    assert [h["name"] for h in out["nearest"]] == [h.model.name for h in reg.search("late", k=5, metric="w2w").hits]
    assert "late" not in [h["name"] for h in out["nearest"]]
    assert verify(reg).ok


def test_clear_errors(planted, tmp_path):
    reg, _, info = planted
    with pytest.raises(DirectionError, match="no attribute"):
        edits.fit_direction(reg, "tattoo")
    reg.add_models(
        [
            NewModel(f"const{i}", np.full(LAYOUT.dim, i + 1, np.float32), LAYOUT, BASE, attributes={"always": True})
            for i in range(5)
        ]
    )
    with pytest.raises(DirectionError):
        edits.fit_direction(reg, "always")
    with pytest.raises(DirectionError, match="w2wreg direction fit"):
        edits.edit(reg, "m0001", {"age_unknown": 1.0})
    small = Registry.init(tmp_path / "small")
    small.add_models([NewModel(f"x{i}", np.ones(LAYOUT.dim, np.float32) * i, LAYOUT, BASE) for i in range(2)])
    with pytest.raises(SubspaceError, match="at least 3"):
        wspace.fit_space(small)
    with pytest.raises(W2WError, match="w2wreg fit"):
        wspace.sample(small)
    assert "w2wreg fit" in run(small.root, "sample", code=1).stderr


def test_derived_model_loads_in_diffusers_and_equals_its_vector(tmp_path, sd_pipe, tiny_layout):
    import torch
    from helpers import random_lora

    from w2w.flatten import flatten

    reg = Registry.init(tmp_path / "tiny")
    reg.add_models([NewModel(f"t{i}", flatten(random_lora(tiny_layout, seed=i)), tiny_layout, BASE) for i in range(12)])
    wspace.fit_space(reg, components=8)
    (made,) = wspace.sample(reg, n=1, seed=1)
    files = reg.export(made["name"], "diffusers", tmp_path / "out")
    sd_pipe.load_lora_weights(str(files[0].parent), weight_name=files[0].name, adapter_name="derived")
    lora = reg.lora(made["name"])
    for module, layer in lora.layers.items():
        peft_layer = sd_pipe.unet.get_submodule(module)
        A = peft_layer.lora_A["derived"].weight.detach().numpy()
        B = peft_layer.lora_B["derived"].weight.detach().numpy()
        assert np.array_equal(A, layer.A) and np.array_equal(B, layer.B)
        assert peft_layer.scaling["derived"] == pytest.approx(layer.alpha / layer.rank)
    assert np.array_equal(flatten(lora), reg.vector(made["name"]))
    with torch.no_grad():
        sd_pipe.unload_lora_weights()


def test_fit_on_a_dask_cluster_gives_the_same_subspace(planted, tmp_path):
    from distributed import LocalCluster

    reg, _, info = planted
    local = wspace.require(reg, info["space"])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dist = wspace.fit_space(reg, components=40, where=f"id <= {N}", scheduler=cluster.scheduler_address)
    sm = wspace.require(reg, dist["space"])
    assert sm.id == dist["subspace"] != local.id
    assert np.allclose(sm.sub.singular_values, local.sub.singular_values, rtol=1e-4)
    cos = np.abs(np.sum(sm.sub.components[:, :8] * local.sub.components[:, :8], axis=0))
    assert cos.min() > 0.999


def test_add_after_an_interrupted_fit_keeps_the_models(planted):
    reg, pop, info = planted
    sm = wspace.require(reg, info["space"])
    sm.index_path.unlink()  # as if `fit` died after writing the subspace but before the index
    report = reg.add_models([NewModel("after-crash", pop.vector(N + 7), LAYOUT, BASE)])
    assert report.committed and not report.warnings
    assert np.array_equal(reg.vector("after-crash"), pop.vector(N + 7))
    assert verify(reg).ok  # the index was rebuilt, with the new model in it
    orphan = reg.root / "subspaces" / "ss-deadbeef00"
    orphan.mkdir()
    found = [f for f in verify(reg).findings if f.kind == "orphan"]
    assert [f.what for f in found] == ["subspaces/ss-deadbeef00"]
    orphan.rmdir()


def test_a_registration_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    """A fit whose registration fails after its subspace file is written (here in the index's build; at
    k = 10,000 the file is 4 GB) removes the subspace's folder and index files; no catalog row, verify clean,
    and a fit afterwards works."""
    from registry import index as coeff_index

    pop = Population(LAYOUT, latent=4, seed=5, noise=0.002)
    reg = Registry.init(tmp_path / "r")
    reg.add_models(NewModel(f"m{i:03d}", pop.vector(i), LAYOUT, BASE) for i in range(60))
    build = coeff_index.build

    def failing(*a, **kw):
        assert list((reg.root / "subspaces").iterdir())  # the subspace's files were written by then
        raise MemoryError("the index did not fit")

    monkeypatch.setattr(coeff_index, "build", failing)
    with pytest.raises(MemoryError):
        wspace.fit_space(reg, components=5)
    assert not list((reg.root / "subspaces").iterdir())
    assert not [p for p in reg.root.rglob("*") if p.name.startswith("ss-")]
    [space] = reg.spaces()
    assert wspace.current(reg, space.id) is None and verify(reg).ok
    monkeypatch.setattr(coeff_index, "build", build)
    assert wspace.fit_space(reg, components=5)["k"] == 5 and verify(reg).ok


def test_a_long_lived_registry_keeps_only_the_current_fit(tmp_path):
    """A registry object that serves searches (`w2wreg serve`) across a refit keeps the new subspace, index and
    neighbour lists and drops the old ones (an index is GBs at N = 65,000; a subspace, a 4 GB map)."""
    pop = Population(LAYOUT, latent=4, seed=6, noise=0.002)
    reg = Registry.init(tmp_path / "r")
    reg.add_models(NewModel(f"m{i:03d}", pop.vector(i), LAYOUT, BASE) for i in range(240))

    def held() -> dict[str, list]:
        kinds: dict[str, list] = {}
        for key in reg._cache:
            if isinstance(key, tuple) and key[0] in ("subspace", "index", "lists"):
                kinds.setdefault(key[0], []).append(Path(str(key[1])).name)
        return kinds

    for _ in range(2):
        sid = wspace.fit_space(reg, components=5)["subspace"]
        assert reg.search("m001", k=1).hits  # through the index (240 models > CANDIDATE_MIN + 1)
        assert held() == {"subspace": [sid], "index": [f"{sid}.faiss"], "lists": [f"{sid}.lists.safetensors"]}


@pytest.mark.parametrize("graph_dims", [None, 6])
def test_search_through_an_hnsw_index_with_a_filter(tmp_path, monkeypatch, graph_dims):
    """The filter as an ID selector on the graph: of model ids (legacy graph over every coordinate, under
    the id map) or of rows (two-stage: a graph over the 6 leading coordinates, rescored on all 20)."""
    from registry import index as coeff_index

    monkeypatch.setattr(coeff_index, "HNSW_MIN", 0)  # HNSW from the first model, as a large registry would
    monkeypatch.setattr(wspace, "FLAT_FILTER_MAX", 0)  # every filter through the selector
    if graph_dims:
        monkeypatch.setattr(coeff_index, "HNSW_DIMS", graph_dims)
    pop = Population(LAYOUT, latent=8, seed=7, noise=0.002)
    reg = Registry.init(tmp_path / "hnsw")
    reg.add_models(
        NewModel(f"h{i:04d}", pop.vector(i), LAYOUT, BASE, attributes=pop.attributes(i)) for i in range(1200)
    )
    wspace.fit_space(reg, components=20)
    sm = wspace.require(reg, reg.spaces()[0].id)
    index = coeff_index.load(sm.index_path)
    assert coeff_index.kind_of(index) == "hnsw" and coeff_index.two_stage(index) == bool(graph_dims)
    assert len(reg.ls("smile AND NOT hat")) > 200  # large enough to go through the index, with a selector
    for query in ("h0000", "h0300", "h1199"):
        for where in (None, "smile AND NOT hat"):
            fast = [h.model.name for h in reg.search(query, k=10, where=where).hits]
            exact = [h.model.name for h in reg.search(query, k=10, where=where, exact=True).hits]
            assert fast == exact, (query, where)
    reg.add_models([NewModel("late", pop.vector(1000), LAYOUT, BASE, attributes=pop.attributes(1000))])
    assert verify(reg).ok  # added to the HNSW index
    for where in (None, "smile AND NOT hat"):  # the selector of the grown index (its rows moved on)
        fast = [h.model.name for h in reg.search("h1000", k=10, where=where).hits]
        assert fast == [h.model.name for h in reg.search("h1000", k=10, where=where, exact=True).hits]

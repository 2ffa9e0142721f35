"""`search --metric w2w`: the angle between models' coordinates in the fitted subspace, exact, against numpy.

The population is built as identity LoRAs are: one large update every model shares plus an identity part
of its own, of sizes 20-fold apart; models come in pairs sharing their identity part's direction. On the raw
vectors (l2, cosine) the sizes decide as much as the directions; in the w2w space (centered, z-scored,
projected) each finds its partner. (On the toy world's 128 identities raw l2 makes one model the nearest of
110: README, "Search".)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import PLANTED_LAYOUT

from cli.main import cli
from registry import wspace
from registry.registry import NewModel, Registry
from w2w.flatten import unflatten
from w2w.formats import write_lora

LAYOUT = PLANTED_LAYOUT  # D = 1,152
PAIRS = 40


def population(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    D = LAYOUT.dim
    common = rng.standard_normal(D) / np.sqrt(D) * 10.0  # 5x the largest identity part
    directions = rng.standard_normal((PAIRS, D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rows = []
    for j in range(PAIRS):
        for _ in range(2):
            size = rng.uniform(0.1, 2.0)  # the identity part's norm varies 20-fold
            own = directions[j] + 0.3 * rng.standard_normal(D) / np.sqrt(D)  # cos ~0.96 to its partner's
            rows.append(common + size * own)
    return np.array(rows, dtype=np.float32)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    X = population()
    reg = Registry.init(tmp_path_factory.mktemp("w2w-search"))
    reg.add_models(
        NewModel(f"m{i:03d}", X[i], LAYOUT, "planted/base", kind="trained", attributes={"even": i % 4 < 2})
        for i in range(len(X))
    )
    wspace.fit_space(reg, components=len(X) - 1)
    return reg


def brute_force(reg, name: str, where=None) -> list[tuple[str, float]]:
    """1 - cos in float64 over the stored coefficients, every model compared: what the scan must return."""
    sm = wspace.require(reg, reg.spaces()[0].id)
    models = [m for m in reg.ls(where) if m.name != name]
    C = wspace.coefficients(reg, sm, [m.id for m in models]).astype(np.float64)
    c = wspace.coefficients(reg, sm, [reg.get(name).id])[0].astype(np.float64)
    d = 1 - C @ c / (np.linalg.norm(C, axis=1) * np.linalg.norm(c))
    return sorted(zip([m.name for m in models], d.tolist(), strict=True), key=lambda t: t[1])


# the same float32 coefficients on both sides, summed in float64 in another order: k terms of relative rounding
# 2^-53 each, so 1 - cos agrees to ~k 2^-53 (1e-14 at k = 79); 1e-12 leaves room without hiding a wrong model
ATOL = 1e-12


def test_w2w_equals_brute_force_with_and_without_a_filter(reg):
    for i in (0, 7, 33, 79):
        name = f"m{i:03d}"
        for where in (None, "even"):
            got = reg.search(name, k=5, where=where, metric="w2w")
            want = brute_force(reg, name, where)[:5]
            assert got.metric == "w2w" and [h.model.name for h in got.hits] == [n for n, _ in want]
            assert np.allclose([h.distance for h in got.hits], [d for _, d in want], rtol=0, atol=ATOL)
            assert name not in [h.model.name for h in got.hits]


def test_w2w_finds_the_partner_more_often_than_the_raw_vectors(reg):
    found = {"w2w": [], "l2": [], "cosine": []}
    for i in range(2 * PAIRS):
        for metric, hits in found.items():
            hits.append(reg.search(f"m{i:03d}", k=1, metric=metric).hits[0].model.name)
    partners = {m: sum(h == f"m{i ^ 1:03d}" for i, h in enumerate(hits)) for m, hits in found.items()}
    hub = {m: max(map(hits.count, hits)) for m, hits in found.items()}
    assert partners["w2w"] >= 0.95 * 2 * PAIRS and hub["w2w"] <= 3, (partners, hub)
    # on the raw vectors the identity parts' sizes decide as much as their directions (79 / 61 / 61 here)
    assert max(partners["l2"], partners["cosine"]) < partners["w2w"] - 10, (partners, hub)


def test_w2w_from_a_file_and_from_the_cli(reg, tmp_path):
    layout = reg.layout(reg.spaces()[0].id)
    path = write_lora(unflatten(reg.vector("m010"), layout), tmp_path / "q.safetensors", "diffusers")[0]
    got = reg.search(str(path), k=3, metric="w2w")
    assert [h.model.name for h in got.hits][:2] == ["m010", "m011"]  # itself (distance ~0), then its partner
    assert got.hits[0].distance < 1e-5
    r = CliRunner().invoke(cli, ["--registry", str(reg.root), "search", "--like", "m010", "--metric", "w2w", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["results"][0]["name"] == "m011"


def test_w2w_before_a_fit_says_what_to_do(tmp_path):
    reg = Registry.init(tmp_path / "r")
    X = population()[:6]
    reg.add_models(NewModel(f"m{i}", X[i], LAYOUT, "planted/base") for i in range(6))
    r = CliRunner().invoke(cli, ["--registry", str(tmp_path / "r"), "search", "--like", "m0", "--metric", "w2w"])
    assert r.exit_code != 0
    assert "no fitted subspace" in r.output and "w2wreg fit" in r.output


def test_w2w_from_a_model_not_yet_projected_reads_its_vector(tmp_path):
    """A model of the space without stored coefficients (its projection row gone: added while a fit was being
    registered, say) is searched from its vector, projected then: the same hits as its file gives; asking for
    its coefficients says what to run."""
    X = population(seed=1)[:24]
    reg = Registry.init(tmp_path / "r")
    reg.add_models(NewModel(f"m{i:03d}", X[i], LAYOUT, "planted/base", kind="trained") for i in range(len(X)))
    wspace.fit_space(reg, components=10)
    sm = wspace.require(reg, reg.spaces()[0].id)
    gone = reg.get("m005").id
    with reg.catalog.connect(write=True) as con:
        con.execute("DELETE FROM projections WHERE model_id = ?", [gone])
    with pytest.raises(wspace.W2WError, match="repair"):
        wspace.coefficients(reg, sm, [reg.get("m004").id, reg.get("m005").id])
    assert wspace.stored_coefficients(reg, sm, reg.get("m005").id) is None
    path = write_lora(unflatten(reg.vector("m005"), LAYOUT), tmp_path / "q.safetensors", "diffusers")[0]
    by_name, by_file = (reg.search(q, k=4, metric="w2w") for q in ("m005", str(path)))
    assert [h.model.name for h in by_name.hits] == [h.model.name for h in by_file.hits]
    assert "m004" in [h.model.name for h in by_name.hits]  # its partner (pairs: m004, m005)
    np.testing.assert_allclose([h.distance for h in by_name.hits], [h.distance for h in by_file.hits], atol=1e-6)

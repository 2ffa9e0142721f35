"""dW across layouts: exact distances from factors, cross-rank/alpha/format neighbours, sketch candidates vs brute
force, --where, near copies at add, `dupes`, and mix across ranks (exact, and --rank with its error)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import w2wreg as run
from helpers import w2wreg_json as as_json
from sd_shapes import SD15, dense, dense_distance, lora_on, resize, rounded

from registry import sketches
from registry.registry import NewModel, Registry
from w2w import delta
from w2w.factor_mix import concat, shared_frame, truncate
from w2w.flatten import flatten, unflatten
from w2w.formats import write_lora
from w2w.lora import LoRA, LoRALayer

ATTN = {k: v for k, v in SD15.items() if "attn" in k}
NARROW = {k: v for k, v in SD15.items() if v[0] == 320}  # the 320-channel modules: dense SVDs stay cheap
# a spectrum whose rank-4 truncation loses 1e-3 of dW per module: ranks 5-8 hold 1e-3 / sqrt(4) each
SPECTRUM = np.array([1.0, 0.8, 0.6, 0.5, 5e-4, 5e-4, 5e-4, 5e-4])


# Tolerance of factor-vs-dense distances: both sum float64 products of the same float32 values, each
# within ~n u64 (n <= 2560 terms, u64 = 1.1e-16) of the exact sum: relative 3e-13 of the squared norms;
# a distance d from squared norms of size N^2 carries ~3e-13 N^2 / d. 1e-9 relative covers d >= 1e-2 N.
def test_distances_from_factors_equal_dense():
    x = lora_on(SD15, 8, 4.0, 1)  # rank 8, alpha 4, every module
    y = lora_on(ATTN, 3, 1.5, 2)  # rank 3, alpha 1.5, attention only
    fx, fy = delta.Factors.of(x), delta.Factors.of(y)
    assert delta.distance(fx, fy) == pytest.approx(dense_distance(x, y), rel=1e-9)
    dx, dy = dense(x), dense(y)
    ip = sum(float(np.sum(dx[n] * dy[n])) for n in dx.keys() & dy.keys())
    nx = np.sqrt(sum(float(np.sum(v**2)) for v in dx.values()))
    ny = np.sqrt(sum(float(np.sum(v**2)) for v in dy.values()))
    assert delta.inner(fx, fy) == pytest.approx(ip, rel=1e-9, abs=1e-12 * nx * ny)
    assert delta.cosine_distance(fx, fy) == pytest.approx(1 - ip / (nx * ny), abs=1e-12)
    assert fx.sq_norm == pytest.approx(nx**2, rel=1e-12)


def test_same_dw_with_other_alpha_or_factorization_is_distance_zero():
    x = lora_on(ATTN, 4, 4.0, 3)
    # alpha 1 instead of 4, B scaled to keep dW; and B M, M^-1 A
    y = type(x)({n: type(l)(l.A, l.B * 4.0, 1.0) for n, l in x.layers.items()})
    assert delta.relative_distance(delta.Factors.of(x), delta.Factors.of(y)) < 1e-7


def test_sketch_distances_estimate_dw_distances():
    """The sketch is linear in dW with E ||sk||^2 = ||dW||^2: checked on 40 random pairs (the spread of the
    ratio is ~1/side + per-module chi2 terms; 0.5..1.5 holds with a wide margin for side 32)."""
    part = {k: v for k, v in NARROW.items() if "attn1" not in k}
    loras = [lora_on(NARROW if i % 2 else part, 2 + i % 5, 1.0 + i % 3, 10 + i) for i in range(10)]
    sk = [delta.sketch(l) for l in loras]
    ratios = [
        np.linalg.norm(sk[i] - sk[j]) / dense_distance(loras[i], loras[j]) for i in range(10) for j in range(i + 1, 10)
    ]
    assert min(ratios) > 0.5 and max(ratios) < 1.5 and abs(np.mean(ratios) - 1) < 0.1


def test_shared_frame_keeps_dw_and_makes_vectors_linear_in_it():
    """A = I for every LoRA of the layout, B = dW: the mean of the vectors is the vector of the mean dW, which
    the mean of rank-1 factors is not (B A is bilinear)."""
    rng = np.random.default_rng(0)
    loras = [
        LoRA(
            {
                m: LoRALayer(
                    rng.standard_normal((1, 6)).astype(np.float32), rng.standard_normal((5, 1)).astype(np.float32), 2.0
                )
                for m in ("a", "b")
            }
        )
        for _ in range(3)
    ]
    framed = [shared_frame(x) for x in loras]
    for x, f in zip(loras, framed, strict=True):
        for m in x.layers:
            # float32 products of one rank-1 term each side: within a few ulps of the largest entry
            np.testing.assert_allclose(
                f.layers[m].delta(), x.layers[m].delta(), rtol=0, atol=1e-5 * np.abs(x.layers[m].delta()).max()
            )
            assert f.layers[m].rank == 6 and f.layers[m].scale == 1.0 and np.array_equal(f.layers[m].A, np.eye(6))
    assert len({f.layout().fingerprint for f in framed}) == 1
    mean_vector = np.mean([flatten(f) for f in framed], axis=0)
    mean_dw = np.mean([x.layers["a"].delta() for x in loras], axis=0)
    got = unflatten(mean_vector, framed[0].layout()).layers["a"].delta()
    np.testing.assert_allclose(got, mean_dw, rtol=0, atol=1e-5 * np.abs(mean_dw).max())
    factor_mean = unflatten(np.mean([flatten(x) for x in loras], axis=0), loras[0].layout()).layers["a"].delta()
    assert np.abs(factor_mean - mean_dw).max() > 0.1 * np.abs(mean_dw).max()


def test_truncate_is_the_best_rank_r_approximation():
    x = lora_on(NARROW, 8, 8.0, 5, spectrum=SPECTRUM)
    t, err = truncate(x, 4)
    expected = dense_distance(x, resize(x, 4)) / np.sqrt(delta.Factors.of(x).sq_norm)
    assert err == pytest.approx(expected, rel=1e-5)
    assert dense_distance(t, resize(x, 4)) < 1e-5 * np.sqrt(delta.Factors.of(x).sq_norm)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, Path]:
    """A registry of SD 1.5-shaped LoRAs in many layouts: a rank-8 kohya file, its rank-4 resize (diffusers),
    its fp16 and bf16 roundings, the same dW with another alpha (PEFT, naming its base model), and 12 unrelated
    models of mixed ranks and targets."""
    reg, files = tmp_path_factory.mktemp("reg"), tmp_path_factory.mktemp("files")
    run(reg, "init")
    orig = lora_on(SD15, 8, 8.0, 7, spectrum=SPECTRUM)
    write_lora(orig, files / "orig.safetensors", "kohya")
    run(reg, "add", str(files / "orig.safetensors"), "--attr", "tagged=true")
    write_lora(resize(orig, 4), files / "resized.safetensors", "diffusers")
    write_lora(rounded(orig, torch.float16), files / "orig_fp16.safetensors", "kohya")
    write_lora(rounded(orig, torch.bfloat16), files / "orig_bf16.safetensors", "kohya")
    other_alpha = type(orig)({n: type(l)(l.A, l.B * 8.0, 1.0) for n, l in orig.layers.items()})
    other_alpha.base_model = "runwayml/stable-diffusion-v1-5"
    write_lora(other_alpha, files / "alpha1", "peft")
    for i in range(12):
        write_lora(lora_on(SD15 if i % 3 else ATTN, 2 + i % 7, 1.0 + i % 4, 100 + i), files / f"u{i}.safetensors")
    return reg, files


def test_add_reports_near_copies_in_any_layout(hub):
    reg, files = hub
    out = as_json(reg, "add", str(files / "resized.safetensors"), str(files / "orig_fp16.safetensors"))
    near = {n["name"]: n for n in out["near_copies"]}
    assert near["resized"]["of"] == "orig" and near["resized"]["guess"].startswith("a resize")
    assert near["orig_fp16"]["of"] == "orig" and near["orig_fp16"]["guess"] == "fp16 copy?"
    assert all(n["kept"] for n in near.values())
    # an fp16 rounding: relative dW distance ~0.8 u = 4e-4 (registry.sketches.DTYPE_COPY)
    assert 1e-5 < near["orig_fp16"]["relative_distance"] < 2 * 2.0**-11
    result = run(reg, "add", str(files / "orig_bf16.safetensors"), str(files / "alpha1"))
    assert "orig_bf16: near copy of orig" in result.output and "bf16 copy?" in result.output
    assert "alpha1: near copy of orig" in result.output and "same dW" in result.output
    run(reg, "add", *[str(files / f"u{i}.safetensors") for i in range(12)])
    # skip mode: a re-spelled copy (diffusers instead of kohya, other dtype) is not added
    orig = lora_on(SD15, 8, 8.0, 7, spectrum=SPECTRUM)
    other_alpha = type(orig)({n: type(l)(l.A, l.B * 8.0, 1.0) for n, l in orig.layers.items()})
    write_lora(rounded(other_alpha, torch.float16), files / "x.safetensors")
    out = as_json(reg, "add", str(files / "x.safetensors"), "--on-near-copy", "skip")
    assert out["added"] == [] and "near copy" in out["skipped"][0]["reason"]


def test_cross_layout_search_finds_resizes_and_copies(hub):
    reg, files = hub
    hits = as_json(reg, "search", "--like", "orig", "--metric", "delta", "-k", "5")
    assert hits["family"] == "sd15"
    names = [h["name"] for h in hits["results"]]
    assert set(names[:4]) == {"resized", "orig_fp16", "orig_bf16", "alpha1"}
    assert names[4].startswith("u")
    # from the resize (rank 4, diffusers) the rank-8 kohya original and its copies come first
    hits = as_json(reg, "search", "--like", str(files / "resized.safetensors"), "--metric", "delta", "-k", "5")
    assert set(h["name"] for h in hits["results"][:5]) == {"resized", "orig", "orig_fp16", "orig_bf16", "alpha1"}
    cos = as_json(reg, "search", "--like", "orig", "--metric", "delta-cosine", "-k", "4")["results"]
    assert {h["name"] for h in cos} == {"resized", "orig_fp16", "orig_bf16", "alpha1"}
    # metadata filters apply: only tagged or named models
    hits = as_json(reg, "search", "--like", "resized", "--metric", "delta", "--where", "name LIKE 'u%'", "-k", "3")
    assert all(h["name"].startswith("u") for h in hits["results"]) and len(hits["results"]) == 3
    hits = as_json(reg, "search", "--like", "resized", "--metric", "delta", "--where", "family = 'sdxl'")
    assert hits["results"] == []
    # the distances agree with the dense computation. Search ranks on float32 Grams (w2w.delta.search_distance):
    # each Gram entry sums n <= 2560 products, within n u32 = 2560 * 6e-8 = 1.5e-4 of the sum of their
    # magnitudes (worst case), so d^2 is within ~1.5e-4 (n1 + n2), and d within 1e-3 of itself while
    # d^2 >= (n1 + n2) / 3 (unrelated models: d^2 ~ n1 + n2); closer pairs are recomputed in float64.
    r = Registry.open(reg)
    for h in as_json(reg, "search", "--like", "u1", "--metric", "delta", "-k", "3")["results"]:
        assert h["distance"] == pytest.approx(dense_distance(r.lora("u1"), r.lora(h["name"])), rel=1e-3)
    # near copies, recomputed in float64: d^2 = n1 + n2 - 2 ip is within ~1e-15 (n1 + n2) (n1, n2 ~ 10 here),
    # so d is within sqrt(1e-14) = 1e-7 absolute, and relative 1e-6 for the fp16/bf16/resize copies
    for h in as_json(reg, "search", "--like", "orig", "--metric", "delta", "-k", "4")["results"]:
        assert h["distance"] == pytest.approx(dense_distance(r.lora("orig"), r.lora(h["name"])), rel=1e-6, abs=1e-7)


def test_dupes_groups_the_planted_copies(hub):
    reg, _ = hub
    out = as_json(reg, "dupes")
    groups = [sorted(m["name"] for m in g["models"]) for g in out["groups"]]
    assert groups == [["alpha1", "orig", "orig_bf16", "orig_fp16", "resized"]]
    assert "orig" in run(reg, "dupes").output
    tight = as_json(reg, "dupes", "--threshold", "1e-5")["groups"]  # same dW only: fp16 is ~4e-4 away
    assert [sorted(m["name"] for m in g["models"]) for g in tight] == [["alpha1", "orig"]]
    assert "same dW" in tight[0]["pairs"][0]["guess"]
    # the relation recorded at add, shown with the model
    shown = as_json(reg, "show", "orig_fp16")
    assert shown["near_copies"] == [
        {
            "of": "orig",
            "relative_distance": pytest.approx(shown["near_copies"][0]["relative_distance"]),
            "guess": "fp16 copy?",
        }
    ]
    assert "near copy   of orig" in run(reg, "show", "orig_fp16").output


def test_mix_across_ranks_is_exact_and_rank_prints_its_error(hub):
    reg, _ = hub
    out = as_json(reg, "mix", "0.5*orig + 2*u1 - u2", "--name", "mixed")
    assert out["mode"] == "factors"
    r = Registry.open(reg)
    expected = concat([(0.5, r.lora("orig")), (2.0, r.lora("u1")), (-1.0, r.lora("u2"))])
    got = r.lora("mixed")
    dg, de = dense(got), dense(expected)
    d_orig, d_u1, d_u2 = dense(r.lora("orig")), dense(r.lora("u1")), dense(r.lora("u2"))
    for n in dg:
        want = 0.5 * d_orig.get(n, 0) + 2 * d_u1.get(n, 0) - d_u2.get(n, 0)
        assert np.allclose(dg[n], want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.allclose(dg[n], de[n], rtol=0, atol=1e-5 * np.abs(want).max())
    result = run(reg, "mix", "0.5*orig + 2*u1 - u2", "--name", "mixed4", "--rank", "4")
    assert "truncated to rank 4: relative dW error" in result.output
    err = float(result.output.split("relative dW error")[1].split()[0])
    t, expected_err = truncate(got, 4)
    assert err == pytest.approx(expected_err, rel=1e-3)
    assert {l.rank for l in r.lora("mixed4").layers.values()} == {4}


def test_sketch_candidates_agree_with_brute_force(tmp_path):
    """100 models in 6 layouts (above EXACT_MAX, so FAISS proposes candidates): the top 5 by sketch + exact
    re-rank equal the top 5 of an exact scan of every model, for every query."""
    reg = Registry.init(tmp_path / "reg")
    rng = np.random.default_rng(0)
    centers = [lora_on(SD15, 4, 4.0, 1000 + c) for c in range(10)]
    items = []
    for i in range(100):
        c = centers[i % 10]
        layout_mods = SD15 if i % 2 else ATTN
        noise = lora_on(layout_mods, 1 + i % 3, 1.0, 2000 + i)
        scale = 0.3 + 0.5 * rng.random()
        mixed = concat([(1.0, type(c)({n: c.layers[n] for n in layout_mods})), (scale, noise)])
        items.append(NewModel.from_lora(f"m{i}", mixed))
    assert not reg.add_models(items).errors
    assert reg.catalog.model_table().rows and len(reg.spaces()) > 1
    assert len(sketches.load(reg, "sd15").ids) > sketches.EXACT_MAX
    facs = {i: sketches.factors(reg, i) for i in reg.catalog.model_table().rows}
    for q in list(facs)[:20]:
        exact = sorted((delta.distance(facs[q], facs[j]), j) for j in facs if j != q)[:5]
        got = reg.search(q, k=5, metric="delta")
        assert [h.model.id for h in got.hits] == [j for _, j in exact]


def test_near_ties_beyond_the_first_candidates_are_still_found(tmp_path):
    """100 unrelated LoRAs of one shape and scale: every distance is within a few % of every other, so the exact
    top 10 lies past the first sketch candidates; the re-rank fetches more until its stop rule holds."""
    reg = Registry.init(tmp_path / "reg")
    assert not reg.add_models([NewModel.from_lora(f"u{i}", lora_on(SD15, 2, 2.0, 5000 + i)) for i in range(100)]).errors
    facs = {i: sketches.factors(reg, i) for i in reg.catalog.model_table().rows}
    for q in list(facs)[:8]:
        exact = sorted((delta.distance(facs[q], facs[j]), j) for j in facs if j != q)[:10]
        got = reg.search(q, k=10, metric="delta")
        assert [h.model.id for h in got.hits] == [j for _, j in exact]


def test_rerank_stops_by_its_rule_and_grows_the_candidates_when_they_run_out():
    rng = np.random.default_rng(0)
    exact = 1.0 + rng.random(400)  # the k-th within a few % of many others
    est = exact * (1 + 0.03 * rng.standard_normal(400))  # a sketch's ~3% error
    order = np.argsort(est)
    asked: list[int] = []

    def fetch(n):
        asked.append(n)
        return order[:n], est[order[:n]]

    measured = []

    def measure(i):
        measured.append(i)
        return lambda: float(exact[i])

    got = sketches._rerank_sketched(fetch, 30, 400, 10, measure)
    assert [i for i, _ in got] == np.argsort(exact)[:10].tolist()
    assert len(asked) > 1 and len(set(measured)) == len(measured) < 400  # grew; compared each once; stopped


def test_a_twin_of_the_query_does_not_defeat_the_stop_rule():
    """The same dW in another factorization is at exact distance ~1e-9 |dW| and sketch distance ~1e-7 |dW| (float32
    rounding): its ratio (~100) would widen the floor to STOP_MIN and compare nearly everything; below the
    resolution it does not count, and the rule stops as it does without the twin."""
    rng = np.random.default_rng(1)
    exact = np.concatenate([[1e-9], 2.0 + 10.0 * rng.random(399)])  # |dW| ~ 1: a twin, then models 2-12 away
    est = exact * (1 + 0.03 * rng.standard_normal(400))
    est[0] = 1e-7
    order = np.argsort(est)

    def fetch(n):
        return order[:n], est[order[:n]]

    def run(resolution):
        measured = []

        def measure(i):
            measured.append(i)
            return float(exact[i])

        got = sketches._rerank_sketched(fetch, 30, 400, 10, measure, resolution)
        assert [i for i, _ in got] == np.argsort(exact)[:10].tolist()
        return len(measured)

    assert run(1e-4) < 60 < run(0.0)


# inner32_many's tolerance: each float32 Gram entry is a dot product of <= 1,280 terms, within ~n u32 (u32 = 6e-8)
# of its value relative to the factors' norms; summed over modules, |error| <= ~1e-4 |dW_x| |dW_y| at worst and
# ~1e-6 typically. 1e-5 of the norms' product fails any wrong pairing of factors (those are O(1) of it).
@pytest.mark.parametrize("rank", [1, 4])
def test_inner_products_of_views_sharing_a_layout_taken_stacked_equal_float64(rank):
    """Views that share a layout are stacked (two products per module for all of them): x's own layout, and
    another one (fewer modules, a lower rank, another alpha); a lone view of a third layout and a LoRA take the
    per-module path. Every answer is the float64 inner product of the factors."""
    x = lora_on(NARROW, rank, 3.0, 40)  # 1x1 conv modules included
    cols = np.arange(1, rank + 1, dtype=np.float32)  # B's columns scaled apart: a swapped Gram index shows
    low = max(1, rank // 2)

    def near_x(seed: int, modules=NARROW, r: int = rank, alpha: float = 3.0) -> LoRA:
        """<dW_x, dW_y> of the order of the norms: a wrong pairing of factors is off by O(1) of them."""
        noise = lora_on(modules, r, alpha, seed)
        return LoRA(
            {
                n: LoRALayer(
                    x.layers[n].A[:r] + 0.5 * noise.layers[n].A,
                    x.layers[n].B[:, :r] * cols[:r].reshape(1, r, *x.layers[n].B.shape[2:]),
                    alpha,
                )
                for n in modules
            }
        )

    attn = {k: v for k, v in NARROW.items() if k in ATTN}
    same = [near_x(41 + i) for i in range(4)]
    other = [near_x(45 + i, attn, low, 1.0) for i in range(3)]  # a second shared layout
    lone = near_x(50, attn, low, 2.0)  # its own layout (another alpha)
    plain = near_x(51)
    loras = [same[0], other[0], same[1], lone, other[1], plain, same[2], other[2], same[3]]
    ys = [y if y is plain else delta.Views.of(flatten(y), y.layout()) for y in loras]
    xv = delta.Views.of(flatten(x), x.layout())
    got = delta.inner32_many(xv, ys)
    fx = delta.Factors.of(x)
    for y, g in zip(loras, got, strict=True):
        fy = delta.Factors.of(y)
        want = delta.inner(fx, fy)
        assert abs(want) > 0.3 * np.sqrt(fx.sq_norm * fy.sq_norm)
        assert g == pytest.approx(want, abs=1e-5 * np.sqrt(fx.sq_norm * fy.sq_norm))
    assert "layers" not in ys[0].__dict__ and "layers" not in ys[1].__dict__  # stacked: no per-module views
    assert delta.shapes_agree(xv, ys[0]) and delta.shapes_agree(xv, ys[1])
    assert delta.inner32_many(delta.Views.of(flatten(x), x.layout()), ys[:1]) == pytest.approx(got[:1])


@pytest.mark.parametrize("stacked", [True, False])
def test_inner_products_raise_on_a_conflicting_module(stacked):
    x = lora_on(ATTN, 2, 1.0, 60)
    name = next(iter(x.layers))
    wrong = lora_on({name: (ATTN[name][0] * 2, ATTN[name][1], False)}, 2, 1.0, 61)
    xv, wv = delta.Views.of(flatten(x), x.layout()), delta.Views.of(flatten(wrong), wrong.layout())
    assert not delta.shapes_agree(xv, wv)
    with pytest.raises(delta.LayoutMismatchError, match="not of one base model family"):
        delta.inner32_many(xv, [wv, wv] if stacked else [xv, wrong])


@pytest.mark.parametrize("rows_per_product", [64, 65536])
def test_nearest_sketches_of_a_batch_are_faiss_flat_search_per_query(monkeypatch, rows_per_product):
    """FamilySketches.nearest_many (one product for a batch of queries, in chunks of stored sketches) finds what
    FAISS's exact flat search finds query by query, in the same order, at distances within float32 rounding of
    the direct sums; near-duplicate queries (distance ~1e-6 of the norms, where ||x||^2 - 2 q.x cancels) too."""
    monkeypatch.setattr(sketches, "NEAREST_ROWS", rows_per_product)
    rng = np.random.default_rng(3)
    sk = rng.standard_normal((300, 1024)).astype(np.float32)
    ids = rng.choice(10_000, size=300, replace=False).astype(np.int64)
    fam = sketches.FamilySketches.build("sd15", np.sort(ids), np.ones(300), sk[np.argsort(ids)])
    queries = np.concatenate([rng.standard_normal((5, 1024)), sk[:3] + 1e-6 * rng.standard_normal((3, 1024))])
    dist, got = fam.nearest_many(queries, 24)
    for q, d, g in zip(queries.astype(np.float32), dist, got, strict=True):
        want_d, want = fam.index.search(q[None, :], 24)
        assert g.tolist() == want[0].tolist()
        assert d == pytest.approx(want_d[0], rel=1e-5, abs=1e-3)
    assert got[5, 0] == ids[0] and dist[5, 0] < 1e-6  # the near duplicate, at its tiny distance (no cancellation)
    d_all, all_ids = fam.nearest_many(queries[:2], 1000)  # more than stored: every one of them, nearest first
    assert sorted(all_ids[0].tolist()) == sorted(ids.tolist()) and np.all(np.diff(d_all[0]) >= 0)

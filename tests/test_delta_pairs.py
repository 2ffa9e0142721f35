"""Exact dW pairs kept at add time (registry.delta_pairs): their values, a search's use of them (the same answer with
less math), and verify/repair for a registry made before them."""

from __future__ import annotations

import numpy as np
import pytest
from sd_shapes import SD15, lora_on

from registry import delta_pairs, integrity, sketches
from registry.registry import NewModel, Registry
from w2w import delta
from w2w.factor_mix import concat

ATTN = {k: v for k, v in SD15.items() if "attn" in k}


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    """90 SD 1.5 LoRAs in 6 layouts around 9 centres (above EXACT_MAX: searches go through the sketches), added
    in two adds so that pairs are kept both within an add (staged models) and against committed ones."""
    reg = Registry.init(tmp_path_factory.mktemp("pairs") / "reg")
    items = _items(90)
    for part in (items[:50], items[50:]):
        assert not reg.add_models(part).errors
    assert len(sketches.load(reg, "sd15").ids) > sketches.EXACT_MAX
    return reg


def _items(n: int, copies: dict[int, int] | None = None) -> list[NewModel]:
    """n SD 1.5 LoRAs in 6 layouts around 9 centres; `copies` {i: j}: model i is an fp16 copy of model j < i."""
    import torch
    from sd_shapes import rounded

    centres = [lora_on(SD15, 4, 4.0, 300 + c) for c in range(9)]
    loras = []
    for i in range(n):
        if copies and i in copies:
            loras.append(rounded(loras[copies[i]], torch.float16))
            continue
        modules = SD15 if i % 2 else ATTN
        c = centres[i % 9]
        noise = lora_on(modules, 1 + i % 3, 1.0, 400 + i)
        loras.append(concat([(1.0, type(c)({n: c.layers[n] for n in modules})), (0.5, noise)]))
    return [NewModel.from_lora(f"m{i}", lora) for i, lora in enumerate(loras)]


def _kept(reg: Registry) -> dict[tuple[int, int], float]:
    with reg.catalog.connect() as con:
        return {(a, b): d2 for a, b, d2 in con.execute("SELECT a, b, d2 FROM delta_pairs").fetchall()}


def test_each_model_keeps_exact_distances_to_its_sketch_nearest(reg):
    """Every model has min(PAIRS_AT_ADD, models before it) pairs with models added before it, each the squared dW
    distance of the float64 factors: kept as ||x||^2 + ||y||^2 - 2 <x, y> with <x, y> a sum of float32 Gram entries
    (each within ~n u32 of exact, n <= 2,560 terms, u32 = 6e-8: 1.5e-4 |x| |y| at worst, ~sqrt(n) u32 = 3e-6
    typical); 2e-5 of ||dW_a|| ||dW_b|| bounds twice that with a margin for the typical case."""
    kept = _kept(reg)
    ids = sorted(reg.catalog.model_table().rows)
    facs = {i: sketches.factors(reg, i) for i in ids}
    for pos, i in enumerate(ids):
        with_earlier = [a for a, b in kept if b == i]
        assert len(with_earlier) == min(delta_pairs.PAIRS_AT_ADD, pos)
    for (a, b), d2 in list(kept.items())[::7]:
        scale = np.sqrt(facs[a].sq_norm * facs[b].sq_norm)
        assert d2 == pytest.approx(delta.distance(facs[a], facs[b]) ** 2, abs=2e-5 * scale)


def test_pairs_with_staged_models_are_the_same_whether_their_rows_are_buffered_being_written_or_stored(
    tmp_path, monkeypatch
):
    """Within one add a staged model's row is read from the add's buffer, from a batch the writer thread holds,
    or back from the store once written (registry._AddSession.views_of): every way gives the same pairs, bit for
    bit, as an add that keeps every row buffered."""
    from registry import registry as registry_module

    items = _items(40)
    one = Registry.init(tmp_path / "buffered")
    assert not one.add_models(items).errors  # 40 rows < FLUSH_ROWS: all in the buffer
    monkeypatch.setattr(registry_module, "FLUSH_ROWS", 3)  # 13 batches handed to the writer, each fsynced
    two = Registry.init(tmp_path / "written")
    assert not two.add_models(_items(40)).errors
    assert _kept(two) == _kept(one) and len(_kept(one)) > 300


def test_neighbours_searched_for_a_window_of_models_are_those_searched_one_by_one(tmp_path, monkeypatch):
    """`add` searches the sketches of a window of digested models in one batch, then adds the window's models
    staged before each (registry._AddSession.prefetch_neighbours): the same pairs and near copies as a search per
    model, with near copies planted within a window and across windows."""
    from registry import registry as registry_module

    copies = {9: 2, 30: 4, 37: 31}  # windows of 16: 9 copies 2 in its window; 30 and 37 copy models of earlier ones

    def add(folder: str, window: int):
        monkeypatch.setattr(registry_module, "WINDOW_MODELS", window)
        reg = Registry.init(tmp_path / folder)
        report = reg.add_models([m.digest() for m in _items(48, copies)])
        assert not report.errors
        return _kept(reg), [(c["name"], c["of"]) for c in report.near_copies]

    one_by_one, windowed = add("one", 1), add("windowed", 16)
    assert windowed[1] == one_by_one[1] == [("m9", "m2"), ("m30", "m4"), ("m37", "m31")]
    assert windowed[0].keys() == one_by_one[0].keys()
    # each pair from the same float32 Grams; a BLAS may round a row by its place in the stack of others (~1e-7
    # |x| |y| a Gram entry) and d2 is ~0.4 |x| |y| or more here (near copies: float64, the same bits)
    for pair, d2 in one_by_one[0].items():
        assert windowed[0][pair] == pytest.approx(d2, rel=1e-5)


def test_a_near_copy_pair_is_kept_in_float64(tmp_path):
    """An fp16 copy is at relative distance ~4e-4: its squared distance (~1e-7 of the norms) is below float32
    Grams' rounding, so it is kept from the float64 factors (relative error ~1e-9, see test_delta_search)."""
    import torch
    from sd_shapes import rounded

    reg = Registry.init(tmp_path / "reg")
    orig = lora_on(ATTN, 8, 8.0, 7)
    assert not reg.add_models(
        [NewModel.from_lora("o", orig), NewModel.from_lora("c", rounded(orig, torch.float16))]
    ).errors
    ((pair, d2),) = _kept(reg).items()
    fo, fc = (sketches.factors(reg, reg.get(n).id) for n in ("o", "c"))
    assert d2 == pytest.approx(delta.distance(fo, fc) ** 2, rel=1e-6)
    hit = reg.search("o", k=1, metric="delta").hits[0]
    assert hit.model.name == "c" and hit.distance == pytest.approx(delta.distance(fo, fc), rel=1e-6)


def test_search_from_a_registered_model_takes_kept_pairs_and_answers_the_same(reg, monkeypatch):
    """A search from a registered model agrees with an exhaustive exact scan and computes few Grams itself: the
    pairs its sketch ranks first were compared when the models were added."""
    computed: list[int] = []
    sq_distance = delta.sq_distance

    def counted(*args):
        computed.append(1)
        return sq_distance(*args)

    monkeypatch.setattr(delta, "sq_distance", counted)
    ids = sorted(reg.catalog.model_table().rows)
    facs = {i: sketches.factors(reg, i) for i in ids}
    with_pairs, without = 0, 0
    for q in ids[::9]:
        exact = sorted((delta.distance(facs[q], facs[j]), j) for j in ids if j != q)[:5]
        computed.clear()
        got = reg.search(q, k=5, metric="delta")
        with_pairs += len(computed)
        assert [h.model.id for h in got.hits] == [j for _, j in exact]
        for h, (d, _) in zip(got.hits, exact, strict=True):
            assert h.distance == pytest.approx(d, rel=1e-4)
    # the same searches with nothing kept (a registry made before pairs were kept) compute every pair themselves
    monkeypatch.setattr(delta_pairs, "load", lambda reg: delta_pairs.PairTable(*(np.empty(0),) * 3))  # none kept
    for q in ids[::9]:
        computed.clear()
        got = reg.search(q, k=5, metric="delta")
        without += len(computed)
    assert without >= 5 * len(ids[::9]) and with_pairs < without / 3


def test_verify_reports_a_registry_without_pairs_and_repair_computes_them(reg):
    kept = _kept(reg)
    with reg.catalog.connect(write=True) as con:
        con.execute("DELETE FROM delta_pairs")
        con.execute("UPDATE deltas SET paired = NULL")
    found = [f for f in integrity.verify(reg).findings if f.what == "delta pairs"]
    assert len(found) == 1 and found[0].kind == "stale" and found[0].fixable
    assert any(line.startswith("delta pairs: 90 models") for line in integrity.repair(reg))
    again = _kept(reg)
    assert again.keys() == kept.keys()  # each model against the same sketch-nearest earlier models as its add
    assert all(again[p] == pytest.approx(kept[p], rel=1e-6, abs=1e-9) for p in kept)
    assert not [f for f in integrity.verify(reg).findings if f.what == "delta pairs"]

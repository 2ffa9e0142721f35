"""Importing the weights2weights release (`w2wreg ingest --from-w2w-release`), on small files of its structure.

The test writes what a user downloads, the way the authors made it: all_weights.pt is one (N, D) float32 tensor
whose rows concatenate `.flatten()` of every adapter tensor in the order `load_peft_weights` returns them (sorted
PEFT keys); weight_dimensions.pt maps each key to (torch.Size([numel]), shape) in that order; adapter_config.json
is the PEFT config (r = 1, lora_alpha = 27, to_q/to_v). The real SD 1.5 keys and shapes, D = 99,648; N = 7.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mapped_kb

import ingest.w2w_release as w2r
from ingest.w2w_release import BASE_MODEL, ReleaseWarning, import_release, read_release, table_to_attributes
from registry.registry import Registry
from w2w.errors import (
    ReleaseDependencyError,
    ReleaseError,
    ReleaseFileMissingError,
    ReleaseFormatError,
)
from w2w.flatten import flatten
from w2w.formats import read_lora
from w2w.lora import LoRA, LoRALayer
from w2w.presets import sd15_layout

N = 7
HAS_PANDAS = importlib.util.find_spec("pandas") is not None
CONFIG = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "r": 1,
    "lora_alpha": 27,
    "lora_dropout": 0.0,
    "target_modules": ["to_v", "to_q"],
    "bias": "none",
    "init_lora_weights": True,
    "rank_pattern": {},
    "alpha_pattern": {},
    "fan_in_fan_out": False,
    "modules_to_save": None,
}


@pytest.fixture(scope="module")
def layout():
    return sd15_layout("w2w")


@pytest.fixture(scope="module")
def official_dims(layout) -> dict:
    """weight_dimensions as the authors saved it: sorted PEFT keys -> (torch.Size([numel]), torch.Size(shape))."""
    shapes = {}
    for e in layout.entries:
        shapes[f"base_model.model.{e.module}.lora_A.weight"] = e.a_shape
        shapes[f"base_model.model.{e.module}.lora_B.weight"] = e.b_shape
    return {k: (torch.Size([math.prod(shapes[k])]), torch.Size(shapes[k])) for k in sorted(shapes)}


def write_release(folder: Path, dims: dict, n: int = N, seed: int = 0, config: dict | None = None) -> np.ndarray:
    """The release's files in `folder`; returns the (n, D) rows written."""
    folder.mkdir(parents=True, exist_ok=True)
    d = sum(int(v[0][0]) for v in dims.values())
    rows = (np.random.default_rng(seed).standard_normal((n, d)) * 0.01).astype(np.float32)
    torch.save(torch.from_numpy(rows), folder / "all_weights.pt")
    torch.save(dims, folder / "weight_dimensions.pt")
    (folder / "adapter_config.json").write_text(json.dumps(config or CONFIG))
    return rows


def release_lora(row: np.ndarray, dims: dict, alpha: float = 27.0) -> LoRA:
    """The LoRA a release row stands for, unflattened the authors' way: walk the keys with a running offset."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    offset = 0
    for key, (numel, shape) in dims.items():
        module, factor = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        parts.setdefault(module, {})[factor[0]] = row[offset : offset + numel[0]].reshape(tuple(shape))
        offset += numel[0]
    assert offset == row.shape[0]
    return LoRA({m: LoRALayer(p["A"], p["B"], alpha) for m, p in parts.items()})


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry.init(tmp_path / "reg")


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, dict]]:
    """Every torch.load call: (file name, keyword arguments)."""
    calls: list[tuple[str, dict]] = []
    real = torch.load

    def spy(f, *args, **kw):
        calls.append((Path(f).name, kw))
        return real(f, *args, **kw)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_import_puts_every_row_in_our_layout(tmp_path, reg, layout, official_dims, loads):
    rows = write_release(tmp_path / "release", official_dims)
    report = import_release(reg, tmp_path / "release", progress=False)
    assert report.committed and len(report.added) == N and not report.errors
    assert any("identity_df.pt" in w for w in report.warnings), report.warnings

    [space] = reg.spaces()
    assert reg.layout(space.id) == layout, "the release must land in the paper's SD 1.5 w2w space"
    assert space.base_model == BASE_MODEL and space.dim == 99_648
    for i in range(N):
        m = reg.get(f"w2w-{i:05d}")
        assert np.array_equal(reg.vector(m), flatten(release_lora(rows[i], official_dims))), f"row {i}"
        assert m.attributes == {} and m.source_format == "w2w-release" and m.source.endswith(f"#row={i}")

    # the authors' order (sorted PEFT keys) is our canonical order: a row is copied as it is
    assert len(read_release(tmp_path / "release").segments) == 1
    # pickles: tensors only through the safe loader, the weights memory-mapped, nothing fully unpickled
    by_file = {name: kw for name, kw in loads}
    assert by_file["all_weights.pt"].get("weights_only") is True and by_file["all_weights.pt"].get("mmap") is True
    assert by_file["weight_dimensions.pt"].get("weights_only") is True
    assert all(kw.get("weights_only") is True for _, kw in loads)


def test_any_key_order_is_mapped_key_by_key(tmp_path, reg, official_dims):
    keys = list(official_dims)
    order = np.random.default_rng(3).permutation(len(keys))
    dims = {keys[j]: official_dims[keys[j]] for j in order}
    rows = write_release(tmp_path / "release", dims, seed=1)
    assert len(read_release(tmp_path / "release").segments) > 1
    import_release(reg, tmp_path / "release", progress=False)
    for i in range(N):
        assert np.array_equal(reg.vector(f"w2w-{i:05d}"), flatten(release_lora(rows[i], dims)))


def test_exported_diffusers_file_reads_back_as_the_release_lora(tmp_path, reg, official_dims):
    rows = write_release(tmp_path / "release", official_dims)
    import_release(reg, tmp_path / "release", progress=False)
    [path] = reg.export("w2w-00003", "diffusers", tmp_path / "out" / "w2w-00003.safetensors")
    got = read_lora(path).lora
    want = release_lora(rows[3], official_dims)
    assert list(got.layers) == list(want.layers)
    for module, layer in want.layers.items():
        g = got.layers[module]
        assert np.array_equal(g.A, layer.A) and np.array_equal(g.B, layer.B) and g.alpha == 27.0, module


class Recording:
    """Stands in for the memory-mapped tensor: lets only row slices through, and records them."""

    def __init__(self, tensor: torch.Tensor):
        self._t, self.slices = tensor, []

    shape = property(lambda self: self._t.shape)
    dtype = property(lambda self: self._t.dtype)

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, f"only row slices may be read, got {key!r}"
        self.slices.append((key.start, key.stop))
        return self._t[key]


def test_rows_are_read_a_slice_at_a_time(tmp_path, reg, official_dims, monkeypatch):
    write_release(tmp_path / "release", official_dims)
    seen: list[Recording] = []
    real = w2r._load_weights

    def load(path):
        seen.append(Recording(real(path)))
        return seen[-1]

    monkeypatch.setattr(w2r, "_load_weights", load)
    report = import_release(reg, tmp_path / "release", progress=False, chunk_rows=3)
    assert len(report.added) == N
    assert seen[0].slices == [(0, 3), (3, 6), (6, 7)], "rows must be streamed in chunks, never all at once"


def test_limit_imports_the_first_rows(tmp_path, reg, official_dims):
    write_release(tmp_path / "release", official_dims)
    report = import_release(reg, tmp_path / "release", progress=False, limit=2)
    assert [n for n, _ in report.added] == ["w2w-00000", "w2w-00001"]


def test_second_import_adds_nothing(tmp_path, reg, official_dims):
    write_release(tmp_path / "release", official_dims)
    import_release(reg, tmp_path / "release", progress=False)
    again = import_release(reg, tmp_path / "release", progress=False, name_prefix="other-")
    assert again.committed and again.added == [] and not again.errors
    assert len(again.skipped) == N and all("same weights" in why for _, why in again.skipped)
    assert len(reg.ls()) == N


@pytest.mark.parametrize("missing", ["all_weights.pt", "weight_dimensions.pt", "adapter_config.json"])
def test_a_missing_file_is_named(tmp_path, reg, official_dims, missing):
    write_release(tmp_path / "release", official_dims)
    (tmp_path / "release" / missing).unlink()
    with pytest.raises(ReleaseFileMissingError, match=missing) as e:
        import_release(reg, tmp_path / "release", progress=False)
    assert "\n" not in str(e.value) and "download" in str(e.value)
    assert reg.ls() == []


def test_the_authors_repo_layout_is_found(tmp_path, reg, official_dims):
    write_release(tmp_path / "repo" / "files", official_dims)
    (tmp_path / "repo" / "weights_datasets" / "identities").mkdir(parents=True)
    (tmp_path / "repo" / "files" / "all_weights.pt").rename(
        tmp_path / "repo" / "weights_datasets" / "identities" / "all_weights.pt"
    )
    assert len(import_release(reg, tmp_path / "repo", progress=False).added) == N


def test_shape_mismatches_are_refused(tmp_path, reg, official_dims):
    keys = list(official_dims)
    # numel and shape of one entry disagree
    bad = dict(official_dims)
    bad[keys[0]] = (torch.Size([321]), official_dims[keys[0]][1])
    write_release(tmp_path / "a", bad)
    with pytest.raises(ReleaseFormatError, match="numel"):
        import_release(reg, tmp_path / "a", progress=False)
    # a factor whose shape is no LoRA of that SD 1.5 layer
    bad = dict(official_dims)
    bad[keys[0]] = (torch.Size([321]), torch.Size([1, 321]))
    write_release(tmp_path / "b", bad)
    with pytest.raises(ReleaseFormatError, match="do not fit"):
        import_release(reg, tmp_path / "b", progress=False)
    # rows of another length than weight_dimensions adds up to
    write_release(tmp_path / "c", official_dims)
    torch.save(torch.zeros(N, 99_647), tmp_path / "c" / "all_weights.pt")
    with pytest.raises(ReleaseFormatError, match="99,647"):
        import_release(reg, tmp_path / "c", progress=False)
    assert reg.ls() == []


def test_unknown_keys_are_refused(tmp_path, reg, official_dims):
    keys = list(official_dims)
    for name, new_key, message in (
        ("a", keys[0].replace("attn1.to_q", "attn1.to_x"), "no Linear layer of the SD 1.5 UNet"),
        ("b", "text_model.encoder.layers.0.mlp.fc1.weight", "no LoRA factor"),
    ):
        bad = {(new_key if k == keys[0] else k): v for k, v in official_dims.items()}
        write_release(tmp_path / name, bad)
        with pytest.raises(ReleaseFormatError, match=message):
            import_release(reg, tmp_path / name, progress=False)
    assert reg.ls() == []


def test_config_must_agree_with_the_weights(tmp_path, reg, official_dims):
    write_release(tmp_path / "a", official_dims, config={**CONFIG, "r": 4})
    with pytest.raises(ReleaseFormatError, match="rank-4"):
        import_release(reg, tmp_path / "a", progress=False)
    write_release(tmp_path / "b", official_dims, config={**CONFIG, "target_modules": ["to_q"]})
    with pytest.raises(ReleaseFormatError, match="target_modules"):
        import_release(reg, tmp_path / "b", progress=False)
    # another alpha is another space: imported, with a warning that it is not the paper's
    write_release(tmp_path / "c", official_dims, config={**CONFIG, "lora_alpha": 8})
    report = import_release(reg, tmp_path / "c", progress=False)
    assert len(report.added) == N and any("not the paper's w2w space" in w for w in report.warnings)


def test_identity_df_is_not_unpickled_without_trust(tmp_path, reg, official_dims, loads):
    write_release(tmp_path / "release", official_dims)
    torch.save({"not": "read"}, tmp_path / "release" / "identity_df.pt")
    report = import_release(reg, tmp_path / "release", progress=False)
    assert len(report.added) == N
    assert any("identity_df.pt" in w and "--trust-pickle" in w for w in report.warnings), report.warnings
    assert all(m.attributes == {} for m in reg.ls())
    assert "identity_df.pt" not in {name for name, _ in loads}


def test_trust_pickle_needs_identity_df(tmp_path, reg, official_dims):
    write_release(tmp_path / "release", official_dims)
    with pytest.raises(ReleaseFileMissingError, match="identity_df.pt"):
        import_release(reg, tmp_path / "release", trust_pickle=True, progress=False)


@pytest.mark.skipif(HAS_PANDAS, reason="checks the error given when pandas is not installed")
def test_trust_pickle_without_pandas_says_how_to_get_it(tmp_path, reg, official_dims):
    write_release(tmp_path / "release", official_dims)
    torch.save({"not": "read"}, tmp_path / "release" / "identity_df.pt")
    with pytest.warns(ReleaseWarning, match="runs whatever code"), pytest.raises(ReleaseDependencyError) as e:
        import_release(reg, tmp_path / "release", trust_pickle=True, progress=False)
    assert "pip install pandas" in str(e.value) and "\n" not in str(e.value)


# identity_df's columns as pandas hands them over: `file` names the training folders (the table is not in row order)
FILES = [10, 2, 33, 1, 100, 5, 7]  # folders "1", "10", "100", "2", "33", "5", "7" in alphanumeric order
TABLE = {
    "file": FILES,
    "Male": [1, -1, 1, -1, -1, 1, 1],
    "Eyeglasses": [0, 0, 1, 0, 1, 0, 0],
    "5_o_Clock_Shadow": [-1, -1, -1, 1, -1, -1, -1],
    "Young": [True, False, True, True, False, True, False],
    "score": [0.5, 1.5, float("nan"), 2.0, 3.0, -1.0, 0.0],
    "name": [3, 1, 4, 1, 5, 9, 2],
    "note": ["a", "b", "c", "d", "e", "f", "g"],
}


def expected_rows() -> list[tuple[str, dict]]:
    """(name, attributes) per release row: the table sorted by folder name."""
    out = []
    for j in sorted(range(N), key=lambda j: str(FILES[j])):
        attrs = {
            "male": TABLE["Male"][j] == 1,
            "eyeglasses": TABLE["Eyeglasses"][j] == 1,
            "_5_o_clock_shadow": TABLE["5_o_Clock_Shadow"][j] == 1,
            "young": TABLE["Young"][j],
            "name_attr": float(TABLE["name"][j]),
        }
        if not math.isnan(TABLE["score"][j]):
            attrs["score"] = TABLE["score"][j]
        out.append((f"w2w-{FILES[j]}", attrs))
    return out


def test_trusted_table_names_models_and_labels_them(tmp_path, reg, official_dims, monkeypatch):
    # pandas' part (unpickling the DataFrame) is swapped for the columns it would give; the rest runs for real
    rows = write_release(tmp_path / "release", official_dims)
    torch.save({"stand-in": True}, tmp_path / "release" / "identity_df.pt")
    monkeypatch.setattr(w2r, "_load_table", lambda path, notes: dict(TABLE))
    report = import_release(reg, tmp_path / "release", trust_pickle=True, progress=False)
    assert any("note" in w for w in report.warnings), "a text column is left out, with a warning"
    for i, (name, attrs) in enumerate(expected_rows()):
        m = reg.get(name)
        assert m.attributes == attrs, name
        assert np.array_equal(reg.vector(m), flatten(release_lora(rows[i], official_dims))), name
    got = {m.name for m in reg.ls("male AND NOT eyeglasses")}
    assert got == {n for n, a in expected_rows() if a["male"] and not a["eyeglasses"]} and got


@pytest.mark.skipif(not HAS_PANDAS, reason="pandas is not installed: identity_df.pt is a pickled pandas DataFrame")
def test_identity_df_with_pandas(tmp_path, reg, official_dims):
    import pandas as pd

    write_release(tmp_path / "release", official_dims)
    torch.save(pd.DataFrame(TABLE), tmp_path / "release" / "identity_df.pt")
    with pytest.warns(ReleaseWarning, match="runs whatever code"):
        report = import_release(reg, tmp_path / "release", trust_pickle=True, progress=False)
    assert len(report.added) == N
    for name, attrs in expected_rows():
        assert reg.get(name).attributes == attrs, name


def test_table_rows_must_match_the_weights():
    with pytest.raises(ReleaseFormatError, match="6 rows"):
        table_to_attributes({k: v[:6] for k, v in TABLE.items()}, N, "identity_df.pt", [])
    with pytest.raises(ReleaseFormatError, match="same folder"):
        table_to_attributes({**TABLE, "file": [1, 2, 3, 4, 5, 6, 1]}, N, "identity_df.pt", [])
    with pytest.raises(ReleaseFormatError, match="`file`"):
        table_to_attributes({"Male": TABLE["Male"]}, N, "identity_df.pt", [])
    folders, attrs = table_to_attributes({"file": [2.0, 1.0, 3.0, 4.0, 5.0, 6.0, 7.0]}, N, "x", [])
    assert folders == ["1", "2", "3", "4", "5", "6", "7"] and attrs.keys == []


def test_bad_name_prefix_is_refused(tmp_path, reg, official_dims):
    write_release(tmp_path / "release", official_dims)
    with pytest.raises(ReleaseError, match="prefix"):
        import_release(reg, tmp_path / "release", name_prefix="bad/", progress=False)


def test_cli_ingest_from_w2w_release(tmp_path, official_dims):
    from click.testing import CliRunner

    from cli.main import cli

    write_release(tmp_path / "rel", official_dims, n=3)
    (tmp_path / "rel" / "identity_df.pt").write_bytes(b"not read without --trust-pickle")
    res = CliRunner().invoke(
        cli, ["--registry", str(tmp_path / "r"), "ingest", "--from-w2w-release", str(tmp_path / "rel"), "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [a["name"] for a in data["added"]] == ["w2w-00000", "w2w-00001", "w2w-00002"]
    assert any("--trust-pickle" in w for w in data["warnings"])
    res = CliRunner().invoke(cli, ["--registry", str(tmp_path / "r"), "ingest", "--from-w2w-release", str(tmp_path)])
    assert res.exit_code != 0 and "all_weights.pt" in res.output


# --- the authors' fitted space (mean.pt, std.pt, V.pt) --------------------------------------------------------


def write_basis(folder: Path, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The authors' space of the release's rows, as they computed and saved it: z-scored columns, then the
    top-k right singular vectors as V (D, k). Returns (mean, std, V, singular values), in the release's order."""
    X = rows.astype(np.float64)
    mean, std = X.mean(0), X.std(0)
    _, S, Vt = np.linalg.svd((X - mean) / std, full_matrices=False)
    V = Vt[:k].T
    for name, a in (("mean.pt", mean), ("std.pt", std), ("V.pt", V)):
        torch.save(torch.from_numpy(a.astype(np.float32)), folder / name)
    return mean, std, V, S


def test_the_authors_space_is_registered_as_published(tmp_path, official_dims):
    """In a release whose keys are in another order than ours: the subspace projects each model to exactly the
    coefficients the authors' formula gives, c = ((w - mean) / std) @ V, computed here in their order."""
    from click.testing import CliRunner

    from cli.main import cli
    from registry import wspace

    keys = list(official_dims)
    dims = {keys[j]: official_dims[keys[j]] for j in np.random.default_rng(5).permutation(len(keys))}
    rows = write_release(tmp_path / "rel", dims, n=6, seed=2)
    mean, std, V, S = write_basis(tmp_path / "rel", rows, k=4)
    res = CliRunner().invoke(
        cli, ["--registry", str(tmp_path / "r"), "ingest", "--from-w2w-release", str(tmp_path / "rel"), "--json"]
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)["subspace"]
    assert info["k"] == 4 and info["n_models"] == 6

    reg = Registry.open(tmp_path / "r")
    sm = wspace.require(reg, info["space"])
    assert sm.id == info["subspace"]
    want = ((rows - mean) / std) @ V  # (6, 4), float64 in the release's order
    got = wspace.coefficients(reg, sm, [reg.get(f"w2w-{i:05d}").id for i in range(6)])
    # float32 storage of z (|z| <~ 2.5 for 6 rows), V and the product over D = 99,648 terms: the error of a
    # coefficient is ~ sqrt(D) u |z| ~ 5e-5 (random walk), and |c| ~ S_j / sqrt(6) ~ 100
    np.testing.assert_allclose(got, want, atol=1e-3)
    # the registry's view of the space: singular values and explained variance from the release's models, norms
    # of those float32 coefficients (relative error ~ sqrt(D) u = 2e-5, as above)
    np.testing.assert_allclose(sm.sub.singular_values, S[:4], rtol=1e-4)
    np.testing.assert_allclose(info["explained_variance_ratio"], (S[:4] ** 2).sum() / (S**2).sum(), rtol=1e-4)
    # and it is a space like a fitted one: sampling from it works (the Gaussians are the models')
    made = wspace.sample(reg, n=2, seed=0, prefix="paper")
    assert [m["name"] for m in made] == ["paper-s0-0", "paper-s0-1"]
    # `fit --from-w2w-release` registers it again, here with its first 2 components: the space's new current one
    res = CliRunner().invoke(
        cli,
        ["--registry", str(tmp_path / "r"), "fit", "--from-w2w-release", str(tmp_path / "rel"), "-k", "2", "--json"],
    )
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["k"] == 2 and wspace.current(Registry.open(tmp_path / "r"), info["space"]).id == again["subspace"]


def test_the_basis_is_read_in_any_stored_form(tmp_path, official_dims, monkeypatch):
    """V.pt as (k, D) rows or (D, K) columns, with k < K or not, in float16: the same components as the (D, k) float32
    file of the same values (whose reading the test above checks against the authors' formula)."""
    from ingest.w2w_release import read_basis

    keys = list(official_dims)
    dims = {keys[j]: official_dims[keys[j]] for j in np.random.default_rng(1).permutation(len(keys))}
    rows = write_release(tmp_path / "rel", dims, n=6)
    *_, V, _ = write_basis(tmp_path / "rel", rows, k=5)
    V16 = torch.from_numpy(V.astype(np.float32)).half()
    torch.save(V16[:, :3].float(), tmp_path / "rel" / "V.pt")
    _, _, want = read_basis(read_release(tmp_path / "rel"))
    monkeypatch.setattr(w2r, "BASIS_CHUNK_BYTES", 64 << 10)  # chunks of 1 stored row or ~6,500: across segments
    # (k, D); (D, K) read to k < K; (K, D) to k; (D, K) saved as a transposed view of (K, D); float64
    forms = [(V16[:, :3].T.contiguous(), None), (V16, 3), (V16.T.contiguous(), 3), (V16.T.contiguous().T, 3)]
    for stored, components in [*forms, (V16.double(), 3)]:
        torch.save(stored, tmp_path / "rel" / "V.pt")
        _, _, got = read_basis(read_release(tmp_path / "rel"), components)
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_release_files_are_not_kept_mapped_once_read(tmp_path, reg, official_dims, monkeypatch):
    """V.pt and all_weights.pt are read through memory maps; each chunk's pages are given back once copied, so
    the process never holds more than a chunk of either file (at the paper's sizes, 4 GB and 26 GB) and what the
    kernel maps ahead of a read (large folios: ~3 MB measured here), and rows read again after that come back from
    the file unchanged. Files of 25 MB and 19 MB: kept mapped, either would pass the bound."""
    from ingest.w2w_release import read_basis

    n, k = 48, 64
    rows = write_release(tmp_path / "rel", official_dims, n=n)  # 19 MB
    write_basis(tmp_path / "rel", rows[:8], k=4)  # mean.pt, std.pt
    D = rows.shape[1]
    V = torch.zeros(D, k)  # orthonormal: k coordinate axes; 25 MB
    V[torch.from_numpy(np.random.default_rng(0).choice(D, k, replace=False)), torch.arange(k)] = 1.0
    torch.save(V, tmp_path / "rel" / "V.pt")
    peaks = {"V.pt": 0, "all_weights.pt": 0}
    real = w2r.give_back

    def give_back(t, path):
        real(t, path)
        peaks[path.name] = max(peaks[path.name], mapped_kb(path))

    ahead_kb = 6 << 10
    monkeypatch.setattr(w2r, "give_back", give_back)
    monkeypatch.setattr(w2r, "BASIS_CHUNK_BYTES", 1 << 20)
    np.testing.assert_array_equal(read_basis(read_release(tmp_path / "rel"))[2].sum(axis=0), np.ones(k))
    assert 0 < peaks["V.pt"] <= 1024 + ahead_kb
    release = read_release(tmp_path / "rel")
    first = release.rows(0, 2)
    np.testing.assert_array_equal(release.rows(0, 2), first)  # read again after its pages were dropped
    import_release(reg, tmp_path / "rel", progress=False, chunk_rows=2)  # 0.8 MB a chunk
    assert 0 < peaks["all_weights.pt"] <= 800 + ahead_kb
    assert len(reg.ls()) == n


def test_a_basis_that_does_not_fit_is_refused(tmp_path, reg, official_dims):
    from ingest.w2w_release import import_basis
    from registry import wspace

    rows = write_release(tmp_path / "rel", official_dims, n=4)
    with pytest.raises(ReleaseError, match="ingest --from-w2w-release"):
        import_basis(reg, tmp_path / "rel")  # the models are not imported yet
    import_release(reg, tmp_path / "rel", progress=False)
    with pytest.raises(ReleaseFileMissingError, match="mean.pt"):
        import_basis(reg, tmp_path / "rel")
    write_basis(tmp_path / "rel", rows, k=3)
    torch.save(torch.ones(10), tmp_path / "rel" / "std.pt")
    with pytest.raises(ReleaseFormatError, match="std.pt: holds shape"):
        import_basis(reg, tmp_path / "rel")
    write_basis(tmp_path / "rel", rows, k=3)
    torch.save(torch.ones(99_648, 3), tmp_path / "rel" / "V.pt")  # not orthonormal: another file
    with pytest.raises(ReleaseFormatError, match="not orthonormal"):
        import_basis(reg, tmp_path / "rel")
    [space] = reg.spaces()
    assert wspace.current(reg, space.id) is None  # nothing registered by the refused attempts
    write_basis(tmp_path / "rel", rows, k=3)
    assert import_basis(reg, tmp_path / "rel", components=2)["k"] == 2


def test_the_basis_in_memory_is_freed_once_saved(tmp_path, reg, official_dims, monkeypatch):
    """V as read from V.pt (4 GB at k = 10,000) is no longer alive when the index transform runs (three k x k
    float64 arrays: 2.4 GB more), which reads the components from the subspace's own file instead."""
    import weakref

    from ingest.w2w_release import import_basis
    from registry import wspace

    rows = write_release(tmp_path / "rel", official_dims, n=6)
    write_basis(tmp_path / "rel", rows, k=3)
    import_release(reg, tmp_path / "rel", progress=False)
    read, transform, seen = w2r.read_basis, wspace.index_transform, {}

    def read_basis(*a, **kw):
        out = read(*a, **kw)
        seen["V"] = weakref.ref(out[2])
        return out

    def index_transform(sub):
        seen["alive"], seen["mapped"] = seen["V"]() is not None, not sub.components.flags.writeable
        return transform(sub)

    monkeypatch.setattr(w2r, "read_basis", read_basis)
    monkeypatch.setattr(wspace, "index_transform", index_transform)
    import_basis(reg, tmp_path / "rel")
    assert seen == {"V": seen["V"], "alive": False, "mapped": True}

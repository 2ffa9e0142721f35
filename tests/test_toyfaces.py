"""The embedded toy-faces world: renderer, captions, datasets, contact sheets, the attribute detector, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from ingest import toyfaces
from ingest.dataset import load_dataset
from ingest.detector import EvalConfig, TrainConfig, augment, blur, detect, detect_bool
from ingest.toyfaces import (
    ATTRIBUTES,
    PAD,
    VOCAB,
    caption,
    contact_sheet,
    make_dataset,
    random_faces,
    render,
    render_set,
)
from w2w.errors import DatasetError


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = make_dataset(tmp_path / "a", identities=3, images=2, seed=5)
    b = make_dataset(tmp_path / "b", identities=3, images=2, seed=5)
    assert files_of(a) == files_of(b) and len(files_of(a)) == 3 * 2 + 2  # images, attributes.csv, marker
    c = make_dataset(tmp_path / "c", identities=3, images=2, seed=6)
    assert files_of(c)["face-0000/00.png"] != files_of(a)["face-0000/00.png"]
    assert random_faces(10, seed=1)[:4] == random_faces(4, seed=1)  # a prefix does not depend on n


def test_render_shapes_and_jitter():
    face = random_faces(1, seed=2)[0]
    img = render(face, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render(face, 32))
    jittered = [render(face, 32, np.random.default_rng(i)) for i in range(3)]
    assert all(not np.array_equal(j, img) for j in jittered) and not np.array_equal(jittered[0], jittered[1])
    assert render(face, 48).shape == (48, 48, 3)
    assert (img[0, 0].astype(int) > 200).all(), "the background is light"


def test_identities_differ_more_than_their_jitter():
    n = 30
    plain = [f.with_attributes(**dict.fromkeys(ATTRIBUTES, False)) for f in random_faces(n, seed=3)]
    ims = blur(render_set(plain, 2, seed=0).astype(np.float32), np.ones(2 * n))  # blur: a shift costs less
    flat = ims.reshape(n, 2, -1)
    flat = flat - flat.mean(axis=2, keepdims=True)  # (n, 2, D), brightness removed
    d = np.linalg.norm(flat[:, 1][:, None] - flat[:, 0][None], axis=2)  # (n, n): image 1 of i vs image 0 of j
    within, between = np.diag(d).mean(), d[~np.eye(n, dtype=bool)].mean()
    assert between > 2 * within, (between, within)
    assert (d.argmin(axis=1) == np.arange(n)).mean() >= 0.6  # attributes all off: identity alone tells them apart


def test_attributes_are_balanced_and_independent():
    # numpy's Generator is bit-reproducible on every platform, so these are fixed numbers; as statistics: 1000 draws
    # of p ~ 0.45 have se 0.016 (bounds ~4 se), and a correlation's se is 1/sqrt(1000) = 0.03 (bound ~3 se)
    faces = random_faces(1000, seed=0)
    y = np.array([[f.has(a) for a in ATTRIBUTES] for f in faces], dtype=float)
    assert np.all((y.mean(0) > 0.38) & (y.mean(0) < 0.52)), y.mean(0)
    corr = np.corrcoef(y.T) - np.eye(len(ATTRIBUTES))
    assert np.abs(corr).max() < 0.1


def test_captions_use_the_vocabulary():
    face = random_faces(1)[0]
    assert caption(face.with_attributes(**dict.fromkeys(ATTRIBUTES, False))) == "a person"
    full = face.with_attributes(**dict.fromkeys(ATTRIBUTES, True))
    assert caption(full) == "a smiling person with glasses and a beard and a hat"
    for bits in range(16):
        on = {a: bool(bits >> i & 1) for i, a in enumerate(ATTRIBUTES)}
        words = caption(face.with_attributes(**on)).split()
        assert set(words) <= set(VOCAB)
        assert ("smiling" in words) == on["smile"] and ("hat" in words) == on["hat"]
    assert {"sks", "person", "a"} <= set(VOCAB) and len(set(VOCAB)) == len(VOCAB)


def test_to_row_columns():
    row = random_faces(1)[0].to_row()
    assert list(row)[: 1 + len(ATTRIBUTES)] == ["identity", *ATTRIBUTES]
    assert all(isinstance(row[a], bool) for a in ATTRIBUTES)
    numbers = [v for k, v in row.items() if k not in ("identity", *ATTRIBUTES)]
    assert numbers and all(isinstance(v, float) and 0 < v < 1 for v in numbers)


def test_make_dataset_never_mixes(tmp_path):
    root = make_dataset(tmp_path / "d", identities=2, images=1)
    before = files_of(root)
    assert make_dataset(root, identities=2, images=1) == root and files_of(root) == before  # same settings: no-op
    with pytest.raises(DatasetError, match="other settings"):
        make_dataset(root, identities=3, images=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        make_dataset(other)
    assert files_of(other) == {"notes.txt": b"mine"}


def test_contact_sheet_size_and_tiles(tmp_path):
    ims = render_set(random_faces(2, seed=4), 3)
    rows = [("first", list(ims[:3])), ("second row", list(ims[3:5]))]
    path = contact_sheet(rows, tmp_path / "sheet.png", scale=3)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    cell = 32 * 3
    assert sheet.shape[0] == PAD + 2 * (cell + PAD)
    label_w = sheet.shape[1] - PAD - 3 * (cell + PAD)
    assert label_w > 2 * PAD
    x0, y0 = label_w + PAD + 1 * (cell + PAD), PAD + 1 * (cell + PAD)  # row 2, column 2
    tile = sheet[y0 : y0 + cell, x0 : x0 + cell]
    assert np.array_equal(tile, ims[4].repeat(3, axis=0).repeat(3, axis=1))


# --- the detector ------------------------------------------------------------------------------------


def labels(faces) -> np.ndarray:
    return np.array([[f.has(a) for a in ATTRIBUTES] for f in faces])


def test_detector_agrees_with_ground_truth_on_augmented_images():
    seed = 4242
    assert seed not in (TrainConfig().seed, EvalConfig().seed)
    faces = random_faces(120, seed=seed)
    images = render_set(faces, 2, seed=seed)
    y = labels(faces).repeat(2, axis=0)
    for name, ims in {
        "clean": images,
        "blur+noise": augment(images, np.random.default_rng(0), colour=False, shift=False),
        "all": augment(images, np.random.default_rng(1)),
    }.items():
        found = detect_bool(ims)
        for i, a in enumerate(ATTRIBUTES):
            acc = (found[a] == y[:, i]).mean()
            assert acc >= 0.95, f"{a} on {name} images: accuracy {acc:.3f}"


def test_detector_sees_toggled_attributes_at_any_size():
    faces = random_faces(16, seed=77)
    for a in ATTRIBUTES:
        on = np.stack([render(f.with_attributes(**{a: True}), 64) for f in faces])  # 64 px: resized to 32
        off = np.stack([render(f.with_attributes(**{a: False}), 64) for f in faces])
        assert detect(on)[a].mean() > 0.9 and detect(off)[a].mean() < 0.1, a
    scores = detect(render(faces[0], 32).astype(np.float32) / 255)  # one float image in [0, 1]
    assert set(scores) == set(ATTRIBUTES) and all(s.shape == (1,) and 0 <= s[0] <= 1 for s in scores.values())


def test_shipped_detector_says_how_it_was_made():
    from safetensors import safe_open

    from ingest.detector import WEIGHTS

    assert WEIGHTS.stat().st_size < 500_000
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["attributes"]) == list(ATTRIBUTES)
    accuracy = json.loads(meta["accuracy"])
    assert min(accuracy["blur+noise"].values()) >= 0.95


# --- the CLI -----------------------------------------------------------------------------------------


def invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code} != {code}\n{result.output}"
    return result


def test_cli_make_then_load_dataset(tmp_path):
    root = tmp_path / "faces"
    out = json.loads(invoke("toyfaces", "make", str(root), "--identities", "4", "--images", "3", "--json").stdout)
    assert out["identities"] == 4
    data = load_dataset(root)
    faces = random_faces(4)
    assert [d.name for d in data] == [f.name for f in faces]
    for d, f in zip(data, faces, strict=True):
        assert len(d.images) == 3 and len(d.digest) == 64
        row = f.to_row()
        assert {a: d.attributes[a] for a in ATTRIBUTES} == {a: row[a] for a in ATTRIBUTES}
        assert d.attributes["skin_tone"] == pytest.approx(row["skin_tone"])  # 3 decimals, read back
    assert "identities" in invoke("toyfaces", "make", str(root), "--identities", "4", "--images", "3").stdout
    err = invoke("toyfaces", "make", str(root), "--identities", "5", code=1).stderr
    assert err.startswith("error: ") and "other settings" in err and err.count("\n") == 1

    sheet = tmp_path / "sheet.png"
    invoke("toyfaces", "sheet", str(root), "-o", str(sheet), "--identities", "2", "--images", "3", "--scale", "2")
    assert Image.open(sheet).size[1] == PAD + 2 * (64 + PAD)

    scores = json.loads(invoke("toyfaces", "detect", str(root / "face-0001"), "--json").stdout)
    assert len(scores) == 3 and all(set(ATTRIBUTES) <= set(s) for s in scores)
    assert "present" in invoke("toyfaces", "detect", str(root / "face-0001" / "00.png")).stdout


def test_cli_subcommands_have_examples():
    for sub in ("make", "sheet", "detect"):
        assert "w2wreg toyfaces " in invoke("toyfaces", sub, "--help").stdout


def test_module_api():
    """The names other parts of the tool build on."""
    for name in ("ATTRIBUTES", "Face", "random_faces", "render", "caption", "VOCAB", "make_dataset", "contact_sheet"):
        assert hasattr(toyfaces, name), name
    assert ATTRIBUTES[:4] == ("glasses", "beard", "smile", "hat")

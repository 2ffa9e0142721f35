"""Training datasets: loading, digests, and one clear error for each way a dataset can be wrong."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from ingest.dataset import load_dataset, load_images
from ingest.toyfaces import make_dataset
from w2w.errors import DatasetError


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "faces", identities=3, images=2)


@pytest.fixture
def ds(made, tmp_path):
    """A fresh copy of a 3-identity toy dataset to break."""
    return shutil.copytree(made, tmp_path / "faces")


def error(root, **kw) -> str:
    with pytest.raises(DatasetError) as e:
        load_dataset(root, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "; " in msg, f"not one line with a next step: {msg!r}"
    return msg


def test_loads_sorted_with_attributes_and_digests(ds):
    data = load_dataset(ds)
    assert [d.name for d in data] == ["face-0000", "face-0001", "face-0002"]
    assert all(len(d.images) == 2 and d.images == sorted(d.images) for d in data)
    assert all(isinstance(d.attributes["glasses"], bool) for d in data)
    assert all(isinstance(d.attributes["skin_tone"], float) for d in data)
    assert len({d.digest for d in data}) == 3
    again = load_dataset(ds)
    assert [d.digest for d in again] == [d.digest for d in data]  # unchanged images, same digest
    img = ds / "face-0001" / "01.png"
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)
    changed = load_dataset(ds)
    assert [d.digest == e.digest for d, e in zip(changed, data, strict=True)] == [True, False, True]


def test_other_formats_and_stray_files(ds):
    Image.open(ds / "face-0000" / "00.png").convert("RGB").save(ds / "face-0000" / "02.JPG")
    Image.open(ds / "face-0000" / "00.png").save(ds / "face-0000" / "03.webp")
    (ds / "face-0000" / "notes.txt").write_text("ignored")
    (ds / ".cache").mkdir()  # hidden folders are not identities
    assert len(load_dataset(ds)[0].images) == 4


def test_missing_or_empty_dataset(tmp_path):
    assert "no such dataset folder" in error(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    assert "is a file" in error(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "attributes.csv").write_text("identity,glasses\n")
    assert "no identity folders" in error(tmp_path / "empty")


def test_empty_identity_folder(ds):
    (ds / "face-0003").mkdir()
    (ds / "face-0003" / "readme.txt").write_text("no images here")
    assert "face-0003: has no images" in error(ds)


def test_truncated_png(ds):
    bad = ds / "face-0001" / "00.png"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    assert f"{bad}: is not a readable image" in error(ds)


def test_corrupt_jpeg_and_garbage(ds):
    bad = ds / "face-0002" / "02.jpg"
    Image.open(ds / "face-0002" / "00.png").convert("RGB").save(bad)
    data = bad.read_bytes()
    bad.write_bytes(data[:200] + b"\x00" * 10)  # header intact, scan data cut short
    assert f"{bad}: is not a readable image" in error(ds)
    bad.write_bytes(b"not an image at all")
    assert f"{bad}: is not a readable image" in error(ds)


def test_identity_missing_from_csv(ds):
    csv = ds / "attributes.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # drop face-0001
    assert "has no row for identity 'face-0001'" in error(ds)


def test_csv_row_without_folder(ds):
    shutil.rmtree(ds / "face-0002")
    assert "has a row for 'face-0002' but no such folder" in error(ds)


def test_duplicate_identity_row(ds):
    csv = ds / "attributes.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines, lines[1]]) + "\n")
    assert "line 5: identity 'face-0000' appears twice" in error(ds)


def test_bad_identity_name(ds):
    (ds / "face-0000").rename(ds / "-bad@name")
    assert "-bad@name" in error(ds) and "not a valid model name" in error(ds)


def test_missing_csv(ds):
    (ds / "attributes.csv").unlink()
    assert "attributes.csv: is missing" in error(ds)
    data = load_dataset(ds, require_csv=False)
    assert len(data) == 3 and all(d.attributes == {} for d in data)


def test_bad_csv_contents(ds):
    csv = ds / "attributes.csv"
    text = csv.read_text()
    csv.write_text(text.replace("identity,", "person,", 1))
    assert "first column is 'identity'" in error(ds)
    csv.write_text(text.replace(",glasses,", ",id,", 1))  # a column name the registry reserves
    assert "'id' is not allowed" in error(ds)
    lines = text.splitlines()
    csv.write_text("\n".join([lines[0], lines[1].replace("true", "maybe").replace("false", "maybe"), *lines[2:]]))
    assert "'maybe' is not a number or a boolean" in error(ds)
    csv.write_text("identity\nface-0000\nface-0001\nface-0002\n")  # identities only: fine
    assert all(d.attributes == {} for d in load_dataset(ds))


def test_load_images_crops_and_resizes(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 200  # the centre square is all 200, the sides 0
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide[..., 0]).save(tmp_path / "grey.png")  # greyscale becomes RGB
    out = load_images([tmp_path / "wide.png", tmp_path / "grey.png"], 8)
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    assert np.abs(out[0].astype(int) - 200).max() <= 2 and out[1, ..., 0].min() >= 198
    assert load_images([], 16).shape == (0, 16, 16, 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="bad.png: is not a readable image"):
        load_images([tmp_path / "bad.png"], 8)


def test_cli_reports_dataset_errors_in_one_line(ds, tmp_path):
    (ds / "face-0001" / "00.png").write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["toyfaces", "sheet", str(ds), "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "00.png: is not a readable image" in result.stderr
    assert result.stderr.count("\n") == 1

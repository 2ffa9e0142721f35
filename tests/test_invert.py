"""`w2wreg invert` on a tiny base model: the result lies in the subspace, is registered with lineage; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from ingest.fanout import run_ingest
from ingest.trainer import get_recipe
from registry import wspace
from registry.registry import Registry


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_base, faces):
    root = tmp_path_factory.mktemp("inv") / "reg"
    reg = Registry.init(root)
    run_ingest(reg, faces, get_recipe("toy", steps=4), base_model=str(tiny_base), batch_identities=5, progress=False)
    run("--registry", root, "fit", "-k", 4)
    return root


def image_of(faces, name="face-0002"):
    return sorted((faces / name).glob("*.png"))[0]


def test_an_inverted_model_lies_in_the_subspace_and_is_registered(fitted, faces, tmp_path):
    img = image_of(faces)
    out = json.loads(
        run(
            "--registry",
            fitted,
            "invert",
            img,
            "--steps",
            6,
            "--lr",
            0.05,
            "--batch-timesteps",
            2,
            "--name",
            "me",
            "--json",
        ).stdout
    )
    assert out["name"] == "me" and out["components"] == 4 and out["start"] == "mean"
    reg = Registry.open(fitted)
    m = reg.get("me")
    assert m.kind == "inverted"
    (lin,) = reg.catalog.lineage(m.id)
    import hashlib

    assert lin["operation"] == "invert"
    assert lin["params"]["image_sha256"] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert lin["params"]["batch_timesteps"] == 2 and lin["params"]["steps"] == 6
    sm = wspace.current(reg, m.space_id)
    w = reg.vector(m).astype(np.float64)
    V = sm.sub.components.astype(np.float64)
    c = V.T @ ((w - sm.sub.mean) / sm.sub.std)
    back = sm.sub.mean + sm.sub.std * (V @ c)
    # in the span of the subspace: the stored float32 vector is its own reconstruction (raw space: a z-score
    # would blow up float32 rounding in near-constant columns). w = mean + std * (V @ c) in float32 (u = 2^-24):
    # V @ c (k = 4 terms), the product and the sum round, so w is within (k + 2) u ||w|| = 3.6e-7 ||w|| of a vector
    # in the span, and back keeps only that error's part outside it (1.1 u ||w|| measured; the raw-space projection
    # is oblique, so allow a few times more): 1e-6 = 17 u
    assert np.linalg.norm(w - back) <= 1e-6 * np.linalg.norm(w)
    assert np.abs(c).max() > 1e-3  # and it moved away from the mean (6 Adam steps of lr 0.05; rounding is ~1e-7)
    # it is a model like any other
    run("--registry", fitted, "search", "--like", "me", "-k", 2)
    run("--registry", fitted, "export", "me", "--format", "diffusers", "-o", tmp_path / "me")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nearest_init_and_a_mask(fitted, faces, tmp_path, dtype):
    """bf16: the shortlist's fixed draws and the loop's noise must reach the UNet in its own dtype."""
    from PIL import Image

    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8)).save(mask)
    out = json.loads(
        run(
            "--registry",
            fitted,
            "invert",
            image_of(faces, "face-0004"),
            "--steps",
            3,
            "--init",
            "nearest",
            "--mask",
            mask,
            "-k",
            3,
            "--dtype",
            dtype,
            "--name",
            f"masked-{dtype}",
            "--json",
        ).stdout
    )
    # started from a registered model, not the mean. Which one is a ranking by denoising loss, and the module's
    # registry also holds earlier inversions (masked-fp32 inverts this very image): in bf16 (u = 2^-8) rounding
    # decides between such near-equals (ATEN_CPU_CAPABILITY=avx2 picks masked-fp32), so any of them is right
    registered = {m.name for m in Registry.open(fitted).ls()} - {f"masked-{dtype}"}
    assert out["start"] in registered and out["components"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["-k", 99], "outside 1..4"),
        (["--mask", "BLACK"], "black everywhere"),
        (["--mask", "BROKEN"], "not a readable mask"),
        (["IMAGE_BROKEN"], "not a readable image"),
    ],
)
def test_bad_input_is_refused_and_registers_nothing(fitted, faces, tmp_path, args, message):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    subs = {"BLACK": tmp_path / "black.png", "BROKEN": tmp_path / "broken.png"}
    img = tmp_path / "broken.png" if args == ["IMAGE_BROKEN"] else image_of(faces)
    args = [] if args == ["IMAGE_BROKEN"] else [subs.get(a, a) for a in args]
    before = len(Registry.open(fitted).ls())
    res = run("--registry", fitted, "invert", img, "--steps", 2, *args, ok=False)
    assert res.exit_code != 0 and message in res.output, res.output
    assert len(Registry.open(fitted).ls()) == before


def test_invert_needs_a_fitted_space(tmp_path, tiny_base, faces):
    reg = Registry.init(tmp_path / "reg")
    run_ingest(reg, faces, get_recipe("toy", steps=1), base_model=str(tiny_base), batch_identities=5, progress=False)
    res = run("--registry", tmp_path / "reg", "invert", image_of(faces), ok=False)
    assert res.exit_code != 0 and "w2wreg fit" in res.output

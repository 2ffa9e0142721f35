"""`w2wreg render` and `w2wreg edit --preview`: real pipelines (the embedded toy base, an SD-shaped and an
SDXL-shaped pipeline built in code and saved as folders), real registries, real PNG files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import W2W_TARGETS, random_lora
from PIL import Image

from cli.main import cli
from ingest import render, toyfaces
from ingest.basemodel import TOY_BASE_DIR, TOY_BASE_ID, TOY_UNET_CONFIG, load_base
from ingest.generate import generate
from registry.registry import NewModel, Registry
from w2w.presets import unet_layout

needs_toy = pytest.mark.skipif(
    not (TOY_BASE_DIR / "model_index.json").exists(), reason="the embedded base model is not built"
)
FAST = ["--steps", "4"]  # denoising steps: enough for distinct pictures, fast on 2 cores


def run(*args, ok: bool = True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def add_random(root, layout, names, base_model, scale, attrs=None) -> Registry:
    reg = Registry.open(root) if (root / "catalog.duckdb").exists() else Registry.init(root)
    reg.add_models(
        NewModel.from_lora(
            n, random_lora(layout, seed=i, scale=scale), base_model=base_model, attributes=(attrs or {}).get(n, {})
        )
        for i, n in enumerate(names)
    )
    return reg


# --- the embedded toy base -------------------------------------------------------------------------------

TOY_LAYOUT = unet_layout(TOY_UNET_CONFIG, W2W_TARGETS, rank=1, alpha=1.0)  # the toy recipe's
TOY_NAMES = [f"toy-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def toy_reg(tmp_path_factory):
    """8 imported toy LoRAs (random, large enough to change the face), half with glasses; fitted, with a direction."""
    root = tmp_path_factory.mktemp("render-toy") / "reg"
    attrs = {n: {"glasses": i % 2 == 0} for i, n in enumerate(TOY_NAMES)}
    add_random(root, TOY_LAYOUT, TOY_NAMES, TOY_BASE_ID, scale=0.25, attrs=attrs)
    run("--registry", root, "fit", "-k", 4)
    run("--registry", root, "direction", "fit", "glasses")
    return root


@needs_toy
def test_render_models_of_every_kind_on_the_toy_base(toy_reg, tmp_path):
    r = ("--registry", toy_reg)
    run(*r, "edit", "toy-1", "--direction", "glasses=2", "--name", "edited")
    run(*r, "mix", "lerp('toy-2', 'toy-3', 0.5)", "--name", "mixed")
    run(*r, "sample", "-n", 1, "--seed", 0, "--name", "drawn")
    face = tmp_path / "face.png"
    Image.fromarray(toyfaces.render(toyfaces.random_faces(1, seed=7)[0], 32)).save(face)
    run(*r, "invert", face, "--steps", 2, "--name", "inverted")
    models = ["toy-0", "edited", "mixed", "drawn-s0-0", "inverted"]
    out = tmp_path / "grid.png"
    info = json.loads(run(*r, "render", *models, "--seeds", "0,5", *FAST, "-o", out, "--json").stdout)
    assert [m["name"] for m in info["models"]] == models
    assert [m["kind"] for m in info["models"]] == ["imported", "edit", "mix", "sample", "inverted"]
    assert info["image_size"] == [32, 32] and info["seeds"] == [0, 5]

    # the grid is exactly the images of each model on the toy base, one row per model, one column per seed
    reg = Registry.open(toy_reg)
    base = load_base(None)
    settings = render.Settings(seeds=(0, 5), steps=4)
    ims = [render.images(base, reg.lora(m), settings) for m in models]
    expected = render.write_grid(
        [(f"{m} ({k})", list(im)) for m, k, im in zip(models, [x["kind"] for x in info["models"]], ims, strict=True)],
        tmp_path / "expected.png",
        ["seed 0", "seed 5"],
    )
    assert np.array_equal(png(out), png(expected))
    sheet = png(out)
    assert sheet.shape[0] > 5 * 4 * 32 and sheet.shape[1] > 2 * 4 * 32  # 32 px tiles upscaled x4, plus labels
    # rows differ where models differ, columns where seeds differ
    for i in range(len(models)):
        for j in range(i):
            assert np.abs(ims[i].astype(int) - ims[j].astype(int)).mean() > 0.1, (models[i], models[j])
        assert not np.array_equal(ims[i][0], ims[i][1])


@needs_toy
def test_a_seed_renders_what_generate_draws(toy_reg):
    """render's per-seed generators give the demo's pictures: generate(n=1, seed=s) is the same image, and a
    seed draws the same noise in any batch (only the batched arithmetic's rounding differs)."""
    reg = Registry.open(toy_reg)
    base, lora = load_base(None), reg.lora("toy-0")
    alone = render.images(base, lora, render.Settings(seeds=(2,), steps=4))[0]
    assert np.array_equal(alone, generate(base, lora, n=1, seed=2, steps=4)[0])
    batched = render.images(base, lora, render.Settings(seeds=(3, 2), steps=4))
    assert np.abs(batched[1].astype(int) - alone.astype(int)).max() <= 2  # levels of 255
    assert np.abs(batched[0].astype(int) - alone.astype(int)).mean() > 1  # another seed: another picture


@needs_toy
def test_edit_preview_strip(toy_reg, tmp_path):
    r = ("--registry", toy_reg)
    strip = tmp_path / "strip.png"
    out = json.loads(
        run(*r, "edit", "toy-3", "--direction", "glasses=2", "--name", "t3g", "--preview", strip,
            "--preview-strengths", "0,1", "--preview-seed", 4, "--preview-steps", 4, "--json").stdout
    )  # fmt: skip
    assert out["preview"] == str(strip) and out["name"] == "t3g"
    # column 0 is the model as it was, column 1 the edit that was saved, from the same noise
    reg = Registry.open(toy_reg)
    base, settings = load_base(None), render.Settings(seeds=(4,), steps=4)
    before, after = (render.images(base, reg.lora(m), settings)[0] for m in ("toy-3", "t3g"))
    labels = render.strength_labels({"glasses": 2.0}, [0, 1])
    assert labels == ["original", "glasses +2 (saved)"]
    expected = render.write_grid([("toy-3 seed 4", [before, after])], tmp_path / "expected.png", labels)
    assert np.array_equal(png(strip), png(expected))
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 1

    wide = tmp_path / "wide.png"
    run(
        *r, "edit", "toy-5", "--direction", "glasses=1", "--preview", wide, "--preview-steps", 4
    )  # default strengths -2,-1,0,1,2
    assert png(wide).shape[1] > png(strip).shape[1] + 3 * 4 * 32 and png(wide).shape[0] == png(strip).shape[0]
    assert Registry.open(toy_reg).get("toy-5.glasses+1").kind == "edit"


@needs_toy
def test_a_preview_that_cannot_be_made_registers_nothing(toy_reg, tmp_path):
    res = run(
        "--registry", toy_reg, "edit", "toy-6", "--direction", "glasses=1", "--name", "never",
        "--preview", tmp_path / "p.png", "--base-model", "nobody/nothing", ok=False,
    )  # fmt: skip
    assert res.exit_code == 1 and "offline" in res.output
    assert "never" not in {m.name for m in Registry.open(toy_reg).ls()}
    assert not (tmp_path / "p.png").exists()


# --- an SD-shaped pipeline built in code, loaded from its folder ----------------------------------------


@pytest.fixture(scope="module")
def sd_reg(tmp_path_factory, tiny_base, tiny_layout):
    """Three LoRAs of the tiny SD pipeline's layout: two recording no base model, one recording the folder."""
    root = tmp_path_factory.mktemp("render-sd") / "reg"
    reg = add_random(root, tiny_layout, ["sd-a", "sd-b"], None, scale=0.5)
    reg.add_models([NewModel.from_lora("sd-c", random_lora(tiny_layout, 9, 0.5), base_model=str(tiny_base))])
    return root


def test_render_on_an_sd_pipeline_folder(sd_reg, tiny_base, tmp_path):
    out = tmp_path / "sd.png"
    info = json.loads(
        run("--registry", sd_reg, "render", "sd-a", "sd-b", "--base-model", tiny_base, "--prompt", "abc",
            "--seeds", "1,2,3", *FAST, "-o", out, "--json").stdout
    )  # fmt: skip
    assert info["image_size"] == [8, 8] and Image.open(out).size[0] > 3 * 8 * 16  # 8 px tiles upscaled x16
    base = load_base(str(tiny_base))
    assert type(base.pipe).__name__ == "StableDiffusionPipeline"
    reg = Registry.open(sd_reg)
    settings = render.Settings(prompt="abc", seeds=(1, 2, 3), steps=4)
    a, b = (render.images(base, reg.lora(m), settings) for m in ("sd-a", "sd-b"))
    plain = render.images(base, None, settings)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1 and np.abs(a.astype(int) - plain.astype(int)).mean() > 1
    expected = render.write_grid(
        [("sd-a (imported)", list(a)), ("sd-b (imported)", list(b))], tmp_path / "e.png", ["seed 1", "seed 2", "seed 3"]
    )
    assert np.array_equal(png(out), png(expected))
    # a model that records its base folder needs no --base-model
    run("--registry", sd_reg, "render", "sd-c", *FAST, "-o", tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[1] < Image.open(out).size[1]  # one row, not two


def test_render_errors_are_one_line(sd_reg, tiny_base, tmp_path, toy_reg):
    r = ("--registry", sd_reg, "render")
    o = ("-o", tmp_path / "x.png")
    cases = [
        ((*r, "nobody", *o), "no model named or numbered 'nobody'"),
        ((*r, "sd-a", *o), "records no base model; pass --base-model"),
        ((*r, "sd-a", "--base-model", "someorg/not-cached", *o), "--base-model PATH"),
        ((*r, "sd-a", "--base-model", "toy", *o), "does not fit base model"),
        (("--registry", toy_reg, "render", "toy-0", "--base-model", tiny_base, *o), "does not fit base model"),
        ((*r, "sd-a", "--base-model", tmp_path, *o), "not a diffusers model folder"),
    ]
    for args, message in cases:
        res = run(*args, ok=False)
        assert res.exit_code == 1, res.output
        (line,) = res.output.strip().splitlines()
        assert line.startswith("error: ") and message in line, line
    assert "offline" in run(*r, "sd-a", "--base-model", "someorg/not-cached", *o, ok=False).output
    res = run(*r, "sd-a", "--seeds", "1,x", *o, ok=False)
    assert res.exit_code == 2 and "--seeds" in res.output
    assert not (tmp_path / "x.png").exists()


# --- an SDXL-shaped pipeline ---------------------------------------------------------------------------

SDXL_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 24,  # the two text encoders' hidden states side by side (12 + 12)
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 6 * 4 + 12,  # 6 time ids x 4 + the pooled text embedding
}


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    """A StableDiffusionXLPipeline at toy scale (two CLIP text encoders, text-time embeddings), as a folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from helpers import TINY_VAE_CONFIG, tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    text = {
        "vocab_size": len(tok.get_vocab()),
        "hidden_size": 12,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "projection_dim": 12,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=tok,
        tokenizer_2=tiny_tokenizer(),
        unet=UNet2DConditionModel(**SDXL_UNET_CONFIG),
        scheduler=EulerDiscreteScheduler(num_train_timesteps=100, steps_offset=1),
    )
    out = tmp_path_factory.mktemp("tiny-sdxl")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_render_on_an_sdxl_pipeline_folder(sdxl_base, tmp_path):
    layout = unet_layout(SDXL_UNET_CONFIG, W2W_TARGETS, rank=1, alpha=1.0)
    add_random(tmp_path / "reg", layout, ["xl-a", "xl-b"], str(sdxl_base), scale=0.5)
    out = tmp_path / "xl.png"
    info = json.loads(run("--registry", tmp_path / "reg", "render", "xl-a", "xl-b", *FAST, "-o", out, "--json").stdout)
    assert info["image_size"] == [8, 8]
    base = load_base(str(sdxl_base))
    assert type(base.pipe).__name__ == "StableDiffusionXLPipeline"
    reg = Registry.open(tmp_path / "reg")
    a, b = (render.images(base, reg.lora(m), render.Settings(steps=4)) for m in ("xl-a", "xl-b"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1
    assert png(out).shape[0] > 2 * 8 * 16

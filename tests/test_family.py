"""Base-model families: from metadata, from shapes, in the catalog (`show`, `--where family = ...`), and
spaces keyed by (family, layout) so PEFT folders naming a base model and bare files share one space."""

from __future__ import annotations

import pytest
from helpers import w2wreg as run
from helpers import w2wreg_json as as_json
from safetensors.numpy import load_file, save_file
from sd_shapes import MID_ONLY, SD2_CROSS, SD2_PROJ, SD15, SDXL_BLOCKS, SDXL_CROSS, lora_on

from w2w import family
from w2w.formats import write_lora


@pytest.mark.parametrize(
    ("meta", "base", "expected"),
    [
        ({"ss_base_model_version": "sd_v1"}, None, "sd15"),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, None, "sdxl"),
        ({"ss_base_model_version": "sd_v2_768_v"}, None, "sd2"),
        ({"ss_v2": "True", "ss_sd_model_name": "model.ckpt"}, None, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, None, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, None, "sd15"),
        ({}, "runwayml/stable-diffusion-v1-5", "sd15"),
        ({}, "stabilityai/stable-diffusion-2-1", "sd2"),
        ({}, "stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
        ({}, "w2wreg/toy-faces-base", "toy"),
        ({"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}, None, "sd15"),
        ({}, None, None),
        ({"ss_base_model_version": "something"}, "org/name", None),
    ],
)
def test_family_from_metadata(meta, base, expected):
    assert family.from_metadata(meta, base) == expected


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        (SD15, "sd15"),
        (SD2_CROSS, "sd2"),
        (SD2_PROJ, "sd2"),
        (SDXL_CROSS, "sdxl"),
        (SDXL_BLOCKS, "sdxl"),
        (MID_ONLY, None),
    ],
)
def test_family_from_shapes(modules, expected):
    assert family.from_shapes(lora_on(modules, 2, 2.0, 0).layout()) == expected


def test_shapes_win_over_contradicting_metadata():
    layout = lora_on(SDXL_CROSS, 2, 2.0, 0).layout()
    assert family.detect(layout, "runwayml/stable-diffusion-v1-5", {"ss_base_model_version": "sd_v1"}) == "sdxl"
    assert family.detect(lora_on(MID_ONLY, 2, 2.0, 0).layout(), None, {}) == "unknown"


def test_toy_family_from_shapes(tiny_layout):
    from ingest.basemodel import TOY_UNET_CONFIG
    from w2w.presets import get_preset, unet_layout

    p = get_preset("w2w")
    assert family.from_shapes(unet_layout(TOY_UNET_CONFIG, p.targets, p.rank, p.alpha)) == "toy"
    assert family.TOY_BASE_ID == __import__("ingest.basemodel").basemodel.TOY_BASE_ID


def test_families_in_catalog_and_one_space_across_formats(tmp_path):
    """PEFT (names its base model), diffusers and kohya (name none) of one layout land in one space; the family
    of a file whose shapes say nothing comes from its kohya metadata; show and --where see families."""
    reg, files = tmp_path / "reg", tmp_path / "files"
    files.mkdir()
    run(reg, "init")
    a = lora_on(SD15, 2, 4.0, 1, base_model="runwayml/stable-diffusion-v1-5")
    write_lora(a, files / "a_peft", "peft")
    write_lora(lora_on(SD15, 2, 4.0, 2), files / "b.safetensors", "diffusers")
    write_lora(lora_on(SD15, 2, 4.0, 3), files / "c.safetensors", "kohya")
    # a kohya file of a module every family has, saying in its metadata that it is SDXL
    write_lora(lora_on(MID_ONLY, 2, 4.0, 4), files / "x.safetensors", "kohya")
    tensors = load_file(files / "x.safetensors")
    save_file(tensors, files / "x.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    write_lora(lora_on(MID_ONLY, 2, 4.0, 5), files / "y.safetensors", "kohya")  # nothing says what it is
    out = as_json(reg, "add", str(files))
    assert len(out["added"]) == 5
    models = {m["name"]: m for m in as_json(reg, "ls")}
    assert {n: m["family"] for n, m in models.items()} == {
        "a_peft": "sd15",
        "b": "sd15",
        "c": "sd15",
        "x": "sdxl",
        "y": "unknown",
    }
    assert models["a_peft"]["base_model"] == "runwayml/stable-diffusion-v1-5" and models["b"]["base_model"] is None
    assert len({models[n]["space_id"] for n in ("a_peft", "b", "c")}) == 1
    shown = as_json(reg, "show", "x")
    assert shown["family"] == "sdxl" and shown["space"]["family"] == "sdxl"
    assert "family      sdxl" in run(reg, "show", "x").output
    assert [m["name"] for m in as_json(reg, "ls", "--where", "family = 'sd15'")] == ["a_peft", "b", "c"]
    # l2 search from the PEFT folder sees the bare files (one space)
    hits = as_json(reg, "search", "--like", str(files / "a_peft"), "-k", "5")["results"]
    assert hits[0]["name"] == "a_peft" and hits[0]["distance"] == 0.0  # the folder is the model a_peft
    assert {h["name"] for h in hits[1:]} == {"b", "c"}


def test_registry_made_before_families_is_migrated(tmp_path):
    """An old catalog (no family columns, space ids from the base-model string) opens, gains families and
    dW rows, and new models of its layout and family join its old space."""
    import duckdb

    reg, files = tmp_path / "reg", tmp_path / "files"
    files.mkdir()
    run(reg, "init")
    a = lora_on(SD15, 2, 4.0, 1, base_model="runwayml/stable-diffusion-v1-5")
    write_lora(a, files / "a_peft", "peft")
    as_json(reg, "add", str(files / "a_peft"))
    con = duckdb.connect(str(reg / "catalog.duckdb"))
    con.execute("UPDATE spaces SET id = 'oldspace000', family = NULL")
    con.execute("UPDATE models SET space_id = 'oldspace000', family = NULL")
    con.execute("ALTER TABLE spaces DROP COLUMN family")
    con.execute("ALTER TABLE models DROP COLUMN family")
    con.execute("DROP TABLE deltas")
    con.close()
    (reg / "vectors").joinpath(next(p.name for p in (reg / "vectors").iterdir())).rename(
        reg / "vectors" / "oldspace000"
    )
    write_lora(lora_on(SD15, 2, 4.0, 2), files / "b.safetensors", "diffusers")
    as_json(reg, "add", str(files / "b.safetensors"))
    models = {m["name"]: m for m in as_json(reg, "ls")}
    assert models["a_peft"]["family"] == models["b"]["family"] == "sd15"
    assert models["a_peft"]["space_id"] == models["b"]["space_id"] == "oldspace000"
    hits = as_json(reg, "search", "--like", "b", "--metric", "delta")["results"]
    assert [h["name"] for h in hits] == ["a_peft"]
    assert run(reg, "verify").exit_code == 0

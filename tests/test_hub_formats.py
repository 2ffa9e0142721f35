"""What a hub holds for SD 1.5 and SDXL, read into one canonical LoRA and written back so diffusers loads it.

Files are built with the key names of the real tools (kohya sd-scripts in both UNet namings, LyCORIS LoCon/LoHa/
LoKr, diffusers, PEFT, text-encoder parts) over tiny pipelines whose module structure is the real one
(tests/hubfiles.py). Each check compares per-module updates with the file's own, computed from its raw tensors.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import w2wreg
from hubfiles import (
    SD15_LIKE,
    kohya_file,
    loha_tensors,
    lokr_tensors,
    lora_targets,
    pipeline_deltas,
    sd15_pipeline,
    sdxl_pipeline,
    to_sgm,
)
from safetensors import safe_open
from safetensors.torch import save_file

from w2w.errors import UnknownFormatError
from w2w.formats import names, read_lora, write_lora

U32 = 2.0**-24  # float32 unit roundoff
# Our reading: plain factors are copies; LoHa/LoKr/Tucker factors are float32 products of <= 3 numbers and sums of
# r <= 4 (Tucker) products: <= (2r + 8) u relative to the sum over absolute values (Want.ref). PEFT's
# get_delta_weight is a float32 product of rank R <= 16 (LoHa 4 x 4) and a scaling: <= (R + 2) u. Together
# <= 34 u; 64 u leaves a factor of ~2 for summation order (FMA or not). A wrong scale or module is off by ~1e-1.
OURS_C, LOADED_C = 16, 64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def sd15():
    return sd15_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_pipeline()


def _assert_deltas(got: dict[str, np.ndarray], want: dict, c: float, where: str) -> None:
    assert set(got) == set(want), f"{where}: modules differ: {sorted(set(got) ^ set(want))[:4]}"
    for m, w in want.items():
        err = np.abs(got[m] - w.delta)
        bound = c * U32 * w.ref + 1e-30
        assert np.all(err <= bound), f"{where}: {m}: max excess {(err - bound).max():g}"


def _ours(lora) -> dict[str, np.ndarray]:
    return {m: l.delta().astype(np.float64) for m, l in lora.layers.items()}


def _loaded(pipe, folder, weight_name: str, adapter: str) -> dict[str, np.ndarray]:
    """Per-module updates after diffusers' load_lora_weights; the pipeline is left LoRA-free."""
    try:
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter)
        return pipeline_deltas(pipe, adapter)
    finally:
        pipe.unload_lora_weights()


# --- names -----------------------------------------------------------------------------------------------------

# kohya keys of real SDXL files (SGM UNet) and the diffusers modules they adapt (kohya's sdxl_model_util tables)
SGM_NAMES = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "input_blocks_7_1_proj_in": "down_blocks.2.attentions.0.proj_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_out_layers_3": "down_blocks.0.resnets.1.conv2",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_5_0_emb_layers_1": "down_blocks.1.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "middle_block_0_in_layers_2": "mid_block.resnets.0.conv1",
    "middle_block_1_transformer_blocks_3_attn2_to_out_0": "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks_0_1_proj_out": "up_blocks.0.attentions.0.proj_out",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_1_transformer_blocks_1_attn2_to_k": "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
}


@pytest.mark.parametrize("stem", sorted(SGM_NAMES))
def test_sgm_names(stem):
    assert names.kohya_module(f"lora_unet_{stem}") == (SGM_NAMES[stem], "lora_unet_")


def test_sd15_upsampler_of_an_up_block_without_attention():
    # SD 1.5's up_blocks.0 is an UpBlock2D: its upsampler is output_blocks.2.1.conv, not an attention
    assert names.sgm_to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert names.sgm_to_diffusers("output_blocks.11.1.proj_in") == "up_blocks.3.attentions.2.proj_in"


def test_text_encoder_names():
    k = names.kohya_module
    assert k("lora_te_text_model_encoder_layers_0_self_attn_q_proj")[0] == (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    )
    assert k("lora_te1_text_model_encoder_layers_11_mlp_fc2")[0] == "text_encoder.text_model.encoder.layers.11.mlp.fc2"
    assert k("lora_te2_text_model_encoder_layers_31_self_attn_out_proj")[0] == (
        "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"
    )


def test_every_target_of_the_tiny_unets_is_known_and_its_sgm_name_maps_back(sd15, sdxl):
    for pipe in (sd15, sdxl):
        for m in lora_targets(pipe):
            assert names.known_module(m), m
            if pipe is sdxl and not names.is_text_encoder(m):
                assert names.sgm_to_diffusers(to_sgm(m)) == m


def test_a_key_that_maps_to_no_module_is_refused(tmp_path):
    t = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.ones(2, 8)}
    t |= {"lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.ones(8, 2)}
    t |= {"lora_unet_input_blocks_4_7_norm.lora_down.weight": torch.ones(2, 8)}
    t |= {"lora_unet_input_blocks_4_7_norm.lora_up.weight": torch.ones(8, 2)}
    save_file(t, str(tmp_path / "x.safetensors"))
    with pytest.raises(UnknownFormatError, match="input_blocks_4_7_norm.*no LoRA-able module"):
        read_lora(tmp_path / "x.safetensors")


# --- kohya files: both namings, all dtypes, text encoders; read, load, export, load ----------------------------


def _kohya_case(pipe, naming, dtype, tmp_path, sdxl):
    tensors, want = kohya_file(lora_targets(pipe), naming, DTYPES[dtype], seed=3, sdxl=sdxl)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1"}
    path = tmp_path / f"kohya_{naming}_{dtype}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path, want


@pytest.mark.parametrize(
    "model, naming, dtype",
    [
        ("sd15", "diffusers", "fp32"),
        ("sd15", "diffusers", "fp16"),
        ("sdxl", "sgm", "fp32"),
        ("sdxl", "sgm", "bf16"),
        ("sdxl", "diffusers", "fp16"),
    ],
)
def test_kohya_file_read_and_exports_load_with_the_same_delta(request, model, naming, dtype, tmp_path):
    pipe = request.getfixturevalue(model)
    path, want = _kohya_case(pipe, naming, dtype, tmp_path, sdxl=model == "sdxl")
    rr = read_lora(path)
    _assert_deltas(_ours(rr.lora), want, OURS_C, "read")
    assert rr.lora.meta["source_dtype"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert rr.lora.meta["source_kind"] == "locon"  # 3x3 conv factors: kohya's LoRA-C3Lier / LyCORIS LoCon
    assert rr.lora.meta["ss_base_model_version"] == ("sdxl_base_v1-0" if model == "sdxl" else "sd_v1")
    # diffusers reads the original itself: its own name conversion agrees with ours
    _assert_deltas(_loaded(pipe, tmp_path, path.name, "orig"), want, LOADED_C, "diffusers on the file")
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / fmt
        (written,) = write_lora(rr.lora, out, fmt, dtype=rr.lora.meta["source_dtype"])
        # the source dtype holds the factors exactly: the export is the file's update, bit for bit
        _assert_deltas(_loaded(pipe, out, written.name, fmt), want, LOADED_C, f"{fmt} export")


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports_keep_their_dtype_and_values(sd15, fmt, dtype, tmp_path):
    path, _ = _kohya_case(sd15, "diffusers", {"float16": "fp16", "bfloat16": "bf16"}[dtype], tmp_path, sdxl=False)
    lora = read_lora(path).lora
    files = write_lora(lora, tmp_path / fmt, fmt, dtype=dtype)
    back = read_lora(files[0].parent if fmt == "peft" else files[0]).lora
    assert back.meta["source_dtype"] == dtype
    # the factors came in this dtype, so writing them in it again loses nothing
    assert back.layout() == lora.layout()
    assert all(np.array_equal(back.layers[m].A, l.A) and np.array_equal(back.layers[m].B, l.B)
               for m, l in lora.layers.items())  # fmt: skip


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_peft_export_loads_with_peft_unet_and_text_encoder(request, model, tmp_path):
    from peft import PeftModel

    pipe = request.getfixturevalue(model)
    path, want = _kohya_case(pipe, "sgm" if model == "sdxl" else "diffusers", "fp32", tmp_path, sdxl=model == "sdxl")
    lora = read_lora(path).lora
    files = write_lora(lora, tmp_path / "peft", "peft")
    encoders = ["text_encoder"] + (["text_encoder_2"] if model == "sdxl" else [])
    assert all(tmp_path / "peft" / e / "adapter_config.json" in files for e in encoders)
    got = {}
    for comp, folder in [("unet", tmp_path / "peft")] + [(e, tmp_path / "peft" / e) for e in encoders]:
        model = PeftModel.from_pretrained(copy.deepcopy(getattr(pipe, comp)), str(folder), adapter_name="p")
        shim = type("P", (), {comp: model.base_model.model})()
        got |= pipeline_deltas(shim, "p")
    _assert_deltas(got, want, LOADED_C, "peft export")
    again = read_lora(tmp_path / "peft").lora  # and the folder reads back whole
    assert set(again.layers) == set(lora.layers)


def test_kohya_export_of_per_module_alphas_loads_with_the_same_delta(sd15, tmp_path):
    """Alphas that vary per module (a mix, a PEFT import) reach diffusers through a kohya file too."""
    path, want = _kohya_case(sd15, "diffusers", "fp32", tmp_path, sdxl=False)
    lora = read_lora(path).lora
    for i, l in enumerate(lora.layers.values()):  # alphas 4, 0.5, 1 cycling, B rescaled: the same updates
        new = [4.0, 0.5, 1.0][i % 3]
        l.B, l.alpha = (l.B * np.float32(l.alpha / new)).astype(np.float32), new
    (written,) = write_lora(lora, tmp_path / "k", "kohya")
    _assert_deltas(_loaded(sd15, tmp_path / "k", written.name, "k"), want, LOADED_C + 4, "kohya export")


# --- LyCORIS ---------------------------------------------------------------------------------------------------


def _lycoris_file(sd15, tmp_path, algo: str):
    """A LyCORIS file over linear and conv modules of every kind (attention, proj_in 1x1 conv, resnet 3x3)."""
    targets = lora_targets(sd15)
    chosen = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.1.resnets.0.conv1",
        "up_blocks.1.resnets.0.conv_shortcut",
        "up_blocks.0.upsamplers.0.conv",
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
    ]
    g = torch.Generator().manual_seed(7)
    tensors, want = {}, {}
    for i, m in enumerate(chosen):
        stem = names.kohya_stem(m, sdxl_text=False)
        conv3 = targets[m].weight.ndim == 4 and targets[m].weight.shape[2] == 3
        if algo == "loha":
            # rank 3 on the first (8 x 8) module: 3 x 3 = 9 > 8, the dense exact form
            r = 3 if i == 0 else 2
            t, w = loha_tensors(targets[m], stem, g, r=r, alpha=[1.0, 4.0][i % 2], tucker=conv3 and i % 2 == 1)
        else:
            variants = ["w1_full_w2_lora", "both_lora", "full"] + (["tucker"] if conv3 else [])
            t, w = lokr_tensors(targets[m], stem, g, variants[i % len(variants)], alpha=4.0)
        tensors |= t
        want[m] = w
    path = tmp_path / f"{algo}.safetensors"
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo})}
    save_file(tensors, str(path), metadata=meta | {"ss_base_model_version": "sd_v1"})
    return path, want


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_converted_exactly_and_loads(sd15, algo, tmp_path):
    path, want = _lycoris_file(sd15, tmp_path, algo)
    lora = read_lora(path).lora
    assert lora.meta["source_kind"] == algo
    if algo == "loha":
        assert lora.layers[next(iter(want))].rank == 8  # min(out, in): dense update, identity on one side
    _assert_deltas(_ours(lora), want, OURS_C, "read")
    (written,) = write_lora(lora, tmp_path / "out", "diffusers")
    _assert_deltas(_loaded(sd15, tmp_path / "out", written.name, algo), want, LOADED_C, "diffusers export")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("cross_width, conv", [(768, True), (1024, False)])
def test_flattened_proj_in_is_a_1x1_conv_when_the_shapes_say_sd1(algo, cross_width, conv, tmp_path):
    """LoHa/LoKr store a 1x1 conv's update flattened; with no metadata, SD 1.x (proj_in a conv) is told from
    SD 2.x (a Linear) by the cross-attention width alone (768 vs 1024): real widths, channel count 320."""
    g = torch.Generator().manual_seed(3)
    block = "down_blocks.0.attentions.0"
    mods = {
        f"{block}.transformer_blocks.0.attn2.to_k": torch.nn.Linear(cross_width, 320, bias=False),
        f"{block}.proj_in": torch.nn.Conv2d(320, 320, 1) if conv else torch.nn.Linear(320, 320),
    }
    tensors, want = {}, {}
    for m, mod in mods.items():
        stem = names.kohya_stem(m, sdxl_text=False)
        t, w = loha_tensors(mod, stem, g, 2, 1.0, False) if algo == "loha" else lokr_tensors(mod, stem, g, "full", 1.0)
        tensors |= t
        want[m] = w
    save_file(tensors, str(tmp_path / "x.safetensors"))  # no metadata at all
    lora = read_lora(tmp_path / "x.safetensors").lora
    proj = lora.layers[f"{block}.proj_in"]
    assert proj.A.ndim == (4 if conv else 2)
    _assert_deltas(_ours(lora), want, OURS_C, "read")
    (written,) = write_lora(lora, tmp_path / "out", "kohya")
    with safe_open(str(written), "np") as f:
        assert f.get_tensor(f"{names.kohya_stem(f'{block}.proj_in', sdxl_text=False)}.lora_down.weight").ndim == (
            4 if conv else 2
        )


def test_tucker_locon(sd15, tmp_path):
    conv = lora_targets(sd15)["down_blocks.1.resnets.0.conv1"]
    out, inp = conv.weight.shape[:2]
    g = torch.Generator().manual_seed(9)
    down, mid, up = (
        torch.randn(2, inp, 1, 1, generator=g),
        torch.randn(2, 2, 3, 3, generator=g),
        torch.randn(out, 2, 1, 1, generator=g),
    )
    stem = "lora_unet_down_blocks_1_resnets_0_conv1"
    save_file(
        {f"{stem}.lora_down.weight": down, f"{stem}.lora_mid.weight": mid, f"{stem}.lora_up.weight": up,
         f"{stem}.alpha": torch.tensor(1.0)},
        str(tmp_path / "t.safetensors"),
    )  # fmt: skip
    # LyCORIS's rebuild: einsum over (up, mid, down), scale alpha / r
    d = torch.einsum("i j k l, j r, p i -> p r k l", mid.double(), down.double().flatten(1), up.double().flatten(1))
    got = read_lora(tmp_path / "t.safetensors").lora.layers["down_blocks.1.resnets.0.conv1"].delta()
    assert np.allclose(got, d.reshape(out, -1).numpy() / 2, rtol=0, atol=1e-5)  # |dW| ~ 5; float32: ~1e-6


@pytest.mark.parametrize(
    "key, method",
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA"),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks", "OFT"),
    ],
)
def test_methods_that_need_the_base_weights_are_refused_by_name(key, method, tmp_path):
    stem = key.rsplit(".", 1)[0]
    down, up = ("lora_down.weight", "lora_up.weight") if key.startswith("lora_") else ("lora_A.weight", "lora_B.weight")
    t = {key: torch.ones(8), f"{stem}.{down}": torch.ones(2, 8), f"{stem}.{up}": torch.ones(8, 2)}
    save_file(t, str(tmp_path / "d.safetensors"))
    with pytest.raises(UnknownFormatError, match=f"{method} file.*base weights"):
        read_lora(tmp_path / "d.safetensors")


# --- diffusers files with text encoders (SDXL: two) ------------------------------------------------------------


def test_diffusers_sdxl_file_with_both_text_encoders(sdxl, tmp_path):
    path, want = _kohya_case(sdxl, "sgm", "fp32", tmp_path, sdxl=True)
    lora = read_lora(path).lora
    assert any(m.startswith("text_encoder_2.") for m in lora.layers)
    (written,) = write_lora(lora, tmp_path / "d", "diffusers")
    back = read_lora(written).lora
    assert back.layout() == lora.layout()
    _assert_deltas(_ours(back), want, OURS_C, "diffusers round trip")


# --- the registry: add, show, export in each format and dtype ----------------------------------------------------


def _dtypes(path, but: str = "\0") -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(but)}  # noqa: SIM118 (no dict)


def test_add_then_export_each_format_loads_with_the_same_delta(sdxl, tmp_path):
    path, want = _kohya_case(sdxl, "sgm", "fp16", tmp_path, sdxl=True)
    reg = tmp_path / "reg"
    w2wreg(reg, "init")
    w2wreg(reg, "add", str(path), "--name", "xl")
    info = json.loads(w2wreg(reg, "show", "xl", "--json").output)
    assert (info["source_kind"], info["source_dtype"]) == ("locon", "float16")
    assert "locon, float16" in w2wreg(reg, "show", "xl").output
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"x-{fmt}.safetensors"
        w2wreg(reg, "export", "xl", "--format", fmt, "-o", str(out))
        # the model's own dtype by default: an fp16 file stays fp16 (kohya's alphas are float32 scalars)
        assert _dtypes(out, but=".alpha") == {"F16"}
        _assert_deltas(_loaded(sdxl, tmp_path, out.name, fmt), want, LOADED_C, f"{fmt} export of the registry")
    out = tmp_path / "x-bf16.safetensors"
    w2wreg(reg, "export", "xl", "--dtype", "bf16", "-o", str(out))
    assert _dtypes(out) == {"BF16"}


def test_add_reads_every_lycoris_file_of_one_header_exactly(sd15, tmp_path):
    """The fast reader compiles a gather plan per header; a LoHa's factors are computed, so none may be used."""
    from registry.registry import Registry

    paths = []
    for i in range(2):  # same keys and shapes (one header), other values
        (tmp_path / str(i)).mkdir()
        path, _ = _lycoris_file(sd15, tmp_path / str(i), "loha")
        paths.append(path.rename(tmp_path / f"loha{i}.safetensors"))
        t = {k: v * (i + 1) for k, v in safe_open_all(paths[-1]).items()}
        save_file(t, str(paths[-1]), metadata={"ss_base_model_version": "sd_v1"})
    reg = tmp_path / "reg"
    w2wreg(reg, "init")
    w2wreg(reg, "add", *map(str, paths))
    r = Registry.open(reg)
    for i, p in enumerate(paths):
        want = read_lora(p).lora
        got = r.lora(f"loha{i}")
        assert got.layout() == want.layout() and all(
            np.array_equal(got.layers[m].B, want.layers[m].B) for m in want.layers
        )
        assert r.catalog.source_info(r.get(f"loha{i}").id)["source_kind"] == "loha"


def safe_open_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no dict)


def test_diffusers_own_sdxl_file_with_both_text_encoders(sdxl, tmp_path):
    """A file as diffusers' save_lora_weights writes it (unet, text_encoder, text_encoder_2 and their metadata)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    path, want = _kohya_case(sdxl, "sgm", "fp32", tmp_path, sdxl=True)
    try:
        sdxl.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="k")
        layers = {c: get_peft_model_state_dict(getattr(sdxl, c), adapter_name="k") for c in
                  ("unet", "text_encoder", "text_encoder_2")}  # fmt: skip
        StableDiffusionXLPipeline.save_lora_weights(
            tmp_path / "saved",
            unet_lora_layers=layers["unet"],
            text_encoder_lora_layers=layers["text_encoder"],
            text_encoder_2_lora_layers=layers["text_encoder_2"],
            unet_lora_adapter_metadata=sdxl.unet.peft_config["k"].to_dict(),
            text_encoder_lora_adapter_metadata=sdxl.text_encoder.peft_config["k"].to_dict(),
            text_encoder_2_lora_adapter_metadata=sdxl.text_encoder_2.peft_config["k"].to_dict(),
        )
    finally:
        sdxl.unload_lora_weights()
    lora = read_lora(tmp_path / "saved" / "pytorch_lora_weights.safetensors").lora
    _assert_deltas(_ours(lora), want, LOADED_C, "diffusers' own file")


def test_export_warns_of_modules_no_pipeline_has(tmp_path):
    """A model registered before SGM names were mapped (`input.blocks.4.1.proj_in`) says so on export."""
    m = "unet.input.blocks.4.1.proj_in"
    save_file(
        {f"{m}.lora_A.weight": torch.ones(2, 8), f"{m}.lora_B.weight": torch.ones(8, 2)},
        str(tmp_path / "o.safetensors"),
    )
    reg = tmp_path / "reg"
    w2wreg(reg, "init")
    w2wreg(reg, "add", str(tmp_path / "o.safetensors"))
    result = w2wreg(reg, "export", "o", "-o", str(tmp_path / "out"))
    assert "input.blocks.4.1.proj_in" in result.stderr and "Re-add" in result.stderr


def test_a_registry_made_before_the_dtype_columns_reads_and_gains_them(tmp_path):
    import duckdb

    m = "unet.down_blocks.0.attentions.0.proj_in"
    for name in ("a", "b"):
        t = {f"{m}.lora_A.weight": torch.ones(2, 8), f"{m}.lora_B.weight": torch.full((8, 2), ord(name) / 100)}
        save_file(t, str(tmp_path / f"{name}.safetensors"))
    reg = tmp_path / "reg"
    w2wreg(reg, "init")
    w2wreg(reg, "add", str(tmp_path / "a.safetensors"))
    con = duckdb.connect(str(reg / "catalog.duckdb"))  # as an older w2wreg left it
    con.execute("ALTER TABLE models DROP COLUMN source_dtype")
    con.execute("ALTER TABLE models DROP COLUMN source_kind")
    con.close()
    assert json.loads(w2wreg(reg, "show", "a", "--json").output)["source_dtype"] is None
    w2wreg(reg, "export", "a", "-o", str(tmp_path / "out"))  # float32 when the catalog does not say
    w2wreg(reg, "add", str(tmp_path / "b.safetensors"))  # the first write adds the columns
    assert json.loads(w2wreg(reg, "show", "b", "--json").output)["source_dtype"] == "float32"


def test_sd15_like_config_matches_the_real_block_structure():
    # four down blocks, the last without attention; two layers per block (SGM numbering depends on it)
    assert SD15_LIKE["layers_per_block"] == 2 and SD15_LIKE["down_block_types"][-1] == "DownBlock2D"

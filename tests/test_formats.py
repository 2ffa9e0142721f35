"""The LoRA file formats against the real libraries: diffusers and PEFT load what we write, we read what
they write, conversions are lossless, and bad input fails with its own error class.

Everything runs on a tiny UNet built in code (see conftest.py / helpers.py).
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch
from helpers import (
    ALPHA_0_3,
    TINY_ALPHA,
    TINY_RANK,
    TINY_UNET_CONFIG,
    W2W_TARGETS,
    apply_lora,
    build_pipeline,
    mixed_layout,
    random_lora,
    unet_out,
)
from safetensors.numpy import save_file

from w2w.distance import delta_distances
from w2w.errors import (
    CorruptFileError,
    LoRAFileError,
    NonFiniteError,
    PickleRefusedError,
    ShapeError,
    UnknownFormatError,
)
from w2w.flatten import flatten, unflatten
from w2w.formats import diffusers as dfmt
from w2w.formats import kohya, read_lora, write_lora
from w2w.formats import peft as pfmt
from w2w.layout import Layout, LayoutEntry, canonical_sort
from w2w.lora import LoRA, LoRALayer
from w2w.presets import sd15_layout, unet_layout

U32 = 2.0**-24  # float32 unit roundoff: 24 significant bits
# Two float32 evaluations of the tiny UNet that differ only in rounding (the adapter beside W, as PEFT runs it, or
# merged into W): a dot product of n terms errs by ~sqrt(n) u (random-walk estimate; n <= 288, a 3x3 conv over 32
# concatenated channels), and the ~40 layers on the path add in quadrature: at most ~sqrt(40) * 17 * u * max|y|
# (~0.8) = 5e-6 per evaluation, 7e-6 between two (most layers are far shorter: against float64 the float32 UNet is
# 7.5e-7 off). No bf16/TF32 on this path. A wrong scale or layer shows at ~1e-1.
ATOL = 2e-5


@pytest.fixture(params=["uniform", "mixed"])
def layout(request, tiny_layout):
    """The tiny w2w layout (rank 2, alpha 3 everywhere), and one with per-module rank and alpha."""
    return tiny_layout if request.param == "uniform" else mixed_layout(tiny_layout)


@pytest.fixture(scope="session")
def sd15_qkvo():
    return sd15_layout("qkvo")


def _assert_same_lora(got: LoRA, want: LoRA) -> None:
    """Bit-exact factors and exactly the same alphas (the layout fingerprint includes them)."""
    assert got.layout() == want.layout()
    assert np.array_equal(flatten(got), flatten(want))


def _assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err:g} > {atol:g}"


def _assert_same_delta(ours: LoRALayer, theirs: np.ndarray, name: str) -> None:
    """Our (alpha / r) B A against PEFT's get_delta_weight: float32 products of the same factors, in any order.

    Per element, a length-r dot product errs by at most r u of sum_k |b_k a_k| (any order, with or without FMA),
    the scaling by one u more on each side, and alpha by u (we keep float32(alpha), PEFT the Python float):
    2 (r + 2) u scale (|B| |A|) bounds the difference.
    """
    bound = 2 * (ours.rank + 2) * U32 * ours.scale * (np.abs(ours.b2d()).astype(np.float64) @ np.abs(ours.a2d()))
    err = np.abs(ours.delta().astype(np.float64) - theirs)
    assert np.all(err <= bound), f"{name}: max excess {(err - bound).max():g}"


def _fill_lora_b(model: torch.nn.Module, seed: int) -> None:
    """PEFT initialises lora_B to zero (the update would be 0); give every B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g))


def _peft_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module path (as in the bare UNet) -> PEFT LoRA layer, for every adapted module."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            out[name.removeprefix("base_model.model.")] = mod
    return out


# --- 1. diffusers: the pipeline loads what we write -------------------------------------------------


def test_diffusers_file_loads_into_pipeline(sd_pipe, base_unet, layout, tmp_path):
    lora = random_lora(layout, seed=1)
    (written,) = write_lora(lora, tmp_path, "diffusers")
    assert written.name == "pytorch_lora_weights.safetensors"

    base_y = unet_out(sd_pipe.unet)
    sd_pipe.load_lora_weights(str(tmp_path), weight_name=written.name, adapter_name="w2w")

    layers = _peft_layers(sd_pipe.unet)
    assert set(layers) == set(lora.layers)
    for name, l in lora.layers.items():
        m = layers[name]
        assert torch.equal(m.lora_A["w2w"].weight, torch.from_numpy(l.A)), name
        assert torch.equal(m.lora_B["w2w"].weight, torch.from_numpy(l.B)), name
        assert m.r["w2w"] == l.rank, name
        # alpha != rank must survive: diffusers takes it from the lora_adapter_metadata header. Both sides divide
        # the same doubles (alpha crosses as a JSON decimal, which round-trips exactly): equal, 1e-12 is slack
        assert m.scaling["w2w"] == pytest.approx(l.alpha / l.rank, rel=1e-12), name

    y = unet_out(sd_pipe.unet)
    y_ref = unet_out(apply_lora(base_unet, lora))
    _assert_close(y, y_ref)
    assert (y - base_y).abs().max().item() > 1e-2  # the LoRA changes the output (by ~0.9; this is 500x ATOL)


def test_diffusers_file_full_pipeline_matches_merged_unet(sd_pipe, base_unet, tiny_layout, tmp_path):
    """End to end through the pipeline's own __call__ (text encoder, scheduler, VAE)."""
    lora = random_lora(tiny_layout, seed=2, scale=0.5)
    write_lora(lora, tmp_path, "diffusers")
    sd_pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    merged = build_pipeline(apply_lora(base_unet, lora))

    def run(pipe):
        return pipe(
            "a sks dog", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
        ).images

    img, img_ref = run(sd_pipe), run(merged)
    assert img.shape == (1, 8, 8, 3)
    # pixels in [0, 1] after two UNet steps (7e-6 apart each, see ATOL), the DDPM x0 estimate (/ sqrt(alpha_bar)
    # <= 1.7x for 100 training steps) and the VAE decoder of latents / 0.18215 (5.5x), halved to [0, 1]: ~3e-5
    np.testing.assert_allclose(img, img_ref, atol=1e-4)


# --- 2. PEFT: PeftModel loads our folder; we read PEFT's folder ---------------------------------------


def test_peft_folder_loads_with_peftmodel(base_unet, layout, tmp_path):
    from peft import PeftModel

    lora = random_lora(layout, seed=3)
    files = write_lora(lora, tmp_path, "peft")
    assert {f.name for f in files} == {"adapter_model.safetensors", "adapter_config.json"}

    model = PeftModel.from_pretrained(copy.deepcopy(base_unet), str(tmp_path))
    layers = _peft_layers(model)
    assert set(layers) == set(lora.layers)
    for name, l in lora.layers.items():
        m = layers[name]
        assert torch.equal(m.lora_A["default"].weight, torch.from_numpy(l.A)), name
        assert torch.equal(m.lora_B["default"].weight, torch.from_numpy(l.B)), name
        assert m.scaling["default"] == pytest.approx(l.scale, rel=1e-12), name  # the same division (see above)
    _assert_close(unet_out(model.get_base_model()), unet_out(apply_lora(base_unet, lora)))


def _peft_adapter(base_unet, tmp_path, seed: int = 4):
    """A LoRA made and saved by PEFT itself, with a rank_pattern and alpha_patterns."""
    from peft import LoraConfig, get_peft_model

    rank_mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    alpha_mod = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
    config = LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v"],
        # a full path, and a suffix pattern that matches several modules (PEFT: first match wins)
        rank_pattern={rank_mod: 3},
        alpha_pattern={alpha_mod: 7, "attn2.to_v": 0.3},
    )
    model = get_peft_model(copy.deepcopy(base_unet), config)
    _fill_lora_b(model, seed)
    model.save_pretrained(str(tmp_path))
    return model, rank_mod, alpha_mod


def test_read_peft_saved_adapter(base_unet, tiny_layout, tmp_path):
    model, rank_mod, alpha_mod = _peft_adapter(base_unet, tmp_path)
    res = read_lora(tmp_path)
    assert res.format == "peft"
    lora = res.lora
    layers = _peft_layers(model)
    assert set(lora.layers) == set(layers) == {e.module for e in tiny_layout.entries}
    for name, m in layers.items():
        l = lora.layers[name]
        assert l.rank == m.r["default"], name
        # we keep alpha as float32 (as every format stores it), PEFT the Python float: within 2^-24 = 6e-8 relative
        assert l.alpha == pytest.approx(m.lora_alpha["default"], rel=1e-7), name
        _assert_same_delta(l, m.get_delta_weight("default").detach().numpy(), name)
    assert lora.layers[rank_mod].rank == 3
    assert lora.layers[alpha_mod].alpha == 7
    assert lora.layers["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].alpha == ALPHA_0_3
    assert lora.layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 5
    # and the model's output is the same as applying what we read
    _assert_close(unet_out(model.get_base_model()), unet_out(apply_lora(base_unet, lora)))


# --- 3. a file saved by diffusers' own save_lora_weights --------------------------------------------


def test_read_diffusers_saved_file(base_unet, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(base_unet)
    alpha_mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    rank_mod = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    config = LoraConfig(
        r=2,
        lora_alpha=5,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_v"],
        rank_pattern={rank_mod: 4},
        alpha_pattern={alpha_mod: 7},
    )
    unet.add_adapter(config)  # what diffusers' training scripts do
    _fill_lora_b(unet, seed=5)
    # ... and how they save: the PEFT state dict plus the LoraConfig as adapter metadata
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    res = read_lora(path)
    assert res.format == "diffusers"
    layers = _peft_layers(unet)
    assert set(res.lora.layers) == set(layers)
    for name, m in layers.items():
        l = res.lora.layers[name]
        assert l.rank == m.r["default"] and l.alpha == m.lora_alpha["default"], name
        _assert_same_delta(l, m.get_delta_weight("default").detach().numpy(), name)
    assert res.lora.layers[alpha_mod].alpha == 7
    assert res.lora.layers[rank_mod].rank == 4
    assert {l.alpha for n, l in res.lora.layers.items() if n != alpha_mod} == {5.0}
    _assert_close(unet_out(unet), unet_out(apply_lora(base_unet, res.lora)))


def test_diffusers_rslora_file_refused(sd_pipe, base_unet, tmp_path):
    """diffusers applies alpha/sqrt(r) to an rsLoRA file; reading it as alpha/r would be silently wrong."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(base_unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], use_rslora=True))
    _fill_lora_b(unet, seed=6)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    sd_pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="rs")
    scalings = {m.scaling["rs"] for m in _peft_layers(sd_pipe.unet).values()}
    assert scalings == {8 / 4**0.5}  # = 4, not alpha / r = 2
    with pytest.raises(UnknownFormatError, match="use_rslora"):
        read_lora(tmp_path / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(tiny_layout, tmp_path, dtype):
    from safetensors.torch import save_file as save_torch

    lora = random_lora(tiny_layout, seed=6)
    tensors, meta = dfmt.to_tensors(lora)
    half = {k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()}
    save_torch(half, str(tmp_path / "h.safetensors"), metadata=meta)
    got = read_lora(tmp_path / "h.safetensors").lora
    assert got.meta["source_dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert got.layout() == tiny_layout
    want = np.concatenate([half[k].float().numpy().ravel() for k in tensors])  # A, B per module, in order
    assert np.array_equal(flatten(got), want)  # widening fp16/bf16 to float32 is exact: no rounding to allow for
    assert not np.array_equal(flatten(got), flatten(lora))  # it really was rounded on the way


def test_diffusers_file_without_metadata_means_alpha_equals_rank(tiny_layout, tmp_path):
    """No lora_adapter_metadata header: diffusers applies alpha = rank, and so must we."""
    lora = random_lora(tiny_layout, seed=6)
    tensors, _ = dfmt.to_tensors(lora)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    got = read_lora(tmp_path / "x.safetensors").lora
    assert {l.alpha for l in got.layers.values()} == {float(TINY_RANK)}
    assert np.array_equal(flatten(got), flatten(lora))


# --- 4. conversions ---------------------------------------------------------------------------------


def _target(tmp_path, step: int, fmt: str):
    return tmp_path / f"{step}_{fmt}" if fmt == "peft" else tmp_path / f"{step}_{fmt}.safetensors"


def _read_back(files, fmt: str):
    res = read_lora(files[0].parent if fmt == "peft" else files[0])
    assert res.format == fmt
    return res.lora


@pytest.mark.parametrize(
    "chain",
    [
        # together: all six directions d->p, p->k, k->d, d->k, k->p, p->d
        ("diffusers", "peft", "kohya", "diffusers", "kohya", "peft", "diffusers"),
        ("kohya", "diffusers", "peft", "kohya"),
    ],
)
def test_round_trips_are_bit_exact(layout, tmp_path, chain):
    lora = random_lora(layout, seed=7)
    lora.base_model = "tiny/base"
    # kohya files give attention projections their component's most common alpha, B rescaled to keep dW, since
    # diffusers' kohya loader applies no other alpha to them (kohya.loadable_alphas); with one alpha per module
    # kind, as kohya trains, nothing changes. What kohya writes, every format then keeps bit for bit.
    if "kohya" in chain:
        written = kohya.loadable_alphas(lora)
        lora = LoRA({m: LoRALayer(*written[m]) for m in lora.layers}, lora.base_model)
    layout = lora.layout()
    v = flatten(lora)
    current = lora
    for step, fmt in enumerate(chain):
        files = write_lora(current, _target(tmp_path, step, fmt), fmt)
        current = _read_back(files, fmt)
        _assert_same_lora(current, lora)
        assert current.layout().fingerprint == layout.fingerprint
        assert np.array_equal(flatten(current, layout), v)
        assert current.base_model == "tiny/base", fmt


def test_kohya_alphas_folded_only_where_diffusers_needs_it(tiny_layout):
    uniform = random_lora(tiny_layout, seed=7)
    assert all(kohya.loadable_alphas(uniform)[m][1] is l.B for m, l in uniform.layers.items())
    mixed = random_lora(mixed_layout(tiny_layout), seed=7)
    written = kohya.loadable_alphas(mixed)
    assert any(written[m][1] is not l.B for m, l in mixed.layers.items())  # some attention projection was folded
    for m, l in mixed.layers.items():
        A, B, alpha = written[m]
        assert A is l.A
        # B' = fl(B * fl(alpha / common)): two roundings per element, so |dW' - dW| <= 2 u scale |B| |A| (in
        # float64, whose own error is 2^-29 times smaller); 3 u leaves room for that
        A64, B64, l64 = A.astype(np.float64), B.astype(np.float64).reshape(B.shape[0], -1), l.b2d().astype(np.float64)
        got, want = alpha / l.rank * (B64 @ A64), l.scale * (l64 @ A64)
        assert np.all(np.abs(got - want) <= 3 * U32 * abs(l.scale) * (np.abs(l64) @ np.abs(A64))), m


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_non_integer_alpha_kept_at_float32(tiny_layout, tmp_path, fmt):
    """alpha 0.3 (a Python double) comes back as float32(0.3) from every format, and stays there."""
    src = random_lora(tiny_layout, seed=8)
    lora = LoRA({k: LoRALayer(l.A, l.B, 0.3) for k, l in src.layers.items()})
    files = write_lora(lora, _target(tmp_path, 0, fmt), fmt)
    got = _read_back(files, fmt)
    assert {l.alpha for l in got.layers.values()} == {ALPHA_0_3}
    assert all(abs(l.alpha - 0.3) < 1e-7 for l in got.layers.values())  # |float32(0.3) - 0.3| <= 0.3 * 2^-24
    again = _read_back(write_lora(got, _target(tmp_path, 1, fmt), fmt), fmt)
    _assert_same_lora(again, got)


def test_kohya_file_layout(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=9)
    (path,) = write_lora(lora, tmp_path / "k.safetensors", "kohya")
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
        assert f.get_tensor(f"{name}.alpha").item() == TINY_ALPHA
    assert len(keys) == 3 * len(tiny_layout)


# --- 5. old spellings and kohya names ---------------------------------------------------------------


def test_old_diffusers_spellings(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=10)
    names = list(lora.layers)
    tensors = {}
    for i, (m, l) in enumerate(lora.layers.items()):
        if i % 2 == 0:  # unet.<module>.lora.down.weight
            tensors[f"unet.{m}.lora.down.weight"] = l.A
            tensors[f"unet.{m}.lora.up.weight"] = l.B
        else:  # the attention-processor spelling: unet.<...>.attn1.processor.to_q_lora.down.weight
            attn, proj = m.rsplit(".", 1)
            tensors[f"unet.{attn}.processor.{proj}_lora.down.weight"] = l.A
            tensors[f"unet.{attn}.processor.{proj}_lora.up.weight"] = l.B
    save_file(tensors, str(tmp_path / "old.safetensors"))
    res = read_lora(tmp_path / "old.safetensors")
    assert res.format == "diffusers"
    assert list(res.lora.layers) == names
    for m, l in lora.layers.items():
        assert np.array_equal(res.lora.layers[m].A, l.A) and np.array_equal(res.lora.layers[m].B, l.B)
        assert res.lora.layers[m].alpha == l.rank  # no alpha anywhere: alpha = rank


def test_old_processor_to_out_and_alpha_tensors(tmp_path):
    """`to_out_lora` means the module to_out.0; a `.alpha` tensor (converted kohya files) is honoured."""
    rng = np.random.default_rng(0)
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    A, B = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    tensors = {
        f"{attn}.processor.to_out_lora.down.weight": A,
        f"{attn}.processor.to_out_lora.up.weight": B,
        f"{attn}.to_k.lora_A.weight": A,
        f"{attn}.to_k.lora_B.weight": B,
        f"{attn}.to_k.alpha": np.array(6.0, dtype=np.float32),
    }
    save_file(tensors, str(tmp_path / "f.safetensors"))
    layers = read_lora(tmp_path / "f.safetensors").lora.layers
    mod = attn.removeprefix("unet.")
    assert set(layers) == {f"{mod}.to_k", f"{mod}.to_out.0"}
    assert layers[f"{mod}.to_out.0"].alpha == 2.0
    assert layers[f"{mod}.to_k"].alpha == 6.0


def test_kohya_demangle_sd15_names(sd15_qkvo):
    for m in (e.module for e in sd15_qkvo.entries):
        mangled = kohya.mangle(m)
        assert mangled.startswith("lora_unet_") and "." not in mangled
        assert kohya.demangle(mangled[len("lora_unet_") :]) == m


def test_kohya_demangle_every_sd15_linear_and_conv():
    """Beyond attention: every Linear/Conv2d name of the SD 1.5 UNet survives mangle/demangle."""
    from diffusers import UNet2DConditionModel

    from w2w.presets import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(names) > 200
    bad = [n for n in names if kohya.demangle(kohya.mangle(n)[len("lora_unet_") :]) != n]
    assert not bad, bad[:5]


def test_kohya_keys_read(tiny_layout, tmp_path):
    """A hand-written kohya file (down/up/alpha per module) reads into the right modules."""
    lora = random_lora(tiny_layout, seed=11)
    tensors = {}
    for m, l in lora.layers.items():
        k = kohya.mangle(m)
        tensors[f"{k}.lora_down.weight"] = l.A
        tensors[f"{k}.lora_up.weight"] = l.B
        tensors[f"{k}.alpha"] = np.array([l.alpha], dtype=np.float32)  # some files store shape (1,)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    res = read_lora(tmp_path / "k.safetensors")
    assert res.format == "kohya"
    _assert_same_lora(res.lora, lora)


# --- 6. bad input -----------------------------------------------------------------------------------


def _diffusers_tensors(lora: LoRA) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in dfmt.to_tensors(lora)[0].items()}


def test_pickle_refused_then_allowed(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=12)
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save({k: torch.from_numpy(v) for k, v in _diffusers_tensors(lora).items()}, path)
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        read_lora(path)
    res = read_lora(path, allow_pickle=True)
    assert res.format == "diffusers"
    assert np.array_equal(flatten(res.lora), flatten(lora))


def test_pickle_refused_inside_peft_folder(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=13)
    write_lora(lora, tmp_path, "peft")
    st = tmp_path / pfmt.WEIGHTS
    from safetensors.torch import load_file

    torch.save(load_file(str(st)), tmp_path / pfmt.PICKLED_WEIGHTS)
    st.unlink()
    with pytest.raises(PickleRefusedError):
        read_lora(tmp_path)
    _assert_same_lora(read_lora(tmp_path, allow_pickle=True).lora, lora)


def test_nan_factor(tiny_layout, tmp_path):
    t = _diffusers_tensors(random_lora(tiny_layout, seed=14))
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key][0, 0] = np.nan
    save_file(t, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteError, match="NaN"):
        read_lora(tmp_path / "nan.safetensors")


def test_inf_in_kohya_factor(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=15)
    next(iter(lora.layers.values())).A[0, 0] = np.inf
    (path,) = write_lora(lora, tmp_path / "k.safetensors", "kohya")
    with pytest.raises(NonFiniteError):
        read_lora(path)


def test_inconsistent_rank(tiny_layout, tmp_path):
    t = _diffusers_tensors(random_lora(tiny_layout, seed=16))
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = np.ones((t[key].shape[0], TINY_RANK + 1), dtype=np.float32)
    save_file(t, str(tmp_path / "r.safetensors"))
    with pytest.raises(ShapeError, match="rank"):
        read_lora(tmp_path / "r.safetensors")


def test_a_without_b(tiny_layout, tmp_path):
    t = _diffusers_tensors(random_lora(tiny_layout, seed=17))
    del t[next(k for k in t if k.endswith("lora_B.weight"))]
    save_file(t, str(tmp_path / "a.safetensors"))
    with pytest.raises(ShapeError, match="no up/B"):
        read_lora(tmp_path / "a.safetensors")


def test_truncated_file(tiny_layout, tmp_path):
    (path,) = write_lora(random_lora(tiny_layout, seed=18), tmp_path, "diffusers")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_lora(path)
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CorruptFileError):
        read_lora(path)
    path.write_bytes(data[:5])  # not even the length prefix
    with pytest.raises(CorruptFileError):
        read_lora(path)


def test_safetensors_mapped_in_their_stored_types(tmp_path):
    """map_safetensors: every tensor in its own dtype (int64 ids beyond float32's 2^24, float64, bfloat16 read
    as float32), read-only views of the file, equal to safetensors' own reader; a truncated file is refused."""
    import torch
    from safetensors.torch import save_file as save_torch

    from w2w.formats.tensorfile import atomic_write_safetensors, map_safetensors

    rng = np.random.default_rng(0)
    arrays = {
        "components": rng.standard_normal((300, 7)).astype(np.float32),
        "ids": np.array([2**40 + 1, 3, 2**53 - 1], np.int64),
        "s": rng.standard_normal(5),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "a.safetensors"
    atomic_write_safetensors(path, arrays)
    got = map_safetensors(path)
    assert set(got) == set(arrays)
    for key, a in arrays.items():
        assert got[key].dtype == a.dtype and not got[key].flags.writeable
        np.testing.assert_array_equal(got[key], a)
    with pytest.raises(ValueError, match="read-only"):
        got["components"][0, 0] = 1.0
    path.unlink()  # the map outlives the file's name
    np.testing.assert_array_equal(got["components"], arrays["components"])
    bf = torch.randn(4, 3).bfloat16()
    save_torch({"x": bf}, str(tmp_path / "bf.safetensors"))
    np.testing.assert_array_equal(map_safetensors(tmp_path / "bf.safetensors")["x"], bf.float().numpy())
    atomic_write_safetensors(path, arrays)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="wrong size"):
        map_safetensors(path)
    for data in (b"", b"\x01\x00"):  # empty (mmap refuses it) and shorter than the length prefix
        path.write_bytes(data)
        with pytest.raises(CorruptFileError, match="too short"):
            map_safetensors(path)


def test_oversized_header(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(CorruptFileError, match="limit"):  # refused for its size, before anything is read
        read_lora(path)


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.safetensors"
    path.write_bytes(rng.bytes(4096))
    with pytest.raises(CorruptFileError):
        read_lora(path)
    # a plausible header length followed by noise: not JSON
    path.write_bytes(struct.pack("<Q", 100) + rng.bytes(500))
    with pytest.raises(CorruptFileError, match="JSON"):
        read_lora(path)


def test_header_offsets_out_of_range(tmp_path):
    header = json.dumps({"unet.x.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 4096]}})
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 32)
    with pytest.raises(CorruptFileError):
        read_lora(path)


@pytest.mark.parametrize(
    "header",
    [
        {"__metadata__": [1]},
        {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}},
        {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
        {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}},
        {"unet.a.lora_A.weight": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
        {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 16]}},
        {"unet.a.lora_A.weight": "F32"},
        [1, 2],
    ],
    ids=[
        "metadata-list",
        "str-offsets",
        "float-offsets",
        "neg-shape",
        "dtype-list",
        "huge-shape",
        "str-entry",
        "list-header",
    ],
)
def test_malformed_header(tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(CorruptFileError):
        read_lora(path)


def test_text_encoder_keys(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=19)
    t, meta = dfmt.to_tensors(lora)  # with the alpha header, as diffusers writes it
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    t[f"{te}.lora_A.weight"] = np.ones((2, 12), dtype=np.float32)
    t[f"{te}.lora_B.weight"] = np.ones((12, 2), dtype=np.float32)
    save_file(t, str(tmp_path / "te.safetensors"), metadata=meta)
    kept = read_lora(tmp_path / "te.safetensors").lora  # the text-encoder part is kept as its own module
    assert set(kept.layers) == set(lora.layers) | {te}
    assert kept.layers[te].alpha == 2.0  # no text_encoder.lora_alpha in the header: alpha = rank, as diffusers
    got = read_lora(tmp_path / "te.safetensors", drop_text_encoder=True).lora
    _assert_same_lora(got, lora)


def test_kohya_text_encoder_keys(tiny_layout, tmp_path):
    lora = random_lora(tiny_layout, seed=20)
    tensors, meta = kohya.to_tensors(lora)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors[f"{te}.lora_down.weight"] = np.ones((2, 12), dtype=np.float32)
    tensors[f"{te}.lora_up.weight"] = np.ones((12, 2), dtype=np.float32)
    tensors[f"{te}.alpha"] = np.array(2.0, dtype=np.float32)
    save_file(tensors, str(tmp_path / "k.safetensors"), metadata=meta)
    kept = read_lora(tmp_path / "k.safetensors").lora
    assert set(kept.layers) - set(lora.layers) == {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    _assert_same_lora(read_lora(tmp_path / "k.safetensors", drop_text_encoder=True).lora, lora)


def test_unknown_keys(tiny_layout, tmp_path):
    path = tmp_path / "u.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.weight": np.ones((2, 2), np.float32)}, str(path))
    with pytest.raises(UnknownFormatError):
        read_lora(path)
    # LoRA keys mixed with keys that are no LoRA factor
    t = _diffusers_tensors(random_lora(tiny_layout, seed=21))
    t["unet.conv_in.weight"] = np.ones((8, 4, 3, 3), np.float32)
    save_file(t, str(path))
    with pytest.raises(UnknownFormatError):
        read_lora(path)
    # a folder that holds no LoRA
    (tmp_path / "folder").mkdir()
    with pytest.raises(LoRAFileError, match="holds no LoRA"):
        read_lora(tmp_path / "folder")


def test_peft_dora_refused(tiny_layout, tmp_path):
    write_lora(random_lora(tiny_layout, seed=22), tmp_path, "peft")
    cfg = json.loads((tmp_path / pfmt.CONFIG).read_text())
    cfg["use_dora"] = True
    (tmp_path / pfmt.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(UnknownFormatError, match="use_dora"):
        read_lora(tmp_path)


def test_write_unknown_format(tiny_layout, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA format"):
        write_lora(random_lora(tiny_layout, seed=23), tmp_path, "ckpt")


# --- 7. layouts -------------------------------------------------------------------------------------


def test_sd15_dims(sd15_qkvo):
    w2w = sd15_layout("w2w")
    assert w2w.dim == 99648
    assert sd15_qkvo.dim == 199296
    assert len(w2w) == 64 and len(sd15_qkvo) == 128
    assert {e.rank for e in w2w.entries} == {1} and {e.alpha for e in w2w.entries} == {27.0}


def test_fingerprint_stable_and_sensitive(tiny_layout):
    again = unet_layout(copy.deepcopy(TINY_UNET_CONFIG), W2W_TARGETS, TINY_RANK, TINY_ALPHA)
    assert again == tiny_layout and again.fingerprint == tiny_layout.fingerprint
    assert len(tiny_layout.fingerprint) == 16
    assert Layout.from_json(tiny_layout.to_json()).fingerprint == tiny_layout.fingerprint
    other_alpha = unet_layout(TINY_UNET_CONFIG, W2W_TARGETS, TINY_RANK, TINY_ALPHA + 1)
    other_rank = unet_layout(TINY_UNET_CONFIG, W2W_TARGETS, TINY_RANK + 1, TINY_ALPHA)
    fps = {tiny_layout.fingerprint, other_alpha.fingerprint, other_rank.fingerprint}
    assert len(fps) == 3
    # one module's alpha differing is enough
    e0 = tiny_layout.entries[0]
    one = Layout((LayoutEntry(e0.module, e0.a_shape, e0.b_shape, 2.5),) + tiny_layout.entries[1:])
    assert one.fingerprint != tiny_layout.fingerprint


def test_canonical_order():
    names = [e.module for e in sd15_layout("w2w").entries]
    first = {p: next(i for i, n in enumerate(names) if n.startswith(p)) for p in ("down", "mid", "up")}
    last = {p: max(i for i, n in enumerate(names) if n.startswith(p)) for p in ("down", "mid", "up")}
    assert last["down"] < first["mid"] <= last["mid"] < first["up"]
    assert names[:4] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    # up_blocks.1.attentions.2 before up_blocks.2.attentions.0 (numeric, not string order)
    ub = [n for n in names if n.startswith("up_blocks")]
    assert ub.index("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q") < ub.index(
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    q = [e.module for e in sd15_layout("qkvo").entries][:8]
    assert [n.split("attn")[1] for n in q] == [
        "1.to_q",
        "1.to_k",
        "1.to_v",
        "1.to_out.0",
        "2.to_q",
        "2.to_k",
        "2.to_v",
        "2.to_out.0",
    ]
    shuffled = list(reversed(names))
    assert canonical_sort(shuffled) == names
    assert canonical_sort(["x.10.a", "x.9.a", "x.1.a"]) == ["x.1.a", "x.9.a", "x.10.a"]


def test_flatten_unflatten_inverse(layout):
    rng = np.random.default_rng(24)
    v = rng.standard_normal(layout.dim).astype(np.float32)
    lora = unflatten(v, layout)
    assert lora.layout() == layout
    assert np.array_equal(flatten(lora, layout), v)
    again = unflatten(flatten(lora), layout)
    _assert_same_lora(again, lora)
    # per module A then B, in layout order
    e = layout.entries[1]
    start = layout.offsets[1]
    assert np.array_equal(lora.layers[e.module].A.ravel(), v[start : start + e.a_size])
    assert np.array_equal(lora.layers[e.module].B.ravel(), v[start + e.a_size : start + e.size])
    assert layout.offsets[-1] + layout.entries[-1].size == layout.dim == v.size


def test_flatten_rejects_wrong_layout(tiny_layout):
    from w2w.errors import LayoutMismatchError

    lora = random_lora(tiny_layout, seed=25)
    with pytest.raises(LayoutMismatchError):
        flatten(lora, mixed_layout(tiny_layout))
    with pytest.raises(LayoutMismatchError):
        unflatten(np.zeros(tiny_layout.dim + 1, np.float32), tiny_layout)


# --- 8. distance ------------------------------------------------------------------------------------


def _dense_distance(l1: LoRA, l2: LoRA) -> float:
    total = 0.0
    for name, a in l1.layers.items():
        b = l2.layers[name]
        d1 = a.scale * (a.b2d().astype(np.float64) @ a.a2d().astype(np.float64))
        d2 = b.scale * (b.b2d().astype(np.float64) @ b.a2d().astype(np.float64))
        total += float(np.sum((d1 - d2) ** 2))
    return float(np.sqrt(total))  # ||dW1 - dW2||_F over all layers (w2w.distance, w2w.delta)


def test_delta_distances_match_brute_force(layout):
    q = random_lora(layout, seed=26)
    others = [random_lora(layout, seed=s) for s in (27, 28, 29)] + [q]
    X = np.stack([flatten(o) for o in others])
    got = delta_distances(flatten(q), X, layout)
    assert got.shape == (4,) and got.dtype == np.float64
    want = np.array([_dense_distance(q, o) for o in others])
    # Both float64 from float32 factors (u = 2^-53). The Gram form s^2 (xx + qq - 2 xq) sums r^2 products of Gram
    # entries (dot products of n <= 16 terms): its error is <= (n + r^2) u r (xx + qq + 2|xq|), about 3 d^2 for
    # unrelated LoRAs: ~2e-14 relative to d, whatever the order. (A float32 Gram would be off by ~1e-6.)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-12)
    # to itself: xx + qq - 2 xq cancels to ~(n + r^2) u r ||dW||^2, so each layer gives sqrt of that, ~1.6e-7 of
    # its ||dW||, while unrelated LoRAs are ~1.4 sum ||dW|| apart
    assert got[3] < 1e-6 * got[:3].min()


def test_delta_distance_zero_between_factorizations(layout):
    lora = random_lora(layout, seed=30)
    rng = np.random.default_rng(31)
    layers = {}
    for name, l in lora.layers.items():
        r = l.rank
        M = (np.eye(r) * 2.0 + 0.3 * rng.standard_normal((r, r))).astype(np.float64)  # well conditioned
        B2 = (l.B.astype(np.float64) @ M).astype(np.float32)
        A2 = (np.linalg.inv(M) @ l.A.astype(np.float64)).astype(np.float32)
        layers[name] = LoRALayer(A2, B2, l.alpha)
    refactored = LoRA(layers)
    v1, v2 = flatten(lora), flatten(refactored)
    assert np.linalg.norm(v1 - v2) > 1.0  # far apart as raw vectors
    d = delta_distances(v1, v2[None, :], layout)[0]
    scale = delta_distances(v1, np.zeros((1, layout.dim), np.float32), layout)[0]  # sum of ||dW||
    # against zero nothing cancels: sum ||dW|| to ~(n + r^2) u64 r ~ 1e-14 relative (see above)
    assert scale == pytest.approx(_dense_distance(lora, lora.scaled(0.0)), rel=1e-12)
    # B M and M^-1 A rounded to float32 (u = 2^-24) change B A by <= 2 u cond(M) |B||A| (cond(M) < 3): ~1e-6 of
    # ||dW|| at most, plus the Gram form's cancellation noise, ~1.6e-7 of ||dW|| (see above)
    assert d < 1e-5 * scale


def test_doubly_prefixed_keys_from_a_peft_wrapped_unet(tmp_path, tiny_layout):
    from safetensors.numpy import save_file

    lora = random_lora(tiny_layout, seed=11)
    tensors = {}
    for m, l in lora.layers.items():
        tensors[f"unet.base_model.model.{m}.lora_A.weight"] = l.A
        tensors[f"unet.base_model.model.{m}.lora_B.weight"] = l.B
    save_file(tensors, str(tmp_path / "wrapped.safetensors"))
    rr = read_lora(tmp_path / "wrapped.safetensors")
    assert list(rr.lora.layers) == list(lora.layers)


def test_peft_text_encoder_adapter_is_its_text_encoder_part(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "te"
    folder.mkdir()
    key = "base_model.model.text_model.encoder.layers.0.self_attn.q_proj"
    factors = {f"{key}.lora_A.weight": np.ones((1, 4), np.float32), f"{key}.lora_B.weight": np.ones((4, 1), np.float32)}
    save_file(factors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1, "lora_alpha": 1}')
    assert list(read_lora(folder).lora.layers) == [f"text_encoder.{key.removeprefix('base_model.model.')}"]
    with pytest.raises(UnknownFormatError, match="no UNet part"):
        read_lora(folder, drop_text_encoder=True)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_files_of_one_header_read_the_same_by_the_compiled_plan(tiny_layout, tmp_path, fmt):
    """The first file of a header is parsed; from the second on a compiled plan gathers the vector straight from
    the body (fastread): every file must read as the parser reads it, alphas and values alike."""
    from w2w.formats import fastread

    files = []
    for i in range(4):
        lora = random_lora(tiny_layout, seed=300 + i)
        (f,) = write_lora(lora, tmp_path / f"m{i}", fmt)
        files.append(f)
    for f in files:
        vr = fastread.read_vector(f)
        want = flatten(read_lora(f).lora, vr.layout)
        assert np.array_equal(vr.vector, want)
    # made on the second file, used by the rest (whatever order safetensors wrote their metadata entries in)
    assert (fastread._header_digest(fastread.header_bytes(files[0].read_bytes())), None, False) in fastread._plans

"""The LoRA trainer on a tiny pipeline built in code: batched == one at a time; what it trains loads in diffusers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import TINY_UNET_CONFIG, build_pipeline, unet_out

from ingest.basemodel import BaseModel
from ingest.trainer import Identity, class_latents, get_recipe, train_batch
from w2w.formats import read_lora, write_lora


@pytest.fixture(scope="module")
def base() -> BaseModel:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    pipe = build_pipeline(UNet2DConditionModel(**TINY_UNET_CONFIG).eval())
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    return BaseModel("tiny/base", pipe, torch.device("cpu"), torch.float32)


def identities(n: int, res: int = 8, images: int = 3) -> list[Identity]:
    g = torch.Generator().manual_seed(123)
    return [Identity(f"id{i}", torch.rand(images, 3, res, res, generator=g) * 2 - 1) for i in range(n)]


def assert_same_loras(a, b, atol=2e-5):
    """Batched and single float32 runs add the same terms in another order (u = 2^-24 each). AdamW admits no
    elementwise bound from that (an element whose gradient rounds across zero may step 2 lr the other way), so this
    is an observed margin: measured differences are ~2e-7 on every CPU path tried (AVX-512, AVX2, SSE4.1, 1-3
    threads), 100x under atol; a mixed-up batch differs by ~lr = 1e-2."""
    assert a.lora.layers.keys() == b.lora.layers.keys()
    for k in a.lora.layers:
        np.testing.assert_allclose(a.lora.layers[k].A, b.lora.layers[k].A, atol=atol, rtol=1e-4)
        np.testing.assert_allclose(a.lora.layers[k].B, b.lora.layers[k].B, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("prior", [False, True])
def test_batched_training_equals_one_at_a_time(base, prior):
    recipe = replace(get_recipe("toy"), steps=4, batch_size=2, lr=1e-2)
    cls = None
    if prior:
        recipe = replace(recipe, prior_weight=1.0, class_images=3)
        cls = class_latents(base, recipe, steps=2)
        assert cls.shape[0] == 3
    ids = identities(3)
    batched = train_batch(base, ids, recipe, cls)
    alone = [train_batch(base, [i], recipe, cls)[0] for i in ids]
    for b, a in zip(batched, alone, strict=True):
        assert b.name == a.name
        assert_same_loras(b, a)
        np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4)  # means of float32 squares: ~1e-6 apart
    # identities differ, so their LoRAs do: the batch did not mix them up
    assert not np.allclose(
        batched[0].lora.layers[next(iter(batched[0].lora.layers))].B,
        batched[1].lora.layers[next(iter(batched[1].lora.layers))].B,
    )
    # the shared base model is left as it was: no adapter, no swapped layer
    assert not any("lora" in n for n, _ in base.unet.named_parameters())


def test_bf16_base_trains_float32_loras_both_ways():
    """A bf16 base (what `--dtype bf16` loads on a GPU): the LoRA factors stay float32 and learn, batched or not."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    pipe = build_pipeline(UNet2DConditionModel(**TINY_UNET_CONFIG).eval()).to(torch.bfloat16)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    bf16 = BaseModel("tiny/base", pipe, torch.device("cpu"), torch.bfloat16)
    recipe = replace(get_recipe("toy"), steps=3, batch_size=2, lr=1e-2, prior_weight=1.0, class_images=2)
    cls = class_latents(bf16, recipe, steps=2)
    ids = identities(2)
    batched = train_batch(bf16, ids, recipe, cls)
    alone = train_batch(bf16, ids[:1], recipe, cls)
    for r in (*batched, *alone):
        layer = next(iter(r.lora.layers.values()))
        assert layer.A.dtype == np.float32 and layer.B.dtype == np.float32
        assert np.abs(layer.B).max() > 0 and all(np.isfinite(r.losses))
    # Batched == one at a time is float32's test (above). In bf16 the two runs see the same samples, but a
    # batch of another shape takes other kernels (AVX2, AVX-512, AMX: each rounds its own way), so activations
    # differ by bf16 rounding: 8 mantissa bits, u = 2^-8 relative, ~sqrt(40) u = 2.4% through the UNet's ~40
    # roundings (random walk). A loss averages >= 256 such elements: ~2 * 2.4% / 16 = 3e-3 ~ u; 4u is the bound.
    # (Later steps also carry the factors' own difference, bounded as a whole below; measured: 0.1u.)
    np.testing.assert_allclose(batched[0].losses, alone[0].losses, rtol=4 * 2**-8)

    # The factors cannot be compared elementwise: AdamW moves every element by ~lr per step whatever its
    # gradient's size, so an element whose gradient is within rounding of zero may step the other way (2 lr,
    # 0.02 here). As a whole, each batched LoRA is still nearer its own identity's single run than any other's.
    def B(r) -> np.ndarray:  # B starts at zero: it is what training learned
        return np.concatenate([layer.B.ravel() for layer in r.lora.layers.values()])

    own = np.linalg.norm(B(batched[0]) - B(alone[0]))
    assert own < np.linalg.norm(B(batched[1]) - B(alone[0])), "the batch mixed the identities up"


def test_trained_lora_loads_in_diffusers_and_changes_the_output(base, tmp_path):
    recipe = replace(get_recipe("toy"), steps=5, batch_size=2)
    res = train_batch(base, identities(1), recipe)[0]
    assert res.lora.base_model == "tiny/base"
    assert all(np.any(l.B != 0) for l in res.lora.layers.values())
    assert res.lora.layout().describe()
    path = write_lora(res.lora, tmp_path / "id0.safetensors", "diffusers")[0]
    back = read_lora(path).lora
    for k, l in res.lora.layers.items():
        np.testing.assert_array_equal(back.layers[k].A, l.A)
        np.testing.assert_array_equal(back.layers[k].B, l.B)
    from diffusers import StableDiffusionPipeline

    pipe = base.pipe
    before = unet_out(pipe.unet)
    loaded = StableDiffusionPipeline(**pipe.components)
    loaded.load_lora_weights(str(path))
    after = unet_out(loaded.unet)
    assert (after - before).abs().max() > 1e-3  # the LoRA's effect (~0.15), far above UNet rounding (~7e-6)
    loaded.unload_lora_weights()
    assert torch.allclose(unet_out(loaded.unet), before, atol=1e-6)  # the same weights again: the same run


def test_frozen_a_stays_at_the_shared_initialisation_both_ways(base):
    """train_a=False (LoRA-FA): only B learns, so every identity keeps the same A, batched or through PEFT."""
    from ingest.trainer import initial_factors, target_modules

    recipe = replace(get_recipe("toy"), steps=3, batch_size=2, lr=1e-2, train_a=False)
    ids = identities(2)
    batched = train_batch(base, ids, recipe)
    alone = train_batch(base, ids[:1], recipe)[0]
    A0 = initial_factors(base.unet, target_modules(base.unet, recipe.targets), recipe.rank, recipe.seed)
    for r in (*batched, alone):
        for m, layer in r.lora.layers.items():
            np.testing.assert_array_equal(layer.A, A0[m].numpy())
    assert_same_loras(batched[0], alone)
    assert any(np.abs(layer.B).max() > 0 for layer in alone.lora.layers.values())  # B did learn

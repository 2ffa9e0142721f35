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
        np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4)
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
    assert_same_loras(batched[0], alone[0], atol=5e-3)  # bf16 activations: equal to bf16 rounding


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
    assert not torch.allclose(before, after, atol=1e-6)
    loaded.unload_lora_weights()
    assert torch.allclose(unet_out(loaded.unet), before, atol=1e-6)

"""Shared fixtures: a tiny UNet, its w2w-preset layout, and a tiny real StableDiffusionPipeline.

Plain helpers (random_lora, apply_lora, ...) live in tests/helpers.py: `from helpers import random_lora`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

# Never reach for the hub: everything is built in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402, F401  (re-exported for tests that import from conftest)
    TINY_ALPHA,
    TINY_RANK,
    TINY_UNET_CONFIG,
    W2W_TARGETS,
    apply_lora,
    build_pipeline,
    random_lora,
    tiny_tokenizer,
)

from w2w.presets import unet_layout  # noqa: E402


@pytest.fixture(scope="session")
def tiny_layout():
    """The w2w preset's targets on the tiny UNet, rank 2, alpha 3 (alpha != rank deliberately)."""
    return unet_layout(TINY_UNET_CONFIG, W2W_TARGETS, rank=TINY_RANK, alpha=TINY_ALPHA)


@pytest.fixture(scope="session")
def base_unet():
    """A tiny UNet2DConditionModel with seeded random weights. Treat as read-only: deepcopy to modify."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    unet.requires_grad_(False)
    return unet


@pytest.fixture(scope="session")
def _session_pipe(base_unet):
    return build_pipeline(copy.deepcopy(base_unet))


@pytest.fixture
def sd_pipe(_session_pipe, base_unet):
    """The session's tiny StableDiffusionPipeline (UNet = a copy of base_unet), LoRA-free on entry and exit."""
    yield _session_pipe
    _session_pipe.unload_lora_weights()
    # unloading must leave the UNet exactly as it was, or later tests would see a stale adapter
    base = base_unet.state_dict()
    now = _session_pipe.unet.state_dict()
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline saved as a diffusers folder: a --base-model for ingest and invert."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    pipe = build_pipeline(UNet2DConditionModel(**TINY_UNET_CONFIG).eval())
    out = tmp_path_factory.mktemp("tiny-base")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def faces(tmp_path_factory) -> Path:
    """A toy-faces dataset of 5 identities, 3 images each."""
    from ingest import toyfaces

    return toyfaces.make_dataset(tmp_path_factory.mktemp("faces") / "ds", identities=5, images=3, seed=0)

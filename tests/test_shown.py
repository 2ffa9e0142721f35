"""ingest.shown: a model's attributes as the detector's majority over images of several seeds (toy base)."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.basemodel import TOY_BASE_DIR

pytestmark = pytest.mark.skipif(
    not (TOY_BASE_DIR / "model_index.json").exists(), reason="the embedded base model is not built"
)


@pytest.fixture(scope="module")
def world():
    from ingest import toy_population
    from ingest.basemodel import load_base
    from w2w.flatten import unflatten

    base = load_base(None)
    pop = toy_population.load()
    V = toy_population.registered_vectors(pop.vectors[:3], base)
    layout = toy_population.toy_layout(base)
    return base, [unflatten(v.astype(np.float32), layout) for v in V]


def test_one_seed_is_the_detector_on_that_seeds_images(world):
    from ingest.detector import detect_bool
    from ingest.generate import generate_each
    from ingest.shown import GUIDANCE, shown

    base, loras = world
    found, images = shown(base, loras, seeds=(5,))
    alone = generate_each(base, loras, seed=5, guidance=GUIDANCE)
    assert np.array_equal(images, alone)  # the same pipeline run on the same noise: the same bytes
    assert {a: v.tolist() for a, v in found.items()} == {a: v.tolist() for a, v in detect_bool(alone).items()}


def test_several_seeds_give_the_majority_and_the_first_seeds_images(world):
    from ingest.detector import detect_bool
    from ingest.generate import generate_each
    from ingest.shown import GUIDANCE, shown

    base, loras = world
    found, images = shown(base, loras, seeds=(2, 3, 4))
    votes = [detect_bool(generate_each(base, loras, seed=s, guidance=GUIDANCE)) for s in (2, 3, 4)]
    for a, v in found.items():
        assert v.tolist() == [sum(x[a][i] for x in votes) >= 2 for i in range(len(loras))]
    assert np.array_equal(images, generate_each(base, loras, seed=2, guidance=GUIDANCE))


def test_the_guidance_is_the_one_images_are_drawn_at(world):
    """GUIDANCE 1 runs the prompt alone (no unconditional branch); another guidance draws other images, and
    passing it gives generate_each's images at that guidance."""
    from ingest.generate import generate_each
    from ingest.shown import GUIDANCE, shown

    base, loras = world
    assert GUIDANCE == 1.0
    _, at_3 = shown(base, loras, seeds=(2,), guidance=3.0)
    assert np.array_equal(at_3, generate_each(base, loras, seed=2, guidance=3.0))
    _, default = shown(base, loras, seeds=(2,))
    assert np.abs(default.astype(int) - at_3.astype(int)).mean() > 1  # levels of 255: another picture


def test_no_models_and_even_seed_counts(world):
    from ingest.shown import shown

    base, loras = world
    found, images = shown(base, [])
    assert all(v.shape == (0,) for v in found.values()) and len(images) == 0
    with pytest.raises(AssertionError, match="odd number of seeds"):
        shown(base, loras, seeds=(2, 3))

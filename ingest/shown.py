"""What a model shows: the attribute detector's majority verdict over images from several noises.

One image is a noisy reading of a toy-world LoRA: on the population's identities, one noise and the next agree
on whether an attribute shows only 60-84% of the time (bench/bench_fidelity.py), so a verdict from one image
counts an identity that shows an attribute on half the noises as having it or not by the draw, and an edit as
changing it when the draw changes. The demo and the bench read every model through `shown`.
"""

from __future__ import annotations

import numpy as np

from ingest.basemodel import BaseModel
from w2w.lora import LoRA

SEEDS = (2, 3, 4)  # the demo sheet's seed first; an odd count, so that a majority is never a tie


def shown(
    base: BaseModel, loras: list[LoRA], seeds: tuple[int, ...] = SEEDS
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({attribute: (n,) bool}, the images (n, H, W, 3) of the first seed): whether the detector finds each
    attribute in most of the images of each model, one image per seed."""
    from ingest import detector
    from ingest.generate import generate_each
    from ingest.toyfaces import ATTRIBUTES

    assert len(seeds) % 2 == 1, f"an odd number of seeds gives a majority, got {seeds}"
    if not loras:
        return {a: np.zeros(0, dtype=bool) for a in ATTRIBUTES}, np.zeros((0, base.resolution, base.resolution, 3))
    images = [generate_each(base, loras, seed=s) for s in seeds]
    votes = [detector.detect_bool(im) for im in images]
    return {a: np.sum([v[a] for v in votes], axis=0) * 2 > len(seeds) for a in votes[0]}, images[0]

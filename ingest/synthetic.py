"""Synthetic LoRA populations with planted structure, for the tour, tests and benchmarks.

vector = mean + U @ (sigma * z) + noise, with z ~ N(0, I_latent); binary attributes are signs of fixed
linear functions of z, and `age` a number. Like real w2w models, every LoRA shares one A
initialisation plus a small per-identity change, while B carries most of the identity.
Models are generated one at a time from their index (seeded), so any N fits in memory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2w.flatten import unflatten
from w2w.formats import write_lora
from w2w.layout import Layout

ATTRIBUTES = ("glasses", "beard", "smile", "hat")


@dataclass
class Population:
    layout: Layout
    latent: int = 8
    seed: int = 0
    noise: float = 0.002

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        D = self.layout.dim
        a_mask = np.zeros(D, dtype=bool)
        for e, start in zip(self.layout.entries, self.layout.offsets, strict=True):
            a_mask[start : start + e.a_size] = True
        self.mean = np.where(a_mask, rng.standard_normal(D) * 0.05, 0.0).astype(np.float32)  # shared A init
        scale = np.where(a_mask, 0.002, 0.01).astype(np.float32)  # A moves little, B carries the identity
        U = rng.standard_normal((D, self.latent)).astype(np.float32)
        self.basis = (U / np.linalg.norm(U, axis=0)) * scale[:, None] * np.sqrt(D)  # (D, latent)
        self.attr_weights = rng.standard_normal((len(ATTRIBUTES), self.latent))  # (attrs, latent)

    def latent_of(self, i: int) -> np.ndarray:
        return np.random.default_rng((self.seed, i)).standard_normal(self.latent)

    def vector(self, i: int) -> np.ndarray:
        z = self.latent_of(i)
        noise = np.random.default_rng((self.seed, i, 1)).standard_normal(self.layout.dim).astype(np.float32)
        return (self.mean + self.basis @ z.astype(np.float32) + self.noise * noise).astype(np.float32)

    def attributes(self, i: int) -> dict[str, float | bool]:
        z = self.latent_of(i)
        out: dict[str, float | bool] = {a: bool(s > 0) for a, s in zip(ATTRIBUTES, self.attr_weights @ z, strict=True)}
        out["age"] = float(np.round(35 + 10 * z[0], 1))
        return out

    def write(
        self,
        out_dir: Path,
        n: int,
        formats: tuple[str, ...] = ("diffusers",),
        prefix: str = "identity",
        base_model: str | None = None,
    ) -> Path:
        """Write n LoRA files (cycling through `formats`) and attributes.csv; returns the CSV path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = out_dir / "attributes.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name", *ATTRIBUTES, "age"])
            for i in range(n):
                name = f"{prefix}_{i:05d}"
                lora = unflatten(self.vector(i), self.layout, base_model)
                fmt = formats[i % len(formats)]
                target = out_dir / (name if fmt == "peft" else f"{name}.safetensors")
                write_lora(lora, target, fmt)
                attrs = self.attributes(i)
                w.writerow([name, *[str(attrs[a]).lower() for a in ATTRIBUTES], attrs["age"]])
        return csv_path

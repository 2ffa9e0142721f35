"""The toy population: many toy-face identity LoRAs trained once, shipped as a small asset.

The toy world's equivalent of the paper's 64,974-model release: `POPULATION` identities (toy faces of
seed `FACE_SEED`, none of them the demo's own) trained with the toy recipe on the embedded base model,
stored as fp16 vectors with each identity's attributes. The demo imports them beside the identities it
trains live, so the fitted space, its directions and its sampling statistics are the population's.

    python -m ingest.toy_population train --work /tmp/pop --part 0/2   # resumable, in chunks
    python -m ingest.toy_population train --work /tmp/pop --part 1/2   # (another core)
    python -m ingest.toy_population pack --work /tmp/pop               # -> ingest/assets/toy-population.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest import toyfaces
from w2w.errors import DatasetError, W2WError
from w2w.flatten import unflatten
from w2w.layout import Layout
from w2w.lora import LoRA, LoRALayer

ASSET = Path(__file__).parent / "assets" / "toy-population.safetensors"
FACE_SEED = 1  # the demo's identities and held-out faces are drawn from seed 0
IMAGES = 8  # per identity, as the demo's
CHUNK = 16  # identities trained together (one batched run)


def population_faces(n: int, seed: int = FACE_SEED) -> list[toyfaces.Face]:
    """The population's identities, named pop-NNNN (so they never collide with a dataset's face-NNNN)."""
    return [dataclasses.replace(f, name=f"pop-{i:04d}") for i, f in enumerate(toyfaces.random_faces(n, seed))]


def train_chunk(base, faces: list[toyfaces.Face], first: int, recipe, seed: int = FACE_SEED) -> np.ndarray:
    """The trained vectors (n, D) float32 of `faces` (population indices first..), as `w2wreg ingest` trains them."""
    from ingest.trainer import Identity, to_tensor, train_batch
    from w2w.flatten import flatten

    idents = []
    for j, f in enumerate(faces):
        rng = np.random.default_rng((seed, first + j))  # as toyfaces.make_dataset renders identity i
        imgs = np.stack([toyfaces.render(f, base.resolution, rng) for _ in range(IMAGES)])
        idents.append(Identity(f.name, to_tensor(imgs, base.resolution)))
    return np.stack([flatten(r.lora) for r in train_batch(base, idents, recipe)])


# --- the asset -------------------------------------------------------------------------------------


@dataclass
class Population:
    """The shipped population: vectors (n, D) float32 (stored fp16), attributes (n, len(ATTRIBUTES)) bool."""

    vectors: np.ndarray
    attributes: np.ndarray
    meta: dict
    sha256: str  # of the asset file

    @property
    def names(self) -> list[str]:
        return [population_name(i) for i in range(len(self.vectors))]

    def labels(self, i: int) -> dict[str, bool]:
        return {a: bool(v) for a, v in zip(toyfaces.ATTRIBUTES, self.attributes[i], strict=True)}


def population_name(i: int) -> str:
    return f"pop-{i:04d}"


def trained_layout(base) -> Layout:
    """The layout of a toy-recipe LoRA as trained on `base` (rank-1 factors): what the asset's vectors hold."""
    from ingest.trainer import get_recipe, target_modules

    recipe = get_recipe("toy")
    layers = {
        m: LoRALayer(
            np.zeros((recipe.rank, base.unet.get_submodule(m).in_features), np.float32),
            np.zeros((base.unet.get_submodule(m).out_features, recipe.rank), np.float32),
            float(recipe.alpha),
        )
        for m in target_modules(base.unet, recipe.targets)
    }
    return LoRA(layers).layout()


def toy_layout(base) -> Layout:
    """The layout toy-recipe LoRAs are registered in (`Recipe.registered`: the shared frame)."""
    from ingest.trainer import get_recipe

    return (
        get_recipe("toy")
        .registered(unflatten(np.zeros(trained_layout(base).dim, np.float32), trained_layout(base)))
        .layout()
    )


def registered_vectors(V: np.ndarray, base) -> np.ndarray:
    """Asset vectors (n, D_trained) -> the vectors (n, D) their LoRAs are registered as (float32)."""
    from ingest.trainer import get_recipe
    from w2w.flatten import flatten

    recipe, layout = get_recipe("toy"), trained_layout(base)
    return np.stack([flatten(recipe.registered(unflatten(np.asarray(v, np.float32), layout))) for v in V])


def base_fingerprint() -> str:
    """sha256 of the embedded base model's UNet weights: population vectors only mean something on it."""
    from ingest.basemodel import TOY_BASE_DIR

    return hashlib.sha256((TOY_BASE_DIR / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def pack(work: Path, out: Path = ASSET, identities: int | None = None) -> Path:
    """Assemble the trained chunks of `work` (a contiguous prefix of the population) into the asset."""
    from ingest.basemodel import load_base
    from ingest.trainer import get_recipe
    from w2w.formats.tensorfile import atomic_write_safetensors

    chunks = []
    for first in range(0, identities or 10**9, CHUNK):
        path = Path(work) / f"chunk-{first:05d}.npy"
        if not path.exists():
            break
        chunks.append(np.load(path))
    if not chunks:
        raise DatasetError(Path(work), "holds no trained chunk (chunk-00000.npy)", "run `train` first")
    V = np.concatenate(chunks)[:identities]
    faces = population_faces(len(V))
    Y = np.array([[f.has(a) for a in toyfaces.ATTRIBUTES] for f in faces], dtype=np.uint8)
    base = load_base(None)
    layout = trained_layout(base)
    assert V.shape[1] == layout.dim, f"chunks hold vectors of D={V.shape[1]}, the toy layout has D={layout.dim}"
    assert np.abs(V).max() < 6e4, "a factor beyond fp16's range"
    import torch

    meta = {
        "made_by": "python -m ingest.toy_population train && python -m ingest.toy_population pack",
        "identities": str(len(V)),
        "face_seed": str(FACE_SEED),
        "images": str(IMAGES),
        "chunk": str(CHUNK),
        "recipe": json.dumps(get_recipe("toy").describe()),
        "base_model": base.ref,
        "base_unet_sha256": base_fingerprint(),
        "layout_fingerprint": layout.fingerprint,
        "attributes": json.dumps(list(toyfaces.ATTRIBUTES)),
        "torch": torch.__version__,
    }
    atomic_write_safetensors(Path(out), {"vectors": V.astype(np.float16), "attributes": Y}, meta)
    return Path(out)


def load(path: Path = ASSET) -> Population:
    """The shipped population, checked against the embedded base model and the toy-faces attributes."""
    from w2w.formats.tensorfile import parse_safetensors

    path = Path(path)
    hint = "rebuild it with `python -m ingest.toy_population train` and `pack`"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(path, f"cannot be read ({e.strerror})", hint) from None
    try:
        arrays, meta, _ = parse_safetensors(data, path)
        V, Y = arrays["vectors"], arrays["attributes"]
    except (W2WError, KeyError) as e:
        raise DatasetError(path, f"is not a toy population ({e})", hint) from None
    if json.loads(meta.get("attributes", "[]")) != list(toyfaces.ATTRIBUTES):
        raise DatasetError(path, f"labels {meta.get('attributes')}, not {list(toyfaces.ATTRIBUTES)}", hint)
    if meta.get("base_unet_sha256") != base_fingerprint():
        raise DatasetError(path, "was trained on another toy base model than the embedded one", hint)
    if V.ndim != 2 or Y.shape != (len(V), len(toyfaces.ATTRIBUTES)):
        raise DatasetError(path, f"holds vectors {V.shape} and attributes {Y.shape}: they do not match", hint)
    return Population(V.astype(np.float32), Y.astype(bool), meta, hashlib.sha256(data).hexdigest())


def import_into(reg, population: Population, limit: int | None = None) -> dict:
    """Register the first `limit` population identities (kind 'trained', their attributes, lineage to the asset)."""
    from ingest.basemodel import load_base
    from registry.registry import NewModel

    base = load_base(None)
    if trained_layout(base).fingerprint != population.meta.get("layout_fingerprint"):
        raise DatasetError(ASSET, "is laid out for another toy recipe", "rebuild it with this one")
    n = min(limit or len(population.vectors), len(population.vectors))
    layout, V = toy_layout(base), registered_vectors(population.vectors[:n], base)
    params = {
        "asset": ASSET.name,
        "asset_sha256": population.sha256,
        "recipe": "toy",
        "face_seed": population.meta.get("face_seed"),
    }
    items = [
        NewModel(
            population_name(i),
            V[i],
            layout,
            base_model=base.ref,
            kind="trained",
            source=f"toy-population:{population.sha256[:16]}:{i}",
            source_format="toy-population",
            attributes=population.labels(i),
            lineage=[(None, "train", params | {"index": i})],
        )
        for i in range(n)
    ]
    report = reg.add_models(items)
    return {"added": len(report.added), "skipped": len(report.skipped), "identities": n, "sha256": population.sha256}


def _train(args) -> None:
    import torch

    from ingest.basemodel import load_base
    from ingest.trainer import get_recipe

    torch.set_num_threads(args.threads)
    part, parts = (int(x) for x in args.part.split("/"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, recipe = load_base(None), get_recipe("toy")
    faces = population_faces(args.identities)
    t0 = time.perf_counter()
    for c, first in enumerate(range(0, args.identities, CHUNK)):
        path = work / f"chunk-{first:05d}.npy"
        if c % parts != part or path.exists():
            continue
        V = train_chunk(base, faces[first : first + CHUNK], first, recipe)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, V)
        tmp.replace(path)
        print(f"identities {first}..{first + len(V) - 1} done ({time.perf_counter() - t0:.0f}s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ingest.toy_population")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", required=True)
    t.add_argument("--identities", type=int, default=1024)
    t.add_argument("--part", default="0/1")
    t.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("pack")
    k.add_argument("--work", required=True)
    k.add_argument("--identities", type=int)
    args = p.parse_args(argv)
    if args.cmd == "train":
        _train(args)
    elif args.cmd == "pack":
        print(f"wrote {pack(Path(args.work), identities=args.identities)}")


if __name__ == "__main__":
    main()

"""`w2wreg ingest`: train one LoRA per identity of a dataset and register each, in-process or over Dask.

Identities are independent tasks, B at a time (`--batch-identities`). Each finished batch is registered
(one all-or-nothing add) as it arrives, so a run that is killed keeps what it finished, and a rerun skips
identities already registered with the same images (name + sha256 of its images). One batch failing is
reported and the others go on. Workers load the base model once (ingest.basemodel caches it per process).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ingest.dataset import IdentityData, load_dataset
from ingest.trainer import Recipe, TrainResult
from w2w.errors import W2WError

KIND = "trained"


@dataclass
class IngestReport:
    dataset: str
    base_model: str
    recipe: dict
    added: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # already registered
    failed: list[tuple[str, str]] = field(default_factory=list)
    pushed: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds_per_identity: float | None = None

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "base_model": self.base_model,
            "recipe": self.recipe,
            "added": [{"name": n, "id": i} for n, i in self.added],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "failed": [{"name": n, "error": e} for n, e in self.failed],
            "pushed": self.pushed,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 2),
            "train_seconds_per_identity": self.train_seconds_per_identity,
        }


# --- what runs on a worker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to train a batch: plain data, so it travels to Dask workers."""

    base_model: str | None
    device: str
    dtype: str
    recipe: Recipe
    class_cache: str | None
    threads: int | None = None


def read_images(paths: list[Path]) -> list[np.ndarray]:
    """uint8 RGB arrays at their own size (EXIF-rotated): the trainer resizes and crops."""
    from PIL import Image, ImageOps

    from w2w.errors import DatasetError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(p, f"is not a readable image ({e})", "replace or remove it") from None
    return out


def train_identities(job: Job, batch: list[tuple[str, list[str]]]) -> list[TrainResult]:
    """Train the LoRAs of a batch of (name, image paths); the base model is loaded once per process."""
    import torch

    from ingest.basemodel import load_base
    from ingest.trainer import Identity, class_latents, to_tensor, train_batch

    if job.threads:
        torch.set_num_threads(job.threads)
    base = load_base(job.base_model, job.device, job.dtype)
    res = job.recipe.resolution or base.resolution
    cls = None
    if job.recipe.prior_weight:
        cls = class_latents(base, job.recipe, Path(job.class_cache) if job.class_cache else None)
    identities = [Identity(name, to_tensor(read_images([Path(p) for p in paths]), res)) for name, paths in batch]
    return train_batch(base, identities, job.recipe, cls)


# --- the run ---------------------------------------------------------------------------------------


def registered(reg) -> dict[str, tuple[int, str | None, str]]:
    """name -> (id, source_sha256, kind) of every model, to decide what a rerun skips."""
    with reg.catalog.connect() as con:
        rows = con.execute("SELECT name, id, source_sha256, kind FROM models").fetchall()
    return {n: (i, s, k) for n, i, s, k in rows}


def class_cache_dir(reg, base_ref: str, recipe: Recipe) -> Path:
    key = json.dumps([base_ref, recipe.class_prompt, recipe.resolution, recipe.seed], sort_keys=True)
    return reg.root / "cache" / "class-images" / hashlib.sha256(key.encode()).hexdigest()[:16]


def plan(reg, identities: list[IdentityData], force_names: bool = False) -> tuple[list[IdentityData], list, list]:
    """(to train, skipped, failed): skip identities registered from the same images; refuse name clashes."""
    have = registered(reg)
    todo, skipped, failed = [], [], []
    for ident in identities:
        hit = have.get(ident.name)
        if hit is None:
            todo.append(ident)
        elif hit[1] == ident.digest:
            skipped.append((ident.name, f"already registered (model {hit[0]}) from the same images"))
        else:
            failed.append(
                (
                    ident.name,
                    f"a model named {ident.name!r} is already registered (model {hit[0]}, {hit[2]}) "
                    "from other images; rename the identity folder to train it as a new model",
                )
            )
    return todo, skipped, failed


def run_ingest(
    reg,
    dataset: Path,
    recipe: Recipe,
    *,
    base_model: str | None = None,
    batch_identities: int = 1,
    workers: int | None = None,
    scheduler: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    push_to: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    on_batch: Callable[[list[TrainResult]], None] | None = None,
) -> IngestReport:
    """Train and register every identity of `dataset` not registered yet (see the module docstring)."""
    from ingest.basemodel import resolve_base

    t_start = time.perf_counter()
    dataset = Path(dataset)
    identities = load_dataset(dataset)  # validated before anything trains
    _, base_ref = resolve_base(base_model)
    report = IngestReport(str(dataset), base_ref, recipe.describe())
    todo, report.skipped, report.failed = plan(reg, identities)
    if limit is not None:
        todo = todo[:limit]
    by_name = {i.name: i for i in todo}
    job = Job(
        base_model,
        device,
        dtype,
        recipe,
        str(class_cache_dir(reg, base_ref, recipe)) if recipe.prior_weight else None,
    )
    batches = [todo[i : i + batch_identities] for i in range(0, len(todo), max(1, batch_identities))]
    payloads = [[(i.name, [str(p) for p in i.images]) for i in b] for b in batches]
    train_seconds: list[float] = []

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="training", unit="identity", disable=not progress or not todo)
    try:
        for names, outcome in _execute(job, payloads, workers, scheduler):
            if isinstance(outcome, BaseException):
                msg = str(outcome) if isinstance(outcome, W2WError) else f"{type(outcome).__name__}: {outcome}"
                report.failed += [(n, msg) for n in names]
                bar.update(len(names))
                continue
            _register(reg, outcome, by_name, base_ref, dataset, recipe, report, push_to)
            train_seconds += [r.seconds for r in outcome]
            if on_batch:
                on_batch(outcome)
            bar.update(len(names))
            bar.set_postfix(loss=f"{np.mean([r.losses[-1] for r in outcome]):.3f}", refresh=False)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t_start
    report.train_seconds_per_identity = float(np.mean(train_seconds)) if train_seconds else None
    return report


def _execute(job: Job, payloads: list, workers: int | None, scheduler: str | None) -> Iterator[tuple[list, object]]:
    """(names, results or the exception) per batch, as batches finish."""
    if not payloads:
        return
    if workers is None and scheduler is None:
        for p in payloads:
            names = [n for n, _ in p]
            try:
                yield names, train_identities(job, p)
            except (W2WError, RuntimeError, ValueError, OSError) as e:
                yield names, e
        return
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
        job = Job(job.base_model, job.device, job.dtype, job.recipe, job.class_cache, threads)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(scheduler or cluster)
    try:
        futures = {client.submit(train_identities, job, p, pure=False): [n for n, _ in p] for p in payloads}
        for fut in as_completed(futures):
            names = futures[fut]
            try:
                yield names, fut.result()
            except Exception as e:  # a worker's error arrives re-raised here; one batch must not stop the rest
                yield names, e
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _register(reg, results: list[TrainResult], by_name, base_ref, dataset, recipe, report, push_to) -> None:
    from registry.registry import NewModel

    items = []
    for r in results:
        ident = by_name[r.name]
        params = {
            "recipe": recipe.name,
            "steps": recipe.steps,
            "seed": recipe.seed,
            "images": len(ident.images),
            "images_sha256": ident.digest,
            "final_loss": round(r.losses[-1], 6) if r.losses else None,
            "seconds": round(r.seconds, 2),
        }
        items.append(
            NewModel.from_lora(
                r.name,
                recipe.registered(r.lora),
                base_model=base_ref,
                kind=KIND,
                source=f"ingest:{dataset.resolve() / r.name}",
                source_format="trained",
                source_sha256=ident.digest,
                attributes=dict(ident.attributes),
                lineage=[(None, "train", params)],
            )
        )
    added = reg.add_models(items)
    report.failed += [(w, e) for w, e in added.errors]
    report.skipped += added.skipped
    report.warnings += added.warnings
    report.added += added.added
    if push_to and added.added:
        for name, model_id in added.added:
            report.pushed.append(reg.push(model_id, f"{push_to}{name}"))

"""Importing existing LoRAs: files, PEFT adapter folders, folders of many, and hub repos.

Files are read on a small thread pool (reading and hashing release the GIL) and handed to
Registry.add_models in order; nothing is written until every input has been read and checked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ingest.attributes import read_csv
from registry.registry import AddReport, Failure, NewModel, Registry
from registry.sketches import NEAR_THRESHOLD
from w2w.errors import AttributeInputError, HubError, W2WError
from w2w.formats import discover
from w2w.formats import peft as peft_format
from w2w.formats.fastread import read_vector

HUB_PREFIX = "hub:"


def default_name(path: Path) -> str:
    """A model's name from its path: the file's stem, or for a generic file name (or an adapter folder) the
    folder's name; in the Hugging Face cache (models--NS--NAME/snapshots/<commit>/) the repo's NAME."""
    path = Path(path)
    if path.is_file() and path.name not in (peft_format.WEIGHTS, "pytorch_lora_weights.safetensors"):
        return path.stem
    folder = path.parent if path.is_file() else path
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]  # the Hub forbids "--" inside a name
    return folder.name


def distinct_names(sources: list[tuple[Path, str, str | None]]) -> list[tuple[Path, str, str | None]]:
    """Files of one add whose default names collide (a/lora.safetensors, b/lora.safetensors) are named after
    their folders too (a.lora, b.lora); if that still collides, numbered."""
    counts: dict[str, int] = {}
    for _, name, _ in sources:
        counts[name] = counts.get(name, 0) + 1
    out, taken = [], {name for name, n in counts.items() if n == 1}
    for path, name, source in sources:
        if counts[name] > 1:
            p = Path(path)
            named_by = p if p.is_dir() or p.stem == name else p.parent  # what default_name took the name from
            parent = named_by.parent.name
            candidate, i = f"{parent}.{name}" if parent else name, 1
            while candidate in taken:
                i += 1
                candidate = f"{parent}.{name}-{i}" if parent else f"{name}-{i}"
            name = candidate
            taken.add(name)
        out.append((path, name, source))
    return out


def import_paths(
    registry: Registry,
    paths: list[Path | str],
    name: str | None = None,
    attributes: dict | None = None,
    attrs_csv: Path | None = None,
    base_model: str | None = None,
    allow_pickle: bool = False,
    drop_text_encoder: bool = False,
    skip_errors: bool = False,
    progress: bool = False,
    workers: int = 4,
    on_near_copy: str = "keep",
    near_threshold: float = NEAR_THRESHOLD,
) -> AddReport:
    """Import LoRAs from files and folders. `hub:NS/NAME[@REV]` entries import from the local hub."""
    hub_refs = [str(p) for p in paths if str(p).startswith(HUB_PREFIX)]
    files: list[Path] = []
    for p in paths:
        if not str(p).startswith(HUB_PREFIX):
            files.extend(discover(Path(p)))
    sources: list[tuple[Path, str, str | None]] = [(f, default_name(f), None) for f in files]
    for ref in hub_refs:
        sources.append(_hub_source(registry, ref[len(HUB_PREFIX) :]))
    sources = distinct_names(sources)
    if name and len(sources) != 1:
        raise AttributeInputError(f"--name names one model, but {len(sources)} LoRAs were given")
    table = read_csv(attrs_csv, registry.catalog.attribute_keys()) if attrs_csv else {}
    if table:
        unknown = sorted(set(table) - {name or n for _, n, _ in sources})
        if unknown:
            raise AttributeInputError(
                f"{attrs_csv}: names {len(unknown)} models that are not being added, e.g. {unknown[0]!r}"
            )

    def read_one(src: tuple[Path, str, str | None]) -> NewModel | Failure:
        path, default, hub_source = src
        try:
            vr = read_vector(
                path, base_model=base_model, allow_pickle=allow_pickle, drop_text_encoder=drop_text_encoder
            )
            model_name = name or default
            item = NewModel(
                model_name, vr.vector, vr.layout, vr.base_model, source=hub_source or str(path),
                source_format=vr.format, source_sha256=vr.sha256, meta=vr.meta,
                source_dtype=vr.meta.get("source_dtype"), source_kind=vr.meta.get("source_kind"),
                attributes={**table.get(model_name, {}), **(attributes or {})},
            )  # fmt: skip
            return item.digest()
        except W2WError as e:
            return Failure(str(path), e)

    def items() -> Iterator[NewModel | Failure]:
        # A bounded read-ahead, in input order: the pool reads and hashes the next few files while the
        # registry stages the current one, and memory holds a window of models, never all of them.
        window = 4 * max(1, workers)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending: deque = deque()
            for src in sources:
                pending.append(pool.submit(read_one, src))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    bar = tqdm(total=len(sources), unit="lora", desc="adding", disable=not progress, leave=False, delay=0.5)
    try:
        return registry.add_models(
            items(),
            skip_errors=skip_errors,
            on_item=lambda: bar.update(1),
            on_near_copy=on_near_copy,
            near_threshold=near_threshold,
        )
    finally:
        bar.close()


def _hub_source(registry: Registry, spec: str) -> tuple[Path, str, str]:
    """(weights path, default name, source label) of `NS/NAME[@REV]` on the registry's local hub."""
    repo_id, _, revision = spec.partition("@")
    folder, rev = registry.hub.download(repo_id, revision or None)
    if peft_format.is_adapter_dir(folder):
        weights = folder
    else:
        candidates = sorted(folder.glob("*.safetensors"))
        preferred = [c for c in candidates if c.name == "pytorch_lora_weights.safetensors"]
        if not (preferred or len(candidates) == 1):
            raise HubError(
                f"hub repo {repo_id!r} holds {len(candidates)} .safetensors files and none is "
                "pytorch_lora_weights.safetensors"
            )
        weights = (preferred or candidates)[0]
    return weights, repo_id.split("/")[1], f"hub:{registry.hub.name}/{repo_id}@{rev}"

"""A push is an ingest: the LoRA in a commit becomes a registered model of the server's registry.

The LoRA is checked before the commit is made (a file that is not a readable LoRA refuses the commit),
and registered after it; a server that stopped in between registers it at its next start
(`catch_up`), so the registry always ends up with the head of every repo.

The index follows the repo: a later commit that changes only the card updates the model's attributes; a
moved repo's models follow it (their source names the new repo); a deleted repo's models stay (their
vectors are parents of others) with a source that says so, as readable as the repo was.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from registry.hubs.store import Commit, RepoStore, RevisionNotFound
from registry.model_card import parse_front_matter
from registry.registry import NewModel, Registry, validate_attributes
from w2w.errors import HubError, W2WError
from w2w.formats.fastread import VectorRead, read_vector
from w2w.formats.tensorfile import atomic_write_bytes

log = logging.getLogger("w2wreg.serve")

# the files a LoRA repo keeps its weights in (diffusers, PEFT); other .safetensors files are stored only
LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
SOURCE_PREFIX = "hub:serve/"
# a model whose repo was deleted: readable by all (the repo was public) or by its namespace's writers
DELETED_PREFIX = "hub:serve-deleted/"
DELETED_PRIVATE_PREFIX = "hub:serve-deleted-private/"


def lora_path(paths) -> str | None:
    """The path of a repo's LoRA weights among `paths`, if it has one (top level or one folder down)."""
    for name in LORA_FILES:
        for p in sorted(paths, key=lambda p: (p.count("/"), p)):
            if p == name or (p.endswith("/" + name) and p.count("/") == 1):
                return p
    return None


def read_lora_bytes(path_in_repo: str, data: bytes, adapter_config: bytes | None = None) -> VectorRead:
    """Parse pushed weights as a LoRA (raises W2WError naming the file in the repo)."""
    with tempfile.TemporaryDirectory(prefix="w2wreg-push-") as tmp:
        name = Path(path_in_repo).name
        if name == "adapter_model.safetensors" and adapter_config is not None:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            (folder / name).write_bytes(data)
            (folder / "adapter_config.json").write_bytes(adapter_config)
            target = folder
        else:
            target = Path(tmp) / name
            target.write_bytes(data)
        try:
            return read_vector(target)
        except W2WError as e:
            raise W2WError(f"{path_in_repo}: not a LoRA this registry can index ({_strip(str(e), tmp)})") from None


def _strip(msg: str, tmp: str) -> str:
    return msg.replace(str(Path(tmp)) + "/", "")


def card_of(store: RepoStore, commit: Commit) -> dict:
    """The YAML front matter of the commit's README.md ({} without one, or when it is not a readable mapping)."""
    entry = commit.files.get("README.md")
    if entry is None:
        return {}
    try:
        card = parse_front_matter(store.read(entry).decode("utf-8", "replace"))
    except (yaml.YAMLError, ValueError):  # a card that is not YAML, or nested too deep: no card
        return {}
    return card if isinstance(card, dict) else {}


def model_name(repo_id: str, commit: Commit, reg: Registry) -> str:
    """`ns.name` for a repo's first model (a bare name in `mix` expressions when the repo id has no '-');
    a later revision with new weights, or a name already taken, gets the commit's short oid appended."""
    base = repo_id.replace("/", ".")
    try:
        reg.get(base)
    except W2WError:
        return base
    return f"{base}.{commit.oid[:8]}"


@dataclass
class IndexResult:
    model: str | None = None
    model_id: int | None = None
    duplicate_of: str | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def index_commit(reg: Registry, store: RepoStore, repo_id: str, commit: Commit) -> IndexResult | None:
    """Register the LoRA of `commit` (None when the repo holds none). Caller holds the registry lock."""
    path = lora_path(commit.files)
    if path is None:
        return None
    folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    cfg = commit.files.get(folder + "adapter_config.json")
    vr = read_lora_bytes(path, store.read(commit.files[path]), store.read(cfg) if cfg else None)
    card = card_of(store, commit)
    w2w = card.get("w2w") if isinstance(card.get("w2w"), dict) else {}
    attributes = attributes_of_card(repo_id, card)
    base_model = card.get("base_model") if isinstance(card.get("base_model"), str) else None
    item = NewModel(
        model_name(repo_id, commit, reg),
        np.asarray(vr.vector, dtype=np.float32),
        vr.layout,
        base_model or vr.base_model,
        kind=str(w2w.get("kind") or "imported"),
        source=f"{SOURCE_PREFIX}{repo_id}@{commit.oid}",
        source_format=vr.format,
        source_sha256=vr.sha256,
        attributes=attributes,
        lineage=_lineage_from_card(reg, w2w.get("lineage")),
    ).digest()
    report = reg.add_models([item])
    if report.added:
        name, model_id = report.added[0]
        return IndexResult(model=name, model_id=model_id)
    if report.skipped:
        return IndexResult(duplicate_of=report.skipped[0][1])
    return IndexResult(error=report.errors[0][1] if report.errors else "not indexed")


def attributes_of_card(repo_id: str, card: dict) -> dict:
    """The `w2w: attributes:` of a card ({} without them, or when they are not valid attributes)."""
    w2w = card.get("w2w") if isinstance(card.get("w2w"), dict) else {}
    if not isinstance(w2w.get("attributes"), dict):
        return {}
    try:
        return validate_attributes(w2w["attributes"])
    except W2WError as e:
        log.warning("%s: attributes in README.md ignored (%s)", repo_id, e)
        return {}


def models_of_repo(reg: Registry, repo_id: str) -> list[tuple[int, str]]:
    """(model id, source) of every model pushed to `repo_id` (any revision), oldest first."""
    prefix = f"{SOURCE_PREFIX}{repo_id}@"
    return sorted((i, s) for s, i in _models_by_source(reg).items() if s.startswith(prefix))


def update_card(reg: Registry, store: RepoStore, repo_id: str, commit: Commit) -> IndexResult | None:
    """A commit that changed the card, not the LoRA: the repo's current model takes the card's attributes.
    Caller holds the registry lock."""
    models = models_of_repo(reg, repo_id)
    if not models:
        return None
    model_id = models[-1][0]  # the newest: the one of the LoRA at the head
    m = reg.update_model(model_id, attributes=attributes_of_card(repo_id, card_of(store, commit)))
    return IndexResult(model=m.name, model_id=m.id)


def repo_moved(reg: Registry, src: str, dst: str) -> None:
    """The models of `src` now name `dst` in their source (same commits: the history moved with it)."""
    for model_id, source in models_of_repo(reg, src):
        reg.update_model(model_id, source=f"{SOURCE_PREFIX}{dst}@" + source.rsplit("@", 1)[1])


def repo_deleted(reg: Registry, repo_id: str, private: bool) -> None:
    """The models of a deleted repo keep their vectors (lineage) under a source that says the repo is gone."""
    prefix = DELETED_PRIVATE_PREFIX if private else DELETED_PREFIX
    for model_id, source in models_of_repo(reg, repo_id):
        reg.update_model(model_id, source=prefix + source[len(SOURCE_PREFIX) :])


def _lora_indexed(reg: Registry, store: RepoStore, repo_id: str, head: Commit, lora: str) -> bool:
    """Whether the repo's newest model came from the very LoRA file at `head` (a later commit changed the
    card, or nothing the index sees)."""
    models = models_of_repo(reg, repo_id)
    if not models:
        return False
    try:
        at = store.resolve(repo_id, models[-1][1].rsplit("@", 1)[1])
    except (RevisionNotFound, HubError):
        return False
    return lora in at.files and at.files[lora].sha256 == head.files[lora].sha256


def _card_caught_up(reg: Registry, store: RepoStore, repo_id: str, head: Commit) -> IndexResult | None:
    model_id = models_of_repo(reg, repo_id)[-1][0]
    if reg.get(model_id).attributes == attributes_of_card(repo_id, card_of(store, head)):
        return None
    return update_card(reg, store, repo_id, head)


def _lineage_from_card(reg: Registry, entries) -> list[tuple[int | None, str, dict]]:
    """The card's lineage, each parent linked to its model here when the parent's repo and revision were
    pushed to this hub too (w2wreg push records them); other parents are kept by name in the params."""
    if not isinstance(entries, list):
        return []
    sources = None
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("operation"), str):
            continue
        parent_id = None
        if e.get("parent_repo") and e.get("parent_revision"):
            if sources is None:
                sources = _models_by_source(reg)
            parent_id = sources.get(f"{SOURCE_PREFIX}{e['parent_repo']}@{e['parent_revision']}")
        params = e.get("params") if isinstance(e.get("params"), dict) else {}
        params = {**params, **{k: e[k] for k in ("parent", "parent_repo", "parent_revision") if e.get(k)}}
        out.append((parent_id, e["operation"], json.loads(json.dumps(params, default=str))))  # YAML dates -> str
    return out


def _models_by_source(reg: Registry) -> dict[str, int]:
    """source -> model id of every model registered from a push to this hub."""
    with reg.catalog.connect() as con:
        rows = con.execute("SELECT source, id FROM models WHERE source LIKE ?", [SOURCE_PREFIX + "%"]).fetchall()
    return {s: i for s, i in rows}


INTENTS = "intents"  # <repos>/intents/ID.json: a delete or move whose index update may not have happened


def intend(store: RepoStore, record: dict) -> Path:
    """Write down what a repo delete or move is about to make the index do, before the store does it; the
    caller removes the file once the index follows. A server that dies in between leaves it, and the next
    start replays it (replay_intents), so the index never keeps naming a repo that moved or is gone."""
    path = store.root / INTENTS / f"{uuid.uuid4().hex}.json"
    atomic_write_bytes(path, json.dumps(record).encode())
    return path


def replay_intents(reg: Registry, store: RepoStore) -> list[dict]:
    """Finish the index updates of deletes and moves that the store made but the index did not (both are
    idempotent: a repo's models are found by the source that names it); the records done."""
    folder = store.root / INTENTS
    done = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            if rec["op"] == "delete" and not store.exists(rec["repo"]):
                repo_deleted(reg, rec["repo"], bool(rec["private"]))
            elif rec["op"] == "move" and not store.exists(rec["src"]) and store.exists(rec["dst"]):
                repo_moved(reg, rec["src"], rec["dst"])
            # else: the store did not do it (it failed or died first): nothing to follow
        except (ValueError, KeyError, TypeError) as e:
            log.error("%s: not an intent record (%s); left for the operator", path, e)
            continue
        path.unlink()
        done.append(rec)
    return done


def catch_up(reg: Registry, store: RepoStore) -> list[tuple[str, IndexResult]]:
    """Index the head of every repo whose head is not registered yet (after a crash, or an old store); a head
    whose LoRA is indexed but whose card changed meanwhile gives the model the card's attributes. First the
    deletes and moves a crash cut off from their index update (replay_intents)."""
    for rec in replay_intents(reg, store):
        log.info("index caught up with a %s cut short: %s", rec["op"], rec)
    done = _models_by_source(reg)
    out = []
    for repo_id in store.list_repos():
        head = store.resolve(repo_id)
        lora = lora_path(head.files)
        if f"{SOURCE_PREFIX}{repo_id}@{head.oid}" in done or lora is None:
            continue
        try:
            if _lora_indexed(reg, store, repo_id, head, lora):
                result = _card_caught_up(reg, store, repo_id, head)
            else:
                result = index_commit(reg, store, repo_id, head)
        except W2WError as e:
            result = IndexResult(error=str(e))
        if result is not None:
            out.append((repo_id, result))
    return out

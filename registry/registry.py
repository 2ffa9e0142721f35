"""The Registry facade: the catalog, the vector stores and the hubs of one registry folder, kept in step.

Everything a notebook or the CLI does to a registry goes through here. Writes hold the writer lock;
vectors are written (and fsynced) before the one catalog transaction that makes them visible, so a
crash at any point leaves the registry as it was before the write began.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from registry import delta_pairs, sketches
from registry import index as coeff_index
from registry.catalog import RESERVED_COLUMNS, Catalog, ModelRow, Space, bulk_insert
from registry.hubs.local import LocalHub
from registry.lock import writer_lock
from registry.paths import RegistryPaths, default_root
from registry.search import MappedStore, knn
from registry.vectors import VectorStore, rows_per_shard_for
from w2w import family as wfamily
from w2w.delta import Factors, Views, one_blas_thread
from w2w.errors import (
    AttributeInputError,
    DuplicateModelError,
    InvalidNameError,
    NameTakenError,
    RegistryNotFoundError,
    SpaceMismatchError,
    W2WError,
)
from w2w.flatten import flatten, unflatten
from w2w.formats import discover_one, read_lora, write_lora
from w2w.layout import Layout
from w2w.lora import LoRA

CANDIDATE_MIN, CANDIDATE_FACTOR = 200, 20  # coefficient-index candidates re-ranked exactly after a fit (cosine,
# delta); below this many matching models every one is compared
# l2 after a fit: the exact re-rank of the 20 best in the index (k = 10) found all 10 true neighbours for
# all 200 queries at N = 65,000 when the 20 came from an exact scan of the index (199 of 200 from HNSW);
# of the best 15, for 198 (bench/bench_search_fitted.py). Each costs a read of its full vector (400 KB).
L2_CANDIDATES_MIN, L2_CANDIDATES_FACTOR = 20, 2
NAME_RE = re.compile(r"^[\w][\w.+\- ]{0,199}$")
ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
FLUSH_ROWS = 256
# models pulled ahead of staging, whose sketch-neighbour searches run as one batch (a GEMM over the family's index:
# one model's scan of 65,000 sketches is ~32 ms on one core); bounded by their vectors' bytes for large LoRAs
WINDOW_MODELS, WINDOW_BYTES = 64, 256 << 20


def validate_name(name: str) -> str:
    if not NAME_RE.match(name or "") or name != name.strip():
        raise InvalidNameError(
            f"{name!r} is not a valid model name: use letters, digits, '_', '-', '.', '+' or spaces (at most 200)"
        )
    return name


def validate_attributes(attrs: dict) -> dict[str, float | bool]:
    out = {}
    for key, value in attrs.items():
        if not ATTR_RE.match(key) or key in RESERVED_COLUMNS:
            raise AttributeInputError(
                f"attribute name {key!r} is not allowed: use a SQL identifier (letters, digits, _) that is not "
                f"one of {', '.join(RESERVED_COLUMNS)}"
            )
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, (int, float, np.number)) and np.isfinite(value):
            out[key] = float(value)
        else:
            raise AttributeInputError(f"attribute {key}={value!r} is not a finite number or a boolean")
    return out


def space_id_for(family: str, layout: Layout) -> str:
    """The id of a new space: from the base-model family and the layout, not the free-text base model, so the
    same LoRAs named "runwayml/stable-diffusion-v1-5" by a PEFT config and nothing by a kohya file share it.
    (Spaces made before families have ids from the base-model string; they keep them, see find_space.)"""
    return hashlib.sha256(f"family:{family}|{layout.fingerprint}".encode()).hexdigest()[:12]


def find_space(spaces: Iterable[Space], family: str, layout: Layout) -> str | None:
    """The id of the existing space of this family and layout (the oldest when a registry made before
    families holds several, one per base-model string), else None."""
    fp = layout.fingerprint
    return next((s.id for s in spaces if s.layout_fingerprint == fp and (s.family or "unknown") == family), None)


def vector_sha256(v: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(v, dtype="<f4").tobytes()).hexdigest()


@dataclass
class NewModel:
    """A model to register: its vector in a layout, and what is known about it."""

    name: str
    vector: np.ndarray
    layout: Layout
    base_model: str | None = None
    kind: str = "imported"
    source: str | None = None
    source_format: str | None = None
    source_sha256: str | None = None
    source_dtype: str | None = None  # float32/float16/bfloat16 of an imported file
    source_kind: str | None = None  # lora/locon/loha/lokr of an imported file
    attributes: dict = field(default_factory=dict)
    lineage: list[tuple[int | None, str, dict]] = field(default_factory=list)
    vector_sha256: str | None = None  # computed on the importer's threads when it can; else when staged
    sq_norm: float | None = None
    family: str | None = None  # detected from the layout, base model and `meta` when not given
    meta: dict = field(default_factory=dict)  # the file's metadata (kohya ss_*, modelspec.*), for the family
    delta_sq_norm: float | None = None  # ||dW||^2 and the dW sketch (registry.sketches), computed with digest
    sketch: np.ndarray | None = None

    def digest(self) -> NewModel:
        """Compute the vector's sha256, squared norm, family, ||dW||^2 and dW sketch now (hashing and the
        sketch's products release the GIL: call it on a thread)."""
        from registry import sketches

        v = np.ascontiguousarray(self.vector, dtype=np.float32)
        self.vector, self.vector_sha256 = v, vector_sha256(v)
        # squares in float32, summed in float64: 35 us; v64 @ v64 goes through threaded BLAS (ms per call here)
        self.sq_norm = float(np.add.reduce(v * v, dtype=np.float64))
        if self.family is None:
            self.family = wfamily.detect(self.layout, self.base_model, self.meta)
        if self.sketch is None and v.shape == (self.layout.dim,) and math.isfinite(self.sq_norm):
            with one_blas_thread():
                # views into v (no copy, no re-sorting): the same modules in the same (canonical) order
                self.delta_sq_norm, self.sketch = sketches.record(Views.of(v, self.layout))
        return self

    @classmethod
    def from_lora(cls, name: str, lora: LoRA, **kw) -> NewModel:
        layout = lora.layout()
        kw.setdefault("meta", dict(lora.meta))
        return cls(name, flatten(lora, layout), layout, base_model=kw.pop("base_model", lora.base_model), **kw)


@dataclass
class Failure:
    """An input that could not become a NewModel (the importer's read error), carried to the report."""

    what: str
    error: Exception


@dataclass
class AddReport:
    added: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    committed: bool = False
    warnings: list[str] = field(default_factory=list)
    near_copies: list[dict] = field(default_factory=list)  # {name, of, relative_distance, guess, kept}

    def to_json(self) -> dict:
        return {
            "added": [{"name": n, "id": i} for n, i in self.added],
            "near_copies": self.near_copies,
            "skipped": [{"what": w, "reason": r} for w, r in self.skipped],
            "errors": [{"what": w, "error": e} for w, e in self.errors],
            "committed": self.committed,
            "warnings": self.warnings,
        }


@dataclass
class Hit:
    model: ModelRow
    distance: float


@dataclass
class SearchResult:
    query: str
    space_id: str
    metric: str
    hits: list[Hit]
    family: str | None = None  # set for the dW metrics, which search a whole family

    def to_json(self) -> dict:
        return {
            "query": self.query,
            "space": self.space_id,
            "family": self.family,
            "metric": self.metric,
            "results": [
                {"id": h.model.id, "name": h.model.name, "distance": h.distance, "attributes": h.model.attributes}
                for h in self.hits
            ],
        }


def _near_searched() -> int:
    """Sketch neighbours found per added model: the near-copy check's and the kept pairs' candidates."""
    return max(sketches.NEAR_CANDIDATES, delta_pairs.PAIRS_AT_ADD)


def _windows(items: Iterable) -> Iterator[list]:
    """`items` in lists of up to WINDOW_MODELS, or fewer once their vectors reach WINDOW_BYTES."""
    window, size = [], 0
    for item in items:
        window.append(item)
        size += getattr(getattr(item, "vector", None), "nbytes", 0)
        if len(window) >= WINDOW_MODELS or size >= WINDOW_BYTES:
            yield window
            window, size = [], 0
    if window:
        yield window


class _AddSession:
    """State of one add: what exists, what is staged, and the rows written but not yet committed."""

    def __init__(self, reg: Registry, con, on_near_copy: str = "keep", near_threshold: float = 0.01):
        self.reg = reg
        self.on_near_copy, self.near_threshold = on_near_copy, near_threshold
        self.families: dict[str, object] = {}  # family -> sketches.FamilySketches: committed + staged models
        self.delta_rows: list[tuple] = []
        self.pair_rows: list[tuple[int, int, float]] = []  # registry.delta_pairs rows of the staged models
        self.layouts: dict[str, Layout] = {}
        self.near_rows: list[tuple] = []
        self.near_copies: list[dict] = []
        self.staged_at: dict[int, tuple[str, int, str]] = {}  # model id -> (space, vector row, name)
        self.spaces: dict[str, Space] = {s.id: s for s in reg.catalog.spaces(con)}
        self.committed = {sid: s.n_models for sid, s in self.spaces.items()}
        self.staged_rows = dict.fromkeys(self.spaces, 0)
        self.new_spaces: dict[str, tuple[Space, Layout]] = {}
        self.names = {r[0] for r in con.execute("SELECT name FROM models").fetchall()}
        self.source_shas = dict(
            con.execute("SELECT source_sha256, name FROM models WHERE source_sha256 IS NOT NULL").fetchall()
        )
        self.vector_shas = {
            (s, h): n for s, h, n in con.execute("SELECT space_id, vector_sha256, name FROM models").fetchall()
        }
        self.attr_kinds = reg.catalog.attribute_keys(con)
        self.new_attr_kinds: dict[str, str] = {}
        self.next_id = (con.execute("SELECT max(id) FROM models").fetchone()[0] or 0) + 1
        self.model_rows: list[tuple] = []
        self.attr_rows: list[tuple] = []
        self.lineage_rows: list[tuple] = []
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.written: dict[str, int] = {}  # rows handed to the writer per space, uncommitted
        self.writer: ThreadPoolExecutor | None = None
        self.done = False  # set the moment the catalog commits: from then on nothing may be rolled back
        self.pending: list = []
        # rows handed to the writer, per space: (first row, rows) while the write may still run
        self.inflight: dict[str, list[tuple[int, list[np.ndarray], object]]] = {}
        self.mapped: dict[str, MappedStore] = {}  # written staged rows, read back without waiting for the writer
        self.prefetched: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(NewModel) -> its window's search
        self.window_staged: dict[str, list[tuple[int, np.ndarray]]] = {}  # family -> (id, sketch) since then

    def store(self, sid: str) -> VectorStore:
        s = self.spaces[sid]
        return VectorStore(self.reg.paths.vectors(sid), s.dim, s.rows_per_shard)

    def stage(self, m: NewModel) -> int:
        validate_name(m.name)
        attrs = validate_attributes(m.attributes)
        v = np.ascontiguousarray(m.vector, dtype=np.float32)
        if v.shape != (m.layout.dim,):
            raise W2WError(f"{m.name}: vector of shape {v.shape} does not fit its layout (D={m.layout.dim})")
        if m.vector_sha256 is None or m.sq_norm is None or m.family is None:
            m.digest()
        if not math.isfinite(m.sq_norm):  # a NaN or Inf anywhere makes the sum of squares non-finite
            raise W2WError(f"{m.name}: vector holds NaN or Inf values (or values too large for float32 math)")
        family = m.family
        sid = find_space(self.spaces.values(), family, m.layout) or space_id_for(family, m.layout)
        if sid not in self.spaces:
            space = Space(
                sid,
                m.base_model,
                m.layout.fingerprint,
                m.layout.dim,
                len(m.layout),
                rows_per_shard_for(m.layout.dim),
                m.layout.to_json(),
                family=family,
            )
            self.spaces[sid], self.new_spaces[sid] = space, (space, m.layout)
            self.committed[sid] = self.staged_rows[sid] = 0
        vsha = m.vector_sha256
        if m.source_sha256 and m.source_sha256 in self.source_shas:
            raise DuplicateModelError(m.source or m.name, self.source_shas[m.source_sha256], "same file (sha256) as")
        if (sid, vsha) in self.vector_shas:
            raise DuplicateModelError(m.source or m.name, self.vector_shas[(sid, vsha)], "same weights as")
        if m.name in self.names:
            raise NameTakenError(m.name, m.source)
        for key, value in attrs.items():
            kind = "bool" if isinstance(value, bool) else "number"
            known = self.attr_kinds.get(key) or self.new_attr_kinds.get(key)
            if known and known != kind:
                raise AttributeInputError(f"{m.name}: attribute {key!r} holds {known} values elsewhere, got {value!r}")
            if not known:
                self.new_attr_kinds[key] = kind
        model_id, row = self.next_id, self.committed[sid] + self.staged_rows[sid]
        nearest = self.sketch_neighbours(m)
        near = self.near_copy(m, v, nearest)
        if near is not None:
            self.near_rows.append((model_id, *near))
        self.staged_at[model_id] = (sid, row, m.name)
        if m.sketch is not None:
            others, views = nearest[1][: delta_pairs.PAIRS_AT_ADD], Views.of(v, m.layout)
            sq_norm_of = self.family_index(family).sq_norms.__getitem__
            self.pair_rows += delta_pairs.compare(model_id, views, m.delta_sq_norm, others, self.views_of, sq_norm_of)
            self.delta_rows.append((model_id, family, m.delta_sq_norm, m.sketch.astype("<f4").tobytes(), True))
            self.family_index(family).add(model_id, m.delta_sq_norm, m.sketch)
            self.window_staged.setdefault(family, []).append((model_id, m.sketch))
        self.next_id += 1
        self.staged_rows[sid] += 1
        self.names.add(m.name)
        if m.source_sha256:
            self.source_shas[m.source_sha256] = m.name
        self.vector_shas[(sid, vsha)] = m.name
        self.model_rows.append(
            (
                model_id,
                m.name,
                sid,
                row,
                vsha,
                m.sq_norm,
                m.kind,
                m.source,
                m.source_format,
                m.source_sha256,
                m.base_model,
                m.source_dtype,
                m.source_kind,
                family,
            )
        )
        self.attr_rows += [(model_id, k, float(val)) for k, val in attrs.items()]
        self.lineage_rows += [(model_id, p, op, json.dumps(params)) for p, op, params in m.lineage]
        self.buffers.setdefault(sid, []).append(v)
        if len(self.buffers[sid]) >= FLUSH_ROWS:
            self.flush(sid)
        return model_id

    def family_index(self, family: str):
        """The family's sketches, committed and staged in this add (a copy: the cached one stays as committed)."""
        if family not in self.families:
            self.families[family] = sketches.read_family(self.reg, family)
        return self.families[family]

    def views_of(self, model_id: int) -> Views:
        """Layers of a committed or staged model (a staged one's row is read back from its buffer or store)."""
        if model_id not in self.staged_at:
            return sketches.mapped_lora(self.reg, model_id)
        sid, row, _ = self.staged_at[model_id]
        first_buffered = self.committed[sid] + self.written.get(sid, 0)
        if row >= first_buffered:
            return Views.of(self.buffers[sid][row - first_buffered], self.layout_of(sid))
        for start, rows, _ in self.inflight.get(sid, ()):
            if start <= row < start + len(rows):  # its write may still run: the row as it was handed over
                return Views.of(rows[row - start], self.layout_of(sid))
        if sid not in self.mapped:
            self.mapped[sid] = MappedStore(self.store(sid))
        return Views.of(self.mapped[sid].row(row), self.layout_of(sid))

    def layout_of(self, sid: str) -> Layout:
        if sid not in self.layouts:
            self.layouts[sid] = Layout.from_json(self.spaces[sid].layout_json)
        return self.layouts[sid]

    def factors_of(self, model_id: int, sq_norm: float | None = None) -> Factors:
        """Factors of a committed or staged model."""
        return Factors.of(self.views_of(model_id), sq_norm)

    def sketch_neighbours(self, m: NewModel) -> tuple[list[float], list[int]]:
        """(squared sketch distances, ids) of the registered or staged models whose dW sketches are nearest m's:
        the near-copy check's and the kept pairs' candidates (one FAISS scan for both)."""
        if m.sketch is None:
            return [], []
        fam = self.family_index(m.family)
        n = min(_near_searched(), fam.index.ntotal)
        if n == 0:
            return [], []
        hit = self.prefetched.pop(id(m), None)
        if hit is None:
            with coeff_index.single_thread():  # one query: no OpenMP team (see index.single_thread)
                dist, ids = fam.index.search(np.ascontiguousarray(m.sketch[None, :], dtype=np.float32), n)
            dist, ids = dist[0], ids[0]
        else:  # searched with its window, before the models staged since: those are compared here
            dist, ids = hit
            mates = self.window_staged.get(m.family, [])
            if mates:
                sk = np.stack([s for _, s in mates])
                dist = np.concatenate([dist, np.add.reduce((sk - m.sketch) ** 2, axis=1)])
                ids = np.concatenate([ids, np.array([i for i, _ in mates], dtype=np.int64)])
                order = np.argsort(dist, kind="stable")[:n]
                dist, ids = dist[order], ids[order]
        keep = ids >= 0
        return dist[keep].tolist(), ids[keep].tolist()

    def prefetch_neighbours(self, window: Sequence) -> None:
        """Search the family indexes once for a window of models about to be staged (one batch per family:
        FamilySketches.nearest_many); `sketch_neighbours` then adds the window's models staged before each. Models
        not digested yet are searched one by one when staged."""
        self.prefetched, self.window_staged = {}, {}
        by_family: dict[str, list[NewModel]] = {}
        for m in window:
            if isinstance(m, NewModel) and m.sketch is not None and m.family is not None:
                by_family.setdefault(m.family, []).append(m)
        for family, models in by_family.items():
            if len(models) == 1:  # one query: FAISS's scan (sketch_neighbours) reads the sketches once, as this would
                continue
            dist, ids = self.family_index(family).nearest_many(np.stack([m.sketch for m in models]), _near_searched())
            self.prefetched.update({id(m): f for m, f in zip(models, zip(dist, ids, strict=True), strict=True)})

    def near_copy(
        self, m: NewModel, v: np.ndarray, nearest: tuple[list[float], list[int]]
    ) -> tuple[int, float, str] | None:
        """(model id, relative dW distance, guess) of the nearest registered or staged model within the near-copy
        threshold of m, in any layout of its family; raises DuplicateModelError when such copies are skipped."""
        if m.sketch is None or self.near_threshold <= 0:
            return None
        found = sketches.near(
            self.family_index(m.family),
            m.delta_sq_norm,
            m.sketch,
            self.near_threshold,
            lambda: Factors.of(unflatten(v, m.layout)),
            self.factors_of,
            hits=nearest,
        )
        if not found:
            return None
        of_id, rel = found[0]
        staged = self.staged_at.get(of_id)
        if staged:
            of_name, of_space = staged[2], staged[0]
        else:
            row = self.reg.catalog.model_table().model(of_id)
            of_name, of_space = row.name, row.space_id
        other_ranks = sketches.ranks(m.layout) != sketches.ranks(Layout.from_json(self.spaces[of_space].layout_json))
        what = sketches.guess(rel, other_ranks)
        keep = self.on_near_copy == "keep"
        self.near_copies.append({"name": m.name, "of": of_name, "relative_distance": rel, "guess": what, "kept": keep})
        if not keep:
            raise DuplicateModelError(
                m.source or m.name, of_name, f"near copy ({rel:.2e} relative dW distance, {what}) of"
            )
        return of_id, rel, what

    def flush(self, sid: str) -> None:
        """Hand the buffered rows to the writer thread (writes release the GIL: staging goes on meanwhile)."""
        rows = self.buffers.pop(sid, [])
        if rows:
            start = self.committed[sid] + self.written.get(sid, 0)
            if self.writer is None:
                self.writer = ThreadPoolExecutor(max_workers=1)  # one thread: writes stay in row order
            # fsync per batch on the writer thread: the disk flushes while staging goes on, not all at the end
            job = self.writer.submit(self.store(sid).write_rows, start, rows, True)
            self.pending.append(job)
            self.written[sid] = self.written.get(sid, 0) + len(rows)
            # a written batch's rows are read back from the store (a map): only running (or failed, to be
            # raised at sync) ones stay in memory
            kept = [b for b in self.inflight.get(sid, []) if not b[2].done() or b[2].exception()]
            self.inflight[sid] = [*kept, (start, rows, job)]

    def drain(self) -> None:
        """Wait for every write handed to the writer thread; re-raise the first failure."""
        pending, self.pending, self.inflight = self.pending, [], {}
        errors = [f.exception() for f in pending]
        if self.writer is not None:
            self.writer.shutdown()
            self.writer = None
        if any(errors):
            raise next(e for e in errors if e)

    def sync(self) -> None:
        for sid in list(self.buffers):
            self.flush(sid)
        self.drain()
        for sid, n in self.written.items():
            store = self.store(sid)
            first, last = self.committed[sid], self.committed[sid] + n - 1
            for shard in range(first // store.rows_per_shard, last // store.rows_per_shard + 1):
                with open(store.shard_path(shard), "rb+") as f:
                    os.fsync(f.fileno())

    def rollback(self) -> None:
        if self.done:
            return
        with contextlib.suppress(Exception):  # the rows are dropped below whatever the writes did
            self.drain()
        self.mapped.clear()  # no map of a shard outlives its truncation
        for sid in {*self.written, *self.new_spaces}:
            if sid in self.new_spaces:  # a space this add would have made: no folder of it may stay behind
                shutil.rmtree(self.reg.paths.vectors(sid), ignore_errors=True)
            elif sid in self.written:
                self.store(sid).truncate(self.committed[sid])

    def commit(self, con) -> None:
        con.execute("BEGIN TRANSACTION")
        try:
            for space, _ in self.new_spaces.values():
                con.execute(
                    "INSERT INTO spaces (id, base_model, layout_fingerprint, dim, n_modules, rows_per_shard, "
                    "layout_json, family) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        space.id,
                        space.base_model,
                        space.layout_fingerprint,
                        space.dim,
                        space.n_modules,
                        space.rows_per_shard,
                        space.layout_json,
                        space.family,
                    ],
                )
            if self.new_attr_kinds:
                con.executemany("INSERT INTO attribute_keys VALUES (?, ?)", list(self.new_attr_kinds.items()))
            bulk_insert(
                con,
                "models (id, name, space_id, row_idx, vector_sha256, sq_norm, kind, source, source_format, "
                "source_sha256, base_model, source_dtype, source_kind, family)",
                self.model_rows,
                ["BIGINT", "VARCHAR", "VARCHAR", "BIGINT", "VARCHAR", "DOUBLE", "VARCHAR", "VARCHAR", "VARCHAR",
                 "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR"],
            )  # fmt: skip
            bulk_insert(con, "deltas (model_id, family, sq_norm, sketch, paired)", self.delta_rows,
                        ["BIGINT", "VARCHAR", "DOUBLE", "BLOB", "BOOLEAN"])  # fmt: skip
            bulk_insert(con, "delta_pairs", self.pair_rows, ["BIGINT", "BIGINT", "DOUBLE"])
            bulk_insert(con, "near_copies (model_id, of_id, rel_distance, kind)", self.near_rows,
                         ["BIGINT", "BIGINT", "DOUBLE", "VARCHAR"])  # fmt: skip
            bulk_insert(con, "attributes", self.attr_rows, ["BIGINT", "VARCHAR", "DOUBLE"])
            bulk_insert(con, "lineage", self.lineage_rows, ["BIGINT", "BIGINT", "VARCHAR", "VARCHAR"])
            con.execute("COMMIT")
            self.done = True
        except BaseException:
            if not self.done:
                con.execute("ROLLBACK")
            raise


class Registry:
    """A registry folder: catalog.duckdb, vectors/, hub/ (see README, 'Where data lives')."""

    def __init__(self, root: str | Path | None = None):
        self.paths = RegistryPaths(Path(root) if root else default_root())
        self.catalog = Catalog(self.paths.catalog)
        self.hub = LocalHub(self.paths.hub, name="local")
        self._cache: dict = {}  # immutable things worth keeping between calls: layouts, subspaces, indexes

    @property
    def root(self) -> Path:
        return self.paths.root

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def init(cls, root: str | Path | None = None) -> Registry:
        """Create (or open, if it exists) a registry folder."""
        reg = cls(root)
        reg.root.mkdir(parents=True, exist_ok=True)
        with writer_lock(reg.paths.lock, reg.root):
            reg.catalog.create()
        reg.paths.hub.mkdir(exist_ok=True)
        return reg

    @classmethod
    def open(cls, root: str | Path | None = None) -> Registry:
        reg = cls(root)
        if not reg.paths.catalog.exists():
            raise RegistryNotFoundError(reg.root)
        if reg.catalog.needs_migration():  # a registry made before base-model families (issue 15)
            with reg.writing():
                reg.catalog.migrate()
                sketches.backfill(reg)
        return reg

    def writing(self):
        return writer_lock(self.paths.lock, self.root)

    # --- adding ----------------------------------------------------------------------------------

    def add_models(
        self,
        items: Iterable[NewModel | Failure],
        skip_errors: bool = False,
        on_item: Callable[[], None] | None = None,
        on_near_copy: str = "keep",
        near_threshold: float = sketches.NEAR_THRESHOLD,
    ) -> AddReport:
        """Register models. Duplicates are skipped; any other error aborts the whole add unless skip_errors.

        A near copy (within `near_threshold` relative dW distance of a registered or just-added model of its
        family, in any layout) is reported and recorded, then kept or skipped (`on_near_copy`).
        Either every accepted model is committed (vectors and catalog rows together) or none is.
        """
        if on_near_copy not in ("keep", "skip"):
            raise W2WError(f"on_near_copy must be 'keep' or 'skip', got {on_near_copy!r}")
        report = AddReport()
        with self.writing():
            with self.catalog.connect() as con:
                session = _AddSession(self, con, on_near_copy, near_threshold)
            for sid, n in session.committed.items():
                session.store(sid).truncate(n)  # drop a tail a crashed writer left behind
            try:
                for window in _windows(items):
                    session.prefetch_neighbours(window)
                    for item in window:
                        if on_item:
                            on_item()
                        if isinstance(item, Failure):
                            report.errors.append((item.what, str(item.error)))
                            continue
                        try:
                            with one_blas_thread():  # the Grams of the near-copy check and of the kept pairs
                                model_id = session.stage(item)
                            report.added.append((item.name, model_id))
                        except DuplicateModelError as e:
                            report.skipped.append((item.source or item.name, str(e)))
                        except W2WError as e:
                            report.errors.append((item.source or item.name, str(e)))
                session.sync()
                report.near_copies = session.near_copies
                if report.errors and not skip_errors:
                    session.rollback()
                    report.added = []
                    return report
                if session.model_rows:
                    with self.catalog.connect(write=True) as con:
                        session.commit(con)
                report.committed = True
            except BaseException:
                session.rollback()  # a no-op once the catalog has committed: those rows are the truth
                raise
            from registry.wspace import project_new

            try:  # derived data: the models are in whatever happens here, and `repair` rebuilds it
                project_new(self, [i for _, i in report.added])
            except Exception as e:
                report.warnings.append(
                    f"the models were added, but projecting them into the fitted subspace failed "
                    f"({type(e).__name__}: {e}); run `w2wreg repair`"
                )
        return report

    def update_model(
        self, ref: str | int | ModelRow, attributes: dict | None = None, source: str | None = None
    ) -> ModelRow:
        """Replace a model's attributes and/or its source (its repo's card changed, the repo moved or went);
        the vector, name and lineage stay. One transaction: all of it or nothing."""
        m = self.get(ref)
        attrs = validate_attributes(attributes) if attributes is not None else None
        with self.writing(), self.catalog.connect(write=True) as con:
            kinds = dict(con.execute("SELECT key, kind FROM attribute_keys").fetchall())
            new_kinds = {}
            for key, value in (attrs or {}).items():
                kind = "bool" if isinstance(value, bool) else "number"
                if kinds.get(key, kind) != kind:
                    raise AttributeInputError(f"{m.name}: attribute {key!r} holds {kinds[key]} values elsewhere")
                if key not in kinds:
                    new_kinds[key] = kind
            con.execute("BEGIN TRANSACTION")
            try:
                if attrs is not None:
                    con.execute("DELETE FROM attributes WHERE model_id = ?", [m.id])
                    if new_kinds:
                        con.executemany("INSERT INTO attribute_keys VALUES (?, ?)", list(new_kinds.items()))
                    if attrs:
                        con.executemany(
                            "INSERT INTO attributes VALUES (?, ?, ?)", [(m.id, k, float(v)) for k, v in attrs.items()]
                        )
                if source is not None:
                    con.execute("UPDATE models SET source = ? WHERE id = ?", [source, m.id])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return self.get(m.id)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, ref: str | int | ModelRow) -> ModelRow:
        return ref if isinstance(ref, ModelRow) else self.catalog.resolve(ref)

    def space(self, space_id: str) -> Space:
        s = self.catalog.space(space_id)
        if s is None:
            raise W2WError(f"no space {space_id!r} in the registry")
        return s

    def layout(self, space_id: str) -> Layout:
        return Layout.from_json(self.space(space_id).layout_json)

    def store(self, space: Space) -> VectorStore:
        return VectorStore(self.paths.vectors(space.id), space.dim, space.rows_per_shard)

    def vector(self, ref: str | int | ModelRow) -> np.ndarray:
        m = self.get(ref)
        return self.store(self.space(m.space_id)).read_one(m.row_idx)

    def lora(self, ref: str | int | ModelRow) -> LoRA:
        m = self.get(ref)
        space = self.space(m.space_id)
        return unflatten(self.store(space).read_one(m.row_idx), Layout.from_json(space.layout_json), m.base_model)

    def ls(self, where: str | None = None) -> list[ModelRow]:
        return self.catalog.list_models(where)

    def spaces(self) -> list[Space]:
        return self.catalog.spaces()

    # --- search ----------------------------------------------------------------------------------

    def _query_vector(
        self, query, base_model: str | None, drop_text_encoder: bool = False
    ) -> tuple[str, np.ndarray, str, int | None]:
        """(label, vector, space id, model id or None) of a model reference or a LoRA file."""
        if self._is_file(query):
            # a file, an adapter folder, or a folder holding one LoRA: what `add` takes, read as `add` reads it
            rr = read_lora(discover_one(Path(query)), base_model=base_model, drop_text_encoder=drop_text_encoder)
            layout = rr.lora.layout()
            spaces = self.spaces()
            family = wfamily.detect(layout, rr.lora.base_model, rr.lora.meta)
            sid = find_space(spaces, family, layout) or ""
            if sid not in {s.id for s in spaces}:
                same = [s.id for s in spaces if s.layout_fingerprint == layout.fingerprint]
                if len(same) != 1:
                    raise SpaceMismatchError(
                        f"{query}: no space of this registry has its layout ({layout.describe()})"
                        + (f" and base model {rr.lora.base_model!r}" if rr.lora.base_model else "")
                        + (
                            "; several spaces share the layout, pass --base-model to choose"
                            if same
                            else "; compare it with the other layouts of its family: --metric delta"
                        )
                        + (
                            "; pass --drop-text-encoder to compare its UNet part alone"
                            if any(m.startswith("text_encoder") for m in rr.lora.layers)
                            else ""
                        )
                    )
                sid = same[0]
            return str(query), flatten(rr.lora, layout), sid, None
        model_id, name, sid, row = self._locate(query)
        return name, self._read_row(sid, row), sid, model_id

    def _locate(self, query) -> tuple[int, str, str, int]:
        """(model id, name, space id, vector row) of a model reference (a ModelRow, a name or an id)."""
        if isinstance(query, ModelRow):
            return query.id, query.name, query.space_id, query.row_idx
        return self.catalog.locate(query)

    def _read_row(self, space_id: str, row: int) -> np.ndarray:
        space, _ = self._space_and_layout(space_id)
        return self.store(space).read_one(row)

    @staticmethod
    def _is_file(query) -> bool:
        """Whether a query names a LoRA file or folder rather than a model of the registry."""
        return isinstance(query, (str, Path)) and Path(query).exists()

    def _space_and_layout(self, space_id: str) -> tuple[Space, Layout]:
        """A space and its parsed layout, cached: both never change once created."""
        hit = self._cache.get(("space", space_id))
        if hit is None:
            known = self._cache.get("spaces")
            if known is None or space_id not in known:  # one query for all: a dW search meets hundreds of layouts
                known = self._cache["spaces"] = {s.id: s for s in self.catalog.spaces()}
            if space_id not in known:
                raise W2WError(f"no space {space_id!r} in the registry")
            space = known[space_id]
            hit = self._cache[("space", space_id)] = (space, Layout.from_json(space.layout_json))
        return hit

    def search(
        self,
        query: str | int | Path | ModelRow,
        k: int = 10,
        where: str | None = None,
        metric: str = "l2",
        base_model: str | None = None,
        exact: bool = False,
        drop_text_encoder: bool = False,
    ) -> SearchResult:
        """The k models nearest to `query` (a model or a LoRA file) in its space, among those matching `where`.

        Before a subspace is fitted (or with exact=True) every matching model is compared. After, a FAISS
        index over subspace coefficients proposes candidates, which are re-ranked on the full vectors.
        A file query keeps its text-encoder part unless drop_text_encoder (as `add` reads it).
        metric "w2w": the angle between coordinates in the fitted subspace (wspace.nearest_by_angle), exact.
        """
        with self.catalog.session():
            return self._search(query, k, where, metric, base_model, exact, drop_text_encoder)

    def _search(self, query, k, where, metric, base_model, exact, drop_text_encoder=False) -> SearchResult:
        from registry import wspace

        if metric == wspace.W2W_METRIC:
            return self._search_w2w(query, k, where, base_model, drop_text_encoder)
        if metric in sketches.FAMILY_METRICS:  # dW metrics: every layout of the query's family
            with one_blas_thread():
                label, family, found = sketches.search(self, query, k, where, metric, base_model, drop_text_encoder)
            table = self.catalog.model_table()
            return SearchResult(label, f"family:{family}", metric, [Hit(table.model(i), d) for i, d in found], family)
        if not exact:
            from registry.index import single_thread

            with single_thread(), self.catalog.pinned():
                fitted = self._search_fitted(query, k, where, metric, base_model, drop_text_encoder)
            if fitted is not None:
                return fitted
        label, q, sid, self_id = self._query_vector(query, base_model, drop_text_encoder)
        space, layout = self._space_and_layout(sid)
        ids, row_idx, sq = self.catalog.rows(sid, where)
        mask = ids != (self_id if self_id is not None else -1)
        ids, row_idx, sq = ids[mask], row_idx[mask], sq[mask]
        found_rows, dists = knn(self.store(space), q, k, metric, layout, row_idx, sq)
        by_row = dict(zip(row_idx.tolist(), ids.tolist(), strict=True))
        models = {m.id: m for m in self.catalog.models_by_ids([by_row[r] for r in found_rows.tolist()])}
        hits = [Hit(models[by_row[r]], float(d)) for r, d in zip(found_rows.tolist(), dists.tolist(), strict=True)]
        return SearchResult(label, sid, metric, hits)

    def _search_w2w(self, query, k, where, base_model, drop_text_encoder=False) -> SearchResult:
        """The k models at the smallest angle from the query in the space's fitted subspace (exact)."""
        from registry import wspace

        if self._is_file(query):
            label, q, sid, self_id = self._query_vector(query, base_model, drop_text_encoder)
        else:  # a model: its stored coefficients, its vector only if it has none
            self_id, label, sid, row = self._locate(query)
        sm = wspace.current(self, sid, self._cache)
        if sm is None:
            raise wspace.NoSubspaceError(sid)
        c = wspace.stored_coefficients(self, sm, self_id) if self_id is not None else None
        if c is None:  # a file, or a model added since the fit and not yet projected
            c = sm.sub.project(q if self_id is None else self._read_row(sid, row))
        where = where if where and where.strip() else None
        ids, dists = wspace.nearest_by_angle(self, sm, c, k, where, self_id)
        table = self.catalog.model_table()
        hits = [Hit(table.model(int(i)), float(d)) for i, d in zip(ids.tolist(), dists.tolist(), strict=True)]
        return SearchResult(label, sid, wspace.W2W_METRIC, hits)

    def _search_fitted(self, query, k, where, metric, base_model, drop_text_encoder=False) -> SearchResult | None:
        """Search after a fit: candidates from the coefficient index, re-ranked exactly on the full vectors.

        None when the space has no fitted subspace (or index), or when so few models match that comparing
        every one costs no more: the caller then compares every model. Per query, for a model of the
        registry: its coordinates from the index itself (no read or projection of its vector), the index's
        nearest (l2: L2_CANDIDATES_*), their full vectors through kept memory maps (search.rerank); catalog
        reads are cached until the next commit (Catalog.cached), so no query runs SQL.
        """
        from registry import index as coeff_index
        from registry import wspace
        from registry.search import MappedStore, rerank

        where = where if where and where.strip() else None
        if self._is_file(query):
            model_id, (label, q, sid, _) = None, self._query_vector(query, base_model, drop_text_encoder)
        else:
            table = self.catalog.model_table()
            if isinstance(query, ModelRow):
                model_id = query.id if query.id in table.rows else None
            else:
                model_id = table.find(query)
            if model_id is None:
                return None  # the exact path says which models are near that name
            _, label, sid, row = table.rows[model_id][:4]
            q = None
        sm = wspace.current(self, sid, self._cache)
        index = wspace.load_index(sm, self._cache) if sm is not None else None
        if index is None:
            return None
        state = wspace.search_state(self, sid)
        n_match = len(self.catalog.filter_ids_cached(where, sid)) if where else len(state.ids)
        if n_match <= max(CANDIDATE_MIN, CANDIDATE_FACTOR * k) + 1:
            return None
        space, layout = self._space_and_layout(sid)
        key = ("mapped", sid)
        vectors = self._cache.get(key) or self._cache.setdefault(key, MappedStore(self.store(space)))
        if q is None:
            q = vectors.row(row)  # (D,) a view: nothing is copied
        y = coeff_index.reconstruct(index, model_id) if model_id is not None else None
        if y is None:
            y = sm.index_coords(sm.sub.project(q))  # a file, or a model the index lacks
        l2 = metric == "l2"
        n = max(L2_CANDIDATES_MIN, L2_CANDIDATES_FACTOR * k) if l2 else max(CANDIDATE_MIN, CANDIDATE_FACTOR * k)
        pos = state.positions(wspace.candidates(self, sm, index, y, n, where, model_id, widen=True))
        if l2:
            found_rows, dists = rerank(vectors, q, k, state.rows[pos])
        else:
            pos = np.sort(pos)  # knn wants rows in store order
            found_rows, dists = knn(self.store(space), q, k, metric, layout, state.rows[pos], state.sq_norms[pos])
        by_row = dict(zip(state.rows[pos].tolist(), state.ids[pos].tolist(), strict=True))
        table = self.catalog.model_table()
        hits = [Hit(table.model(by_row[r]), float(d)) for r, d in zip(found_rows.tolist(), dists.tolist(), strict=True)]
        return SearchResult(label, sid, metric, hits)

    def dupes(self, threshold: float = sketches.NEAR_THRESHOLD) -> list[dict]:
        """Groups of near copies in the registry (registry.sketches.dupes)."""
        with self.catalog.session(), one_blas_thread():
            return sketches.dupes(self, threshold)

    # --- getting models out ----------------------------------------------------------------------

    def export(self, ref: str | int | ModelRow, fmt: str, out: str | Path, dtype: str | None = None) -> list[Path]:
        """Write a model as a LoRA file (diffusers, kohya) or adapter folder (peft), its factors in `dtype`
        (fp32/fp16/bf16 or float32/...); by default the dtype its file came in, float32 for a made model."""
        m = self.get(ref)
        dtype = dtype or self.catalog.source_info(m.id)["source_dtype"] or "float32"
        return write_lora(self.lora(m), out, fmt, dtype=dtype)

    def model_card(self, ref: str | int | ModelRow, previews: Sequence[str] = ()) -> str:
        from registry import model_card

        m = self.get(ref)
        return model_card.render(
            m.name,
            m.base_model,
            m.space_id,
            self.layout(m.space_id).describe(),
            m.vector_sha256,
            m.kind,
            m.source,
            m.attributes,
            self._lineage_with_repos(m.id),
            previews=previews,
        )

    def _lineage_with_repos(self, model_id: int) -> list[dict]:
        """Lineage rows, each parent with the hub repo and revision it was last pushed to (if it was)."""
        out = []
        for row in self.catalog.lineage(model_id):
            # only the parents' pushes: reading every push per card made `ingest --push-to` quadratic
            weights = [] if row["parent_id"] is None else self.catalog.hub_files(row["parent_id"])
            weights = [hf for hf in weights if hf["path"].endswith(".safetensors")]
            hf = weights[-1] if weights else None  # insertion order: the last push wins
            if hf:
                row = row | {"parent_repo": hf["repo"], "parent_revision": hf["revision"], "parent_hub": hf["hub"]}
            out.append(row)
        return out

    def push(self, ref: str | int | ModelRow, repo_id: str, hub=None, previews: Sequence[Path] = ()) -> dict:
        """Upload a model to a hub (default: the registry's local hub) in diffusers format (in the dtype its file
        came in) with its card, and preview images (under previews/) when given."""
        m = self.get(ref)
        with self.writing():
            return self._push_locked(m, repo_id, hub or self.hub, previews)

    def _push_locked(self, m: ModelRow, repo_id: str, hub, previews: Sequence[Path] = ()) -> dict:
        from w2w.formats import diffusers as dfmt
        from w2w.formats.tensorfile import safetensors_bytes

        tensors, metadata = dfmt.to_tensors(self.lora(m))
        dtype = self.catalog.source_info(m.id)["source_dtype"] or "float32"  # as export: the dtype it came in
        weights = safetensors_bytes(tensors, metadata, dtype)
        images = {f"previews/{Path(p).name}": Path(p).read_bytes() for p in previews}
        card = self.model_card(m, previews=sorted(images)).encode()
        files = {dfmt.WEIGHT_NAME: weights, "README.md": card, **images}
        revision = hub.upload(repo_id, files, f"w2wreg push of {m.name}")
        with self.catalog.connect(write=True) as con:
            con.executemany(
                "INSERT INTO hub_files (model_id, hub, repo, revision, path, sha256) VALUES (?, ?, ?, ?, ?, ?)",
                [(m.id, hub.name, repo_id, revision, p, hashlib.sha256(d).hexdigest()) for p, d in files.items()],
            )
        return {"model": m.name, "hub": hub.name, "repo": repo_id, "revision": revision, "files": sorted(files)}

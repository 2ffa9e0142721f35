"""The catalog: one DuckDB file holding spaces, models, attributes, lineage and hub records.

Connections are short-lived (open, do the work, close) so several processes can take turns.
Reads open the file read-only, which also keeps user --where conditions from writing.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from w2w.errors import FilterError, RegistryLockedError, UnknownModelError

SCHEMA_VERSION = "1"
CACHE_KEYS = 64  # values kept by Catalog.cached (per process and catalog file)
RESERVED_COLUMNS = ("id", "name", "space", "kind", "base_model", "family", "source_format", "created")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS spaces (
    id VARCHAR PRIMARY KEY,
    base_model VARCHAR,
    layout_fingerprint VARCHAR NOT NULL,
    dim BIGINT NOT NULL,
    n_modules INTEGER NOT NULL,
    rows_per_shard INTEGER NOT NULL,
    layout_json VARCHAR NOT NULL,
    created TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS models (
    id BIGINT PRIMARY KEY,
    name VARCHAR NOT NULL UNIQUE,
    space_id VARCHAR NOT NULL,
    row_idx BIGINT NOT NULL,
    vector_sha256 VARCHAR NOT NULL,
    sq_norm DOUBLE NOT NULL,
    kind VARCHAR NOT NULL,
    source VARCHAR,
    source_format VARCHAR,
    source_sha256 VARCHAR,
    base_model VARCHAR,
    created TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS attribute_keys (key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS attributes (
    model_id BIGINT NOT NULL, key VARCHAR NOT NULL, value DOUBLE NOT NULL, PRIMARY KEY (model_id, key)
);
CREATE TABLE IF NOT EXISTS lineage (
    child_id BIGINT NOT NULL, parent_id BIGINT, operation VARCHAR NOT NULL, params VARCHAR
);
CREATE TABLE IF NOT EXISTS subspaces (
    id VARCHAR PRIMARY KEY,
    space_id VARCHAR NOT NULL,
    k INTEGER NOT NULL,
    n_models BIGINT NOT NULL,
    where_filter VARCHAR,
    explained DOUBLE NOT NULL,
    error_p95 DOUBLE NOT NULL,
    config VARCHAR,
    created TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS projections (
    subspace_id VARCHAR NOT NULL, model_id BIGINT NOT NULL, coeff_row BIGINT NOT NULL, rel_error DOUBLE NOT NULL,
    PRIMARY KEY (subspace_id, model_id)
);
CREATE TABLE IF NOT EXISTS directions (
    subspace_id VARCHAR NOT NULL,
    attribute VARCHAR NOT NULL,
    method VARCHAR NOT NULL,
    debiased_against VARCHAR,
    vector DOUBLE[] NOT NULL,
    score_mean DOUBLE NOT NULL,
    score_std DOUBLE NOT NULL,
    n_models BIGINT NOT NULL,
    created TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (subspace_id, attribute)
);
CREATE TABLE IF NOT EXISTS hub_files (
    model_id BIGINT NOT NULL, hub VARCHAR NOT NULL, repo VARCHAR NOT NULL, revision VARCHAR,
    path VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, pushed TIMESTAMP DEFAULT current_timestamp
);
ALTER TABLE models ADD COLUMN IF NOT EXISTS source_dtype VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS source_kind VARCHAR;
ALTER TABLE spaces ADD COLUMN IF NOT EXISTS family VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS family VARCHAR;
CREATE TABLE IF NOT EXISTS deltas (
    model_id BIGINT PRIMARY KEY, family VARCHAR NOT NULL, sq_norm DOUBLE NOT NULL, sketch BLOB NOT NULL
);
ALTER TABLE deltas ADD COLUMN IF NOT EXISTS paired BOOLEAN;
CREATE TABLE IF NOT EXISTS delta_pairs (a BIGINT NOT NULL, b BIGINT NOT NULL, d2 DOUBLE NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS near_copies (
    model_id BIGINT NOT NULL, of_id BIGINT NOT NULL, rel_distance DOUBLE NOT NULL, kind VARCHAR NOT NULL,
    created TIMESTAMP DEFAULT current_timestamp
);
"""
# source_dtype: float32/float16/bfloat16 of an imported file (export's default); source_kind: lora/locon/loha/lokr.
# Read apart from MODEL_COLUMNS (Catalog.source_info) so that a registry made before them reads unchanged.
# deltas.paired: the model's exact pairs with its sketch-nearest models are in delta_pairs (registry.delta_pairs;
# false or NULL for models added before them: `verify --repair` computes them).
# family columns of spaces and models (issue 15): registries made before them gain them on first write,
# and `Catalog.migrate` fills them in (FAMILY_MIGRATION)

MODEL_COLUMNS = (
    "id",
    "name",
    "space_id",
    "row_idx",
    "vector_sha256",
    "sq_norm",
    "kind",
    "source",
    "source_format",
    "source_sha256",
    "base_model",
    "created",
    "family",
)


@dataclass
class Space:
    id: str
    base_model: str | None
    layout_fingerprint: str
    dim: int
    n_modules: int
    rows_per_shard: int
    layout_json: str
    n_models: int = 0
    family: str | None = None


@dataclass
class ModelRow:
    id: int
    name: str
    space_id: str
    row_idx: int
    vector_sha256: str
    sq_norm: float
    kind: str
    source: str | None
    source_format: str | None
    source_sha256: str | None
    base_model: str | None
    created: object = None
    family: str | None = None
    attributes: dict[str, float | bool] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in MODEL_COLUMNS}
        d["created"] = str(self.created) if self.created is not None else None
        d["attributes"] = self.attributes
        return d


class ModelTable:
    """Every model of the catalog, in memory: lookups by name or id without a query (Catalog.model_table).

    A search after a fit answers in well under a millisecond; one DuckDB query costs about that much.
    """

    def __init__(self, rows: list[tuple], attrs: list[tuple], kinds: dict[str, str]):
        self.rows = {r[0]: r for r in rows}  # id -> MODEL_COLUMNS values
        self.by_name = {r[1]: r[0] for r in rows}
        self.attrs: dict[int, dict] = {}
        for mid, key, value in attrs:  # ordered by key, as Catalog._models orders them
            self.attrs.setdefault(mid, {})[key] = bool(value) if kinds.get(key) == "bool" else value

    def find(self, ref: str | int) -> int | None:
        """A model's id by exact name, else by numeric id (Catalog.locate's rule); None when neither."""
        mid = self.by_name.get(str(ref))
        if mid is None and str(ref).isdigit() and int(ref) in self.rows:
            mid = int(ref)
        return mid

    def model(self, model_id: int) -> ModelRow:
        """A fresh ModelRow (callers may change it without touching the table)."""
        return ModelRow(*self.rows[model_id], attributes=dict(self.attrs.get(model_id, {})))


def bulk_insert(con, table: str, rows: list[tuple], types: list[str], or_ignore: bool = False) -> None:
    """Insert many rows in one statement: one list parameter per column, unnested side by side.

    DuckDB's executemany runs one statement per row (~2 ms each here); this runs one in all.
    """
    if not rows:
        return
    columns = list(zip(*rows, strict=True))
    select = ", ".join(f"unnest(?::{t}[])" for t in types)
    verb = "INSERT OR IGNORE INTO" if or_ignore else "INSERT INTO"  # or_ignore: rows whose key exists are left out
    con.execute(f"{verb} {table} SELECT {select}", [list(c) for c in columns])


def _int_list(ids) -> str:
    """Ids inlined as SQL literals: int() makes them safe, and DuckDB plans them faster than a list parameter."""
    return ",".join(str(int(i)) for i in ids)


def _quote(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


class _SharedReader:
    """The process's read-only connection to one catalog file, closed after READ_IDLE_S without use.

    One per file and process: DuckDB refuses a second connection to a file with another configuration
    (read-write vs read-only) in the same process, so every Catalog object of a path shares this.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()  # DuckDB connections are not for concurrent use: one user at a time
        self.memo: dict = {}  # results of repeated reads, keyed by the catalog's version
        self.slots: OrderedDict = OrderedDict()  # key -> (version, value): one value per key (Catalog.cached)
        self.pinned: tuple | None = None  # the version `cached` uses inside Catalog.pinned()
        self.con: duckdb.DuckDBPyConnection | None = None
        self.timer: threading.Timer | None = None

    def close(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.con is not None:
                self.con.close()
                self.con = None

    def close_if_idle(self) -> None:
        if self.lock.acquire(blocking=False):  # in use right now: its release schedules another timer
            try:
                if self.con is not None:
                    self.con.close()
                    self.con = None
            finally:
                self.lock.release()


_readers: dict[str, _SharedReader] = {}
_readers_lock = threading.Lock()


@atexit.register
def _close_readers() -> None:
    """Close every shared connection before the interpreter finalizes. An idle timer firing later would close
    its connection in a thread that finalization kills inside DuckDB's C++ code: the process then aborts
    ("terminate called ... FATAL: exception not rethrown") after its work is done."""
    with _readers_lock:
        readers = list(_readers.values())
    for r in readers:
        if r.lock.acquire(timeout=5):  # a thread still reading (a server's) keeps its connection
            try:
                r.close()
            finally:
                r.lock.release()


class Catalog:
    """The catalog file. Reads share one read-only connection per process, closed when idle.

    Opening a DuckDB file costs 10-30 ms, more than a search over thousands of models, so consecutive
    reads (a notebook, a server, the benchmarks) reuse the connection. It is closed after READ_IDLE_S
    without use because a process holding the file, even read-only, keeps other processes from writing
    (they wait and retry meanwhile).
    """

    READ_IDLE_S = 1.0

    def __init__(self, path: Path):
        self.path = Path(path)
        key = str(self.path.resolve())
        with _readers_lock:
            self._shared = _readers.setdefault(key, _SharedReader())

    @contextmanager
    def session(self) -> Iterator[None]:
        """Group reads under one hold of the shared connection."""
        with self._shared.lock:
            yield

    def close(self) -> None:
        self._shared.close()

    def _writer_active(self) -> bool:
        """Whether a writer holds the registry's lock (then readers must not keep the file open)."""
        lock = self.path.parent / ".lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @contextmanager
    def connect(self, write: bool = False, timeout: float = 30.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """The shared read-only connection, or a short-lived read-write one; waits while another process writes."""
        sh = self._shared
        if not write and self._writer_active():
            # a writer (maybe this process) is at work: read through a connection of our own, closed at
            # once, so the writer finds the file free between our reads
            with sh.lock:
                sh.close()
                con = self._open(False, timeout)
                try:
                    yield con
                finally:
                    con.close()
            return
        with sh.lock:
            if write:
                sh.close()  # one process cannot hold the file read-only and read-write at once
                con = self._open(True, timeout)
                try:
                    con.execute(SCHEMA)  # all IF NOT EXISTS: older registries gain new tables on first write
                    yield con
                finally:
                    con.close()
                return
            if sh.timer is not None:
                sh.timer.cancel()
                sh.timer = None
            if sh.con is None:
                sh.con = self._open(False, timeout)
            try:
                yield sh.con
            finally:
                sh.timer = threading.Timer(self.READ_IDLE_S, sh.close_if_idle)
                sh.timer.daemon = True
                sh.timer.start()

    def _open(self, write: bool, timeout: float) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + timeout
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=not write)
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    if "lock" in str(e).lower():
                        raise RegistryLockedError(self.path.parent, timeout) from None
                    raise
                time.sleep(0.05)
        return con

    def needs_migration(self) -> bool:
        """Whether this catalog predates base-model families (issue 15): no family columns, or spaces without one."""
        with self.connect() as con:
            cols = con.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'spaces' AND column_name = 'family'"
            ).fetchone()[0]
            if not cols:
                return True
            return con.execute("SELECT count(*) FROM spaces WHERE family IS NULL").fetchone()[0] > 0

    def migrate(self) -> None:
        """Give every space and model a family: from its layout and base-model string (w2w.family.detect).
        Space ids stay as they are (old ids came from the base-model string; new spaces' from the family)."""
        from w2w import family as wfamily
        from w2w.layout import Layout

        with self.connect(write=True) as con:  # the write connection adds the columns (SCHEMA)
            rows = con.execute("SELECT id, base_model, layout_json FROM spaces WHERE family IS NULL").fetchall()
            con.execute("BEGIN TRANSACTION")
            for sid, base, layout_json in rows:
                fam = wfamily.detect(Layout.from_json(layout_json), base)
                con.execute("UPDATE spaces SET family = ? WHERE id = ?", [fam, sid])
            con.execute(
                "UPDATE models SET family = (SELECT s.family FROM spaces s WHERE s.id = models.space_id) "
                "WHERE family IS NULL"
            )
            con.execute("COMMIT")

    def create(self) -> None:
        with self.connect(write=True) as con:
            con.execute(SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])

    # --- spaces ----------------------------------------------------------------------------------

    def spaces(self, con=None) -> list[Space]:
        sql = (
            "SELECT s.id, s.base_model, s.layout_fingerprint, s.dim, s.n_modules, s.rows_per_shard, s.layout_json, "
            "(SELECT count(*) FROM models m WHERE m.space_id = s.id), s.family FROM spaces s ORDER BY s.created, s.id"
        )
        if con is None:
            with self.connect() as c:
                rows = c.execute(sql).fetchall()
        else:
            rows = con.execute(sql).fetchall()
        return [Space(*r) for r in rows]

    def space(self, space_id: str, con=None) -> Space | None:
        return next((s for s in self.spaces(con) if s.id == space_id), None)

    # --- models ----------------------------------------------------------------------------------

    def _models(self, con, where_sql: str = "", params: list | None = None) -> list[ModelRow]:
        """Model rows with their attributes: two plain queries (GROUP BY or list parameters cost ~5x more)."""
        cols = ", ".join(MODEL_COLUMNS)
        rows = con.execute(f"SELECT {cols} FROM models {where_sql} ORDER BY id", params or []).fetchall()
        models = [ModelRow(*r) for r in rows]
        if models:
            by_id = {m.id: m for m in models}
            kinds = self.attribute_keys(con)
            attrs = con.execute(
                f"SELECT model_id, key, value FROM attributes WHERE model_id IN ({_int_list(by_id)}) ORDER BY key"
            ).fetchall()
            for mid, key, value in attrs:
                by_id[mid].attributes[key] = bool(value) if kinds.get(key) == "bool" else value
        return models

    def models_by_ids(self, ids: list[int]) -> list[ModelRow]:
        with self.connect() as con:
            by_id = {m.id: m for m in self._models(con, f"WHERE id IN ({_int_list(ids)})")} if ids else {}
        return [by_id[i] for i in ids if i in by_id]

    def resolve(self, ref: str | int) -> ModelRow:
        """A model by exact name, else by numeric id."""
        with self.connect() as con:
            found = self._models(con, "WHERE name = ?", [str(ref)])
            if not found and str(ref).isdigit():
                found = self._models(con, "WHERE id = ?", [int(ref)])
            if found:
                return found[0]
            like = con.execute(
                "SELECT name FROM models ORDER BY jaro_winkler_similarity(name, ?) DESC LIMIT 3", [str(ref)]
            ).fetchall()
        raise UnknownModelError(ref, [r[0] for r in like] or None)

    def version(self) -> tuple:
        """Changes whenever any process commits to the catalog (a commit appends to the WAL or checkpoints)."""
        out = []
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                st = p.stat()
                out += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                out += [0, 0]
        return tuple(out)

    def _memo(self, key: tuple, compute):
        """Reads repeated between commits (a server, a notebook running many searches) are answered once."""
        key = (self.version(), *key)
        memo = self._shared.memo
        if key not in memo:
            if len(memo) > 256:
                memo.clear()
            memo[key] = compute()
        return memo[key]

    def cached(self, key: tuple, compute):
        """A value derived from the catalog, kept until the next commit: one value per key, at most CACHE_KEYS
        keys (least recently used dropped), never cleared wholesale as `_memo` is. For what a search after a
        fit needs on every query (the model table, a filter's ids, a subspace's row table)."""
        with self._shared.lock:
            version = self._shared.pinned or self.version()
            slots = self._shared.slots
            hit = slots.get(key)
            if hit is not None and hit[0] == version:
                slots.move_to_end(key)
                return hit[1]
            value = compute()  # a commit meanwhile changes the version again: the next call recomputes
            slots[key] = (version, value)
            slots.move_to_end(key)
            while len(slots) > CACHE_KEYS:
                slots.popitem(last=False)
            return value

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Read the catalog's version once for every `cached` call inside (one search: a few stat calls fewer).

        Holds the shared connection's lock, so no read of this process interleaves."""
        sh = self._shared
        with sh.lock:
            outer, sh.pinned = sh.pinned, sh.pinned or self.version()
            try:
                yield
            finally:
                sh.pinned = outer

    def model_table(self) -> ModelTable:
        """Every model row and its attributes in memory, until the next commit (built in one read)."""
        return self.cached(("model-table",), self._model_table)

    def _model_table(self) -> ModelTable:
        with self.connect() as con:
            rows = con.execute(f"SELECT {', '.join(MODEL_COLUMNS)} FROM models").fetchall()
            attrs = con.execute("SELECT model_id, key, value FROM attributes ORDER BY key").fetchall()
            return ModelTable(rows, attrs, self.attribute_keys(con))

    def filter_ids_cached(self, where: str, space_id: str):
        """filter_ids(where, space_id) as a sorted int64 array, kept until the next commit."""
        import numpy as np

        return self.cached(
            ("filter", where, space_id), lambda: np.asarray(self.filter_ids(where, space_id), dtype=np.int64)
        )

    def locate(self, ref: str | int) -> tuple[int, str, str, int]:
        """(id, name, space, vector row) of a model by exact name, else by numeric id; one light query."""
        return self._memo(("locate", str(ref)), lambda: self._locate(ref))

    def _locate(self, ref: str | int) -> tuple[int, str, str, int]:
        with self.connect() as con:
            sql = "SELECT id, name, space_id, row_idx FROM models WHERE name = ?"
            if str(ref).isdigit():
                sql += " OR (id = ? AND NOT EXISTS (SELECT 1 FROM models WHERE name = ?)) ORDER BY name = ? DESC"
                row = con.execute(sql + " LIMIT 1", [str(ref), int(ref), str(ref), str(ref)]).fetchone()
            else:
                row = con.execute(sql, [str(ref)]).fetchone()
        if row is None:
            self.resolve(ref)  # raises UnknownModelError with suggestions
        return row

    def rows(self, space_id: str, where: str | None = None) -> tuple:
        """(ids, vector rows, squared norms) of the space's models matching `where`, in row order."""
        return self._memo(("rows", space_id, where), lambda: self._rows(space_id, where))

    def _rows(self, space_id: str, where: str | None) -> tuple:
        import numpy as np

        with self.connect() as con:
            if where and where.strip():
                sql, params = self._filter_sql(con, where, space_id)
                query = f"SELECT id, row_idx, sq_norm FROM models WHERE space_id = ? AND id IN ({sql}) ORDER BY row_idx"
                rows = self._run_filter(con, query, [space_id, *params], where)
            else:
                rows = con.execute(
                    "SELECT id, row_idx, sq_norm FROM models WHERE space_id = ? ORDER BY row_idx", [space_id]
                ).fetchall()
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[2] for r in rows], dtype=np.float64),
        )

    def list_models(self, where: str | None = None, space_id: str | None = None) -> list[ModelRow]:
        with self.connect() as con:
            ids = self._filter_ids(con, where, space_id)
            return self._models(con, f"WHERE id IN ({_int_list(ids)})") if ids else []

    def filter_ids(self, where: str | None, space_id: str | None = None) -> list[int]:
        with self.connect() as con:
            return self._filter_ids(con, where, space_id)

    def attribute_keys(self, con=None) -> dict[str, str]:
        if con is None:
            with self.connect() as c:
                return dict(c.execute("SELECT key, kind FROM attribute_keys ORDER BY key").fetchall())
        return dict(con.execute("SELECT key, kind FROM attribute_keys ORDER BY key").fetchall())

    def _filter_ids(self, con, where: str | None, space_id: str | None) -> list[int]:
        """Ids of models matching a SQL condition over attribute columns (and id, name, kind, ...)."""
        sql, params = self._filter_sql(con, where, space_id)
        return [r[0] for r in self._run_filter(con, sql + " ORDER BY id", params, where)]

    def _run_filter(self, con, sql: str, params: list, where: str | None) -> list[tuple]:
        try:
            return con.execute(sql, params).fetchall()
        except duckdb.Error as e:
            msg = str(e).strip().splitlines()[0]
            known = ", ".join(list(RESERVED_COLUMNS) + list(self.attribute_keys(con)))
            raise FilterError(f"--where {where!r} failed: {msg}; columns you can use: {known}") from None

    def _filter_sql(self, con, where: str | None, space_id: str | None) -> tuple[str, list]:
        """SQL selecting the ids of models matching `where`, and its parameters."""
        keys = self.attribute_keys(con)
        cols = []
        for key, kind in keys.items():
            agg = f"max(a.value) FILTER (WHERE a.key = '{key.replace(chr(39), chr(39) * 2)}')"
            cols.append(f"{'CAST(' + agg + ' AS BOOLEAN)' if kind == 'bool' else agg} AS {_quote(key)}")
        view = (
            "SELECT m.id, m.name, m.space_id AS space, m.kind, m.base_model, m.family, m.source_format, m.created"
            + "".join(", " + c for c in cols)
            + " FROM models m LEFT JOIN attributes a ON a.model_id = m.id"
            + " GROUP BY m.id, m.name, m.space_id, m.kind, m.base_model, m.family, m.source_format, m.created"
        )
        conds, params = [], []
        if space_id:
            conds.append("space = ?")
            params.append(space_id)
        if where and where.strip():
            conds.append(f"({where})")
        return f"SELECT id FROM ({view}) WHERE {' AND '.join(conds) or 'true'}", params

    def source_info(self, model_id: int) -> dict[str, str | None]:
        """{source_dtype, source_kind} of a model; None for each on a registry that predates them."""
        with self.connect() as con:
            try:
                row = con.execute("SELECT source_dtype, source_kind FROM models WHERE id = ?", [model_id]).fetchone()
            except duckdb.BinderException:  # columns added on the registry's first write since
                row = None
        return {"source_dtype": row[0] if row else None, "source_kind": row[1] if row else None}

    def lineage(self, model_id: int) -> list[dict]:
        with self.connect() as con:
            rows = con.execute(
                "SELECT l.parent_id, p.name, l.operation, l.params FROM lineage l "
                "LEFT JOIN models p ON p.id = l.parent_id WHERE l.child_id = ?",
                [model_id],
            ).fetchall()
        return [
            {"parent_id": pid, "parent": pname, "operation": op, "params": json.loads(params) if params else None}
            for pid, pname, op, params in rows
        ]

    def near_copies(self, model_id: int) -> list[dict]:
        """The registered models this one was found a near copy of when it was added (registry.sketches)."""
        with self.connect() as con:
            rows = con.execute(
                "SELECT p.name, n.rel_distance, n.kind FROM near_copies n JOIN models p ON p.id = n.of_id "
                "WHERE n.model_id = ? ORDER BY n.rel_distance",
                [model_id],
            ).fetchall()
        return [{"of": name, "relative_distance": rel, "guess": kind} for name, rel, kind in rows]

    def made_by(self, operation: str, **params) -> list[tuple[int, str, dict]]:
        """(id, name, params) of the models an operation made whose lineage params hold every given value."""
        with self.connect() as con:
            rows = con.execute(
                "SELECT l.child_id, m.name, l.params FROM lineage l JOIN models m ON m.id = l.child_id "
                "WHERE l.operation = ? ORDER BY l.child_id",
                [operation],
            ).fetchall()
        found = [(i, name, json.loads(p) if p else {}) for i, name, p in rows]
        return [(i, name, p) for i, name, p in found if all(p.get(k) == v for k, v in params.items())]

    def children(self, model_id: int) -> list[int]:
        """Ids of the models derived from this one (lineage rows naming it as parent), ascending."""
        with self.connect() as con:
            rows = con.execute(
                "SELECT DISTINCT child_id FROM lineage WHERE parent_id = ? ORDER BY child_id", [model_id]
            ).fetchall()
        return [r[0] for r in rows]

    def hub_files(self, model_id: int | None = None) -> list[dict]:
        with self.connect() as con:
            sql = "SELECT model_id, hub, repo, revision, path, sha256, pushed FROM hub_files"
            rows = con.execute(
                sql + (" WHERE model_id = ?" if model_id is not None else ""),
                [model_id] if model_id is not None else [],
            ).fetchall()
        keys = ("model_id", "hub", "repo", "revision", "path", "sha256", "pushed")
        return [dict(zip(keys, (*r[:6], str(r[6])), strict=True)) for r in rows]

"""The w2w space of a registry: fitted subspaces, coefficients, the coefficient index, and derived models.

Files of a subspace `ss-<hex>` of space S:
  subspaces/<id>/subspace.safetensors, meta.json   mean, std, components, singular values (w2w.subspace)
  subspaces/<id>/gaussian.safetensors              per-coefficient mean and std over the fitted models
  subspaces/<id>/coeffs/shard-*.f32                coefficients of every model of S, in projection order
  subspaces/<id>/index_transform.safetensors       T (k, k): the index holds C @ T (see index_transform)
  index/<S>/<id>.faiss                             FAISS index over those coefficients (registry.index)
The catalog's `projections` table maps model -> coefficient row and holds each model's relative
reconstruction error; the newest subspace of a space is its current one. A search after a fit
(Registry._search_fitted) takes candidates from the index (`candidates`) and what it needs of the
catalog from `search_state`, cached until the next commit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from registry import index as coeff_index
from registry.catalog import ModelRow
from registry.vectors import VectorStore, consecutive
from w2w.errors import W2WError
from w2w.formats.pages import give_back
from w2w.subspace import FitConfig, Subspace, SubspaceError, fit, map_in_process, standardize

REFIT_FACTOR = 1.5  # a model is poorly explained when its error exceeds 1.5x the fitted models' p95


class NoSubspaceError(W2WError, LookupError):
    def __init__(self, space_id: str):
        super().__init__(f"space {space_id} has no fitted subspace yet; run `w2wreg fit` first")


def block_rows_for(dim: int) -> int:
    """Rows per block of a fit's reads: ~256 MB. A Gram pass re-reads its D x l operands once per block, so at
    D = 99,648 and l = 350 768-row blocks ran the pass ~5% faster than 384-row ones (bench/bench_fit.py
    --block-rows); two of them are alive in a pass that reads ahead (fit_plan.py counts them)."""
    return max(16, (256 << 20) // (4 * dim))


class StoreSource:
    """Rows of a vector store (a subset, in the given order) as a BlockSource for the subspace passes."""

    def __init__(self, store: VectorStore, rows: np.ndarray, block_rows: int | None = None):
        self.store, self.rows = store, np.asarray(rows, dtype=np.int64)
        self.n, self.dim = len(self.rows), store.dim
        self.block_rows = block_rows or block_rows_for(store.dim)

    def specs(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.block_rows, self.n)) for lo in range(0, self.n, self.block_rows)]

    def load(self, spec: tuple[int, int]) -> np.ndarray:
        return self.store.read(self.rows[spec[0] : spec[1]])

    def load_into(self, spec: tuple[int, int], out: np.ndarray) -> np.ndarray:
        return self.store.read(self.rows[spec[0] : spec[1]], out=out)

    def view(self, spec: tuple[int, int]) -> np.ndarray | None:
        """The block's rows mapped where they lie, when they are consecutive rows of one shard."""
        rows = self.rows[spec[0] : spec[1]]
        return self.store.view(int(rows[0]), len(rows)) if len(rows) and consecutive(rows) else None


@dataclass
class SpaceModel:
    """The current subspace of a space, with what is needed to use it."""

    id: str
    space_id: str
    sub: Subspace
    coeff_mean: np.ndarray  # (k,) over the fitted models
    coeff_std: np.ndarray  # (k,)
    error_p95: float
    folder: Path
    index_path: Path
    index_transform: np.ndarray | None = None  # (k, k) T: the index holds C @ T (see index_transform)
    ordered: bool = False  # T puts the coordinates in decreasing variance (older transforms do not)

    def coeff_store(self) -> VectorStore:
        return VectorStore(self.folder / "coeffs", self.sub.k, 65536)

    @functools.cached_property
    def coords_digest(self) -> str:
        """What the index's coordinates are (a digest of T): its neighbour lists carry it (see _save_index)."""
        if self.index_transform is None:
            return "coefficients"
        return hashlib.sha256(np.ascontiguousarray(self.index_transform, dtype="<f4").tobytes()).hexdigest()

    def index_coords(self, C: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """Coefficients (n, k) or (k,) -> the coordinates the coefficient index holds for them; with overwrite,
        computed in C's own buffer (a float32 C-ordered (n, k) array) a block of rows at a time: at N = 65,000,
        k = 10,000 a copy would be 2.6 GB beside C and the index's own."""
        C = np.asarray(C, dtype=np.float32)
        T = self.index_transform
        if T is None or not overwrite or C.ndim != 2 or not C.flags.c_contiguous or not C.flags.writeable:
            return C if T is None else C @ T
        for lo in range(0, len(C), 4096):
            C[lo : lo + 4096] = C[lo : lo + 4096] @ T
        return C


def subspace_folder(reg, subspace_id: str) -> Path:
    return reg.root / "subspaces" / subspace_id


def current(reg, space_id: str, cache: dict | None = None) -> SpaceModel | None:
    """The newest subspace of a space (loaded once per `cache`: a fitted subspace never changes, but its
    index transform may be rewritten by `reindex`, so that file's stamp is checked)."""
    row = reg.catalog.cached(("current-subspace", space_id), lambda: _current_row(reg, space_id))
    if row is None:
        return None
    if cache is None:
        return load_model(reg, row[0], space_id, row[1])
    key = ("subspace", row[0])
    stamp = _stamp(subspace_folder(reg, row[0]) / INDEX_TRANSFORM_FILE)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, load_model(reg, row[0], space_id, row[1]))
        _drop_others(cache, key, lambda k: cache[k][1].space_id == space_id)
    return hit[1]


def _drop_others(cache: dict, key: tuple, same_space) -> None:
    """Drop the cache's other entries of key's kind for the same space: a refit's predecessors (a server that
    kept them would hold every subspace and index it ever served, an index being GBs at N = 65,000)."""
    for old in [k for k in cache if isinstance(k, tuple) and k[:1] == key[:1] and k != key and same_space(k)]:
        del cache[old]


def _stamp(path: Path) -> tuple | None:
    """What tells a rewritten file (atomic renames change the inode; mtime alone can tie)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _current_row(reg, space_id: str) -> tuple | None:
    with reg.catalog.connect() as con:
        return con.execute(
            "SELECT id, error_p95 FROM subspaces WHERE space_id = ? ORDER BY created DESC, id LIMIT 1", [space_id]
        ).fetchone()


def load_index(sm: SpaceModel, cache: dict):
    """The subspace's coefficient index, loaded once per `cache` and again only when the file changes;
    None when there is none (an interrupted fit: `repair` or the next add rebuilds it)."""
    stamp = _stamp(sm.index_path)
    if stamp is None:
        return None
    key = ("index", str(sm.index_path))
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, coeff_index.load(sm.index_path))
        _drop_others(cache, key, lambda k: Path(k[1]).parent == sm.index_path.parent)
    return hit[1]


def load_lists(sm: SpaceModel, index, cache: dict):
    """The neighbour lists of `index` (the object load_index gave: lists are made from that very index),
    loaded again when either changes; None when there are none for this index and these coordinates."""
    path = coeff_index.lists_path(sm.index_path)
    stamp = _stamp(path)
    if stamp is None:
        return None
    key = ("lists", str(path))
    hit = cache.get(key)
    if hit is None or hit[0] is not index or hit[1] != stamp or hit[2] != sm.coords_digest:
        hit = cache[key] = (index, stamp, sm.coords_digest, coeff_index.load_lists(path, index, sm.coords_digest))
        _drop_others(cache, key, lambda k: Path(k[1]).parent == path.parent)
    return hit[3]


def _save_index(sm: SpaceModel, index) -> None:
    """The index and its neighbour lists, the lists first and tagged with the coordinates' digest: after a
    crash between the two, or between them and a new transform file (_reindex), load_lists refuses them
    (other rows, or other coordinates), verify calls the index stale and repair rebuilds it."""
    rows = coeff_index.neighbor_lists(index)
    coeff_index.save_lists(coeff_index.lists_path(sm.index_path), rows, index, sm.coords_digest)
    coeff_index.save(index, sm.index_path)


# --- search after a fit: what every query needs, kept until the catalog changes -----------------------

USE_LISTS = True  # candidates of a registered model from the neighbour lists (False: the index; for benches)
# Candidates from a graph walk, times this: at N = 65,000 the exact re-rank of the graph's 20 found all 10
# true neighbours for 198 of 200 queries, of its 30 for all 200 (bench/bench_search_fitted.py's sweep).
GRAPH_WIDEN = 1.5
LISTS_STALE = 0.1  # the lists are rebuilt when the rows added since exceed this share of those they cover

FLAT_FILTER_MAX = 20_000  # a filter matching at most this many models is scanned exactly in the index's rows
INDEX_TRANSFORM_FILE = "index_transform.safetensors"


def index_transform(sub: Subspace) -> np.ndarray:
    """T (k, k) such that ||(c1 - c2) @ T|| is the distance in weight space (not standardized) between the
    parts of two models that lie in the subspace: with S = diag(std), ||S V (c1 - c2)||, and
    G = V^T S^2 V = L L^T (Cholesky), T = L R with R orthogonal. R puts the coordinates in decreasing
    variance over the fitted models (their coefficients C = Z V have C^T C = diag(s^2), so C L has
    L^T diag(s^2) L: R is its eigenvectors), so that the index's graph can be built over the leading ones.
    (Computed with the upper factor U = L^T.)

    The coefficient index holds C @ T, so its nearest neighbours are those of the l2 search on the full
    vectors up to the part the subspace does not explain, rather than those of the z-scored space (where a
    column's distance counts by 1/std). On planted data at N = 2,000 (bench/bench_search_fitted.py) it cut
    the candidates an exact coefficient search needs for recall@10 = 1.0 after the exact re-rank from 20 to 12.

    Memory: three k x k float64 arrays at most (U, M and its eigenvectors; each product in place where BLAS
    allows): at k = 10,000 2.4 GB above the components, where a plain numpy version held ~4.8 GB.
    """
    from scipy.linalg import blas, cholesky, eigh

    G = np.zeros((sub.k, sub.k), order="F")  # its upper triangle: G is symmetric
    for lo in range(0, sub.dim, 16384):  # float64 sums of float32 products: D is long
        block = sub.components[lo : lo + 16384]
        Vs = block * sub.std[lo : lo + 16384, None]  # a block of S V: never all (D, k)
        give_back(block)  # when the components are a file's map: read once
        syrk = blas.ssyrk if Vs.dtype == np.float32 else blas.dsyrk
        G += syrk(1.0, Vs.T)  # Vs^T Vs, upper triangle: half a gemm's flops (Vs.T is Fortran-ordered)
    U = cholesky(G, lower=False, overwrite_a=True, check_finite=False)  # G = U^T U, in G's buffer
    del G
    P = U * np.asarray(sub.singular_values, np.float64)[None, :]  # U diag(s)
    M = blas.dsyrk(1.0, P)  # U diag(s^2) U^T, upper triangle
    del P
    # every pair by MRRR (dsyevr): its eigenvectors are a new array, M its workspace; as fast as dsyevd here
    # (w2w.rayleigh_ritz), whose 2 k^2 doubles of workspace would be 0.8 GB more at k = 10,000
    _, R = eigh(M, lower=False, overwrite_a=True, check_finite=False, driver="evr")  # ascending
    del M
    T = blas.dtrmm(1.0, U, R, trans_a=1, overwrite_b=1)  # U^T R, in R's buffer
    return np.ascontiguousarray(T[:, ::-1], dtype=np.float32)


def save_index_transform(folder: Path, T: np.ndarray) -> None:
    from safetensors.numpy import save

    from w2w.formats.tensorfile import atomic_write_bytes

    atomic_write_bytes(folder / INDEX_TRANSFORM_FILE, save({"transform": T}, metadata={"order": "variance"}))


def read_index_transform(folder: Path) -> tuple[np.ndarray | None, bool]:
    """(T, whether its coordinates are in variance order); (None, False) for a subspace older than T."""
    from safetensors import safe_open

    path = folder / INDEX_TRANSFORM_FILE
    if not path.exists():
        return None, False
    with safe_open(str(path), "numpy") as f:
        return f.get_tensor("transform"), (f.metadata() or {}).get("order") == "variance"


@dataclass
class SearchState:
    """The row table of a space, in memory (see search_state)."""

    ids: np.ndarray  # (n,) model ids of the space, ascending
    rows: np.ndarray  # (n,) their vector rows
    sq_norms: np.ndarray  # (n,)

    def positions(self, model_ids: np.ndarray) -> np.ndarray:
        """Positions in `ids` of model ids, in the order given; ids this state does not hold (committed
        after it was read) are left out."""
        model_ids = np.asarray(model_ids, dtype=np.int64)
        if not len(self.ids):
            return model_ids[:0]
        pos = np.minimum(np.searchsorted(self.ids, model_ids), len(self.ids) - 1)
        return pos[self.ids[pos] == model_ids]


def search_state(reg, space_id: str) -> SearchState:
    """The SearchState of a space: one catalog read, kept until the next commit."""
    return reg.catalog.cached(("search-state", space_id), lambda: _read_search_state(reg, space_id))


def _read_search_state(reg, space_id: str) -> SearchState:
    with reg.catalog.connect() as con:
        cols = con.execute(
            "SELECT id, row_idx, sq_norm FROM models WHERE space_id = ? ORDER BY id", [space_id]
        ).fetchnumpy()
    return SearchState(
        np.asarray(cols["id"], np.int64), np.asarray(cols["row_idx"], np.int64), np.asarray(cols["sq_norm"], np.float64)
    )


def candidates(
    reg, sm: SpaceModel, index, y: np.ndarray, n: int, where: str | None, exclude: int | None, widen: bool = False
) -> np.ndarray:
    """The n model ids nearest y (index coordinates) among the models matching `where`, without `exclude`;
    with `widen`, GRAPH_WIDEN times as many when they come from a graph (for a re-rank). Unfiltered, for
    a model the neighbour lists cover: its list. A filter matching at most FLAT_FILTER_MAX models: an exact
    scan of their rows in the index (a filtered graph walk visits mostly models the filter rejects); a
    larger one, the index with an ID selector."""
    lists = load_lists(sm, index, reg._cache) if where is None and exclude is not None and USE_LISTS else None
    row = lists.row_of(exclude) if lists is not None and n <= lists.rows.shape[1] else None
    if row is not None:
        rows = lists.rows[row, :n].astype(np.int64)
        if len(lists.added):  # the lists do not know these: the best n of both, exactly
            rows, _ = coeff_index.search_rows(coeff_index.stored(index), y, n, np.concatenate([rows, lists.added]))
        return lists.ids[rows]
    if widen and coeff_index.kind_of(index) == "hnsw":
        n = int(n * GRAPH_WIDEN)
    if where is None:
        found = coeff_index.search(index, y, n + 1)
    else:
        allowed = reg.catalog.filter_ids_cached(where, sm.space_id)
        if len(allowed) <= FLAT_FILTER_MAX or coeff_index.kind_of(index) == "flat":
            key = ("filter-index-rows", where, str(sm.index_path), _stamp(sm.index_path))  # rows move on rebuilds
            rows, row_ids = reg.catalog.cached(key, lambda: _index_rows(index, allowed))
            found, _ = coeff_index.search_rows(coeff_index.stored(index), y, n + 1, rows)
            found = row_ids[found]
        else:
            key = ("selector", where, str(sm.index_path), _stamp(sm.index_path))  # rows, for 2 stages
            sel = reg.catalog.cached(key, lambda: coeff_index.selector(index, allowed))
            found = coeff_index.search(index, y, n + 1, allowed, sel=sel)
    return found[found != (-1 if exclude is None else exclude)][:n]


def _index_rows(index, model_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the index holding these models, ascending; the model id of every index row)."""
    return coeff_index.rows_of(index, model_ids), coeff_index.ids_of(index)


def reindex(reg, sm: SpaceModel, say=None) -> None:
    """Rebuild a subspace's coefficient index and its neighbour lists from its coefficient store (no pass
    over the vectors), with the current index transform; for an index lost, or made by an older release.
    Holds the writer lock."""
    (say or (lambda _: None))(f"rebuilding the coefficient index of {sm.id}")
    with reg.writing():
        _reindex(reg, sm)


def _reindex(reg, sm: SpaceModel) -> None:
    with reg.catalog.connect() as con:
        cols = con.execute(
            "SELECT model_id, coeff_row FROM projections WHERE subspace_id = ? ORDER BY coeff_row", [sm.id]
        ).fetchnumpy()
    new = replace(sm, index_transform=index_transform(sm.sub), ordered=True)  # the cached `sm` stays as it was
    C = new.coeff_store().read(np.asarray(cols["coeff_row"], np.int64))  # (n, k)
    ids = np.asarray(cols["model_id"], np.int64)
    _save_index(new, coeff_index.build(new.index_coords(C, overwrite=True), ids, ordered=True))
    save_index_transform(sm.folder, new.index_transform)  # last: `current` reloads the subspace on its stamp


def load_model(reg, subspace_id: str, space_id: str, error_p95: float) -> SpaceModel:
    from safetensors.numpy import load_file

    folder = subspace_folder(reg, subspace_id)
    g = load_file(str(folder / "gaussian.safetensors"))
    T, ordered = read_index_transform(folder)  # None for subspaces fitted before it existed: their index holds C
    return SpaceModel(
        subspace_id,
        space_id,
        Subspace.load(folder),
        g["mean"],
        g["std"],
        error_p95,
        folder,
        _index_path(reg, space_id, subspace_id),
        T,
        ordered,
    )


def _index_path(reg, space_id: str, subspace_id: str) -> Path:
    return reg.paths.index(space_id) / f"{subspace_id}.faiss"


def require(reg, space_id: str) -> SpaceModel:
    sm = current(reg, space_id)
    if sm is None:
        raise NoSubspaceError(space_id)
    return sm


def pick_space(reg, space_id: str | None) -> str:
    spaces = reg.spaces()
    if space_id:
        if space_id not in {s.id for s in spaces}:
            raise W2WError(f"no space {space_id!r}; spaces: {', '.join(s.id for s in spaces) or 'none'}")
        return space_id
    populated = [s for s in spaces if s.n_models]
    if len(populated) == 1:
        return populated[0].id
    if not populated:
        raise W2WError("the registry holds no models yet; add some with `w2wreg add`")
    listing = ", ".join(f"{s.id} ({s.n_models} models)" for s in populated)
    raise W2WError(f"the registry has several spaces: {listing}; pass --space")


def _mapper(scheduler: str | None):
    if not scheduler:
        return map_in_process
    from registry.distributed import dask_mapper

    return dask_mapper(scheduler)


def fit_space(
    reg,
    space_id: str | None = None,
    components: int = 1000,
    where: str | None = None,
    scheduler: str | None = None,
    config: FitConfig | None = None,
    say=None,
) -> dict:
    """Fit a new, versioned subspace over the models of a space (those matching `where`) and index them.

    An on-disk Krylov basis (config.out_of_core, or a budget the in-RAM fit would pass) lives in the
    registry's tmp/ folder as unlinked files: nothing is left there whether the fit ends or crashes."""
    say = say or (lambda _: None)
    space_id = pick_space(reg, space_id)
    space = reg.space(space_id)
    ids = reg.catalog.filter_ids(where, space_id)
    if len(ids) < 3:
        raise SubspaceError(f"a fit needs at least 3 models, {len(ids)} match in space {space_id}")
    cfg = config or FitConfig(components=components)
    cfg.workdir = cfg.workdir or str(reg.root / "tmp")
    with reg.catalog.connect() as con:
        rows = dict(con.execute("SELECT id, row_idx FROM models WHERE id IN (SELECT unnest(?))", [ids]).fetchall())
    fit_rows = np.array([rows[i] for i in ids], dtype=np.int64)
    store = reg.store(space)
    t0 = time.perf_counter()
    mapper = _mapper(scheduler)
    try:
        sub = fit(StoreSource(store, fit_rows), cfg, model_ids=ids, map_blocks=mapper, progress=say)
        fit_s = time.perf_counter() - t0
    finally:
        client = getattr(mapper, "client", None)
        if client is not None:
            client.close()
    out = _register_subspace(reg, space_id, sub, ids, where, {"fit_seconds": fit_s}, say)
    return {**out, "fit_seconds": round(fit_s, 3), "passes": 1 + int(sub.config.get("depth", 1))}


def adopted(mean: np.ndarray, std: np.ndarray, components: np.ndarray, ids: list[int], meta: dict) -> Subspace:
    """A subspace fitted elsewhere (mean, std (D,), orthonormal components (D, k)) over the models `ids`, to be
    registered by adopt_subspace. The Subspace holds the components: a caller that keeps no other reference
    to them lets registration free them once they are saved."""
    D, k = components.shape
    if mean.shape != (D,) or std.shape != (D,):
        raise SubspaceError(f"mean {mean.shape} and std {std.shape} do not fit components {components.shape}")
    if len(ids) < 2:
        raise SubspaceError(f"a subspace needs the models it was fitted on; {len(ids)} given")
    std = np.where(std > 0, std, 1.0).astype(np.float32)  # constant columns, as our fit keeps them
    return Subspace(mean.astype(np.float32), std, components, np.ones(k), 1.0, len(ids), list(ids), {"k": k, **meta})


def adopt_subspace(reg, space_id: str, sub: Subspace, say=None) -> dict:
    """Register a subspace fitted elsewhere (made by `adopted`) as a subspace of a space, over the models it was
    fitted on: their projections give the singular values, the total variance and the Gaussians that a fit of
    ours would have given. Then every model is projected and indexed."""
    say = say or (lambda _: None)
    space = reg.space(space_id)
    if space.dim != sub.dim:
        raise SubspaceError(f"components {sub.components.shape} do not fit space {space_id} (D = {space.dim:,})")
    ids, meta = sub.model_ids, {k: v for k, v in sub.config.items() if k != "k"}
    all_ids, C_all, err_all, sq_all = _project_space(reg, space_id, sub, say)
    fitted = np.isin(all_ids, np.asarray(ids, dtype=np.int64))
    C = C_all[fitted].astype(np.float64)  # (n, k)
    # Z is centred over the fitted models when `mean` is theirs, so ||C_j|| is the j-th singular value of Z
    sub.singular_values = np.sqrt((C**2).sum(axis=0))
    sub.total_variance = float(sq_all[fitted].sum()) / max(len(ids) - 1, 1)
    return _register_subspace(reg, space_id, sub, ids, None, meta, say, (all_ids, C_all, err_all))


def _register_subspace(reg, space_id: str, sub: Subspace, ids: list[int], where, meta: dict, say, projected=None):
    """Save a subspace, project and index every model of its space, and commit its catalog row last: a
    registration that fails or is interrupted removes what it wrote (a process killed outright leaves a folder
    that no catalog row names: verify reports it as an orphan)."""
    subspace_id = "ss-" + hashlib.sha256(f"{space_id}|{time.time_ns()}|{len(ids)}".encode()).hexdigest()[:10]
    folder = subspace_folder(reg, subspace_id)
    with reg.writing():
        try:
            sub.save(folder, {"id": subspace_id, "space": space_id, "where": where, **meta})
            # from here the components are read from the file just written: their copy in memory (4 GB at
            # k = 10,000) is freed unless the caller holds it, and the steps below hand back what they read of it
            sub.map_components(folder)
            # one pass projects every model of the space; the fitted ones' rows give the Gaussians and the p95
            all_ids, C_all, err_all = projected or _project_space(reg, space_id, sub, say)[:3]
            fitted = np.isin(all_ids, np.asarray(ids, dtype=np.int64))
            C, p95 = C_all[fitted], float(np.percentile(err_all[fitted], 95))  # (n, k)
            gm, gs = C.mean(axis=0).astype(np.float32), C.std(axis=0).astype(np.float32)  # the Gaussians of `sample`
            from safetensors.numpy import save

            from w2w.formats.tensorfile import atomic_write_bytes

            atomic_write_bytes(folder / "gaussian.safetensors", save({"mean": gm, "std": gs}))
            T = index_transform(sub)
            save_index_transform(folder, T)
            # the subspace in hand, not read back: at k = 10,000 its components are 4 GB
            sm = SpaceModel(
                subspace_id, space_id, sub, gm, gs, p95, folder, _index_path(reg, space_id, subspace_id), T, True
            )
            row = [subspace_id, space_id, sub.k, len(ids), where, float(sub.explained_variance_ratio.sum()), p95,
                   json.dumps(sub.config)]  # fmt: skip
            _store_projections(reg, sm, all_ids, C_all, err_all, subspace_row=row)
        except BaseException:
            _discard(reg, space_id, subspace_id)
            raise
    return {
        "subspace": subspace_id,
        "space": space_id,
        "k": sub.k,
        "n_models": len(ids),
        "explained_variance_ratio": float(sub.explained_variance_ratio.sum()),
        "error_p95": p95,
    }


def _discard(reg, space_id: str, subspace_id: str) -> None:
    """The files of a registration that failed or was interrupted before its catalog row was committed (at
    k = 10,000 the components alone are 4 GB): removed, unless the row is there after all."""
    import shutil

    try:
        with reg.catalog.connect() as con:
            if con.execute("SELECT 1 FROM subspaces WHERE id = ?", [subspace_id]).fetchone():
                return
    except Exception:
        return  # the catalog cannot say: keep the files (verify reports them if no row names them)
    shutil.rmtree(subspace_folder(reg, subspace_id), ignore_errors=True)
    index = _index_path(reg, space_id, subspace_id)
    for p in (index, coeff_index.lists_path(index)):
        p.unlink(missing_ok=True)


def _project_space(reg, space_id: str, sub: Subspace, say) -> tuple[np.ndarray, ...]:
    """(ids, coefficients (n, k), relative errors (n,), ||z||^2 (n,)) of every model of a space, in one read of
    the vectors."""
    with reg.catalog.connect() as con:
        rows = con.execute("SELECT id, row_idx FROM models WHERE space_id = ? ORDER BY row_idx", [space_id]).fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    source = StoreSource(reg.store(reg.space(space_id)), np.array([r[1] for r in rows], dtype=np.int64))
    say(f"projecting {len(ids)} models and building the coefficient index")
    C = np.empty((len(ids), sub.k), dtype=np.float32)
    errors, sq = np.empty(len(ids)), np.empty(len(ids))
    V = sub.components
    for lo, hi in source.specs():
        Z = standardize(source.load((lo, hi)), sub.mean, sub.std)  # (b, D), standardized once
        C[lo:hi] = Z @ V  # (b, k): sub.project
        # sub.relative_error, reusing the coefficients: two products per block instead of three
        resid = Z - C[lo:hi] @ V.T
        nz = np.linalg.norm(Z, axis=1)
        sq[lo:hi] = nz.astype(np.float64) ** 2
        errors[lo:hi] = np.linalg.norm(resid, axis=1) / np.maximum(nz, 1e-30)
    give_back(V)  # when V is a file's map: its pages, read by every block, are not kept past the pass
    return ids, C, errors, sq


def _index_all(reg, sm: SpaceModel, say) -> None:
    """Project every model of the space into `sm` and (re)build its coefficient index. Holds the writer lock."""
    _store_projections(reg, sm, *_project_space(reg, sm.space_id, sm.sub, say)[:3])


def _store_projections(
    reg, sm: SpaceModel, ids: np.ndarray, C: np.ndarray, errors: np.ndarray, subspace_row: list | None = None
) -> None:
    """Write coefficients, index and projection rows; with `subspace_row`, the subspace's catalog row is
    inserted in the same transaction. C's buffer is reused for the index's coordinates (overwritten)."""
    from registry.catalog import bulk_insert

    cs = sm.coeff_store()
    cs.truncate(0)
    cs.write_rows(0, C)
    # C is stored: its buffer becomes the index's coordinates (callers pass C for this and nothing after)
    _save_index(sm, coeff_index.build(sm.index_coords(C, overwrite=True), ids, ordered=sm.ordered))
    with reg.catalog.connect(write=True) as con:
        con.execute("BEGIN TRANSACTION")
        if subspace_row is not None:
            con.execute(
                "INSERT INTO subspaces (id, space_id, k, n_models, where_filter, explained, error_p95, config) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                subspace_row,
            )
        con.execute("DELETE FROM projections WHERE subspace_id = ?", [sm.id])
        # one statement for all rows: executemany runs one per row (~2 ms each: 2 minutes at N = 65,000)
        bulk_insert(
            con,
            "projections",
            [(sm.id, int(i), r, float(e)) for r, (i, e) in enumerate(zip(ids, errors, strict=True))],
            ["VARCHAR", "BIGINT", "BIGINT", "DOUBLE"],
        )
        con.execute("COMMIT")


def project_new(reg, model_ids: list[int]) -> None:
    """Project newly added models into the current subspace of their space (called under the writer lock)."""
    if not model_ids:
        return
    by_space: dict[str, list[ModelRow]] = {}
    for m in reg.catalog.models_by_ids(model_ids):
        by_space.setdefault(m.space_id, []).append(m)
    with reg.catalog.connect() as con:  # one query, not one per space: a hub's add touches hundreds of layouts
        fitted = {r[0] for r in con.execute("SELECT DISTINCT space_id FROM subspaces").fetchall()}
    for space_id, models in by_space.items():
        if space_id not in fitted:
            continue
        sm = current(reg, space_id)
        if sm is None:
            continue
        with reg.catalog.connect() as con:
            n = con.execute("SELECT count(*) FROM projections WHERE subspace_id = ?", [sm.id]).fetchone()[0]
        if not sm.index_path.exists() or sm.coeff_store().rows_on_disk() < n:
            _index_all(reg, sm, lambda _: None)  # an interrupted fit or a lost file: rebuild it all
            continue
        W = reg.store(reg.space(space_id)).read([m.row_idx for m in models])
        C = sm.sub.project(W)  # (n_new, k)
        errors = sm.sub.relative_error(W)
        cs = sm.coeff_store()
        cs.truncate(n)
        cs.write_rows(n, C)
        index = coeff_index.load(sm.index_path)
        index.add_with_ids(np.ascontiguousarray(sm.index_coords(C)), np.array([m.id for m in models], dtype=np.int64))
        lists = coeff_index.load_lists(coeff_index.lists_path(sm.index_path), index, sm.coords_digest)
        if lists is None or len(lists.added) > LISTS_STALE * max(lists.n, 1000):
            _save_index(sm, index)  # the lists again, over every row (n^2 k flops: ~45 s at 65,000 x 1,000)
        else:
            coeff_index.save(index, sm.index_path)  # the lists stay right for the rows they cover
        with reg.catalog.connect(write=True) as con:
            con.executemany(
                "INSERT INTO projections VALUES (?, ?, ?, ?)",
                [(sm.id, m.id, n + i, float(e)) for i, (m, e) in enumerate(zip(models, errors, strict=True))],
            )


def coefficients(reg, sm: SpaceModel, model_ids: list[int]) -> np.ndarray:
    """Stored coefficients of models, (n, k), in the order asked."""
    rows = _coeff_positions(reg, sm, model_ids)
    if (rows < 0).any():
        missing = [int(i) for i, r in zip(model_ids, rows, strict=True) if r < 0]
        raise W2WError(f"models {missing[:5]} have no coefficients in subspace {sm.id}; run `w2wreg repair`")
    return sm.coeff_store().read(rows.tolist())


def stored_coefficients(reg, sm: SpaceModel, model_id: int) -> np.ndarray | None:
    """A model's stored coefficients (k,) in subspace sm; None if it was not projected into it (yet)."""
    (row,) = _coeff_positions(reg, sm, [model_id])
    return None if row < 0 else sm.coeff_store().read([int(row)])[0]


def _coeff_positions(reg, sm: SpaceModel, model_ids: list[int]) -> np.ndarray:
    """The coefficient rows of models in subspace sm, -1 for a model not projected into it (no SQL per call)."""
    ids, rows = _coeff_rows(reg, sm)
    want = np.asarray(model_ids, dtype=np.int64).reshape(-1)
    if not len(ids):
        return np.full(len(want), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, want), len(ids) - 1)
    return np.where(ids[at] == want, rows[at], -1)


# `search --metric w2w`: the angle between two models' coordinates in the fitted w2w space. Raw weight vectors
# share a large common part (every identity LoRA moves the same weights the same way first), so by l2, cosine
# or delta one low-norm model is nearest to almost everyone (the demo: one of 128 identities was the l2
# nearest of 110); centered, z-scored and projected (the coefficients), neighbours share 84% of their
# attributes, against 57% by l2 and 50% by chance, and no model is nearest to more than 5 (README, "Search").
W2W_METRIC = "w2w"
COEFF_SCAN_ROWS = 16384  # coefficient rows scored at a time: memory O(rows k), whatever the registry's size


def _coeff_rows(reg, sm: SpaceModel) -> tuple[np.ndarray, np.ndarray]:
    """(model ids ascending, their coefficient rows) of every model projected into subspace sm."""

    def read() -> tuple[np.ndarray, np.ndarray]:
        with reg.catalog.connect() as con:
            cols = con.execute(
                "SELECT model_id, coeff_row FROM projections WHERE subspace_id = ? ORDER BY model_id", [sm.id]
            ).fetchnumpy()
        return np.asarray(cols["model_id"], np.int64), np.asarray(cols["coeff_row"], np.int64)

    return reg.catalog.cached(("coeff-rows", sm.id), read)


def nearest_by_angle(
    reg, sm: SpaceModel, c: np.ndarray, k: int, where: str | None, exclude: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(model ids, 1 - cos) of the k models whose coefficients in sm make the smallest angle with c (k,),
    among those matching `where`, without `exclude`: exact, a scan of the coefficient store in chunks."""
    ids, rows = _coeff_rows(reg, sm)
    keep = ids != (-1 if exclude is None else exclude)
    if where is not None:
        keep &= np.isin(ids, reg.catalog.filter_ids_cached(where, sm.space_id))
    ids, rows = ids[keep], rows[keep]
    c = np.asarray(c, dtype=np.float64)
    cn = float(np.linalg.norm(c))
    store = sm.coeff_store()
    best_ids, best_d = np.zeros(0, np.int64), np.zeros(0)
    for lo in range(0, len(rows), COEFF_SCAN_ROWS):
        C = store.read(rows[lo : lo + COEFF_SCAN_ROWS]).astype(np.float64)
        norms = np.linalg.norm(C, axis=1) * cn
        # a zero vector (the space's mean itself) has no angle: it is as far as orthogonal
        d = 1.0 - np.divide(C @ c, norms, out=np.zeros(len(C)), where=norms > 0)
        best_ids = np.concatenate([best_ids, ids[lo : lo + COEFF_SCAN_ROWS]])
        best_d = np.concatenate([best_d, d])
        if len(best_d) > k:
            top = np.argpartition(best_d, k - 1)[:k]
            best_ids, best_d = best_ids[top], best_d[top]
    order = np.lexsort((best_ids, best_d))  # ties: the older model first
    return best_ids[order][:k], best_d[order][:k]


def projection_info(reg, model_id: int) -> dict | None:
    """Subspace, relative error and whether the space explains this model well, for show/ls."""
    with reg.catalog.connect() as con:
        row = con.execute(
            "SELECT p.subspace_id, p.rel_error, s.error_p95, s.created FROM projections p "
            "JOIN subspaces s ON s.id = p.subspace_id JOIN models m ON m.id = p.model_id "
            "WHERE p.model_id = ? AND s.space_id = m.space_id ORDER BY s.created DESC LIMIT 1",
            [model_id],
        ).fetchone()
    if row is None:
        return None
    sub_id, err, p95, _ = row
    return {
        "subspace": sub_id,
        "relative_error": err,
        "fitted_p95": p95,
        "well_explained": bool(err <= REFIT_FACTOR * p95 + 1e-6),
    }


def staleness(reg, space_id: str) -> dict | None:
    """How many models the current subspace explains poorly, and how many arrived after the fit."""
    sm = current(reg, space_id)
    if sm is None:
        return None
    with reg.catalog.connect() as con:
        n_total, n_poor = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE rel_error > ?) FROM projections WHERE subspace_id = ?",
            [REFIT_FACTOR * sm.error_p95 + 1e-6, sm.id],
        ).fetchone()
    return {
        "subspace": sm.id,
        "fitted_on": sm.sub.n_models,
        "projected": n_total,
        "poorly_explained": n_poor,
        "refit_advised": n_poor > max(1, 0.05 * n_total),
    }


# --- derived models ---------------------------------------------------------------------------------


def register_derived(reg, space_id: str, items: list[tuple[str, np.ndarray, str, list[tuple]]]) -> list[int]:
    """Register vectors made in a space (name, vector, kind, lineage) as models. Returns their ids."""
    from registry.registry import NewModel

    space = reg.space(space_id)
    layout = reg.layout(space_id)
    new = [
        NewModel(
            name,
            vec.astype(np.float32),
            layout,
            base_model=space.base_model,
            family=space.family,
            kind=kind,
            source=f"w2wreg {kind}",
            lineage=lineage,
        )
        for name, vec, kind, lineage in items
    ]
    report = reg.add_models(new)
    problems = [e for _, e in report.errors] + [r for _, r in report.skipped]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        if report.committed:
            more += f"; the other {len(report.added)} were added"
        raise W2WError(problems[0] + more)
    return [i for _, i in report.added]


SAMPLE_ROWS = 16  # samples are reconstructed in zero-padded blocks of this many rows (see _reconstruct_rows)


def _reconstruct_rows(sub, C: np.ndarray) -> np.ndarray:
    """sub.reconstruct of each row, its bits independent of the other rows and of how many there are.

    BLAS picks kernel and blocking by the matrix shape, and within one shape a row's result does not depend
    on the other rows' values: every product here has the shape (SAMPLE_ROWS, k), so sample i of a seed is
    the same bits whether 1 or 300 were drawn (on one machine; another CPU may round differently).
    """
    out = np.empty((len(C), sub.mean.shape[0]), dtype=np.float32)
    block = np.zeros((SAMPLE_ROWS, C.shape[1]), dtype=np.float32)
    for start in range(0, len(C), SAMPLE_ROWS):
        rows = C[start : start + SAMPLE_ROWS]
        block[:] = 0
        block[: len(rows)] = rows
        out[start : start + len(rows)] = sub.reconstruct(block)[: len(rows)]
    return out


def sample(
    reg,
    n: int = 5,
    seed: int = 0,
    temperature: float = 1.0,
    prefix: str = "sample",
    space_id: str | None = None,
    components: int | None = None,
    bandwidth: float | None = None,
) -> list[dict]:
    """New models: each coefficient drawn from its own Gaussian fitted over the registry's models (as the paper),
    or with `bandwidth` h a smoothed bootstrap of the fitted models' coefficients (w2w.sampling).

    A sample is named by what drew it (subspace, seed, index, temperature, components, bandwidth): drawing one again
    returns the model already registered (`"existing": True`), whatever prefix is asked for, instead of a
    second copy; the others are added. Returns one dict (id, name, existing) per index, in order.
    """
    from w2w.sampling import draw

    space_id = pick_space(reg, space_id)
    sm = require(reg, space_id)
    k = min(components or sm.sub.k, sm.sub.k)
    fitted = coefficients(reg, sm, sm.sub.model_ids)[:, :k] if bandwidth is not None else None
    # (n, k): row i is the seed's i-th draw
    C = draw(np.random.default_rng(seed), n, sm.coeff_mean[:k], sm.coeff_std[:k], temperature, fitted, bandwidth)
    drawn = {"subspace": sm.id, "seed": seed, "temperature": temperature, "components": k}
    if bandwidth is not None:
        drawn["bandwidth"] = bandwidth
    known = {
        p["index"]: (i, name)
        for i, name, p in reg.catalog.made_by("sample", **drawn)
        if p.get("index", n) < n and p.get("bandwidth") == bandwidth  # a Gaussian draw has none
    }
    todo = [i for i in range(n) if i not in known]
    W = _reconstruct_rows(sm.sub, C[todo].astype(np.float32))  # (len(todo), D)
    items = [
        (f"{prefix}-s{seed}-{i}", W[j], "sample", [(None, "sample", {**drawn, "index": i})]) for j, i in enumerate(todo)
    ]
    new = dict(zip(todo, register_derived(reg, space_id, items), strict=True)) if items else {}
    out = []
    for i in range(n):
        if i in known:
            out.append({"id": known[i][0], "name": known[i][1], "existing": True})
        else:
            out.append({"id": new[i], "name": items[todo.index(i)][0], "existing": False})
    return out

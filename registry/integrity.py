"""verify: prove that catalog, vectors and hub files agree; repair: rebuild what can be rebuilt.

The vector store is the source of truth for weights; the catalog records, per model, the sha256 of
its vector row and of every file pushed to the local hub. An index (from the subspace issue on) is
derived data and is rebuilt from the vectors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from registry import delta_pairs
from registry.registry import Registry, vector_sha256
from w2w.errors import W2WError


@dataclass
class Finding:
    kind: str  # "error" (the parts disagree), "orphan" (on disk, unknown to the catalog) or "stale" (derived
    # data that an older release made or a write left behind: right, but slower to use)
    what: str
    detail: str
    fixable: bool = False

    def to_json(self) -> dict:
        return {"kind": self.kind, "what": self.what, "detail": self.detail, "fixable": self.fixable}


@dataclass
class VerifyReport:
    models: int = 0
    spaces: int = 0
    hub_files: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.kind == "error" for f in self.findings)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "models": self.models,
            "spaces": self.spaces,
            "hub_files": self.hub_files,
            "findings": [f.to_json() for f in self.findings],
        }


def verify(reg: Registry) -> VerifyReport:
    report = VerifyReport()
    spaces = reg.spaces()
    report.spaces = len(spaces)
    with reg.catalog.connect() as con:
        models = con.execute(
            "SELECT id, name, space_id, row_idx, vector_sha256 FROM models ORDER BY space_id, row_idx"
        ).fetchall()
    report.models = len(models)
    by_space: dict[str, list] = {}
    for m in models:
        by_space.setdefault(m[2], []).append(m)
    for space in spaces:
        store = reg.store(space)
        rows = by_space.get(space.id, [])
        on_disk = store.rows_on_disk()
        expected = [r[3] for r in rows]
        if expected != list(range(len(rows))):
            report.findings.append(
                Finding("error", f"space {space.id}", "model rows are not 0..n-1 (a row used twice or skipped)")
            )
        # a row exists when its shard holds its bytes (a middle shard may be short or missing, not just the end)
        present = [r for r in rows if store.rows_available(r[3] // store.rows_per_shard) > r[3] % store.rows_per_shard]
        missing = [r for r in rows if r not in present]
        for mid, name, _, row, _ in missing:
            report.findings.append(
                Finding(
                    "error",
                    f"model {name} (id {mid})",
                    f"vector row {row} is missing from its shard",
                    fixable=_has_hub_copy(reg, mid),
                )  # fmt: skip
            )
        if not missing and on_disk > len(rows):
            report.findings.append(
                Finding(
                    "error",
                    f"space {space.id}",
                    f"{on_disk - len(rows)} uncommitted rows at the end of the vector store "
                    "(left by an interrupted write)",
                    fixable=True,
                )
            )
        for lo in range(0, len(present), 256):
            chunk = present[lo : lo + 256]
            X = store.read([r[3] for r in chunk])
            for (mid, name, _, row, sha), v in zip(chunk, X, strict=True):
                if vector_sha256(v) != sha:
                    report.findings.append(
                        Finding(
                            "error",
                            f"model {name} (id {mid})",
                            f"vector row {row} does not match its sha256",
                            fixable=_has_hub_copy(reg, mid),
                        )
                    )
    for space in spaces:
        report.findings += _check_subspace(reg, space, by_space.get(space.id, []))
    with reg.catalog.connect() as con:
        no_delta = con.execute(
            "SELECT count(*) FROM models m LEFT JOIN deltas d ON d.model_id = m.id WHERE d.model_id IS NULL"
        ).fetchone()[0]
    if no_delta:
        report.findings.append(
            Finding(
                "stale",
                "deltas",
                f"{no_delta} models have no dW sketch (--metric delta and near-copy checks miss them)",
                fixable=True,
            )
        )
    unpaired = delta_pairs.unpaired(reg)
    if unpaired:
        report.findings.append(
            Finding(
                "stale",
                "delta pairs",
                f"{unpaired} models were added before exact pairs with their nearest models were kept "
                "(--metric delta searches from them compare more factors)",
                fixable=True,
            )
        )
    with reg.catalog.connect() as con:
        fitted = {r[0] for r in con.execute("SELECT id FROM subspaces").fetchall()}
    sroot = reg.root / "subspaces"
    if sroot.exists():
        for d in sorted(sroot.iterdir()):
            if d.name not in fitted:
                report.findings.append(
                    Finding(
                        "orphan",
                        str(d.relative_to(reg.root)),
                        "subspace files of no fit in the catalog (an interrupted `w2wreg fit`?)",
                    )  # fmt: skip
                )
    known = {s.id for s in spaces}
    vroot = reg.root / "vectors"
    if vroot.exists():
        for d in sorted(vroot.iterdir()):
            if d.name not in known:
                report.findings.append(
                    Finding("orphan", str(d.relative_to(reg.root)), "vector folder of no space in the catalog")
                )
    recorded = set()
    for hf in _latest_hub_files(reg):
        report.hub_files += 1
        path = reg.hub.root / hf["repo"] / hf["path"]
        recorded.add(path.resolve())
        if not path.exists():
            report.findings.append(Finding("error", f"hub {hf['repo']}/{hf['path']}", "pushed file is missing"))
        elif hashlib.sha256(path.read_bytes()).hexdigest() != hf["sha256"]:
            report.findings.append(
                Finding(
                    "error",
                    f"hub {hf['repo']}/{hf['path']}",
                    "file differs from what was pushed (sha256)",
                    fixable=True,
                )
            )
    for repo in reg.hub.list_repos():
        for f in (reg.hub.root / repo).rglob("*"):
            if f.is_file() and not f.name.startswith(".") and f.resolve() not in recorded:
                report.findings.append(
                    Finding(
                        "orphan", f"hub {repo}/{f.relative_to(reg.hub.root / repo)}", "file not pushed by this registry"
                    )
                )
    if reg.paths.repos.exists():  # the repos of `w2wreg serve`
        from registry.hubs.store import RepoStore

        for what, problem in RepoStore(reg.paths.repos).check():
            report.findings.append(Finding("error", what, problem))
    for stray in reg.root.rglob(".*.tmp-*"):
        report.findings.append(
            Finding("orphan", str(stray.relative_to(reg.root)), "temporary file of an interrupted write", fixable=True)
        )
    return report


def _check_subspace(reg: Registry, space, models: list) -> list[Finding]:
    """The current subspace's coefficient index holds exactly the space's models."""
    from registry import index as coeff_index
    from registry import wspace

    sm = wspace.current(reg, space.id)
    if sm is None:
        return []
    what = f"subspace {sm.id}"
    expected = sorted(m[0] for m in models)
    with reg.catalog.connect() as con:
        projected = sorted(
            r[0] for r in con.execute("SELECT model_id FROM projections WHERE subspace_id = ?", [sm.id]).fetchall()
        )
    if projected != expected:
        return [Finding("error", what, f"{len(set(expected) - set(projected))} models are not projected", fixable=True)]
    if sm.coeff_store().rows_on_disk() < len(expected):
        return [Finding("error", what, "coefficient store is shorter than the catalog", fixable=True)]
    if not sm.index_path.exists():
        return [Finding("error", what, "coefficient index is missing", fixable=True)]
    try:
        index = coeff_index.load(sm.index_path)
        ids = sorted(coeff_index.ids_of(index).tolist())
    except RuntimeError as e:
        return [Finding("error", what, f"coefficient index cannot be read ({str(e).splitlines()[0]})", fixable=True)]
    if ids != expected:
        return [Finding("error", what, "coefficient index and catalog disagree on the models", fixable=True)]
    lists = coeff_index.load_lists(coeff_index.lists_path(sm.index_path), index, sm.coords_digest)
    if not sm.ordered or lists is None:
        detail = "coefficient index made by an older release, or without its neighbour lists (search works, slower)"
        return [Finding("stale", what, detail, fixable=True)]
    return []


def _latest_hub_files(reg: Registry) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for hf in reg.catalog.hub_files():
        if hf["hub"] == reg.hub.name:
            latest[(hf["repo"], hf["path"])] = hf  # rows come in insertion order: the last push wins
    return list(latest.values())


def _has_hub_copy(reg: Registry, model_id: int) -> bool:
    return any(hf["model_id"] == model_id and hf["path"].endswith(".safetensors") for hf in _latest_hub_files(reg))


def _current_subspace(reg: Registry, spaces: dict, what: str):
    """The current subspace a finding about "subspace <id>" names, or None (no longer current)."""
    from registry import wspace

    current = (wspace.current(reg, sid) for sid in spaces)
    return next((c for c in current if c is not None and c.id == what.split()[1]), None)


def repair(reg: Registry) -> list[str]:
    """Fix what can be fixed from the data that is sound; return what was done and what was left."""
    from w2w.flatten import flatten
    from w2w.formats import read_lora

    done: list[str] = []
    with reg.writing():
        report = verify(reg)
        spaces = {s.id: s for s in reg.spaces()}
        for space in spaces.values():
            store = reg.store(space)
            if store.rows_on_disk() > space.n_models:
                store.truncate(space.n_models)
                done.append(f"space {space.id}: dropped uncommitted rows after row {space.n_models}")
        for f in report.findings:
            if f.kind == "error" and f.fixable and f.what.startswith("model "):
                mid = int(f.what.rsplit("(id ", 1)[1].rstrip(")"))
                m = reg.catalog.models_by_ids([mid])[0]
                hf = next(
                    h for h in _latest_hub_files(reg) if h["model_id"] == mid and h["path"].endswith(".safetensors")
                )
                path = reg.hub.root / hf["repo"] / hf["path"]
                if hashlib.sha256(path.read_bytes()).hexdigest() != hf["sha256"]:
                    done.append(f"{f.what}: hub copy is damaged too; re-import it from its source")
                    continue
                space = spaces[m.space_id]
                v = flatten(read_lora(path).lora)
                if vector_sha256(v) != m.vector_sha256:
                    done.append(f"{f.what}: hub copy holds other weights; re-import it from its source")
                    continue
                reg.store(space).write_rows(m.row_idx, v[None, :])
                done.append(f"{f.what}: vector restored from hub {hf['repo']}")
            elif f.kind == "error" and f.fixable and f.what.startswith("hub "):
                hf = next(h for h in _latest_hub_files(reg) if f"{h['repo']}/{h['path']}" == f.what[4:])
                m = reg.catalog.models_by_ids([hf["model_id"]])[0]
                reg._push_locked(m, hf["repo"], reg.hub)
                done.append(f"{f.what}: pushed again from the registry's vector of {m.name}")
            elif f.kind == "error" and f.fixable and f.what.startswith("subspace "):
                from registry import wspace

                sm = _current_subspace(reg, spaces, f.what)
                if sm is not None:
                    try:
                        wspace._index_all(reg, sm, lambda _: None)
                        done.append(f"{f.what}: coefficients and index rebuilt from the vectors")
                    except W2WError as e:
                        done.append(f"{f.what}: cannot rebuild the index while vectors are missing ({e})")
            elif f.kind == "stale" and f.what.startswith("subspace "):
                from registry import wspace

                sm = _current_subspace(reg, spaces, f.what)
                if sm is not None:
                    wspace._reindex(reg, sm)
                    done.append(f"{f.what}: coefficient index and neighbour lists rebuilt from the coefficients")
            elif f.kind == "stale" and f.what == "deltas":
                from registry import sketches

                done.append(f"deltas: {sketches.backfill(reg)} dW sketches computed from the vectors")
            elif f.kind == "stale" and f.what == "delta pairs":
                done.append(f"delta pairs: {delta_pairs.backfill(reg)} models compared with their nearest models")
            elif f.kind == "orphan" and f.fixable:
                Path(reg.root / f.what).unlink(missing_ok=True)
                done.append(f"{f.what}: removed")
            elif f.kind == "orphan":
                done.append(f"{f.what}: left in place ({f.detail})")
            elif f.kind == "error":
                done.append(f"{f.what}: cannot be repaired automatically ({f.detail})")
    return done

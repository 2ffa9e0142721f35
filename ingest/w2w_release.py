"""The weights2weights paper's published dataset of identity LoRAs (~65k), imported into one space.

What a user downloads (the authors' repo, `files/` and `weights_datasets/identities/`):

- all_weights.pt: one (N, D) float32 tensor, D = 99,648; row i is the i-th training folder in alphanumeric
  order. Read with torch.load(weights_only=True, mmap=True): rows are read lazily, a slice at a time.
- weight_dimensions.pt: {PEFT key: (numel, shape)} in the order a row concatenates the tensors (weights_only).
- adapter_config.json: the PEFT LoRA config: r = 1, lora_alpha = 27, target_modules to_q, to_v.
- identity_df.pt: a pickled pandas DataFrame, a `file` column (the training folder) + CelebA labels. Unpickling
  can run code: read only with --trust-pickle (and pandas installed).
- mean.pt, std.pt (D,) and V.pt (D, 10,000): the authors' fitted w2w space (c = ((w - mean) / std) @ V[:, :k]),
  in the same order as a row. `import_basis` registers it as a subspace of the imported space (weights_only).

How the authors flattened a model (other/creating_weights_dataset.ipynb and utils.unflatten in their repo): the
adapter's tensors in the order `load_peft_weights` returns them (safetensors keys, sorted), each `.flatten()`ed,
concatenated, A and B of a module side by side; weight_dimensions.pt records that order and unflatten walks it with a
running offset. For SD 1.5 the sorted PEFT keys happen to be our canonical order, but nothing here relies on it:
every key is mapped to its place in our layout, checked against the SD 1.5 UNet, and rows are copied segment by segment.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from registry.catalog import RESERVED_COLUMNS
from registry.registry import ATTR_RE, AddReport, NewModel, Registry, validate_name
from w2w.errors import (
    InvalidNameError,
    ReleaseDependencyError,
    ReleaseError,
    ReleaseFileMissingError,
    ReleaseFormatError,
    ReleasePickleError,
)
from w2w.formats.common import pattern_lookup
from w2w.formats.diffusers import strip_prefixes
from w2w.formats.pages import give_back
from w2w.layout import Layout, LayoutEntry, canonical_sort
from w2w.presets import SD15_UNET_CONFIG, get_preset

WEIGHTS, DIMENSIONS, CONFIG, TABLE = "all_weights.pt", "weight_dimensions.pt", "adapter_config.json", "identity_df.pt"
BASIS = ("mean.pt", "std.pt", "V.pt")  # the authors' fitted space: z-scoring statistics and principal components
# A float32 SVD's components are orthonormal to ~1e-6; a wrong file (another space, another order) is off by O(1)
ORTHONORMAL_TOL = 1e-3
# Where a file may sit: the folder given, or the authors' repo layout below it.
SUBFOLDERS = (".", "files", "weights_datasets/identities")
RELEASE_REPO = "snap-research/weights2weights"
BASE_MODEL = "runwayml/stable-diffusion-v1-5"  # the SD 1.5 id the rest of w2wreg uses; the authors trained on a
# fine-tune of it (stablediffusionapi/realistic-vision-v51): pass base_model= to record that instead
DEFAULT_PREFIX = "w2w-"
SOURCE_FORMAT = "w2w-release"
CHUNK_ROWS = 256  # rows read from the memory map at a time: ~100 MB at D = 99,648, whatever N is
BASIS_CHUNK_BYTES = 64 << 20  # V.pt read 64 MB of the file at a time

_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<factor>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(?:\.(?P<adapter>[\w\-]+))?\.weight$"
)
_A_FACTORS = ("lora_A", "lora_down", "lora.down")
_KOHYA_PREFIX = "lora_unet_"


class ReleaseWarning(UserWarning):
    """Something the user should know before trusting what the release import does (a pickle being unpickled)."""


# --- what the release holds ------------------------------------------------------------------------------


@dataclass
class Attributes:
    """CelebA labels per release row: K columns, kept as one (N, K) float64 array (NaN = not labelled)."""

    keys: list[str]
    kinds: list[str]  # "bool" | "number", per key
    values: np.ndarray  # (N, K), rows in release-row order; bool columns hold 0.0 / 1.0

    def row(self, i: int, as_number: frozenset[str] = frozenset()) -> dict[str, float | bool]:
        """Row i's attributes. Keys in `as_number` stay numbers (the registry already holds them as numbers)."""
        out: dict[str, float | bool] = {}
        for key, kind, v in zip(self.keys, self.kinds, self.values[i], strict=True):
            if not math.isnan(v):
                out[key] = bool(v) if kind == "bool" and key not in as_number else float(v)
        return out


@dataclass
class Release:
    """An opened release: the memory-mapped rows, where each of their values goes in our layout, names, labels."""

    folder: Path
    weights_path: Path
    weights: object  # the (N, D) torch tensor on a memory map; only ever sliced
    layout: Layout
    preset: str | None  # "w2w" when the layout is the paper's SD 1.5 space
    segments: tuple[tuple[int, int, int], ...]  # (start in our vector, start in a release row, length)
    folders: list[str] | None = None  # training-folder name per row (from identity_df), None when not read
    attributes: Attributes | None = None
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return self.layout.dim

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in our layout, (n, D) float32, a copy: only this slice of the file is read."""
        import torch

        mapped = block = self.weights[start:stop]  # (n, D) view on the memory map: nothing read yet
        if block.dtype != torch.float32:
            block = block.to(torch.float32)
        src = block.numpy()
        out = np.empty(src.shape, dtype=np.float32)
        to_our_order(out, src, self.segments)
        give_back(mapped, self.weights_path)  # the rows' file pages: read once, not kept mapped
        return out

    def names(self, prefix: str = DEFAULT_PREFIX, n: int | None = None) -> list[str]:
        """Model names of the first n rows: prefix + training folder, or prefix + row number when unknown."""
        n = len(self) if n is None else n
        if self.folders is not None:
            return [f"{prefix}{f}" for f in self.folders[:n]]
        width = max(5, len(str(max(len(self) - 1, 0))))
        return [f"{prefix}{i:0{width}d}" for i in range(n)]

    def describe(self) -> str:
        space = "the paper's w2w space" if self.preset == "w2w" else "its own layout"
        labels = f"{len(self.attributes.keys)} attributes" if self.attributes else "no attributes"
        return f"{len(self):,} models, {self.layout.describe()} ({space}), {labels}"


# --- reading -----------------------------------------------------------------------------------------------


def read_release(folder: Path | str, trust_pickle: bool = False) -> Release:
    """Open a release folder: check every file, map the release's flattening order onto our layout.

    Reads weight_dimensions.pt and adapter_config.json in full, all_weights.pt as a memory map (no row is read),
    and identity_df.pt only when `trust_pickle` (it is a pickle: unpickling it can run code).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseFileMissingError(
            folder, "is not a folder", f"pass the folder holding {WEIGHTS}, {DIMENSIONS}, ..."
        )
    notes: list[str] = []
    weights_path = _find(folder, WEIGHTS, required=True)
    dims_path = _find(folder, DIMENSIONS, required=True)
    config_path = _find(folder, CONFIG, required=True)
    table_path = _find(folder, TABLE, required=trust_pickle)

    linears = _sd15_linears()
    dims = _load_dimensions(dims_path, trust_pickle, notes)
    config = _load_config(config_path)
    layout, segments = _layout(dims, config, dims_path, config_path, linears)
    preset = "w2w" if layout == _preset_layout("w2w") else None
    weights = _load_weights(weights_path)
    _check_weights(weights, weights_path, layout.dim, dims_path)
    release = Release(folder, weights_path, weights, layout, preset, segments, warnings=notes)
    if preset is None:
        notes.append(
            f"{dims_path}: this release's layout ({layout.describe()}) is not the paper's w2w space (rank 1, "
            "alpha 27, to_q/to_v of attn1 and attn2); it is imported as a space of its own"
        )

    if table_path is None:
        notes.append(f"{folder}: no {TABLE}: models are named by their row number and get no attributes")
    elif not trust_pickle:
        notes.append(
            f"{table_path}: not read, it is a pickled pandas table and unpickling can run code: models are named by "
            "their row number and get no attributes; pass --trust-pickle if you trust the file (needs pandas)"
        )
    else:
        columns = _load_table(table_path, notes)
        release.folders, release.attributes = table_to_attributes(columns, len(release), table_path, notes)
    return release


def _find(folder: Path, name: str, required: bool) -> Path | None:
    for sub in SUBFOLDERS:
        p = folder / sub / name
        if p.is_file():
            return p
    if not required:
        return None
    where = ", ".join(f"{s}/" for s in SUBFOLDERS if s != ".")
    raise ReleaseFileMissingError(
        folder,
        f"no {name} here (nor in {where})",
        f"download it from the weights2weights release ({RELEASE_REPO} on Hugging Face) into this folder",
    )


def _torch_load(path: Path, **kw):
    """torch.load with its failures turned into release errors (weights_only refusals are left to the caller)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", **kw)
    except pickle.UnpicklingError:
        raise
    except RuntimeError as e:
        if kw.get("mmap") and "mmap" in str(e):
            raise ReleaseFormatError(
                path,
                "was saved in torch's legacy format, which cannot be memory-mapped",
                "download it again, or re-save it once with torch.save (that needs the whole tensor in memory)",
            ) from None
        raise ReleaseFormatError(path, f"cannot be read ({_first_line(e)})", "download it again") from None
    except (EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        raise ReleaseFormatError(
            path, f"cannot be read ({type(e).__name__}: {_first_line(e)})", "download it again"
        ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _load_dimensions(path: Path, trust_pickle: bool, notes: list[str]) -> list[tuple[str, int, tuple[int, ...]]]:
    """[(key, numel, shape)] in the file's order, which is the order a release row concatenates the tensors."""
    try:
        raw = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ReleasePickleError(
                path,
                "holds objects that a safe load (torch.load(weights_only=True)) refuses",
                "pass --trust-pickle if you trust the file (unpickling it can run code)",
            ) from None
        _pickle_warning(path, notes)
        raw = _torch_load(path, weights_only=False)
    if not isinstance(raw, dict) or not raw:
        raise ReleaseFormatError(path, f"holds a {type(raw).__name__}, not a dict from LoRA key to (numel, shape)")
    out = []
    for key, value in raw.items():
        try:
            numel, shape = value
            numel = int(numel) if isinstance(numel, (int, np.integer)) else int(*numel)  # an int or torch.Size([n])
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ReleaseFormatError(path, f"entry {key!r} is {value!r}, not (numel, shape)") from None
        if math.prod(shape) != numel:
            raise ReleaseFormatError(
                path, f"entry {key!r}: shape {shape} has {math.prod(shape)} values, numel says {numel}"
            )
        out.append((str(key), numel, shape))
    return out


def _load_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(cfg, dict)
    except (OSError, ValueError, AssertionError):
        raise ReleaseFormatError(path, "is not a readable JSON object", "download it again") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ReleaseFormatError(path, f"is a PEFT {cfg.get('peft_type')} config, not a LoRA one")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ReleaseFormatError(path, f"sets {flag}, whose update is not alpha/r * B A")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) in (None, "", []):
            raise ReleaseFormatError(path, f"has no {key}", "the release's config sets r = 1, lora_alpha = 27")
    return cfg


def _load_weights(path: Path):
    """The (N, D) tensor on a memory map: torch reads pages only when a slice of it is used."""
    try:
        return _torch_load(path, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ReleaseFormatError(
            path, "holds objects other than tensors", f"the release's {WEIGHTS} is one tensor; download it again"
        ) from None


def _check_weights(weights, path: Path, dim: int, dims_path: Path) -> None:
    import torch

    if not isinstance(getattr(weights, "dtype", None), torch.dtype) or not hasattr(weights, "shape"):
        raise ReleaseFormatError(path, f"holds a {type(weights).__name__}, not one (N, D) tensor")
    if len(weights.shape) != 2 or not weights.dtype.is_floating_point:
        raise ReleaseFormatError(
            path, f"holds a {weights.dtype} tensor of shape {tuple(weights.shape)}, not (N, D) floats"
        )
    if weights.shape[1] != dim:
        raise ReleaseFormatError(
            path,
            f"rows have {weights.shape[1]:,} values but {dims_path.name} adds up to {dim:,}",
            "the two files must come from the same release",
        )
    if weights.shape[0] == 0:
        raise ReleaseFormatError(path, "holds no rows")


# --- the flattening order -> our layout --------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sd15_linears() -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of every Linear of the SD 1.5 UNet, built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    return {n: (m.in_features, m.out_features) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}


@cache
def _preset_layout(name: str) -> Layout:
    """presets.sd15_layout(name), from the same (cached) UNet walk: the same rule, one UNet build per process."""
    p = get_preset(name)
    linears = _sd15_linears()
    mods = [m for m in linears if any(m == t or m.endswith("." + t) for t in p.targets)]
    return Layout(
        tuple(
            LayoutEntry(m, (p.rank, linears[m][0]), (linears[m][1], p.rank), float(p.alpha))
            for m in canonical_sort(mods)
        )
    )


def _module_of(key: str, linears: dict[str, tuple[int, int]], path: Path) -> tuple[str, str]:
    """(module path, 'A'|'B') of a release key; an error naming the key when it is no SD 1.5 LoRA factor."""
    m = _FACTOR.match(key)
    if not m:
        raise ReleaseFormatError(
            path, f"key {key!r} is no LoRA factor", "expected keys like base_model.model.<module>.lora_A.weight"
        )
    module = strip_prefixes(m["module"])
    if module.startswith(_KOHYA_PREFIX):
        module = _kohya_names(tuple(linears)).get(module[len(_KOHYA_PREFIX) :], module)
    if module not in linears:
        raise ReleaseFormatError(
            path,
            f"key {key!r} names {module!r}, which is no Linear layer of the SD 1.5 UNet",
            "this release is not for SD 1.5, or the file is damaged",
        )
    return module, "A" if m["factor"] in _A_FACTORS else "B"


@lru_cache(maxsize=1)
def _kohya_names(modules: tuple[str, ...]) -> dict[str, str]:
    return {m.replace(".", "_"): m for m in modules}


def _targets(module: str, target_modules) -> bool:
    """PEFT's rule: a list matches a module named by it or ending in '.' + it; a string is a full regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _layout(
    dims: list[tuple[str, int, tuple[int, ...]]],
    cfg: dict,
    dims_path: Path,
    config_path: Path,
    linears: dict[str, tuple[int, int]],
) -> tuple[Layout, tuple[tuple[int, int, int], ...]]:
    """Our layout for the release, and the copies (our start, release start, length) that turn a row into our vector."""
    # (module, 'A'|'B') -> (offset in a release row, shape, key)
    factors: dict[tuple[str, str], tuple[int, tuple[int, ...], str]] = {}
    offset = 0
    for key, numel, shape in dims:
        module, kind = _module_of(key, linears, dims_path)
        if (module, kind) in factors:
            raise ReleaseFormatError(dims_path, f"keys {factors[(module, kind)][2]!r} and {key!r} are the same factor")
        factors[(module, kind)] = (offset, shape, key)
        offset += numel

    modules = canonical_sort({m for m, _ in factors})
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    entries = []
    for module in modules:
        for kind in "AB":
            if (module, kind) not in factors:
                other = factors[(module, "B" if kind == "A" else "A")][2]
                raise ReleaseFormatError(dims_path, f"{other!r} has no {kind} factor beside it")
        a_shape, b_shape = factors[(module, "A")][1], factors[(module, "B")][1]
        fan_in, fan_out = linears[module]
        pattern_rank = pattern_lookup(rank_pattern, module)
        rank = int(cfg["r"] if pattern_rank is None else pattern_rank)
        if a_shape != (rank, fan_in) or b_shape != (fan_out, rank):
            raise ReleaseFormatError(
                dims_path,
                f"{module}: A {a_shape} and B {b_shape} do not fit a rank-{rank} LoRA of this SD 1.5 layer "
                f"(expected A {(rank, fan_in)}, B {(fan_out, rank)}; rank from {config_path.name})",
                "the files must come from the same release",
            )
        alpha = pattern_lookup(alpha_pattern, module)
        alpha = float(cfg["lora_alpha"]) if alpha is None else alpha
        entries.append(LayoutEntry(module, tuple(a_shape), tuple(b_shape), float(alpha)))
    layout = Layout(tuple(entries))

    targeted = {m for m in linears if _targets(m, cfg["target_modules"])}
    if targeted != set(modules):
        extra, missing = sorted(set(modules) - targeted), sorted(targeted - set(modules))
        what = f"has {extra[0]!r}, which" if extra else f"lacks {missing[0]!r}, which"
        raise ReleaseFormatError(
            dims_path,
            f"{what} {config_path.name}'s target_modules {cfg['target_modules']!r} "
            + ("do not cover" if extra else "cover"),
            "the files must come from the same release",
        )

    segments = []
    for entry, start in zip(layout.entries, layout.offsets, strict=True):
        for kind, dst, size in (("A", start, entry.a_size), ("B", start + entry.a_size, entry.size - entry.a_size)):
            src = factors[(entry.module, kind)][0]
            if segments and segments[-1][0] + segments[-1][2] == dst and segments[-1][1] + segments[-1][2] == src:
                segments[-1] = (segments[-1][0], segments[-1][1], segments[-1][2] + size)  # contiguous: one copy
            else:
                segments.append((dst, src, size))
    return layout, tuple(segments)


# --- identity_df.pt: folder names and CelebA labels ---------------------------------------------------------


def _pickle_warning(path: Path, notes: list[str]) -> None:
    msg = f"{path}: unpickling it (--trust-pickle) runs whatever code the file holds; do this only for a file you trust"
    warnings.warn(msg, ReleaseWarning, stacklevel=3)
    notes.append(msg)


def _load_table(path: Path, notes: list[str]) -> dict[str, list]:
    """identity_df.pt as {column: values} ('file' from the index when the index holds the folders). Unpickles it."""
    _pickle_warning(path, notes)
    try:
        import pandas as pd
    except ImportError:
        raise ReleaseDependencyError(
            path,
            "is a pickled pandas DataFrame and pandas is not installed",
            "run `pip install pandas` to read its attributes, or leave out --trust-pickle to import without them",
        ) from None
    df = _torch_load(path, weights_only=False)
    if not isinstance(df, pd.DataFrame):
        raise ReleaseFormatError(path, f"holds a {type(df).__name__}, not a pandas DataFrame")
    columns: dict[str, list] = {}
    for c in df.columns:
        s = df[c]
        if pd.api.types.is_bool_dtype(s) and not s.isna().any():
            columns[str(c)] = [bool(v) for v in s]
        elif pd.api.types.is_numeric_dtype(s) and str(c) != "file":
            columns[str(c)] = s.astype("float64").tolist()  # pandas NA -> NaN
        else:
            columns[str(c)] = [None if pd.isna(v) else v for v in s.tolist()]
    if "file" not in columns and df.index.name == "file":
        columns["file"] = df.index.tolist()
    return columns


def table_to_attributes(
    columns: dict[str, list], n_rows: int, path: Path | str, notes: list[str]
) -> tuple[list[str], Attributes]:
    """(training folder per release row, attributes per release row) from identity_df's columns.

    Release rows follow the training folders in alphanumeric order, so the table is put in that order of its `file`
    column. Two-valued columns (-1/1, 0/1, booleans) become booleans (1 and True are true), other numeric columns
    numbers; columns of text are left out (with a warning). Names become attribute keys: lower case, `_` for
    anything but letters, digits and `_`, a leading `_` before a digit (`5_o_Clock_Shadow` -> `_5_o_clock_shadow`).
    """
    if "file" not in columns:
        raise ReleaseFormatError(path, "has no `file` column naming the training folders", "is it the release's table?")
    folders = [_folder_name(v) for v in columns["file"]]
    if len(folders) != n_rows:
        raise ReleaseFormatError(
            path,
            f"has {len(folders):,} rows but {WEIGHTS} has {n_rows:,}",
            "the table and the weights must come from the same release",
        )
    seen: dict[str, int] = {}
    for j, f in enumerate(folders):
        if f in seen:
            raise ReleaseFormatError(path, f"rows {seen[f]} and {j} name the same folder {f!r}")
        seen[f] = j
    order = np.array(sorted(range(n_rows), key=folders.__getitem__), dtype=np.int64)  # release row -> table row

    keys, kinds, cols, skipped = [], [], [], []
    for name, values in columns.items():
        if name == "file":
            continue
        parsed = _numeric_column(values)
        if parsed is None:
            skipped.append(name)
            continue
        kind, arr = parsed
        key = _attribute_key(name, keys)
        keys.append(key)
        kinds.append(kind)
        cols.append(arr[order])
    if skipped:
        notes.append(f"{path}: columns that are not numbers or booleans were left out: {', '.join(skipped)}")
    values = np.stack(cols, axis=1) if cols else np.empty((n_rows, 0))  # (N, K)
    return [folders[j] for j in order], Attributes(keys, kinds, values)


def _folder_name(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _numeric_column(values: list) -> tuple[str, np.ndarray] | None:
    """('bool' | 'number', float64 values with NaN where unlabelled), or None for a column that is not numeric."""
    a = np.asarray(values)
    if a.dtype.kind == "b":
        return "bool", a.astype(np.float64)
    if a.dtype.kind in "iuf":
        arr = a.astype(np.float64)
    elif a.dtype.kind == "O":
        arr = np.full(len(values), np.nan)
        all_bool = True
        for j, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, (bool, np.bool_)):
                arr[j] = float(v)
                continue
            all_bool = False
            if not isinstance(v, (int, float, np.number)):
                return None
            arr[j] = float(v)
        if all_bool and not np.isnan(arr).all():
            return "bool", arr
    else:
        return None  # text
    arr[~np.isfinite(arr)] = np.nan
    present = set(np.unique(arr[~np.isnan(arr)]).tolist())
    if not present:
        return None
    if present <= {-1.0, 1.0} or present <= {0.0, 1.0}:
        return "bool", np.where(np.isnan(arr), np.nan, (arr == 1.0).astype(np.float64))
    return "number", arr


def _attribute_key(name: str, taken: list[str]) -> str:
    key = re.sub(r"[^a-z0-9_]", "_", name.strip().lower()) or "_"
    if key[0].isdigit():
        key = "_" + key
    key = key[:64]
    if key in RESERVED_COLUMNS:
        key = f"{key}_attr"
    base, i = key, 2
    while key in taken:
        key, i = f"{base[:60]}_{i}", i + 1
    assert ATTR_RE.match(key), f"attribute key {key!r} from column {name!r} breaks the attribute-key rule"
    return key


# --- importing -----------------------------------------------------------------------------------------------


def import_release(
    reg: Registry,
    folder: Path | str,
    *,
    trust_pickle: bool = False,
    name_prefix: str | None = None,
    progress: bool = True,
    limit: int | None = None,
    base_model: str = BASE_MODEL,
    skip_errors: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> AddReport:
    """Import the release's rows (the first `limit` of them) as models of one space, in one transaction.

    Rows are read `chunk_rows` at a time from the memory map, so memory does not grow with N. Models are named
    `name_prefix` (default "w2w-") + training folder, or + row number without a trusted identity_df.pt. A model
    whose weights are already in the space is skipped, so importing the same release twice adds nothing. The
    report's warnings say what was left out (and, with trust_pickle, that a pickle was unpickled: that warning is
    also raised as a ReleaseWarning the moment before it happens).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    release = read_release(folder, trust_pickle=trust_pickle)
    n = len(release) if limit is None else min(limit, len(release))
    prefix = DEFAULT_PREFIX if name_prefix is None else name_prefix
    names = release.names(prefix, n)
    for name in names:
        try:
            validate_name(name)
        except InvalidNameError as e:
            raise ReleaseError(
                release.folder, f"model name {name!r} is not allowed ({e})", "pass another prefix"
            ) from None
    as_number = frozenset(k for k, kind in reg.catalog.attribute_keys().items() if kind == "number")

    def items() -> Iterator[NewModel]:
        with ThreadPoolExecutor(max_workers=2) as pool:  # sha256 releases the GIL: two rows hashed at once
            for start in range(0, n, chunk_rows):
                stop = min(start + chunk_rows, n)
                block = release.rows(start, stop)  # (stop - start, D) float32, our layout
                models = [
                    NewModel(
                        names[i],
                        block[i - start],
                        release.layout,
                        base_model,
                        source=f"{release.weights_path}#row={i}",
                        source_format=SOURCE_FORMAT,
                        attributes=release.attributes.row(i, as_number) if release.attributes else {},
                    )
                    for i in range(start, stop)
                ]
                yield from pool.map(NewModel.digest, models)

    bar = tqdm(total=n, unit="model", desc="importing the w2w release", disable=not progress, leave=False, delay=0.5)
    try:
        report = reg.add_models(items(), skip_errors=skip_errors, on_item=lambda: bar.update(1))
    finally:
        bar.close()
    report.warnings[:0] = release.warnings
    return report


# --- the authors' fitted space -------------------------------------------------------------------------------


def has_basis(folder: Path | str) -> bool:
    return all(_find(Path(folder), name, required=False) is not None for name in BASIS)


def read_basis(release: Release, components: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean, std (D,) and the first `components` principal components (D, k) of the release, in our layout.

    Loaded with torch.load(weights_only=True, mmap=True) and copied a chunk of V.pt at a time, each chunk's file
    pages given back once copied, so the peak holds the result and one chunk, not the file too (at k = 10,000
    both are 4 GB). Shapes, finiteness and orthonormality are checked, and rows are put in our order by the same
    map as the models' rows. V.pt may hold the components as columns (D, k) or as rows (k, D), in any float type.
    """
    paths = [_find(release.folder, name, required=True) for name in BASIS]
    D = release.layout.dim
    mean, std = (_basis_vector(p, D) for p in paths[:2])
    V = _torch_load(paths[2], weights_only=True, mmap=True)
    shape = tuple(getattr(V, "shape", ()))
    if len(shape) != 2 or D not in shape or not V.dtype.is_floating_point:
        raise ReleaseFormatError(
            paths[2], f"holds shape {shape} ({getattr(V, 'dtype', '?')}), not (D, k) floats with D = {D:,}",
            "download it again",
        )  # fmt: skip
    if not V.is_contiguous() and V.T.is_contiguous():  # saved as a transposed view: walk it in storage order
        V = V.T
        shape = shape[::-1]
    as_rows = shape[0] != D  # (k, D): a component per stored row
    available = shape[0] if as_rows else shape[1]
    k = available if components is None else min(components, available)
    out = np.empty((D, k), dtype=np.float32)
    step = max(1, BASIS_CHUNK_BYTES // (V.shape[1] * V.element_size()))
    stop = k if as_rows else D
    for lo in range(0, stop, step):
        stored = V[lo : min(lo + step, stop)]  # stored rows on the memory map: one contiguous range of the file
        block = (stored if as_rows else stored[:, :k]).float().numpy()
        if not np.isfinite(block).all():
            raise ReleaseFormatError(paths[2], "holds NaN or Inf values", "download it again")
        if as_rows:  # components lo.., every coordinate
            to_our_order(out.T[lo : lo + len(block)], block, release.segments)
        else:  # coordinates lo.. of every component
            to_our_order(out.T, block.T, release.segments, lo)
        give_back(stored, paths[2])
    head = out[:, : min(k, 32)].astype(np.float64)
    off = np.abs(head.T @ head - np.eye(head.shape[1])).max()
    if off > ORTHONORMAL_TOL:
        raise ReleaseFormatError(
            paths[2],
            f"its components are not orthonormal (|V^T V - I| up to {off:.3g})",
            f"V.pt must be the principal components of the space of {DIMENSIONS}, columns as components",
        )
    return _reorder(mean, release), _reorder(std, release), out


def _basis_vector(path: Path, dim: int) -> np.ndarray:
    t = _torch_load(path, weights_only=True)
    shape = tuple(getattr(t, "shape", ()))
    if shape not in ((dim,), (1, dim)) or not t.dtype.is_floating_point:
        raise ReleaseFormatError(path, f"holds shape {shape}, not ({dim:,},) floats", "download it again")
    v = t.reshape(-1).float().numpy()
    if not np.isfinite(v).all():
        raise ReleaseFormatError(path, "holds NaN or Inf values", "download it again")
    return v


def _reorder(v: np.ndarray, release: Release) -> np.ndarray:
    out = np.empty(len(v), dtype=np.float32)
    to_our_order(out, v, release.segments)
    return out


def to_our_order(out: np.ndarray, src: np.ndarray, segments, lo: int = 0) -> None:
    """Copy src, whose last axis holds release coordinates lo .. lo + src.shape[-1] (a row's order), to their
    positions along out's last axis (our layout's order). segments: Release.segments."""
    hi = lo + src.shape[-1]
    for dst, start, n in segments:
        a, b = max(start, lo), min(start + n, hi)
        if a < b:  # the part of this segment in src
            out[..., dst + a - start : dst + b - start] = src[..., a - lo : b - lo]


def import_basis(
    reg: Registry,
    folder: Path | str,
    *,
    components: int | None = None,
    trust_pickle: bool = False,
    base_model: str = BASE_MODEL,
    say=None,
) -> dict:
    """Register the authors' fitted space (mean.pt, std.pt, V.pt) as a subspace of the space their models were
    imported into, so that project, sample, edit and invert work in exactly the paper's space without a fit.
    The coefficient Gaussians and singular values come from the release's models in the registry."""
    from registry import wspace
    from registry.registry import find_space
    from w2w import family as wfamily

    release = read_release(folder, trust_pickle=trust_pickle)
    space_id = find_space(reg.spaces(), wfamily.detect(release.layout, base_model), release.layout) or ""
    with reg.catalog.connect() as con:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT id FROM models WHERE space_id = ? AND source_format = ? ORDER BY id", [space_id, SOURCE_FORMAT]
            ).fetchall()
        ]
    if len(ids) < 2:
        raise ReleaseError(
            release.folder,
            f"{len(ids)} of this release's models are in the registry; its space is fitted on them",
            f"import them first: w2wreg ingest --from-w2w-release {release.folder}",
        )
    meta = {"source": "w2w-release", "release": str(release.folder), "method": "the authors' PCA"}
    sub = wspace.adopted(*read_basis(release, components), ids, meta)  # the only reference to V: freed once saved
    return wspace.adopt_subspace(reg, space_id, sub, say)

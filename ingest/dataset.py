"""Training datasets: DATASET/<identity>/*.png|jpg|jpeg|webp plus DATASET/attributes.csv.

`load_dataset` checks everything a training run needs before any training starts (every image opens
and decodes, the CSV and the folders name the same identities, names and attributes are ones the
registry accepts) and raises one `DatasetError` naming the file and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ingest.attributes import read_csv
from w2w.errors import AttributeInputError, DatasetError, InvalidNameError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CSV_NAME = "attributes.csv"


@dataclass
class IdentityData:
    name: str
    images: list[Path]
    attributes: dict[str, float | bool] = field(default_factory=dict)
    digest: str = ""  # sha256 over the sorted image names and bytes: unchanged images, same digest


def load_dataset(root: Path, require_csv: bool = True) -> list[IdentityData]:
    """Every identity of the dataset at `root`, sorted by name, checked (see the module docstring)."""
    from registry.registry import validate_attributes, validate_name

    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a dataset folder" if root.exists() else "no such dataset folder"
        raise DatasetError(root, what, "point at a folder of identity folders (`w2wreg toyfaces make DIR` makes one)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(root, "has no identity folders", "put each identity's images in a folder of its own")
    identities = []
    for folder in folders:
        try:
            validate_name(folder.name)
        except InvalidNameError as e:
            raise DatasetError(folder, str(e), "rename the folder") from None
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(
                folder, "has no images", f"add {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files or remove the folder"
            )
        identities.append(IdentityData(folder.name, images, digest=_check_images(images)))

    csv_path = root / CSV_NAME
    if not csv_path.exists():
        if require_csv:
            raise DatasetError(
                csv_path, "is missing", "add a CSV with a header row: identity, then one column per attribute"
            )
        return identities
    table = _read_attributes(csv_path)
    names = {d.name for d in identities}
    missing = [n for n in sorted(names) if n not in table]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(csv_path, f"has no row for identity {missing[0]!r}{more}", "add a row for each folder")
    orphans = [n for n in table if n not in names]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise DatasetError(
            csv_path, f"has a row for {orphans[0]!r}{more} but no such folder", "add its images or remove the row"
        )
    for d in identities:
        try:
            d.attributes = validate_attributes(table[d.name])
        except AttributeInputError as e:
            raise DatasetError(csv_path, str(e), "rename the column") from None
    return identities


def _check_images(paths: list[Path]) -> str:
    """Open and fully decode every image (a truncated file fails here, not mid-training); returns the digest."""
    h = hashlib.sha256()
    for path in paths:
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # checksums and structure
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # the pixel data itself: catches truncation that verify() lets through
        except OSError as e:
            if isinstance(e, (PermissionError, FileNotFoundError)):
                raise DatasetError(path, f"cannot be read ({e.strerror})", "check its permissions") from None
            raise DatasetError(path, f"is not a readable image ({e})", "replace or remove it") from None
        except (SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(path, f"is not a readable image ({e})", "replace or remove it") from None
        h.update(path.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _read_attributes(path: Path) -> dict[str, dict[str, float | bool]]:
    """attributes.csv through ingest.attributes.read_csv, with the identity column and duplicates checked first."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(path, f"is not a readable CSV file ({e})", "save it as UTF-8 CSV") from None
    if not rows or rows[0][0].strip().lower() != "identity":
        raise DatasetError(path, "must start with a header row whose first column is 'identity'", "add one")
    seen: set[str] = set()
    for lineno, row in enumerate(rows[1:], start=2):
        name = row[0].strip()
        if name in seen:
            raise DatasetError(path, f"line {lineno}: identity {name!r} appears twice", "keep one row per identity")
        seen.add(name)
    if len(rows[0]) == 1:  # identities only, no attribute columns
        return {name: {} for name in seen}
    try:
        return read_csv(path)
    except AttributeInputError as e:
        raise DatasetError(path, str(e).removeprefix(f"{path}").lstrip(":, "), "fix the CSV") from None


def square(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to size x size (antialiased), as RGB."""
    im = im.convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im if side == size else im.resize((size, size), Image.Resampling.LANCZOS)


def load_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: each image EXIF-rotated, centre-cropped to a square and resized."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                out[i] = np.asarray(square(ImageOps.exif_transpose(im), size))
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(path, f"is not a readable image ({e})", "replace or remove it") from None
    return out

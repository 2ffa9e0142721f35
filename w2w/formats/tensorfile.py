"""Reading tensor files safely: safetensors with header checks, pickles only on request."""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2w.errors import CorruptFileError, PickleRefusedError

# safetensors' own reader refuses headers over 100 MB; we refuse earlier, with a clearer message.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": None,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
}


# the safetensors dtypes a LoRA's factors come in, by the names `--dtype` and the catalog use
FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
DTYPE_CHOICES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class TensorFile:
    """Tensors of one file as float32 numpy arrays, its header metadata and raw bytes' sha256.

    `dtype` is the floating type most of its factors are stored in (float32 for a pickle: read as float32)."""

    path: Path
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    sha256: str
    dtype: str = "float32"


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def parse_safetensors(data: bytes | memoryview, path: object) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Parse safetensors bytes into float32 arrays, checking every offset against the data.

    Returns (tensors, header metadata, the dtype the factors are stored in)."""
    entries, metadata = _header_entries(data, path)
    mv = memoryview(data)
    tensors: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}  # elements per float dtype: the factors' dtype holds most (alphas may differ)
    for key, dtype, shape, start, end in entries:
        if dtype in FLOAT_NAMES:
            sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
        raw = mv[start:end]
        if dtype == "BF16":
            arr = _bf16_to_f32(np.frombuffer(raw, dtype=np.uint16))
        else:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype]).astype(np.float32, copy=False)
        tensors[key] = arr.reshape(shape)
    stored_dtype = FLOAT_NAMES[max(sizes, key=lambda d: sizes[d])] if sizes else "float32"
    return tensors, metadata, stored_dtype


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file in its stored dtype, as read-only views of one memory map of the file.

    Nothing is read until used, and what is read stays page cache that the OS may reclaim rather than this
    process's memory: a k = 10,000 subspace's 4 GB of components are not copied by every command that opens
    it. The views keep the map open; the file may be replaced (atomic_write) or deleted meanwhile."""
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CorruptFileError(path, f"is {size} bytes long, too short for a safetensors file", "re-create it")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the closed file
    except OSError as e:
        raise CorruptFileError(path, f"cannot be read ({e.strerror})") from None
    entries, _ = _header_entries(mm, path)
    out = {}
    for key, dtype, shape, start, end in entries:
        if dtype == "BF16":
            out[key] = _bf16_to_f32(np.frombuffer(mm, np.uint16, (end - start) // 2, start)).reshape(shape)
        else:
            dt = np.dtype(_DTYPES[dtype]).newbyteorder("<")
            out[key] = np.frombuffer(mm, dt, (end - start) // dt.itemsize, start).reshape(shape)
    return out


def _header_entries(data, path: object) -> tuple[list[tuple[str, str, list[int], int, int]], dict[str, str]]:
    """The checked header of safetensors bytes: (name, dtype, shape, start, end) of each tensor, its bytes
    data[start:end] (checked to lie in the data and to match dtype and shape), and the header's metadata."""
    n = len(data)
    if n < 8:
        raise CorruptFileError(path, f"is {n} bytes long, too short for a safetensors file", "re-download it")
    (hlen,) = struct.unpack("<Q", bytes(data[:8]))
    if hlen > MAX_HEADER_BYTES:
        raise CorruptFileError(
            path, f"declares a {hlen:,}-byte header (limit {MAX_HEADER_BYTES:,})", "the file is corrupt or hostile"
        )
    if 8 + hlen > n:
        raise CorruptFileError(path, f"is truncated: header needs {8 + hlen:,} bytes, file has {n:,}", "re-download it")
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]))
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise CorruptFileError(path, "has a header that is not a JSON object", "is it a safetensors file?") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptFileError(path, "has a __metadata__ entry that is not a JSON object")
    base, body = 8 + hlen, n - 8 - hlen
    entries = []
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            # JSON may hold strings, floats or negatives here; only non-negative integers are offsets/sizes
            if not (all(type(x) is int for x in (start, end)) and all(s >= 0 for s in shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(path, f"tensor {key!r} has a malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CorruptFileError(path, f"tensor {key!r} has dtype {dtype}, not a LoRA weight type")
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        count = math.prod(shape)  # exact: np.prod could overflow on a hostile shape
        if not (0 <= start <= end <= body) or end - start != count * itemsize:
            raise CorruptFileError(
                path, f"tensor {key!r} lies outside the file or has the wrong size (truncated?)", "re-download it"
            )
        entries.append((key, dtype, shape, base + start, base + end))
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_tensor_file(path: Path, allow_pickle: bool = False) -> TensorFile:
    """Read a .safetensors file (or, with allow_pickle, a torch pickle with weights_only=True)."""
    import hashlib

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefusedError(path)
        return _read_pickle(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptFileError(path, f"cannot be read ({e.strerror})") from None
    tensors, metadata, dtype = parse_safetensors(data, path)
    return TensorFile(path, tensors, metadata, hashlib.sha256(data).hexdigest(), dtype)


def header_bytes(data: bytes | memoryview) -> bytes | None:
    """The raw JSON header of safetensors bytes, or None when the length prefix is implausible."""
    if len(data) < 8:
        return None
    (hlen,) = struct.unpack("<Q", bytes(data[:8]))
    return bytes(data[8 : 8 + hlen]) if 8 + hlen <= len(data) and hlen <= MAX_HEADER_BYTES else None


def _read_pickle(path: Path) -> TensorFile:
    import hashlib

    import torch

    data = path.read_bytes()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for bad pickles
        raise CorruptFileError(path, f"could not be loaded with weights_only=True ({type(e).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(path, "is a pickle but not a flat dict of tensors")
    tensors = {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}
    return TensorFile(path, tensors, {}, hashlib.sha256(data).hexdigest())


def write_safetensors(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str], dtype: str = "float32"
) -> str:
    """Write tensors atomically (temp file, fsync, rename) in `dtype` (float32, float16, bfloat16; scalars such
    as kohya's alphas stay float32, as kohya writes them). Returns the file's sha256."""
    import hashlib

    data = safetensors_bytes(tensors, metadata, dtype)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str], dtype: str = "float32") -> bytes:
    """The bytes of a safetensors file holding `tensors` (float32 arrays) cast to `dtype`."""
    import torch
    from safetensors.torch import save

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    out = {}
    for k, v in tensors.items():
        t = torch.from_numpy(np.array(v, dtype=np.float32, copy=True, order="C"))
        out[k] = t if t.ndim == 0 else t.to(tdtype)  # round to nearest even, as torch casts
    return save(out, metadata=metadata)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write to a temp name in the same folder, fsync, rename: readers see the old file or the new one."""
    atomic_write(path, lambda f: f.write(data), fsync)


_SAFETENSORS_DTYPES = {np.dtype(t): name for name, t in _DTYPES.items() if t is not None}


def atomic_write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written array by array from the arrays' own memory (safetensors' `save` first builds the
    whole file as one bytes object: a second copy of a multi-GB subspace). Atomic like atomic_write_bytes."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = {k: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for k, a in arrays.items()}
    for key, a in arrays.items():
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes

    def write(f) -> None:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in arrays.values():
            f.write(memoryview(a.reshape(-1)).cast("B"))

    atomic_write(path, write)


def atomic_write(path: Path, write, fsync: bool = True) -> None:
    """Call write(file) on a temp name in the same folder, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")  # threads may race on one path
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

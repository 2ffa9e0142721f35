"""LoRA file formats: detect, read into the canonical LoRA, write back out.

| format    | reads                                                      | writes                              |
|-----------|------------------------------------------------------------|-------------------------------------|
| diffusers | one .safetensors, `unet.`/`text_encoder[_2].` keys,        | pytorch_lora_weights.safetensors    |
|           | lora_A/B or lora.down/up                                   |                                     |
| peft      | adapter folder (adapter_model.safetensors + config)        | the same folder layout, text        |
|           |                                                            | encoders in text_encoder[_2]/       |
| kohya     | one .safetensors, `lora_unet_`/`lora_te[12]_` keys, both   | one .safetensors (diffusers naming) |
|           | UNet namings; LyCORIS LoCon, LoHa, LoKr                    |                                     |

Every reader gives the canonical LoRA (module names of w2w/formats/names.py) with `meta` holding the file's
safetensors header metadata plus `source_dtype` (float32/float16/bfloat16) and `source_kind`
(lora/locon/loha/lokr).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from w2w.errors import LoRAFileError, UnknownFormatError
from w2w.formats import diffusers, kohya, peft
from w2w.formats.tensorfile import (
    DTYPE_CHOICES,
    PICKLE_SUFFIXES,
    TensorFile,
    atomic_write_bytes,
    read_tensor_file,
    write_safetensors,
)
from w2w.lora import LoRA, check_lora

FORMATS = ("diffusers", "peft", "kohya")
LORA_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES


@dataclass
class ReadResult:
    lora: LoRA
    format: str
    sha256: str  # of the weights file as it is on disk
    path: Path


def detect_format(tf: TensorFile) -> str:
    keys = list(tf.tensors)
    if kohya.looks_like(keys):
        return "kohya"
    if keys and all(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if diffusers.looks_like(keys):
        return "diffusers"
    first = keys[0] if keys else "(no tensors)"
    raise UnknownFormatError(
        tf.path, f"matches no known LoRA format (first key {first!r})", f"known formats: {', '.join(FORMATS)}"
    )


def discover(path: Path) -> list[Path]:
    """The LoRAs a path stands for: itself (a file or an adapter folder), or every LoRA inside a folder."""
    path = Path(path)
    if not path.exists():
        raise LoRAFileError(path, "does not exist")
    if path.is_file() or peft.is_adapter_dir(path):
        return [path]
    found: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if peft.is_adapter_dir(child):
            found.append(child)
        elif child.is_dir():
            found.extend(discover(child))
        elif child.suffix.lower() in LORA_SUFFIXES:
            found.append(child)
    if not found:
        raise LoRAFileError(path, "holds no LoRA files (.safetensors) or PEFT adapter folders")
    return found


def discover_one(path: Path) -> Path:
    """The one LoRA a path stands for (as `discover`), or an error naming what it holds instead."""
    files = discover(Path(path))
    if len(files) != 1:
        shown = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise LoRAFileError(path, f"holds {len(files)} LoRAs ({shown})", "pass one of them")
    return files[0]


def read_lora(
    path: str | Path,
    base_model: str | None = None,
    allow_pickle: bool = False,
    drop_text_encoder: bool = False,
) -> ReadResult:
    """Read a LoRA file or PEFT adapter folder, whatever its format, and check it is a usable LoRA."""
    path = Path(path)
    if not path.exists():
        raise LoRAFileError(path, "does not exist")
    if path.is_dir() and not peft.is_adapter_dir(path):
        path = discover_one(path)  # a folder holding one LoRA file, as `add` takes it
    if path.is_dir():
        lora, tf = peft.read(path, base_model, allow_pickle, drop_text_encoder)
        lora, fmt = with_meta(lora, tf), "peft"
    else:
        tf = read_tensor_file(path, allow_pickle=allow_pickle)
        fmt = detect_format(tf)
        lora = parse_file(tf, fmt, base_model, drop_text_encoder)
    check_lora(lora, path)
    return ReadResult(lora, fmt, tf.sha256, path)


def parse_file(tf: TensorFile, fmt: str, base_model: str | None, drop_text_encoder: bool) -> LoRA:
    """The LoRA in one tensor file of a known format (no checks of the values), with its meta."""
    base_model = base_model or tf.metadata.get("base_model")  # written by our own writers
    if fmt == "kohya":
        lora = kohya.parse(tf, base_model, drop_text_encoder)
    elif fmt == "peft":
        folder = tf.path.parent
        cfg = peft.read_config(folder) if (folder / peft.CONFIG).exists() else {}
        lora = peft.parse(tf, cfg, base_model or cfg.get("base_model_name_or_path"), drop_text_encoder)
    else:
        lora = diffusers.parse(tf, base_model, drop_text_encoder)
    return with_meta(lora, tf)


def with_meta(lora: LoRA, tf: TensorFile) -> LoRA:
    """`lora` with the file's header metadata, source dtype and source kind in its meta."""
    conv3 = any(l.A.ndim == 4 and l.A.shape[2:] != (1, 1) for l in lora.layers.values())
    kind = lora.meta.get("source_kind") or ("locon" if conv3 else "lora")
    lora.meta = {**tf.metadata, **lora.meta, "source_dtype": tf.dtype, "source_kind": kind}
    return lora


def _write_diffusers(lora: LoRA, out: Path, dtype: str) -> list[Path]:
    target = out if out.suffix == ".safetensors" else out / diffusers.WEIGHT_NAME
    write_safetensors(target, *diffusers.to_tensors(lora), dtype=dtype)
    return [target]


def _write_kohya(lora: LoRA, out: Path, dtype: str) -> list[Path]:
    target = out if out.suffix == ".safetensors" else out / "lora.safetensors"
    write_safetensors(target, *kohya.to_tensors(lora), dtype=dtype)
    return [target]


def _write_peft(lora: LoRA, out: Path, dtype: str) -> list[Path]:
    written = []
    for sub, (tensors, metadata, config) in peft.to_folders(lora).items():
        folder = out / sub if sub else out
        write_safetensors(folder / peft.WEIGHTS, tensors, metadata, dtype=dtype)
        atomic_write_bytes(folder / peft.CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        written += [folder / peft.WEIGHTS, folder / peft.CONFIG]
    return written


WRITERS: dict[str, Callable[[LoRA, Path, str], list[Path]]] = {
    "diffusers": _write_diffusers,
    "peft": _write_peft,
    "kohya": _write_kohya,
}


def target_files(fmt: str, out: str | Path) -> list[Path]:
    """The files write_lora(..., out, fmt) would write (for peft: the top folder's; text encoders go below)."""
    out = Path(out)
    if fmt == "peft":
        return [out / peft.WEIGHTS, out / peft.CONFIG]
    if out.suffix == ".safetensors":
        return [out]
    return [out / (diffusers.WEIGHT_NAME if fmt == "diffusers" else "lora.safetensors")]


def write_lora(lora: LoRA, out: str | Path, fmt: str = "diffusers", dtype: str = "float32") -> list[Path]:
    """Write `lora` in `fmt` with factors in `dtype` (float32, float16, bfloat16). `out` is a .safetensors file
    (diffusers, kohya) or a folder. Returns the files written."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    dtype = DTYPE_CHOICES.get(dtype, dtype)
    if dtype not in DTYPE_CHOICES.values():
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_CHOICES)}")
    return WRITERS[fmt](lora, Path(out), dtype)

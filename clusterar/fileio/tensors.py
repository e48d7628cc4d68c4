"""safetensors files with clusterar's JSON metadata in the header: saved atomically, read whole, or one
tensor memory-mapped; a file that is missing, truncated or not safetensors gets a clear error."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ClusterarError
from .atomic import atomic_path
from .errors import check_file, file_error, first_line


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Save tensors to a safetensors file atomically, with `meta` stored as JSON in its header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"clusterar": json.dumps(dict(meta))})
        except SafetensorError as e:  # safetensors reports a failed write (disk full) in its own type
            reason = str(e).rsplit("I/O error: ", 1)[-1].split(" (os error")[0]
            raise ClusterarError(
                f"cannot write {path} ({reason}); free some space or choose another output folder"
            ) from None


def read_meta(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """Read the JSON metadata of a clusterar safetensors file without loading its tensors."""
    header, _ = read_safetensors_header(path, what)
    raw = header.get("__metadata__", {}).get("clusterar")
    if raw is None:
        raise file_error(
            path, what, "is a safetensors file that clusterar did not write (it has no metadata)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise file_error(path, what, f"has damaged metadata ({e.msg})", damaged=True) from e
    if not isinstance(meta, dict):
        raise file_error(path, what, "has damaged metadata (not a JSON object)", damaged=True)
    return meta


def load_tensors(
    path: str | os.PathLike, what: str = "file"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load all tensors and the clusterar metadata of a safetensors file."""
    meta = read_meta(path, what)
    try:
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for inconsistent tensor tables
        raise file_error(path, what, f"is damaged ({first_line(e)})", damaged=True) from e


def read_safetensors_header(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, Any], int]:
    """Return (header dict, byte offset of the data section) of a safetensors file.

    Used to memory-map tensors with numpy directly, and to give a clear error for a file that is
    missing, a folder, empty, truncated or not safetensors at all.
    """
    path = check_file(path, what)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise file_error(path, what, f"is truncated ({size} bytes)", damaged=True)
        (n,) = struct.unpack("<Q", raw)
        first = f.read(1)
        if n > 100_000_000 or first != b"{":
            if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
                raise file_error(path, what, "is a PyTorch file, not safetensors")
            raise file_error(
                path, what, "is not a safetensors file (its first bytes are not a safetensors header)"
            )
        if n > size - 8:
            raise file_error(path, what, f"is truncated ({size} bytes, cut inside its header)", damaged=True)
        try:
            header = json.loads(first + f.read(n - 1))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise file_error(path, what, "is not a safetensors file (unreadable header)", damaged=True) from e
    if not isinstance(header, dict):
        raise file_error(path, what, "is not a safetensors file (malformed header)", damaged=True)
    check_tensor_table(path, header, what)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise file_error(path, what, f"is truncated ({size} of {8 + n + end} bytes)", damaged=True)
    return header, 8 + n


# Bytes per element of every safetensors dtype; a header naming another one is damaged.
ITEMSIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# The dtypes `mmap_tensor` maps with numpy (numpy has no bfloat16 or float8).
NP_DTYPES = {
    "U8": np.uint8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "I64": np.int64,
    "F32": np.float32,
}


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_tensor_table(path: Path, header: dict[str, Any], what: str) -> None:
    """Refuse a header whose tensors do not fit their bytes: each entry's dtype is a safetensors dtype,
    and shape x itemsize equals its byte range (`read_safetensors_header` then checks that the ranges lie
    inside the file). From the header alone, so a lying header is caught before any tensor is mapped."""
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise file_error(path, what, "is not a safetensors file (malformed header)", damaged=True)
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = isinstance(shape, list) and all(map(_is_count, [begin, end, *shape])) and begin <= end
        except (KeyError, TypeError, ValueError) as e:
            raise file_error(path, what, "is not a safetensors file (malformed header)", damaged=True) from e
        if not ok:
            raise file_error(path, what, "is not a safetensors file (malformed header)", damaged=True)
        if dtype not in ITEMSIZES:
            raise file_error(
                path, what, f"is damaged (tensor '{name}' has unknown dtype {dtype!r})", damaged=True
            )
        need = math.prod(shape) * ITEMSIZES[dtype]
        if need != end - begin:
            raise file_error(
                path,
                what,
                f"is damaged (tensor '{name}' is {dtype} {shape}, {need} bytes, but its header gives it "
                f"{end - begin})",
                damaged=True,
            )


def mmap_tensor(path: str | os.PathLike, name: str, what: str = "file") -> np.ndarray:
    """Memory-map one tensor of a safetensors file as a read-only numpy array (no copy, no load)."""
    header, offset = read_safetensors_header(path, what)
    if name not in header or name == "__metadata__":
        raise file_error(path, what, f"has no tensor '{name}'")
    info = header[name]
    if info["dtype"] not in NP_DTYPES:
        raise file_error(
            path,
            what,
            f"is damaged (tensor '{name}' has dtype {info['dtype']}, which no {what} holds)",
            damaged=True,
        )
    begin, _ = info["data_offsets"]
    return np.memmap(
        path, dtype=NP_DTYPES[info["dtype"]], mode="r", offset=offset + begin, shape=tuple(info["shape"])
    )

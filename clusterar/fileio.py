"""Atomic file writes, safetensors helpers and content fingerprints.

Nothing is ever written in place: a crash or Ctrl-C leaves either the old file or the new one, never
half of one. Everything we save is safetensors (weights, optimizer state, token files) with a JSON
header, or plain JSON.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ClusterarError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the mode the user's umask gives new files (0644 usually), whichever library wrote them
# (safetensors writes 0600), so that a teammate can read a shared run.
FILE_MODE = 0o666 & ~_umask()
# The errors that mean "this output cannot be written here" (the user's to fix), not a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failed write (disk full, permissions) removes the temporary file and says which file it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise ClusterarError(
            f"cannot write {path} ({e.strerror}); free some space or choose another output folder"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Fail before any work if `path` (a file or folder to create) cannot be written.

    Finds the nearest folder that exists above `path` and creates (and removes) a probe file in it: that
    answers for permissions, read-only file systems and a file standing where a folder must go, also for
    root, whom `os.access` would not refuse.
    """
    path = Path(path)
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ClusterarError(
            f"{flag} {path}: {probe_dir} is a file, not a folder; choose another {flag} or move the file"
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".clusterar-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ClusterarError(
            f"{flag} {path}: cannot write in {probe_dir} ({e.strerror}); choose another {flag} or make the "
            "folder writable"
        ) from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ClusterarError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClusterarError(f"{what} {path} is not valid JSON ({e}); delete it or pass another file") from e


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Save tensors to a safetensors file atomically, with `meta` stored as JSON in its header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"clusterar": json.dumps(dict(meta))})
        except SafetensorError as e:  # safetensors reports a failed write (disk full) in its own type
            reason = str(e).rsplit("I/O error: ", 1)[-1]
            raise ClusterarError(
                f"cannot write {path} ({reason}); free some space or choose another output folder"
            ) from None


def read_meta(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """Read the JSON metadata of a clusterar safetensors file without loading its tensors."""
    header, _ = read_safetensors_header(path, what)
    raw = header.get("__metadata__", {}).get("clusterar")
    if raw is None:
        raise ClusterarError(
            f"{what} {path} is a safetensors file but was not written by clusterar (no metadata)"
        )
    return json.loads(raw)


def load_tensors(
    path: str | os.PathLike, what: str = "file"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load all tensors and the clusterar metadata of a safetensors file."""
    meta = read_meta(path, what)
    return load_file(str(path)), meta


def read_safetensors_header(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, Any], int]:
    """Return (header dict, byte offset of the data section) of a safetensors file.

    Used to memory-map tensors with numpy directly, and to give a clear error for a file that is
    missing, truncated or not safetensors at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ClusterarError(f"{what} not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ClusterarError(f"{what} {path} is empty or truncated ({size} bytes); write it again")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ClusterarError(f"{what} {path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClusterarError(f"{what} {path} is not a safetensors file (unreadable header)") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ClusterarError(
            f"{what} {path} is truncated ({size} bytes, expected {8 + n + end}); write it again"
        )
    return header, 8 + n


_NP_DTYPES = {
    "U8": np.uint8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "I64": np.int64,
    "F32": np.float32,
}


def mmap_tensor(path: str | os.PathLike, name: str, what: str = "file") -> np.ndarray:
    """Memory-map one tensor of a safetensors file as a read-only numpy array (no copy, no load)."""
    header, offset = read_safetensors_header(path, what)
    if name not in header:
        raise ClusterarError(f"{what} {path} has no tensor '{name}'")
    info = header[name]
    begin, _ = info["data_offsets"]
    return np.memmap(
        path, dtype=_NP_DTYPES[info["dtype"]], mode="r", offset=offset + begin, shape=tuple(info["shape"])
    )


def fingerprint(tensors: Mapping[str, torch.Tensor] | torch.Tensor) -> str:
    """A short content hash (sha256, 16 hex digits) of tensors: names, shapes, dtypes and values."""
    if isinstance(tensors, torch.Tensor):
        tensors = {"": tensors}
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.reshape(-1)  # a 0-d tensor cannot be viewed as bytes; the bytes are the same
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]

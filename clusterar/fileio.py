"""Atomic file writes, safetensors helpers and content fingerprints.

Nothing is ever written in place: a crash or Ctrl-C leaves either the old file or the new one, never
half of one. Everything we save is safetensors (weights, optimizer state, token files) with a JSON
header, or plain JSON.

A process killed while it writes leaves its temporary file (`.NAME.tmp-HOST-PID`, hidden, never a final
name) behind; the next write into that folder by any process on the same host removes the temporary
files of processes that no longer exist.

`kill_point` is the hook of the kill tests (tests/test_kill.py): it does nothing unless the environment
variable CLUSTERAR_KILL_AT is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ClusterarError

# ----------------------------------------------------------------------------- the kill tests' hook


def _parse_kill_at(value: str | None) -> tuple[str, int, int | None] | None:
    if not value:
        return None
    target, _, rank = value.partition("@")
    name, _, count = target.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"CLUSTERAR_KILL_AT={value!r}: expected NAME:N or NAME:N@RANK with N >= 1")
    return name, int(count), int(rank) if rank else None


_KILL_AT = _parse_kill_at(os.environ.get("CLUSTERAR_KILL_AT"))
_kill_calls = 0


def kill_point(name: str) -> None:
    """A named place where the kill tests (tests/test_kill.py) stop the process dead; nothing otherwise.

    With CLUSTERAR_KILL_AT=NAME:N in the environment, the N-th call of `kill_point(NAME)` sends SIGKILL to
    this process: no exception, no `finally`, no flush of Python buffers, as when the machine's scheduler or
    the OOM killer ends a job (files already written stay in the page cache). NAME:N@R fires only in the
    torchrun process of RANK R. Without the variable (always, outside those tests) a call is one
    comparison. The points:

    - write:FILENAME   every atomic write, its temporary file complete, just before the rename
    - tokenizer.step   `tokenizer train`, after an optimizer step and its log line, before a checkpoint
    - train.step       `train`, after an optimizer step and its log line, before a snapshot or checkpoint
    - encode.batch     `encode`, after a batch (and its progress save, when one was due)
    - encode.cleanup   `encode`, with the token file written, between removing the two partial files
    - sample.batch     `sample`, after a batch's images and part file are written
    - sample.finish    `sample`, with sample.json written, before the parts are removed
    - experiment.stage `experiment`, at the start of each of its 7 stages (N = 2: the tokenizer is done)
    """
    global _kill_calls
    if _KILL_AT is None or name != _KILL_AT[0]:
        return
    if _KILL_AT[2] is not None and int(os.environ.get("RANK", "0")) != _KILL_AT[2]:
        return
    _kill_calls += 1
    if _kill_calls == _KILL_AT[1]:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- atomic writes

_HOST = socket.gethostname().replace("/", "_")
_swept: set[Path] = set()  # folders whose stale temporary files this process has removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files that killed processes of this host left in `folder`; return them.

    Only files named like `atomic_path`'s (`.NAME.tmp-HOST-PID`) whose PID no longer runs are removed: a
    write in progress (this process or another one) is never touched, nor another host's file on a
    shared file system.
    """
    removed = []
    marker = f".tmp-{_HOST}-"
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        head, sep, pid = entry.name.rpartition(marker)
        if not (sep and entry.name.startswith(".") and head and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The first write of a process into a folder also removes what killed writers left there (see the
    module docstring), so an interrupted run does not accumulate temporary files over its reruns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.absolute()
    if folder not in _swept:
        remove_stale_temps(folder)
        _swept.add(folder)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        yield tmp
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
        save_file(tensors, str(tmp), metadata={"clusterar": json.dumps(dict(meta))})


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

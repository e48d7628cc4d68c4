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
import errno
import hashlib
import json
import os
import signal
import socket
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
    - experiment.stage `experiment`, at the start of each of its 8 stages (N = 2: the tokenizer is done)
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

    A failed write (disk full, permissions) removes the temporary file and says which file it was. The
    first write of a process into a folder also removes what killed writers left there (see the module
    docstring), so an interrupted run does not accumulate temporary files over its reruns.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent.absolute()
        if folder not in _swept:
            remove_stale_temps(folder)
            _swept.add(folder)
        yield tmp
        os.chmod(tmp, FILE_MODE)
        kill_point(f"write:{path.name}")
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


# How a user gets a good file of each kind. Every error about a file ends with the advice for its kind, so a
# missing, empty, truncated or foreign file of one kind is explained the same way by every command.
REMEDIES = {
    "tokenizer": "pass tokenizer.safetensors from `clusterar tokenizer train` (or its run folder), or a LlamaGen "
    "VQ .pt such as vq_ds16_c2i.pt",
    "token file": "make it with `clusterar encode` (one SPLIT.safetensors per split)",
    "clusters file": "make it with `clusterar cluster fit`",
    "model file": "pass a run folder of `clusterar train` or one of its model files (RUN/model.safetensors, "
    "earlier ones in RUN/snapshots/)",
    "LlamaGen model": "pass a LlamaGen c2i_*.pt GPT checkpoint (with --tokenizer), or a run folder or model file "
    "of `clusterar train`",
    "IAR mapping file": "pass IAR's mapping.pt (a 1-D int64 tensor [K], new_id = mapping[old_id])",
    "Inception weights file": "pass the standard FID weights pt_inception-2015-12-05-6726825d.pth",
    "model to sample": "SOURCE of `clusterar sample` is a run folder of `clusterar train`, its "
    "model.safetensors, a CTF pipeline .json (`clusterar pipeline ctf`) or a LlamaGen c2i_*.pt with --tokenizer",
    "samples file": "pass the samples.npz of `clusterar sample`, a folder of images, or an .npz written with "
    "numpy.savez(path, images) where images is uint8 [N, H, W, 3]",
    "reference file": "pass an ADM reference batch .npz (arr_0 images and/or mu and sigma), a folder of images, "
    "or a bundled split such as mnist:val",
    "experiment spec": "write a TOML spec like the shipped clusterar/specs/quick.toml (docs/experiment.md)",
    "pipeline file": "write it with `clusterar pipeline ctf --coarse RUN1 --refiner RUN2 --out pipeline.json`",
    "file": "`clusterar info` reads the .safetensors files clusterar writes (tokenizer, token file, clusters "
    "file, model file, training checkpoint)",
}

# The `kind` recorded in the metadata of each clusterar safetensors file, in words.
KIND_NAMES = {
    "clusterar.tokenizer": "tokenizer",
    "clusterar.tokenizer-checkpoint": "tokenizer training checkpoint",
    "clusterar.tokens": "token file",
    "codebook_clusters": "clusters file",
    "gpt": "model file",
    "clusterar.gpt-checkpoint": "training checkpoint",
    "clusterar-digit-classifier": "digit classifier",
}


class FileError(ClusterarError):
    """A ClusterarError about one file: `sentence` says what is wrong with it ("token file X is truncated
    (...)"), the message adds the advice for its kind. Callers with better advice (a run folder whose
    checkpoint is damaged) catch it and reuse the sentence."""

    def __init__(self, message: str, path: str | os.PathLike, sentence: str):
        super().__init__(message)
        self.path = Path(path)
        self.sentence = sentence


def remedy(what: str) -> str:
    """The advice that ends every error about a file of kind `what` (see REMEDIES)."""
    return REMEDIES.get(what, f"pass a valid {what}")


def file_error(path: str | os.PathLike, what: str, problem: str, damaged: bool = False) -> FileError:
    """The one shape of error about a file: '<what> <path> <problem>; [copy it again, or] <remedy>'."""
    again = "copy it again, or " if damaged else ""
    sentence = f"{what} {path} {problem}"
    return FileError(f"{sentence}; {again}{remedy(what)}", path, sentence)


def check_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """`path` as a Path if it is a non-empty regular file; otherwise the error that says what it is instead.

    A folder is named as one, with the files of `suffixes` inside it as the likely intended ones.
    """
    p = Path(path)
    if p.is_dir():
        try:
            inside = sorted(q.name for q in p.iterdir() if q.suffix in suffixes and q.is_file())
        except OSError:
            inside = []
        hint = ""
        if inside:
            shown = ", ".join(inside[:4]) + (f" and {len(inside) - 4} more" if len(inside) > 4 else "")
            hint = f" (it holds {shown}: pass one of them)"
        raise file_error(p, what, f"is a folder, not a file{hint}")
    if not p.exists():
        sentence = f"{what} not found: {p}"
        raise FileError(f"{sentence}; check the path, or {remedy(what)}", p, sentence)
    if not p.is_file():
        raise file_error(p, what, "is not a regular file")
    if p.stat().st_size == 0:
        raise file_error(p, what, "is empty (0 bytes)", damaged=True)
    return p


def describe_kind(kind: Any) -> str:
    """'a tokenizer', 'a token file'... for the `kind` of a clusterar file's metadata."""
    name = KIND_NAMES.get(kind) if isinstance(kind, str) else None
    if name is None:
        return f"a file of kind {kind!r}" if kind is not None else "a file without a kind"
    return ("an " if name[0] in "aeiou" else "a ") + name


def expect_kind(path: str | os.PathLike, meta: dict[str, Any], kind: str, what: str) -> None:
    """Refuse a clusterar file of another kind than `kind`, saying what it is and what to pass instead."""
    if meta.get("kind") != kind:
        sentence = f"{path} is {describe_kind(meta.get('kind'))}, not a {what}"
        raise FileError(f"{sentence}; {remedy(what)}", path, sentence)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = check_file(path, what, (".json",))
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise file_error(path, what, "is not a text file (binary bytes), so not JSON", damaged=True) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated"):  # it ended inside a value
            raise file_error(path, what, "is truncated (its JSON ends in the middle)", damaged=True) from e
        raise file_error(path, what, f"is not valid JSON ({e})", damaged=True) from e


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


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


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
    try:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        raise file_error(path, what, "is not a safetensors file (malformed header)", damaged=True) from e
    end = max(ends, default=0)
    if 8 + n + end > size:
        raise file_error(path, what, f"is truncated ({size} of {8 + n + end} bytes)", damaged=True)
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
        raise file_error(path, what, f"has no tensor '{name}'")
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

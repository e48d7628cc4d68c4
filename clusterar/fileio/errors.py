"""What is wrong with a file, worded one way for every kind of file: each error names the file, says what
it is instead (missing, a folder, empty, truncated, another kind) and ends with how to get a good one."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from ..errors import ClusterarError

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
        if is_symlink_loop(p):
            raise file_error(p, what, "is a symbolic link loop (following its links leads back to them)")
        sentence = f"{what} not found: {p}"
        raise FileError(f"{sentence}; check the path, or {remedy(what)}", p, sentence)
    if not p.is_file():
        raise file_error(p, what, "is not a regular file")
    if p.stat().st_size == 0:
        raise file_error(p, what, "is empty (0 bytes)", damaged=True)
    return p


def is_symlink_loop(path: str | os.PathLike) -> bool:
    """Whether `path` cannot be resolved because its symbolic links form a loop (which `exists()` reports
    as a missing file)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


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


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__

"""Token files: a whole dataset split encoded once, as ONE memory-mappable file.

LlamaGen writes one .npy per image (2.5M files and 59 GB for ImageNet with ten-crop). We write one
safetensors file per split:

    codes   [N, V, H*W]  ids in the smallest integer dtype that holds the codebook (uint8 / int16 / int32)
    labels  [N]          int64 class ids
    header  JSON: tokenizer and codebook fingerprints, grid, codebook size, views, dataset, split, classes,
            and, once clusters are applied, the permutation that was applied to the ids.

V is the number of views per image: 1 (none), 2 (original + horizontal flip, the default) or 10 (ten-crop).
`TokenFile.open` memory-maps the codes, so a training job touches only the rows it reads.

Encoding is resumable: progress goes to `<out>.partial.npy` + `<out>.partial.json` (every `save_every`
seconds, 30 by default), and the final file is written by atomic rename only when every image is done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import collate_images, load_dataset, make_views, to_float, view_load_size
from .errors import ClusterarError
from .fileio import kill_point, mmap_tensor, read_meta, save_tensors, write_json
from .runtime import autocast
from .tokenizer import VQModel

log = logging.getLogger("clusterar.tokens")

TOKENS_KIND = "clusterar.tokens"
VIEW_NAMES = {
    "none": ["original"],
    "flip": ["original", "hflip"],
    "ten-crop": [f"crop{i}" for i in range(10)],
}


def smallest_dtype(codebook_size: int) -> np.dtype:
    """uint8 up to 256 codes, int16 up to 32768 (LlamaGen's 16384), else int32."""
    if codebook_size <= 256:
        return np.dtype(np.uint8)
    if codebook_size <= 32768:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


@dataclass
class TokenFile:
    """An opened token file: memory-mapped codes, labels in memory, metadata."""

    path: Path
    codes: np.ndarray  # [N, V, L], memory-mapped, read-only
    labels: np.ndarray  # [N] int64
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenFile:
        path = Path(path)
        meta = read_meta(path, "token file")
        if meta.get("kind") != TOKENS_KIND:
            raise ClusterarError(
                f"{path} is a clusterar {meta.get('kind', 'file')}, not a token file; make one with `clusterar encode`"
            )
        codes = mmap_tensor(path, "codes", "token file")
        labels = np.asarray(mmap_tensor(path, "labels", "token file"))
        return cls(path, codes, labels, meta)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def num_views(self) -> int:
        return self.codes.shape[1]

    @property
    def seq_len(self) -> int:
        return self.codes.shape[2]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def check_tokenizer(self, tokenizer: VQModel) -> None:
        """Refuse to pair these tokens with a tokenizer other than the one that made them."""
        fp = tokenizer.fingerprint()
        if fp != self.meta["tokenizer_fingerprint"]:
            raise ClusterarError(
                f"token file {self.path} was encoded by tokenizer {self.meta['tokenizer_fingerprint']}, "
                f"but the tokenizer given has fingerprint {fp}; re-encode with `clusterar encode` or pass the "
                "tokenizer that made it"
            )

    def batch(
        self, idx: np.ndarray | torch.Tensor, view: np.ndarray | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int64 [B, L], labels int64 [B]) for rows `idx`, view `view` per row (default 0)."""
        idx = np.asarray(idx)
        view = np.zeros_like(idx) if view is None else np.asarray(view)
        codes = torch.from_numpy(self.codes[idx, view].astype(np.int64))
        return codes, torch.from_numpy(self.labels[idx].astype(np.int64))


def write_token_file(
    path: str | os.PathLike, codes: np.ndarray, labels: np.ndarray, meta: dict[str, Any]
) -> None:
    """Save codes [N, V, L] and labels [N] with metadata, atomically. The dtype of `codes` is kept."""
    if codes.ndim != 3 or labels.shape != (codes.shape[0],):
        raise ValueError(f"codes must be [N, V, L] and labels [N]; got {codes.shape} and {labels.shape}")
    save_tensors(
        path,
        {
            "codes": torch.from_numpy(np.ascontiguousarray(codes)),
            "labels": torch.from_numpy(labels.astype(np.int64)),
        },
        {"kind": TOKENS_KIND, **meta},
    )


@torch.no_grad()
def encode_dataset(
    tokenizer: VQModel,
    data: str,
    split: str,
    out: str | os.PathLike,
    image_size: int,
    views: str = "flip",
    batch_size: int = 128,
    num_workers: int = 0,
    on_error: str = "fail",
    progress: bool = True,
    save_every: float = 30.0,
) -> TokenFile:
    """Encode one split of a dataset into one token file (resumable; see the module docstring).

    Progress is saved after the first batch that ends `save_every` seconds after the last save (0: after
    every batch); an interrupted run loses at most that much work.
    """
    if views not in VIEW_NAMES:
        raise ClusterarError(f"unknown --views '{views}'; choose one of {', '.join(VIEW_NAMES)}")
    out = Path(out)
    device = next(tokenizer.parameters()).device
    dataset = load_dataset(data, split, view_load_size(image_size, views), on_error=on_error)
    f = tokenizer.config.downsample
    if image_size % f:
        raise ClusterarError(
            f"--image-size {image_size} is not a multiple of the tokenizer's downsampling {f}"
        )
    grid = (image_size // f, image_size // f)
    n, v, seq = len(dataset), len(VIEW_NAMES[views]), grid[0] * grid[1]
    dtype = smallest_dtype(tokenizer.config.codebook_size)
    settings = {
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "codebook_fingerprint": tokenizer.codebook_fingerprint(),
        "codebook_size": tokenizer.config.codebook_size,
        "grid": list(grid),
        "image_size": image_size,
        "views": VIEW_NAMES[views],
        "dataset": data,
        "split": split,
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "permutation": None,
    }
    part_codes = out.with_name(out.name + ".partial.npy")
    part_state = out.with_name(out.name + ".partial.json")
    done, skipped = 0, []
    if part_state.exists() and part_codes.exists():
        state = json.loads(part_state.read_text())
        if state["settings"] == settings and state["shape"] == [n, v, seq]:
            done, skipped = state["done"], state["skipped"]
            codes = np.lib.format.open_memmap(part_codes, mode="r+")
            log.info("resuming %s at image %d of %d", out, done, n)
        else:
            log.warning("discarding partial encoding %s: it was made with other settings", part_codes)
            done = 0
    if done == 0:
        # The state file says how many rows of the codes file are valid: a stale one (settings changed, or
        # a run killed while it removed its partial files) must not vouch for the new codes file.
        part_state.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        codes = np.lib.format.open_memmap(part_codes, mode="w+", dtype=dtype, shape=(n, v, seq))

    def save_progress(codes: np.ndarray) -> None:
        codes.flush()
        write_json(part_state, {"settings": settings, "shape": [n, v, seq], "done": done, "skipped": skipped})

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(done, n)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    tokenizer.eval()
    last_save = time.monotonic()
    bar = tqdm(
        total=n, initial=done, desc=f"encode {split}", unit="img", disable=not progress, dynamic_ncols=True
    )
    for images, _, ok in loader:
        rows = np.arange(done, done + len(ok))
        skipped += [int(r) for r in rows[~ok.numpy()]]
        if len(images):
            x = make_views(images, views, image_size).flatten(0, 1).to(device)
            with autocast(device):
                ids = tokenizer.encode(to_float(x))
            codes[rows[ok.numpy()]] = ids.reshape(len(images), v, seq).cpu().numpy().astype(dtype)
        done += len(ok)
        bar.update(len(ok))
        if time.monotonic() - last_save >= save_every:
            save_progress(codes)
            last_save = time.monotonic()
        kill_point("encode.batch")
    bar.close()
    save_progress(codes)
    keep = np.setdiff1d(np.arange(n), np.asarray(skipped, dtype=np.int64))
    meta = dict(settings, skipped=[dataset.path(i) for i in skipped])
    if skipped:
        log.warning(
            "skipped %d unreadable images of %s (listed in the token file's metadata)", len(skipped), data
        )
    write_token_file(out, codes[keep] if skipped else np.asarray(codes), dataset.labels.numpy()[keep], meta)
    del codes  # close the memory map before removing its file
    part_state.unlink()  # first: a codes file without its state file is never trusted
    kill_point("encode.cleanup")
    part_codes.unlink()
    return TokenFile.open(out)

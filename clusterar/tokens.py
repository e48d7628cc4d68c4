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
seconds, 30 by default), and the final file is written by atomic rename only when every image is done. A
job that stops (an unreadable image, Ctrl-C) before any image is encoded leaves no partial files; one that
stops later saves its progress and says so, and the same command continues; progress saved with other
settings is refused, naming them (`clusterar.resume`'s policy; `encode_dataset(restart=True)` discards it). Images smaller than the image
size are upscaled (as ADM and LlamaGen do) and counted in one warning at the end and in the metadata
(`upscaled`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .data import (
    WithSourceSizes,
    collate_with_sizes,
    default_views,
    describe_upscaled,
    load_dataset,
    make_views,
    to_float,
    view_load_size,
)
from .errors import ClusterarError
from .fileio import FileError, expect_kind, file_error, mmap_tensor, read_meta, save_tensors, write_json
from .killpoints import kill_point
from .lock import folder_lock
from .resume import Record, SettingsDiffer
from .runtime import autocast, notice
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
        """Memory-map a token file, checked against its metadata (`check_token_contents`)."""
        path = Path(path)
        meta = read_meta(path, "token file")
        expect_kind(path, meta, TOKENS_KIND, "token file")
        codes = mmap_tensor(path, "codes", "token file")
        labels = np.asarray(mmap_tensor(path, "labels", "token file"))
        check_token_contents(path, codes, labels, meta)
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

    def check_tokenizer(self, tokenizer: VQModel, source: str | os.PathLike | None = None) -> None:
        """Refuse to pair these tokens with a tokenizer other than the one that made them; `source` is the
        tokenizer's file, named in the error."""
        fp = tokenizer.fingerprint()
        given = f"tokenizer {source}" if source is not None else "the tokenizer given"
        encode = f"`clusterar encode --tokenizer {source}`" if source is not None else "`clusterar encode`"
        if fp != self.meta.get("tokenizer_fingerprint"):
            raise ClusterarError(
                f"token file {self.path} was encoded by tokenizer {self.meta.get('tokenizer_fingerprint')}, "
                f"but {given} has fingerprint {fp}; pass the tokenizer that encoded it, or re-encode the "
                f"images with {encode}"
            )
        size = tokenizer.config.codebook_size
        if "codebook_size" in self.meta and self.meta["codebook_size"] != size:
            # same fingerprint, another size: the metadata was edited, and ids past `size` would not decode
            raise ClusterarError(
                f"token file {self.path} says its codebook has {self.meta['codebook_size']} codes, but {given} "
                f"(which encoded it) has {size}; the file is damaged: re-encode the images with {encode}"
            )

    def batch(
        self, idx: np.ndarray | torch.Tensor, view: np.ndarray | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int64 [B, L], labels int64 [B]) for rows `idx`, view `view` per row (default 0)."""
        idx = np.asarray(idx)
        view = np.zeros_like(idx) if view is None else np.asarray(view)
        codes = torch.from_numpy(self.codes[idx, view].astype(np.int64))
        return codes, torch.from_numpy(self.labels[idx].astype(np.int64))


# Codes and labels are checked in blocks over the memory map: about 0.1 ms per million tokens once the
# file is in the page cache (measured for int16 with numpy, 2 cores shared), so 0.07 s for ImageNet with
# flips (1.28M x 2 x 256 tokens, 1.3 GB) and 0.3 s with ten-crop; a cold file costs one read at disk speed,
# which the first epoch pays anyway. Cheap enough to do at every open, so nothing is cached.
CHECK_BLOCK = 1 << 22  # elements per block: a few MB of memory, whatever the file's size


def value_range(arr: np.ndarray) -> tuple[int, int]:
    """(min, max) of a non-empty memory-mapped integer array, read once in blocks of CHECK_BLOCK elements."""
    flat = arr.reshape(-1)
    lo = hi = int(flat[0])
    for i in range(0, flat.size, CHECK_BLOCK):
        block = flat[i : i + CHECK_BLOCK]  # min and max while the block is in the CPU cache
        lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
    return lo, hi


def check_token_contents(path: Path, codes: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """Refuse a token file whose tensors contradict its metadata (each as a damaged token file): codes
    [N, V, L] of an integer dtype, labels [N], grid[0] x grid[1] = L, codes in [0, codebook_size), labels
    in [0, num_classes). Keys the metadata lacks are not checked."""

    def damaged(problem: str) -> FileError:
        return file_error(path, "token file", problem, damaged=True)

    if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
        raise damaged(f"has codes {codes.dtype} {list(codes.shape)}; expected integer ids [N, views, tokens]")
    if labels.shape != codes.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise damaged(f"has labels {labels.dtype} {list(labels.shape)} for {len(codes)} images")
    grid = meta.get("grid")
    if grid is not None:
        ok = isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)
        if not ok or grid[0] * grid[1] != codes.shape[2]:
            raise damaged(f"says its grid is {grid}, but it holds {codes.shape[2]} tokens per image")
    for name, arr, key in (("codes", codes, "codebook_size"), ("labels", labels, "num_classes")):
        if key not in meta or arr.size == 0:
            continue
        n = meta[key]
        if not isinstance(n, int) or n < 1:
            raise damaged(f"has a damaged {key} ({n!r}) in its metadata")
        if np.iinfo(arr.dtype).min >= 0 and np.iinfo(arr.dtype).max < n:
            continue  # every value of the dtype is in range (uint8 codes of a 256+ codebook): nothing to read
        lo, hi = value_range(arr)
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise damaged(f"holds {name} from {lo} to {hi}: {bad} is outside [0, {n}) ({key} {n})")


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


def shard_rows(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) that process `rank` of `world` encodes: a contiguous block of whole batches of the
    one-process order, so that every image is encoded in the very batch one process would use (the same
    numbers, and the same token file)."""
    batches = -(-n // batch_size)
    return min(n, rank * batches // world * batch_size), min(n, (rank + 1) * batches // world * batch_size)


def _state_file(out: Path, rank: int, world: int) -> Path:
    return out.with_name(out.name + (".partial.json" if world == 1 else f".partial.rank{rank}.json"))


def _state_files(out: Path) -> list[Path]:
    """Every state file of an interrupted encoding of `out`: one process's, or one per torchrun process."""
    single = out.with_name(out.name + ".partial.json")
    return ([single] if single.exists() else []) + sorted(out.parent.glob(out.name + ".partial.rank*.json"))


def _check_partial_world(out: Path, world: int) -> None:
    """An interrupted encoding continues only with as many processes as it was started with."""
    for f in _state_files(out):
        try:
            was = int(json.loads(f.read_text()).get("world", 1))
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: _saved_progress discards it
        if was != world:
            raise ClusterarError(
                f"{f} holds the progress of an encoding run by {was} process(es), and this one has {world}; "
                f"continue it with the same number of processes (torchrun --nproc_per_node {was} ...), or "
                f"delete {out.name}.partial.* in {out.parent} to start over"
            )


def _merge_shards(out: Path, world: int) -> tuple[list[int], dict[int, tuple]]:
    """The skipped rows and upscaled images of every process, from their state files (rank 0, at the end)."""
    skipped: list[int] = []
    upscaled: dict[int, tuple] = {}
    for r in range(world):
        state = json.loads(_state_file(out, r, world).read_text())
        skipped += state["skipped"]
        upscaled.update({int(i): tuple(size) for i, size in state.get("upscaled", {}).items()})
    return sorted(skipped), upscaled


def resolve_views(data: str, views: str) -> str:
    """The views a token file of `data` holds: "auto" is data.default_views (flips for image folders, none
    for the bundled digits)."""
    if views == "auto":
        views = default_views(data)
    if views not in VIEW_NAMES:
        raise ClusterarError(f"unknown --views '{views}'; choose one of auto, {', '.join(VIEW_NAMES)}")
    return views


class PartialEncoding(Record):
    """The state file of an interrupted encoding (`<out>.partial.json`, one per torchrun process): the
    settings, the shape of the codes file and this process's rows, compared as one record, beside the
    progress (done, skipped, upscaled)."""

    def settings(self, content: dict[str, Any]) -> dict[str, Any]:
        shape = content.get("shape") or [0]
        rows = content.get("rows", [0, shape[0]])  # a state file of before torchrun encodings: all rows
        return {**(content.get("settings") or {}), "shape": shape, "rows": rows}


@dataclass
class Encoding:
    """The plan of one process's encoding: what it writes, its rows [lo, hi), and its progress."""

    out: Path
    settings: dict[str, Any]
    shape: tuple[int, int, int]  # [N, V, L] of the whole split
    lo: int
    hi: int
    rank: int
    world: int
    done: int = 0  # the next row to encode
    skipped: list[int] = field(default_factory=list)
    upscaled: dict[int, tuple] = field(default_factory=dict)

    @property
    def part_codes(self) -> Path:
        return self.out.with_name(self.out.name + ".partial.npy")

    @property
    def record(self) -> PartialEncoding:
        return PartialEncoding(
            _state_file(self.out, self.rank, self.world),
            "an interrupted encoding",
            f"Delete {self.out.name}.partial.* in {self.out.parent} to start over, or encode into another file",
        )

    def now(self) -> dict[str, Any]:
        return {**self.settings, "shape": list(self.shape), "rows": [self.lo, self.hi]}

    def save(self, codes: np.ndarray) -> None:
        """Flush the codes, then the state that vouches for them."""
        codes.flush()
        state = {
            "settings": self.settings,
            "shape": list(self.shape),
            "done": self.done,
            "skipped": self.skipped,
        }
        state.update(rows=[self.lo, self.hi], world=self.world)
        write_json(
            self.record.path, dict(state, upscaled={str(i): list(s) for i, s in self.upscaled.items()})
        )


def _saved_progress(plan: Encoding, restart: bool) -> tuple[dict | None, str | None]:
    """This process's saved state when it continues with these settings (`Record.check`); else None, and
    the refusal's message when the settings differ and `restart` is not given."""
    record = plan.record
    if not plan.part_codes.exists() or not record.path.exists():
        return None, None
    try:
        np.lib.format.open_memmap(plan.part_codes, mode="r")
        state = record.read()
        if not (isinstance(state, dict) and {"settings", "shape", "done", "skipped"} <= set(state)):
            return None, None
        return record.check(plan.now()), None
    except SettingsDiffer as e:
        if restart:
            if plan.rank == 0:
                log.warning(
                    "discarding partial encoding %s: it was made with other settings", plan.part_codes
                )
            return None, None
        return None, str(e)
    except (OSError, ValueError, FileError) as e:
        log.warning("discarding partial encoding %s: it cannot be read (%s)", plan.part_codes, e)
        return None, None


@torch.no_grad()
def encode_dataset(
    tokenizer: VQModel,
    data: str,
    split: str,
    out: str | os.PathLike,
    image_size: int,
    views: str = "auto",
    batch_size: int = 128,
    num_workers: int = 0,
    on_error: str = "fail",
    progress: bool = True,
    save_every: float = 30.0,
    rank: int = 0,
    world: int = 1,
    restart: bool = False,
) -> TokenFile:
    """Encode one split of a dataset into one token file (resumable; see the module docstring).

    views "auto": data.default_views (flips for image folders, none for the bundled digits).

    Progress is saved after the first batch that ends `save_every` seconds after the last save (0: after
    every batch); an interrupted run loses at most that much work. Progress saved with other settings is
    refused (`clusterar.resume`'s policy), or discarded with a warning given `restart`.

    Under torchrun (`world` processes, torch.distributed initialised), process `rank` encodes its block of
    whole batches (`shard_rows`) into the one shared partial file, with a state file of its own; rank 0
    assembles the token file, which is the one a single process writes. Rank 0 holds the lock of the
    token file's folder (`clusterar.lock`) for the job: a second process encoding into it is refused.
    """
    views = resolve_views(data, views)
    if batch_size < 1 or num_workers < 0 or image_size < 1:
        raise ClusterarError(
            f"--batch-size and --image-size must be at least 1 and --num-workers >= 0, got {batch_size}, "
            f"{image_size} and {num_workers}"
        )
    # one writer per folder of token files; rank 0 holds it for the job
    with folder_lock(Path(out).parent, active=rank == 0):
        dataset = load_dataset(data, split, view_load_size(image_size, views), on_error=on_error)
        plan = _plan_encoding(
            tokenizer, dataset, data, split, Path(out), image_size, views, batch_size, rank, world
        )
        codes = _open_codes(plan, tokenizer, restart)
        loader = torch.utils.data.DataLoader(
            WithSourceSizes(dataset, plan.done, plan.hi),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_with_sizes,
        )
        tokenizer.eval()
        bar = tqdm(
            total=plan.hi - plan.lo,
            initial=plan.done - plan.lo,
            desc=f"encode {split}" + (f" (process 0 of {world})" if world > 1 else ""),
            unit="img",
            disable=not progress or rank != 0,
            dynamic_ncols=True,
        )
        last_save = time.monotonic()
        try:
            with logging_redirect_tqdm():  # warnings (e.g. a converted CMYK file) go above the bar
                for images, _, ok, sizes in loader:
                    _encode_batch(plan, codes, tokenizer, dataset, images, ok, sizes, views, image_size)
                    bar.update(len(ok))
                    if time.monotonic() - last_save >= save_every:
                        plan.save(codes)
                        last_save = time.monotonic()
                    kill_point("encode.batch")
        except BaseException as e:
            bar.close()  # ends the bar's line, so the error is printed on a line of its own
            _stopped(plan, codes, split, e)
        bar.close()
        plan.save(codes)
        return _finish_encoding(plan, codes, dataset, data)


def _plan_encoding(
    tokenizer: VQModel,
    dataset: Any,
    data: str,
    split: str,
    out: Path,
    image_size: int,
    views: str,
    batch_size: int,
    rank: int,
    world: int,
) -> Encoding:
    """The settings and the rows of this process (no file read or written yet)."""
    f = tokenizer.config.downsample
    if image_size % f:
        raise ClusterarError(
            f"--image-size {image_size} is not a multiple of the tokenizer's downsampling {f}"
        )
    grid = (image_size // f, image_size // f)
    n, v, seq = len(dataset), len(VIEW_NAMES[views]), grid[0] * grid[1]
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
    lo, hi = shard_rows(n, batch_size, rank, world)
    return Encoding(out, settings, (n, v, seq), lo, hi, rank, world, done=lo)


def _open_codes(plan: Encoding, tokenizer: VQModel, restart: bool) -> np.ndarray:
    """The partial codes file, continued when every process's saved state matches, else started over
    (refused when the settings differ and `restart` is not given); memory-mapped for writing."""
    out, rank, world = plan.out, plan.rank, plan.world
    _check_partial_world(out, world)
    state, refused = _saved_progress(plan, restart)
    resume = state is not None
    if world > 1:  # all resume, or all start over: one stale shard must not leave holes in the file
        votes: list[Any] = [None] * world
        dist.all_gather_object(votes, (resume, refused))
        resume = all(r for r, _ in votes)
        refused = refused or next((f"process {i}: {m}" for i, (_, m) in enumerate(votes) if m), None)
    if refused:
        raise ClusterarError(refused)
    if resume:
        plan.done, plan.skipped = state["done"], state["skipped"]
        plan.upscaled = {int(i): tuple(size) for i, size in state.get("upscaled", {}).items()}
        if rank == 0:
            notice(
                f"resuming {out} at image {plan.done - plan.lo} of {plan.hi - plan.lo}"
                + (f" (process 0 of {world})" if world > 1 else "")
            )
    elif rank == 0:
        # The state files say how many rows of the codes file are valid: stale ones (settings changed, or a
        # run killed while it removed its partial files) must not vouch for the new codes file.
        for f in _state_files(out):
            f.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        dtype = smallest_dtype(tokenizer.config.codebook_size)
        np.lib.format.open_memmap(plan.part_codes, mode="w+", dtype=dtype, shape=plan.shape).flush()
    if world > 1:
        dist.barrier()  # the codes file exists before any other process opens it
    return np.lib.format.open_memmap(plan.part_codes, mode="r+")


def _encode_batch(
    plan: Encoding,
    codes: np.ndarray,
    tokenizer: VQModel,
    dataset: Any,
    images: torch.Tensor,
    ok: torch.Tensor,
    sizes: torch.Tensor,
    views: str,
    image_size: int,
) -> None:
    """Encode one batch into its rows of `codes`; note the unreadable and the upscaled images."""
    _, v, seq = plan.shape
    rows = np.arange(plan.done, plan.done + len(ok))
    plan.skipped += [int(r) for r in rows[~ok.numpy()]]
    side = sizes.min(dim=1).values  # 0: a bundled image, resized by design
    small = ok & (side > 0) & (side < dataset.image_size)
    plan.upscaled.update({int(rows[j]): tuple(sizes[j].tolist()) for j in torch.nonzero(small).flatten()})
    if len(images):
        device = next(tokenizer.parameters()).device
        x = make_views(images, views, image_size).flatten(0, 1).to(device)
        with autocast(device):
            ids = tokenizer.encode(to_float(x))
        codes[rows[ok.numpy()]] = ids.reshape(len(images), v, seq).cpu().numpy().astype(codes.dtype)
    plan.done += len(ok)


def _stopped(plan: Encoding, codes: np.ndarray, split: str, e: BaseException) -> None:
    """An encoding that stops: nothing to continue from leaves no partial files; otherwise its progress
    is saved and an error says so. Always raises."""
    if plan.done == plan.lo and plan.world == 1:
        del codes
        plan.part_codes.unlink(missing_ok=True)
        plan.record.path.unlink(missing_ok=True)
        raise e
    plan.save(codes)
    if isinstance(e, ClusterarError):
        raise ClusterarError(
            f"{e}. The {plan.done - plan.lo} images of {split} encoded before it are kept in "
            f"{plan.part_codes.name} and {plan.record.path.name}: the same command continues from there "
            "(delete both to start over)"
        ) from e
    raise e


def _finish_encoding(plan: Encoding, codes: np.ndarray, dataset: Any, data: str) -> TokenFile:
    """Rank 0 writes the token file from every process's rows, then removes the partial files."""
    out, world = plan.out, plan.world
    skipped, upscaled = plan.skipped, plan.upscaled
    if world > 1:
        dist.barrier()  # every shard is on disk
        if plan.rank != 0:
            del codes
            dist.barrier()  # rank 0 has written the token file
            return TokenFile.open(out)
        skipped, upscaled = _merge_shards(out, world)
    keep = np.setdiff1d(np.arange(plan.shape[0]), np.asarray(skipped, dtype=np.int64))
    meta = dict(plan.settings, skipped=[dataset.path(i) for i in skipped], upscaled=len(upscaled))
    if skipped:
        log.warning(
            "skipped %d unreadable images of %s (listed in the token file's metadata)", len(skipped), data
        )
    if upscaled:
        log.warning("%s", describe_upscaled(dataset, upscaled))
    write_token_file(out, codes[keep] if skipped else np.asarray(codes), dataset.labels.numpy()[keep], meta)
    del codes  # close the memory map before removing its file
    for f in _state_files(out):  # first: a codes file without its state files is never trusted
        f.unlink()
    kill_point("encode.cleanup")
    plan.part_codes.unlink()
    if world > 1:
        dist.barrier()
    return TokenFile.open(out)

"""What `clusterar sample` writes: class labels, then a folder of samples that survives interruption.

`sample_to_folder` writes grid.png, PNGs, an ADM-format .npz and sample.json, batch by batch; every batch
has its own seed, so an interrupted run resumes exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from .. import limits
from ..errors import ClusterarError
from ..fileio import atomic_path, read_json, write_json
from ..killpoints import kill_point
from ..lock import folder_lock
from ..resume import Record
from ..runtime import notice
from ..viz import save_grid
from .generate import SampleSettings, auto_compile
from .pipeline import Pipeline


def make_labels(
    n: int,
    num_classes: int,
    *,
    per_class: bool = False,
    labels: list[int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """n class labels and a sentence saying how they were chosen.

    per_class: class-balanced, in class order (n / num_classes each; when that does not divide, the first
    n % num_classes classes get one more). `labels`: the list repeated to n. Otherwise uniform at random
    from `seed` (what the public FID scripts do).
    """
    if n < 1:
        raise ClusterarError(f"--n must be positive, got {n}")
    limits.IMAGES.check(n, "--n")
    if labels is not None:
        arr = np.asarray(labels, dtype=np.int64)
        if arr.size == 0 or arr.min() < 0 or arr.max() >= num_classes:
            raise ClusterarError(f"--labels must be class ids in [0, {num_classes}), got {list(labels)}")
        return np.resize(arr, n), f"the given labels {arr.tolist()} repeated to {n}"
    if per_class:
        base, extra = divmod(n, num_classes)
        counts = np.full(num_classes, base, dtype=np.int64)
        counts[:extra] += 1
        out = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
        if extra == 0:
            how = f"{base} per class for each of {num_classes} classes"
        elif base == 0:
            how = f"one each for classes 0..{extra - 1} ({n} < {num_classes} classes)"
        else:
            how = (
                f"{n} does not divide over {num_classes} classes: classes 0..{extra - 1} get {base + 1}, "
                f"the others {base}"
            )
        return out, how
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, n, dtype=np.int64), f"uniform at random over {num_classes} classes"


def _batch_seed(seed: int, batch: int) -> int:
    """Independent streams per batch (seed s batch 1 never equals seed s+1 batch 0), so resuming is exact."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0] >> 1)


def _grid_selection(labels: np.ndarray, per_class: bool, max_side: int = 16) -> tuple[list[int | None], int]:
    """Indices of the images in grid.png (None = blank) and images per row: rows by class when per-class."""
    if per_class:
        classes = np.unique(labels)[:max_side]
        rows = [np.flatnonzero(labels == c)[:max_side].tolist() for c in classes]
        width = max(len(r) for r in rows)
        return [i for r in rows for i in r + [None] * (width - len(r))], width
    n = min(len(labels), 64)
    return list(range(n)), min(8, n)


def save_sample_grid(images: np.ndarray, select: list[int | None], nrow: int, path: Path) -> None:
    h, w = images.shape[1:3]
    blank = np.full((h, w, 3), 255, np.uint8)
    picked = np.stack([images[i] if i is not None else blank for i in select])
    scale = max(1, 64 // max(h, w))
    save_grid(torch.from_numpy(picked).permute(0, 3, 1, 2), path, nrow=nrow, scale=scale)


def _save_png(img: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def sample_to_folder(
    pipeline: Pipeline,
    labels: np.ndarray,
    out: str | os.PathLike,
    *,
    settings: SampleSettings,
    seed: int = 0,
    batch_size: int = 64,
    compile: bool | str | None = None,
    per_class: bool = False,
    write_images: bool = True,
    progress: bool = True,
    info: dict | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Sample len(labels) images into `out`: grid.png, images/NNNNNN.png, samples.npz (ADM format: arr_0 uint8
    [N, H, W, 3], arr_1 labels) and sample.json (settings, pipeline, time, images/s).

    Batch b is drawn with its own seed derived from (seed, b), so every image depends only on the settings:
    finished batches are kept in out/parts/ and an interrupted run continues where it stopped when run
    again with the same settings; other settings in a non-empty folder are refused (`clusterar.resume`'s
    policy, with parts/run.json and then sample.json as the record). The parts are removed once the .npz
    is written.

    Under torchrun (`world` processes, torch.distributed initialised) process `rank` draws batches rank,
    rank + world, ...: the same batches with the same seeds, so the samples are the ones one process
    draws, and a killed run continues with any number of processes. Rank 0 writes the npz and sample.json,
    and holds the folder's lock (`clusterar.lock`): a second process sampling into it is refused.
    """
    out = Path(out)
    labels = np.asarray(labels, dtype=np.int64)
    compile = auto_compile(compile, pipeline.device)  # recorded as chosen: True on CUDA unless told
    if batch_size < 1:
        raise ClusterarError(f"--batch-size must be positive, got {batch_size}")
    run = {
        "source": str(Path(pipeline.source).resolve()),  # the same file however its path is spelled
        "method": pipeline.method,
        "settings": asdict(settings),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "n": len(labels),
        "labels_sha": hashlib.sha256(labels.tobytes()).hexdigest()[:16],
        "device": pipeline.device.type,
        "compile": compile,  # bf16 numerics of a compiled step differ slightly: other draws, same distribution
    }
    with folder_lock(out, active=rank == 0):  # one writer per sample folder; rank 0 holds it for the job
        done = _check_folder(out, run, rank, world)
        if done is not None:
            return done
        timed, reused = [], 0  # (images, seconds) of the batches generated in this session; batches kept
        # One writer thread encodes and writes batch b while the device draws batch b + 1; leaving the
        # block waits for its last batch (also on Ctrl-C: nothing drawn is lost).
        with BatchWriter(write_images) as writer:
            for b in tqdm(
                range(rank, math.ceil(len(labels) / batch_size), world),
                desc="sampling",
                unit="batch",
                disable=not progress or rank != 0,
            ):
                lo, hi = b * batch_size, min(len(labels), (b + 1) * batch_size)
                seconds = _draw_batch(pipeline, labels[lo:hi], b, lo, out, settings, seed, compile, writer)
                if seconds is None:
                    reused += 1
                else:
                    timed.append((hi - lo, seconds))
        _together(world)  # every batch is on disk
        timing = _job_timing(timed, reused, rank, world)
        if timing is None:
            _together(world)  # rank 0 has written the npz and sample.json
            return read_json(out / "sample.json", "sample record")
        _write_samples(out, pipeline.image_size, labels, batch_size, per_class)
        summary = _summary(run, pipeline, labels, *timing, info=info, write_images=write_images, world=world)
        write_json(out / "sample.json", summary)
        kill_point("sample.finish")
        shutil.rmtree(out / "parts")
        _together(world)
        return summary


def _draw_batch(
    pipeline: Pipeline,
    labels: np.ndarray,
    b: int,
    lo: int,
    out: Path,
    settings: SampleSettings,
    seed: int,
    compile: bool | str,
    writer: BatchWriter,
) -> float | None:
    """Draw batch `b` (images `lo`...) and hand it to `writer`; return its seconds, None if it was kept."""
    part = out / "parts" / f"batch-{b:06d}.npy"
    if part.exists():
        return None
    pipeline.sync()
    t0 = time.perf_counter()
    images = pipeline.sample(labels, _batch_seed(seed, b), settings=settings, compile=compile).numpy()
    pipeline.sync()
    seconds = time.perf_counter() - t0
    writer.submit(images, lo, out, part)
    return seconds


class BatchWriter:
    """Writes drawn batches (images/*.png, then the part file that marks the batch done) on one thread, in
    order, so that encoding PNGs never holds up the next batch's draw. An error in a write is raised in the
    caller at the next submit or when the block ends."""

    def __init__(self, write_images: bool):
        self.write_images = write_images
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clusterar-writer")
        self.pending: list[Future] = []

    def submit(self, images: np.ndarray, lo: int, out: Path, part: Path) -> None:
        """Queue a batch; with one batch already queued, wait for the older one first, so that at most one
        batch waits (memory stays bounded when drawing outruns writing)."""
        self._raise_done()
        while len(self.pending) > 1:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._write, images, lo, out, part))

    def _write(self, images: np.ndarray, lo: int, out: Path, part: Path) -> None:
        if self.write_images:
            for i, img in enumerate(images):
                _save_png(img, out / "images" / f"{lo + i:06d}.png")
        with atomic_path(part) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        kill_point("sample.batch")

    def _raise_done(self) -> None:
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            f.result()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        if exc[0] is None:
            self._raise_done()


def _together(world: int) -> None:
    """Every process reaches this point before any goes on."""
    if world > 1:
        dist.barrier()


def _records(out: Path) -> tuple[Record, Record]:
    """A sample folder's records of its settings: sample.json (complete) and parts/run.json (in progress)."""
    todo = "Delete it or choose another --out"
    return Record(out / "sample.json", "samples", todo, key="run"), Record(
        out / "parts" / "run.json", "samples", todo, key=None
    )


def _check_folder(out: Path, run: dict, rank: int, world: int) -> dict | None:
    """Refuse a folder of samples made with other settings; the summary of one already complete (None
    otherwise, and then parts/run.json holds this run's settings)."""
    complete, started = _records(out)
    # a run that drew no batch (it failed on its settings, or was stopped at once) holds nothing to keep: a
    # rerun with other settings replaces it, saying so; a folder with finished batches is refused as before
    replaceable = not any((out / "parts").glob("batch-*.npy"))
    for record in (complete, started):
        if record.check(run, restart=replaceable and record is started, where=out) is not None and (
            record is complete
        ):
            notice(f"{out} is already complete ({run['n']} images with these settings); nothing to do")
            if (out / "parts").exists():  # a run killed between sample.json and removing its parts
                shutil.rmtree(out / "parts")
            return {**read_json(complete.path), "already_complete": True}
    _together(world)  # every process has read the records before rank 0 writes one
    if rank == 0:
        started.write(run)
    _together(world)
    n_batches = math.ceil(run["n"] / run["batch_size"])
    kept = sum((out / "parts" / f"batch-{b:06d}.npy").exists() for b in range(n_batches))
    if kept and rank == 0:
        notice(f"resuming {out}: {kept} of {n_batches} batches are already drawn")
    return None


def _job_timing(
    timed: list[tuple[int, float]], reused: int, rank: int, world: int
) -> tuple[list[tuple[int, float]], int] | None:
    """This session's (images, seconds) and reused batches of the whole job, on rank 0 (None elsewhere):
    under torchrun, all images over the slowest process's time."""
    if world == 1:
        return timed, reused
    every: list[Any] = [None] * world
    dist.all_gather_object(every, (timed, reused))
    if rank != 0:
        return None
    seconds_each = [sum(t for _, t in tm) for tm, _ in every]
    timed = [(sum(k for tm, _ in every for k, _ in tm), max(seconds_each))] if any(seconds_each) else []
    return timed, sum(r for _, r in every)


def _write_samples(out: Path, side: int, labels: np.ndarray, batch_size: int, per_class: bool) -> None:
    """samples.npz and grid.png from the parts (stacked through a memory-mapped file)."""
    parts, n = out / "parts", len(labels)
    with atomic_path(out / "samples.npz") as tmp:
        arr = np.lib.format.open_memmap(
            parts / "all.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3)
        )
        for b in range(math.ceil(n / batch_size)):
            arr[b * batch_size : min(n, (b + 1) * batch_size)] = np.load(parts / f"batch-{b:06d}.npy")
        arr.flush()
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr, arr_1=labels)
        select, nrow = _grid_selection(labels, per_class)
        save_sample_grid(arr, select, nrow, out / "grid.png")
        del arr


def _summary(
    run: dict,
    pipeline: Pipeline,
    labels: np.ndarray,
    timed: list[tuple[int, float]],
    reused: int,
    *,
    info: dict | None,
    write_images: bool,
    world: int,
) -> dict:
    """sample.json: the run's settings, the pipeline, what was drawn, and this session's speed."""
    h = w = pipeline.image_size
    seconds = sum(t for _, t in timed)
    done_images = sum(k for k, _ in timed)
    later = timed[1:]  # without the first batch: compilation, CUDA graph capture, allocator warm-up
    summary = {
        "run": run,
        **(info or {}),
        "pipeline": pipeline.describe(),
        "images": len(labels),
        "image_shape": [h, w, 3],
        "label_counts": np.bincount(labels, minlength=pipeline.num_classes).tolist(),
        "batches_generated": len(timed),
        "batches_reused": reused,
        "seconds": round(seconds, 3),
        "images_per_s": round(done_images / seconds, 3) if seconds > 0 else None,
        "images_per_s_after_first_batch": (
            round(sum(k for k, _ in later) / sum(t for _, t in later), 3) if later else None
        ),
        "torch": torch.__version__,
        "files": {"grid": "grid.png", "npz": "samples.npz", "images": "images/" if write_images else None},
    }
    if world > 1:
        summary["processes"] = world
    return summary

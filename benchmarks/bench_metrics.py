"""Metrics benchmark: the MNIST classifier extractor (training time, held-out accuracy) and the cost and
sanity of the metrics on it (real train vs val, uniform noise vs val), plus the 2048-d Frechet distance.

    python benchmarks/bench_metrics.py [--threads 2]

Trains in a fresh temporary cache, so the training time is measured every run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_section  # noqa: E402
from clusterar.data import load_dataset  # noqa: E402
from clusterar.metrics import ClassifierExtractor, evaluate_images, frechet_distance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        ext = ClassifierExtractor("mnist", cache, device="cpu")
        first_use = time.perf_counter() - t
        meta = ext.meta
        t = time.perf_counter()
        ClassifierExtractor("mnist", cache, device="cpu")
        hit = time.perf_counter() - t
        train = load_dataset("mnist", "train").images
        noise = np.random.default_rng(0).integers(0, 256, (len(train), 32, 32, 3), dtype=np.uint8)
        for name, images in (("mnist train (4,500 real)", train), ("uniform noise (4,500)", noise)):
            t = time.perf_counter()
            m = evaluate_images(images, "mnist:val", ext, cache=cache, device="cpu", progress=False)
            rows.append(
                f"| {name} | {m['fid']:.3f} | {m['inception_score']:.3f} | {m['precision']:.4f} | "
                f"{m['recall']:.4f} | {time.perf_counter() - t:.2f} |"
            )
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2048, 4096)), rng.normal(size=(2048, 4096))
    s1, s2 = np.cov(a), np.cov(b)
    t = time.perf_counter()
    frechet_distance(np.zeros(2048), s1, np.zeros(2048), s2)
    fd_seconds = time.perf_counter() - t
    body = "\n".join(
        [
            f"MNIST classifier (width {meta['config']['width']}, {meta['config']['epochs']} epochs, batch "
            f"{meta['config']['batch_size']}, augmentations {meta['config']['augment']}), trained on the "
            f"{meta['n_train']} train images: **held-out val accuracy {100 * meta['val_accuracy']:.1f}%** "
            f"({meta['n_val']} images), train accuracy {100 * meta['train_accuracy']:.1f}%; training "
            f"**{meta['train_seconds']:.1f} s** on {meta['threads']} threads (first use incl. data "
            f"{first_use:.1f} s; a cache hit {hit:.2f} s).",
            "",
            "Metrics against the reference `mnist:val` (500 images; reference statistics cached by the first row):",
            "",
            "| samples | FID | IS | precision | recall | seconds |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Frechet distance of two 2048-d covariances (the Inception case): {fd_seconds:.1f} s.",
        ]
    )
    print(body)
    write_section(
        "metrics",
        "Metrics: MNIST classifier extractor",
        f"python benchmarks/bench_metrics.py --threads {args.threads}",
        body,
    )


if __name__ == "__main__":
    main()

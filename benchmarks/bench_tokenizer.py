"""Tokenizer benchmark: train the cpu-32 preset on bundled MNIST, report wall time, val PSNR, usage.

    python benchmarks/bench_tokenizer.py [--steps N] [--threads T] [--out DIR]

Targets (issue #2): val PSNR >= 25 dB, codebook usage >= 80% of the 4,096 codes, training <= 10 min on
2 CPU cores. The run uses the library's defaults (`TokenizerTrainConfig()`), i.e. what
`clusterar tokenizer train` does with no flags.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_section  # noqa: E402
from clusterar.train import TokenizerTrainConfig, train_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=TokenizerTrainConfig.steps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-tokenizer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = TokenizerTrainConfig(steps=args.steps, device="cpu")
    tic = time.perf_counter()
    ev = train_tokenizer(cfg, args.out)
    total = time.perf_counter() - tic
    train_s = ev["train_seconds_this_session"]
    rows = [
        ("training wall time (steps only)", f"{train_s / 60:.1f} min", "<= 10 min", train_s <= 600),
        ("total incl. final evaluation and pictures", f"{total / 60:.1f} min", "", None),
        ("val PSNR (500 images)", f"{ev['psnr']:.2f} dB", ">= 25 dB", ev["psnr"] >= 25),
        (
            "codebook usage, val (500 images)",
            f"{100 * ev['usage']:.1f}% ({ev['codes_used']} codes)",
            ">= 80%",
            ev["usage"] >= 0.8,
        ),
        (
            "codebook usage, train (4,500 images)",
            f"{100 * ev['train_usage']:.1f}%",
            ">= 80%",
            ev["train_usage"] >= 0.8,
        ),
    ]
    body = (
        f"cpu-32 preset ({ev['params']:,} parameters, 4,096 x 8 codebook, 8x8 tokens), {cfg.steps} steps of "
        f"batch {cfg.batch_size}, lr {cfg.lr} (cosine to {cfg.min_lr_ratio}x), dead-code restarts every "
        f"{cfg.restart_every} steps, {args.threads} threads.\n\n"
        "| measure | value | target | met |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {a} | {b} | {c} | {'' if d is None else ('yes' if d else 'NO')} |" for a, b, c, d in rows
        )
    )
    cmd = "python benchmarks/bench_tokenizer.py" + (
        f" --steps {args.steps}" if args.steps != TokenizerTrainConfig.steps else ""
    )
    write_section("tokenizer", "Tokenizer: cpu-32 on bundled MNIST", cmd, body)
    print(body)


if __name__ == "__main__":
    main()

"""The GPU in one command: the chip's ceilings, then training and sampling, each beside its floor.

    python benchmarks/bench_gpu.py              # a CUDA GPU: LlamaGen sizes, written to RESULTS.md
    python benchmarks/bench_gpu.py --reduced    # any device, seconds: tiny sizes, nothing written (tests)

1. Ceilings, measured here rather than taken from a data sheet: the device-to-device copy bandwidth (bytes
   read + written per second) and the dense matmul rate (bf16 on CUDA, float32 on CPU).
2. Training tokens/s of the four methods (`bench_train.measure`, the full step through `train()`), for
   each model preset. Floor: 6 x params x tokens over the measured matmul rate; the fraction reached is
   MFU against the chip as measured.
3. Sampling images/s of the baseline, IAR (the cluster-ordered draw over a permuted vocabulary) and CTF
   (stage 1 + the refiner's one pass), eager and compiled (`bench_sample`'s models and timing), with the
   weights `Pipeline.load` gives them (bf16 on CUDA). Floor:
   every decode step reads the weights once and the filled prefix of the KV cache, over the measured
   bandwidth; the refiner's pass adds 2 x params x tokens over the matmul rate.

A budget guard (--minutes, default 7.5) stops starting new measurements once the time is spent and says
which were skipped: device time is short, and one prepared run must come back with figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import write_section  # noqa: E402
from benchmarks.bench_sample import build, stage1, stage2, timed  # noqa: E402
from benchmarks.bench_train import data_for, measure, shape_of  # noqa: E402
from clusterar.gpt import param_breakdown  # noqa: E402
from clusterar.methods import TRAIN_METHODS  # noqa: E402
from clusterar.runtime import cast_weights, pick_device, sampling_dtype  # noqa: E402


class Budget:
    """Wall time left for new measurements; what was skipped is said in the results."""

    def __init__(self, minutes: float):
        self.end, self.skipped = time.monotonic() + 60 * minutes, []

    def allows(self, what: str) -> bool:
        if time.monotonic() < self.end:
            return True
        self.skipped.append(what)
        print(f"budget spent: skipping {what}", flush=True)
        return False


# ----------------------------------------------------------------------------- 1. ceilings


def ceilings(device: torch.device, reduced: bool) -> dict[str, float]:
    """{"bandwidth": bytes/s read + written by a copy, "flops": dense matmul FLOP/s} on `device`."""
    n_bytes, side = (2**22, 256) if reduced else (2**31, 8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device, repeats=5, warmup=2)
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    mm = timed(lambda: a @ b, device, repeats=5, warmup=2)
    return {"bandwidth": 2 * n_bytes / copy, "flops": 2 * side**3 / mm}


# ----------------------------------------------------------------------------- 2. training


def training(args: argparse.Namespace, chip: dict, budget: Budget) -> list[str]:
    rows = []
    targs = argparse.Namespace(
        warmup=args.warmup, steps=args.steps, log_every=args.log_every, batch=args.batch, compile=args.compile,
        device=args.device, peak_tflops=chip["flops"] / 1e12,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.train_models:
            grid = shape_of(model)[1]
            files = data_for(Path(tmp), model, args.batch)
            for method in TRAIN_METHODS:
                if not budget.allows(f"training {model} {method}"):
                    continue
                r = measure(files, model, method, targs)
                reached = 6 * r["params"] * r["tokens_per_s"] / chip["flops"]  # floor time / step time
                rows.append(
                    f"| {model} | {method} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
                    f"{6 * r['params'] * args.batch * grid * grid / chip['flops'] * 1e3:.1f} | "
                    f"{r['s_per_step'] * 1e3:.1f} | {100 * reached:.1f}% |"
                )
    return rows


# ----------------------------------------------------------------------------- 3. sampling


def decode_bytes(model, rows: int) -> float:
    """Bytes one batch's decode reads at the floor: the weights once per step (embedding tables: one row
    per token, left out), and at step i the cache's filled prefix (keys and values of every layer, `rows`
    rows, i + 1 positions)."""
    c = model.config
    tables = {id(p) for m in (model.tok_embeddings, model.cls_embedding) for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)
    cache = model.layers[0].attention.kv_cache.k_cache
    per_position = 2 * c.n_layer * rows * c.n_head * c.head_dim * cache.element_size()
    steps = c.seq_len
    prefix = sum(c.cls_token_num + i for i in range(steps))
    return steps * weights + per_position * prefix


def sampling(args: argparse.Namespace, chip: dict, budget: Budget) -> list[str]:
    device = pick_device(args.device)
    k, grid, classes = shape_of(args.model)
    m, b = 512, args.batch
    kw = dict(grid_size=grid, num_classes=classes)
    labels = torch.arange(b, device=device) % classes
    base = build(args.model, device, vocab_size=k, **kw)
    coarse_model = build(args.model, device, vocab_size=m, **kw)
    refiner = build(args.refiner, device, input_vocab_size=m, vocab_size=k, causal=False, **kw)
    for model in (base, coarse_model, refiner):  # the weights `Pipeline.load` samples with on this device
        cast_weights(model, sampling_dtype(device))
    order = torch.randperm(k, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for compile in [False, True] if args.compile else [False]:
        mode = "compiled" if compile else "eager"
        runs = {
            "baseline": (base, stage1(base, labels, args.cfg, compile=compile)),
            "iar": (base, stage1(base, labels, args.cfg, compile=compile, draw_order=order)),
            "ctf": (coarse_model, stage1(coarse_model, labels, args.cfg, compile=compile)),
        }
        for name, (model, fn) in runs.items():
            if not budget.allows(f"sampling {name} {mode}"):
                continue
            t = timed(fn, device, args.repeats, warmup=2)
            floor = decode_bytes(model, 2 * b) / chip["bandwidth"]
            if name == "ctf":
                coarse = fn()
                t2 = timed(stage2(refiner, coarse, labels, compile), device, args.repeats, warmup=2)
                t += t2
                floor += 2 * param_breakdown(refiner)["total"] * b * grid * grid / chip["flops"]
            rows.append(
                f"| {name} | {mode} | {b / t:.1f} | {t * 1e3:.1f} | {floor * 1e3:.1f} | {100 * floor / t:.1f}% |"
            )
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- the run


def defaults(args: argparse.Namespace) -> None:
    """LlamaGen's sizes on a GPU; tiny ones with --reduced (what the test suite runs, in seconds)."""
    if args.reduced:
        args.model, args.refiner, args.train_models = "cpu-xs", "cpu-xs", ["cpu-xs"]
        args.batch, args.warmup, args.steps, args.log_every, args.repeats = 2, 2, 2, 1, 1
    else:
        args.model, args.refiner, args.train_models = "GPT-B", "GPT-L", ["GPT-B", "GPT-L"]
        args.batch, args.warmup, args.steps, args.log_every, args.repeats = 64, 10, 20, 10, 3


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--reduced", action="store_true", help="tiny sizes on any device; nothing written")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time compiled steps (default: on CUDA)")  # fmt: skip
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--minutes", type=float, default=7.5, help="budget guard: no new measurement after it")
    args = p.parse_args(argv)
    defaults(args)
    device = pick_device(args.device)
    args.device = str(device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    budget, t0 = Budget(args.minutes), time.monotonic()
    chip = ceilings(device, args.reduced)
    print(f"ceilings: copy {chip['bandwidth'] / 1e9:.0f} GB/s, matmul {chip['flops'] / 1e12:.1f} TFLOP/s")
    train_rows = training(args, chip, budget)
    sample_rows = sampling(args, chip, budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    body = (
        f"{name}. Ceilings measured first: copy bandwidth {chip['bandwidth'] / 1e9:,.0f} GB/s (read + written), "
        f"dense {'bf16' if device.type == 'cuda' else 'float32'} matmul {chip['flops'] / 1e12:,.1f} TFLOP/s. "
        f"Total {(time.monotonic() - t0) / 60:.1f} min"
        + (f"; skipped by the budget guard: {', '.join(budget.skipped)}" if budget.skipped else "")
        + ".\n\n**Training** (random tokens, batch "
        f"{args.batch}, {'torch.compile, ' if args.compile else ''}bf16 autocast on CUDA): floor = 6 x params x "
        "tokens per step over the measured matmul rate.\n\n"
        "| model | method | params | tokens/s | floor ms/step | ms/step | of the floor |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
        + "\n".join(train_rows)
        + f"\n\n**Sampling** ({args.model}, K={shape_of(args.model)[0]}; CTF: M=512 stage 1 + {args.refiner} "
        f"refiner; batch {args.batch}, CFG {args.cfg}, tokens only): floor = weights once per decode step + "
        "the filled KV-cache prefix, over the measured bandwidth (CTF: + the refiner's FLOPs over the matmul "
        "rate).\n\n| method | decode step | images/s | ms/batch | floor ms/batch | of the floor |\n"
        "|---|---|---:|---:|---:|---:|\n" + "\n".join(sample_rows)
    )
    print(body)
    if not args.reduced:
        write_section(
            "gpu", f"One GPU, every figure beside its floor: {name}", "python benchmarks/bench_gpu.py", body
        )
    return body


if __name__ == "__main__":
    main()

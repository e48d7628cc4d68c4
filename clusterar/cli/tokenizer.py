"""`clusterar tokenizer train` and `clusterar tokenizer eval`: a VQ tokenizer and how well it reconstructs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from .flags import add_compute_flags, add_config_flags, add_flag, add_input, config_from_args


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from ..train.tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = config_from_args(TokenizerTrainConfig, args)
    ev = train_tokenizer(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(ev, indent=2))
    print(
        f"tokenizer written to {Path(args.out) / 'tokenizer.safetensors'}; reconstructions in {Path(args.out) / 'recon.png'}"
    )


def cmd_tokenizer_eval(args: argparse.Namespace) -> None:
    from ..data import load_dataset
    from ..fileio import write_json
    from ..runtime import pick_device
    from ..tokenizer import load_tokenizer
    from ..train.tokenizer import evaluate_tokenizer, reconstruction_grid

    device = pick_device(args.device)
    model = load_tokenizer(args.tokenizer, device)
    dataset = load_dataset(args.data, args.split, args.image_size, on_error=args.on_error)
    ev = evaluate_tokenizer(model, dataset, device, batch_size=args.batch_size, progress=not args.no_progress)
    ev.update(
        tokenizer=str(args.tokenizer), data=args.data, split=args.split, fingerprint=model.fingerprint()
    )
    out = Path(args.out)
    write_json(out / "eval.json", ev)
    reconstruction_grid(model, dataset, out / "recon.png", device)
    print(
        f"val PSNR {ev['psnr']:.2f} dB (min {ev['psnr_min']:.2f}) over {ev['images']} images; codebook usage "
        f"{100 * ev['usage']:.1f}% ({ev['codes_used']} of {model.config.codebook_size} codes)"
    )
    print(f"written: {out / 'eval.json'}, {out / 'recon.png'}")


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    group = sub.add_parser("tokenizer", help="train or evaluate a VQ tokenizer")
    if not full("tokenizer"):
        return
    from ..data import DATASET_HELP
    from ..train.tokenizer import TokenizerTrainConfig

    actions = group.add_subparsers(dest="tokcmd", required=True, metavar="ACTION")
    tr = actions.add_parser(
        "train",
        help="train a VQ tokenizer",
        description="Train a LlamaGen-architecture VQ tokenizer. " + DATASET_HELP,
    )
    tr.set_defaults(func=cmd_tokenizer_train)
    add_compute_flags(tr, seed=True)
    add_flag(tr, "out", "runs/tokenizer", "run folder (checkpoint, tokenizer.safetensors, log, pictures)")
    add_flag(tr, "resume")
    add_config_flags(tr, TokenizerTrainConfig, skip=("device", "seed"))

    ev = actions.add_parser("eval", help="PSNR, codebook usage and a reconstruction grid on a dataset split")
    ev.set_defaults(func=cmd_tokenizer_eval)
    add_compute_flags(ev)
    add_input(
        ev, "tokenizer", help="tokenizer.safetensors, its run folder, or a LlamaGen .pt (e.g. vq_ds16_c2i.pt)"
    )
    add_flag(ev, "data", "mnist")
    add_flag(ev, "split", "val")
    add_flag(ev, "image_size", 32)
    add_flag(ev, "batch_size", 256)
    add_flag(ev, "out", "runs/tokenizer-eval")
    add_flag(ev, "on_error", "fail")

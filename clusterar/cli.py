"""The `clusterar` command. Each subcommand is a thin layer over a library function.

Errors in the user's input (ClusterarError) are printed as one clear message with exit status 2, never a
traceback; Ctrl-C says how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from .errors import ClusterarError


def _add_dataclass_args(
    p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), help: dict | None = None
) -> None:
    """One --flag per dataclass field, typed and defaulted from the dataclass."""
    help = help or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=default, help=help.get(f.name, f"default: {default}"))


def _dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _setup_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------- commands


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .tokenizer_train import TokenizerTrainConfig, train_tokenizer

    cfg = _dataclass_from_args(TokenizerTrainConfig, args)
    ev = train_tokenizer(cfg, args.out, resume=args.resume)
    print(json.dumps(ev, indent=2))
    print(
        f"tokenizer written to {Path(args.out) / 'tokenizer.safetensors'}; reconstructions in {Path(args.out) / 'recon.png'}"
    )


def cmd_tokenizer_eval(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .fileio import write_json
    from .runtime import pick_device
    from .tokenizer import load_tokenizer
    from .tokenizer_train import evaluate_tokenizer, reconstruction_grid

    device = pick_device(args.device)
    model = load_tokenizer(args.tokenizer, device)
    dataset = load_dataset(args.data, args.split, args.image_size, on_error=args.on_error)
    ev = evaluate_tokenizer(model, dataset, device, batch_size=args.batch_size, progress=True)
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


def cmd_encode(args: argparse.Namespace) -> None:
    from .runtime import pick_device
    from .tokenizer import load_tokenizer
    from .tokens import encode_dataset

    model = load_tokenizer(args.tokenizer, pick_device(args.device))
    for split in args.splits:
        tf = encode_dataset(
            model,
            args.data,
            split,
            Path(args.out) / f"{split}.safetensors",
            image_size=args.image_size,
            views=args.views,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            on_error=args.on_error,
        )
        print(f"{tf.path}: codes {list(tf.codes.shape)} {tf.codes.dtype}, {len(tf.meta['skipped'])} skipped")


def cmd_info(args: argparse.Namespace) -> None:
    from .fileio import read_meta

    meta = read_meta(args.file)
    for key in ("class_names",):
        if isinstance(meta.get(key), list) and len(meta[key]) > 12:
            meta[key] = meta[key][:12] + [f"... ({len(meta[key])} in all)"]
    print(json.dumps(meta, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    report = run_demo(out, quick=args.quick, device=args.device)
    print(f"report: {report}")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASET_HELP
    from .tokenizer import PRESETS
    from .tokenizer_train import TokenizerTrainConfig

    parser = argparse.ArgumentParser(
        prog="clusterar",
        description="Cluster-aware autoregressive image generation: LlamaGen baseline, IAR and CTF on one stack.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)"
        )

    demo = sub.add_parser("demo", help="run the whole pipeline on bundled MNIST and write a report")
    demo.add_argument(
        "--out",
        default=None,
        help="run folder (default runs/demo, or runs/demo-quick); finished stages are reused",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a much smaller budget (a minute or two), for a smoke test"
    )
    demo.add_argument("--device", default="auto")
    common(demo)
    demo.set_defaults(func=cmd_demo)

    tok = sub.add_parser("tokenizer", help="train or evaluate a VQ tokenizer")
    tsub = tok.add_subparsers(dest="tokcmd", required=True, metavar="ACTION")
    tr = tsub.add_parser(
        "train",
        help="train a VQ tokenizer",
        description="Train a LlamaGen-architecture VQ tokenizer. " + DATASET_HELP,
    )
    tr.add_argument(
        "--out",
        default="runs/tokenizer",
        help="run folder (checkpoint, tokenizer.safetensors, log, pictures)",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    _add_dataclass_args(
        tr,
        TokenizerTrainConfig,
        help={
            "data": "dataset: mnist, digits or folder:PATH (default: mnist)",
            "preset": f"architecture preset: {', '.join(PRESETS)} (default: cpu-32)",
            "codebook_size": "override the preset's codebook size",
            "restart_every": "dead-code restart window in steps, 0 = off (default: 100)",
            "device": "auto, cpu or cuda[:N] (default: auto)",
            "on_error": "unreadable images: fail (default) or skip",
        },
    )
    common(tr)
    tr.set_defaults(func=cmd_tokenizer_train)

    ev = tsub.add_parser("eval", help="PSNR, codebook usage and a reconstruction grid on a dataset split")
    ev.add_argument(
        "tokenizer", help="tokenizer.safetensors, its run folder, or a LlamaGen .pt (e.g. vq_ds16_c2i.pt)"
    )
    ev.add_argument("--data", default="mnist", help="mnist, digits or folder:PATH")
    ev.add_argument("--split", default="val")
    ev.add_argument("--image-size", type=int, default=32)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--out", default="runs/tokenizer-eval")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    common(ev)
    ev.set_defaults(func=cmd_tokenizer_eval)

    enc = sub.add_parser(
        "encode",
        help="encode dataset splits into token files (one file per split)",
        description="Encode images into one memory-mappable token file per split. " + DATASET_HELP,
    )
    enc.add_argument(
        "--tokenizer", required=True, help="tokenizer.safetensors, its run folder, or a LlamaGen .pt"
    )
    enc.add_argument("--data", default="mnist")
    enc.add_argument("--splits", nargs="+", default=["train", "val"])
    enc.add_argument("--out", default="runs/tokens", help="folder; writes SPLIT.safetensors for each split")
    enc.add_argument("--image-size", type=int, default=32)
    enc.add_argument(
        "--views",
        default="flip",
        choices=["none", "flip", "ten-crop"],
        help="views per image (default: flip)",
    )
    enc.add_argument("--batch-size", type=int, default=128)
    enc.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for folder datasets")
    enc.add_argument("--device", default="auto")
    enc.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="unreadable images: fail or skip and list them",
    )
    common(enc)
    enc.set_defaults(func=cmd_encode)

    info = sub.add_parser(
        "info", help="print the metadata of a clusterar file (tokenizer, token file, checkpoint)"
    )
    info.add_argument("file")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _setup_threads(args)
    try:
        args.func(args)
    except ClusterarError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep only our message
            msg = msg.rsplit("ClusterarError: ", 1)[-1].strip()
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted; finished checkpoints are kept: run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

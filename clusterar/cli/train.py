"""`clusterar train`: the transformer of one method on a token file (resumable; DDP/FSDP under torchrun)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .flags import add_compute_flags, add_config_flags, add_flag, config_from_args


def cmd_train(args: argparse.Namespace) -> None:
    import os

    from ..train import TrainConfig, train

    cfg = config_from_args(TrainConfig, args)
    summary = train(cfg, args.out, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps(summary, indent=2))
        print(f"model written to {summary['model_file']}; log and curves in {args.out}")


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser(
        "train",
        help="train a transformer of one method (baseline, IAR, or a CTF stage) on a token file",
        description="Train the LlamaGen transformer of one method on a token file. Runs are resumable "
        "(--resume continues bit for bit). Multi-GPU / multi-node: torchrun --nproc_per_node N -m "
        "clusterar train ... (DDP; --fsdp to shard a model that does not fit one GPU); under torchrun each "
        "process uses GPU LOCAL_RANK.",
    )
    p.set_defaults(func=cmd_train)
    if not full("train"):
        return
    from ..train import TrainConfig

    add_compute_flags(p, seed=True)
    add_flag(p, "out", "runs/train", "run folder (model.safetensors, checkpoint, log)")
    add_flag(p, "resume")
    add_flag(p, "tokens", help="train token file (clusterar encode)", required=True)
    add_flag(p, "tokenizer", help="the tokenizer that encoded --tokens", required=True)
    add_config_flags(p, TrainConfig, skip=("tokens", "tokenizer", "device", "seed"))
    add_flag(p, "stop_at")

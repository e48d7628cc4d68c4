"""`clusterar encode`: dataset splits into token files, one per split (resumable, shardable under torchrun)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .flags import add_compute_flags, add_flag


def cmd_encode(args: argparse.Namespace) -> None:
    from ..stages import encode_splits
    from ..train.parallel import close_distributed, init_distributed

    dist, device = init_distributed(args.device)  # under torchrun: one shard of every split per process
    finished = False
    try:
        encode_splits(
            args.tokenizer,
            args.data,
            {split: args.views for split in args.splits},
            args.out,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            on_error=args.on_error,
            save_every=args.save_every,
            device=str(device),
            progress=not args.no_progress,
            rank=dist.rank,
            world=dist.world,
        )
        finished = True
    finally:
        if dist.owns_group:
            close_distributed(finished)


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser("encode", help="encode dataset splits into token files (one file per split)")
    p.set_defaults(func=cmd_encode)
    if not full("encode"):
        return
    from ..data import DATASET_HELP

    p.description = "Encode images into one memory-mappable token file per split. " + DATASET_HELP
    add_compute_flags(p)
    add_flag(p, "tokenizer", required=True)
    add_flag(p, "data", "mnist")
    add_flag(p, "splits", ["train", "val"], nargs="+")
    add_flag(p, "out", "runs/tokens", "folder; writes SPLIT.safetensors for each split")
    add_flag(p, "image_size", 32)
    add_flag(p, "views", "auto")
    add_flag(p, "batch_size", 128)
    add_flag(p, "num_workers", 0)
    add_flag(p, "save_every", 30.0, said="30; 0: after every batch", metavar="SECONDS")
    add_flag(p, "on_error", "fail")

"""`clusterar convert`: a trained baseline as the starting point of IAR or CTF (or a baseline fine-tune)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .flags import add_compute_flags, add_flag, add_input


def cmd_convert(args: argparse.Namespace) -> None:
    from ..convert import convert
    from ..runtime import pick_device

    paths = convert(
        args.model,
        args.method,
        args.out,
        tokenizer=args.tokenizer,
        clusters=args.clusters,
        head=args.head,
        tokens=args.tokens,
        lsq_sequences=args.lsq_sequences,
        grid_size=args.grid_size,
        ema=args.ema,
        device=pick_device(args.device),
        seed=args.seed,
    )
    for stage, path in paths.items():
        print(f"{stage}: {path}")
    if args.method == "ctf":
        print(
            f"sample it as it is with `clusterar sample {paths['pipeline']}`; fine-tune each stage with `clusterar "
            f"train --method ctf-coarse --init-from {paths['coarse'].parent}` and `--method ctf-refiner --init-from "
            f"{paths['refiner'].parent}` (same --tokens, --tokenizer and --clusters)"
        )
    else:
        print(
            f"sample it as it is with `clusterar sample {args.out}`; fine-tune it with `clusterar train --method "
            f"{args.method} --init-from {args.out}` (same tokenizer{'' if args.method == 'baseline' else ' and clusters'})"
        )


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser(
        "convert",
        help="turn a trained baseline (LlamaGen c2i .pt or a clusterar run) into an IAR or CTF starting point",
        description="Write the starting point of --method from a baseline, for `clusterar train --init-from`. "
        "iar: the embedding and head rows permuted into the rearranged id space (exactly the same "
        "distribution, and the same samples under the same seed); ctf: stage 1 with cluster-mean tables "
        "(--head mean, or lsq: fitted to the original's mass per cluster on --tokens) and the refiner from "
        "the body with bidirectional attention and the original head; baseline: the weights in "
        "clusterar's format, for a baseline fine-tune. Model, tokenizer and clusters are checked to belong "
        "together first.",
    )
    p.set_defaults(func=cmd_convert)
    if not full("convert"):
        return
    from ..convert import CONVERT_METHODS

    add_compute_flags(p, seed=True, progress=False, device="cpu")
    add_input(p, "model", help="baseline run folder / model.safetensors, or a LlamaGen c2i checkpoint .pt")
    add_flag(p, "method", help="what to convert to", required=True, choices=CONVERT_METHODS)
    add_flag(p, "out", help="output folder (must not exist or be empty)", required=True)
    add_flag(p, "tokenizer", help="the model's tokenizer (required for .pt; default: the one recorded)")
    add_flag(p, "clusters", help="clusters of the tokenizer's codebook (iar: balanced; ctf: k-means)")
    add_flag(p, "head", "mean")
    add_flag(p, "tokens", help="train token file that --head lsq fits on")
    add_flag(p, "lsq_sequences", 512)
    add_flag(p, "grid_size", said="16, its 256 px models")
    add_flag(p, "ema")

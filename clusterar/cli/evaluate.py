"""`clusterar evaluate`: FID, Inception Score, precision/recall of samples against a reference."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import ClusterarError
from .flags import WRITES_FILE, add_compute_flags, add_flag, add_input


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ..fileio import write_json
    from ..metrics import evaluate_images, format_table

    if args.inception and args.extractor:
        raise ClusterarError("pass either --inception PATH or --extractor, not both")
    extractor = f"inception:{args.inception}" if args.inception else args.extractor
    metrics = evaluate_images(
        args.samples,
        reference=args.ref,
        extractor=extractor,
        k=args.k,
        batch_size=args.batch_size,
        device=args.device,
        cache=args.cache_dir,
        progress=not args.no_progress,
        image_size=args.image_size,
    )
    print(format_table(metrics))
    if args.out:
        write_json(args.out, metrics)
        print(f"written: {args.out}")


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="FID, Inception Score, precision/recall of samples against a reference",
        description=(
            "FID, Inception Score and precision/recall (k-NN manifolds) of SAMPLES (an .npz with arr_0 uint8 "
            "[N, H, W, 3], as ADM, or a folder of images) against --ref. Without downloaded weights, the "
            "features come from a small classifier trained once on the train split of the reference's "
            "dataset (mnist, digits, or a labelled image folder: --ref PATH/val where PATH/train holds one "
            "sub-folder per class) and cached; its held-out accuracy is printed with the scores, and the "
            "class accuracy of conditional samples (labels from the npz's arr_1). For FIDs on the published "
            "scale pass the standard FID Inception weights with --inception (needs the optional "
            "torch-fidelity: pip install 'clusterar[inception]'). ADM reference batches (.npz with mu/sigma "
            "and arr_0) are used as ADM does. Report the reference and the sample count with the numbers."
        ),
    )
    p.set_defaults(func=cmd_evaluate)
    if not full("evaluate"):
        return
    add_compute_flags(p)
    add_input(p, "samples", help="samples: .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images")
    add_flag(p, "ref", "mnist:val")
    add_flag(p, "inception", metavar="PATH")
    add_flag(p, "extractor", said="classifier, unless --inception is given")
    add_flag(p, "k", 3)
    add_flag(p, "batch_size", 256)
    add_flag(
        p,
        "image_size",
        help="resize + centre-crop folder images to this size (needed when their sizes differ)",
    )
    add_flag(
        p,
        "cache_dir",
        help="classifier and reference-statistics cache",
        said="$CLUSTERAR_CACHE or ~/.cache/clusterar",
    )
    add_flag(p, "out", help="also write the metrics as JSON to this file", path=WRITES_FILE)

"""`clusterar cluster fit|inspect|export|rearrange`: a tokenizer's codebook in clusters, and what to do with them.

`clusterar cluster --tokenizer T --method M --clusters N --out F` (no action) is short for `clusterar
cluster fit ...` (documented, and tested): the fit flags are on both parsers, from `_add_fit_flags`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..errors import ClusterarError
from .flags import WRITES_ANY, WRITES_FILE, add_compute_flags, add_flag, add_input, positive_int

# What each method is for, beside its name in help; the names themselves come from CLUSTER_METHODS.
METHOD_NOTES = {
    "kmeans": "CTF",
    "balanced": "IAR: K/M codes each",
    "hierarchical": "average linkage, MASC; for CTF",
    "random": "the papers' ablation",
}


def cmd_cluster_fit(args: argparse.Namespace) -> None:
    from ..clusters.inspect import describe_clusters
    from ..stages import fit_clusters

    missing = [f for f in ("tokenizer", "clusters", "out") if getattr(args, f) is None]
    if args.method is None and args.from_iar is None:
        missing.append("method (or --from-iar)")
    if missing:
        raise ClusterarError(
            f"clusterar cluster needs --{', --'.join(missing)}, e.g. `clusterar cluster fit --tokenizer T "
            "--method balanced --clusters 512 --out clusters.safetensors`; the actions are fit, inspect, "
            "export and rearrange (see `clusterar cluster -h`)"
        )
    clusters, record = fit_clusters(
        args.tokenizer,
        args.method,
        args.clusters,
        seed=args.seed,
        restarts=args.restarts,
        from_iar=args.from_iar,
        device=args.device,
    )
    clusters.save(args.out)
    print(describe_clusters(clusters, record["seconds"], record["info"]))
    print(f"written: {args.out}")


def cmd_cluster_inspect(args: argparse.Namespace) -> None:
    from ..clusters import CodebookClusters
    from ..clusters.inspect import format_table, inspect_clusters
    from ..runtime import pick_device
    from ..tokenizer import load_tokenizer

    clusters = CodebookClusters.load(args.clusters)
    tokenizer = load_tokenizer(args.tokenizer, pick_device(args.device))
    out = Path(args.out or Path(args.clusters).with_name(Path(args.clusters).stem + "-inspect"))
    info = {"clusters_file": str(args.clusters), "tokenizer": str(args.tokenizer)}
    figures = inspect_clusters(
        clusters, tokenizer, args.data, args.image_size, out, args.n, args.seed, args.split, info=info
    )
    print(format_table(figures))
    print(f"written: {out / 'swap.png'}, {out / 'clusters.png'}, {out / 'inspect.json'}")


def cmd_cluster_export(args: argparse.Namespace) -> None:
    from ..clusters import CodebookClusters
    from ..clusters.rearrange import export_iar_mapping

    export_iar_mapping(CodebookClusters.load(args.clusters), args.out)
    print(f"written: {args.out} (IAR's format: 1-D int64 [K], new_id = mapping[old_id])")


def cmd_cluster_rearrange(args: argparse.Namespace) -> None:
    from ..clusters import CodebookClusters
    from ..clusters.rearrange import rearrange_token_files, rearrange_tokenizer_file
    from ..tokenizer import load_tokenizer

    if args.out is None and not args.tokens:
        raise ClusterarError(
            "clusterar cluster rearrange needs --out (the rearranged tokenizer) and/or --tokens FILE... "
            "--out-dir DIR (the remapped token files)"
        )
    if bool(args.tokens) != (args.out_dir is not None):
        raise ClusterarError(
            "--tokens and --out-dir go together: the remapped copies are written to --out-dir"
        )
    clusters = CodebookClusters.load(args.clusters)
    if args.out is not None:
        print(f"written: {rearrange_tokenizer_file(args.tokenizer, clusters, args.out)}")
    if args.tokens:
        files = rearrange_token_files(args.tokens, clusters, args.out_dir, load_tokenizer(args.tokenizer))
        for tf in files:
            print(f"written: {tf.path} (codes {list(tf.codes.shape)} {tf.codes.dtype})")


def _methods() -> str:
    from ..clusters import CLUSTER_METHODS

    named = [f"{m} ({METHOD_NOTES[m]})" if m in METHOD_NOTES else m for m in CLUSTER_METHODS]
    return ", ".join(named[:-1]) + " or " + named[-1]


def _add_fit_flags(p: argparse.ArgumentParser, required: bool) -> None:
    """The flags of `clusterar cluster fit`, required there; optional on `clusterar cluster` (its short
    form), where cmd_cluster_fit names what is missing."""
    from ..clusters import CLUSTER_METHODS

    add_compute_flags(p, seed=True)
    add_flag(p, "tokenizer", required=required)
    how = p.add_mutually_exclusive_group(required=required)
    add_flag(how, "method", help=_methods(), choices=CLUSTER_METHODS)
    add_flag(how, "from_iar", metavar="MAPPING_PT")
    add_flag(
        p,
        "clusters",
        help="number of clusters M (with --from-iar: K / block size)",
        type=positive_int,
        required=required,
        path=None,
    )
    add_flag(p, "out", help="clusters file to write (.safetensors)", required=required, path=WRITES_FILE)
    add_flag(p, "restarts", said="kmeans 3, balanced 1")


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    group = sub.add_parser(
        "cluster",
        help="cluster a tokenizer's codebook (fit), then inspect, export or rearrange the clusters",
        description="Cluster a tokenizer's codebook and work with the result. `clusterar cluster --tokenizer "
        "T --method M --clusters N --out F` is short for `clusterar cluster fit ...` (its options are "
        "listed below; options of the other actions go after the action's name).",
    )
    group.set_defaults(func=cmd_cluster_fit)
    if not full("cluster"):
        return
    _add_fit_flags(group, required=False)
    actions = group.add_subparsers(dest="clustercmd", metavar="ACTION")
    fit = actions.add_parser(
        "fit",
        help="fit clusters (or import IAR's permutation) and write a clusters file",
        description=f"Cluster the L2-normalised codebook rows of a tokenizer: {_methods()}; or import "
        "IAR's published permutation with --from-iar. Writes a clusters file (safetensors).",
    )
    fit.set_defaults(func=cmd_cluster_fit)
    _add_fit_flags(fit, required=True)

    ins = actions.add_parser(
        "inspect",
        help="swap experiment (same- vs other-cluster tokens), size histogram, PCA picture",
        description="Replace every token of real images by a random token of the same cluster, or of another "
        "cluster, decode, and report PSNR/MSE to the originals (CTF Fig. 1b, IAR Fig. 2). Writes swap.png, "
        "clusters.png and inspect.json. --seed seeds the random swaps.",
    )
    ins.set_defaults(func=cmd_cluster_inspect)
    add_compute_flags(ins, seed=True)
    add_input(ins, "clusters", help="clusters file written by `clusterar cluster fit`")
    add_flag(ins, "tokenizer", help="the tokenizer whose codebook was clustered", required=True)
    add_flag(ins, "data", "mnist")
    add_flag(ins, "split", "val")
    add_flag(ins, "n", 500, "images, evenly spaced through the split")
    add_flag(ins, "image_size", 32)
    add_flag(ins, "out", help="folder", said="beside the clusters file, NAME-inspect")

    exp = actions.add_parser(
        "export",
        help="write IAR's permutation file (mapping.pt) of balanced clusters",
        description="Write the id permutation in IAR's format: a 1-D int64 tensor [K] saved with "
        "torch.save, new_id = mapping[old_id]; equal-size clusters only.",
    )
    exp.set_defaults(func=cmd_cluster_export)
    add_input(exp, "clusters", help="clusters file")
    add_flag(exp, "out", help="file to write, e.g. mapping.pt", required=True, path=WRITES_FILE)

    rea = actions.add_parser(
        "rearrange",
        help="write a rearranged tokenizer and/or remapped token files (IAR's layout on disk)",
        description="Apply the clusters' id permutation to files: the tokenizer's codebook rows and/or "
        "token files. Not needed for training (the trainer remaps ids on the fly); for IAR's layout on "
        "disk. Remapped tokens decode to the same images with the rearranged tokenizer.",
    )
    rea.set_defaults(func=cmd_cluster_rearrange)
    add_flag(rea, "threads", said="its choice")
    add_input(rea, "clusters", help="clusters file")
    add_flag(rea, "tokenizer", help="the ORIGINAL tokenizer the clusters were fitted on", required=True)
    add_flag(rea, "out", help="rearranged tokenizer: a .safetensors file or a folder", path=WRITES_ANY)
    add_flag(rea, "tokens", help="token files to remap", nargs="+", metavar="FILE")
    add_flag(rea, "out_dir", help="folder for the remapped token files (same names)")

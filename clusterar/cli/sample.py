"""`clusterar sample` (images from a model or a CTF pipeline) and `clusterar pipeline ctf` (CTF's two stages
tied to their tokenizer and clusters)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..errors import ClusterarError
from .flags import WRITES_FILE, add_compute_flags, add_config_flags, add_flag, add_input


def parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ClusterarError(
            f"--labels takes comma-separated class ids such as 1,2,3, got {text!r}"
        ) from None


def cmd_sample(args: argparse.Namespace) -> None:
    from ..train.parallel import close_distributed, init_distributed

    dist, device = init_distributed(args.device)  # under torchrun: every process draws its share of batches
    finished = False
    try:
        summary = _sample(args, str(device), dist.rank, dist.world)
        finished = True
    finally:
        if dist.owns_group:
            close_distributed(finished)
    if dist.rank != 0:
        return
    files = f"{Path(args.out) / 'grid.png'}, {Path(args.out) / 'samples.npz'}"
    if summary.get("already_complete"):
        print(f"unchanged: {files}")
        return
    rate = summary.get("images_per_s_after_first_batch") or summary.get("images_per_s")
    print(f"written: {files} ({rate} images/s)")


def _sample(args: argparse.Namespace, device: str, rank: int, world: int) -> dict:
    from dataclasses import fields

    from ..sample import SampleSettings
    from ..stages import sample_model

    return sample_model(
        args.source,
        args.out,
        n=args.n,
        seed=args.seed,
        per_class=args.per_class,
        labels=parse_labels(args.labels),
        settings={f.name: getattr(args, f.name) for f in fields(SampleSettings)},
        batch_size=args.batch_size,
        compile=args.compile,
        write_images=not args.no_images,
        device=device,
        tokenizer=args.tokenizer,
        clusters=args.clusters,
        restrict_to_cluster=True if args.restrict_to_cluster else None,
        grid_size=args.grid_size,
        announce=True,
        progress=not args.no_progress,
        rank=rank,
        world=world,
    )


def cmd_pipeline_ctf(args: argparse.Namespace) -> None:
    from ..sample import write_ctf_pipeline

    d = write_ctf_pipeline(
        args.coarse,
        args.refiner,
        args.out,
        tokenizer=args.tokenizer,
        clusters=args.clusters,
        restrict_to_cluster=args.restrict_to_cluster,
    )
    print(json.dumps(d, indent=2))
    print(f"written: {args.out}; sample with `clusterar sample {args.out} --out DIR`")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SampleSettings field, unset by default: the method's defaults then apply (said from
    SampleSettings itself)."""
    from dataclasses import fields

    from ..sample import STAGE2_SETTINGS, SampleSettings

    plain, ctf = SampleSettings.for_method("baseline"), SampleSettings.for_method("ctf")
    said = {}
    for f in fields(SampleSettings):
        a, b = getattr(plain, f.name), getattr(ctf, f.name)
        if f.name in STAGE2_SETTINGS:
            said[f.name] = f"{b}; ctf only"
        else:
            said[f.name] = f"{a}" + (f", ctf {b}" if a != b else "")
    add_config_flags(p, SampleSettings, unset=True, said=said)


def add_sample_parser(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images from a trained model (baseline, iar) or a CTF pipeline",
        description="Sample class-conditional images: SOURCE is a run folder or model.safetensors (baseline, "
        "iar), a pipeline JSON (ctf, see `clusterar pipeline ctf`) or a LlamaGen c2i_*.pt (with --tokenizer). "
        "Writes OUT/grid.png, OUT/images/NNNNNN.png, OUT/samples.npz (ADM format: arr_0 uint8 N x H x W x 3, "
        "arr_1 labels) and OUT/sample.json. Rerunning an interrupted command continues where it stopped. "
        "Unset sampling flags take the method's defaults (CTF: the paper's). --seed seeds the labels and "
        "every batch.",
    )
    p.set_defaults(func=cmd_sample)
    if not full("sample"):
        return
    add_compute_flags(p, seed=True)
    add_input(p, "source", help="run folder, model.safetensors, pipeline.json or LlamaGen .pt")
    add_flag(p, "out", required=True)
    add_flag(
        p,
        "n",
        100,
        "number of images; under torchrun write --num-samples (torchrun reads --n as its own, ambiguous, "
        "option)",
        names=("--num-samples", "--n"),
    )
    labels = p.add_mutually_exclusive_group()
    add_flag(labels, "per_class")
    add_flag(labels, "labels")
    _add_sampling_flags(p)
    add_flag(
        p,
        "restrict_to_cluster",
        help="ctf: sample every fine token inside its coarse cluster (always on for a refiner trained so)",
    )
    add_flag(p, "batch_size", 64)
    add_flag(p, "compile", None, said="on CUDA, off on a CPU", action=argparse.BooleanOptionalAction)
    add_flag(p, "tokenizer", help="override the tokenizer path recorded in the model")
    add_flag(p, "clusters", help="override the clusters path recorded in the model")
    add_flag(p, "grid_size", help="LlamaGen .pt only: tokens per side", said="16")
    add_flag(p, "no_images")


def add_pipeline_parser(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser("pipeline", help="tie CTF's two stages to their tokenizer and clusters")
    if not full("pipeline"):
        return
    kinds = p.add_subparsers(dest="pipecmd", required=True, metavar="KIND")
    ctf = kinds.add_parser(
        "ctf",
        help="write pipeline.json for a ctf-coarse run and a ctf-refiner run",
        description="Check that both runs were trained with the same tokenizer and clusters (fingerprints) "
        "and write a JSON holding their paths, relative to the JSON's folder; `clusterar sample` takes it.",
    )
    ctf.set_defaults(func=cmd_pipeline_ctf)
    add_flag(ctf, "coarse", required=True)
    add_flag(ctf, "refiner", required=True)
    add_flag(ctf, "out", help="the pipeline JSON to write", required=True, path=WRITES_FILE)
    add_flag(ctf, "tokenizer", help="override the tokenizer path recorded in the runs")
    add_flag(ctf, "clusters", help="override the clusters path recorded in the runs")
    add_flag(ctf, "restrict_to_cluster", help="sample fine tokens inside their coarse cluster")

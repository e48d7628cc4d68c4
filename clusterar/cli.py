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

# ----------------------------------------------------------------------------- flags
#
# A flag means the same thing, with the same type, check and default, on every command that takes it:
# its parse function lives in FLAG_TYPES (by name), and the shared flags are declared once (`shared`).


def _number(kind: type, low: float, strict: bool, what: str):
    """A parse function for a number that must be >= low (> low if strict); argparse names the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {what}, got {text!r}") from None
        if (
            value != value
            or value in (float("inf"), float("-inf"))
            or value < low
            or (strict and value == low)
        ):
            raise argparse.ArgumentTypeError(f"takes {what}, got {text}")
        return value

    return parse


positive_int = _number(int, 0, True, "a whole number >= 1")
nonneg_int = _number(int, 0, False, "a whole number >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
nonneg_float = _number(float, 0.0, False, "a number >= 0")

FLAG_TYPES = {
    "batch_size": positive_int,
    "steps": positive_int,
    "epochs": positive_float,
    "grad_accum": positive_int,
    "log_every": positive_int,
    "ckpt_every": positive_int,
    "eval_every": positive_int,
    "stop_at": positive_int,
    "snapshot_every": positive_float,
    "snapshot_steps": positive_int,
    "lr": positive_float,
    "min_lr": nonneg_float,
    "warmup": nonneg_int,
    "weight_decay": nonneg_float,
    "grad_clip": nonneg_float,
    "restart_every": nonneg_int,
    "seed": nonneg_int,
    "threads": positive_int,
    "n": positive_int,
    "num_workers": nonneg_int,
    "image_size": positive_int,
    "codebook_size": positive_int,
    "restarts": positive_int,
    "k": positive_int,
    "grid_size": positive_int,
    "temperature": positive_float,
    "temperature2": positive_float,
    "top_k": nonneg_int,
    "top_p": positive_float,
    "top_k2": nonneg_int,
    "cfg_scale": nonneg_float,
    "cfg_scale2": nonneg_float,
}
FLAG_CHOICES = {"on_error": ("fail", "skip"), "schedule": ("constant", "cosine")}


class _Parser(argparse.ArgumentParser):
    """argparse with clusterar's error style: one line, exit status 2, and where to read more."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def shared(*names: str, device_default: str | None = "auto") -> list[argparse.ArgumentParser]:
    """The parents= list that gives a command the shared flags it can use, declared here once.

    Made anew for each command: argparse parents share their Action objects, so one command's
    set_defaults would change every other's.
    """
    p = argparse.ArgumentParser(add_help=False)
    if "device" in names:
        said = device_default or "the spec's device, auto unless it sets one"
        p.add_argument(
            "--device",
            default=device_default,
            help=f"auto (the first CUDA GPU, else CPU), cpu or cuda[:N] (default: {said})",
        )
    if "threads" in names:
        p.add_argument(
            "--threads", type=positive_int, default=None, help="CPU threads for PyTorch (default: its choice)"
        )
    if "progress" in names:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if "seed" in names:
        p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    return [p]


def field_help(cls) -> dict[str, str]:
    """{field: help} from the trailing comments of a config dataclass (`steps: int = 1000  # budget ...`):
    a flag's help is written once, beside its field."""
    import inspect
    import re

    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen build): flags without help
            continue
        helps.update(re.findall(r"^    (\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M))
    return helps


# What a flag that several commands take means, said once; each command gives its own default.
FLAG_HELP = {
    "data": "mnist, digits or folder:PATH",
    "split": "dataset split: train or val (folders: a sub-folder name)",
    "image_size": "image side in pixels (images are resized and centre-cropped to it)",
    "batch_size": "images per batch",
    "out": "output folder",
    "on_error": "unreadable images: fail, or skip and list them",
}


def add_flag(p: argparse.ArgumentParser, name: str, default, help: str | None = None, **kw) -> None:
    """One --flag with its check (FLAG_TYPES), choices (FLAG_CHOICES) and help (FLAG_HELP) by name, the
    same on every command, and the command's default said in the help."""
    text = (help if help is not None else FLAG_HELP[name]).replace("%", "%%")
    if default is not None and not isinstance(default, bool):
        text += f" (default: {default})"
    kw.setdefault("type", FLAG_TYPES.get(name, str))
    kw.setdefault("choices", FLAG_CHOICES.get(name))
    p.add_argument("--" + name.replace("_", "-"), default=default, help=text, **kw)


def _library_choices() -> dict[str, tuple[str, ...]]:
    """Choices that the library defines (presets, methods), for the config fields that name them."""
    from .gpt import GPT_PRESETS
    from .methods import TRAIN_METHODS
    from .tokenizer import VQ_PRESETS

    return {"preset": tuple(VQ_PRESETS), "model": tuple(GPT_PRESETS), "method": TRAIN_METHODS}


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a config dataclass: its type (X | None, bool as --x / --no-x, Literal as
    choices), its check (FLAG_TYPES), its default, and its help (the field's comment)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)  # real types, also under `from __future__ import annotations`
    helps = field_help(cls)
    library = _library_choices()
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # `int | None` parses an int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = helps.get(f.name, "").replace("%", "%%")
        text += " (required)" if required else f" (default: {'none' if f.default is None else f.default})"
        kw: dict = {"dest": f.name, "help": text}
        if required:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if kind is bool:  # help set afterwards: Python < 3.13 would append its own default
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, dest=f.name, default=f.default
            ).help = text
            continue
        if typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(kind)
        else:
            kw["choices"] = FLAG_CHOICES.get(f.name) or library.get(f.name)
        p.add_argument(flag, type=FLAG_TYPES.get(f.name, kind), **kw)


def _dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def _setup_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------- commands


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .train.tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = _dataclass_from_args(TokenizerTrainConfig, args)
    ev = train_tokenizer(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(ev, indent=2))
    print(
        f"tokenizer written to {Path(args.out) / 'tokenizer.safetensors'}; reconstructions in {Path(args.out) / 'recon.png'}"
    )


def cmd_tokenizer_eval(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .fileio import write_json
    from .runtime import pick_device
    from .tokenizer import load_tokenizer
    from .train.tokenizer import evaluate_tokenizer, reconstruction_grid

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


def cmd_encode(args: argparse.Namespace) -> None:
    from .stages import encode_splits
    from .train.parallel import close_distributed, init_distributed

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
    run_demo(out, quick=args.quick, device=args.device, progress=not args.no_progress)


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiment import load_spec, run_experiment

    spec = load_spec(args.spec)
    if args.device is not None:
        spec.device = args.device
    if args.check:
        print(f"{args.spec}: valid ({len(spec.runs)} runs, {len(spec.sweeps)} sweeps)")
        return
    run_experiment(spec, args.out, progress=not args.no_progress)


def _add_cluster_fit_args(p: argparse.ArgumentParser, required: bool) -> None:
    """The options of `clusterar cluster fit`; also on `clusterar cluster` itself (its short form)."""
    from .clusters import CLUSTER_METHODS

    p.add_argument(
        "--tokenizer", required=required, help="tokenizer.safetensors, its run folder, or a LlamaGen .pt"
    )
    how = p.add_mutually_exclusive_group(required=required)
    how.add_argument(
        "--method",
        choices=CLUSTER_METHODS,
        help="kmeans (CTF), balanced (IAR: K/M codes each), hierarchical (average linkage, MASC; for CTF) or "
        "random (ablation)",
    )
    how.add_argument(
        "--from-iar",
        metavar="MAPPING_PT",
        help="import IAR's permutation file (1-D int64 [K], new_id = mapping[old_id]) instead of fitting",
    )
    p.add_argument(
        "--clusters",
        type=positive_int,
        required=required,
        help="number of clusters M (with --from-iar: K / block size)",
    )
    p.add_argument("--out", required=required, help="clusters file to write (.safetensors)")
    p.add_argument(
        "--restarts",
        type=positive_int,
        default=None,
        help="k-means++ starts, best kept (default: kmeans 3, balanced 1)",
    )


def cmd_cluster_fit(args: argparse.Namespace) -> None:
    from .clusters.inspect import describe_clusters
    from .stages import fit_clusters

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


def cmd_cluster_export(args: argparse.Namespace) -> None:
    from .clusters import CodebookClusters
    from .clusters.rearrange import export_iar_mapping

    export_iar_mapping(CodebookClusters.load(args.clusters), args.out)
    print(f"written: {args.out} (IAR's format: 1-D int64 [K], new_id = mapping[old_id])")


def cmd_cluster_inspect(args: argparse.Namespace) -> None:
    from .clusters import CodebookClusters
    from .clusters.inspect import format_table, inspect_clusters
    from .runtime import pick_device
    from .tokenizer import load_tokenizer

    clusters = CodebookClusters.load(args.clusters)
    tokenizer = load_tokenizer(args.tokenizer, pick_device(args.device))
    out = Path(args.out or Path(args.clusters).with_name(Path(args.clusters).stem + "-inspect"))
    info = {"clusters_file": str(args.clusters), "tokenizer": str(args.tokenizer)}
    figures = inspect_clusters(
        clusters, tokenizer, args.data, args.image_size, out, args.n, args.seed, args.split, info=info
    )
    print(format_table(figures))
    print(f"written: {out / 'swap.png'}, {out / 'clusters.png'}, {out / 'inspect.json'}")


def cmd_cluster_rearrange(args: argparse.Namespace) -> None:
    from .clusters import CodebookClusters
    from .clusters.rearrange import rearrange_token_files, rearrange_tokenizer_file
    from .tokenizer import load_tokenizer

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


def cmd_train(args: argparse.Namespace) -> None:
    import os

    from .train import TrainConfig, train

    cfg = _dataclass_from_args(TrainConfig, args)
    summary = train(cfg, args.out, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps(summary, indent=2))
        print(f"model written to {summary['model_file']}; log and curves in {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .fileio import write_json
    from .metrics import evaluate_images, format_table

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


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """One flag per SampleSettings field; unset means the method's default (stated from SampleSettings)."""
    from .sample import STAGE2_MODES, STAGE2_SETTINGS, SampleSettings

    helps = field_help(SampleSettings)
    plain, ctf = SampleSettings.for_method("baseline"), SampleSettings.for_method("ctf")
    for name in SAMPLING_FLAGS:
        a, b = getattr(plain, name), getattr(ctf, name)
        said = (
            f"ctf only; default {b}"
            if name in STAGE2_SETTINGS
            else f"default {a}" + (f", ctf {b}" if a != b else "")
        )
        text = f"{helps[name]} ({said})" if name in helps else said
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=FLAG_TYPES.get(name, str),
            choices=STAGE2_MODES if name == "stage2" else None,
            default=None,
            help=text.replace("%", "%%"),
        )


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ClusterarError(
            f"--labels takes comma-separated class ids such as 1,2,3, got {text!r}"
        ) from None


def cmd_sample(args: argparse.Namespace) -> None:
    from .train.parallel import close_distributed, init_distributed

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
    from .stages import sample_model

    return sample_model(
        args.source,
        args.out,
        n=args.n,
        seed=args.seed,
        per_class=args.per_class,
        labels=_parse_labels(args.labels),
        settings={k: getattr(args, k) for k in SAMPLING_FLAGS},
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


SAMPLING_FLAGS = (
    "cfg_scale",
    "temperature",
    "top_k",
    "top_p",
    "temperature2",
    "top_k2",
    "cfg_scale2",
    "stage2",
)


def cmd_pipeline_ctf(args: argparse.Namespace) -> None:
    from .sample import write_ctf_pipeline

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


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert
    from .runtime import pick_device

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


def cmd_serve(args: argparse.Namespace) -> None:
    from .runtime import pick_device
    from .serve import serve

    serve(args.sources, host=args.host, port=args.port, device=pick_device(args.device))


# ----------------------------------------------------------------------------- parser


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The whole parser ("*"), or one whose COMMAND alone has all its flags: the flags that come from the
    configuration dataclasses import torch (seconds), which `clusterar --help` and the other commands'
    parsing need not wait for. None: only the list of commands."""

    def full(name: str) -> bool:
        return command in ("*", name)

    parser = _Parser(
        prog="clusterar",
        description="Cluster-aware autoregressive image generation: LlamaGen baseline, IAR and CTF on one stack.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compute = ("device", "threads", "progress")  # every command that computes takes these

    demo = sub.add_parser(
        "demo",
        parents=shared(*compute, device_default=None),
        help="the whole pipeline on bundled MNIST: tokenizer, clusters, baseline / IAR / CTF, samples, report",
        description="Runs the experiment spec clusterar/specs/demo.toml (about 15 minutes on 2 CPU cores) and "
        "writes runs/demo/report.md. Finished stages are reused when it is run again.",
    )
    demo.add_argument(
        "--out",
        default=None,
        help="run folder (default runs/demo, or runs/demo-quick); finished stages are reused",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="the minute-sized spec (tiny models on the digits set, specs/quick.toml): a smoke test",
    )
    demo.set_defaults(func=cmd_demo)

    exp = sub.add_parser(
        "experiment",
        parents=shared(*compute, device_default=None),
        help="train, sample and evaluate the runs of a spec file under identical conditions; write a report",
        description="SPEC is a TOML file, or the name of a shipped one (demo, quick). Every stage is reused "
        "when its result exists with the same settings; the report goes to OUT/report.md.",
    )
    exp.add_argument("spec", help="spec file (TOML) or shipped spec name")
    exp.add_argument("--out", default=None, help="experiment folder (default runs/NAME)")
    exp.add_argument("--check", action="store_true", help="only validate the spec")
    exp.set_defaults(func=cmd_experiment)

    tok = sub.add_parser("tokenizer", help="train or evaluate a VQ tokenizer")
    tsub = tok.add_subparsers(dest="tokcmd", required=True, metavar="ACTION")
    tr = tsub.add_parser(
        "train",
        parents=shared(*compute, "seed"),
        help="train a VQ tokenizer",
    )
    tr.add_argument(
        "--out",
        default="runs/tokenizer",
        help="run folder (checkpoint, tokenizer.safetensors, log, pictures)",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    if full("tokenizer"):
        from .data import DATASET_HELP
        from .train.tokenizer import TokenizerTrainConfig

        tr.description = "Train a LlamaGen-architecture VQ tokenizer. " + DATASET_HELP
        _add_dataclass_args(
            tr,
            TokenizerTrainConfig,
            skip=("device", "seed"),
        )
    tr.set_defaults(func=cmd_tokenizer_train)

    ev = tsub.add_parser(
        "eval",
        parents=shared(*compute),
        help="PSNR, codebook usage and a reconstruction grid on a dataset split",
    )
    ev.add_argument(
        "tokenizer", help="tokenizer.safetensors, its run folder, or a LlamaGen .pt (e.g. vq_ds16_c2i.pt)"
    )
    ev.add_argument("--data", default="mnist", help="mnist, digits or folder:PATH (default: mnist)")
    add_flag(ev, "split", "val")
    add_flag(ev, "image_size", 32)
    add_flag(ev, "batch_size", 256)
    add_flag(ev, "out", "runs/tokenizer-eval")
    add_flag(ev, "on_error", "fail")
    ev.set_defaults(func=cmd_tokenizer_eval)

    enc = sub.add_parser(
        "encode",
        parents=shared(*compute),
        help="encode dataset splits into token files (one file per split)",
    )
    if full("encode"):
        from .data import DATASET_HELP

        enc.description = "Encode images into one memory-mappable token file per split. " + DATASET_HELP
    enc.add_argument(
        "--tokenizer", required=True, help="tokenizer.safetensors, its run folder, or a LlamaGen .pt"
    )
    add_flag(enc, "data", "mnist")
    enc.add_argument("--splits", nargs="+", default=["train", "val"], help="default: train val")
    enc.add_argument("--out", default="runs/tokens", help="folder; writes SPLIT.safetensors for each split")
    add_flag(enc, "image_size", 32)
    enc.add_argument(
        "--views",
        default="auto",
        choices=["auto", "none", "flip", "ten-crop"],
        help="views per image; auto (default): flip for image folders, none for the bundled digits "
        "(mirrored digits are not digits)",
    )
    add_flag(enc, "batch_size", 128)
    enc.add_argument(
        "--num-workers",
        type=nonneg_int,
        default=0,
        help="DataLoader workers for folder datasets (default: 0)",
    )
    enc.add_argument(
        "--save-every",
        type=nonneg_float,
        default=30.0,
        metavar="SECONDS",
        help="save progress (SPLIT.safetensors.partial.*) this often; a rerun continues from it (default: 30; "
        "0: after every batch)",
    )
    enc.add_argument(
        "--on-error",
        default="fail",
        choices=FLAG_CHOICES["on_error"],
        help="unreadable images: fail or skip and list them (default: fail)",
    )
    enc.set_defaults(func=cmd_encode)

    clu = sub.add_parser(
        "cluster",
        parents=shared(*compute, "seed"),
        help="cluster a tokenizer's codebook (k-means, balanced k-means), inspect, export, rearrange",
        description="Cluster a tokenizer's codebook and work with the result. `clusterar cluster --tokenizer "
        "T --method M --clusters N --out F` is short for `clusterar cluster fit ...` (its options are "
        "listed below; options of the other actions go after the action's name).",
    )
    if full("cluster"):
        _add_cluster_fit_args(clu, required=False)
    clu.set_defaults(func=cmd_cluster_fit)
    csub = clu.add_subparsers(dest="clustercmd", metavar="ACTION")
    cfit = csub.add_parser(
        "fit",
        parents=shared(*compute, "seed"),
        help="fit clusters (or import IAR's permutation) and write a clusters file",
        description="Cluster the L2-normalised codebook rows of a tokenizer: kmeans (CTF), balanced "
        "k-means (IAR, exactly K/M codes per cluster) or random (the papers' ablation); or import IAR's "
        "published permutation with --from-iar. Writes a clusters file (safetensors).",
    )
    if full("cluster"):
        _add_cluster_fit_args(cfit, required=True)
    cfit.set_defaults(func=cmd_cluster_fit)
    cins = csub.add_parser(
        "inspect",
        parents=shared(*compute, "seed"),
        help="swap experiment (same- vs other-cluster tokens), size histogram, PCA picture",
        description="Replace every token of real images by a random token of the same cluster, or of another "
        "cluster, decode, and report PSNR/MSE to the originals (CTF Fig. 1b, IAR Fig. 2). Writes swap.png, "
        "clusters.png and inspect.json. --seed seeds the random swaps.",
    )
    cins.add_argument("clusters", help="clusters file written by `clusterar cluster fit`")
    cins.add_argument("--tokenizer", required=True, help="the tokenizer whose codebook was clustered")
    cins.add_argument("--data", default="mnist", help="mnist, digits or folder:PATH (default: mnist)")
    add_flag(cins, "split", "val")
    cins.add_argument(
        "--n", type=positive_int, default=500, help="images, evenly spaced through the split (default: 500)"
    )
    add_flag(cins, "image_size", 32)
    cins.add_argument("--out", default=None, help="folder (default: beside the clusters file, NAME-inspect)")
    cins.set_defaults(func=cmd_cluster_inspect)
    cexp = csub.add_parser(
        "export",
        help="write IAR's permutation file (mapping.pt) of balanced clusters",
        description="Write the id permutation in IAR's format: a 1-D int64 tensor [K] saved with "
        "torch.save, new_id = mapping[old_id]; equal-size clusters only.",
    )
    cexp.add_argument("clusters", help="clusters file")
    cexp.add_argument("--out", required=True, help="file to write, e.g. mapping.pt")
    cexp.set_defaults(func=cmd_cluster_export)
    crea = csub.add_parser(
        "rearrange",
        parents=shared("threads"),
        help="write a rearranged tokenizer and/or remapped token files (IAR's layout on disk)",
        description="Apply the clusters' id permutation to files: the tokenizer's codebook rows and/or "
        "token files. Not needed for training (the trainer remaps ids on the fly); for IAR's layout on "
        "disk. Remapped tokens decode to the same images with the rearranged tokenizer.",
    )
    crea.add_argument("clusters", help="clusters file")
    crea.add_argument("--tokenizer", required=True, help="the ORIGINAL tokenizer the clusters were fitted on")
    crea.add_argument("--out", default=None, help="rearranged tokenizer: a .safetensors file or a folder")
    crea.add_argument("--tokens", nargs="+", default=None, metavar="FILE", help="token files to remap")
    crea.add_argument("--out-dir", default=None, help="folder for the remapped token files (same names)")
    crea.set_defaults(func=cmd_cluster_rearrange)

    trn = sub.add_parser(
        "train",
        parents=shared(*compute, "seed"),
        help="train a transformer: baseline, iar, ctf-coarse (CTF stage 1) or ctf-refiner (CTF stage 2)",
        description="Train the LlamaGen transformer of one method on a token file. Runs are resumable "
        "(--resume continues bit for bit). Multi-GPU / multi-node: torchrun --nproc_per_node N -m "
        "clusterar train ... (DDP; --fsdp to shard a model that does not fit one GPU); under torchrun each "
        "process uses GPU LOCAL_RANK.",
    )
    trn.add_argument("--out", default="runs/train", help="run folder (model.safetensors, checkpoint, log)")
    trn.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    trn.add_argument("--tokens", required=True, help="train token file (clusterar encode)")
    trn.add_argument("--tokenizer", required=True, help="the tokenizer that encoded --tokens")
    if full("train"):
        from .train import TrainConfig

        _add_dataclass_args(
            trn,
            TrainConfig,
            skip=("tokens", "tokenizer", "device", "seed"),
        )
    trn.add_argument(
        "--stop-at",
        type=positive_int,
        default=None,
        help="end this session after step N with a checkpoint (time-sliced jobs); continue with --resume",
    )
    trn.set_defaults(func=cmd_train)

    evl = sub.add_parser(
        "evaluate",
        parents=shared(*compute),
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
    evl.add_argument("samples", help="samples: .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images")
    evl.add_argument(
        "--ref",
        default="mnist:val",
        help="reference: mnist:val, mnist:train, digits:val, ..., an .npz (e.g. VIRTUAL_imagenet256_labeled.npz) "
        "or a folder of images (default: mnist:val)",
    )
    evl.add_argument(
        "--inception",
        default=None,
        metavar="PATH",
        help="Inception-v3 FID weights file pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)",
    )
    evl.add_argument(
        "--extractor",
        default=None,
        help="classifier (of the --ref dataset), classifier:mnist, classifier:digits or classifier:folder:PATH "
        "(default: classifier, unless --inception is given)",
    )
    evl.add_argument(
        "--k", type=positive_int, default=3, help="neighbourhood size for precision/recall (default: 3)"
    )
    add_flag(evl, "batch_size", 256)
    evl.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resize + centre-crop folder images to this size (needed when their sizes differ)",
    )
    evl.add_argument(
        "--cache-dir",
        default=None,
        help="classifier and reference-statistics cache (default: $CLUSTERAR_CACHE or ~/.cache/clusterar)",
    )
    evl.add_argument("--out", default=None, help="also write the metrics as JSON to this file")
    evl.set_defaults(func=cmd_evaluate)

    smp = sub.add_parser(
        "sample",
        parents=shared(*compute, "seed"),
        help="sample images from a trained model (baseline, iar) or a CTF pipeline",
        description="Sample class-conditional images: SOURCE is a run folder or model.safetensors (baseline, "
        "iar), a pipeline JSON (ctf, see `clusterar pipeline ctf`) or a LlamaGen c2i_*.pt (with --tokenizer). "
        "Writes OUT/grid.png, OUT/images/NNNNNN.png, OUT/samples.npz (ADM format: arr_0 uint8 N x H x W x 3, "
        "arr_1 labels) and OUT/sample.json. Rerunning an interrupted command continues where it stopped. "
        "Unset sampling flags take the method's defaults (CTF: the paper's). --seed seeds the labels and "
        "every batch.",
    )
    smp.add_argument("source", help="run folder, model.safetensors, pipeline.json or LlamaGen .pt")
    smp.add_argument("--out", required=True, help="output folder")
    smp.add_argument(
        "--num-samples",
        "--n",
        dest="n",
        type=positive_int,
        default=100,
        help="number of images (default: 100); under torchrun write --num-samples (torchrun reads --n as its "
        "own, ambiguous, option)",
    )
    lab = smp.add_mutually_exclusive_group()
    lab.add_argument(
        "--per-class",
        action="store_true",
        help="class-balanced labels, n/num_classes per class (the first n %% num_classes classes get one "
        "more); default: labels uniform at random",
    )
    lab.add_argument("--labels", default=None, help="comma-separated class ids, repeated to --n")
    if full("sample"):
        _add_sampling_args(smp)
    smp.add_argument(
        "--restrict-to-cluster",
        action="store_true",
        help="ctf: sample every fine token inside its coarse cluster (always on for a refiner trained so)",
    )
    add_flag(smp, "batch_size", 64)
    smp.add_argument(
        "--compile", action="store_true", help='torch.compile the decode step (mode "reduce-overhead", GPU)'
    )
    smp.add_argument("--tokenizer", default=None, help="override the tokenizer path recorded in the model")
    smp.add_argument("--clusters", default=None, help="override the clusters path recorded in the model")
    smp.add_argument(
        "--grid-size", type=positive_int, default=None, help="LlamaGen .pt only: tokens per side (16)"
    )
    smp.add_argument("--no-images", action="store_true", help="skip the per-image PNGs (grid and npz only)")
    smp.set_defaults(func=cmd_sample)

    cnv = sub.add_parser(
        "convert",
        parents=shared("device", "threads", "seed", device_default="cpu"),
        help="turn a trained baseline (LlamaGen c2i .pt or a clusterar run) into an IAR or CTF starting point",
        description="Write the starting point of --method from a baseline, for `clusterar train --init-from`. "
        "iar: the embedding and head rows permuted into the rearranged id space (exactly the same "
        "distribution, and the same samples under the same seed); ctf: stage 1 with cluster-mean tables "
        "(--head mean, or lsq: fitted to the original's mass per cluster on --tokens) and the refiner from "
        "the body with bidirectional attention and the original head; baseline: the weights in "
        "clusterar's format, for a baseline fine-tune. Model, tokenizer and clusters are checked to belong "
        "together first.",
    )
    cnv.add_argument(
        "model", help="baseline run folder / model.safetensors, or a LlamaGen c2i checkpoint .pt"
    )
    cnv.add_argument("--method", required=True, choices=("iar", "ctf", "baseline"), help="what to convert to")
    cnv.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    cnv.add_argument(
        "--tokenizer",
        default=None,
        help="the model's tokenizer (required for .pt; default: the one recorded)",
    )
    cnv.add_argument(
        "--clusters", default=None, help="clusters of the tokenizer's codebook (iar: balanced; ctf: k-means)"
    )
    cnv.add_argument(
        "--head",
        default="mean",
        choices=("mean", "lsq"),
        help="CTF stage-1 head initialisation (default: mean)",
    )
    cnv.add_argument("--tokens", default=None, help="train token file that --head lsq fits on")
    add_flag(cnv, "lsq_sequences", 512, "token sequences --head lsq fits on", type=positive_int)
    add_flag(
        cnv,
        "grid_size",
        None,
        "token grid side of a LlamaGen .pt (default: 16, its 256 px models)",
        type=positive_int,
    )
    cnv.add_argument(
        "--ema", action="store_true", help="a LlamaGen training checkpoint: convert its EMA weights"
    )
    cnv.set_defaults(func=cmd_convert)

    srv = sub.add_parser(
        "serve",
        parents=shared("device", "threads", device_default="auto"),
        help="a local web page to sample from models side by side",
        description="Serve a page (offline: nothing from the internet) where you pick models, a class, CFG, "
        "temperatures, top-k/top-p, CTF's stage 2 and a seed, and see a grid of samples per model (CTF: with "
        "its map of coarse labels). Sampling requests run one at a time; the page stays responsive.",
    )
    srv.add_argument("sources", nargs="+", help="run folders, model files or CTF pipeline JSONs")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    add_flag(srv, "port", 8000, "port to listen on; 0 picks a free one", type=nonneg_int)
    srv.set_defaults(func=cmd_serve)

    pip = sub.add_parser("pipeline", help="tie CTF's two stages to their tokenizer and clusters")
    psub = pip.add_subparsers(dest="pipecmd", required=True, metavar="KIND")
    pctf = psub.add_parser(
        "ctf",
        help="write pipeline.json for a ctf-coarse run and a ctf-refiner run",
        description="Check that both runs were trained with the same tokenizer and clusters (fingerprints) "
        "and write a JSON holding their paths, relative to the JSON's folder; `clusterar sample` takes it.",
    )
    pctf.add_argument("--coarse", required=True, help="CTF stage-1 run folder or model file (ctf-coarse)")
    pctf.add_argument("--refiner", required=True, help="CTF stage-2 run folder or model file (ctf-refiner)")
    pctf.add_argument("--out", required=True, help="the pipeline JSON to write")
    pctf.add_argument("--tokenizer", default=None, help="override the tokenizer path recorded in the runs")
    pctf.add_argument("--clusters", default=None, help="override the clusters path recorded in the runs")
    pctf.add_argument(
        "--restrict-to-cluster", action="store_true", help="sample fine tokens inside their coarse cluster"
    )
    pctf.set_defaults(func=cmd_pipeline_ctf)

    info = sub.add_parser(
        "info", help="print the metadata of a clusterar file (tokenizer, token file, checkpoint)"
    )
    info.add_argument("file")
    info.set_defaults(func=cmd_info)
    return parser


# Where each command writes: checked before any work, so that a read-only or misplaced --out is said at
# once and not after an hour of training.
OUTPUT_FLAGS = ("out", "out_dir", "cache_dir")


def _check_outputs(args: argparse.Namespace) -> None:
    from .fileio import check_writable

    for name in OUTPUT_FLAGS:
        value = getattr(args, name, None)
        if value:
            check_writable(value, "--" + name.replace("_", "-"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _setup_threads(args)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        _check_outputs(args)
        with logging_redirect_tqdm():  # warnings on their own line, never after a progress bar's \r
            args.func(args)
    except ClusterarError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep only our message
            msg = msg.rsplit("ClusterarError: ", 1)[-1].strip()
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        # A write that failed mid-way (disk full, a folder turned read-only): say which file, not where.
        from .fileio import WRITE_ERRNOS

        if e.errno not in WRITE_ERRNOS:
            raise
        print(
            f"error: cannot write {e.filename or 'an output file'} ({e.strerror}); free some space or "
            "choose another --out",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        again = "again" if args.command in ("demo", "experiment", "sample", "encode") else "with --resume"
        print(
            f"\ninterrupted; finished checkpoints are kept: run the same command {again} to continue",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

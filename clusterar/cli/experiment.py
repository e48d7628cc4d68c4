"""`clusterar demo` and `clusterar experiment`: a spec file's runs under identical conditions, reported."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path

from .flags import add_compute_flags, add_flag, add_input


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    run_demo(out, quick=args.quick, device=args.device, progress=not args.no_progress)


def cmd_experiment(args: argparse.Namespace) -> None:
    from ..errors import ClusterarError
    from ..experiment import load_spec, plan_experiment, run_experiment

    if (args.spec is None) == (args.data is None):
        raise ClusterarError(
            "give a SPEC (a spec file or shipped name) or --data folder:PATH (an experiment sized for your "
            "folder), one of the two"
        )
    if args.data is not None:
        plan = (args.data, args.minutes, args.out, args.device, args.inception)
        source, spec = plan_experiment(*plan, write=not args.check)
    elif args.minutes is not None or args.inception is not None:
        raise ClusterarError("--minutes and --inception go with --data; a spec file sets its own budget")
    else:
        source, spec = args.spec, load_spec(args.spec)
    if args.device is not None:
        spec.device = args.device
    if args.epochs is not None:
        own = [r.name for r in spec.runs for t in (r.train, r.refiner) if {"epochs", "steps"} & set(t)]
        if spec.train.get("steps") or own:
            where = (
                f"runs {', '.join(sorted(set(own)))} set their own budget" if own else "it budgets in steps"
            )
            raise ClusterarError(
                f"--epochs sets every run's epochs, but in {source} {where}; edit the spec instead"
            )
        spec.train["epochs"] = args.epochs  # a constant-schedule run trains on from its checkpoint
    if args.check:
        print(f"{source}: valid ({len(spec.runs)} runs, {len(spec.sweeps)} sweeps)")
        return
    out = args.out or f"runs/{spec.name}"
    command = f"clusterar experiment {shlex.quote(str(source))} --out {shlex.quote(str(out))}"
    command += f" --device {args.device}" if args.device is not None else ""
    run_experiment(spec, out, progress=not args.no_progress, command=command)


def shipped_specs() -> list[str]:
    """The names of the specs in clusterar/specs/, read from the folder (no library import: help stays fast)."""
    return sorted(p.stem for p in (Path(__file__).parents[1] / "specs").glob("*.toml"))


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole pipeline on bundled MNIST: tokenizer, clusters, baseline / IAR / CTF, samples, report",
        description="Runs the experiment spec clusterar/specs/demo.toml (8.5 to 11 minutes on 2 CPU cores, by "
        "how busy they are) and writes runs/demo/report.md. Finished stages are reused when it is run again.",
    )
    demo.set_defaults(func=cmd_demo)
    if full("demo"):
        add_compute_flags(demo, device=None)
        add_flag(
            demo, "out", help="run folder; finished stages are reused", said="runs/demo, or runs/demo-quick"
        )
        add_flag(demo, "quick")

    exp = sub.add_parser(
        "experiment",
        help="train, sample and evaluate the runs of a spec file under identical conditions; write a report",
        description=f"SPEC is a TOML file, or the name of a shipped one ({', '.join(shipped_specs())}). Every "
        "stage is reused when its result exists with the same settings; the report goes to OUT/report.md.",
    )
    exp.set_defaults(func=cmd_experiment)
    if full("experiment"):
        add_compute_flags(exp, device=None)
        add_input(exp, "spec", help="spec file (TOML) or shipped spec name", nargs="?")
        add_flag(
            exp,
            "data",
            help="folder:PATH (train/ and val/ of class folders) instead of a SPEC: baseline, IAR and CTF on "
            "the demo's footing, sized to --minutes by timing this device; the plan goes to OUT/spec.toml",
        )
        add_flag(exp, "minutes", None, said="30, with --data")
        add_flag(exp, "inception", help="with --data: Inception-v3 FID weights for the metrics")
        add_flag(exp, "epochs", help="train every run to this many epochs (constant schedule: trains on)")
        add_flag(exp, "out", help="experiment folder", said="runs/NAME")
        add_flag(exp, "check")

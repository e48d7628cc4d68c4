"""The demo's budget against what its samples show: wall time vs class accuracy vs FID, per setting.

    python benchmarks/bench_demo.py [--variants NAME,NAME...] [--out runs/bench-demo] [--no-write]
    python benchmarks/bench_demo.py --seeds 1,2,3,4     # the spread of single demo runs
    python benchmarks/bench_demo.py --plan              # the folder planner's prediction against the demo

With `--plan`, the probes of `clusterar experiment --data` (clusterar/experiment/plan.py) are timed on the
demo's MNIST digits and their prediction for the demo's spec is set stage by stage beside the wall time of
the shipped demo's run in OUT/demo (run it first), in the section "plan" of RESULTS.md.

With `--seeds`, the shipped demo is run once more per listed seed, each from an empty folder of its own
(`OUT/seed-S`: its tokenizer, clusters and models all drawn with that seed), beside the seed-0 run in
`OUT/demo`; the section "demo-spread" of RESULTS.md gets one row per seed and the min..max range per
method, the range a newcomer's single run should land in. Every run is an experiment folder, so a killed
invocation resumes where it stopped.

The shipped `demo` spec runs first, from an empty folder, exactly as `clusterar demo` does (its wall time
is the demo's). Every other variant is the demo spec with a few settings changed, run as an experiment
of its own on the demo's tokenizer (so the variants differ only in what follows the tokenizer; a variant
of the tokenizer trains its own); its estimated demo time is the demo's tokenizer time plus the
variant's own wall time. Each variant reports
the final models' FID and class accuracy per method (500 class-balanced samples against the 500 MNIST val
images, MNIST-classifier features), so that the demo's settings can be chosen by measurement.

Every variant is one run of one seed, and the machine's other jobs slow all of them: compare minutes as
ratios measured in one invocation, and treat FID differences of a couple of points as noise (see the
seed spread measured by `clusterar experiment claims`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_section  # noqa: E402
from clusterar.experiment import SPECS_DIR, parse_spec, run_experiment, tomllib  # noqa: E402

# name -> (what changes, overrides as "table.key" -> value on the shipped demo spec)
VARIANTS: dict[str, tuple[str, dict]] = {
    "demo": ("the shipped `demo` spec", {}),
    "cpu-s-4": (
        "an earlier demo: transformer cpu-s, 4 epochs",
        {"train.model": "cpu-s", "train.epochs": 4},
    ),
    "epochs+2": ("two epochs more", {"train.epochs": "+2"}),
    "every-epoch": ("evaluations after every epoch", {"eval.every_epochs": 1}),
    "tokenizer-400": ("tokenizer trained 400 steps (its own)", {"tokenizer.steps": 400}),
    "previous": (
        "the demo before 2026-12-05: tokenizer 300 steps (its own), evaluations after epochs 2, 4 and 6",
        {"tokenizer.steps": 300, "eval.every_epochs": 2},
    ),
    "batch-24": ("transformer batch 24 instead of 16 (fewer, larger steps)", {"train.batch_size": 24}),
}


def apply(spec: dict, overrides: dict) -> dict:
    d = copy.deepcopy(spec)
    for path, value in overrides.items():
        table, key = path.split(".")
        if isinstance(value, str) and value.startswith("+"):
            value = d[table][key] + int(value[1:])
        d[table][key] = value
    return d


def finals(out: Path) -> dict:
    """Final FID and class accuracy per run, and the wall time of the experiment's first invocation."""
    report = json.loads((out / "report.json").read_text())
    first = json.loads((out / "timings.jsonl").read_text().splitlines()[0])
    runs = {name: cs[-1] for name, cs in report["curves"].items()}
    return {
        "runs": {n: {"fid": c["fid"], "class_accuracy": c["class_accuracy"]} for n, c in runs.items()},
        "epochs": next(iter(runs.values()))["epoch"],
        "ceiling": report.get("ceiling", {}),
        "timings": first,
        "sweeps": {
            param: {n: [(c["value"], c["fid"], c["class_accuracy"]) for c in cs] for n, cs in per_run.items()}
            for param, per_run in report["sweeps"].items()
        },
    }


def render(results: dict, base: dict) -> str:
    """The RESULTS.md section: one row per variant, then the shipped demo's sweeps."""
    tok_s = results["demo"]["timings"].get("tokenizer", 0.0)
    ev = base["eval"]
    sampling = ", ".join(f"{k} {ev[k]}" for k in ("cfg_scale", "temperature") if k in ev) or "defaults"
    lines = [
        "| variant | change | epochs | demo minutes | "
        + " | ".join(f"{r} FID | {r} class acc" for r in results["demo"]["runs"])
        + " |",
        "|---|---|---:|---:|" + "---:|---:|" * len(results["demo"]["runs"]),
    ]
    for name, r in results.items():
        t = r["timings"]["total_this_invocation"] + (0.0 if r["own_tokenizer"] else tok_s)
        cells = " | ".join(f"{m['fid']:.2f} | {100 * m['class_accuracy']:.1f}%" for m in r["runs"].values())
        lines.append(f"| {name} | {r['what']} | {r['epochs']:g} | {t / 60:.1f} | {cells} |")
    ceiling = results["demo"]["ceiling"].get("tokenizer")
    body = (
        f"The demo spec (`clusterar/specs/demo.toml`: tokenizer cpu-32, transformer and budget as shipped, "
        f"sampling: {sampling}) and variants of it, one seed each. *demo minutes*: the shipped demo's wall time "
        "from an empty folder (the MNIST classifier already cached: its first training adds about 10 s); "
        f"for a variant on the demo's tokenizer, the demo's tokenizer time ({tok_s / 60:.1f} min) plus the "
        "variant's own wall time (token files, clusters, training, evaluations, speed, sweep, report). FID and class accuracy of the final models: 500 "
        "class-balanced samples against the 500 MNIST val images, MNIST-classifier features.\n\n"
        + "\n".join(lines)
    )
    if ceiling:
        body += (
            f"\n\nCeiling (the demo tokenizer's val reconstructions): FID {ceiling['fid']:.2f}, class accuracy "
            f"{100 * ceiling['class_accuracy']:.1f}%."
        )
    for param, per_run in results["demo"]["sweeps"].items():
        values = [v for v, _, _ in next(iter(per_run.values()))]
        body += f"\n\nSweep of {param}, the shipped demo's final models (FID / class accuracy):\n\n"
        body += "| run | " + " | ".join(f"{param} {v:g}" for v in values) + " |\n"
        body += "|---|" + "---:|" * len(values) + "\n"
        for run, pts in per_run.items():
            body += f"| {run} | " + " | ".join(f"{f:.2f} / {100 * a:.1f}%" for _, f, a in pts) + " |\n"
    return body


def spread(per_seed: dict[int, dict]) -> tuple[str, dict[str, dict[str, list[float]]]]:
    """The demo-spread section (one row per seed, then min..max per method) and the ranges themselves."""
    methods = list(next(iter(per_seed.values()))["runs"])
    lines = [
        "| seed | minutes | " + " | ".join(f"{m} class acc | {m} FID" for m in methods) + " | ceiling FID |",
        "|---:|---:|" + "---:|---:|" * len(methods) + "---:|",
    ]
    for seed, r in sorted(per_seed.items()):
        cells = " | ".join(
            f"{100 * r['runs'][m]['class_accuracy']:.1f}% | {r['runs'][m]['fid']:.2f}" for m in methods
        )
        ceiling = r["ceiling"].get("tokenizer", {}).get("fid", float("nan"))
        lines.append(
            f"| {seed} | {r['timings']['total_this_invocation'] / 60:.1f} | {cells} | {ceiling:.2f} |"
        )
    ranges = {
        m: {
            key: [
                min(r["runs"][m][key] for r in per_seed.values()),
                max(r["runs"][m][key] for r in per_seed.values()),
            ]
            for key in ("class_accuracy", "fid")
        }
        for m in methods
    }
    lines.append(
        "| **range** | | "
        + " | ".join(
            f"**{100 * ranges[m]['class_accuracy'][0]:.1f}-{100 * ranges[m]['class_accuracy'][1]:.1f}%** | "
            f"**{ranges[m]['fid'][0]:.2f}-{ranges[m]['fid'][1]:.2f}**"
            for m in methods
        )
        + " | |"
    )
    body = (
        f"The shipped demo spec run from an empty folder once per seed ({len(per_seed)} seeds: the tokenizer, "
        "clusters and models all drawn with that seed). Final models: 500 class-balanced samples against the "
        "500 MNIST val images, MNIST-classifier features. *minutes*: each run's wall time (the runs were not "
        "measured alone: read them as a rough figure, not a speed comparison). The range row is where a single "
        "run of the demo should land; `clusterar/specs/demo.toml` carries it as `[expected]` so the demo "
        "report can say whether a run is inside it.\n\n" + "\n".join(lines)
    )
    return body, ranges


def run_seeds(base: dict, seeds: list[int], out: Path) -> dict[int, dict]:
    """The shipped demo once per seed, each from its own folder (seed 0 is the `demo` run)."""
    per_seed = {}
    for seed in seeds:
        folder = out / ("demo" if seed == base["seed"] else f"seed-{seed}")
        d = copy.deepcopy(base) | {"name": "demo", "seed": seed}
        print(f"== demo, seed {seed}: {folder}", flush=True)
        run_experiment(parse_spec(d, f"bench-demo seed {seed}"), folder, progress=False)
        per_seed[seed] = finals(folder)
    return per_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names; demo always runs")
    p.add_argument("--seeds", help="comma-separated seeds: run the shipped demo once per seed (and seed 0)")
    p.add_argument(
        "--plan", action="store_true", help="the folder planner's prediction against the demo's run"
    )
    p.add_argument("--out", default="runs/bench-demo")
    p.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = p.parse_args()
    if args.seeds:
        return main_seeds(args)
    if args.plan:
        return main_plan(args)
    names = ["demo"] + [n for n in args.variants.split(",") if n and n != "demo"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    base = tomllib.loads((SPECS_DIR / "demo.toml").read_text())
    out = Path(args.out)
    results = {}
    for name in names:
        what, overrides = VARIANTS[name]
        d = apply(base, overrides)
        d["name"] = "demo" if name == "demo" else f"demo-{name}"
        own_tokenizer = name == "demo" or any(k.startswith("tokenizer.") for k in overrides)
        if not own_tokenizer:
            d["tokenizer"] = {"path": str(out / "demo" / "tokenizer")}
        print(f"== {name}: {what}", flush=True)
        tic = time.perf_counter()
        run_experiment(parse_spec(d, f"bench-demo {name}"), out / name, progress=False)
        results[name] = finals(out / name) | {
            "what": what,
            "wall": time.perf_counter() - tic,
            "own_tokenizer": own_tokenizer,
        }
    body = render(results, base)
    print(body)
    if not args.no_write:
        command = "python benchmarks/bench_demo.py" + (
            f" --variants {args.variants}" if args.variants != ",".join(VARIANTS) else ""
        )
        write_section("demo", "The demo's budget: wall time vs class accuracy vs FID", command, body)
    json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1, default=str)


def main_seeds(args: argparse.Namespace) -> None:
    """`--seeds`: the spread of single demo runs."""
    base = tomllib.loads((SPECS_DIR / "demo.toml").read_text())
    seeds = sorted({base["seed"]} | {int(x) for x in args.seeds.split(",") if x})
    body, ranges = spread(
        run_seeds(base, seeds, Path(args.out)),
    )
    print(body)
    print(json.dumps(ranges))
    if not args.no_write:
        write_section(
            "demo-spread",
            "The demo's spread: one run per seed",
            f"python benchmarks/bench_demo.py --seeds {args.seeds}",
            body,
        )


def main_plan(args: argparse.Namespace) -> None:
    """`--plan`: the planner's stage-by-stage prediction for the demo beside the demo's measured stages."""
    from clusterar.data import load_dataset
    from clusterar.experiment.plan import MARGIN, Folder, base_spec, measure, stages

    base = base_spec()
    demo = Path(args.out) / "demo"
    if not (demo / "timings.jsonl").exists():
        sys.exit(f"{demo} holds no demo run: run `python benchmarks/bench_demo.py --variants demo` first")
    actual = json.loads((demo / "timings.jsonl").read_text().splitlines()[0])
    train, val = (load_dataset("mnist", split) for split in ("train", "val"))
    mnist = Folder("mnist", len(train), len(val), len(train.class_names))
    evals = round(base["train"]["epochs"] / base["eval"]["every_epochs"])
    sweep = sum(len(s["values"]) for s in base.get("sweeps", [])) * base["eval"]["samples"]
    rows = [  # three probes in a row: their spread is the machine's noise
        stages(
            mnist,
            measure(mnist, base["device"], base),
            base,
            base["train"]["epochs"],
            1,
            base["eval"]["samples"],
            evals,
            sweep,
        )
        for _ in range(3)
    ]
    measured = {
        "tokenizer": actual["tokenizer"],
        "training": actual["training"],
        "sampling": actual["evaluation"] + actual["speed_and_sweeps"],
        "rest": actual["tokens"] + actual["clusters"] + actual["ceiling"],
    }
    lines = [
        "| stage | predicted (3 probes), s | demo's run, s | predicted / measured |",
        "|---|---:|---:|---:|",
    ]
    for stage, seconds in measured.items():
        got = [r[stage] for r in rows]
        lines.append(
            f"| {stage} | {min(got):.0f}-{max(got):.0f} | {seconds:.0f} | "
            f"{min(got) / seconds:.2f}-{max(got) / seconds:.2f}x |"
        )
    totals = [MARGIN * sum(r.values()) for r in rows]
    lines.append(
        f"| **total, with the margin {MARGIN}** | {min(totals):.0f}-{max(totals):.0f} | "
        f"{actual['total_this_invocation']:.0f} | {min(totals) / actual['total_this_invocation']:.2f}-"
        f"{max(totals) / actual['total_this_invocation']:.2f}x |"
    )
    body = (
        "What `clusterar experiment --data folder:PATH` predicts for a plan, checked on the one run whose stages "
        "are known: the probes (a tokenizer step on the data, a transformer step, a sampled image; "
        "clusterar/experiment/plan.py) timed three times on the demo's MNIST digits, their prediction for the "
        f"demo's spec beside the stages of the shipped demo's run in `{demo}` (timings.jsonl, its first "
        "invocation). The probes and the run were not measured at the same moment: read the ratios with the "
        "machine's noise in mind.\n\n" + "\n".join(lines)
    )
    print(body)
    if not args.no_write:
        write_section(
            "plan",
            "Planning a folder experiment: predicted against measured",
            "python benchmarks/bench_demo.py --plan",
            body,
        )


if __name__ == "__main__":
    main()

"""The experiment report: report.md and its pictures (curves, sweeps, sample grids).

Everything here renders the `report.json` dict that the runner assembles, whose numbers (the comparison
table, verdicts, claims, convergence) clusterar.compare makes; nothing is recomputed. `fmt` and `pct` are
the number formats of the report and of the runner's progress lines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..compare import MAX_FALSE_SEPARATION, MIN_SEEDS, false_separation, fmt_spread, values
from ..train import TrainConfig
from ..viz import image_grid, plot_image_panels, plot_series


def fmt(x: float | None, nd: int = 2) -> str:
    """`x` with `nd` decimals; '-' when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def plot_report(data: dict, out: Path) -> None:
    curves = data["curves"]

    def pts(cs: list[dict], key: str) -> list[tuple]:  # (x, mean, min, max): a band over seeds
        return [
            (c["epoch"], c[key], c.get(f"{key}_min", c[key]), c.get(f"{key}_max", c[key]))
            for c in cs
            if c.get(key) is not None
        ]

    seeds = data.get("seeds", [data["spec"]["seed"]])
    band = f" (mean and min..max over seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
    panels = {
        title: {n: pts(cs, key) for n, cs in curves.items()}
        for title, key in (
            ("FID (lower is better)", "fid"),
            ("Inception Score", "inception_score"),
            ("precision", "precision"),
            ("recall", "recall"),
            ("class accuracy of samples", "class_accuracy"),
            ("val token accuracy", "val_acc_token"),
            ("val cluster accuracy", "val_acc_cluster"),
        )
    }
    plot_series(
        panels, out / "curves.png", "epoch", title=f"{data['spec']['name']}: metrics against epochs{band}"
    )
    plot_samples(data, out)
    for param, per_run in data["sweeps"].items():
        numeric = all(isinstance(c["value"], int | float) for cs in per_run.values() for c in cs)
        if not numeric:
            continue
        sweep_panels = {
            title: {
                n: [
                    (c["value"], c[key], c.get(f"{key}_min", c[key]), c.get(f"{key}_max", c[key])) for c in cs
                ]
                for n, cs in per_run.items()
            }
            for title, key in (
                ("FID", "fid"),
                ("Inception Score", "inception_score"),
                ("precision", "precision"),
                ("recall", "recall"),
            )
        }
        plot_series(sweep_panels, out / f"sweep-{param}.png", param, title=f"sweep of {param} (final models)")


def plot_samples(data: dict, out: Path, per_class: int = 6) -> None:
    """samples.png: the first `per_class` samples of every class (one row each) of every run's final model,
    side by side, with its FID."""
    panels = {}
    for run, cs in data["curves"].items():
        final = cs[-1]
        with np.load(out / Path(final["grid"]).parent / "samples.npz") as f:
            images, labels = f["arr_0"], f["arr_1"]
        pick = [i for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:per_class]]
        grid = image_grid(torch.from_numpy(images[pick]).permute(0, 3, 1, 2), nrow=per_class)
        panels[_grid_title(run, final)] = grid
    plot_image_panels(panels, out / "samples.png")


def _grid_title(run: str, point: dict) -> str:
    """A sample grid's caption: its grid is the first seed's, so is its FID (not the mean over seeds)."""
    fid = values(point, "fid")
    seeds = point.get("seeds") or [None]
    where = f"seed {seeds[0]}, " if len(seeds) > 1 else ""
    return f"{run} ({where}epoch {point['epoch']:g}, FID {fmt(fid[0] if fid else None)})"


def _int(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def pct(x: float | None) -> str:
    """A share as a percentage with one decimal; '-' when missing."""
    return "-" if x is None else f"{100 * x:.1f}%"


def render_report(data: dict, out: Path) -> str:
    """report.md from report.json's dict; `out` is the experiment's folder (where the pictures are)."""
    lines = (
        _header(data) + _trust(data) + _setup(data) + _runs(data) + _comparison(data) + _verdict_lines(data)
    )
    lines += _fid_against_epochs(data) + _sweeps(data, out) + _samples(data) + _files()
    return "\n".join(lines)


def _seeds(data: dict) -> list[int]:
    return data.get("seeds", [data["spec"]["seed"]])


def _points(ev: dict) -> str:
    """When the runs were evaluated, in words."""
    if ev.get("every_steps"):
        return f"every {ev['every_steps']} steps"
    if ev["every_epochs"]:
        return f"every {ev['every_epochs']:g} epochs"
    return "of the final models"


def _header(data: dict) -> list[str]:
    t = data["timings"]
    return [
        f"# Experiment `{data['spec']['name']}`",
        "",
        f"Written by `clusterar experiment` on {data['date']} ({data['machine']}). Wall time: "
        f"{t['total_this_invocation'] / 60:.1f} min for this invocation, "
        f"{t['all_invocations'] / 60:.1f} min for all {t['invocations']} "
        "invocations on this folder (finished stages are reused; seconds per stage in `timings.jsonl`). The "
        "spec as run is in `spec.json`.",
        "",
    ]


DEFAULT_SCHEDULE = TrainConfig.schedule  # a spec's [train] without `schedule`

# Held-out accuracy of the feature classifier from which its features tell the classes apart well enough
# for FID and class accuracy to be read (below LOW_ACCURACY the metrics also warn).
GOOD_EXTRACTOR = 0.9


def extractor_accuracy(data: dict) -> float | None:
    """The feature classifier's held-out accuracy, as the evaluations recorded it (None: Inception)."""
    points = (c for cs in data["curves"].values() for c in cs)
    return next((c["extractor_val_accuracy"] for c in points if c.get("extractor_val_accuracy")), None)


def _trust(data: dict) -> list[str]:
    """The first screen: can this comparison be trusted, in plain words, and what to run next."""
    said = _doubts(data)
    answer, why = trust_headline(data, said)
    headline = f"**{answer}**: {why}" + (
        " What each means, and what to run next:" if any(doubt for _, doubt in said) else ""
    )
    lines = [f"- {text}" for text, _ in said] + _ceiling_said(data) + _expected_said(data)
    return ["## Can this comparison be trusted?", "", headline, "", *lines, ""]


def _doubts(data: dict) -> list[tuple[str, str | None]]:
    """(what the report says, the doubt it raises or None) for the seeds, the extractor and convergence."""
    return [_seeds_said(data), _extractor_said(data), _convergence_said(data)]


def trust_headline(data: dict, said: list[tuple[str, str | None]] | None = None) -> tuple[str, str]:
    """The answer and its reason in plain text (the report's first line, also printed at the end of
    `clusterar experiment`)."""
    doubts = [doubt for _, doubt in (said or _doubts(data)) if doubt]
    if doubts:
        return "Not yet", f"{'; '.join(doubts)}."
    judged = (
        ", and a baseline that has converged."
        if data.get("convergence")
        else " (no baseline run to judge convergence by)."
    )
    return "Yes, within the spread it states", (
        "enough seeds and a feature extractor that tells the classes apart" + judged
    )


def _seeds_said(data: dict) -> tuple[str, str | None]:
    n = len(_seeds(data))
    if n == 1:
        return (
            "**Seeds**: one per run. One run of each method is one draw: no difference below counts as "
            "resolved, however large (set `seeds = [0, 1, 2]` in the spec to judge them).",
            "one seed per run",
        )
    chance = f"{false_separation(n, n):.0%}"
    if n < MIN_SEEDS:
        return (
            f"**Seeds**: {n} per run. A separation of two runs is at most *suggestive*: runs that do not "
            f"differ separate by chance {chance} of the time ({MIN_SEEDS} seeds bring it to "
            f"{false_separation(MIN_SEEDS, MIN_SEEDS):.0%}).",
            f"{n} seeds per run",
        )
    return f"**Seeds**: {n} per run; every verdict states its chance of a false separation ({chance}).", None


def _extractor_said(data: dict) -> tuple[str, str | None]:
    spec = data["spec"]
    acc = extractor_accuracy(data)
    if acc is None:
        return f"**Feature extractor**: {_extractor_name(spec)}.", None
    sizes = data.get("data_sizes", {})
    per_class = f"about {sizes['train'] // max(1, sizes['classes'])}" if sizes else "its few"
    if acc >= GOOD_EXTRACTOR:
        return (
            f"**Feature extractor**: the classifier behind FID and class accuracy reads {pct(acc)} of held-out "
            "val images: its features tell the classes apart.",
            None,
        )
    return (
        f"**Feature extractor**: the classifier behind FID and class accuracy reads only {pct(acc)} of held-out "
        f"val images (it learned from {per_class} images per class), so FID and class accuracy say "
        f"little about the samples. It needs of the order of hundreds of train images per class to reach "
        f"{GOOD_EXTRACTOR:.0%} (the demo's MNIST classifier learns from 450 per class and reads 98.8%), or use "
        "Inception features (`inception = PATH` in [eval]; `--inception PATH` with `--data`).",
        f"the feature classifier reads only {pct(acc)} of held-out images",
    )


def _convergence_said(data: dict) -> tuple[str, str | None]:
    conv = data.get("convergence")
    if not conv:
        return "**Convergence**: no baseline run to judge it by.", None
    if conv["converged"]:
        return f"**Convergence**: the baseline `{conv['run']}` has converged (see Verdicts).", None
    return (
        f"**Convergence**: the baseline `{conv['run']}` **has not converged**: these are models still learning, "
        f"and the ranking may change. To go on, {_train_on(data)}.",
        "the models have not converged",
    )


def _train_on(data: dict) -> str:
    """How to train the runs further: the exact command where `clusterar experiment --epochs` does it (a
    constant schedule budgeted in epochs), else what to change in the spec."""
    train = data["spec"]["train"]
    schedule = train.get("schedule", DEFAULT_SCHEDULE)
    if schedule != "constant":
        return (
            f"note that its {schedule} schedule cannot be extended exactly: run the spec with more `epochs` (or "
            '`schedule = "constant"`) into a new folder'
        )
    if "epochs" not in train:
        return (
            "raise `steps` in the spec's [train] and run it again: on the constant schedule the runs train on"
        )
    more = _ep(2 * train["epochs"])
    command = data.get("command") or ""
    if not command.startswith("clusterar experiment "):
        return f"raise `epochs` in the spec's [train] (to {more}, say) and run it again: the runs train on"
    return (
        f"train the same runs on to {more} epochs with `{command} --epochs {more}` (on the constant schedule "
        "the longer runs equal runs trained that long from the start; finished evaluations are kept)"
    )


def _ceiling_said(data: dict) -> list[str]:
    tok = data.get("ceiling", {}).get("tokenizer")
    if not tok:
        return []
    return [
        f"- **Tokenizer ceiling**: the tokenizer's own reconstructions of val images score FID {tok['fid']:.2f}"
        + (
            f" and class accuracy {pct(tok['class_accuracy'])}"
            if tok.get("class_accuracy") is not None
            else ""
        )
        + ": no model that draws its tokens can do better; a model near it is limited by the tokenizer."
    ]


def _expected_said(data: dict) -> list[str]:
    """Where a single run of this spec lands (the spec's [expected], measured), and this run against it."""
    expected = data["spec"].get("expected") or {}
    ranges = {run: r for run, r in expected.items() if isinstance(r, dict) and run in data["curves"]}
    if not ranges:
        return []
    parts = []
    for run, r in ranges.items():
        final = data["curves"][run][-1]
        for key, scale, unit, nd in (("class_accuracy", 100, "%", 1), ("fid", 1, "", 2)):
            got = values(final, key)  # one value per seed: each is a single run
            if key in r and got is not None:
                lo, hi = r[key]
                marks = [
                    f"{scale * v:.{nd}f}{unit}, {'inside' if lo <= v <= hi else '**outside**'}" for v in got
                ]
                parts.append(
                    f"{run} {_WORDS[key][0]} {scale * lo:.{nd}f}-{scale * hi:.{nd}f}{unit} "
                    f"(this run: {'; '.join(marks)})"
                )
    n = expected.get("runs")
    source = f"{n} runs" if n else "runs"
    source += f", measured by `{expected['measured']}`" if expected.get("measured") else ""
    doubt = (
        f"A further run falls outside the min..max of {n} with chance {2 / (n + 1):.0%} on each number, so "
        "only"
        if n
        else "Only"
    )
    return [
        f"- **Expected range**: single runs of this spec landed in ({source}): " + "; ".join(parts) + f". "
        f"{doubt} a run far outside on several numbers points to a broken install or a changed setting "
        "rather than an unlucky seed."
    ]


def _setup(data: dict) -> list[str]:
    """## Setup: data, tokenizer, clusters, training, evaluation, speed and (over seeds) spread."""
    spec = data["spec"]
    lines = [
        "## Setup",
        "",
        f"- **Data**: `{spec['data']}` at {spec['image_size']}x{spec['image_size']}; token files "
        f"`{data['tokens']['train']}` ({_views_words(data.get('train_views'))}) and "
        f"`{data['tokens']['val']}`.",
        _tokenizer_line(data),
    ]
    for cname, c in data["clusters"].items():
        cs = spec["clusters"][cname]
        lines.append(
            f"- **Clusters `{cname}`**: {cs['method']}, {cs['n']} clusters of {c['min_size']}..{c['max_size']} "
            f"codes, objective {c['objective']:.2f}, fitted in {c['seconds']} s."
        )
    lines += [_training_line(data), _evaluation_line(data)]
    lines.append(
        "- **Speed**: images/s of the final models (tokens and decoding) at batch 64, median of 3 rounds "
        "timed in turns, on the same machine."
    )
    seeds = _seeds(data)
    if len(seeds) > 1:
        lines.append(
            "- **Spread**: every figure is the mean over seeds ± the sample standard deviation (min..max). "
            "A difference counts only when the min..max ranges do not overlap (two runs that do not differ "
            f"separate this way by chance with probability {_chance(len(seeds))}; see Verdicts)."
        )
    return lines


def _tokenizer_line(data: dict) -> str:
    tok = data["tokenizer"]
    if "config" not in tok:
        return f"- **Tokenizer**: `{tok['path']}`."
    c, e = tok["config"], tok.get("eval", {})
    grid = data["spec"]["image_size"] // 2 ** (len(c.get("ch_mult", [1, 1, 1])) - 1)
    quality = f"; val PSNR {e['psnr']:.2f} dB, val codebook usage {pct(e['usage'])}" if e else ""
    return (
        f"- **Tokenizer**: {c.get('codebook_size')} codes of dimension {c.get('codebook_dim')}, "
        f"{grid}x{grid} tokens per image{quality}."
    )


def _training_line(data: dict) -> str:
    spec, t = data["spec"], data["spec"]["train"]
    budget = f"{t['epochs']} epochs" if "epochs" in t else f"{t.get('steps')} steps"
    seeds = _seeds(data)
    seed_words = (
        f"seeds {', '.join(map(str, seeds))}: every run and every sweep point once per seed, each seed's "
        "samples drawn with that seed"
        if len(seeds) > 1
        else f"seed {seeds[0]}"
    )
    return (
        f"- **Training** (every run, {seed_words}; the tokenizer and token files are shared, seed "
        f"{spec['seed']}): {budget}, "
        + ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("epochs", "steps"))
        + "; per-run changes in the table of runs below."
    )


def _evaluation_line(data: dict) -> str:
    spec, ev = data["spec"], data["spec"]["eval"]
    return (
        f"- **Evaluation** ({_points(ev)}): {ev['samples']} class-balanced samples per point, scored "
        f"against {data['curves'][spec['runs'][0]['name']][-1]['n_reference']} images of "
        f"`{_reference_name(spec)}` with {_extractor_name(spec, data)}: FID, Inception Score, precision "
        "and recall (k = 3), and class accuracy (the share of samples that the classifier reads as the class "
        "they were asked for), with the sampling settings of the table of runs. Val accuracies: "
        "teacher-forced on every val image (CTF: stage-2 token accuracy given the true coarse labels, "
        "stage-1 label accuracy); cluster accuracy is with respect to the run's own clusters."
    )


def _runs(data: dict) -> list[str]:
    """## Runs: each run's method, clusters, training overrides and sampling settings."""
    lines = [
        "",
        "## Runs",
        "",
        "| run | method | clusters | training overrides | sampling |",
        "|---|---|---|---|---|",
    ]
    for r in data["spec"]["runs"]:
        tr = {**r["train"], **{f"refiner.{k}": v for k, v in r["refiner"].items()}}
        lines.append(
            f"| {r['name']} | {r['method']} | {r['clusters'] or '-'} | "
            f"{', '.join(f'{k}={v}' for k, v in tr.items()) or '-'} | "
            f"{_sampling(data['sampling'][r['name']], r['method'])} |"
        )
    return lines


def _comparison(data: dict) -> list[str]:
    """## Comparison: the table of final models, the tokenizer's ceiling and real-data rows, and what the
    class accuracy column can reach."""
    points = _points(data["spec"]["eval"])
    lines = [
        "",
        "## Comparison (final models)",
        "",
        "Parameters: stage 1 is the autoregressive transformer (in brackets: its vocabulary-sized input "
        "embedding and output head), stage 2 CTF's refiner. *Epochs to baseline FID*: the first evaluated "
        "epoch at which the run's FID is at or below the baseline's final FID"
        + (" (each seed against the same seed's baseline)" if len(_seeds(data)) > 1 else "")
        + ", and the epoch at which the baseline itself first got there divided by it "
        + (
            f"(resolution: evaluations {points})."
            if points != "of the final models"
            else "(only the final models were evaluated here: 'by E' means reached at the final epoch E)."
        )
        + " The last rows are not models: the tokenizer's reconstructions of the val images (the best any "
        "transformer on these tokens can reach) and real train images, as many as a run's samples (what "
        "real data scores at this sample size).",
        "",
        "| run | method | params stage 1 | params stage 2 | img/s | FID | IS | precision | recall | "
        "class acc | val token acc | val cluster acc | epochs to baseline FID |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_table_row(row, points) for row in data["table"]]
    lines += _ceiling_rows(data)
    return lines


def _table_row(row: dict, points: str) -> str:
    return (
        f"| {row['run']} | {row['method']} | {_int(row['params_stage1'])} "
        f"({_int(row['params_stage1_tables'])}) | {_int(row['params_stage2'])} | "
        f"{fmt(row['images_per_s'], 1)} | {fmt_spread(row, 'fid')} | {fmt_spread(row, 'inception_score')} | "
        f"{fmt_spread(row, 'precision', 3)} | {fmt_spread(row, 'recall', 3)} | "
        f"{fmt_spread(row, 'class_accuracy', 1, pct=True)} | {fmt_spread(row, 'val_acc_token', 1, pct=True)} | "
        f"{fmt_spread(row, 'val_acc_cluster', 1, pct=True)} | {_reach(row, points)} |"
    )


def _ceiling_rows(data: dict) -> list[str]:
    """The rows that are not models (tokenizer reconstructions, real images) and the classifier's own
    accuracy on real val images."""
    names = {"tokenizer": "tokenizer (val reconstructions)", "real": "real train images"}
    lines = [
        f"| *{names.get(key, key)}* | - | - | - | - | {fmt(m['fid'])} | {fmt(m['inception_score'])} | "
        f"{fmt(m['precision'], 3)} | {fmt(m['recall'], 3)} | {pct(m.get('class_accuracy'))} | - | - | - |"
        for key, m in data.get("ceiling", {}).items()
    ]
    ceiling = extractor_accuracy(data)
    if ceiling is not None:
        lines += [
            "",
            "class acc: the share of samples that the feature classifier reads as the class they were asked "
            f"for; the same classifier reads real val images at {pct(ceiling)}, the ceiling of this column.",
        ]
    return lines


def _fid_against_epochs(data: dict) -> list[str]:
    lines = ["", "![metrics against epochs](curves.png)", "", "### FID against epochs", ""]
    epochs = sorted({c["epoch"] for cs in data["curves"].values() for c in cs})
    lines.append("| run | " + " | ".join(f"{e:.4g}" for e in epochs) + " |")
    lines.append("|---|" + "---:|" * len(epochs))
    for run, cs in data["curves"].items():
        by_epoch = {c["epoch"]: c for c in cs}
        cells = [fmt_spread(by_epoch[e], "fid") if e in by_epoch else "-" for e in epochs]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return lines


def _sweeps(data: dict, out: Path) -> list[str]:
    """## Sweep: one table (and picture, when numeric) per swept sampling setting."""
    lines = []
    for param, per_run in data["sweeps"].items():
        swept = [c["value"] for c in next(iter(per_run.values()))] if per_run else []
        lines += [
            "",
            f"## Sweep: {param} (final models, FID / precision / recall / class accuracy"
            + (", means over seeds with FID's and class accuracy's spread" if len(_seeds(data)) > 1 else "")
            + ")",
            "",
            "| run | " + " | ".join(str(v) for v in swept) + " |",
            "|---|" + "---:|" * len(swept),
        ]
        for run, cs in per_run.items():
            cells = [
                f"{fmt_spread(c, 'fid')} / {fmt(c['precision'], 2)} / {fmt(c['recall'], 2)} / "
                f"{fmt_spread(c, 'class_accuracy', 1, pct=True)}"
                for c in cs
            ]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        judged = data.get("sweep_verdicts", {}).get(param, [])
        if judged and len(_seeds(data)) > 1:
            lines += [
                "",
                f"Each value against the sweep's first ({swept[0]}), by the rule of the Verdicts above:",
                "",
            ]
            lines += [f"- {verdict_text(v)}." for v in judged]
        if (out / f"sweep-{param}.png").exists():
            lines += ["", f"![sweep of {param}](sweep-{param}.png)"]
    return lines


def _samples(data: dict) -> list[str]:
    lines = [
        "",
        "## Samples (final models, one row per class)",
        "",
        "![samples of every run](samples.png)",
        "",
        "The full grids (16 per class):",
        "",
    ]
    for run, cs in data["curves"].items():
        lines += [f"**{_grid_title(run, cs[-1])}**", ""]
        lines += [f"![{run} samples]({cs[-1]['grid']})", ""]
    return lines


def _files() -> list[str]:
    return [
        "## Files",
        "",
        "`report.json` holds every number above; each run folder under `runs/` holds its model, "
        "`log.jsonl` and `curves.png`, and `evals/*/` the samples (`samples.npz`, `grid.png`) of each "
        "evaluation with its settings (`eval.json`, `sample.json`).",
        "",
    ]


def _views_words(views: list[str] | None) -> str:
    if not views:
        return "views not recorded"
    if views == ["original"]:
        return "the images as they are, no flips"
    if views == ["original", "hflip"]:
        return "each image and its horizontal flip"
    return f"views {', '.join(views)}"


def _ep(e: float) -> str:
    return f"{e:.4g}"


def _chance(n_seeds: int) -> str:
    """P(two exchangeable runs of n seeds each have disjoint ranges), in words."""
    return f"{false_separation(n_seeds, n_seeds):.0%}"


def _reach(row: dict, points: str) -> str:
    per = row.get("epochs_to_baseline_fid_per_seed")
    if per is None:
        return "-"
    if row["reference"]:
        return ", ".join(_ep(e) for e in per) + " (reference)"
    if points == "of the final models":  # only final models evaluated: no finer answer
        return ", ".join(f"by {_ep(e)}" if e is not None else "not reached" for e in per)
    return ", ".join(
        f"{_ep(e)} ({u:.1f}x)" if e is not None else "not reached"
        for e, u in zip(per, row["speedup_per_seed"], strict=True)
    )


_WORDS = {"fid": ("FID", "lower"), "class_accuracy": ("class accuracy", "higher")}


def verdict_text(v: dict) -> str:
    """One verdict in words: who is ahead, how strongly the rule says so, and its false-separation chance."""
    metric, better = _WORDS[v["metric"]]
    nd, scale = (2, 1) if v["metric"] == "fid" else (1, 100)
    ra = "..".join(f"{scale * x:.{nd}f}" for x in v["run_range"])
    rb = "..".join(f"{scale * x:.{nd}f}" for x in v["against_range"])
    kind = v["verdict"]
    if kind == "unresolved":
        return f"{v['run']} against {v['against']}, final {metric}: **unresolved** ({ra} against {rb})"
    ahead, behind, r_ahead, r_behind = (
        (v["run"], v["against"], ra, rb) if kind.endswith("better") else (v["against"], v["run"], rb, ra)
    )
    chance = f"chance of a false separation {v['chance']:.0%}"
    if kind.startswith("suggestive"):
        return (
            f"{ahead} ahead of {behind} on final {metric}: *suggestive* only ({better} is better; {r_ahead} "
            f"against {r_behind}; {chance}: more seeds would tell)"
        )
    return f"**{ahead} beats {behind}** on final {metric} ({better} is better; {r_ahead} against {r_behind}; {chance})"


def _verdict_lines(data: dict) -> list[str]:
    """The plain-words answers: differences by the range rule, the claims, the baseline's convergence."""
    lines = ["", "### Verdicts", ""]
    n = len(data.get("seeds", [0]))
    if n < 2:
        lines.append(
            "One seed: no spread is measured, and any two different numbers separate, so no difference below "
            "counts; repeat the runs with `seeds = [0, 1, 2]` in the spec to judge them."
        )
    else:
        lines.append(
            f"Rule: with {n} seeds per run, a difference counts when the two runs' min..max ranges do not "
            f"overlap; two runs with no real difference separate so by chance {_chance(n)} of the time. It is "
            f"called resolved only with at least {MIN_SEEDS} seeds per run and a chance of at most "
            f"{MAX_FALSE_SEPARATION:.0%}, *suggestive* below that; overlapping ranges are unresolved, whatever "
            "the means say."
        )
    lines.append("")
    for v in data.get("verdicts", []):
        lines.append(f"- {verdict_text(v)}.")
    for c in data.get("claims", []):
        ups = ", ".join(f"{r['speedup']:.2g}x" if r["speedup"] else "not reached" for r in c["per_seed"])
        targets = ", ".join(
            f"{r['target_fid']:.2f}, reached at epoch {_ep(r['reference_epoch'])}" for r in c["per_seed"]
        )
        name = c["text"] or f"{c['run']} needs at most 1/{c['claimed']:g} of {c['against']}'s epochs"
        lines.append(
            f"- Claim: {name}. **{c['verdict'].capitalize()}** ({c['seeds_holding']} of {c['n_seeds']} seeds): "
            f"the target is {c['against']}'s converged FID, the mean of its last 3 evaluations ({targets}, per "
            f"seed); {c['against']}'s epochs to reach it divided by {c['run']}'s are {ups}; the claim needs "
            f"{c['claimed']:g}x."
        )
    conv = data.get("convergence")
    if conv:
        lines.append(convergence_line(conv))
    return lines


def convergence_line(conv: dict) -> str:
    """Whether the baseline has converged, the test that decides it first and the other one after it."""
    tests = []  # (says converged?, words)
    if "fid_change" in conv:
        tail = ", ".join(f"{x:.2f}" for x in conv.get("fid_tail", []))
        spread = (
            f"{'within' if conv['flat'] else 'more than'} the seed spread there ({conv['seed_range']:.2f})"
            if conv["seed_range"] > 0
            else "with no seed spread to compare against (one seed)"
        )
        tests.append(
            (
                conv["flat"],
                f"its mean FID moved by {conv['fid_change']:.2f} over the last {conv['points']} evaluations "
                f"({tail}), {spread}",
            )
        )
    if "val_loss_min" in conv:
        tests.append(
            (
                conv["loss_rising"],
                f"its val loss is {'above' if conv['loss_rising'] else 'at'} its minimum "
                f"({conv['val_loss_last']:.4f} now, {conv['val_loss_min']:.4f} at epoch "
                f"{_ep(conv['val_loss_min_epoch'])}"
                + ("; it has begun to over-fit)" if conv["loss_rising"] else ")"),
            )
        )
    if conv["converged"]:
        state = "**has converged**"
        words = [w for ok, w in tests if ok] + [f"but {w}" for ok, w in tests if not ok]
    else:
        state = "**has not converged** (the comparison is of models still learning)"
        words = [w for _, w in tests]
    return f"- The baseline `{conv['run']}` {state}: " + "; ".join(words) + "."


def _sampling(s: dict, method: str) -> str:
    text = f"CFG {s['cfg_scale']}, temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}"
    if method == "ctf":
        text += f"; stage 2: temperature {s['temperature2']}, top-k {s['top_k2']}, unguided"
        if s.get("cfg_scale2", 1.0) != 1.0:
            text = text.replace("unguided", f"CFG {s['cfg_scale2']}")
        if s.get("stage2", "refiner") != "refiner":
            text = (
                text.split("; stage 2:")[0] + f"; stage 2: no refiner, a code of the cluster ({s['stage2']})"
            )
    return text


def _reference_name(spec: dict) -> str:
    if spec["data"].startswith("folder:"):
        return f"{spec['data'][len('folder:') :]} ({spec['eval']['reference']})"
    return f"{spec['data']}:{spec['eval']['reference']}"


def _extractor_name(spec: dict, data: dict | None = None) -> str:
    ev = spec["eval"]
    if ev.get("extractor") == "inception" or (ev.get("extractor") is None and ev.get("inception")):
        return f"Inception-v3 (`{ev['inception']}`)"
    return f"the `{spec['data']}` classifier's features (trained on its train split, cached)"

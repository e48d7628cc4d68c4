"""Comparing runs over seeds: mean and spread of every metric, the rule that says when a difference is
resolved, the papers' speed-up claims checked per seed, and whether the reference run has converged; the
experiment report's numbers (its comparison table, verdicts, claims and convergence) are made here, the
report only renders them.

Evaluation results are dicts (one per evaluated snapshot, see experiment.Evaluator) with an `epoch` and
metric values. A run repeated with seeds 0, 1, 2 has three such curves; `aggregate` turns them into one
curve whose points hold, for every metric M, M (the mean over seeds), M_std (sample standard deviation,
0 for one seed), M_min, M_max and M_all (the values per seed).

The rule (`resolved`): a difference between two runs counts only when their min..max ranges over seeds do
not overlap. Two runs whose results are exchangeable (no real difference) separate this way by chance with
probability 2 / C(n_a + n_b, n_a) (`false_separation`): 1 in 3 at two seeds each, 10% at three, 3% at
four. A separation is called resolved ("better" / "worse") only with at least MIN_SEEDS seeds per side and
a chance of at most MAX_FALSE_SEPARATION; with less it is "suggestive"; with one seed each (chance 1)
nothing separates. Every verdict carries its chance: a resolved difference is evidence, not proof.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

from .errors import ClusterarError

if TYPE_CHECKING:
    from .experiment.spec import RunSpec

# Metrics of an evaluation point; True where lower is better.
METRICS: dict[str, bool] = {
    "fid": True,
    "inception_score": False,
    "precision": False,
    "recall": False,
    "class_accuracy": False,
    "val_acc_token": False,
    "val_acc_cluster": False,
    "val_loss": True,
}
# (Sampling speed is not aggregated: it measures the machine's load as much as the model; the report
# times the final models side by side instead.)
# Keys copied from the first seed's point (the same for every seed, or a pointer to one seed's files).
_SHARED = ("run", "method", "epoch", "step", "grid", "n_samples", "n_reference", "extractor_val_accuracy")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (sample, ddof 1; 0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def aggregate(replicas: list[list[dict]], where: str) -> list[dict]:
    """One curve from the curves of several seeds (aligned point by point; their epochs must agree)."""
    if not replicas:
        raise ClusterarError(f"{where}: no seeds to aggregate")
    lengths = sorted({len(r) for r in replicas})
    if len(lengths) != 1:
        raise ClusterarError(
            f"{where}: the seeds have different numbers of evaluation points ({lengths}); every seed of a run "
            "must be trained with the same budget and evaluation settings"
        )
    out = []
    for pts in zip(*replicas, strict=True):
        epochs = sorted({round(p["epoch"], 9) for p in pts})
        if len(epochs) != 1:
            raise ClusterarError(f"{where}: the seeds' evaluation points are at different epochs {epochs}")
        a: dict[str, Any] = {k: pts[0].get(k) for k in _SHARED if k in pts[0]}
        a["n_seeds"] = len(pts)
        a["seeds"] = [p.get("seed") for p in pts]
        for key in METRICS:
            values = [p.get(key) for p in pts]
            if not all(_number(v) for v in values):
                a[key] = None
                continue
            s = spread(values)
            a[key], a[f"{key}_std"], a[f"{key}_min"], a[f"{key}_max"] = (
                s["mean"],
                s["std"],
                s["min"],
                s["max"],
            )
            a[f"{key}_all"] = values
        out.append(a)
    return out


def values(point: dict, key: str) -> list[float] | None:
    """The per-seed values of `key` at an aggregated point (None if the metric is missing)."""
    if point.get(key) is None:
        return None
    return list(point.get(f"{key}_all", [point[key]]))


# The evidence a resolved difference needs: seeds per run, and the largest chance of a false separation.
MIN_SEEDS = 3
MAX_FALSE_SEPARATION = 0.10


def false_separation(n_a: int, n_b: int) -> float:
    """The chance that two runs with no real difference (their n_a + n_b results exchangeable, no ties)
    have min..max ranges that do not overlap: 2 / C(n_a + n_b, n_a), at most 1."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))


def resolved(a: list[float], b: list[float], lower_is_better: bool) -> str:
    """a against b by the range rule: 'better' / 'worse' when the ranges do not overlap with enough
    evidence (MIN_SEEDS per side, chance <= MAX_FALSE_SEPARATION), 'suggestive better' / 'suggestive
    worse' when they do not overlap with less, else 'unresolved' (also always at one seed each)."""
    if false_separation(len(a), len(b)) >= 1.0:
        return "unresolved"
    if max(a) < min(b):
        side = "better" if lower_is_better else "worse"
    elif min(a) > max(b):
        side = "worse" if lower_is_better else "better"
    else:
        return "unresolved"
    enough = min(len(a), len(b)) >= MIN_SEEDS and false_separation(len(a), len(b)) <= MAX_FALSE_SEPARATION
    return side if enough else f"suggestive {side}"


def first_epoch_reaching(curve: list[dict], fid: float) -> float | None:
    """The first evaluated epoch at which the curve's FID is at or below `fid`."""
    return next((c["epoch"] for c in curve if c.get("fid") is not None and c["fid"] <= fid), None)


TAIL = 3  # evaluations that make a curve's converged level (and its convergence test)


def speedup_to_level(reference: list[dict], run: list[dict], tail: int = TAIL) -> dict[str, Any]:
    """How soon `run` reaches the converged FID of `reference` (one seed each): the mean FID of the
    reference's last `tail` evaluations (its level once flat; not its best point, which is the luckiest of
    noisy draws), the epoch the reference first got there, the epoch `run` first got there (None: never),
    and their ratio."""
    fids = [c["fid"] for c in reference if c.get("fid") is not None]
    target = statistics.fmean(fids[-tail:])
    ref_epoch = first_epoch_reaching(reference, target)
    reached = first_epoch_reaching(run, target)
    return {
        "target_fid": target,
        "reference_epoch": ref_epoch,
        "epoch": reached,
        "speedup": ref_epoch / reached if reached else None,
    }


def check_claim(
    per_seed: dict[str, dict[str, list[dict]]], run: str, against: str, speedup: float
) -> dict[str, Any]:
    """A speed-up claim per seed (seeds paired: run seed s against reference seed s) and its verdict:
    'holds' (every seed), 'does not hold' (no seed) or 'mixed'."""
    rows = []
    for seed, ref_curve in per_seed[against].items():
        r = speedup_to_level(ref_curve, per_seed[run][seed])
        r["seed"] = seed
        r["holds"] = r["speedup"] is not None and r["speedup"] >= speedup * (1 - 1e-9)
        rows.append(r)
    n = sum(r["holds"] for r in rows)
    verdict = "holds" if n == len(rows) else "does not hold" if n == 0 else "mixed"
    reached = [r["speedup"] for r in rows if r["speedup"] is not None]
    return {
        "run": run,
        "against": against,
        "claimed": speedup,
        "per_seed": rows,
        "seeds_holding": n,
        "n_seeds": len(rows),
        "verdict": verdict,
        "speedup_median": statistics.median(reached) if len(reached) == len(rows) else None,
    }


def converged(curve: list[dict], last: int = TAIL) -> dict[str, Any]:
    """Has an aggregated curve stopped improving? Its mean FID over the last `last` points moves by no
    more than the seed spread there (the mean of their min..max ranges), or its val loss is above its
    minimum (over-fitting). With one seed there is no spread, so only the loss test can say yes."""
    tail = [c for c in curve if c.get("fid") is not None][-last:]
    out: dict[str, Any] = {"points": len(tail), "flat": False, "loss_rising": False}
    if len(tail) >= 2:
        moves = max(c["fid"] for c in tail) - min(c["fid"] for c in tail)
        seed_range = statistics.fmean(c.get("fid_max", c["fid"]) - c.get("fid_min", c["fid"]) for c in tail)
        out.update(
            fid_change=moves,
            seed_range=seed_range,
            flat=seed_range > 0 and moves <= seed_range,
            fid_tail=[c["fid"] for c in tail],
        )
    losses = [(c["epoch"], c["val_loss"]) for c in curve if c.get("val_loss") is not None]
    if losses:
        best_epoch, best = min(losses, key=lambda x: x[1])
        out.update(val_loss_min=best, val_loss_min_epoch=best_epoch, val_loss_last=losses[-1][1])
        out["loss_rising"] = losses[-1][1] > best and best_epoch != losses[-1][0]
    out["converged"] = out["flat"] or out["loss_rising"]
    return out


def reached_per_seed(
    per_seed: dict[str, dict[str, list[dict]]], run: str, reference: str
) -> tuple[list[float | None], list[float | None]]:
    """Per seed, the first evaluated epoch at which `run` reached the same seed's final FID of `reference`
    (None: never), and the epoch at which the reference itself first got there divided by it (the
    speed-up; None where not reached): `speedup_to_level` with the final point as the level."""
    reached, ups = [], []
    for seed, curve in per_seed[run].items():
        r = speedup_to_level(per_seed[reference][seed], curve, tail=1)
        reached.append(r["epoch"])
        ups.append(r["speedup"])
    return reached, ups


def _is_spread_key(k: str) -> bool:
    stem, _, tail = k.rpartition("_")
    return tail in ("std", "min", "max", "all") and stem in METRICS


def comparison_table(
    runs: list[RunSpec],
    reference: str | None,
    curves: dict[str, list[dict]],
    per_seed: dict[str, dict[str, list[dict]]],
    speed: dict,
) -> list[dict]:
    """One row per run: parameters, images/s, final metrics (mean and spread over seeds), and per seed the
    epoch at which the run first reached the same seed's `reference` final FID with the speed-up over the
    epoch the reference first got there (reached_per_seed), their medians when every seed reached it."""
    rows = []
    for run in runs:
        final = curves[run.name][-1]
        p = speed[run.name]["params"]
        row = {
            "run": run.name,
            "method": run.method,
            "clusters": run.clusters,
            "epochs": final["epoch"],
            "n_seeds": final["n_seeds"],
            "params_stage1": p["stage1"]["total"],
            "params_stage1_tables": p["stage1"]["head_and_embedding"],
            "params_stage2": p["stage2"]["total"] if "stage2" in p else None,
            "images_per_s": speed[run.name]["images_per_s"],
            **{k: v for k, v in final.items() if k in METRICS or _is_spread_key(k)},
            "reference": run.name == reference,
            "epochs_to_baseline_fid": None,
            "epochs_to_baseline_fid_per_seed": None,
            "speedup_vs_baseline": None,
            "speedup_per_seed": None,
        }
        if reference is not None:
            reached, ups = reached_per_seed(per_seed, run.name, reference)
            row["epochs_to_baseline_fid_per_seed"], row["speedup_per_seed"] = reached, ups
            if all(e is not None for e in reached):
                row["epochs_to_baseline_fid"] = statistics.median(reached)
                row["speedup_vs_baseline"] = statistics.median(ups)
        rows.append(row)
    return rows


def verdict_pairs(
    runs: list[str], reference: str | None, contrasts: list[list[str]]
) -> list[tuple[str, str]]:
    """The (run, against) pairs to judge: every run against the reference, then every contrast not
    already among them."""
    pairs = [(r, reference) for r in runs if reference is not None and r != reference]
    return pairs + [(a, b) for a, b in contrasts if (a, b) not in pairs]


def verdicts(pairs: list[tuple[str, str]], curves: dict[str, list[dict]]) -> list[dict]:
    """Each pair's final models judged on FID and class accuracy (`judge`)."""
    return [v for run, against in pairs for v in judge(curves[run][-1], curves[against][-1], run, against)]


def sweep_verdicts(param: str, per_run: dict[str, list[dict]]) -> list[dict]:
    """A sampling sweep judged within each run: every swept value against the sweep's first value, on the
    same final models (`judge`; the names say the values, e.g. 'ctf at stage2=uniform')."""
    out = []
    for run, points in per_run.items():
        first = points[0]
        for p in points[1:]:
            out += judge(p, first, f"{run} at {param}={p['value']}", f"{run} at {param}={first['value']}")
    return out


def judge(point: dict, against_point: dict, run: str, against: str) -> list[dict]:
    """Two aggregated points judged on FID and class accuracy by the range rule (`resolved`), with the
    chance that the rule separates two runs with no real difference (`false_separation`)."""
    out = []
    for key in ("fid", "class_accuracy"):
        a, b = values(point, key), values(against_point, key)
        if a is None or b is None:
            continue
        out.append(
            {
                "run": run,
                "against": against,
                "metric": key,
                "verdict": resolved(a, b, METRICS[key]),
                "run_range": [min(a), max(a)],
                "against_range": [min(b), max(b)],
                "n_seeds": len(a),
                "chance": false_separation(len(a), len(b)),  # of a separation with no real difference
            }
        )
    return out


def convergence(reference: str | None, curves: dict[str, list[dict]]) -> dict[str, Any] | None:
    """Whether the reference run's curve has flattened (`converged`), naming the run; None without one."""
    return None if reference is None else {"run": reference, **converged(curves[reference])}


def fmt_spread(point: dict, key: str, nd: int = 2, pct: bool = False) -> str:
    """'44.68' for one seed, '44.68 ± 1.42 (42.10..46.94)' for several; '-' when missing."""
    if point.get(key) is None:
        return "-"
    scale, unit = (100.0, "%") if pct else (1.0, "")

    def f(x: float) -> str:
        return f"{scale * x:.{nd}f}"

    if point.get("n_seeds", 1) < 2 or f"{key}_std" not in point:
        return f(point[key]) + unit
    return (
        f"{f(point[key])}{unit} ± {f(point[f'{key}_std'])} "
        f"({f(point[f'{key}_min'])}..{f(point[f'{key}_max'])})"
    )


__all__ = [
    "METRICS",
    "TAIL",
    "aggregate",
    "check_claim",
    "comparison_table",
    "convergence",
    "converged",
    "first_epoch_reaching",
    "fmt_spread",
    "judge",
    "reached_per_seed",
    "resolved",
    "speedup_to_level",
    "spread",
    "sweep_verdicts",
    "values",
    "verdict_pairs",
    "verdicts",
    "false_separation",
    "MIN_SEEDS",
    "MAX_FALSE_SEPARATION",
]

"""Comparing runs over seeds: aggregation, the range rule, the speed-up claims and the convergence test,
on hand-made curves whose answers are worked out here."""

from __future__ import annotations

import math

import pytest

from clusterar.compare import (
    aggregate,
    check_claim,
    converged,
    false_separation,
    first_epoch_reaching,
    fmt_spread,
    reached_per_seed,
    resolved,
    speedup_to_level,
    sweep_verdicts,
    values,
    verdict_pairs,
    verdicts,
)
from clusterar.errors import ClusterarError
from clusterar.experiment import InvocationClock
from clusterar.experiment.report import convergence_line, verdict_text


def curve(fids: list[float], epochs: list[float] | None = None, seed: int = 0, **extra) -> list[dict]:
    epochs = epochs or [float(i + 1) for i in range(len(fids))]
    pts = [{"epoch": e, "fid": f, "seed": seed} for e, f in zip(epochs, fids, strict=True)]
    for key, vals in extra.items():
        for p, v in zip(pts, vals, strict=True):
            p[key] = v
    return pts


def test_aggregate_mean_std_min_max_per_point():
    a = curve([10.0, 8.0], seed=0, class_accuracy=[0.5, 0.6])
    b = curve([12.0, 6.0], seed=1, class_accuracy=[0.7, 0.8])
    c = curve([14.0, 7.0], seed=2, class_accuracy=[0.6, 0.7])
    agg = aggregate([a, b, c], "run")
    assert [p["epoch"] for p in agg] == [1.0, 2.0]
    p = agg[0]
    assert p["n_seeds"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["fid"] == pytest.approx(12.0) and p["fid_std"] == pytest.approx(2.0)  # sample std, ddof 1
    assert (p["fid_min"], p["fid_max"], p["fid_all"]) == (10.0, 14.0, [10.0, 12.0, 14.0])
    assert agg[1]["class_accuracy"] == pytest.approx(0.7) and agg[1]["class_accuracy_std"] == pytest.approx(
        0.1
    )
    assert values(agg[1], "fid") == [8.0, 6.0, 7.0]
    # a metric missing in one seed is missing in the aggregate, not averaged over the others
    assert agg[0]["precision"] is None and values(agg[0], "precision") is None
    one = aggregate([a], "run")[0]
    assert one["fid_std"] == 0.0 and one["n_seeds"] == 1


def test_aggregate_refuses_misaligned_seeds():
    with pytest.raises(ClusterarError, match="different numbers of evaluation points"):
        aggregate([curve([1.0, 2.0]), curve([1.0])], "iar")
    with pytest.raises(ClusterarError, match="different epochs"):
        aggregate([curve([1.0], [1.0]), curve([1.0], [2.0])], "iar")
    with pytest.raises(ClusterarError, match="no seeds"):
        aggregate([], "iar")


def test_range_rule():
    # disjoint ranges with three seeds each (chance of a false separation 10%): resolved, in the metric's direction
    assert resolved([30.0, 31.0, 32.0], [33.0, 35.0, 34.0], lower_is_better=True) == "better"
    assert resolved([30.0, 31.0, 32.0], [33.0, 35.0, 34.0], lower_is_better=False) == "worse"
    # two seeds each separate by chance 1 time in 3: suggestive only
    assert resolved([0.9, 0.8], [0.5, 0.6], lower_is_better=False) == "suggestive better"
    assert resolved([0.5, 0.6], [0.9, 0.8], lower_is_better=False) == "suggestive worse"
    # touching or overlapping ranges: unresolved, whatever the means say
    assert resolved([30.0, 31.0, 40.0], [33.0, 35.0, 34.0], lower_is_better=True) == "unresolved"
    assert resolved([30.0, 33.0], [33.0, 35.0], lower_is_better=True) == "unresolved"
    # one seed resolves nothing
    assert resolved([1.0], [100.0], lower_is_better=True) == "unresolved"
    # the chance itself: 2 / C(n_a + n_b, n_a)
    assert [false_separation(n, n) for n in (1, 2, 3, 4)] == pytest.approx([1.0, 1 / 3, 0.1, 2 / 70])
    assert false_separation(1, 5) == pytest.approx(1 / 3)
    # five seeds against one: chance 1/3, suggestive however far apart
    assert resolved([1.0, 1.1, 1.2, 1.3, 1.4], [9.0], lower_is_better=True) == "suggestive better"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_verdict_wording_follows_the_evidence(n):
    """The same clear gap in FID (20 against 30) reads 'unresolved' at one seed, 'suggestive' with its 1 in 3
    chance at two, and 'beats' with its 10% chance at three; never 'beats' below three seeds."""
    curves = {
        name: aggregate([curve([f + s], seed=s) for s in range(n)], name)
        for name, f in (("base", 30.0), ("iar", 20.0))
    }
    (v,) = verdicts([("iar", "base")], curves)
    text = verdict_text(v)
    assert v["chance"] == pytest.approx(false_separation(n, n))
    if n == 1:
        assert v["verdict"] == "unresolved" and "**unresolved**" in text
    elif n == 2:
        assert v["verdict"] == "suggestive better" and "beats" not in text
        assert "iar ahead of base" in text and "*suggestive*" in text and "33%" in text
    else:
        assert v["verdict"] == "better" and "**iar beats base**" in text and "10%" in text


def test_speedup_to_the_converged_level_and_claims_per_seed():
    base = curve([40.0, 30.0, 25.0, 20.0, 21.0, 19.5, 22.0, 21.5])  # level: mean of the last 3 = 21.0
    fast = curve([35.0, 20.5, 18.0, 17.0, 17.0, 17.0, 17.0, 17.0])  # <= 21 from epoch 2, base from 4: 2x
    slow = curve([38.0, 29.0, 24.0, 22.0, 20.0, 19.0, 19.0, 19.0])  # epoch 5: 0.8x
    never = curve([45.0] * 8)
    assert first_epoch_reaching(fast, 21.0) == 2.0 and first_epoch_reaching(never, 21.0) is None
    r = speedup_to_level(base, fast)
    assert (r["target_fid"], r["reference_epoch"], r["epoch"], r["speedup"]) == (21.0, 4.0, 2.0, 2.0)
    # one lucky low point (19.5) is not the target: the level of the flat tail is
    assert speedup_to_level(base, fast, tail=1)["target_fid"] == 21.5
    assert speedup_to_level(base, never)["speedup"] is None

    per_seed = {"baseline": {"0": base, "1": base}, "m": {"0": fast, "1": fast}}
    c = check_claim(per_seed, "m", "baseline", 2.0)
    assert c["verdict"] == "holds" and c["seeds_holding"] == 2 and c["speedup_median"] == 2.0
    assert check_claim(per_seed, "m", "baseline", 3.0)["verdict"] == "does not hold"
    per_seed["m"]["1"] = slow
    c = check_claim(per_seed, "m", "baseline", 2.0)
    assert c["verdict"] == "mixed" and [r["holds"] for r in c["per_seed"]] == [True, False]
    assert c["speedup_median"] == pytest.approx((2.0 + 0.8) / 2)
    per_seed["m"]["1"] = never
    c = check_claim(per_seed, "m", "baseline", 2.0)
    assert c["speedup_median"] is None and c["per_seed"][1]["epoch"] is None


def test_verdicts_judge_every_run_against_the_reference_and_the_contrasts():
    pairs = verdict_pairs(["base", "iar", "ctf"], "base", [["ctf", "iar"], ["iar", "base"]])
    assert pairs == [("iar", "base"), ("ctf", "base"), ("ctf", "iar")]
    assert verdict_pairs(["a", "b"], None, [["a", "b"]]) == [("a", "b")]
    curves = {
        name: aggregate([curve([f], seed=s, class_accuracy=[a]) for s, (f, a) in enumerate(pts)], name)
        for name, pts in {"base": [(30.0, 0.5), (31.0, 0.6)], "iar": [(20.0, 0.55), (21.0, 0.58)]}.items()
    }
    v = verdicts([("iar", "base")], curves)
    assert [(x["metric"], x["verdict"]) for x in v] == [
        ("fid", "suggestive better"),
        ("class_accuracy", "unresolved"),
    ]
    assert (
        v[0]["run_range"] == [20.0, 21.0] and v[0]["against_range"] == [30.0, 31.0] and v[0]["n_seeds"] == 2
    )


def test_sweep_verdicts_judge_each_value_against_the_first_within_a_run():
    """stage2 = refiner, uniform, frequency on one run: uniform's FID range lies wholly above the refiner's
    (worse, 3 seeds: resolved), frequency's overlaps it; class accuracy is missing and not judged."""
    fids = {"refiner": [5.0, 6.0, 7.0], "uniform": [8.0, 9.0, 10.0], "frequency": [6.5, 7.5, 8.5]}
    points = [
        aggregate([curve([f], seed=s) for s, f in enumerate(v)], k)[0] | {"value": k} for k, v in fids.items()
    ]
    v = sweep_verdicts("stage2", {"ctf": points})
    assert [(x["run"], x["against"], x["metric"], x["verdict"]) for x in v] == [
        ("ctf at stage2=uniform", "ctf at stage2=refiner", "fid", "worse"),
        ("ctf at stage2=frequency", "ctf at stage2=refiner", "fid", "unresolved"),
    ]
    assert "**ctf at stage2=refiner beats ctf at stage2=uniform**" in verdict_text(v[0])


def test_reached_per_seed_against_the_same_seeds_reference():
    per_seed = {
        "base": {"0": curve([30.0, 20.0]), "1": curve([30.0, 25.0])},
        "m": {"0": curve([19.0, 18.0]), "1": curve([40.0, 30.0])},
    }
    assert reached_per_seed(per_seed, "m", "base") == ([1.0, None], [2.0, None])
    assert reached_per_seed(per_seed, "base", "base") == ([2.0, 2.0], [1.0, 1.0])
    # a reference that got to its final FID before its final epoch counts from there, not from the end
    per_seed = {"base": {"0": curve([30.0, 20.0, 24.0, 20.0])}, "m": {"0": curve([19.0, 18.0, 17.0, 17.0])}}
    assert reached_per_seed(per_seed, "m", "base") == ([1.0], [2.0])
    assert reached_per_seed(per_seed, "base", "base") == ([2.0], [1.0])


def test_converged_by_flat_fid_or_rising_loss():
    # three seeds whose mean FID moves less over the last 3 points than their min..max ranges
    seeds = [
        curve([40.0, 30.0, 25.0, 24.0, 25.0], seed=0, val_loss=[5.0, 4.0, 3.5, 3.4, 3.3]),
        curve([42.0, 31.0, 27.0, 26.0, 26.5], seed=1, val_loss=[5.0, 4.0, 3.5, 3.4, 3.3]),
        curve([41.0, 32.0, 23.0, 24.5, 24.0], seed=2, val_loss=[5.0, 4.0, 3.5, 3.4, 3.3]),
    ]
    c = converged(aggregate(seeds, "b"))
    assert c["flat"] and not c["loss_rising"] and c["converged"]
    means = [25.0, 24.833333, 25.166667]
    assert c["fid_change"] == pytest.approx(max(means) - min(means), abs=1e-5)
    assert c["seed_range"] == pytest.approx((4.0 + 2.0 + 2.5) / 3)
    # still improving faster than the spread: not converged
    falling = [curve([40.0, 30.0, 20.0, 10.0], seed=s, val_loss=[4.0, 3.0, 2.0, 1.0]) for s in (0, 1)]
    falling[1][-1]["fid"] = 10.5
    assert not converged(aggregate(falling, "b"))["converged"]
    # one seed: no spread, so only a rising val loss says yes
    one = curve([40.0, 30.0, 30.0, 30.0], val_loss=[4.0, 3.0, 3.1, 3.2])
    c = converged(aggregate([one], "b"))
    assert not c["flat"] and c["loss_rising"] and c["converged"] and c["val_loss_min_epoch"] == 2.0
    assert c["fid_tail"] == [30.0, 30.0, 30.0]


def test_convergence_line_leads_with_the_test_that_decides():
    # converged by the rising loss while the FID still moves more than the spread: "but" the FID part
    seeds = [curve([40.0, 20.0, 30.0, 22.0], seed=s, val_loss=[4.0, 3.0, 3.1, 3.2]) for s in (0, 1)]
    seeds[1][-1]["fid"] = 23.0
    c = converged(aggregate(seeds, "b")) | {"run": "baseline"}
    line = convergence_line(c)
    assert line.startswith("- The baseline `baseline` **has converged**: its val loss is above its minimum")
    assert "; but its mean FID moved by 10.00 over the last 3 evaluations (20.00, 30.00, 22.50)" in line
    falling = [curve([40.0, 30.0, 20.0, 10.0], seed=s, val_loss=[4.0, 3.0, 2.0, 1.0]) for s in (0, 1)]
    falling[1][-1]["fid"] = 10.5
    line = convergence_line(converged(aggregate(falling, "b")) | {"run": "baseline"})
    assert "**has not converged**" in line and "but" not in line and "at its minimum (1.0000 now" in line


def test_fmt_spread():
    agg = aggregate([curve([10.0], seed=0), curve([14.0], seed=1)], "r")[0]
    assert fmt_spread(agg, "fid") == f"12.00 ± {math.sqrt(8):.2f} (10.00..14.00)"
    assert fmt_spread(aggregate([curve([10.0])], "r")[0], "fid") == "10.00"
    assert fmt_spread(agg, "recall") == "-"
    pct = aggregate([curve([1.0], class_accuracy=[0.5]), curve([1.0], class_accuracy=[0.7], seed=1)], "r")[0]
    assert fmt_spread(pct, "class_accuracy", 1, pct=True) == "60.0% ± 14.1 (50.0..70.0)"


def test_invocation_clock_counts_a_killed_invocation(tmp_path):
    killed = InvocationClock(tmp_path)
    killed.tick("tokenizer", killed.t0 - 5.0)  # its tokenizer took 5 s; then the process died
    again = InvocationClock(tmp_path)
    again.id += " (second)"  # two clocks started in the same second by one process
    again.tick()
    again.tick("training", again.t0 - 2.0)
    history = again.history()
    assert len(history) == 2  # one line per invocation, rewritten in place
    assert history[0]["tokenizer"] == pytest.approx(5.0, abs=0.5) and "training" not in history[0]
    assert history[1]["training"] == pytest.approx(2.0, abs=0.5) and "tokenizer" not in history[1]
    assert history[0]["total_this_invocation"] >= 0.0 and history[1]["invocation"].endswith("(second)")

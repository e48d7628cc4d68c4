"""The experiment runner: the minute-sized spec end to end (what `clusterar demo` does on MNIST), stage
reuse, and bad specs refused before any work starts."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from clusterar.cli import main
from clusterar.errors import ClusterarError
from clusterar.experiment import check_spec, load_spec, parse_spec, render_report, run_experiment
from clusterar.experiment.report import verdict_text


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`clusterar demo --quick` run once for the module, with its own classifier cache."""
    root = tmp_path_factory.mktemp("quick")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLUSTERAR_CACHE", str(root / "cache"))
        assert main(["demo", "--quick", "--out", str(root / "exp"), "--device", "cpu", "--no-progress"]) == 0
        yield root / "exp"


def _table(report: str) -> list[list[str]]:
    """The rows of the comparison table of report.md."""
    section = report.split("## Comparison (final models)")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # skip the header
    body = []
    for line in rows:
        if line.startswith("| run |"):
            break
        if line.startswith("| *"):  # the tokenizer-ceiling and real-data rows: not runs
            continue
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_quick_spec_end_to_end_report_holds_numbers(quick):
    report = (quick / "report.md").read_text()
    rows = _table(report)
    assert [r[0] for r in rows] == ["baseline", "iar", "ctf"]
    for r in rows:
        run, method, params1, params2, speed, fid, is_, prec, rec, cls, acc_tok, acc_cl = r[:12]
        assert 0 <= float(cls.rstrip("%")) <= 100  # class accuracy of the samples
        assert int(params1.split()[0].replace(",", "")) > 0
        assert (params2 != "-") == (method == "ctf")
        assert float(speed) > 0
        assert math.isfinite(float(fid)) and float(fid) >= 0
        assert 1.0 <= float(is_) <= 10.0  # IS is at most the number of classes
        assert 0 <= float(prec) <= 1 and 0 <= float(rec) <= 1
        assert 0 < float(acc_tok.rstrip("%")) <= 100 and 0 < float(acc_cl.rstrip("%")) <= 100
    data = json.loads((quick / "report.json").read_text())
    # every evaluation records the class accuracy of its samples, next to the classifier's own ceiling
    for cs in data["curves"].values():
        for c in cs:
            assert 0 <= c["class_accuracy"] <= 1 and c["extractor_val_accuracy"] > 0.9
    assert "the same classifier reads real val images at" in report
    # every run evaluated after each of its 2 epochs, and the sweep on the baseline's final model
    assert {n: [c["epoch"] for c in cs] for n, cs in data["curves"].items()} == {
        "baseline": [1.0, 2.0],
        "iar": [1.0, 2.0],
        "ctf": [1.0, 2.0],
    }
    assert [c["value"] for c in data["sweeps"]["cfg_scale"]["baseline"]] == [1.0, 3.0]
    # the baseline is the reference of "epochs to baseline FID"; the others reached it at an evaluated
    # epoch, or did not (None)
    final_fid = data["curves"]["baseline"][-1]["fid"]
    for row in data["table"]:
        fids = {c["epoch"]: c["fid"] for c in data["curves"][row["run"]]}
        reached = [e for e, f in fids.items() if f <= final_fid]
        assert row["epochs_to_baseline_fid"] == (min(reached) if reached else None)
    base_epoch = data["table"][0]["epochs_to_baseline_fid"]  # where the baseline first got to its final FID
    assert f"{base_epoch:.4g} (reference)" in report
    for name in ("curves.png", "sweep-cfg_scale.png", "tokenizer/tokenizer.safetensors"):
        assert (quick / name).is_file(), name
    for cs in data["curves"].values():
        assert (quick / cs[-1]["grid"]).is_file()
        assert re.search(re.escape(cs[-1]["grid"]), report)
    # the CFG-1 and CFG-3 sweep points are other samples than the default CFG-2 evaluation
    fids = {c["value"]: c["fid"] for c in data["sweeps"]["cfg_scale"]["baseline"]}
    assert fids[1.0] != fids[3.0]


def test_rerun_reuses_every_stage_and_refuses_changed_training(quick, capsys, monkeypatch):
    monkeypatch.setenv("CLUSTERAR_CACHE", str(quick.parent / "cache"))
    before = json.loads((quick / "report.json").read_text())
    evals = sorted(p for p in quick.rglob("eval.json"))
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(quick), "--device", "cpu", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "tokenizer: reusing" in log and log.count("tokens: reusing") == 2
    assert log.count("clusters: reusing") == 2 and log.count("train: reusing") == 4
    assert sorted(quick.rglob("eval.json")) == evals  # nothing re-evaluated
    after = json.loads((quick / "report.json").read_text())
    assert after["curves"] == before["curves"] and after["table"] == before["table"]

    spec = load_spec("quick")
    spec.device = "cpu"
    spec.train["lr"] = 2e-3  # a longer budget on a constant schedule extends; other changes are refused
    with pytest.raises(ClusterarError, match="other settings"):
        run_experiment(spec, quick, progress=False)


def test_the_report_puts_a_run_against_the_expected_range(quick):
    """A spec's [expected] ranges (where single runs landed) come first in the report, this run's numbers
    marked inside or outside, with the chance that a further run falls outside the range of N."""
    data = json.loads((quick / "report.json").read_text())
    final = data["curves"]["baseline"][-1]
    acc, fid = final["class_accuracy"], final["fid"]
    data["spec"]["expected"] = {
        "runs": 5,
        "measured": "a bench",
        "baseline": {"class_accuracy": [acc - 0.01, acc + 0.01], "fid": [fid + 1.0, fid + 2.0]},
    }
    first = render_report(data, quick).split("## Setup")[0]
    line = next(x for x in first.splitlines() if x.startswith("- **Expected range**"))
    assert f"baseline class accuracy {100 * (acc - 0.01):.1f}-{100 * (acc + 0.01):.1f}%" in line
    assert f"(this run: {100 * acc:.1f}%, inside)" in line and f"(this run: {fid:.2f}, **outside**)" in line
    assert "5 runs, measured by `a bench`" in line and "chance 33%" in line


def test_a_copied_experiment_folder_reuses_all_its_work(quick, tmp_path, capsys, monkeypatch):
    """Records keep the paths inside the experiment folder relative to it: a copy elsewhere (another disk,
    a colleague's machine) reruns without training or evaluating anything again, and is not refused."""
    monkeypatch.setenv("CLUSTERAR_CACHE", str(quick.parent / "cache"))
    moved = tmp_path / "elsewhere" / "exp"
    shutil.copytree(quick, moved)
    evals = sorted(p.relative_to(moved) for p in moved.rglob("eval.json"))
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(moved), "--device", "cpu", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert log.count("train: reusing") == 4 and "speed:" not in log
    assert sorted(p.relative_to(moved) for p in moved.rglob("eval.json")) == evals  # nothing re-evaluated
    done = json.loads((moved / "runs" / "baseline" / "done.json").read_text())
    assert done["settings"]["tokens"] == "tokens/train.safetensors"


BASE = {
    "name": "t",
    "data": "digits",
    "tokenizer": {"preset": "tiny"},
    "clusters": {"b": {"method": "balanced", "n": 16}, "k": {"method": "kmeans", "n": 16}},
    "train": {"model": "tiny", "epochs": 1},
    "runs": [{"name": "base", "method": "baseline"}, {"name": "ctf", "method": "ctf", "clusters": "k"}],
}


def _with(**changes):
    d = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        *keys, last = path.split("__")
        node = d
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return d


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"runs__0__method": "gan"}, "unknown method 'gan'"),
        ({"train__model": "GPT-Z"}, "unknown model preset 'GPT-Z'"),
        ({"data": "cifar"}, "unknown dataset 'cifar'"),
        ({"data": "folder:/no/such/dir"}, "does not exist"),
        ({"tokenizer__preset": "vq-99"}, "unknown tokenizer preset"),
        ({"clusters__k__method": "spectral"}, "unknown method 'spectral'"),
        ({"runs__1__clusters": "nope"}, "clusters 'nope' is not defined"),
        ({"runs__0__method": "iar", "runs__0__clusters": "k"}, "equal-size clusters"),
        ({"runs__0__method": "iar"}, "needs `clusters = NAME`"),
        ({"train__learning_rate": 1.0}, "unknown train setting"),
        ({"train__lr": -1.0}, "run .base. \\(model\\): lr must be a positive number"),
        ({"train__steps": 10}, "exactly one of epochs or steps"),
        ({"train__tokens": "x"}, "set by the experiment"),
        ({"runs__0__refiner": {"lr": 1e-3}}, "only applies to method ctf"),
        ({"runs__1__train": {"restrict_to_cluster": True}}, "only applies to CTF's refiner"),
        ({"runs__0__sample": {"temperature2": 1.1}}, "CTF stage-2 settings"),
        ({"runs__0__sample": {"top_k": -1}}, "top"),
        ({"runs__1__name": "base"}, "two runs share this name"),
        ({"runs": []}, "no \\[\\[runs\\]\\]"),
        ({"sweeps": [{"param": "lr", "values": [1]}]}, "sampling sweeps vary one of"),
        ({"sweeps": [{"param": "cfg_scale", "values": []}]}, "no values"),
        ({"sweeps": [{"param": "top_k2", "values": [5], "runs": ["base"]}]}, "are not CTF"),
        ({"eval": {"samples": 2}}, "samples must be > 3"),
        ({"eval": {"reference": "test"}}, "reference is a split"),
        ({"colour": "blue"}, "unknown key\\(s\\) \\['colour'\\]"),
        ({"seeds": [0, 0]}, "repeat a seed"),
        ({"contrasts": [["ctf", "nope"]]}, "contrasts holds \\[run, against\\] pairs"),
        ({"contrasts": [["ctf", "ctf"]]}, "two different runs"),
        ({"seeds": [1, -1]}, "whole numbers >= 0"),
        ({"claims": [{"run": "nope", "speedup": 2.0}]}, "run = 'nope' is not one of the runs"),
        ({"claims": [{"run": "ctf", "speedup": 0.0}]}, "speedup must be a number > 0"),
        ({"eval": {"every_steps": 5, "every_epochs": 1.0}}, "one of every_epochs or every_steps"),
        ({"eval": {"extractor": "clip"}}, "choose classifier"),
        ({"eval": {"extractor": "inception"}}, "needs inception = PATH"),
        ({"runs__0__start": "ctf"}, "must name a run listed before it"),
        (
            {"runs__1__start": "base", "runs__0__method": "iar", "runs__0__clusters": "b"},
            "conversions start from a baseline",
        ),
        ({"runs__0__start_head": "lsq"}, "start_head applies to a run with `start`"),
        ({"runs__1__start_head": "median"}, "start_head must be one of mean, lsq"),
        ({"expected": {"nope": {"fid": [1.0, 2.0]}}}, "no run is named 'nope'"),
        ({"expected": {"base": {"fid": [2.0, 1.0]}}}, "must be \\[lo, hi\\] with lo <= hi"),
        ({"expected": {"base": {"is": [1.0, 2.0]}}}, "must be \\{class_accuracy"),
        ({"expected": {"runs": 1}}, "number of runs the ranges span"),
    ],
)
def test_bad_specs_are_refused_before_any_work(changes, message):
    with pytest.raises(ClusterarError, match=message):
        parse_spec(_with(**changes), "t.toml")


EVERY_TABLE = {
    **BASE,
    "seeds": [0, 1],
    "contrasts": [["iar", "ctf"]],
    "tokenizer": {"preset": "tiny", "steps": 12},
    "train": {"model": "tiny", "epochs": 1, "lr": 1e-3},
    "eval": {"every_epochs": 1.0, "samples": 20, "cfg_scale": 1.5},
    "runs": [
        {"name": "base", "method": "baseline", "sample": {"top_k": 5}},
        {"name": "iar", "method": "iar", "clusters": "b", "train": {"lr": 2e-3}},
        {"name": "ctf", "method": "ctf", "clusters": "k", "refiner": {"restrict_to_cluster": True}},
        {"name": "ctf-conv", "method": "ctf", "clusters": "k", "start": "base", "start_head": "lsq"},
    ],
    "sweeps": [
        {"param": "cfg_scale", "values": [1.0, 2.0]},
        {"param": "top_k2", "values": [4], "runs": ["ctf"]},
    ],
    "claims": [{"run": "iar", "speedup": 2.0}, {"run": "ctf", "speedup": 1.5, "against": "iar", "text": "t"}],
}


@pytest.mark.parametrize(
    "name", ["every-table", "ablations", "claims", "convert", "ctf-variants", "demo", "quick"]
)
def test_check_spec_reads_the_spec_without_changing_it(name):
    spec = parse_spec(EVERY_TABLE, "t.toml") if name == "every-table" else load_spec(name)
    before = copy.deepcopy(spec)
    check_spec(spec, "t.toml")
    assert spec == before
    if name == "every-table":  # parse_spec's one normalisation: a claim's default `against` is spelled out
        assert [c.against for c in spec.claims] == ["base", "iar"]
        spec.claims[0].against = ""  # built by hand: the default stays implicit, check_spec fills nothing in
        check_spec(spec, "t.toml")
        assert spec.claims[0].against == ""


def test_cli_check_and_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndata = "mnist"\n[[runs]]\nname = "a"\nmethod = "diffusion"\n')
    out = tmp_path / "out"
    assert main(["experiment", str(bad), "--out", str(out)]) == 2
    assert "unknown method 'diffusion'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    (tmp_path / "broken.toml").write_text("name = \n")
    assert main(["experiment", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["experiment", "no-such-spec"]) == 2
    assert "shipped specs: ablations, claims, convert, ctf-variants, demo, quick" in capsys.readouterr().err
    for name in "ablations claims convert ctf-variants demo quick".split():  # every shipped spec validates
        assert main(["experiment", name, "--check"]) == 0
        assert "valid" in capsys.readouterr().out


def test_a_spec_saved_with_a_byte_order_mark_is_read(tmp_path, capsys):
    """Notepad and other Windows editors start UTF-8 files with a BOM, which TOML parsers reject as an
    "Invalid statement" at line 1: the spec is read past it."""
    spec = tmp_path / "bom.toml"
    spec.write_bytes(
        b"\xef\xbb\xbf" + (Path(__file__).parents[1] / "docs" / "spec-example.toml").read_bytes()
    )
    assert main(["experiment", str(spec), "--check"]) == 0
    assert "bom.toml: valid" in capsys.readouterr().out


def test_a_folder_named_like_a_shipped_spec_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "claims").mkdir()  # e.g. `--out claims` of an earlier run
    assert load_spec("claims").name == "claims"
    assert main(["experiment", "claims", "--check"]) == 0


def test_documented_spec_example_is_a_valid_spec():
    """The annotated spec of docs/experiment.md is the shipped file docs/spec-example.toml, shown verbatim:
    the file parses and validates, and the page shows exactly the file, so the documentation cannot drift."""
    from pathlib import Path

    from clusterar.experiment import tomllib

    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "spec-example.toml").read_text()
    assert f"```toml\n{text}```" in (docs / "experiment.md").read_text()
    spec = parse_spec(tomllib.loads(text), "docs/spec-example.toml")
    assert [r.method for r in spec.runs] == ["baseline", "iar", "ctf", "iar"]
    assert (
        spec.seeds == [0, 1, 2] and spec.contrasts == [["iar-random", "iar"]] and spec.claims[0].speedup == 2
    )
    assert spec.runs[2].refiner == {"model": "cpu-m"} and spec.sweeps[0].values == [1.0, 1.5, 3.0]


def test_two_seeds_on_a_labelled_colour_folder(tmp_path, monkeypatch, shapes):
    """A user's own labelled folder, scored without downloaded weights (the folder's classifier), every run
    repeated with 2 seeds and evaluated every few steps: the report aggregates the seeds point by point,
    states the rule, checks the claim per seed and adds the tokenizer's ceiling."""
    monkeypatch.setenv("CLUSTERAR_CACHE", str(tmp_path / "cache"))
    folder = shapes.write(tmp_path / "shapes", n_train=16, n_val=4)
    d = {
        "name": "two-seeds",
        "data": f"folder:{folder}",
        "image_size": 32,
        "seeds": [0, 1],
        "device": "cpu",
        "tokenizer": {"preset": "tiny", "steps": 12, "warmup": 2, "restart_every": 6, "batch_size": 16},
        "clusters": {"b": {"method": "balanced", "n": 16}},
        "train": {"model": "tiny", "epochs": 2, "batch_size": 16, "lr": 1e-3, "log_every": 2},
        "eval": {"every_steps": 2, "samples": 12, "batch_size": 12},
        "runs": [{"name": "base", "method": "baseline"}, {"name": "iar", "method": "iar", "clusters": "b"}],
        "claims": [{"run": "iar", "speedup": 2.0, "text": "IAR needs half the epochs"}],
        "sweeps": [{"param": "temperature", "values": [1.0, 0.5], "runs": ["base"]}],
    }
    spec = parse_spec(d, "two-seeds.toml")
    report = run_experiment(spec, tmp_path / "exp", progress=False).read_text()
    data = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert data["seeds"] == [0, 1]
    # 48 train images (one random view of each per epoch), batch 16: 3 steps per epoch, a point every 2
    steps = {n: [c["step"] for c in cs] for n, cs in data["curves"].items()}
    assert steps == {"base": [2, 4, 6], "iar": [2, 4, 6]}
    for name, by_seed in data["curves_per_seed"].items():
        assert sorted(by_seed) == ["0", "1"]
        for i, point in enumerate(data["curves"][name]):
            fids = [by_seed[s][i]["fid"] for s in ("0", "1")]
            assert point["fid_all"] == fids and point["fid"] == pytest.approx(sum(fids) / 2)
            assert (point["fid_min"], point["fid_max"]) == (min(fids), max(fids))
            assert point["fid_std"] == pytest.approx(abs(fids[0] - fids[1]) / math.sqrt(2))
            assert point["n_seeds"] == 2 and 0 <= point["class_accuracy"] <= 1
        # each seed trained its own model and drew its own samples
        finals = [by_seed[s][-1] for s in ("0", "1")]
        assert finals[0]["fid"] != finals[1]["fid"]
        models = [tmp_path / "exp" / "runs" / name / f"seed-{s}" / "model.safetensors" for s in (0, 1)]
        assert models[0].read_bytes() != models[1].read_bytes()
    # the folder's own classifier scored everything; its held-out accuracy travels with every point
    assert all(c["extractor_val_accuracy"] > 0.5 for cs in data["curves"].values() for c in cs)
    assert f"the `folder:{folder}` classifier" in report
    # the report: mean ± std (min..max), the rule, a verdict per metric, the claim per seed, the ceiling
    rows = _table(report)
    assert [r[0] for r in rows] == ["base", "iar"] and all("±" in r[5] for r in rows)
    assert "Rule: with 2 seeds per run" in report and "probability 33%" in report
    assert len(data["verdicts"]) == 2 and all(v["n_seeds"] == 2 for v in data["verdicts"])
    claim = data["claims"][0]
    assert claim["n_seeds"] == 2 and claim["verdict"] in ("holds", "does not hold", "mixed")
    assert f"Claim: IAR needs half the epochs. **{claim['verdict'].capitalize()}**" in report
    assert set(data["ceiling"]) == {"tokenizer", "real"} and "*tokenizer (val reconstructions)*" in report
    assert data["convergence"]["run"] == "base"
    assert (tmp_path / "exp" / "curves.png").is_file()
    # the sweep's second value judged against its first on the same final models, in the report
    judged = data["sweep_verdicts"]["temperature"]
    assert [(v["run"], v["against"], v["metric"]) for v in judged] == [
        ("base at temperature=0.5", "base at temperature=1.0", m) for m in ("fid", "class_accuracy")
    ]
    assert "Each value against the sweep's first (1.0)" in report
    assert all(verdict_text(v) in report for v in judged)


def test_constant_schedule_runs_extend_and_equal_a_straight_run(quick, tmp_path, monkeypatch, capsys):
    """More epochs for a finished experiment on a constant schedule: every run trains on from its checkpoint
    (not from scratch), the evaluations made so far are reused, and the models equal a straight run's."""
    from safetensors.torch import load_file

    monkeypatch.setenv("CLUSTERAR_CACHE", str(quick.parent / "cache"))
    d = {
        "name": "extend",
        "data": "digits",
        "device": "cpu",
        "tokenizer": {"path": str(quick / "tokenizer")},
        "clusters": {"k": {"method": "kmeans", "n": 16}},
        "train": {"model": "tiny", "epochs": 1, "batch_size": 128, "schedule": "constant", "warmup": 2},
        "eval": {"every_epochs": 1.0, "samples": 20, "batch_size": 20},
        "runs": [{"name": "base", "method": "baseline"}, {"name": "ctf", "method": "ctf", "clusters": "k"}],
    }
    run_experiment(parse_spec(d, "extend.toml"), tmp_path / "a", progress=False)
    first = {p: p.read_bytes() for p in (tmp_path / "a").rglob("eval.json")}
    d["train"]["epochs"] = 2
    capsys.readouterr()
    run_experiment(parse_spec(d, "extend.toml"), tmp_path / "a", progress=False)
    log = capsys.readouterr().out
    assert log.count("train: extending") == 3 and "train: training" not in log  # baseline, coarse, refiner
    assert all(p.read_bytes() == b for p, b in first.items())  # epoch-1 evaluations reused as they were
    data = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [c["epoch"] for c in data["curves"]["base"]] == [1.0, 2.0]
    run_experiment(parse_spec(d, "extend.toml"), tmp_path / "b", progress=False)  # straight to 2 epochs
    for model in ("runs/base/model.safetensors", "runs/ctf/coarse/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / model)), load_file(str(tmp_path / "b" / model))
        assert all(torch.equal(a[k], b[k]) for k in a), model
    # a cosine schedule would change under a longer budget: refused, as any other changed setting
    d["train"] |= {"schedule": "cosine", "epochs": 1}
    run_experiment(parse_spec(d, "extend.toml"), tmp_path / "c", progress=False)
    d["train"]["epochs"] = 2
    with pytest.raises(ClusterarError, match="other settings"):
        run_experiment(parse_spec(d, "extend.toml"), tmp_path / "c", progress=False)

"""`clusterar experiment --data folder:PATH`: an experiment sized for a folder the test writes, a report whose
first screen says whether to trust it, and the continue command it prints, run as printed."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clusterar.experiment.plan as plan_module
from clusterar import ClusterarError
from clusterar.cli import main
from clusterar.experiment import render_report
from clusterar.experiment.plan import MIN_EPOCHS, SEEDS, Folder, Rates, plan, predict, read_folder
from clusterar.experiment.spec import SPECS_DIR, parse_spec, tomllib

pytestmark = pytest.mark.usefixtures("one_thread")


def colour_folder(root: Path, per_class: tuple[int, int] = (12, 4), size: int = 32) -> Path:
    """Three classes of images made here (not by or for clusterar's models): a red, green or blue disc at a
    random place on a noisy grey ground; train/ and val/ splits of class folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
                cy, cx = rng.integers(8, size - 8, 2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(5, 9)) ** 2
                img[disc] = 40
                img[disc, c] = 220
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
    return root


def quick_base() -> dict:
    """The minute-sized spec as the footing (the demo's takes minutes per stage)."""
    return tomllib.loads((SPECS_DIR / "quick.toml").read_text())


def test_a_folder_without_held_out_images_is_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "flat" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / name / "x.png")
    with pytest.raises(ClusterarError, match="no train/ and val/ split folders.*a tenth of each class"):
        read_folder(str(tmp_path / "flat"))


def test_the_plan_fits_the_minutes_and_takes_seeds_when_they_fit(tmp_path):
    base, folder = quick_base(), Folder(f"folder:{tmp_path}", train=1000, val=100, classes=10)
    rates = Rates(tokenizer_step=0.3, train_step=0.05, sample=0.01)
    plans = {m: plan(folder, rates, m, base) for m in (1, 10, 30, 120)}
    for minutes, d in plans.items():
        epochs, seeds = d["train"]["epochs"], len(d["seeds"])
        assert epochs % 3 == 0 and epochs >= MIN_EPOCHS and d["eval"]["every_epochs"] == epochs // 3
        assert d["train"]["schedule"] == "constant" and d["data"] == folder.data
        if d["plan"]["fits"]:
            assert predict(folder, rates, base, epochs, seeds, d["eval"]["samples"]) <= 60 * minutes
        parse_spec({k: v for k, v in d.items() if k != "plan"}, "plan")  # a valid spec
    assert not plans[1]["plan"]["fits"] and plans[1]["seeds"] == [0]  # too short: the least useful run
    assert plans[120]["seeds"] == SEEDS and plans[120]["train"]["epochs"] >= plans[30]["train"]["epochs"]
    assert plans[10]["train"]["epochs"] * len(plans[10]["seeds"]) <= plans[30]["train"]["epochs"] * 3


def test_folder_experiment_says_whether_to_trust_it_and_its_continue_command_works(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(plan_module, "base_spec", quick_base)
    data, out = colour_folder(tmp_path / "colours"), tmp_path / "exp"
    assert main(["experiment", "--data", f"folder:{data}", "--out", str(out), "--check"]) == 0
    assert "not written (--check)" in capsys.readouterr().out and not out.exists()  # a check writes nothing
    assert (
        main(
            ["experiment", "--data", f"folder:{data}", "--minutes", "0.1", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    assert "can the comparison be trusted? Not yet: one seed per run" in capsys.readouterr().out
    spec_text = (out / "spec.toml").read_text()
    assert spec_text.startswith("# Planned by `clusterar experiment --data folder:")
    report = (out / "report.md").read_text()
    first_screen = report.split("## Setup")[0]
    assert (
        "## Can this comparison be trusted?" in first_screen
        and "**Not yet**: one seed per run" in first_screen
    )
    for topic in ("**Seeds**", "**Feature extractor**", "**Convergence**", "**Tokenizer ceiling**"):
        assert topic in first_screen
    data_json = json.loads((out / "report.json").read_text())
    epochs = data_json["spec"]["train"]["epochs"]
    assert (
        epochs == MIN_EPOCHS
        and data_json["command"] == f"clusterar experiment {out / 'spec.toml'} --out {out}"
    )

    # the report's advice when the baseline has not converged is the command itself, with more epochs
    unconverged = data_json | {"convergence": data_json["convergence"] | {"converged": False}}
    advice = render_report(unconverged, out).split("## Setup")[0]
    command = f"{data_json['command']} --epochs {2 * epochs}"
    assert f"`{command}`" in advice
    capsys.readouterr()
    assert main([*shlex.split(command)[1:], "--no-progress"]) == 0  # run as printed
    said = capsys.readouterr().out
    assert f"extending baseline model to {2 * epochs:.1f} epochs" in said
    after = json.loads((out / "report.json").read_text())
    assert after["curves"]["baseline"][-1]["epoch"] == 2 * epochs
    assert len(after["curves"]["baseline"]) == 2 * len(data_json["curves"]["baseline"])  # earlier points kept

    # the same --data command again reuses the plan instead of measuring a new one
    assert main(["experiment", "--data", f"folder:{data}", "--out", str(out), "--check"]) == 0
    assert "plan: reusing" in capsys.readouterr().out
    assert (out / "spec.toml").read_text() == spec_text
    # ... and a plan for another folder is refused, the folder left as it is
    other = colour_folder(tmp_path / "other", per_class=(3, 1))
    assert main(["experiment", "--data", f"folder:{other}", "--out", str(out), "--check"]) == 2
    assert "plans an experiment on folder:" in capsys.readouterr().err
    assert (out / "spec.toml").read_text() == spec_text


@pytest.mark.parametrize(
    "argv,words",
    [
        (["experiment"], "give a SPEC (a spec file or shipped name) or --data folder:PATH"),
        (["experiment", "demo", "--data", "folder:x"], "one of the two"),
        (["experiment", "demo", "--minutes", "5"], "--minutes and --inception go with --data"),
        (["experiment", "--data", "folder:{flat}"], "no train/ and val/ split folders"),
    ],
)
def test_experiment_refusals_are_one_line(tmp_path, capsys, argv, words):
    for name in ("a", "b"):
        (tmp_path / "flat" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "flat" / name / "x.png")
    argv = [a.format(flat=tmp_path / "flat") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "runs").exists()

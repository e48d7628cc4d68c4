"""Extreme but finite sampling values: refused where they are checked (SampleSettings, so the CLI, a spec
and the page alike), a draw never ends in an IndexError, and a sampling run that drew no batch never
blocks a corrected rerun (issue 25, item 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterar.cli import main
from clusterar.errors import ClusterarError
from clusterar.experiment import parse_spec
from clusterar.gpt import GPT, gpt_preset
from clusterar.sample import (
    Pipeline,
    SampleSettings,
    draw,
    generate,
    make_labels,
    refine,
    sample_logits,
    sample_to_folder,
)
from clusterar.tokenizer import save_tokenizer
from tests.test_sample import random_gpt, run_info, write_run

pytestmark = pytest.mark.usefixtures("one_thread")

EXTREME = [
    ({"temperature": 1e-300}, "temperature must be >= 1e-06"),
    ({"temperature": 1e-7}, "temperature must be >= 1e-06"),
    ({"temperature2": 1e-300}, r"temperature \(stage 2\) must be >= 1e-06"),
    ({"cfg_scale": 1e300}, r"cfg_scale must lie in \[-10000, 10000\]"),
    ({"cfg_scale": -1e5}, r"cfg_scale must lie in \[-10000, 10000\]"),
    ({"cfg_scale2": 1e300}, r"cfg_scale2 must lie in \[-10000, 10000\]"),
]


@pytest.fixture(scope="module")
def run(make_tokenizer, tmp_path_factory):
    """A baseline run folder (random tiny model on a random tiny tokenizer), written as test_sample's are."""
    d = tmp_path_factory.mktemp("run")
    tok = make_tokenizer(0)
    save_tokenizer(tok, d / "tokenizer.safetensors")
    info = run_info({"tok": tok, "tok_path": d / "tokenizer.safetensors", "dir": d}, "baseline")
    return write_run(d / "baseline", random_gpt(1), info)


@pytest.mark.parametrize("values, message", EXTREME)
def test_sample_settings_refuse_values_that_overflow_float32(values, message):
    for method in ("baseline", "ctf"):
        with pytest.raises(ClusterarError, match=message):
            SampleSettings.for_method(method, **values)
    for ok in ({"temperature": 1e-6, "cfg_scale": 1e4}, {"cfg_scale": -1e4, "temperature2": 1e-6}):
        SampleSettings.for_method("ctf", **ok)  # the bounds themselves are accepted


@pytest.mark.parametrize("values, message", EXTREME[:2] + EXTREME[3:5])
def test_a_spec_refuses_them_naming_the_run(values, message):
    d = {
        "name": "t",
        "data": "digits",
        "tokenizer": {"preset": "tiny"},
        "eval": values,
        "runs": [{"name": "base", "method": "baseline"}],
    }
    with pytest.raises(ClusterarError, match=f"run 'base': {message}"):
        parse_spec(d, "t.toml")


@pytest.mark.parametrize(
    "flag, value", [("--temperature", "1e-300"), ("--cfg-scale", "1e300"), ("--temperature", "1e-7")]
)
def test_cli_sample_refuses_them_in_one_line_before_writing(tmp_path, capsys, run, flag, value):
    out = tmp_path / "s"
    code = main(["sample", str(run), "--n", "2", "--out", str(out), "--no-progress", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "float32" in err
    assert not (out / "parts").exists()
    # the corrected command then runs
    assert main(["sample", str(run), "--n", "2", "--out", str(out), "--no-progress", "--no-images"]) == 0


def test_a_draw_without_a_distribution_is_a_clear_error_never_an_index_error():
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 1.0]])
    with pytest.raises(ClusterarError, match="NaN or inf"):
        draw(probs)
    invalid = torch.zeros((), dtype=torch.bool)
    ids = draw(probs, invalid=invalid)
    assert bool(invalid) and ids.tolist()[0] in (0, 1) and 0 <= ids.tolist()[1] < 2  # in range, flagged
    logits = torch.tensor([[1.0, float("inf"), 0.0]])
    with pytest.raises(ClusterarError, match="temperature 1.0, top-k 0, top-p 1.0"):
        sample_logits(logits)
    # the same draws as before for rows with a distribution (the flag changes no id)
    x = torch.randn(64, 512)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    flag = torch.zeros((), dtype=torch.bool)
    a = sample_logits(x, temperature=0.7, top_k=20, generator=gen_a)
    b = sample_logits(x, temperature=0.7, top_k=20, generator=gen_b, invalid=flag)
    assert torch.equal(a, b) and not bool(flag)


def test_generate_and_refine_with_non_finite_logits_name_the_settings():
    model = random_gpt(1)
    labels = torch.tensor([0, 1])
    # values that SampleSettings refuses, passed to generate directly: an error, not an IndexError
    with pytest.raises(ClusterarError, match="cfg scale 1e\\+300"):
        generate(model, labels, cfg_scale=1e300)
    with torch.no_grad():
        model.output.weight.fill_(float("nan"))  # a damaged model
    with pytest.raises(ClusterarError, match=r"NaN or infinite logits with cfg scale 2.0, temperature 1.0"):
        generate(model, labels, cfg_scale=2.0)
    refiner = GPT(gpt_preset("tiny", causal=False)).eval()
    with torch.no_grad():
        refiner.output.weight.fill_(float("nan"))
    coarse = torch.zeros(2, refiner.config.seq_len, dtype=torch.long)
    with pytest.raises(ClusterarError, match="stage 2 cfg scale 1.0"):
        refine(refiner, coarse, labels)


def test_a_run_that_drew_no_batch_gives_way_to_a_corrected_rerun(tmp_path, run, capsys):
    pipe = Pipeline.load(run)
    labels, _ = make_labels(6, 10, per_class=True)
    real = pipe.sample
    calls = {"n": 0}

    def fail_at(n: int):
        def sample(*a, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                raise RuntimeError("failed")
            return real(*a, **kw)

        return sample

    # fails before its first batch: a rerun with other settings replaces it, saying so on stderr
    out = tmp_path / "s"
    pipe.sample = fail_at(1)
    with pytest.raises(RuntimeError):
        sample_to_folder(
            pipe, labels, out, settings=pipe.settings(temperature=0.5), batch_size=4, progress=False
        )
    assert (out / "parts" / "run.json").exists() and not list((out / "parts").glob("batch-*.npy"))
    pipe.sample = real
    capsys.readouterr()
    done = sample_to_folder(pipe, labels, out, settings=pipe.settings(), batch_size=4, progress=False)
    assert done["images"] == 6 and "starting samples over" in capsys.readouterr().err
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 32, 32, 3)

    # fails after a finished batch: other settings are still refused, the same settings resume
    out = tmp_path / "t"
    calls["n"] = 0
    pipe.sample = fail_at(2)
    with pytest.raises(RuntimeError):
        sample_to_folder(
            pipe, labels, out, settings=pipe.settings(temperature=0.5), batch_size=4, progress=False
        )
    pipe.sample = real
    assert len(list((out / "parts").glob("batch-*.npy"))) == 1
    with pytest.raises(ClusterarError, match="other settings"):
        sample_to_folder(pipe, labels, out, settings=pipe.settings(), batch_size=4, progress=False)
    again = sample_to_folder(
        pipe, labels, out, settings=pipe.settings(temperature=0.5), batch_size=4, progress=False
    )
    assert again["batches_reused"] == 1 and again["batches_generated"] == 1
    # a complete folder with other settings: refused as before
    with pytest.raises(ClusterarError, match="other settings"):
        sample_to_folder(pipe, labels, out, settings=pipe.settings(), batch_size=4, progress=False)
    assert math.isfinite(again["seconds"])

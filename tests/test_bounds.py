"""Sizes that cannot fit are refused when the command line is parsed, saying what would fit (issue 25,
item 7): one line naming the flag, exit status 2, before any file is read."""

from __future__ import annotations

import re

import pytest

from tests.test_cli_input import assert_one_line, run_cli

CASES = [
    (["train", "--tokens", "t", "--tokenizer", "k", "--epochs", "1e30"], "--epochs", "at most 1,000,000"),
    (
        ["train", "--tokens", "t", "--tokenizer", "k", "--steps", "10000000000"],
        "--steps",
        "at most 1,000,000,000",
    ),
    (["sample", "run", "--n", "1000000000000", "--out", "o"], "--num-samples/--n", "at most 10,000,000"),
    (["encode", "--tokenizer", "k", "--image-size", "100000", "--out", "o"], "--image-size", "at most 4,096"),
    (
        ["tokenizer", "train", "--codebook-size", "1000000000", "--out", "o"],
        "--codebook-size",
        "at most 1,048,576",
    ),
    (
        ["train", "--tokens", "t", "--tokenizer", "k", "--epochs", "1", "--threads", "10**12"],
        "--threads",
        "whole",
    ),
    (
        ["train", "--tokens", "t", "--tokenizer", "k", "--epochs", "1", "--threads", "1000000"],
        "--threads",
        "at most 1,024",
    ),
    (["encode", "--tokenizer", "k", "--num-workers", "100000", "--out", "o"], "--num-workers", "at most 256"),
]


@pytest.mark.parametrize("argv,flag,words", CASES, ids=[c[1] + "-" + c[0][-1] for c in CASES])
def test_sizes_that_cannot_fit_are_refused_when_parsed(capsys, tmp_path, monkeypatch, argv, flag, words):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, argv)
    assert code == 2
    assert_one_line(err, flag, words)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_bounds_admit_what_the_field_uses(capsys):
    """The protocol's 50,000 samples, LlamaGen's 16,384 codes and 512 px images parse."""
    from clusterar.cli import build_parser

    args = build_parser().parse_args(["sample", "run", "--n", "50000", "--out", "o"])
    assert args.n == 50000
    args = build_parser().parse_args(["tokenizer", "train", "--codebook-size", "16384", "--out", "o"])
    assert args.codebook_size == 16384
    args = build_parser().parse_args(["encode", "--tokenizer", "k", "--image-size", "512", "--out", "o"])
    assert args.image_size == 512


def test_the_same_bounds_hold_in_a_spec_and_in_python(tmp_path):
    """A spec (checked by --check, before any work) and library callers meet the same limits
    (`clusterar.limits`), worded for their keys and arguments."""
    from clusterar import ClusterarError
    from clusterar.experiment import parse_spec
    from clusterar.sample import make_labels
    from clusterar.train import TrainConfig
    from clusterar.train.tokenizer import TokenizerTrainConfig

    base = {
        "name": "t",
        "data": "digits",
        "tokenizer": {"preset": "tiny"},
        "train": {"model": "tiny", "epochs": 1},
        "runs": [{"name": "base", "method": "baseline"}],
    }
    for change, words in (
        ({"eval": {"samples": 10**12}}, "[eval]: samples takes at most 10,000,000 images"),
        ({"train": {"model": "tiny", "epochs": 1e30}}, "epochs takes at most 1,000,000 epochs"),
        ({"image_size": 100_000}, "image_size takes at most 4,096 pixels"),
    ):
        with pytest.raises(ClusterarError, match=re.escape(words)):
            parse_spec({**base, **change}, "s.toml")
    with pytest.raises(ClusterarError, match="--n takes at most 10,000,000 images"):
        make_labels(10**12, 10)
    with pytest.raises(ClusterarError, match="--steps takes at most 1,000,000,000 steps"):
        TrainConfig(tokens="t", tokenizer="k", steps=10**10).check()
    with pytest.raises(ClusterarError, match="--codebook-size takes at most 1,048,576 codes"):
        TokenizerTrainConfig(data="digits", codebook_size=10**9).check()
    assert not list(tmp_path.iterdir())

"""Spec names that become paths are plain names: `--check` refuses the others naming the key, and the
runner refuses any path it builds from a name outside --out (issue 25, item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterar.cli import main
from clusterar.errors import ClusterarError
from clusterar.experiment.runner import inside, run_dir, stage_clusters
from clusterar.experiment.spec import ClustersSpec, ExperimentSpec, RunSpec, parse_spec
from clusterar.tokenizer import save_tokenizer

SPEC = """name = "{spec}"
data = "digits"
[tokenizer]
preset = "tiny"
[clusters."{clusters}"]
method = "balanced"
n = 16
[train]
model = "tiny"
epochs = 1
[[runs]]
name = "base"
method = "baseline"
[[runs]]
name = "{run}"
method = "iar"
clusters = "{clusters}"
"""

BAD_NAMES = ["/tmp/abs", "../x", "../../x", "", ".", "..", "a/b", "a\\\\b", "-x", "x" * 65, "a b"]


def _check(tmp_path: Path, capsys, spec: str = "t", run: str = "iar", clusters: str = "b") -> tuple[int, str]:
    path = tmp_path / "s.toml"
    path.write_text(SPEC.format(spec=spec, run=run, clusters=clusters))
    code = main(["experiment", str(path), "--check", "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_that_is_not_a_plain_name_is_refused_by_check(tmp_path, capsys, name):
    code, err = _check(tmp_path, capsys, run=name)
    assert code == 2, err
    assert "[[runs]] #2: name = " in err and "not a plain name" in err and "letters, digits" in err
    assert err.count("\n") == 1  # one line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", ".", ".."])
def test_a_clusters_table_name_that_is_not_a_plain_name_is_refused_by_check(tmp_path, capsys, name):
    code, err = _check(tmp_path, capsys, clusters=name)
    assert code == 2, err
    assert f"[clusters.NAME]: NAME = {name!r} is not a plain name" in err


@pytest.mark.parametrize("name", ["../../x", "", "a/b"])
def test_a_spec_name_that_is_not_a_plain_name_is_refused_by_check(tmp_path, capsys, name):
    code, err = _check(tmp_path, capsys, spec=name)
    assert code == 2, err
    assert f"name = {name!r}" in err and "not a plain name" in err


@pytest.mark.parametrize("name", ["iar", "IAR_2", "ctf-32.v1", "x" * 64, "0"])
def test_plain_names_are_accepted(tmp_path, capsys, name):
    code, err = _check(tmp_path, capsys, spec=name, run=name, clusters=name)
    assert code == 0, err


def test_parse_spec_names_the_key():
    d = {
        "name": "t",
        "data": "digits",
        "tokenizer": {"preset": "tiny"},
        "runs": [{"name": "/etc/x", "method": "baseline"}],
    }
    with pytest.raises(ClusterarError, match=r"t.toml \[\[runs\]\] #1: name = '/etc/x' is not a plain name"):
        parse_spec(d, "t.toml")


def test_inside_refuses_a_path_built_outside(tmp_path):
    out = tmp_path / "out"
    assert inside(out, out / "runs" / "a") == out / "runs" / "a"
    for bad in (out / ".." / "x", Path("/etc/x"), out / "runs" / ".." / ".." / "y", out):
        with pytest.raises(ClusterarError, match="lies outside"):
            inside(out, bad)


def test_the_runner_refuses_names_that_escape_out(tmp_path, make_tokenizer):
    """A spec built by hand (never checked) still writes nothing outside --out."""
    out = tmp_path / "out"
    spec = ExperimentSpec(name="t", runs=[RunSpec("../../x", "baseline")])
    assert run_dir(spec, out, "a", 0) == out / "runs" / "a"
    for name in ("../../x", "/abs", "..", "../clusters"):
        with pytest.raises(ClusterarError, match="lies outside"):
            run_dir(spec, out, name, 0)
    spec.seeds = [0, 1]
    with pytest.raises(ClusterarError, match="lies outside"):
        run_dir(spec, out, "../../x", 1)
    tok = tmp_path / "tokenizer.safetensors"
    save_tokenizer(make_tokenizer(0), tok)
    spec.clusters = {"../../x": ClustersSpec("balanced", 16)}
    with pytest.raises(ClusterarError, match="lies outside"):
        stage_clusters(spec, tok, out)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()

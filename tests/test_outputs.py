"""Where commands write (issue 25): an output never replaces an input (the same file, through a symlink or a
hard link, or the file an input folder is read for); an --out of the wrong kind (a file where a folder is
written, a folder where a file is) is one line before any work; SIGTERM is handled as Ctrl-C.

The refusals come before any input is read, so most inputs here are placeholder files: what is checked is
the one-line message and that every file is left as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterar.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def files(tmp_path) -> Path:
    """Placeholder inputs: T (tokenizer), C (clusters), S.npz (samples), a CTF run folder with its model,
    a token file in a tokens folder, a spec, a data folder."""
    for name in ("T.safetensors", "C.safetensors", "S.npz", "spec.toml", "M.safetensors"):
        (tmp_path / name).write_bytes(b"input " + name.encode())
    for run in ("coarse", "refiner"):
        (tmp_path / "run" / run).mkdir(parents=True)
        (tmp_path / "run" / run / "model.safetensors").write_bytes(b"model " + run.encode())
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "train.safetensors").write_bytes(b"tokens")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "x.png").write_bytes(b"png")
    return tmp_path


# ----------------------------------------------------------------------------- inputs are never outputs

SAME = [
    ("cluster fit T", "fit --tokenizer T.safetensors --method kmeans --clusters 8 --out T.safetensors"),
    ("cluster short form", "--tokenizer T.safetensors --method kmeans --clusters 8 --out T.safetensors"),
    ("cluster export", "export C.safetensors --out C.safetensors"),
    ("cluster rearrange", "rearrange C.safetensors --tokenizer T.safetensors --out T.safetensors"),
]


@pytest.mark.parametrize(("case", "args"), SAME, ids=[c for c, _ in SAME])
def test_an_output_that_is_an_input_is_refused(capsys, files, monkeypatch, case, args):
    monkeypatch.chdir(files)
    before = snapshot(files)
    code, err = run_cli(capsys, ["cluster", *args.split()])
    assert code == 2
    assert_one_line(err, "--out", "would replace", "(the same file)", "choose another --out")
    assert snapshot(files) == before


def test_a_real_tokenizer_is_not_replaced_by_clusters(capsys, tmp_path, make_tokenizer):
    """The issue's case: on a real tokenizer, `cluster fit ... --out` the tokenizer once exited 0 having
    replaced it with a clusters file."""
    from clusterar.tokenizer import save_tokenizer

    tok = tmp_path / "tokenizer.safetensors"
    save_tokenizer(make_tokenizer(0), tok)
    before = tok.read_bytes()
    argv = ["cluster", "fit", "--tokenizer", tok, "--method", "kmeans", "--clusters", "8", "--out", tok]
    code, err = run_cli(capsys, argv)
    assert code == 2
    assert_one_line(err, f"--out {tok} would replace --tokenizer {tok} (the same file)")
    assert tok.read_bytes() == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_the_same_file_through_a_link_is_the_same_file(capsys, files, link):
    out = files / "link.safetensors"
    (os.symlink if link == "symlink" else os.link)(files / "T.safetensors", out)
    before = snapshot(files)
    argv = ["cluster", "fit", "--tokenizer", files / "T.safetensors", "--method", "kmeans", "--clusters", "8"]
    code, err = run_cli(capsys, [*argv, "--out", out])
    assert code == 2
    assert_one_line(err, f"--out {out} would replace --tokenizer {files / 'T.safetensors'} (the same file)")
    assert snapshot(files) == before


def test_evaluate_does_not_write_its_metrics_over_the_samples(capsys, files):
    before = snapshot(files)
    code, err = run_cli(capsys, ["evaluate", files / "S.npz", "--out", files / "S.npz"])
    assert code == 2
    assert_one_line(err, f"--out {files / 'S.npz'} would replace SAMPLES {files / 'S.npz'} (the same file)")
    assert snapshot(files) == before


def test_a_pipeline_is_not_written_over_the_model_of_a_run_folder_it_reads(capsys, files):
    run = files / "run"
    before = snapshot(files)
    argv = ["pipeline", "ctf", "--coarse", run / "coarse", "--refiner", run / "refiner"]
    code, err = run_cli(capsys, [*argv, "--out", run / "coarse" / "model.safetensors"])
    assert code == 2
    assert_one_line(err, f"would replace --coarse {run / 'coarse'} (the model.safetensors it reads)")
    assert snapshot(files) == before


def test_an_output_folder_that_is_an_input_folder_is_refused(capsys, files):
    code, err = run_cli(capsys, ["sample", files / "run" / "coarse", "--out", files / "run" / "coarse"])
    assert code == 2
    assert_one_line(err, "would replace SOURCE", "(the same folder)")
    code, err = run_cli(capsys, ["encode", "--tokenizer", files / "T.safetensors", "--data", f"folder:{files}/data", "--out", files / "data"])  # fmt: skip
    assert code == 2
    assert_one_line(err, f"--out {files / 'data'} would replace --data {files / 'data'} (the same folder)")


ALLOWED = [
    # the folder of an input file, which the command does not write over
    ["train", "--tokens", "tokens/train.safetensors", "--tokenizer", "T.safetensors", "--out", "tokens"],
    # a pipeline beside the runs, and a clusters file beside its tokenizer in the same folder
    ["pipeline", "ctf", "--coarse", "run/coarse", "--refiner", "run/refiner", "--out", "run/pipeline.json"],
    [
        "cluster",
        "fit",
        "--tokenizer",
        "T.safetensors",
        "--method",
        "kmeans",
        "--clusters",
        "8",
        "--out",
        "C2.safetensors",
    ],  # fmt: skip
    # --clusters of cluster fit is a count, not a file
    ["cluster", "fit", "--tokenizer", "T.safetensors", "--method", "kmeans", "--clusters", "8", "--out", "8"],
    # names that are not paths (a dataset, a shipped spec) are not compared
    ["encode", "--tokenizer", "T.safetensors", "--data", "mnist", "--out", "mnist"],
    ["experiment", "quick", "--out", "quick"],
]


@pytest.mark.parametrize("argv", ALLOWED, ids=[" ".join(a[:2]) + f" {i}" for i, a in enumerate(ALLOWED)])
def test_outputs_beside_inputs_are_allowed(files, monkeypatch, argv):
    from clusterar.cli.paths import check_paths

    monkeypatch.chdir(files)
    (files / "8").write_bytes(b"")
    (files / "mnist").mkdir()
    parser = build_parser(argv[0])
    check_paths(parser, parser.parse_args(argv))


# ----------------------------------------------------------------------------- --out of the wrong kind

FOLDER_OUTPUTS = [
    ["train", "--tokens", "tokens/train.safetensors", "--tokenizer", "T.safetensors"],
    ["encode", "--tokenizer", "T.safetensors"],
    ["tokenizer", "train"],
    ["tokenizer", "eval", "T.safetensors"],
    ["experiment", "spec.toml"],
    ["cluster", "inspect", "C.safetensors", "--tokenizer", "T.safetensors"],
    ["sample", "run/coarse"],
    ["convert", "M.safetensors", "--method", "iar", "--clusters", "C.safetensors"],
]
FILE_OUTPUTS = [
    ["cluster", "fit", "--tokenizer", "T.safetensors", "--method", "kmeans", "--clusters", "8"],
    ["cluster", "export", "C.safetensors"],
    ["evaluate", "S.npz"],
    ["pipeline", "ctf", "--coarse", "run/coarse", "--refiner", "run/refiner"],
]


@pytest.mark.parametrize("argv", FOLDER_OUTPUTS, ids=[" ".join(a[:2]) for a in FOLDER_OUTPUTS])
def test_a_file_where_a_folder_is_written(capsys, files, monkeypatch, argv):
    monkeypatch.chdir(files)
    (files / "existing.txt").write_text("mine")
    before = snapshot(files)
    code, err = run_cli(capsys, [*argv, "--out", "existing.txt"])
    assert code == 2
    assert err.strip() == (
        "error: --out existing.txt is a file; this command writes a folder there: pass a folder path"
    )
    assert snapshot(files) == before


@pytest.mark.parametrize("argv", FILE_OUTPUTS, ids=[" ".join(a[:2]) for a in FILE_OUTPUTS])
def test_a_folder_where_a_file_is_written(capsys, files, monkeypatch, argv):
    monkeypatch.chdir(files)
    (files / "existing").mkdir()
    before = snapshot(files)
    code, err = run_cli(capsys, [*argv, "--out", "existing"])
    assert code == 2
    assert (
        err.strip() == "error: --out existing is a folder; this command writes a file there: pass a file path"
    )
    assert snapshot(files) == before


def test_a_file_where_the_cache_folder_goes(capsys, files, monkeypatch):
    monkeypatch.chdir(files)
    code, err = run_cli(capsys, ["evaluate", "S.npz", "--cache-dir", "S.npz"])
    assert code == 2
    assert_one_line(err, "--cache-dir S.npz is a file; this command writes a folder there")


# ----------------------------------------------------------------------------- SIGTERM


@pytest.fixture
def tiny_run_inputs(tmp_path, make_tokenizer) -> tuple[Path, Path]:
    from clusterar.tokenizer import save_tokenizer
    from clusterar.tokens import encode_dataset

    tok = make_tokenizer(0)
    save_tokenizer(tok, tmp_path / "tokenizer.safetensors")
    tokens = tmp_path / "tokens" / "val.safetensors"
    encode_dataset(tok, "digits", "val", tokens, image_size=32, views="none", progress=False)
    return tmp_path / "tokenizer.safetensors", tokens


STEPS = 60
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def _sigterm_after_two_logged_steps(argv: list, log: Path) -> str:
    """Start `argv`, send SIGTERM once its log holds two step records; return its stderr (exit 143)."""
    proc = subprocess.Popen([str(a) for a in argv], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and log.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); finished checkpoints are kept: run the same command with --resume" in err
    assert "Traceback" not in err
    return err


def _logged_steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]


def test_sigterm_writes_the_checkpoint_of_the_step_reached(tmp_path, tiny_run_inputs):
    """SIGTERM (Slurm, Kubernetes) ends `clusterar train` as Ctrl-C does, but first writes the checkpoint
    of the step it reached although the next one was due only at --ckpt-every 1000: exit status 143, the
    resume command printed; --resume continues from that step and logs each step exactly once."""
    from clusterar.fileio import read_meta

    tokenizer, tokens = tiny_run_inputs
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "clusterar", "train", "--tokens", tokens, "--tokenizer", tokenizer]
    argv += ["--model", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--ckpt-every", "1000"]
    argv += ["--log-every", "1", "--device", "cpu", "--threads", "1", "--no-progress", "--out", out]
    err = _sigterm_after_two_logged_steps(argv, out / "log.jsonl")
    steps = _logged_steps(out / "log.jsonl")
    assert 2 <= len(steps) < STEPS
    assert f"checkpoint written at step {steps[-1]} of {STEPS}" in err
    assert read_meta(out / "checkpoint.safetensors")["step"] == steps[-1]

    done = subprocess.run([*map(str, argv), "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"at step {steps[-1]} of {STEPS}" in done.stderr
    assert _logged_steps(out / "log.jsonl") == list(range(1, STEPS + 1))  # nothing lost, nothing repeated


def test_sigterm_in_tokenizer_training_writes_its_checkpoint(tmp_path):
    """The same for `clusterar tokenizer train`: the checkpoint of the step reached, not of --ckpt-every."""
    from clusterar.fileio import read_meta

    out = tmp_path / "tok"
    argv = [sys.executable, "-m", "clusterar", "tokenizer", "train", "--data", "digits", "--preset", "tiny"]
    argv += ["--image-size", "16", "--codebook-size", "64", "--steps", "400", "--batch-size", "8"]
    argv += ["--ckpt-every", "1000", "--eval-every", "1000", "--log-every", "1", "--device", "cpu"]
    argv += ["--threads", "1", "--no-progress", "--out", out]
    err = _sigterm_after_two_logged_steps(argv, out / "log.jsonl")
    steps = _logged_steps(out / "log.jsonl")
    assert f"checkpoint written at step {steps[-1]} of 400" in err
    assert read_meta(out / "checkpoint.safetensors")["step"] == steps[-1]


def test_sigterm_is_restored_after_main(capsys):
    before = signal.getsignal(signal.SIGTERM)
    run_cli(capsys, ["info", "/nonexistent"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_output_name_longer_than_the_file_system_allows_is_one_line(capsys, files):
    out = files / ("a" * 300) / "x"
    code, err = run_cli(capsys, ["train", "--tokens", files / "M.safetensors", "--tokenizer", files / "T.safetensors", "--out", out])  # fmt: skip
    assert code == 2
    assert_one_line(err, f"--out {out}: File name too long; choose another --out")


def test_a_reader_that_goes_away_stops_the_command_without_a_traceback():
    """`clusterar ... | head`: stdout's reader closed before the command wrote. Exit status 141 (128 +
    SIGPIPE, as the shell reports it) and one line on stderr, not a BrokenPipeError traceback."""
    argv = [sys.executable, "-m", "clusterar", "experiment", "quick", "--check"]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader goes away before the command prints its line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141, err
    assert err == "output closed (broken pipe); stopped: run the same command again to continue\n"


LONG_INPUTS = [
    ["info", "{L}/x.safetensors"],
    ["train", "--tokens", "{L}/x.safetensors", "--tokenizer", "T", "--steps", "1", "--out", "o"],
    ["sample", "{L}", "--out", "o"],
    ["encode", "--tokenizer", "{L}", "--data", "digits", "--out", "o"],
    ["evaluate", "{L}.npz", "--ref", "digits:val"],
    ["experiment", "{L}.toml", "--check"],
    [
        "cluster",
        "fit",
        "--tokenizer",
        "{L}",
        "--method",
        "kmeans",
        "--clusters",
        "4",
        "--out",
        "c.safetensors",
    ],
]


@pytest.mark.parametrize("argv", LONG_INPUTS, ids=[a[0] for a in LONG_INPUTS])
def test_an_input_name_longer_than_the_file_system_allows_is_one_line(capsys, tmp_path, monkeypatch, argv):
    """A path with a 300-character folder name, given to be read: one line naming it, not chained
    tracebacks from deep inside."""
    monkeypatch.chdir(tmp_path)
    long = "a" * 300
    code, err = run_cli(capsys, [a.replace("{L}", long) for a in argv])
    assert code == 2
    assert_one_line(
        err, "File name too long (a file or folder name may have at most 255 bytes); check the path"
    )
    assert long in err
    assert list(tmp_path.iterdir()) == []  # nothing written

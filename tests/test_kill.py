"""Kill anywhere, lose nothing: every long command, SIGKILLed and run again, ends with the files of a run
that was never interrupted.

Each test runs the real command in a subprocess (`python -m clusterar ...`, one thread) on a tiny config,
kills it with SIGKILL at named points (`CLUSTERAR_KILL_AT`, see `clusterar.killpoints.kill_point`: after a
step, inside an atomic write between the temporary file and the rename, after a batch, between stages)
or after a seeded random delay, runs the same command again (with `--resume` where the command needs
it) until it finishes, and checks:

- after every kill, every file in the output tree is complete and readable, or has a temporary name
  (`.NAME.tmp-HOST-PID`) or a partial one (`*.partial.*`, a sample folder's `parts/all.npy`);
- at the end, no temporary or partial file is left, and the tree holds the same files as the
  uninterrupted run: tensors equal, JSON and JSON lines equal once the wall-time fields are dropped, PNGs
  equal pixel for pixel, so every `log.jsonl` has each step exactly once.

The uninterrupted runs are the references, made once per module; each killed chain works in a folder of
its own with the same relative paths, so absolute paths in the files differ only by that folder. The
tests marked `slow` (many random kills per command) run with `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clusterar.fileio import atomic_path, read_meta, read_safetensors_header, remove_stale_temps

# Fields that measure time or count one session's work: they may differ between an interrupted and an
# uninterrupted run. Everything else must be equal.
WALL_FIELDS = {
    "elapsed",
    "elapsed_s",
    "img_per_s",
    "tokens_per_s",
    "train_seconds",
    "train_seconds_this_session",
    "seconds",
    "images_per_s",
    "images_per_s_after_first_batch",
    "batches_generated",
    "batches_reused",
    "date",
    "machine",
    "timings",
    "all",  # speed.json: the images/s of every round
}
KILLED = -signal.SIGKILL  # the return code of a process that SIGKILL ended


# ----------------------------------------------------------------------------- running a command


@dataclass
class Reference:
    """One command's uninterrupted run: how to run the command again, and how long its work took."""

    args: list[str]  # after `python -m clusterar` (after `clusterar train` under torchrun)
    root: Path  # the working folder of the reference run
    out: str  # the command's output folder, relative to the working folder
    marker: str | None = None  # a file each session writes as its work starts (relative), if any
    resume: bool = False  # reruns pass --resume
    cache: Path | None = None  # $CLUSTERAR_CACHE
    launcher: Callable[[list[str]], list[str]] | None = None  # torchrun's command line
    work_s: float = 0.0  # seconds from the marker (else the start) to the end

    def command(self, rerun: bool) -> list[str]:
        args = [*self.args, "--resume"] if rerun and self.resume else self.args
        return self.launcher(args) if self.launcher else [sys.executable, "-m", "clusterar", *args]


def _env(kill_at: str | None, cache: Path | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CLUSTERAR_KILL_AT", None)
    if kill_at is not None:
        env["CLUSTERAR_KILL_AT"] = kill_at
    if cache is not None:
        env["CLUSTERAR_CACHE"] = str(cache)
    return env


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the process, its process group and everything it started, as a scheduler ends a job."""
    below = _descendants(proc.pid)
    for kill, pid in ((os.killpg, proc.pid), *((os.kill, p) for p in below)):
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    proc.wait()


def launch(
    ref: Reference, cwd: Path, rerun: bool, kill_at: str | None = None, delay: float | None = None
) -> tuple[int, float, str]:
    """Run the reference's command in `cwd`, in a process group of its own. With `delay`, SIGKILL the
    whole job `delay` seconds after this session wrote its marker file (after the start without one).
    Return (return code, seconds from the marker to the end, stderr)."""
    t0, deadline = time.time(), time.monotonic() + 600
    cwd.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            ref.command(rerun),
            cwd=cwd,
            env=_env(kill_at, ref.cache),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            marker = cwd / ref.marker if ref.marker else None
            while marker is not None and proc.poll() is None and time.monotonic() < deadline:
                if marker.exists() and marker.stat().st_mtime >= t0:
                    break
                time.sleep(0.01)
            t_mark = time.perf_counter()
            try:
                proc.wait(timeout=delay if delay is not None else max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_job(proc)
        finally:
            if proc.poll() is None:
                _kill_job(proc)
        seconds = time.perf_counter() - t_mark
        err.seek(0)
        return proc.returncode, seconds, err.read()


def reference(ref: Reference) -> Reference:
    """Make the uninterrupted run and time its work."""
    ref.root.mkdir(parents=True, exist_ok=True)
    rc, ref.work_s, err = launch(ref, ref.root, rerun=False)
    assert rc == 0, f"{ref.args[:2]} failed:\n{err[-4000:]}"
    return ref


def finishes(ref: Reference, cwd: Path) -> None:
    rc, _, err = launch(ref, cwd, rerun=True)
    assert rc == 0, f"{ref.args[:2]} failed when run again:\n{err[-4000:]}"


def killed_at(ref: Reference, cwd: Path, point: str, first: bool = False) -> None:
    """Run until the kill point `point` (NAME:N[@RANK]) ends the command, then check its output folder."""
    rc, _, err = launch(ref, cwd, rerun=not first, kill_at=point)
    expected = "a non-zero status" if ref.launcher else "SIGKILL"
    assert (rc != 0) if ref.launcher else (rc == KILLED), (
        f"{point}: {expected} expected, got {rc}:\n{err[-4000:]}"
    )
    assert_only_complete_files(cwd / ref.out)


def kill_chain(ref: Reference, cwd: Path, points: list[str]) -> None:
    """Kill at each point in turn, the first on the command as first given, then finish and compare."""
    for i, point in enumerate(points):
        killed_at(ref, cwd, point, first=i == 0)
    finishes(ref, cwd)
    assert_same_tree(ref, cwd)


def random_kills(ref: Reference, cwd: Path, kills: int, seed: int) -> None:
    """SIGKILL the job `kills` times, each after a seeded random delay within the reference's working
    time, wherever it is (a step, a write, an evaluation...), running the command again after each kill;
    then finish and compare. A run that finishes before its kill (its remaining work was shorter than
    the delay) is deleted and the chain starts over, so that every kill counted hit a run at work."""
    rng = random.Random(seed)
    out = cwd / ref.out
    landed, history = 0, []  # (delay, return code, files of the output folder) for the failure message
    while landed < kills:
        assert len(history) < 4 * kills, f"the runs kept finishing before their kill: {history}"
        delay = rng.uniform(0.0, 1.0) * ref.work_s
        rc, _, err = launch(ref, cwd, rerun=out.exists(), delay=delay)
        history.append((round(delay, 2), rc, [str(p.relative_to(out)) for p in files_of(out)]))
        assert rc in (0, KILLED), f"rc {rc}:\n{err[-4000:]}"
        assert_only_complete_files(out)
        if rc == 0:
            shutil.rmtree(out)
        else:
            landed += 1
    finishes(ref, cwd)
    try:
        assert_same_tree(ref, cwd)
    except AssertionError as e:
        raise AssertionError(f"{e}\nafter the kills (delay s, return code, files): {history}") from None


# ----------------------------------------------------------------------------- the checks


def is_temporary(path: Path) -> bool:
    """An atomic write in progress (fileio.atomic_path) or an encoding's / a sample folder's partial state."""
    name = path.name
    return (
        (name.startswith(".") and ".tmp-" in name)
        or ".partial." in name
        or (path.parent.name == "parts" and name == "all.npy")
    )


def assert_complete(path: Path) -> None:
    """The file at a final name is whole: it parses completely as what its suffix says."""
    suffix = path.suffix
    if suffix == ".safetensors":
        read_safetensors_header(path)  # header length and data size agree with the file size
        load_file(str(path))
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".jsonl":
        text = path.read_text()
        assert text == "" or text.endswith("\n"), f"torn last line {text.splitlines()[-1]!r}"
        for line in text.splitlines():
            json.loads(line)
    elif suffix == ".png":
        with Image.open(path) as im:
            im.load()
    elif suffix == ".npz":
        with np.load(path) as z:
            for k in z.files:
                z[k]
    elif suffix == ".npy":
        np.load(path)
    else:
        path.read_bytes()


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_only_complete_files(root: Path) -> None:
    for path in files_of(root):
        if not is_temporary(path):
            try:
                assert_complete(path)
            except Exception as e:  # any parse error means a half-written file under a final name
                raise AssertionError(f"{path} is incomplete under its final name: {e!r}") from e


def _plain(obj, roots: tuple[Path, ...]):
    """JSON-like data with the working folders replaced by ROOT and the wall-time fields dropped."""
    text = json.dumps(obj)
    for r in roots:
        text = text.replace(str(r), "ROOT")
    return _drop_wall(json.loads(text))


def _drop_wall(obj):
    if isinstance(obj, dict):
        return {k: _drop_wall(v) for k, v in obj.items() if k not in WALL_FIELDS}
    if isinstance(obj, list):
        return [_drop_wall(v) for v in obj]
    return obj


def _masked_numbers(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", text)


def assert_same_tree(ref: Reference, cwd: Path) -> None:
    """The output folder in `cwd` holds the reference's files, equal as the module docstring says (an
    experiment's timings.jsonl, one line of wall times per invocation, only exists in both)."""
    a_dir, b_dir = ref.root / ref.out, cwd / ref.out
    names = [p.relative_to(a_dir) for p in files_of(a_dir)]
    got = [p.relative_to(b_dir) for p in files_of(b_dir)]
    extra, missing = sorted(set(got) - set(names)), sorted(set(names) - set(got))
    assert not extra and not missing, f"{b_dir}: files not in the reference {extra}, missing {missing}"
    roots = (ref.root.resolve(), cwd.resolve())
    for name in sorted(names, key=lambda n: (n.suffix != ".jsonl", n)):  # logs first: the clearest message
        a, b, what = a_dir / name, b_dir / name, f"{cwd.name}/{ref.out}/{name}"
        suffix = a.suffix
        if name.name == "timings.jsonl":
            continue
        if suffix == ".safetensors":
            ta, tb = load_file(str(a)), load_file(str(b))
            assert sorted(ta) == sorted(tb), what
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{what}: tensor {k} differs"
            assert _plain(read_meta(a), roots) == _plain(read_meta(b), roots), f"{what}: metadata differs"
        elif suffix == ".json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert _plain(jb, roots) == _plain(ja, roots), what
        elif suffix == ".jsonl":
            la = [_plain(json.loads(line), roots) for line in a.read_text().splitlines()]
            lb = [_plain(json.loads(line), roots) for line in b.read_text().splitlines()]
            assert lb == la, f"{what}: records differ (duplicated, missing or other values)"
        elif suffix == ".png":
            with Image.open(a) as ia, Image.open(b) as ib:
                assert np.array_equal(np.asarray(ia), np.asarray(ib)), f"{what}: pixels differ"
        elif suffix == ".npz":
            with np.load(a) as za, np.load(b) as zb:
                assert za.files == zb.files, what
                for k in za.files:
                    assert np.array_equal(za[k], zb[k]), f"{what}: {k} differs"
        elif suffix == ".md":  # the report: the same text, but wall times and speeds
            assert _masked_numbers(a.read_text()) == _masked_numbers(b.read_text()), what
        else:
            assert a.read_bytes() == b.read_bytes(), what


def log_steps(path: Path) -> list[int]:
    """The steps of the training records of a log.jsonl (those with a loss), in file order."""
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


# ----------------------------------------------------------------------------- tiny inputs and references


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """A folder dataset of 48 train and 16 val 16x16 digits in 4 classes (PNG files: no scikit-learn
    import in every subprocess)."""
    from clusterar.data import load_dataset

    root = tmp_path_factory.mktemp("digits-folder")
    digits = load_dataset("digits", "all", 16)
    labels = digits.labels.numpy()
    for c in range(4):
        for j, i in enumerate(np.flatnonzero(labels == c)[:16]):
            folder = root / ("train" if j < 12 else "val") / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(digits[int(i)][0].permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """The working folder of the reference runs."""
    return tmp_path_factory.mktemp("ref")


@pytest.fixture(scope="module")
def tokenizer(data, refs) -> Reference:
    """6 steps, checkpoints every 2, dead-code restarts at 2 and 4, a val evaluation at 3."""
    args = [
        "tokenizer", "train", "--data", data, "--preset", "tiny", "--image-size", "16",
        "--codebook-size", "64", "--steps", "6", "--batch-size", "8", "--warmup", "1",
        "--restart-every", "2", "--eval-every", "3", "--ckpt-every", "2", "--log-every", "1",
        "--device", "cpu", "--threads", "1", "--out", "tok",
    ]  # fmt: skip
    return reference(Reference(args, refs, "tok", marker="tok/config.json", resume=True))


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer) -> Path:
    return tokenizer.root / "tok" / "tokenizer.safetensors"


@pytest.fixture(scope="module")
def tokens(data, tokenizer_file, refs) -> Reference:
    """Both splits with flips, batches of 8 (6 train, 2 val), progress saved after every batch."""
    args = [
        "encode", "--tokenizer", str(tokenizer_file), "--data", data, "--splits", "train", "val",
        "--image-size", "16", "--views", "flip", "--batch-size", "8", "--save-every", "0",
        "--device", "cpu", "--threads", "1", "--out", "tokens",
    ]  # fmt: skip
    return reference(Reference(args, refs, "tokens"))


def train_args(tokens: Reference, tokenizer_file: Path, batch: int = 8) -> list[str]:
    """8 steps of 6 per epoch, checkpoints every 3, snapshots every half epoch (3 steps), EMA."""
    return [
        "--tokens", str(tokens.root / "tokens" / "train.safetensors"), "--tokenizer", str(tokenizer_file),
        "--model", "tiny", "--steps", "8", "--batch-size", str(batch), "--lr", "1e-3", "--ckpt-every", "3",
        "--snapshot-every", "0.5", "--ema", "0.9", "--log-every", "1", "--device", "cpu", "--threads", "1",
        "--no-progress", "--out", "train",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tokens, tokenizer_file, refs) -> Reference:
    args = ["train", *train_args(tokens, tokenizer_file)]
    return reference(Reference(args, refs, "train", marker="train/config.json", resume=True))


@pytest.fixture(scope="module")
def trained_2(tokens, tokenizer_file, refs, torchrun_command) -> Reference:
    """The same run in 2 gloo processes of batch 4 under torchrun (the same global batch)."""
    args = train_args(tokens, tokenizer_file, batch=4)
    ref = Reference(args, refs / "two", "train", "train/config.json", True, launcher=torchrun_command)
    return reference(ref)


@pytest.fixture(scope="module")
def samples(trained) -> Reference:
    """10 class-balanced images in batches of 4 from the trained run."""
    args = [
        "sample", str(trained.root / "train"), "--n", "10", "--per-class", "--batch-size", "4",
        "--device", "cpu", "--threads", "1", "--no-progress", "--out", "samples",
    ]  # fmt: skip
    return reference(Reference(args, trained.root, "samples", marker="samples/parts/run.json"))


EXPERIMENT_SPEC = """
name = "kill"
data = "digits"
image_size = 16
seed = 0
device = "cpu"

[tokenizer]
{tokenizer}

[clusters.k]
method = "kmeans"
n = 8

[train]
model = "tiny"
epochs = 0.2            # 10 steps of 32 images
batch_size = 32
lr = 1e-3
log_every = 1
ckpt_every = 3

[eval]
every_epochs = 0.1      # snapshots at steps 5 and 10, each evaluated
samples = 20
batch_size = 10

[[runs]]
name = "base"
method = "baseline"
clusters = "k"
"""
OWN_TOKENIZER = 'preset = "tiny"\nsteps = 6\nwarmup = 1\nrestart_every = 2\nbatch_size = 16'


def experiment_reference(root: Path, tokenizer: str) -> Reference:
    root.mkdir(parents=True)
    (root / "spec.toml").write_text(EXPERIMENT_SPEC.format(tokenizer=tokenizer))
    args = ["experiment", str(root / "spec.toml"), "--out", "exp", "--threads", "1", "--no-progress"]
    return reference(Reference(args, root / "ref", "exp", marker="exp/spec.json", cache=root / "cache"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tokenizer_file) -> Reference:
    """A one-run spec on the bundled digits with the tokenizer made above (its training has its own
    test): token files, clusters, 10 training steps, 2 evaluations, speed and the report."""
    root = tmp_path_factory.mktemp("experiment") / "given-tokenizer"
    return experiment_reference(root, f'path = "{tokenizer_file}"')


# ----------------------------------------------------------------------------- the commands


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    """A killed writer's temporary file goes with the next write into its folder; a live writer's, another
    host's and files that only look alike stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    with atomic_path(tmp_path / "probe.json") as tmp:
        tmp.write_text("{}")
        host = tmp.name.rsplit("-", 1)[0].split(".tmp-", 1)[1]  # the name is .probe.json.tmp-HOST-PID
    stale = tmp_path / f".model.safetensors.tmp-{host}-{dead_pid}"
    keep = [
        tmp_path / f".model.safetensors.tmp-{host}-{os.getpid()}",  # this process: a write in progress
        tmp_path / f".model.safetensors.tmp-other-host-{dead_pid}",
        tmp_path / f"model.safetensors.tmp-{host}-{dead_pid}",  # not hidden: not one of ours
    ]
    for p in [stale, *keep]:
        p.write_bytes(b"half")
    assert remove_stale_temps(tmp_path) == [stale]
    assert all(p.exists() for p in keep)


def test_tokenizer_train(tokenizer, tmp_path):
    """Killed before its first checkpoint, inside a checkpoint write with the log ahead of the checkpoint,
    and in the final stage after the log's last record."""
    killed_at(tokenizer, tmp_path, "tokenizer.step:1", first=True)  # no checkpoint yet, one log line
    run = tmp_path / "tok"
    assert not (run / "checkpoint.safetensors").exists() and log_steps(run / "log.jsonl") == [1]
    killed_at(tokenizer, tmp_path, "write:checkpoint.safetensors:2")  # step 4's; the val record at 3
    assert read_meta(run / "checkpoint.safetensors")["step"] == 2
    assert log_steps(run / "log.jsonl") == [1, 2, 3, 4]  # ahead of the checkpoint
    assert list(run.glob(".checkpoint.safetensors.tmp-*"))  # the killed write's temporary file
    killed_at(tokenizer, tmp_path, "write:recon.png:1")  # the final stage, after the log's last record
    assert not (run / "tokenizer.safetensors").exists()  # its presence means a complete run
    finishes(tokenizer, tmp_path)
    assert_same_tree(tokenizer, tmp_path)
    assert log_steps(run / "log.jsonl") == [1, 2, 3, 4, 5, 6]


def test_encode(tokens, tmp_path):
    """Killed after a batch, inside the token file's write and the second split's, between removing the
    partial files, and inside the first progress save of the encoding that starts again."""
    out = tmp_path / "tokens"
    killed_at(tokens, tmp_path, "encode.batch:3", first=True)
    state = json.loads((out / "train.safetensors.partial.json").read_text())
    assert state["done"] == 24  # 3 batches of 8 saved: the rerun continues from there
    killed_at(tokens, tmp_path, "write:train.safetensors:1")
    assert not (out / "train.safetensors").exists()
    killed_at(tokens, tmp_path, "write:val.safetensors:1")
    killed_at(tokens, tmp_path, "encode.cleanup:1")
    assert (out / "train.safetensors").is_file()
    killed_at(tokens, tmp_path, "write:train.safetensors.partial.json:1")
    finishes(tokens, tmp_path)  # must not take the first encoding's partial state for the second one's
    assert_same_tree(tokens, tmp_path)


def test_train(trained, tmp_path):
    """Killed inside the first checkpoint write, with the log ahead of the checkpoint, inside a snapshot
    write and inside the final model write."""
    run = tmp_path / "train"
    killed_at(trained, tmp_path, "write:checkpoint.safetensors:1", first=True)  # step 3
    assert not (run / "checkpoint.safetensors").exists()
    killed_at(trained, tmp_path, "train.step:5")
    assert read_meta(run / "checkpoint.safetensors")["step"] == 3
    assert log_steps(run / "log.jsonl") == [1, 2, 3, 4, 5]
    killed_at(trained, tmp_path, "write:model-step0000006.safetensors:1")
    killed_at(trained, tmp_path, "write:model.safetensors:2")  # steps 6 and 8 of a session from 3
    finishes(trained, tmp_path)
    assert_same_tree(trained, tmp_path)
    assert log_steps(run / "log.jsonl") == list(range(1, 9))


def test_train_torchrun(trained_2, tmp_path):
    """2 gloo processes: rank 1 killed after step 4, then rank 0 inside a checkpoint write, each taking
    the job down; `torchrun ... --resume` ends with the files of the uninterrupted 2-process run."""
    run = tmp_path / "train"
    killed_at(trained_2, tmp_path, "train.step:4@1", first=True)
    assert read_meta(run / "checkpoint.safetensors")["step"] == 3
    killed_at(trained_2, tmp_path, "write:checkpoint.safetensors:1@0")  # step 6's
    assert read_meta(run / "checkpoint.safetensors")["step"] == 3
    finishes(trained_2, tmp_path)
    assert_same_tree(trained_2, tmp_path)
    assert read_meta(run / "checkpoint.safetensors")["world_size"] == 2
    assert log_steps(run / "log.jsonl") == list(range(1, 9))


def test_sample(samples, tmp_path):
    """Killed after a batch, inside the .npz write, and between sample.json and removing the parts."""
    killed_at(samples, tmp_path, "sample.batch:2", first=True)
    assert len(list((tmp_path / "samples" / "parts").glob("batch-*.npy"))) == 2
    kill_chain(samples, tmp_path, ["write:samples.npz:1", "sample.finish:1"])


def test_experiment(experiment, tmp_path):
    """Killed between stages, in a training step and in a sample batch of the second evaluation; each
    rerun is the same command."""
    points = ["experiment.stage:3", "train.step:7", "sample.batch:3"]
    kill_chain(experiment, tmp_path, points)
    assert log_steps(tmp_path / "exp" / "runs" / "base" / "log.jsonl") == list(range(1, 11))


def test_train_killed_at_random_times(trained, tmp_path):
    """Two SIGKILLs after seeded random delays, wherever the run is, then --resume to the end."""
    random_kills(trained, tmp_path, kills=2, seed=1)


# ----------------------------------------------------------------------------- heavier: pytest -m slow


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tokenizer", "tokens", "trained", "trained_2", "samples"])
def test_many_random_kills(name, request, tmp_path):
    """Eight random kills per command (under torchrun: the launcher and both workers at once)."""
    ref = request.getfixturevalue(name)
    random_kills(ref, tmp_path, kills=8, seed=sum(map(ord, name)))


@pytest.mark.slow
def test_experiment_with_its_own_tokenizer(tmp_path_factory, tmp_path):
    """The experiment trains its tokenizer: killed in the tokenizer's final stage (a tokenizer file
    written before its pictures would be reused as complete), at each stage, then at random times."""
    ref = experiment_reference(tmp_path_factory.mktemp("experiment") / "own-tokenizer", OWN_TOKENIZER)
    points = ["write:recon.png:1", "experiment.stage:2", "experiment.stage:3", "train.step:4"]
    points += ["experiment.stage:5", "sample.batch:2", "experiment.stage:6", "experiment.stage:7"]
    kill_chain(ref, tmp_path / "points", points)
    random_kills(ref, tmp_path / "random", kills=6, seed=7)

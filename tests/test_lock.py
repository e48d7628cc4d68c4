"""One writer per folder (`clusterar.lock`): a second process writing into a folder at work is refused in
one line naming the process that holds it, the first one finishes as if alone, a killed holder's folder is
taken over by the next run, and one process nests the locks of an experiment and its stages.

Real processes: the CLI commands run in subprocesses (`python -m clusterar`); a first command is frozen
with SIGSTOP once it is at work (its first file written), so that the second one meets it for certain,
and then let go with SIGCONT. Under torchrun, only rank 0 locks: the torchrun tests of train, encode and
sample (which would refuse rank 1 otherwise) cover that.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clusterar import ClusterarError, lock
from clusterar.experiment.runner import run_experiment
from clusterar.lock import LOCK_FILE, FolderInUse, folder_lock, read_holder
from clusterar.tokenizer import save_tokenizer
from clusterar.tokens import encode_dataset, write_token_file
from clusterar.train import TrainConfig, train
from clusterar.train.tokenizer import TokenizerTrainConfig, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, CODES, CLASSES = 8, 512, 10  # the tiny tokenizer's: 32 px images, 8x8 tokens, 512 codes
ENV = {k: v for k, v in os.environ.items() if k != "CLUSTERAR_KILL_AT"} | {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# What a holder process runs: lock the folder of argv[1], say so, and hold it until stdin closes.
HOLD = (
    "import sys\nfrom clusterar.lock import folder_lock\nwith folder_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n    sys.stdin.read()\n"
)
# What a probe process runs: take and release the folder of argv[1]; exit 2 with the refusal if it is busy.
PROBE = (
    "import sys\nfrom clusterar.lock import FolderInUse, folder_lock\ntry:\n    with folder_lock(sys.argv[1]):\n"
    "        pass\nexcept FolderInUse as e:\n    print(e)\n    sys.exit(2)\n"
)


def refusal(folder: Path, pid: int) -> str:
    """The one line a refused process prints (the CLI prefixes `error: `), as a regex."""
    return (
        re.escape(
            f"{folder} is in use by another clusterar process (pid {pid} on {socket.gethostname()}, since "
        )
        + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[^)]*"
        + re.escape("); wait for it to finish or choose another --out")
    )


@pytest.fixture(scope="module")
def data(make_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The tiny tokenizer, a token file of 16 random images for it, and a model trained on it (2 steps)."""
    d = tmp_path_factory.mktemp("lock-data")
    tok = make_tokenizer()
    save_tokenizer(tok, d / "tok.safetensors")
    rng = np.random.default_rng(0)
    meta = {
        "tokenizer_fingerprint": tok.fingerprint(),
        "codebook_fingerprint": tok.codebook_fingerprint(),
        "codebook_size": CODES,
        "grid": [GRID, GRID],
        "image_size": 4 * GRID,
        "views": ["original"],
        "dataset": "random",
        "split": "train",
        "num_classes": CLASSES,
        "class_names": [f"c{i}" for i in range(CLASSES)],
        "permutation": None,
    }
    codes = rng.integers(0, CODES, (16, 1, GRID * GRID)).astype(np.int16)
    write_token_file(d / "train.safetensors", codes, rng.integers(0, CLASSES, 16), meta)
    files = {"tok": d / "tok.safetensors", "tokens": d / "train.safetensors", "model": d / "model"}
    train(TrainConfig(**train_config(files), steps=2), files["model"], progress=False)
    return files


def train_config(data: dict[str, Path]) -> dict:
    return dict(tokens=str(data["tokens"]), tokenizer=str(data["tok"]), model="tiny", batch_size=8)


def train_args(data: dict[str, Path], out: Path, *more: str) -> list[str]:
    args = ["train", "--tokens", str(data["tokens"]), "--tokenizer", str(data["tok"]), "--model", "tiny"]
    return [*args, "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(out), *more]


def clusterar(*args: str) -> list[str]:
    return [sys.executable, "-m", "clusterar", *args]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` exists (the command is at work); fail if the command ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the command ended (rc {proc.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.01)


@contextlib.contextmanager
def frozen_at_work(args: list[str], marker: Path, logs: Path):
    """Start `clusterar ARGS`, wait for its `marker` file, freeze it (SIGSTOP) for the block, then let it go
    on (SIGCONT); yield the process. Its stdout and stderr go to files in `logs` (a frozen process must
    not block on a full pipe)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        proc = subprocess.Popen(clusterar(*args), stdout=out, stderr=err, env=ENV, text=True)
    try:
        wait_for(marker, proc)
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, "the command finished before it could be frozen at work"
        try:
            yield proc
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def held_by_another_process(folder: Path):
    """A process that holds `folder` for the block; yields its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def probe(folder: Path) -> subprocess.CompletedProcess:
    """Another process trying `folder`: return code 0 (it got the lock) or 2 (refused, with the message)."""
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, env=ENV, timeout=60
    )


# ----------------------------------------------------------------------------- two commands, one folder


def test_a_second_train_into_a_busy_run_folder_is_refused_and_the_first_finishes(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run, "--steps", "200", "--log-every", "50")
    with frozen_at_work(args, run / "config.json", tmp_path / "first") as first:
        config = (run / "config.json").read_bytes()
        second = subprocess.run(clusterar(*args), capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2, second.stderr
        assert re.fullmatch("error: " + refusal(run, first.pid) + "\n", second.stderr), second.stderr
        assert (run / "config.json").read_bytes() == config  # refused before it wrote anything
    assert first.returncode == 0, (tmp_path / "first" / "err").read_text()
    assert "model written" in (tmp_path / "first" / "out").read_text()
    names = sorted(p.name for p in run.iterdir())  # the lock file went with the run
    assert names == ["checkpoint.safetensors", "config.json", "curves.png", "log.jsonl", "model.safetensors"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [50, 100, 150, 200]


def test_a_second_sample_into_a_busy_folder_is_refused_and_the_first_finishes(data, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", str(data["model"]), "--n", "32", "--batch-size", "2", "--no-images", "--no-progress"]
    args += ["--device", "cpu", "--out", str(out)]
    with frozen_at_work(args, out / "parts" / "run.json", tmp_path / "first") as first:
        second = subprocess.run(clusterar(*args), capture_output=True, text=True, env=ENV, timeout=300)
        assert second.returncode == 2, second.stderr
        assert re.fullmatch("error: " + refusal(out, first.pid) + "\n", second.stderr), second.stderr
    assert first.returncode == 0, (tmp_path / "first" / "err").read_text()
    assert "written:" in (tmp_path / "first" / "out").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample.json", "samples.npz"]
    assert json.loads((out / "sample.json").read_text())["batches_generated"] == 16


def test_a_killed_holder_leaves_its_lock_file_and_the_next_run_takes_the_folder_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    args = train_args(data, run, "--steps", "6", "--ckpt-every", "2", "--log-every", "1")
    killed = subprocess.Popen(
        clusterar(*args), env=ENV | {"CLUSTERAR_KILL_AT": "train.step:3"}, stderr=subprocess.PIPE, text=True
    )
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err
    assert read_holder(run)["pid"] == killed.pid  # its lock file is left, its lock went with it
    rerun = subprocess.run(clusterar(*args, "--resume"), capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (
        "in use" not in rerun.stderr and f"resuming {run} at step 2 of 6" in rerun.stderr
    )  # resumed from the step-2 checkpoint
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and not (run / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- every job locks its folder


def test_every_folder_job_is_refused_while_another_process_holds_its_folder(make_tokenizer, tmp_path):
    """Tokenizer training, encoding and experiments (train and sample: the CLI tests above), refused before
    any work, with nothing written into the held folder."""
    folder = tmp_path / "busy"
    with held_by_another_process(folder) as pid:
        jobs = {
            "tokenizer train": lambda: train_tokenizer(TokenizerTrainConfig(data="digits", steps=1), folder),
            "encode": lambda: encode_dataset(
                make_tokenizer(), "digits", "val", folder / "val.safetensors", 32
            ),
            "experiment": lambda: run_experiment("quick", folder, progress=False),
        }
        for name, job in jobs.items():
            with pytest.raises(FolderInUse) as e:
                job()
            assert re.fullmatch(refusal(folder, pid), str(e.value)), name
            assert e.value.pid == pid
            assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE], name


def test_one_process_nests_the_locks_of_an_experiment_and_its_stages(tmp_path):
    """An experiment holds its folder while its stages lock subfolders (and a stage may lock a folder its
    caller holds): no deadlock in the process, every held folder refused to others, all freed at the end."""
    exp = tmp_path / "exp"
    with folder_lock(exp):
        with folder_lock(exp / "runs" / "a"), folder_lock(exp):  # a subfolder, and the same folder again
            assert probe(exp).returncode == 2 and probe(exp / "runs" / "a").returncode == 2
            assert f"(pid {os.getpid()} " in probe(exp / "runs" / "a").stdout
            assert probe(exp / "runs" / "b").returncode == 0  # a folder nobody holds
        assert probe(exp).returncode == 2  # still held by the outer block
        assert probe(exp / "runs" / "a").returncode == 0
        (tmp_path / "alias").symlink_to(exp)
        with folder_lock(tmp_path / "alias"):  # another spelling of the same folder
            pass
        (tmp_path / "alias").unlink()
        assert probe(exp).returncode == 2
    assert probe(exp).returncode == 0
    assert not exp.exists()  # the folders the locks created are removed again once empty


def test_a_lock_file_removed_between_open_and_lock_is_not_trusted(tmp_path, monkeypatch):
    """The unlink race: a releasing holder removes FOLDER/.lock just after we opened it, so we lock a
    removed file; we must notice and lock the file that is there, else a third process creates a new one,
    locks it too, and two processes write."""
    folder = tmp_path / "f"
    folder.mkdir()
    real_open, raced = os.open, []

    def open_then_release(path, flags, mode=0o777, **kw):
        fd = real_open(path, flags, mode, **kw)
        if str(path).endswith(LOCK_FILE) and not raced:
            raced.append(os.fstat(fd).st_ino)
            os.unlink(path)  # what a releasing holder does right after our open
        return fd

    monkeypatch.setattr(lock.os, "open", open_then_release)
    with folder_lock(folder):
        monkeypatch.setattr(lock.os, "open", real_open)
        assert raced and (folder / LOCK_FILE).exists()
        assert read_holder(folder)["pid"] == os.getpid()
        assert probe(folder).returncode == 2  # the third process is refused
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_file_that_is_a_link_is_refused_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).symlink_to(target)
    with pytest.raises(ClusterarError, match="not a lock file of clusterar"):
        with folder_lock(folder):
            pass
    assert target.read_text() == "keep me"


def test_not_rank_0_does_not_lock(tmp_path):
    with held_by_another_process(tmp_path / "f"):
        with folder_lock(tmp_path / "f", active=False):  # torchrun's other ranks work for rank 0
            pass


def test_a_file_system_without_locks_runs_the_job_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    for _ in range(2):
        with folder_lock(tmp_path / "nfs"):
            (tmp_path / "nfs" / "out.txt").write_text("done")
    err = capsys.readouterr().err
    assert err.count("going on without a lock") == 1 and "No locks available" in err
    assert sorted(p.name for p in (tmp_path / "nfs").iterdir()) == ["out.txt"]


def test_a_file_where_the_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ClusterarError, match="f is a file, not a folder; choose another --out"):
        with folder_lock(tmp_path / "f" / "run"):
            pass

"""Bad files and images on the command line (issue 11 §3, issue 16).

Every case runs the real `clusterar` entry point on a damaged or wrong input and asserts what the user
gets: exit status 2, ONE line on stderr that starts with `error: `, names the file (or flag) and says how
to fix it, no traceback, and nothing half-written under the command's output name. The images that are
accepted (1x1, 16-bit grey, CMYK, RGBA) are checked for their pixel values and their warning lines.

`python tests/test_bad_files.py` prints the same cases as a Markdown table; `python docs/make_reliability.py` puts it in docs/reliability.md.
"""

from __future__ import annotations

import builtins
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from PIL import Image

from clusterar.cli import main
from clusterar.clusters import CodebookClusters
from clusterar.data import load_dataset, read_image
from clusterar.gpt import export_llamagen
from clusterar.model_file import load_model
from clusterar.sample import write_ctf_pipeline
from clusterar.tokenizer import save_tokenizer
from clusterar.tokens import TokenFile, encode_dataset, write_token_file
from clusterar.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

M = 16  # clusters of the tiny tokenizer's 512 codes
QUICK_SPEC = Path(__file__).resolve().parents[1] / "clusterar" / "specs" / "quick.toml"


# ----------------------------------------------------------------------------- the valid files


class Evil:
    """Unpickling this object writes `marker`: what a malicious .pt file does to torch.load(weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def build_files(d: Path) -> dict[str, Path]:
    """Every kind of file the commands read, small and valid, made once: tokenizer (and another one),
    token file (and one of the other tokenizer), clusters (and of the other codebook), training runs with
    model and checkpoint, a CTF pipeline, a samples .npz, an experiment spec, LlamaGen-style .pt files."""
    f: dict[str, Path] = {}
    tok, other = tiny_tokenizer(0), tiny_tokenizer(1)
    f["tok"] = d / "tokenizer" / "tokenizer.safetensors"
    f["other_tok"] = d / "other-tokenizer" / "tokenizer.safetensors"
    f["tok"].parent.mkdir()
    f["other_tok"].parent.mkdir()
    save_tokenizer(tok, f["tok"])
    save_tokenizer(other, f["other_tok"])

    f["tokens"] = d / "tokens" / "val.safetensors"
    encode_dataset(tok, "digits", "val", f["tokens"], image_size=32, views="none", progress=False)
    tf = TokenFile.open(f["tokens"])
    f["other_tokens"] = d / "other-tokens" / "val.safetensors"
    meta = {k: v for k, v in tf.meta.items() if k != "kind"}
    meta.update(tokenizer_fingerprint=other.fingerprint(), codebook_fingerprint=other.codebook_fingerprint())
    write_token_file(f["other_tokens"], np.array(tf.codes), tf.labels, meta)

    gen = torch.Generator().manual_seed(0)
    labels = torch.randperm(512, generator=gen) % M
    f["clusters"] = d / "clusters.safetensors"
    f["other_clusters"] = d / "other-clusters.safetensors"
    codebook = tok.quantize.embedding.weight.detach()
    CodebookClusters.from_labels(labels, codebook, "balanced", M).save(f["clusters"])
    other_codebook = other.quantize.embedding.weight.detach()
    CodebookClusters.from_labels(labels, other_codebook, "balanced", M).save(f["other_clusters"])

    base = dict(tokens=str(f["tokens"]), tokenizer=str(f["tok"]), model="tiny", batch_size=8, steps=2)
    for name, method in (("baseline", "baseline"), ("coarse", "ctf-coarse"), ("refiner", "ctf-refiner")):
        clusters = None if method == "baseline" else str(f["clusters"])
        train(TrainConfig(method=method, clusters=clusters, **base), d / name, progress=False)
    f["run"] = d / "baseline"
    f["model"] = d / "baseline" / "model.safetensors"
    f["checkpoint"] = d / "baseline" / "checkpoint.safetensors"
    f["pipeline"] = d / "pipeline.json"
    write_ctf_pipeline(d / "coarse", d / "refiner", f["pipeline"])
    images = load_dataset("digits", "val", 32).images[:20].expand(-1, 3, -1, -1)
    f["samples"] = d / "samples.npz"
    np.savez(f["samples"], images.permute(0, 2, 3, 1).numpy())
    f["spec"] = d / "spec.toml"
    shutil.copy(QUICK_SPEC, f["spec"])

    f["small_tok"] = d / "small-tokenizer" / "tokenizer.safetensors"  # 256 codes: another vocabulary
    f["small_tok"].parent.mkdir()
    save_tokenizer(tiny_tokenizer(0, codebook_size=256), f["small_tok"])

    f["llamagen_vq"] = d / "vq_ds16_c2i.pt"
    torch.save({"model": tok.state_dict()}, f["llamagen_vq"])
    f["llamagen_gpt"] = d / "c2i_tiny.pt"
    export_llamagen(load_model(f["model"])[0], f["llamagen_gpt"])
    f["evil"] = d / "evil.pt"
    f["marker"] = d / "MARKER"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil(f["marker"])}, f["evil"])
    return f


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return build_files(tmp_path_factory.mktemp("files"))


# ----------------------------------------------------------------------------- running the command

TRAIN = ["--model", "tiny", "--steps", "2", "--batch-size", "8", "--no-progress", "--device", "cpu"]
PROGRESS_BAR = re.compile(r"^encode \w+: +\d+%\|")  # tqdm's line of `clusterar encode`


def error_line(rc: int, out: str, err: str) -> str:
    """The one line the user gets. Fails unless: exit status 2, no traceback, exactly one line on stderr that
    starts with `error: `, on a line of its own, and nothing else there but progress bars."""
    assert rc == 2, f"exit status {rc}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, err
    lines = [line for line in err.split("\n") if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    others = [
        line
        for line in lines
        if not line.startswith("error: ")
        and not all(PROGRESS_BAR.match(seg) for seg in line.split("\r") if seg.strip())
    ]
    assert len(errors) == 1 and not others, f"stderr is not one error line:\n{err}"
    return errors[0]


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ----------------------------------------------------------------------------- bad files: kinds x damage


@dataclass(frozen=True)
class Kind:
    """A kind of file, the command that reads it, and the advice its errors must give."""

    source: str  # key of the valid file in `build_files`
    command: str  # for the table
    argv: Callable[[dict[str, Path], Path, Path], list]  # (files, bad path, tmp) -> argv
    fix: str  # words of the advice every error about this kind must contain
    dir_holds_file: bool = False  # "a folder": one holding the valid file (the likely mix-up), else empty


def _encode(f, bad, t):
    data = ["--data", "digits", "--splits", "val"]
    return ["encode", "--tokenizer", bad, *data, "--out", t / "out", "--device", "cpu"]


def _train(f, t, *args, tokens=None):
    inputs = ["--tokens", tokens or f["tokens"], "--tokenizer", f["tok"]]
    return ["train", *inputs, *args, "--out", t / "out", *TRAIN]


def _sample(f, bad, t, *args):
    return ["sample", bad, *args, "--out", t / "out", "--n", "2", "--no-progress", "--device", "cpu"]


def _evaluate(f, bad, t):
    opts = ["--ref", "digits:val", "--cache-dir", t / "cache", "--no-progress", "--device", "cpu"]
    return ["evaluate", bad, *opts]


def _resume(f, bad, t):
    inputs = ["--tokens", f["tokens"], "--tokenizer", f["tok"]]
    return ["train", "--resume", *inputs, "--out", bad.parent, *TRAIN]


KINDS = {
    "tokenizer": Kind("tok", "encode --tokenizer FILE", _encode, "clusterar tokenizer train"),
    "LlamaGen VQ .pt": Kind("llamagen_vq", "encode --tokenizer FILE.pt", _encode, "LlamaGen VQ .pt"),
    "token file": Kind(
        "tokens",
        "train --tokens FILE",
        lambda f, bad, t: _train(f, t, tokens=bad),
        "clusterar encode",
        dir_holds_file=True,
    ),
    "clusters file": Kind(
        "clusters",
        "train --method iar --clusters FILE",
        lambda f, bad, t: _train(f, t, "--method", "iar", "--clusters", bad),
        "clusterar cluster fit",
        dir_holds_file=True,
    ),
    "model file": Kind("model", "sample FILE", _sample, "clusterar train"),
    "training checkpoint": Kind("checkpoint", "train --resume --out RUN", _resume, "another --out"),
    "CTF pipeline": Kind("pipeline", "sample PIPELINE.json", _sample, "clusterar pipeline ctf"),
    "samples .npz": Kind("samples", "evaluate FILE.npz", _evaluate, "clusterar sample"),
    "experiment spec": Kind(
        "spec", "experiment FILE --check", lambda f, bad, t: ["experiment", bad, "--check"], "quick"
    ),
}

# how a file is damaged: (for the table, words the error must contain)
DAMAGE = {
    "missing": ("missing path", "not found"),
    "folder": ("a folder", "folder"),
    "empty": ("empty file", "empty (0 bytes)"),
    "truncated": ("first half of a valid file", "truncated"),
    "garbage": ("4 KB of random bytes", "not a"),
}
PROBLEM = {  # where a kind's words differ from DAMAGE's
    ("training checkpoint", "missing"): "nothing to resume from",
    ("experiment spec", "truncated"): "is not valid TOML",  # TOML cannot tell a cut-off file
}


def damaged_file(f: dict[str, Path], kind: Kind, how: str, t: Path) -> Path:
    """Make the damaged copy of `kind`'s valid file under t (the run folder's checkpoint in a copied run)."""
    src = f[kind.source]
    if kind.source == "checkpoint":
        shutil.copytree(src.parent, t / "run")
        bad = t / "run" / src.name
        bad.unlink()
    else:
        bad = t / "bad" / src.name
        bad.parent.mkdir(parents=True)
    if how == "folder":
        bad.mkdir()
        if kind.dir_holds_file:
            shutil.copy(src, bad / src.name)
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "truncated":
        data = src.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return bad


GRID = [(k, how) for k in KINDS for how in DAMAGE]


@pytest.mark.parametrize("kind_name, how", GRID, ids=[f"{k}-{how}".replace(" ", "_") for k, how in GRID])
def test_damaged_file(files, tmp_path, capsys, kind_name, how):
    kind = KINDS[kind_name]
    bad = damaged_file(files, kind, how, tmp_path)
    before = (
        {p: (bad.parent / p).read_bytes() for p in files_under(bad.parent)}
        if kind.source == "checkpoint"
        else None
    )
    line = error_line(main([str(a) for a in kind.argv(files, bad, tmp_path)]), *capsys.readouterr())
    assert str(bad) in line or (str(bad.parent) in line and bad.name in line), line
    assert PROBLEM.get((kind_name, how), DAMAGE[how][1]) in line, line
    assert kind.fix in line, line
    assert files_under(tmp_path / "out") == [], "something was written under the output name"
    if before is not None:  # the run folder is left exactly as it was
        assert {p: (bad.parent / p).read_bytes() for p in files_under(bad.parent)} == before


# ----------------------------------------------------------------------------- wrong files, unsafe files


@dataclass(frozen=True)
class Case:
    """One wrong input: `argv(files, tmp)` makes it and returns the command; the error line must contain
    every string of `expect(files, tmp)`."""

    input: str  # for the table
    command: str  # for the table
    argv: Callable[[dict[str, Path], Path], list]
    expect: Callable[[dict[str, Path], Path], list[str]]


def _spec_with(f: dict[str, Path], t: Path, old: str, new: str) -> Path:
    text = f["spec"].read_text()
    assert old in text
    (t / "spec.toml").write_text(text.replace(old, new))
    return t / "spec.toml"


UNSAFE = "holds Python objects other than tensors (it names exec), so it is refused for safety"

CASES = {
    "pickle-as-tokenizer": Case(
        "a .pt whose pickle runs code (as a LlamaGen tokenizer)",
        "encode --tokenizer evil.pt",
        lambda f, t: _encode(f, f["evil"], t),
        lambda f, t: [f"tokenizer {f['evil']} {UNSAFE}"],
    ),
    "pickle-as-llamagen-gpt": Case(
        "the same .pt as a LlamaGen GPT",
        "sample evil.pt --tokenizer T",
        lambda f, t: _sample(f, f["evil"], t, "--tokenizer", f["tok"]),
        lambda f, t: [f"LlamaGen model {f['evil']} {UNSAFE}"],
    ),
    "pickle-as-iar-mapping": Case(
        "the same .pt as IAR's mapping.pt",
        "cluster fit --from-iar evil.pt",
        lambda f, t: (
            ["cluster", "fit", "--tokenizer", f["tok"], "--from-iar", f["evil"], "--clusters", "16"]
            + ["--out", t / "out" / "iar.safetensors"]
        ),
        lambda f, t: [f"IAR mapping file {f['evil']} {UNSAFE}"],
    ),
    "truncated-llamagen-gpt": Case(
        "a truncated LlamaGen GPT .pt",
        "sample c2i.pt --tokenizer T",
        lambda f, t: _sample(f, _half(f["llamagen_gpt"], t), t, "--tokenizer", f["tok"]),
        lambda f, t: [f"LlamaGen model {t / f['llamagen_gpt'].name} is truncated", "copy it again"],
    ),
    "info-folder": Case(
        "a run folder given to info",
        "info RUN",
        lambda f, t: ["info", f["run"]],
        lambda f, t: [
            f"{f['run']} is a folder",
            "checkpoint.safetensors, model.safetensors: pass one of them",
        ],
    ),
    "info-pt": Case(
        "a LlamaGen .pt given to info",
        "info FILE.pt",
        lambda f, t: ["info", f["llamagen_vq"]],
        lambda f, t: [f"{f['llamagen_vq']} is a PyTorch file, not safetensors", "`clusterar info` reads"],
    ),
    "tokenizer-as-source": Case(
        "a tokenizer given to sample as SOURCE",
        "sample tokenizer.safetensors",
        lambda f, t: _sample(f, f["tok"], t),
        lambda f, t: [f"{f['tok']} is a tokenizer, not a model to sample", "SOURCE of `clusterar sample` is"],
    ),
    "checkpoint-as-source": Case(
        "a training checkpoint given to sample as SOURCE",
        "sample RUN/checkpoint.safetensors",
        lambda f, t: _sample(f, f["checkpoint"], t),
        lambda f, t: [
            f"{f['checkpoint']} is a training checkpoint, not a model to sample",
            "model.safetensors",
        ],
    ),
    "tokens-as-tokenizer": Case(
        "a token file given as --tokenizer",
        "encode --tokenizer val.safetensors",
        lambda f, t: _encode(f, f["tokens"], t),
        lambda f, t: [f"{f['tokens']} is a token file, not a tokenizer", "clusterar tokenizer train"],
    ),
    "tokenizer-as-tokens": Case(
        "a tokenizer given as --tokens",
        "train --tokens tokenizer.safetensors",
        lambda f, t: _train(f, t, tokens=f["tok"]),
        lambda f, t: [f"{f['tok']} is a tokenizer, not a token file", "clusterar encode"],
    ),
    "spec-unknown-data": Case(
        'a spec with data = "digitz"',
        "experiment spec.toml --check",
        lambda f, t: ["experiment", _spec_with(f, t, 'data = "digits"', 'data = "digitz"'), "--check"],
        lambda f, t: [
            f"{t / 'spec.toml'}: data = 'digitz': unknown dataset 'digitz'",
            "mnist, digits, folder:PATH",
        ],
    ),
    "tokens-of-another-tokenizer": Case(
        "a token file encoded by another tokenizer",
        "train --tokens OTHER --tokenizer T",
        lambda f, t: _train(f, t, tokens=f["other_tokens"]),
        lambda f, t: [
            f"token file {f['other_tokens']} was encoded by tokenizer",
            f"tokenizer {f['tok']} has",
        ],
    ),
    "clusters-of-another-tokenizer": Case(
        "clusters of another tokenizer's codebook",
        "train --method iar --clusters OTHER",
        lambda f, t: _train(f, t, "--method", "iar", "--clusters", f["other_clusters"]),
        lambda f, t: [f"the clusters in {f['other_clusters']} were computed on", f"tokenizer {f['tok']}"],
    ),
    "pipeline-with-another-tokenizer": Case(
        "a CTF pipeline sampled with another tokenizer",
        "sample pipeline.json --tokenizer OTHER",
        lambda f, t: _sample(f, f["pipeline"], t, "--tokenizer", f["other_tok"]),
        lambda f, t: [
            f"pipeline {f['pipeline']} was trained on tokens of tokenizer",
            f"but {f['other_tok']} has",
        ],
    ),
    "labels-out-of-range": Case(
        "a class label the model does not have",
        "sample RUN --labels 1,99",
        lambda f, t: _sample(f, f["run"], t, "--labels", "1,99"),
        lambda f, t: ["--labels must be class ids in [0, 10), got [1, 99]"],
    ),
    "labels-not-numbers": Case(
        "labels that are not numbers",
        "sample RUN --labels 1,a",
        lambda f, t: _sample(f, f["run"], t, "--labels", "1,a"),
        lambda f, t: ["--labels takes comma-separated class ids"],
    ),
    "clusters-not-dividing": Case(
        "balanced clusters that do not divide the codebook",
        "cluster fit --method balanced --clusters 15",
        lambda f, t: [
            "cluster",
            "fit",
            "--tokenizer",
            f["tok"],
            "--method",
            "balanced",
            "--clusters",
            "15",
            "--out",
            t / "out" / "c.safetensors",
            "--device",
            "cpu",
        ],
        lambda f, t: ["not divisible by n_clusters=15", "8 or 16"],
    ),
    "convert-vocabulary": Case(
        "a LlamaGen GPT and a tokenizer of another vocabulary",
        "convert c2i.pt --tokenizer T256",
        lambda f, t: (
            ["convert", f["llamagen_gpt"], "--method", "iar", "--tokenizer", f["small_tok"]]
            + ["--clusters", f["clusters"], "--grid-size", "8", "--out", t / "out"]
        ),
        lambda f, t: [
            f"{f['llamagen_gpt']} predicts 512 tokens, but tokenizer {f['small_tok']} has 256 codes"
        ],
    ),
    "convert-clusters-codebook": Case(
        "clusters of another tokenizer's codebook",
        "convert RUN --clusters OTHER",
        lambda f, t: (
            ["convert", f["run"], "--method", "iar", "--clusters", f["other_clusters"]] + ["--out", t / "out"]
        ),
        lambda f, t: [
            f"the clusters in {f['other_clusters']} were computed on codebook",
            f"tokenizer {f['tok']}",
        ],
    ),
    "init-from-method": Case(
        "a baseline model as the start of an IAR run",
        "train --method iar --init-from RUN",
        lambda f, t: _train(f, t, "--method", "iar", "--clusters", f["clusters"], "--init-from", f["run"]),
        lambda f, t: [
            f"--init-from {f['model']} is a 'baseline' model and --method is iar",
            "clusterar convert",
        ],
    ),
    "clusters-more-than-codes": Case(
        "more clusters than codes",
        "cluster fit --method kmeans --clusters 1000",
        lambda f, t: [
            "cluster",
            "fit",
            "--tokenizer",
            f["tok"],
            "--method",
            "kmeans",
            "--clusters",
            "1000",
            "--out",
            t / "out" / "c.safetensors",
            "--device",
            "cpu",
        ],
        lambda f, t: ["between 1 and the number of codes K=512, got 1000"],
    ),
}


def _half(src: Path, t: Path) -> Path:
    data = src.read_bytes()
    (t / src.name).write_bytes(data[: len(data) // 2])
    return t / src.name


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_file(files, tmp_path, capsys, name):
    case = CASES[name]
    line = error_line(main([str(a) for a in case.argv(files, tmp_path)]), *capsys.readouterr())
    for text in case.expect(files, tmp_path):
        assert text in line, f"{text!r} not in {line!r}"
    assert not re.search(r"load_\w+|Pipeline\.|\w+\(", line), "a Python name in the message"
    assert files_under(tmp_path / "out") == [], "something was written under the output name"
    assert not files["marker"].exists(), "unpickling the .pt ran its code"


def test_the_unsafe_file_would_run_code(files, tmp_path):
    """The .pt of the pickle cases is live: unpickled freely, its payload writes the marker file."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.read_text() == "unpickled"


# ----------------------------------------------------------------------------- images of folder datasets


def _png(path: Path, seed: int, size: int = 32) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def image_folder(root: Path) -> Path:
    """folder:ROOT with two classes of two readable 32x32 PNGs."""
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            _png(root / cls / f"{i}.png", 2 * c + i)
    return root


def _truncated_png(path: Path) -> None:
    _png(path, 9, size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _encode_folder(f: dict[str, Path], root: Path, t: Path, *args) -> list:
    folder = ["--data", f"folder:{root}", "--splits", "train"]
    return ["encode", "--tokenizer", f["tok"], *folder, "--out", t / "out", "--device", "cpu", *args]


# name: (for the table, make the bad input in folder root, words of the error line)
BAD_IMAGES = {
    "corrupt-png": (
        "a truncated PNG",
        lambda r: _truncated_png(r / "cat" / "bad.png"),
        "is truncated or corrupt",
    ),
    "text-as-png": (
        "a text file named .png",
        lambda r: (r / "cat" / "bad.png").write_text("not an image\n"),
        "is not an image",
    ),
    "zero-byte-png": (
        "a 0-byte .png",
        lambda r: (r / "cat" / "bad.png").write_bytes(b""),
        "is empty (0 bytes)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_unreadable_image_stops_encode_and_leaves_no_partial_files(files, tmp_path, capsys, name):
    _, make, problem = BAD_IMAGES[name]
    root = image_folder(tmp_path / "data")
    make(root)
    rc = main([str(a) for a in _encode_folder(files, root, tmp_path, "--on-error", "fail")])
    line = error_line(rc, *capsys.readouterr())  # the progress bar is on: the error starts a line
    assert f"cannot read image {root / 'cat' / 'bad.png'}: it {problem}" in line
    assert "--on-error skip" in line
    assert files_under(tmp_path / "out") == [], "partial or final files left behind"


def test_on_error_skip_lists_the_image(files, tmp_path, capsys):
    root = image_folder(tmp_path / "data")
    _truncated_png(root / "cat" / "bad.png")
    assert main([str(a) for a in _encode_folder(files, root, tmp_path, "--on-error", "skip")]) == 0
    out = capsys.readouterr().out
    tokens = tmp_path / "out" / "train.safetensors"
    assert f"{tokens}: codes [4, 2, 64] int16, 1 skipped" in out
    assert TokenFile.open(tokens).meta["skipped"] == [str(root / "cat" / "bad.png")]
    assert files_under(tmp_path / "out") == ["train.safetensors"]
    assert main(["info", str(tokens)]) == 0
    assert str(root / "cat" / "bad.png") in capsys.readouterr().out


def test_failure_after_progress_keeps_it_and_the_same_command_continues(files, tmp_path, capsys):
    """A bad image after some good ones (batches of 1): the progress made is kept and said so; passing
    --on-error skip (or fixing the file in place) continues from it, and the partial files then go."""
    root = image_folder(tmp_path / "data")
    _truncated_png(root / "dog" / "z.png")  # the last image
    argv = [str(a) for a in _encode_folder(files, root, tmp_path, "--batch-size", "1")]
    line = error_line(main(argv), *capsys.readouterr())
    assert f"cannot read image {root / 'dog' / 'z.png'}" in line and "--on-error skip" in line
    assert "The 4 images of train encoded before it are kept in train.safetensors.partial.npy" in line
    assert "the same command continues from there" in line
    assert files_under(tmp_path / "out") == [
        "train.safetensors.partial.json",
        "train.safetensors.partial.npy",
    ]
    assert main([*argv, "--on-error", "skip"]) == 0
    assert ", 1 skipped" in capsys.readouterr().out
    assert files_under(tmp_path / "out") == ["train.safetensors"]
    assert TokenFile.open(tmp_path / "out" / "train.safetensors").meta["skipped"] == [
        str(root / "dog" / "z.png")
    ]


# name: (for the table, make the folder, words of the error line)
BAD_FOLDERS = {
    "empty-class-folder": (
        "an empty class folder",
        lambda r: (image_folder(r) / "emu").mkdir(),
        lambda r: [f"1 of 3 class folders in {r} have no images (emu)", "delete empty class folders"],
    ),
    "no-images-at-all": (
        "a folder with no images",
        lambda r: r.mkdir(),
        lambda r: [f"folder:{r}: {r} has no class sub-folders", "PATH/<class>/<image>"],
    ),
    "images-without-classes": (
        "images directly in the folder, no class folders",
        lambda r: (r.mkdir(), _png(r / "0.png", 0), _png(r / "1.png", 1)),
        lambda r: [f"{r} has no class sub-folders (2 images lie directly in it)", "PATH/<class>/<image>"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_FOLDERS))
def test_bad_image_folder(files, tmp_path, capsys, name):
    _, make, expect = BAD_FOLDERS[name]
    root = tmp_path / "data"
    make(root)
    line = error_line(main([str(a) for a in _encode_folder(files, root, tmp_path)]), *capsys.readouterr())
    for text in expect(root):
        assert text in line, f"{text!r} not in {line!r}"
    assert files_under(tmp_path / "out") == []


# ----------------------------------------------------------------------------- images that are accepted

RED, WHITE = (255, 0, 0), (255, 255, 255)


def odd_image_folder(root: Path) -> Path:
    """One class of readable but unusual images, with RGB references of what they must turn into."""
    a = root / "a"
    a.mkdir(parents=True)
    _png(a / "normal.png", 0)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(a / "tiny.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(a / "grey16.png")
    Image.new("RGB", (32, 32), (156,) * 3).save(a / "grey16-ref.png")  # 40000 / 257 = 155.6
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(a / "cmyk.jpg", quality=95)  # red
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (*RED, 255)  # opaque red
    rgba[:, 16:] = (0, 0, 255, 0)  # fully transparent blue: the white background shows
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    ref = np.zeros((32, 32, 3), np.uint8)
    ref[:, :16], ref[:, 16:] = RED, WHITE
    Image.fromarray(ref).save(a / "rgba-ref.png")
    return root


@pytest.fixture(scope="module")
def odd_images(files, tmp_path_factory) -> dict:
    """`clusterar encode` of the odd images in a fresh process, as a user runs it: its real stderr."""
    t = tmp_path_factory.mktemp("odd")
    root = odd_image_folder(t / "data")
    argv = _encode_folder(files, root, t, "--views", "none")
    proc = subprocess.run(
        [sys.executable, "-m", "clusterar", *map(str, argv)], capture_output=True, text=True, timeout=300
    )
    tf = TokenFile.open(t / "out" / "train.safetensors") if proc.returncode == 0 else None
    return {"proc": proc, "root": root, "tokens": tf}


def warning_lines(err: str) -> list[str]:
    """The WARNING lines of stderr as a terminal shows them (a progress bar redraws after '\\r')."""
    return [seg for line in err.split("\n") for seg in line.split("\r") if seg.startswith("WARNING")]


def _codes(odd: dict, name: str) -> np.ndarray:
    paths = [str(odd["root"] / "a" / n) for n in sorted(p.name for p in (odd["root"] / "a").iterdir())]
    return np.asarray(odd["tokens"].codes[paths.index(str(odd["root"] / "a" / name))])


def _pixels(odd: dict, name: str) -> np.ndarray:
    return read_image(str(odd["root"] / "a" / name), 32).astype(int)


def test_odd_images_are_encoded(odd_images):
    proc = odd_images["proc"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert odd_images["tokens"].codes.shape == (7, 1, 64) and odd_images["tokens"].meta["skipped"] == []


def test_a_1x1_image_is_upscaled_with_a_warning(odd_images):
    root = odd_images["root"]
    lines = [line for line in warning_lines(odd_images["proc"].stderr) if "upscaled" in line]
    assert lines == [
        f"WARNING clusterar.tokens: 1 of 7 images of folder:{root} (train) is smaller than 32x32 and was "
        f"upscaled, so it is blurry; the smallest is 1x1: {root / 'a' / 'tiny.png'}"
    ]
    assert odd_images["tokens"].meta["upscaled"] == 1
    assert (_pixels(odd_images, "tiny.png") == (10, 200, 30)).all()


@pytest.mark.parametrize(
    "name, mode, reference",
    [
        ("grey16.png", "I;16", "grey16-ref.png"),
        ("cmyk.jpg", "CMYK", None),
        ("rgba.png", "RGBA", "rgba-ref.png"),
    ],
)
def test_non_rgb_images_are_converted_with_a_warning(odd_images, name, mode, reference):
    path = odd_images["root"] / "a" / name
    assert f"WARNING clusterar.data: converted {path} from mode {mode} to RGB" in warning_lines(
        odd_images["proc"].stderr
    )
    pixels = _pixels(odd_images, name)
    if name == "grey16.png":  # 16-bit scaled to 8 bits, not clipped at 255
        assert (pixels == 156).all()
    elif name == "cmyk.jpg":  # C=0 M=255 Y=255 K=0 is red (JPEG: within a few levels)
        assert np.abs(pixels - RED).max() <= 3
    else:  # transparent pixels on white
        assert (pixels[:, :16] == RED).all() and (pixels[:, 16:] == WHITE).all()
    if reference is not None:  # and the command encoded exactly those pixels
        assert np.array_equal(_codes(odd_images, name), _codes(odd_images, reference))


# ------------------------------------------------- the table of docs/reliability.md (docs/make_reliability.py)


def reliability_table() -> str:
    """Run every case above once, in a temporary folder, and return the Markdown table of what users get."""
    import contextlib
    import io
    import logging
    import tempfile

    logging.basicConfig(handlers=[logging.NullHandler()])  # warnings: from the subprocess run below

    def run(argv: list) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
        return rc, out.getvalue(), err.getvalue()

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        fdir = base / "files"
        fdir.mkdir()
        f = build_files(fdir)
        n = iter(range(10_000))

        def fresh() -> Path:
            t = base / f"case{next(n)}"
            t.mkdir()
            return t

        def error(argv: list) -> str:
            return error_line(*run(argv))

        for kind_name, how in GRID:
            t = fresh()
            kind = KINDS[kind_name]
            rows.append(
                (
                    f"{kind_name}: {DAMAGE[how][0]}",
                    kind.command,
                    error(kind.argv(f, damaged_file(f, kind, how, t), t)),
                )
            )
        for case in CASES.values():
            t = fresh()
            rows.append((case.input, case.command, error(case.argv(f, t))))
        for desc, make, _ in BAD_IMAGES.values():
            t = fresh()
            root = image_folder(t / "data")
            make(root)
            rows.append((f"folder data: {desc}", "encode --data folder:D", error(_encode_folder(f, root, t))))
        t = fresh()
        root = image_folder(t / "data")
        _truncated_png(root / "cat" / "bad.png")
        rc, out, _ = run(_encode_folder(f, root, t, "--on-error", "skip"))
        rows.append(
            ("folder data: a truncated PNG", "encode ... --on-error skip", f"(exit {rc}) {out.strip()}")
        )
        t = fresh()
        root = image_folder(t / "data")
        _truncated_png(root / "dog" / "z.png")
        rows.append(
            (
                "folder data: a truncated PNG after 4 good images",
                "encode ... --batch-size 1",
                error(_encode_folder(f, root, t, "--batch-size", "1")),
            )
        )
        for desc, make, _ in BAD_FOLDERS.values():
            t = fresh()
            make(t / "data")
            rows.append(
                (f"folder data: {desc}", "encode --data folder:D", error(_encode_folder(f, t / "data", t)))
            )
        t = fresh()
        root = odd_image_folder(t / "data")
        argv = _encode_folder(f, root, t, "--views", "none")
        proc = subprocess.run(
            [sys.executable, "-m", "clusterar", *map(str, argv)], capture_output=True, text=True
        )
        warnings = warning_lines(proc.stderr)
        for desc, word in (
            ("a 1x1 image", "upscaled"),
            ("a 16-bit grey PNG", "grey16.png"),
            ("a CMYK JPEG", "cmyk.jpg"),
            ("an RGBA PNG", "rgba.png"),
        ):
            line = next(w for w in warnings if word in w)
            rows.append(
                (f"folder data: {desc}", "encode --data folder:D", f"(exit {proc.returncode}) {line}")
            )
        prefix = str(base) + "/"

    def cell(text: str, limit: int = 300) -> str:
        text = text.replace(prefix, "").replace("|", "\\|")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    lines = ["| input | command | what the user gets (the actual message, shortened) |", "|---|---|---|"]
    lines += [f"| {cell(i)} | `clusterar {c}` | {cell(m)} |" for i, c, m in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reliability_table())

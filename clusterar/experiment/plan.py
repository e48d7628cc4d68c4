"""An experiment sized for the user's own image folder: `clusterar experiment --data folder:PATH --minutes M`.

The demo's footing (its tokenizer preset, transformer, batch, learning rate, sampling and cluster counts,
clusterar/specs/demo.toml) on the user's folder, with a budget chosen by measurement instead of a spec
written by hand: a tokenizer step (on the folder's own images), a transformer step and a sampled image are
timed here, on this device, and the plan takes the most epochs (and three seeds, when three fit with
enough epochs) whose predicted time fits the minutes. The schedule is constant, so that runs that have not
converged can be trained on exactly (`clusterar experiment OUT/spec.toml --epochs N`, which the report
prints). The plan is an ordinary spec, written to OUT/spec.toml with the measurements in its comments, and
reused when the command is run again on the same folder.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import torch

from ..data import load_dataset
from ..errors import ClusterarError
from ..fileio import write_text_atomic
from ..gpt import GPT, gpt_preset
from ..methods import Method
from ..runtime import autocast, pick_device
from ..sample import generate
from ..tokenizer import VQModel, vq_preset
from ..train.tokenizer import TokenizerRun, TokenizerTrainConfig
from .spec import SPECS_DIR, ExperimentSpec, load_spec, parse_spec, tomllib

PLAN_FILE = "spec.toml"
MIN_EPOCHS = 3  # three evaluations, the fewest the convergence test reads
SEEDS = [0, 1, 2]  # when they fit with at least SEEDED_EPOCHS epochs each
SEEDED_EPOCHS = 12
MAX_EPOCHS = 60  # past this, the time is better spent on seeds
# Checked against the demo by `python benchmarks/bench_demo.py --plan` (benchmarks/RESULTS.md, section
# "plan"): with SCORING (scoring samples, classifier features and FID, costs about 1.4x drawing them) the
# probes predicted each stage of the demo within about 20% (2026-12-05: tokenizer 0.82-1.20x, training
# 0.91-1.18x, sampling 0.82-1.09x; the rest, token files, clusters, ceiling and report, took 11 s) and the
# whole with MARGIN at 1.00-1.30x: a plan errs towards finishing inside its minutes.
SCORING = 1.4
FIXED_SECONDS = 20.0
MARGIN = 1.1


@dataclass
class Folder:
    """What the plan needs to know of the user's folder."""

    data: str  # folder:PATH
    train: int
    val: int
    classes: int


@dataclass
class Rates:
    """Seconds per unit of work on this device (`measure`)."""

    tokenizer_step: float  # one step of the demo's tokenizer on the folder's images
    train_step: float  # one optimizer step of the demo's transformer at its batch
    sample: float  # one sampled image (CFG, the demo's transformer) and its decoding


def read_folder(path: str) -> Folder:
    """The folder's split sizes and classes; it must have train/ and val/ (held-out images are what the
    reference and the feature classifier's check need)."""
    data = f"folder:{path}"
    train, val = load_dataset(data, "train"), load_dataset(data, "val")
    if train.root == val.root:
        raise ClusterarError(
            f"{path} has no train/ and val/ split folders: the experiment needs held-out images (its FID "
            f"reference and the feature classifier's check). Move about a tenth of each class into "
            f"{Path(path) / 'val' / 'CLASS'} and the rest into {Path(path) / 'train' / 'CLASS'}"
        )
    if train.class_names != val.class_names:
        missing = sorted(set(train.class_names) ^ set(val.class_names))
        raise ClusterarError(
            f"{path}: train/ and val/ must hold the same class folders; only one of them has {', '.join(missing[:10])}"
        )
    return Folder(data, len(train), len(val), len(train.class_names))


def base_spec() -> dict:
    """The demo's spec: the footing every folder experiment stands on."""
    return tomllib.loads((SPECS_DIR / "demo.toml").read_text())


def _timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` after one untimed call (allocations, first-call costs)."""
    fn()
    tic = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - tic) / repeats


def measure(folder: Folder, device: str, base: dict) -> Rates:
    """Time the three units of work on this device: a few seconds."""
    tok, train = base["tokenizer"], base["train"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TokenizerTrainConfig(
            data=folder.data,
            preset=tok["preset"],
            image_size=base["image_size"],
            steps=10,
            batch_size=min(tok["batch_size"], folder.train),
            device=device,
        )
        run = TokenizerRun(cfg, Path(tmp), resume=False)
        tokenizer_step = _timed(run.step_once, 3)
    dev = pick_device(device)
    vq = VQModel(vq_preset(tok["preset"])).to(dev).eval()
    grid = base["image_size"] // vq.config.downsample
    k = vq.config.codebook_size
    model = GPT(gpt_preset(train["model"], vocab_size=k, grid_size=grid, num_classes=folder.classes)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    method = Method("baseline", codebook_size=k)
    codes = torch.randint(0, k, (train["batch_size"], grid * grid), device=dev)
    labels = torch.randint(0, folder.classes, (train["batch_size"],), device=dev)

    def train_step() -> None:
        inputs, targets, coarse = method.prepare(codes)
        with autocast(dev):
            logits = model(inputs, labels)
        method.loss(logits, targets, coarse)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    train_seconds = _timed(train_step, 5)
    model.eval()
    batch = torch.arange(50, device=dev) % folder.classes

    def sample() -> None:
        with torch.no_grad():
            vq.decode(generate(model, batch, cfg_scale=2.0, compile=False))

    return Rates(tokenizer_step, train_seconds, _timed(sample, 1) / len(batch))


def stages(
    folder: Folder,
    rates: Rates,
    base: dict,
    epochs: float,
    seeds: int,
    samples: int,
    evals: int = 3,
    sweep: int = 0,
) -> dict[str, float]:
    """Predicted seconds per stage: the tokenizer, four models per seed (baseline, IAR, CTF's two stages),
    `evals` evaluations of `samples` per run and seed, the speed rounds (3 pipelines x 4 x 64 images) and
    `sweep` more sampled images per run."""
    steps_per_epoch = math.ceil(folder.train / base["train"]["batch_size"])
    drawn = 3 * seeds * (evals * samples + sweep) + 3 * 4 * 64
    return {
        "tokenizer": base["tokenizer"]["steps"] * rates.tokenizer_step,
        "training": 4 * seeds * epochs * steps_per_epoch * rates.train_step,
        "sampling": SCORING * drawn * rates.sample,
        "rest": FIXED_SECONDS,
    }


def predict(folder: Folder, rates: Rates, base: dict, epochs: int, seeds: int, samples: int) -> float:
    """Seconds the planned experiment should take (three evaluations, no sweep), with the margin."""
    return MARGIN * sum(stages(folder, rates, base, epochs, seeds, samples).values())


def plan(folder: Folder, rates: Rates, minutes: float, base: dict) -> dict:
    """The spec: the demo's on this folder, with the epochs and seeds that fit `minutes`."""
    samples = max(folder.classes * 10, min(500, 2 * folder.val))
    samples -= samples % folder.classes
    budget = 60 * minutes

    def most_epochs(seeds: int) -> int:
        fits = [
            e
            for e in range(MIN_EPOCHS, MAX_EPOCHS + 1, 3)
            if predict(folder, rates, base, e, seeds, samples) <= budget
        ]
        return max(fits, default=0)

    seeded = most_epochs(len(SEEDS))
    seeds, epochs = (SEEDS, seeded) if seeded >= SEEDED_EPOCHS else ([0], max(MIN_EPOCHS, most_epochs(1)))
    d = base | {"name": _name(folder.data), "data": folder.data, "seeds": seeds}
    d.pop("expected", None)  # the demo's measured range is the demo's
    d["train"] = base["train"] | {"epochs": epochs, "schedule": "constant"}
    d["train"].pop("min_lr", None)
    d["eval"] = base["eval"] | {"every_epochs": epochs // 3, "samples": samples}
    d["sweeps"] = []
    seconds = predict(folder, rates, base, epochs, len(seeds), samples)
    d["plan"] = {"minutes": minutes, "predicted_minutes": round(seconds / 60, 1), "fits": seconds <= budget}
    return d


def _name(data: str) -> str:
    """The experiment's name from the folder's: ASCII letters, digits, '.', '_' and '-' (a spec name)."""
    name = Path(data[len("folder:") :]).resolve().name
    stem = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in name)
    return f"folder-{stem or 'data'}"[:64]


def write_plan(d: dict, folder: Folder, rates: Rates, path: Path) -> None:
    """OUT/spec.toml: the plan as a spec, its measurements in the comments."""
    p = d.pop("plan")
    head = [
        f"# Planned by `clusterar experiment --data {d['data']} --minutes {p['minutes']:g}` on "
        f"{time.strftime('%Y-%m-%d')}: the demo's spec (clusterar/specs/demo.toml) on this folder.",
        f"# The folder: {folder.train} train and {folder.val} val images, {folder.classes} classes.",
        f"# Measured here: tokenizer step {rates.tokenizer_step * 1e3:.0f} ms, transformer step "
        f"{rates.train_step * 1e3:.0f} ms, {rates.sample * 1e3:.1f} ms per sampled image.",
        f"# Predicted: {p['predicted_minutes']:g} minutes for {d['train']['epochs']} epochs x "
        f"{len(d['seeds'])} seed(s)"
        + ("" if p["fits"] else f" (more than the {p['minutes']:g} asked: the least that is useful)")
        + ".",
        "# The schedule is constant: `clusterar experiment THIS_FILE --epochs N --out FOLDER` trains the same",
        "# runs on to N epochs and keeps every evaluation made so far.",
        "",
    ]
    write_text_atomic(path, "\n".join(head) + tomli_w.dumps(d))


def plan_experiment(
    data: str,
    minutes: float | None,
    out: str | None,
    device: str | None,
    inception: str | None,
    write: bool = True,
) -> tuple[Path, ExperimentSpec]:
    """A folder experiment's spec file and spec: OUT/spec.toml as planned before (reused: the same runs),
    else a new plan for `minutes` (default 30) measured on `device`, checked, then written unless `write`
    is False (`--check`)."""
    path = data[len("folder:") :] if data.startswith("folder:") else data
    folder = read_folder(str(Path(path).expanduser().resolve()))  # the plan works from any folder
    out_dir = Path(out) if out is not None else Path("runs") / _name(folder.data)
    spec_file = out_dir / PLAN_FILE
    if spec_file.exists():
        planned = tomllib.loads(spec_file.read_text()).get("data")
        if planned != folder.data:
            raise ClusterarError(
                f"{spec_file} plans an experiment on {planned}, not {folder.data}; choose another --out "
                "(that folder is left as it is)"
            )
        print(f"plan: reusing {spec_file} (delete it to plan again; `--epochs N` trains the runs on)")
        return spec_file, load_spec(spec_file)
    base = base_spec()
    rates = measure(folder, device or base["device"], base)
    d = plan(folder, rates, 30.0 if minutes is None else minutes, base)
    if inception is not None:
        d["eval"] |= {"inception": inception, "extractor": "inception"}
    p = d["plan"]
    spec = parse_spec({k: v for k, v in d.items() if k != "plan"}, str(spec_file))  # refused before written
    print(
        f"plan: {folder.train} train / {folder.val} val images, {folder.classes} classes; "
        f"{d['train']['epochs']} epochs x {len(d['seeds'])} seed(s), about {p['predicted_minutes']:g} minutes "
        f"(measured here: a tokenizer step {rates.tokenizer_step:.2f} s, a transformer step "
        f"{rates.train_step * 1e3:.0f} ms, {rates.sample * 1e3:.0f} ms per image) -> "
        + (str(spec_file) if write else "not written (--check)")
    )
    if write:
        write_plan(d, folder, rates, spec_file)
    return spec_file, spec

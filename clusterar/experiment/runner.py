"""Running a spec: each stage once, cached on disk, resumable.

Every stage writes its result atomically with its settings (`stage_record`, a `clusterar.resume.Record`)
and is skipped when the result exists and was produced with the same settings; a changed setting is an
error naming the stage and the settings, never a silent reuse of stale results (the speed measurement
alone starts over, saying so, when the final models it measured changed). The
stages themselves (fit clusters, encode splits, sample a model, score a folder) are `clusterar.stages`, the
same functions the command line calls; this module adds the caching and the order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..compare import (
    aggregate,
    check_claim,
    comparison_table,
    convergence,
    sweep_verdicts,
    verdict_pairs,
    verdicts,
)
from ..convert import convert
from ..data import load_dataset, to_uint8
from ..errors import ClusterarError
from ..fileio import atomic_path, read_json, read_meta, write_json, write_text_atomic
from ..killpoints import kill_point
from ..lock import folder_lock
from ..metrics import evaluate_images, make_extractor, open_images
from ..model_file import MODEL_FILE, read_model_info
from ..resume import Record, relative_to_root
from ..runtime import describe_machine, pick_device
from ..sample import Pipeline, SampleSettings, make_labels, write_ctf_pipeline
from ..stages import encode_splits, fit_clusters, sample_model
from ..tokenizer import TOKENIZER_FILE, load_tokenizer, resolve_tokenizer_path, tokenizer_fingerprint
from ..tokens import TokenFile
from ..train import BUDGET_FIELDS, CHECKPOINT, SESSION_FIELDS, SNAPSHOT_DIR, train, validation_loss
from ..train.tokenizer import train_tokenizer
from .report import fmt, pct, plot_report, render_report, trust_headline
from .spec import (
    ExperimentSpec,
    RunSpec,
    claim_against,
    eval_extractor,
    load_spec,
    reference_run,
    sample_settings,
    spec_seeds,
    sweep_runs,
    tokenizer_config,
    train_configs,
)


def stage_record(path: Path, what: str, out: Path) -> Record:
    """The record of a stage's result ({"settings": ..., "result": ...}), refused when the spec now asks
    for other settings (`clusterar.resume`'s policy). Paths inside the experiment folder `out` are kept
    relative to it: a copied or moved experiment folder reuses its work."""
    todo = f"Delete {path.parent} to redo it, or write the experiment to another --out"
    return Record(path, f"the {what}", todo, root=out)


def stage_result(
    path: Path, settings: dict, what: str, out: Path, restart: bool | Collection[str] = False
) -> Any | None:
    """The stored result of a finished stage, None if not finished; results made with other settings are
    refused (or, given `restart`, started over)."""
    done = stage_record(path, what, out).check(settings, restart)
    return None if done is None else done["result"]


def save_stage(path: Path, settings: dict, result: Any, out: Path) -> None:
    stage_record(path, "", out).write(settings, result=result)


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)


class InvocationClock:
    """This invocation's wall times in OUT/timings.jsonl (one line per invocation), rewritten after every
    stage and every trained or evaluated model, so that an invocation that was killed still counts, up to
    its last finished piece, in the folder's total cost."""

    def __init__(self, out: Path):
        self.path, self.t0 = out / "timings.jsonl", time.perf_counter()
        self.id = f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}"
        self.stages: dict[str, float] = {}

    def tick(self, stage: str | None = None, since: float | None = None) -> None:
        """Record `stage` as having taken the time since `since`, and the invocation's time so far."""
        if stage is not None and since is not None:
            self.stages[stage] = elapsed(since)
        entry = {"date": self.id[:16], "invocation": self.id, **self.stages}
        entry["total_this_invocation"] = elapsed(self.t0)
        kept = [line for line in self.lines() if json.loads(line).get("invocation") != self.id]
        write_text_atomic(self.path, "".join(line + "\n" for line in [*kept, json.dumps(entry)]))

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def history(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]


def inside(out: Path, path: Path) -> Path:
    """`path`, refused (ClusterarError) unless it lies inside the folder `out` (the experiment's --out, or
    its runs/ or clusters/): the second line of defence behind the spec's name rule (check_name), checked
    on the spelled paths, so a name such as "../x" or "/x" never writes elsewhere (symlinks the user made
    inside `out` are theirs to follow)."""
    root = os.path.normpath(os.path.abspath(out))
    full = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([root, full]) != root or full == root:
        raise ClusterarError(
            f"{path} lies outside {out}, where the experiment writes it; spec names must be plain names "
            "(check the spec with --check)"
        )
    return path


def stage_tokenizer(spec: ExperimentSpec, out: Path, progress: bool = True) -> Path:
    """Train the spec's tokenizer (or take the given one); return the path of tokenizer.safetensors."""
    if spec.tokenizer.path is not None:
        return resolve_tokenizer_path(spec.tokenizer.path)
    cfg = tokenizer_config(spec)
    tok_dir = out / "tokenizer"
    # the tokenizer run's own config.json is its record; a training run in progress resumes on its own rules
    todo = "Delete it or write the experiment to another --out"
    Record(tok_dir / "config.json", "a tokenizer", todo, key="train").check(asdict(cfg), where=tok_dir)
    if (tok_dir / TOKENIZER_FILE).exists():
        print(f"tokenizer: reusing {tok_dir / TOKENIZER_FILE}")
    else:
        print(f"tokenizer: training {cfg.preset} on {cfg.data} for {cfg.steps} steps")
        train_tokenizer(cfg, tok_dir, resume=(tok_dir / CHECKPOINT).exists(), progress=progress)
    return tok_dir / TOKENIZER_FILE


def stage_tokens(
    spec: ExperimentSpec, tokenizer_path: Path, out: Path, progress: bool = True
) -> dict[str, Path]:
    """One token file per split (train with the data's default views, val without), reused when made by
    this tokenizer with those views."""
    views = {"train": "auto", "val": "none"}
    return encode_splits(
        tokenizer_path,
        spec.data,
        views,
        out / "tokens",
        image_size=spec.image_size,
        device=spec.device,
        reuse=True,
        progress=progress,
    )


def stage_clusters(spec: ExperimentSpec, tokenizer_path: Path, out: Path) -> dict[str, Path]:
    """Fit every [clusters.NAME] table on the tokenizer's codebook, once."""
    paths: dict[str, Path] = {}
    fp = tokenizer_fingerprint(tokenizer_path)
    for name, c in spec.clusters.items():
        path = inside(out / "clusters", out / "clusters" / f"{name}.safetensors")
        paths[name] = path
        settings = {**asdict(c), "tokenizer": fp}
        if (
            stage_result(path.with_suffix(".json"), settings, f"clusters {name}", out) is not None
            and path.exists()
        ):
            print(f"clusters: reusing {path}")
            continue
        clusters, record = fit_clusters(tokenizer_path, c.method, c.n, seed=c.seed)
        clusters.save(path)
        result = {k: record[k] for k in ("objective", "min_size", "max_size", "seconds")}
        save_stage(path.with_suffix(".json"), settings, result, out)
        print(
            f"clusters: {name} ({c.method}, {c.n}) objective {clusters.objective:.2f} in {result['seconds']} s"
        )
    return paths


@dataclass
class SharedInputs:
    """What every run shares: the tokenizer, the token files and the clusters files."""

    tokenizer: Path
    tokens: dict[str, Path]
    clusters: dict[str, Path]


def _train_settings(cfg: Any) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in SESSION_FIELDS}


def stage_train(cfg: Any, run_dir: Path, what: str, out: Path, progress: bool = True) -> dict:
    """Train one model into `run_dir`, or reuse it; an interrupted run resumes from its checkpoint, a
    finished one on a constant schedule trains on when its budget grew (`_extends`)."""
    record = run_dir / "done.json"
    settings = _train_settings(cfg)
    rec = stage_record(record, what, out)
    saved = rec.read()
    if saved is not None and _extends(rec.portable(saved["settings"]), rec.portable(settings)):
        print(f"train: extending {what} to {cfg.epochs or cfg.steps} {'epochs' if cfg.epochs else 'steps'}")
    else:
        done = stage_result(record, settings, what, out)  # changed settings are refused here
        if done is not None and (run_dir / MODEL_FILE).exists():
            print(f"train: reusing {what} ({run_dir})", flush=True)
            return done
    resume = (run_dir / CHECKPOINT).exists()
    print(
        f"train: {'resuming' if resume else 'training'} {what} ({cfg.method}, {cfg.model}) -> {run_dir}",
        flush=True,
    )
    summary = train(cfg, run_dir, resume=resume, progress=progress)
    save_stage(record, settings, summary, out)
    return summary


def stage_convert(
    spec: ExperimentSpec, run: RunSpec, inputs: SharedInputs, out: Path, seed: int
) -> dict[str, Path]:
    """The starting point of a run with `start`: the start run's final model (same seed) converted to the
    run's method (`clusterar.convert`), written once into RUN/start; returns {stage: model file}."""
    source = run_dir(spec, out, run.start, seed) / MODEL_FILE
    folder = run_dir(spec, out, run.name, seed) / "start"
    record = folder / "done.json"
    settings = {
        "source": str(source),
        "source_step": read_model_info(source).step,
        "method": run.method,
        "head": run.start_head,
        "clusters": str(inputs.clusters[run.clusters]) if run.clusters else None,
    }
    done = stage_result(record, settings, f"conversion of {run.start} for {run.name}", out)
    if done is None:
        if folder.exists():  # a conversion killed before its record: redo it
            shutil.rmtree(folder)
        print(f"convert: {run.start} -> {run.name} ({run.method}) -> {folder}", flush=True)
        paths = convert(
            source,
            run.method,
            folder,
            clusters=settings["clusters"],
            head=run.start_head,
            tokens=inputs.tokens["train"] if run.start_head == "lsq" else None,
            seed=seed,
        )
        done = {k: str(v.relative_to(folder)) for k, v in paths.items()}
        save_stage(record, settings, done, out)
    return {k: folder / v for k, v in done.items() if k != "pipeline"}


def _extends(saved: dict, now: dict) -> bool:
    """Is `now` the finished run `saved` with a larger budget on a constant schedule? Then training on from
    its checkpoint computes what a straight run to the new budget would (the trainer's extension rule, once
    the warm-up is over), and every snapshot evaluated so far stays valid: an experiment whose baseline has
    not converged can be given more epochs."""
    others = {k for k in set(saved) | set(now) if k not in BUDGET_FIELDS}
    if any(saved.get(k) != now.get(k) for k in others) or now.get("schedule") != "constant":
        return False
    key = "epochs" if now.get("epochs") is not None else "steps"
    return saved.get(key) is not None and now[key] > saved[key]


def run_dir(spec: ExperimentSpec, out: Path, run: str, seed: int) -> Path:
    """runs/RUN, or runs/RUN/seed-S when the spec repeats runs over several seeds."""
    base = out / "runs" / run
    return inside(out / "runs", base / f"seed-{seed}" if len(spec_seeds(spec)) > 1 else base)


def _snapshots(run_dir: Path) -> list[tuple[float, int, Path]]:
    """(epoch, step, model file) of every snapshot of a run, the final model when there are none."""
    files = sorted((run_dir / SNAPSHOT_DIR).glob("model-step*.safetensors"))
    if not files:
        files = [run_dir / MODEL_FILE]
    infos = [read_model_info(f) for f in files]
    # a fine-tuned run counts the epochs of the model it started from (`init_epoch`): one epoch axis for all
    return [(i.total_epoch, int(i.step), f) for i, f in zip(infos, files, strict=True)]


@dataclass
class EvalPoint:
    """One evaluated model: a run at an epoch (a model file, or a CTF pipeline over two of them)."""

    run: str
    method: str
    epoch: float
    source: Path  # what Pipeline.load takes
    models: dict[str, Path]  # stage -> model file (for validation accuracy)
    steps: dict[str, int]  # stage -> training step of that file
    folder: Path  # the run's folder; evaluations go to its evals/
    seed: int = 0  # the run's training seed, also the seed its samples are drawn with


def run_points(spec: ExperimentSpec, run: RunSpec, out: Path, seed: int) -> list[EvalPoint]:
    """The models of a trained run to evaluate, in epoch order (CTF: stage-1 and stage-2 snapshots paired
    in order, with a pipeline file per pair)."""
    base = run_dir(spec, out, run.name, seed)
    start = base / "start"
    if run.method != "ctf":
        first = _snapshots(start) if run.start else []  # the converted model, before fine-tuning
        return [
            EvalPoint(run.name, run.method, e, f, {"model": f}, {"model": n}, base, seed)
            for e, n, f in first + _snapshots(base)
        ]
    coarse, refiner = _snapshots(base / "coarse"), _snapshots(base / "refiner")
    if run.start:
        coarse, refiner = _snapshots(start / "coarse") + coarse, _snapshots(start / "refiner") + refiner
    if len(coarse) != len(refiner):
        raise ClusterarError(
            f"run {run.name!r}: {len(coarse)} stage-1 snapshots but {len(refiner)} stage-2 snapshots; give both "
            "stages the same epochs and batch size, or delete the run folder to retrain"
        )
    points = []
    for (e1, n1, f1), (_, n2, f2) in zip(coarse, refiner, strict=True):
        name = f1.stem.replace("model-", "") if f1.parent.parent != start else "start"
        path = base / "pipelines" / f"{name}.json"
        if not path.exists():
            write_ctf_pipeline(f1, f2, path)
        points.append(
            EvalPoint(
                run.name,
                "ctf",
                e1,
                path,
                {"coarse": f1, "refiner": f2},
                {"coarse": n1, "refiner": n2},
                base,
                seed,
            )
        )
    return points


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# SampleSettings fields added after evaluations were first stored, with the value that drew them: left out
# of an evaluation's key at that value, so that the evaluations stored before stay valid
LATER_FIELDS = {"stage2": "refiner"}


def _settings_key(settings: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if LATER_FIELDS.get(k, object()) != v}


class Evaluator:
    """Samples a point, scores the samples (FID, IS, precision, recall) and the val tokens (accuracies).

    Every result is stored under the point's folder, keyed by a hash of its settings, so a rerun reuses
    it and a changed setting computes a new one beside it.
    """

    def __init__(self, spec: ExperimentSpec, inputs: SharedInputs, out: Path, progress: bool = True):
        self.spec, self.inputs, self.out, self.progress = spec, inputs, out, progress
        self.device = pick_device(spec.device)
        ev = spec.eval
        if spec.data.startswith("folder:"):
            root = Path(spec.data[len("folder:") :])
            self.reference = str(root / ev.reference if (root / ev.reference).is_dir() else root)
        else:
            self.reference = f"{spec.data}:{ev.reference}"
        extractor = (
            f"inception:{ev.inception}" if eval_extractor(spec) == "inception" else f"classifier:{spec.data}"
        )
        ref_source = open_images(self.reference, spec.image_size, require_images=False)
        self.extractor = make_extractor(extractor, ref_source, device=self.device, progress=progress)

    def _where(self, point: EvalPoint, settings: dict[str, Any]) -> tuple[dict, Path]:
        """The settings that identify an evaluation, and its folder (named by their hash)."""
        key = {
            "models": {k: str(v) for k, v in point.models.items()},
            "steps": point.steps,
            # the sampling as drawn (the method's defaults filled in), so equal settings share a result
            "settings": _settings_key(SampleSettings.for_method(point.method, **settings)),
            "samples": self.spec.eval.samples,
            "seed": point.seed,
            "reference": self.reference,
            "extractor": self.extractor.fingerprint,
        }
        return key, point.folder / "evals" / _key(relative_to_root(key, self.out))

    def evaluate(self, point: EvalPoint, settings: dict[str, Any], what: str) -> dict:
        ev = self.spec.eval
        key, folder = self._where(point, settings)
        record = folder / "eval.json"
        done = stage_result(record, key, what, self.out)
        if done is not None:
            return done
        t0 = time.perf_counter()
        summary = sample_model(
            point.source,
            folder,
            n=ev.samples,
            seed=point.seed,
            per_class=True,
            settings=settings,
            method=point.method,
            batch_size=ev.batch_size,
            write_images=False,
            device=self.spec.device,
            progress=self.progress,
        )
        metrics = evaluate_images(
            folder / "samples.npz",
            self.reference,
            extractor=self.extractor,
            device=self.device,
            progress=False,
            image_size=self.spec.image_size,
        )
        val = {
            stage: validation_loss(path, self.inputs.tokens["val"], device=self.device)
            for stage, path in point.models.items()
        }
        result = {
            "run": point.run,
            "method": point.method,
            "epoch": point.epoch,
            **{k: metrics[k] for k in ("fid", "inception_score", "precision", "recall")},
            # does a sample show the class it was asked for (the classifier's top-1 agreement), and how
            # well the classifier reads real val images (the ceiling of that number)
            "class_accuracy": metrics.get("class_accuracy"),
            "extractor_val_accuracy": metrics.get("extractor_val_accuracy"),
            "val": val,
            "val_acc_token": _val_pick(val, "acc_token"),
            "val_acc_cluster": _val_pick(val, "acc_cluster"),
            "val_loss": _val_pick(val, "loss"),
            "seed": point.seed,
            "step": max(point.steps.values()),
            "images_per_s": summary["images_per_s"],
            "grid": str((folder / "grid.png").relative_to(self.out)),
            "n_samples": metrics["n_samples"],
            "n_reference": metrics["n_reference"],
            "seconds": elapsed(t0),
        }
        save_stage(record, key, result, self.out)
        return result

    def ceiling(self, images: dict[str, Path]) -> dict[str, dict]:
        """The metrics of the tokenizer's val reconstructions and of real train images (see
        stage_reconstructions) against the same reference with the same extractor as every run."""
        out = {}
        for name, path in images.items():
            key = {"images": str(path), "reference": self.reference, "extractor": self.extractor.fingerprint}
            record = path.with_suffix(".eval.json")
            done = stage_result(record, key, f"{name} ceiling evaluation", self.out)
            if done is None:
                m = evaluate_images(
                    path,
                    self.reference,
                    extractor=self.extractor,
                    device=self.device,
                    progress=False,
                    image_size=self.spec.image_size,
                )
                done = {k: m[k] for k in ("fid", "inception_score", "precision", "recall", "class_accuracy")}
                done["n_samples"] = m["n_samples"]
                save_stage(record, key, done, self.out)
            out[name] = done
        return out


def stage_reconstructions(
    spec: ExperimentSpec, inputs: SharedInputs, out: Path, progress: bool = True
) -> dict[str, Path]:
    """The images that bound every run's scores, as ADM npz files with labels (written once):

    - `tokenizer`: the val token file decoded by the tokenizer, i.e. the val images as the best possible
      transformer on these tokens would draw them (the tokenizer's ceiling);
    - `real`: real train images, class-balanced, as many as an evaluation has samples: what real data
      scores against the reference at this sample size (FID is biased upwards for small sets).
    """
    folder = out / "ceiling"
    paths = {"tokenizer": folder / "tokenizer-val.npz", "real": folder / "real-train.npz"}
    settings = {
        "tokenizer": tokenizer_fingerprint(inputs.tokenizer),
        "samples": spec.eval.samples,
        "data": spec.data,
        "image_size": spec.image_size,
    }
    record = folder / "images.json"
    if stage_result(record, settings, "ceiling images", out) is not None and all(
        p.exists() for p in paths.values()
    ):
        return paths
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(inputs.tokenizer, device)
    tf = TokenFile.open(inputs.tokens["val"])
    recon = []
    for i in tqdm(range(0, len(tf), 250), desc="tokenizer reconstructions", disable=not progress):
        codes, _ = tf.batch(np.arange(i, min(i + 250, len(tf))))
        images = tokenizer.decode(codes.to(device).reshape(len(codes), *tf.grid))
        recon.append(to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy())
    train = load_dataset(spec.data, "train", spec.image_size)
    want, _ = make_labels(spec.eval.samples, train.num_classes, per_class=True)
    labels = train.labels.numpy()
    pick = np.concatenate(
        [np.flatnonzero(labels == c)[: int((want == c).sum())] for c in range(train.num_classes)]
    )
    real = np.stack([train[int(i)][0].permute(1, 2, 0).numpy() for i in pick])
    for path, images, lab in (
        (paths["tokenizer"], np.concatenate(recon), tf.labels),
        (paths["real"], real, labels[pick]),
    ):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, arr_0=images, arr_1=np.asarray(lab, dtype=np.int64))
    save_stage(record, settings, {k: str(v) for k, v in paths.items()}, out)
    return paths


def _val_pick(val: dict[str, dict], key: str) -> float | None:
    """A val figure of the run as a whole: the stage that predicts it (CTF: tokens and loss from the
    refiner, given the true coarse labels; clusters from stage 1)."""
    if "model" in val:
        return val["model"].get(key)
    return val["refiner" if key in ("acc_token", "loss") else "coarse"].get(key)


def stage_speed(
    spec: ExperimentSpec, points: dict[str, EvalPoint], out: Path, rounds: int = 3, batch_size: int = 64
) -> dict[str, dict]:
    """Sampling images/s (tokens and decoding) and parameters of every run's final model.

    Runs are timed in turns, `rounds` times each, and the median kept: on a shared machine, side by side
    is the only fair comparison. Stored in speed.json and reused.
    """

    settings = {
        "runs": {name: str(p.source) for name, p in points.items()},
        "steps": {name: p.steps for name, p in points.items()},
        "rounds": rounds,
        "batch_size": batch_size,
        "device": spec.device,
    }
    record = out / "speed.json"
    # a measurement of the final models: measured again, said so, when they changed (runs added, trained
    # on, or on another device); other settings of the measurement are refused
    done = stage_result(record, settings, "sampling speed", out, restart=("runs", "steps", "device"))
    if done is not None:
        return done
    device = pick_device(spec.device)
    pipes = {name: Pipeline.load(p.source, device=device) for name, p in points.items()}
    rates: dict[str, list[float]] = {name: [] for name in pipes}
    print(f"speed: {len(pipes)} pipelines, batch {batch_size}, {rounds} rounds in turns")
    for pipe in pipes.values():  # warm-up
        pipe.time(batch_size, batches=1, warmup=0)
    for _ in range(rounds):
        for name, pipe in pipes.items():
            rates[name].append(pipe.time(batch_size, batches=1, warmup=0)["images_per_s"])
    result = {
        name: {
            "images_per_s": statistics.median(rates[name]),
            "all": rates[name],
            "params": pipes[name].params(),
        }
        for name in pipes
    }
    save_stage(record, settings, result, out)
    return result


# ----------------------------------------------------------------------------- the whole experiment


def run_experiment(
    spec: ExperimentSpec | str | Path,
    out: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Run (or continue) every stage of a spec into `out` (default runs/NAME); return report.md's path.
    `command`: the command line that runs it again (the report builds its continue command from it).

    The plan (the spec and its folder), then the stages in order, each timed by the clock: the shared
    inputs (1-3), training (4), evaluation (5), speed and sweeps (6), the tokenizer's ceiling (7); then
    the report (8). The folder is locked for the run (`clusterar.lock`): a second process is refused."""
    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    out = Path(out) if out is not None else Path("runs") / spec.name
    with folder_lock(out):  # one writer per experiment folder; its stages lock their own subfolders
        return _run_stages(spec, out, progress, command)


def _run_stages(spec: ExperimentSpec, out: Path, progress: bool, command: str | None) -> Path:
    """`run_experiment`'s stages, in its locked folder."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", asdict(spec))
    clock = InvocationClock(out)

    inputs = _shared_inputs(spec, out, clock, progress)
    trained = _train_all(spec, inputs, out, clock, progress)
    t = _step(5, "evaluation")
    evaluator = Evaluator(spec, inputs, out, progress)
    points = {(r.name, seed): run_points(spec, r, out, seed) for seed in spec_seeds(spec) for r in spec.runs}
    per_seed = _evaluate_all(spec, evaluator, points, clock)
    curves = {run: aggregate(list(by_seed.values()), run) for run, by_seed in per_seed.items()}
    clock.tick("evaluation", t)

    t = _step(6, "sampling speed and sweeps")
    seeds = spec_seeds(spec)
    finals = {r.name: {seed: points[r.name, seed][-1] for seed in seeds} for r in spec.runs}
    speed = stage_speed(spec, {run: f[seeds[0]] for run, f in finals.items()}, out)
    sweeps = _sweep_all(spec, evaluator, finals)
    clock.tick("speed_and_sweeps", t)

    t = _step(7, "tokenizer ceiling and real-data rows")
    ceiling = evaluator.ceiling(stage_reconstructions(spec, inputs, out, progress))
    clock.tick("ceiling", t)

    _step(8, "report")
    clock.tick()
    results = dict(
        training=trained, curves=curves, curves_per_seed=per_seed, ceiling=ceiling, speed=speed, sweeps=sweeps
    )
    results["command"] = command
    return _write_report(spec, inputs, out, clock, results)


def _step(i: int, name: str) -> float:
    """Announce stage `i` of 8 (a kill point for the tests) and return its start time."""
    print(f"[{i}/8] {name}", flush=True)
    kill_point("experiment.stage")
    return time.perf_counter()


def _seed_name(spec: ExperimentSpec, run: str, seed: int) -> str:
    """How progress lines name a run: with its seed when there are several."""
    return run if len(spec_seeds(spec)) == 1 else f"{run} (seed {seed})"


def _shared_inputs(spec: ExperimentSpec, out: Path, clock: InvocationClock, progress: bool) -> SharedInputs:
    """Stages 1-3: the tokenizer, the token files and the clusters every run shares."""
    t = _step(1, "tokenizer")
    tokenizer = stage_tokenizer(spec, out, progress)
    clock.tick("tokenizer", t)
    t = _step(2, "token files")
    tokens = stage_tokens(spec, tokenizer, out, progress)
    clock.tick("tokens", t)
    t = _step(3, "clusters")
    clusters = stage_clusters(spec, tokenizer, out)
    clock.tick("clusters", t)
    return SharedInputs(tokenizer, tokens, clusters)


def _train_all(
    spec: ExperimentSpec, inputs: SharedInputs, out: Path, clock: InvocationClock, progress: bool
) -> dict[str, dict[str, dict[str, dict]]]:
    """Stage 4: every run's stages, seed by seed (a complete comparison exists as early as possible);
    {run: {seed: {stage: training result}}}."""
    seeds = spec_seeds(spec)
    t = _step(4, f"training {len(spec.runs)} runs" + (f" x {len(seeds)} seeds" if len(seeds) > 1 else ""))
    trained: dict[str, dict[str, dict[str, dict]]] = {r.name: {} for r in spec.runs}
    for seed in seeds:
        for run in spec.runs:
            base = run_dir(spec, out, run.name, seed)
            what = _seed_name(spec, run.name, seed)
            configs = train_configs(spec, run, inputs, seed)
            if run.start:
                starts = stage_convert(spec, run, inputs, out, seed)
                configs = {k: replace(c, init_from=str(starts[k])) for k, c in configs.items()}
            trained[run.name][str(seed)] = {
                stage: stage_train(
                    cfg, base if stage == "model" else base / stage, f"{what} {stage}", out, progress
                )
                for stage, cfg in configs.items()
            }
            clock.tick()
    clock.tick("training", t)
    return trained


def _evaluate_all(
    spec: ExperimentSpec,
    evaluator: Evaluator,
    points: dict[tuple[str, int], list[EvalPoint]],
    clock: InvocationClock,
) -> dict[str, dict[str, list[dict]]]:
    """Stage 5: every evaluation point of every run and seed, with a progress line each;
    {run: {seed: [evaluation per point]}}."""
    per_seed: dict[str, dict[str, list[dict]]] = {r.name: {} for r in spec.runs}
    for seed in spec_seeds(spec):
        for run in spec.runs:
            name = _seed_name(spec, run.name, seed)
            per_seed[run.name][str(seed)] = []
            for p in points[run.name, seed]:
                r = evaluator.evaluate(
                    p, sample_settings(spec, run), f"evaluation of {name} at epoch {p.epoch}"
                )
                per_seed[run.name][str(seed)].append(r)
                clock.tick()
                print(
                    f"  {name:<16} epoch {p.epoch:.4g}: FID {fmt(r['fid'])}  "
                    f"IS {fmt(r['inception_score'])}  P {fmt(r['precision'], 3)}  R {fmt(r['recall'], 3)}  "
                    f"class acc {pct(r['class_accuracy'])}"
                )
    return per_seed


def _sweep_all(
    spec: ExperimentSpec, evaluator: Evaluator, finals: dict[str, dict[int, EvalPoint]]
) -> dict[str, dict[str, list[dict]]]:
    """Stage 6's sweeps: each swept value on each run's final models, aggregated over seeds;
    {param: {run: [aggregated point with its `value`]}}."""
    by_name = {r.name: r for r in spec.runs}
    sweeps: dict[str, dict[str, list[dict]]] = {}
    for s in spec.sweeps:
        sweeps[s.param] = {}
        for run in sweep_runs(spec, s):
            replicas = [
                [
                    evaluator.evaluate(
                        finals[run][seed],
                        sample_settings(spec, by_name[run], **{s.param: v}),
                        f"{s.param}={v} sweep of {_seed_name(spec, run, seed)}",
                    )
                    for v in s.values
                ]
                for seed in spec_seeds(spec)
            ]
            sweeps[s.param][run] = [
                a | {"value": v}
                for a, v in zip(aggregate(replicas, f"sweep {s.param} of {run}"), s.values, strict=True)
            ]
    return sweeps


def _write_report(
    spec: ExperimentSpec, inputs: SharedInputs, out: Path, clock: InvocationClock, results: dict
) -> Path:
    """Stage 8: report.json (the setup, `results` and the comparison's numbers), its pictures and report.md."""
    history = clock.history()
    timings = {k: v for k, v in history[-1].items() if k not in ("date", "invocation")}
    timings["all_invocations"] = round(sum(h["total_this_invocation"] for h in history), 1)
    timings["invocations"] = len(history)
    data = {
        "spec": asdict(spec),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": describe_machine(pick_device(spec.device)),
        "tokenizer": tokenizer_summary(inputs.tokenizer),
        "tokens": {k: str(v.relative_to(out)) for k, v in inputs.tokens.items()},
        "train_views": _token_views(inputs.tokens["train"]),
        "data_sizes": _data_sizes(inputs.tokens),
        "sampling": {
            r.name: asdict(SampleSettings.for_method(r.method, **sample_settings(spec, r))) for r in spec.runs
        },
        "clusters": {
            k: read_json(v.with_suffix(".json"), "clusters record")["result"]
            for k, v in inputs.clusters.items()
        },
        "seeds": spec_seeds(spec),
        **results,
        "timings": timings,
    }
    data |= _comparison(spec, data["curves"], data["curves_per_seed"], data["speed"], data["sweeps"])
    write_json(out / "report.json", data)
    plot_report(data, out)
    report = out / "report.md"
    write_text_atomic(report, render_report(data, out))
    print(f"report: {report}")
    answer, why = trust_headline(data)
    print(f"can the comparison be trusted? {answer}: {why} (what to run next: the report's first section)")
    return report


def _comparison(
    spec: ExperimentSpec,
    curves: dict[str, list[dict]],
    per_seed: dict[str, dict[str, list[dict]]],
    speed: dict,
    sweeps: dict[str, dict[str, list[dict]]],
) -> dict[str, Any]:
    """The report's numbers, made by clusterar.compare against the spec's reference run: the comparison
    table, the verdicts (every run against the reference, and the contrasts; each sweep's values against
    its first), the claims and convergence."""
    base = reference_run(spec)
    pairs = verdict_pairs([r.name for r in spec.runs], base, spec.contrasts)
    return {
        "table": comparison_table(spec.runs, base, curves, per_seed, speed),
        "verdicts": verdicts(pairs, curves),
        "sweep_verdicts": {param: sweep_verdicts(param, per_run) for param, per_run in sweeps.items()},
        "claims": [
            check_claim(per_seed, c.run, claim_against(spec, c), c.speedup) | {"text": c.text}
            for c in spec.claims
        ],
        "convergence": convergence(base, curves),
    }


def tokenizer_summary(path: Path) -> dict:
    if Path(path).suffix != ".safetensors":
        return {"path": str(path)}
    meta = read_meta(path, "tokenizer")
    cfg = meta.get("config", {})
    return {"path": str(path), "config": cfg, "eval": meta.get("eval", {})}


def _token_views(path: Path) -> list[str]:
    return list(TokenFile.open(path).meta["views"])


def _data_sizes(tokens: dict[str, Path]) -> dict[str, int]:
    """Images per split and the number of classes (the report's 'images per class')."""
    files = {split: TokenFile.open(path) for split, path in tokens.items()}
    return {split: len(f) for split, f in files.items()} | {"classes": files["train"].num_classes}

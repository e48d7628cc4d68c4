"""`clusterar experiment SPEC`: baseline, IAR and CTF trained and evaluated under identical conditions.

A spec (TOML) names the data, the tokenizer, the shared training budget and the runs; every run starts
from the same tokenizer and token files with the same seed and budget, or, with `seeds = [...]`, once per
seed. Each run is evaluated on snapshots taken every `eval.every_epochs` epochs or `eval.every_steps`
steps (FID, IS, precision, recall and the class accuracy of the samples, with the data's own classifier
or Inception, plus val token and cluster accuracy and loss), and sampling-time sweeps (CFG scale,
temperatures, stage-2 top-k) run on the final models. The report holds the analogues of CTF's Tables 1-3
/ Fig. 2 and IAR's Fig. 4c, the tokenizer's ceiling, and (clusterar.compare) the mean and spread over
seeds with verdicts by a stated rule, the papers' speed-up claims checked per seed, and whether the
baseline has converged.

Everything is resumable: each stage writes its result atomically and is skipped when the result exists
and was produced with the same settings; a changed setting is an error naming the stage, never a silent
reuse of stale results. See `clusterar/specs/*.toml` for complete examples.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import statistics
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .compare import aggregate, fmt_spread, values
from .errors import ClusterarError
from .fileio import check_file, file_error, kill_point, read_json, write_json, write_text_atomic

RUN_METHODS = ("baseline", "iar", "ctf")
SAMPLE_SWEEPS = ("cfg_scale", "temperature", "temperature2", "top_k", "top_k2", "top_p")
SPECS_DIR = Path(__file__).parent / "specs"


@dataclass
class TokenizerSpec:
    path: str | None = None  # an existing tokenizer.safetensors (or run folder); else train one
    preset: str = "cpu-32"
    steps: int = 1000
    warmup: int = 100
    restart_every: int = 100
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class ClustersSpec:
    method: str  # kmeans | balanced | random
    n: int
    seed: int = 0


@dataclass
class EvalSpec:
    every_epochs: float = 0.0  # 0: only the final model
    every_steps: int = 0  # ... or every so many optimizer steps (finer than an epoch); not both
    samples: int = 1000  # images per evaluation, class-balanced
    reference: str = "val"  # split of the spec's data used as reference
    cfg_scale: float = 2.0
    temperature: float | None = None  # None: the method's default (1.0; CTF: the paper's 1.1)
    temperature2: float | None = None  # CTF stage 2 (None: 1.1)
    top_k: int = 0
    top_k2: int = 0
    top_p: float = 1.0
    batch_size: int = 250
    inception: str | None = None  # path to pt_inception-2015-12-05-6726825d.pth
    extractor: str | None = None  # "classifier" | "inception"; None: inception if a path is given


@dataclass
class RunSpec:
    name: str
    method: str
    clusters: str | None = None  # key of a [clusters.NAME] table
    train: dict[str, Any] = field(default_factory=dict)  # overrides of [train] for this run (stage 1 for CTF)
    refiner: dict[str, Any] = field(default_factory=dict)  # CTF stage-2 overrides of [train]
    sample: dict[str, Any] = field(default_factory=dict)  # overrides of [eval] sampling settings


@dataclass
class SweepSpec:
    param: str
    values: list[Any]
    runs: list[str] = field(default_factory=list)  # empty: every run


@dataclass
class ClaimSpec:
    """A paper's speed-up claim, checked per seed: `run` reaches the converged FID of `against` (the mean
    of its last 3 evaluations) in at most 1/`speedup` of the epochs `against` needed for it."""

    run: str
    speedup: float
    against: str = ""  # empty: the reference run (the spec's first baseline run)
    text: str = ""  # how the report names the claim, e.g. "IAR: 2x fewer epochs (paper, Fig. 4c)"


@dataclass
class ExperimentSpec:
    name: str
    data: str = "mnist"
    image_size: int = 32
    seed: int = 0  # the tokenizer's and every run's seed ...
    seeds: list[int] = field(default_factory=list)  # ... unless this lists the seeds to repeat runs with
    device: str = "auto"
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    clusters: dict[str, ClustersSpec] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every run
    eval: EvalSpec = field(default_factory=EvalSpec)
    runs: list[RunSpec] = field(default_factory=list)
    sweeps: list[SweepSpec] = field(default_factory=list)
    claims: list[ClaimSpec] = field(default_factory=list)
    # [run, against] pairs judged (final FID, class accuracy) beside every run against the baseline
    contrasts: list[list[str]] = field(default_factory=list)


def spec_seeds(spec: ExperimentSpec) -> list[int]:
    """The seeds every run (and every sweep point) is repeated with."""
    return list(spec.seeds) or [spec.seed]


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _matches(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(kind) or kind)


def check_types(cls, d: dict, where: str) -> None:
    """Every value of table `d` has the type of `cls`'s field of that name (TOML gives "two" for a
    number as readily as 2): say which table and key, and what was expected."""
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        if key not in hints:
            continue
        kinds = typing.get_args(hints[key]) if type(None) in typing.get_args(hints[key]) else (hints[key],)
        kinds = tuple(k for k in kinds if k is not type(None))
        if value is None or any(_matches(value, k) for k in kinds):
            continue
        want = " or ".join(_TYPE_WORDS.get(k, getattr(k, "__name__", str(k))) for k in kinds)
        raise ClusterarError(f"{where}: {key} must be {want}, got {value!r}")


def as_spec_keys(message: str) -> str:
    """A settings check written for the command line (`--batch-size`) worded for a spec (`batch_size`)."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ClusterarError(f"{where} must be a table, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ClusterarError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    check_types(cls, d, where)
    try:
        return cls(**d)
    except TypeError as e:
        raise ClusterarError(f"{where}: {e}") from e


def parse_spec(d: dict, source: str = "spec") -> ExperimentSpec:
    """Build and validate a spec from a parsed TOML dict; every mistake is reported before any work starts."""
    d = copy.deepcopy(d)
    d.setdefault("name", Path(source).stem)
    tables = ("tokenizer", "clusters", "eval", "runs", "sweeps", "claims")
    top = {k: v for k, v in d.items() if k not in tables}
    spec = _build(ExperimentSpec, top, source)
    spec.tokenizer = _build(TokenizerSpec, d.get("tokenizer", {}), f"{source} [tokenizer]")
    spec.clusters = {
        k: _build(ClustersSpec, v, f"{source} [clusters.{k}]") for k, v in d.get("clusters", {}).items()
    }
    spec.eval = _build(EvalSpec, d.get("eval", {}), f"{source} [eval]")
    spec.runs = [_build(RunSpec, r, f"{source} [[runs]] #{i + 1}") for i, r in enumerate(d.get("runs", []))]
    spec.sweeps = [
        _build(SweepSpec, s, f"{source} [[sweeps]] #{i + 1}") for i, s in enumerate(d.get("sweeps", []))
    ]
    spec.claims = [
        _build(ClaimSpec, c, f"{source} [[claims]] #{i + 1}") for i, c in enumerate(d.get("claims", []))
    ]
    check_spec(spec, source)
    return spec


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read a spec file; a bare name (e.g. "demo") means the spec shipped in clusterar/specs/, also where a
    folder of that name exists (a run folder called `claims` must not hide the `claims` spec)."""
    p = Path(path)
    if (not p.exists() or p.is_dir()) and (SPECS_DIR / f"{path}.toml").exists():
        p = SPECS_DIR / f"{path}.toml"
    if not p.exists():
        shipped = ", ".join(sorted(q.stem for q in SPECS_DIR.glob("*.toml")))
        raise ClusterarError(
            f"experiment spec {path} not found; check the path, or name a shipped spec (shipped specs: {shipped})"
        )
    p = check_file(p, "experiment spec", (".toml",))
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise file_error(p, "experiment spec", "is not a text file (binary bytes), so not TOML") from e
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise file_error(p, "experiment spec", f"is not valid TOML ({e})") from e
    if not d:
        raise file_error(p, "experiment spec", "holds no settings (an empty TOML file)")
    return parse_spec(d, str(p))


def check_spec(spec: ExperimentSpec, source: str) -> None:
    from .clusters import CLUSTER_METHODS, check_n_clusters
    from .data import check_dataset_name
    from .gpt import GPT_PRESETS
    from .sample import SampleSettings
    from .tokenizer import VQ_PRESETS
    from .train import TrainConfig

    try:
        check_dataset_name(spec.data)
    except ClusterarError as e:
        raise ClusterarError(f"{source}: data = {spec.data!r}: {e}") from e
    if spec.tokenizer.path is None and spec.tokenizer.preset not in VQ_PRESETS:
        raise ClusterarError(
            f"{source}: unknown tokenizer preset {spec.tokenizer.preset!r}; choose one of {', '.join(VQ_PRESETS)}"
        )
    if spec.tokenizer.path is None:
        try:
            tokenizer_config(spec).check()
        except ClusterarError as e:
            raise ClusterarError(f"{source} [tokenizer]: {as_spec_keys(str(e))}") from None
    _validate_eval(spec, source)
    k = codebook_size(spec)
    for name, c in spec.clusters.items():
        if c.method not in CLUSTER_METHODS:
            raise ClusterarError(
                f"{source} [clusters.{name}]: unknown method {c.method!r}; choose one of {', '.join(CLUSTER_METHODS)}"
            )
        if k is not None:
            try:
                check_n_clusters(k, c.n, balanced=c.method != "kmeans")
            except ClusterarError as e:
                raise ClusterarError(f"{source} [clusters.{name}]: n = {c.n}: {e}") from None
    if not spec.runs:
        raise ClusterarError(f"{source}: no [[runs]]; add at least one (method = baseline, iar or ctf)")
    train_fields = {f.name for f in fields(TrainConfig)}
    reserved = {"method", "clusters", "tokens", "tokenizer", "seed", "device"}
    names = set()
    for r in spec.runs:
        where = f"{source} run {r.name!r}"
        if r.name in names:
            raise ClusterarError(f"{where}: two runs share this name")
        names.add(r.name)
        if r.method not in RUN_METHODS:
            raise ClusterarError(
                f"{where}: unknown method {r.method!r}; choose one of {', '.join(RUN_METHODS)}"
            )
        if r.method in ("iar", "ctf") and r.clusters is None:
            raise ClusterarError(
                f"{where}: method {r.method} needs `clusters = NAME` (a [clusters.NAME] table)"
            )
        if r.clusters is not None and r.clusters not in spec.clusters:
            raise ClusterarError(
                f"{where}: clusters {r.clusters!r} is not defined; defined: {sorted(spec.clusters) or 'none'}"
            )
        if r.method == "iar" and r.clusters and spec.clusters[r.clusters].method == "kmeans":
            iar = r.train.get("rearrange", spec.train.get("rearrange", True))
            if iar:
                raise ClusterarError(
                    f"{where}: IAR's rearranged ids need equal-size clusters; use balanced or random clusters, "
                    "or set rearrange = false in the run's train table to use the segment cluster loss"
                )
        if r.refiner and r.method != "ctf":
            raise ClusterarError(f"{where}: a [refiner] table only applies to method ctf")
        for what, table in (("train", spec.train), ("run train", r.train), ("refiner", r.refiner)):
            bad = sorted(set(table) - train_fields)
            if bad:
                raise ClusterarError(
                    f"{where}: unknown {what} setting(s) {bad}; known: {sorted(train_fields)}"
                )
            check_types(
                TrainConfig, table, f"{source} [train]" if what == "train" else f"{where} {what} table"
            )
            clash = sorted(set(table) & reserved)
            if clash:
                raise ClusterarError(f"{where}: {clash} are set by the experiment, not in a train table")
            model = table.get("model")
            if model is not None and model not in GPT_PRESETS:
                raise ClusterarError(
                    f"{where}: unknown model preset {model!r}; choose one of {', '.join(GPT_PRESETS)}"
                )
        bad = sorted(set(r.sample) - set(SAMPLE_SWEEPS))
        if bad:
            raise ClusterarError(f"{where}: unknown sample setting(s) {bad}; known: {list(SAMPLE_SWEEPS)}")
        if r.method != "ctf" and {"temperature2", "top_k2"} & set(r.sample):
            raise ClusterarError(f"{where}: temperature2 and top_k2 are CTF stage-2 settings")
        try:
            SampleSettings.for_method(r.method, **sample_settings(spec, r))
        except ClusterarError as e:
            raise ClusterarError(f"{where}: {e}") from e
        try:
            configs = train_configs(spec, r)
        except ClusterarError as e:
            raise ClusterarError(f"{source} {e}") from None
        for stage, cfg in configs.items():
            if cfg.restrict_to_cluster and cfg.method != "ctf-refiner":
                raise ClusterarError(
                    f"{where} ({stage}): restrict_to_cluster only applies to CTF's refiner (its [refiner] table)"
                )
    for s in spec.sweeps:
        if s.param not in SAMPLE_SWEEPS:
            raise ClusterarError(
                f"{source} sweep {s.param!r}: sampling sweeps vary one of {list(SAMPLE_SWEEPS)}; training "
                "settings (clusters, lambda, stage-2 size...) are swept by adding [[runs]]"
            )
        unknown = sorted(set(s.runs) - names)
        if unknown:
            raise ClusterarError(f"{source} sweep {s.param!r}: unknown run(s) {unknown}")
        if not s.values:
            raise ClusterarError(f"{source} sweep {s.param!r}: no values")
        not_ctf = [r.name for r in spec.runs if r.name in s.runs and r.method != "ctf"]
        if s.param in ("temperature2", "top_k2") and not_ctf:
            raise ClusterarError(
                f"{source} sweep {s.param!r}: a CTF stage-2 setting, but {not_ctf} are not CTF"
            )
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in spec.seeds):
        raise ClusterarError(f"{source}: seeds must be a list of whole numbers >= 0, got {spec.seeds}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ClusterarError(f"{source}: seeds {spec.seeds} repeat a seed; list each seed once")
    for pair in spec.contrasts:
        if (
            len(pair) != 2
            or any(not isinstance(x, str) or x not in names for x in pair)
            or pair[0] == pair[1]
        ):
            raise ClusterarError(
                f"{source}: contrasts holds [run, against] pairs of two different runs of {sorted(names)}, "
                f"got {pair!r}"
            )
    for c in spec.claims:
        if not c.against:
            c.against = _reference_run(spec) or ""
            if not c.against:
                raise ClusterarError(
                    f"{source} [[claims]] {c.run}: no baseline run to compare against; add one, or name the "
                    "run with against = NAME"
                )
        for what, name in (("run", c.run), ("against", c.against)):
            if name not in names:
                raise ClusterarError(
                    f"{source} [[claims]]: {what} = {name!r} is not one of the runs {sorted(names)}"
                )
        if not c.speedup > 0:
            raise ClusterarError(
                f"{source} [[claims]] {c.run}: speedup must be a number > 0, got {c.speedup}"
            )


def _validate_eval(spec: ExperimentSpec, source: str) -> None:
    """The [eval] table (checked first: its settings shape every run's snapshots)."""
    ev = spec.eval
    if ev.every_steps < 0 or (ev.every_steps and ev.every_epochs):
        raise ClusterarError(
            f"{source} [eval]: give evaluation points as one of every_epochs or every_steps (a whole number "
            f">= 1), got every_epochs = {ev.every_epochs}, every_steps = {ev.every_steps}"
        )
    if ev.extractor not in (None, "classifier", "inception"):
        raise ClusterarError(
            f"{source} [eval]: extractor = {ev.extractor!r}; choose classifier (trained on the data's train "
            "split, no download) or inception (with inception = PATH)"
        )
    if eval_extractor(spec) == "inception" and not ev.inception:
        raise ClusterarError(
            f"{source} [eval]: extractor = inception needs inception = PATH to the standard FID weights "
            "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded); or use extractor = classifier"
        )
    if ev.samples <= 3 or ev.batch_size < 1:
        raise ClusterarError(
            f"{source} [eval]: samples must be > 3 (precision/recall use k = 3), batch_size >= 1"
        )
    if ev.every_epochs < 0:
        raise ClusterarError(
            f"{source} [eval]: every_epochs must be >= 0 (0: evaluate the final models only)"
        )
    if not spec.data.startswith("folder:") and ev.reference not in ("train", "val", "all"):
        raise ClusterarError(f"{source} [eval]: reference is a split of {spec.data}: train, val or all")


def eval_extractor(spec: ExperimentSpec) -> str:
    """The [eval] feature extractor: as set, else Inception when a weights path is given, else the
    classifier trained on the spec's own data."""
    return spec.eval.extractor or ("inception" if spec.eval.inception else "classifier")


# ----------------------------------------------------------------------------- stage bookkeeping


def _stage_done(path: Path, settings: dict, what: str) -> Any | None:
    """The stored result of a finished stage, None if not finished; refuse results made with other settings."""
    if not path.exists():
        return None
    done = read_json(path, f"{what} record")
    if done.get("settings") != json.loads(json.dumps(settings)):
        raise ClusterarError(
            f"{path} holds the {what} made with other settings than the spec now asks for; delete "
            f"{path.parent} to redo it, or write the experiment to another --out"
        )
    return done["result"]


def _stage_save(path: Path, settings: dict, result: Any) -> None:
    write_json(path, {"settings": settings, "result": result})


def _fmt(x: float | None, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def spec_dict(spec: ExperimentSpec) -> dict:
    return asdict(spec)


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


# ----------------------------------------------------------------------------- shared stages


def tokenizer_config(spec: ExperimentSpec):
    """The TokenizerTrainConfig that the spec's [tokenizer] table asks for."""
    from .tokenizer_train import TokenizerTrainConfig

    t = spec.tokenizer
    return TokenizerTrainConfig(
        data=spec.data,
        preset=t.preset,
        image_size=spec.image_size,
        steps=t.steps,
        warmup=t.warmup,
        restart_every=t.restart_every,
        batch_size=t.batch_size,
        lr=t.lr,
        eval_every=10**9,
        seed=spec.seed,
        device=spec.device,
    )


def codebook_size(spec: ExperimentSpec) -> int | None:
    """K of the spec's tokenizer, known before any work: the preset's, or the given file's (None if that
    file does not exist yet)."""
    from .fileio import read_meta
    from .tokenizer import resolve_tokenizer_path, vq_preset

    t = spec.tokenizer
    if t.path is None:
        return vq_preset(t.preset).codebook_size
    try:
        path = resolve_tokenizer_path(t.path)
    except ClusterarError:
        return None
    if path.suffix != ".safetensors":
        return None
    return read_meta(path, "tokenizer").get("config", {}).get("codebook_size")


def stage_tokenizer(spec: ExperimentSpec, out: Path, progress: bool = True) -> Path:
    """Train the spec's tokenizer (or take the given one); return the path of tokenizer.safetensors."""
    from .tokenizer import TOKENIZER_FILE, resolve_tokenizer_path
    from .tokenizer_train import CHECKPOINT, train_tokenizer

    if spec.tokenizer.path is not None:
        return resolve_tokenizer_path(spec.tokenizer.path)
    cfg = tokenizer_config(spec)
    tok_dir = out / "tokenizer"
    saved = tok_dir / "config.json"
    if saved.exists() and read_json(saved, "tokenizer config")["train"] != asdict(cfg):
        raise ClusterarError(
            f"{tok_dir} holds a tokenizer trained with other settings than the spec's [tokenizer]; delete it "
            "or write the experiment to another --out"
        )
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
    from .data import default_views
    from .runtime import pick_device
    from .tokenizer import load_tokenizer
    from .tokens import VIEW_NAMES, TokenFile, encode_dataset

    tokenizer = None
    paths = {}
    fp = _tokenizer_fingerprint(tokenizer_path)
    for split, views in (("train", default_views(spec.data)), ("val", "none")):
        path = out / "tokens" / f"{split}.safetensors"
        paths[split] = path
        if path.exists():
            meta = TokenFile.open(path).meta
            if meta["tokenizer_fingerprint"] == fp and meta["views"] == VIEW_NAMES[views]:
                print(f"tokens: reusing {path}")
                continue
        if tokenizer is None:
            tokenizer = load_tokenizer(tokenizer_path, pick_device(spec.device))
        print(f"tokens: encoding {spec.data} {split}")
        encode_dataset(
            tokenizer, spec.data, split, path, image_size=spec.image_size, views=views, progress=progress
        )
    return paths


def _tokenizer_fingerprint(path: Path) -> str:
    from .fileio import read_meta
    from .tokenizer import load_tokenizer

    if Path(path).suffix == ".safetensors":
        return read_meta(path, "tokenizer")["fingerprint"]
    return load_tokenizer(path).fingerprint()  # a LlamaGen .pt


def stage_clusters(spec: ExperimentSpec, tokenizer_path: Path, out: Path) -> dict[str, Path]:
    """Fit every [clusters.NAME] table on the tokenizer's codebook, once."""
    from .clusters import CodebookClusters
    from .tokenizer import load_tokenizer

    paths: dict[str, Path] = {}
    codebook = None
    fp = _tokenizer_fingerprint(tokenizer_path)
    for name, c in spec.clusters.items():
        path = out / "clusters" / f"{name}.safetensors"
        paths[name] = path
        settings = {**asdict(c), "tokenizer": fp}
        if _stage_done(path.with_suffix(".json"), settings, f"clusters {name}") is not None and path.exists():
            print(f"clusters: reusing {path}")
            continue
        if codebook is None:
            codebook = load_tokenizer(tokenizer_path).quantize.embedding.weight.detach()
        t0 = time.perf_counter()
        cl = CodebookClusters.fit(codebook, c.method, c.n, seed=c.seed)
        cl.save(path)
        sizes = cl.sizes
        result = {
            "objective": cl.objective,
            "min_size": int(sizes.min()),
            "max_size": int(sizes.max()),
            "seconds": elapsed(t0),
        }
        _stage_save(path.with_suffix(".json"), settings, result)
        print(f"clusters: {name} ({c.method}, {c.n}) objective {cl.objective:.2f} in {result['seconds']} s")
    return paths


# ----------------------------------------------------------------------------- training


@dataclass
class SharedInputs:
    """What every run shares: the tokenizer, the token files and the clusters files."""

    tokenizer: Path
    tokens: dict[str, Path]
    clusters: dict[str, Path]


def train_configs(
    spec: ExperimentSpec, run: RunSpec, inputs: SharedInputs | None = None, seed: int | None = None
) -> dict[str, Any]:
    """The TrainConfig of each stage of `run` ({"model": cfg} or, for CTF, {"coarse": cfg, "refiner": cfg}).

    Without `inputs` the paths are placeholders: `check_spec` builds the configs this way to check every
    setting before any work starts.
    """
    from .train import TrainConfig

    tokenizer = str(inputs.tokenizer) if inputs else "<tokenizer>"
    tokens = str(inputs.tokens["train"]) if inputs else "<tokens>"
    clusters = None
    if run.clusters is not None:
        clusters = str(inputs.clusters[run.clusters]) if inputs else f"<clusters {run.clusters}>"
    seed = spec.seed if seed is None else seed
    common = dict(tokens=tokens, tokenizer=tokenizer, clusters=clusters, seed=seed, device=spec.device)
    if spec.eval.every_epochs > 0:
        common["snapshot_every"] = spec.eval.every_epochs
    if spec.eval.every_steps > 0:
        common["snapshot_steps"] = spec.eval.every_steps
    if run.method != "ctf":
        stages = {"model": (run.method, {**spec.train, **run.train})}
    else:
        stages = {
            "coarse": ("ctf-coarse", {**spec.train, **run.train}),
            "refiner": ("ctf-refiner", {**spec.train, **run.refiner}),
        }
    out = {}
    for stage, (method, table) in stages.items():
        try:
            cfg = TrainConfig(**{**table, **common, "method": method})
        except TypeError as e:
            raise ClusterarError(f"run {run.name!r} ({stage}): {e}") from e
        try:
            cfg.check()
        except ClusterarError as e:
            raise ClusterarError(f"run {run.name!r} ({stage}): {as_spec_keys(str(e))}") from None
        out[stage] = cfg
    return out


def _train_settings(cfg: Any) -> dict:
    from .train import SESSION_FIELDS

    return {k: v for k, v in asdict(cfg).items() if k not in SESSION_FIELDS}


def stage_train(cfg: Any, run_dir: Path, what: str, progress: bool = True) -> dict:
    """Train one model into `run_dir`, or reuse it; an interrupted run resumes from its checkpoint, a
    finished one on a constant schedule trains on when its budget grew (`_extends`)."""
    from .gpt import MODEL_FILE
    from .train import CHECKPOINT, train

    record = run_dir / "done.json"
    settings = _train_settings(cfg)
    if record.exists() and _extends(read_json(record, f"{what} record")["settings"], settings):
        print(f"train: extending {what} to {cfg.epochs or cfg.steps} {'epochs' if cfg.epochs else 'steps'}")
    else:
        done = _stage_done(record, settings, what)  # changed settings are refused here
        if done is not None and (run_dir / MODEL_FILE).exists():
            print(f"train: reusing {what} ({run_dir})", flush=True)
            return done
    resume = (run_dir / CHECKPOINT).exists()
    print(
        f"train: {'resuming' if resume else 'training'} {what} ({cfg.method}, {cfg.model}) -> {run_dir}",
        flush=True,
    )
    summary = train(cfg, run_dir, resume=resume, progress=progress)
    _stage_save(record, settings, summary)
    return summary


def _extends(saved: dict, now: dict) -> bool:
    """Is `now` the finished run `saved` with a larger budget on a constant schedule? Then training on from
    its checkpoint computes what a straight run to the new budget would (the trainer's extension rule, once
    the warm-up is over), and every snapshot evaluated so far stays valid: an experiment whose baseline has
    not converged can be given more epochs."""
    from .train import BUDGET_FIELDS

    others = {k for k in set(saved) | set(now) if k not in BUDGET_FIELDS}
    if any(saved.get(k) != now.get(k) for k in others) or now.get("schedule") != "constant":
        return False
    key = "epochs" if now.get("epochs") is not None else "steps"
    return saved.get(key) is not None and now[key] > saved[key]


def run_dir(spec: ExperimentSpec, out: Path, run: str, seed: int) -> Path:
    """runs/RUN, or runs/RUN/seed-S when the spec repeats runs over several seeds."""
    base = out / "runs" / run
    return base / f"seed-{seed}" if len(spec_seeds(spec)) > 1 else base


def _snapshots(run_dir: Path) -> list[tuple[float, int, Path]]:
    """(epoch, step, model file) of every snapshot of a run, the final model when there are none."""
    from .gpt import MODEL_FILE, read_gpt_info
    from .train import SNAPSHOT_DIR

    files = sorted((run_dir / SNAPSHOT_DIR).glob("model-step*.safetensors"))
    if not files:
        files = [run_dir / MODEL_FILE]
    infos = [read_gpt_info(f) for f in files]
    return [(float(i["epoch"]), int(i["step"]), f) for i, f in zip(infos, files, strict=True)]


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
    from .sample import write_ctf_pipeline

    base = run_dir(spec, out, run.name, seed)
    if run.method != "ctf":
        return [
            EvalPoint(run.name, run.method, e, f, {"model": f}, {"model": n}, base, seed)
            for e, n, f in _snapshots(base)
        ]
    coarse, refiner = _snapshots(base / "coarse"), _snapshots(base / "refiner")
    if len(coarse) != len(refiner):
        raise ClusterarError(
            f"run {run.name!r}: {len(coarse)} stage-1 snapshots but {len(refiner)} stage-2 snapshots; give both "
            "stages the same epochs and batch size, or delete the run folder to retrain"
        )
    points = []
    for (e1, n1, f1), (_, n2, f2) in zip(coarse, refiner, strict=True):
        path = base / "pipelines" / f"{f1.stem.replace('model-', '')}.json"
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


# ----------------------------------------------------------------------------- evaluation


def _key(d: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sample_settings(spec: ExperimentSpec, run: RunSpec, **overrides: Any) -> dict[str, Any]:
    """The run's sampling settings: [eval] with the run's `sample` table and `overrides` applied."""
    d = {k: getattr(spec.eval, k) for k in SAMPLE_SWEEPS}
    d.update(run.sample)
    d.update(overrides)
    if run.method != "ctf":
        d.pop("temperature2")
        d.pop("top_k2")
    return {k: v for k, v in d.items() if v is not None}


class Evaluator:
    """Samples a point, scores the samples (FID, IS, precision, recall) and the val tokens (accuracies).

    Every result is stored under the point's folder, keyed by a hash of its settings, so a rerun reuses
    it and a changed setting computes a new one beside it.
    """

    def __init__(self, spec: ExperimentSpec, inputs: SharedInputs, out: Path, progress: bool = True):
        from .metrics import make_extractor, open_images
        from .runtime import pick_device

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
            "settings": settings,
            "samples": self.spec.eval.samples,
            "seed": point.seed,
            "reference": self.reference,
            "extractor": self.extractor.fingerprint,
        }
        return key, point.folder / "evals" / _key(key)

    def evaluate(self, point: EvalPoint, settings: dict[str, Any], what: str) -> dict:
        from .metrics import evaluate_images
        from .sample import Pipeline, SampleSettings, make_labels, sample_to_folder
        from .train import validation_loss

        ev = self.spec.eval
        key, folder = self._where(point, settings)
        record = folder / "eval.json"
        done = _stage_done(record, key, what)
        if done is not None:
            return done
        t0 = time.perf_counter()
        pipe = Pipeline.load(point.source, device=self.device)
        labels, _ = make_labels(ev.samples, pipe.num_classes, per_class=True)
        s = SampleSettings.for_method(point.method, **settings)
        summary = sample_to_folder(
            pipe,
            labels,
            folder,
            settings=s,
            seed=point.seed,
            batch_size=ev.batch_size,
            per_class=True,
            write_images=False,
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
        _stage_save(record, key, result)
        return result

    def ceiling(self, images: dict[str, Path]) -> dict[str, dict]:
        """The metrics of the tokenizer's val reconstructions and of real train images (see
        stage_reconstructions) against the same reference with the same extractor as every run."""
        from .metrics import evaluate_images

        out = {}
        for name, path in images.items():
            key = {"images": str(path), "reference": self.reference, "extractor": self.extractor.fingerprint}
            record = path.with_suffix(".eval.json")
            done = _stage_done(record, key, f"{name} ceiling evaluation")
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
                _stage_save(record, key, done)
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
    import numpy as np
    from tqdm.auto import tqdm

    from .data import load_dataset, to_uint8
    from .fileio import atomic_path
    from .runtime import pick_device
    from .sample import make_labels
    from .tokenizer import load_tokenizer
    from .tokens import TokenFile

    folder = out / "ceiling"
    paths = {"tokenizer": folder / "tokenizer-val.npz", "real": folder / "real-train.npz"}
    settings = {
        "tokenizer": _tokenizer_fingerprint(inputs.tokenizer),
        "samples": spec.eval.samples,
        "data": spec.data,
        "image_size": spec.image_size,
    }
    record = folder / "images.json"
    if _stage_done(record, settings, "ceiling images") is not None and all(
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
    _stage_save(record, settings, {k: str(v) for k, v in paths.items()})
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
    import statistics

    from .runtime import pick_device
    from .sample import Pipeline

    settings = {
        "runs": {name: str(p.source) for name, p in points.items()},
        "steps": {name: p.steps for name, p in points.items()},
        "rounds": rounds,
        "batch_size": batch_size,
        "device": spec.device,
    }
    record = out / "speed.json"
    if record.exists():  # a measurement of the current final models: redone when they changed
        done = read_json(record, "sampling speed record")
        if done.get("settings") == json.loads(json.dumps(settings)):
            return done["result"]
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
    _stage_save(out / "speed.json", settings, result)
    return result


# ----------------------------------------------------------------------------- the whole experiment


def run_experiment(
    spec: ExperimentSpec | str | Path, out: str | Path | None = None, progress: bool = True
) -> Path:
    """Run (or continue) every stage of a spec into `out` (default runs/NAME); return report.md's path."""
    from .runtime import describe_machine, pick_device
    from .sample import SampleSettings

    if not isinstance(spec, ExperimentSpec):
        spec = load_spec(spec)
    out = Path(out) if out is not None else Path("runs") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", spec_dict(spec))
    clock = InvocationClock(out)

    def step(i: int, name: str) -> float:
        print(f"[{i}/8] {name}", flush=True)
        kill_point("experiment.stage")
        return time.perf_counter()

    t = step(1, "tokenizer")
    tokenizer = stage_tokenizer(spec, out, progress)
    clock.tick("tokenizer", t)
    t = step(2, "token files")
    tokens = stage_tokens(spec, tokenizer, out, progress)
    clock.tick("tokens", t)
    t = step(3, "clusters")
    clusters = stage_clusters(spec, tokenizer, out)
    clock.tick("clusters", t)
    inputs = SharedInputs(tokenizer, tokens, clusters)

    seeds = spec_seeds(spec)
    t = step(4, f"training {len(spec.runs)} runs" + (f" x {len(seeds)} seeds" if len(seeds) > 1 else ""))
    trained: dict[str, dict[str, dict[str, dict]]] = {r.name: {} for r in spec.runs}
    for seed in seeds:  # seed by seed: a complete comparison exists as early as possible
        for run in spec.runs:
            base = run_dir(spec, out, run.name, seed)
            what = run.name if len(seeds) == 1 else f"{run.name} (seed {seed})"
            trained[run.name][str(seed)] = {
                stage: stage_train(
                    cfg, base if stage == "model" else base / stage, f"{what} {stage}", progress
                )
                for stage, cfg in train_configs(spec, run, inputs, seed).items()
            }
            clock.tick()
    clock.tick("training", t)

    t = step(5, "evaluation")
    evaluator = Evaluator(spec, inputs, out, progress)
    by_name = {r.name: r for r in spec.runs}
    points = {(r.name, seed): run_points(spec, r, out, seed) for seed in seeds for r in spec.runs}
    finals = {r.name: {seed: points[r.name, seed][-1] for seed in seeds} for r in spec.runs}

    def name(run: str, seed: int) -> str:
        return run if len(seeds) == 1 else f"{run} (seed {seed})"

    per_seed: dict[str, dict[str, list[dict]]] = {r.name: {} for r in spec.runs}
    for seed in seeds:
        for run in spec.runs:
            per_seed[run.name][str(seed)] = []
            for p in points[run.name, seed]:
                r = evaluator.evaluate(
                    p, sample_settings(spec, run), f"evaluation of {name(run.name, seed)} at epoch {p.epoch}"
                )
                per_seed[run.name][str(seed)].append(r)
                clock.tick()
                print(
                    f"  {name(run.name, seed):<16} epoch {p.epoch:.4g}: FID {_fmt(r['fid'])}  "
                    f"IS {_fmt(r['inception_score'])}  P {_fmt(r['precision'], 3)}  R {_fmt(r['recall'], 3)}  "
                    f"class acc {_pct(r['class_accuracy'])}"
                )
    curves = {run: aggregate(list(by_seed.values()), run) for run, by_seed in per_seed.items()}
    clock.tick("evaluation", t)

    t = step(6, "sampling speed and sweeps")
    speed = stage_speed(spec, {run: f[seeds[0]] for run, f in finals.items()}, out)
    sweeps: dict[str, dict[str, list[dict]]] = {}
    for s in spec.sweeps:
        sweeps[s.param] = {}
        for run in sweep_runs(spec, s):
            replicas = [
                [
                    evaluator.evaluate(
                        finals[run][seed],
                        sample_settings(spec, by_name[run], **{s.param: v}),
                        f"{s.param}={v} sweep of {name(run, seed)}",
                    )
                    for v in s.values
                ]
                for seed in seeds
            ]
            sweeps[s.param][run] = [
                a | {"value": v}
                for a, v in zip(aggregate(replicas, f"sweep {s.param} of {run}"), s.values, strict=True)
            ]
    clock.tick("speed_and_sweeps", t)

    t = step(7, "tokenizer ceiling and real-data rows")
    ceiling = evaluator.ceiling(stage_reconstructions(spec, inputs, out, progress))
    clock.tick("ceiling", t)

    step(8, "report")
    clock.tick()
    history = clock.history()
    timings = {k: v for k, v in history[-1].items() if k not in ("date", "invocation")}
    timings["all_invocations"] = round(sum(h["total_this_invocation"] for h in history), 1)
    timings["invocations"] = len(history)
    data = {
        "spec": spec_dict(spec),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": describe_machine(pick_device(spec.device)),
        "tokenizer": tokenizer_summary(tokenizer),
        "tokens": {k: str(v.relative_to(out)) for k, v in tokens.items()},
        "train_views": _token_views(tokens["train"]),
        "sampling": {
            r.name: asdict(SampleSettings.for_method(r.method, **sample_settings(spec, r))) for r in spec.runs
        },
        "clusters": {
            k: read_json(v.with_suffix(".json"), "clusters record")["result"] for k, v in clusters.items()
        },
        "seeds": seeds,
        "training": trained,
        "curves": curves,
        "curves_per_seed": per_seed,
        "ceiling": ceiling,
        "speed": speed,
        "sweeps": sweeps,
        "timings": timings,
    }
    data["table"] = comparison_table(spec, curves, per_seed, speed)
    data["verdicts"] = verdicts(spec, curves)
    data["claims"] = claim_results(spec, per_seed)
    data["convergence"] = convergence(spec, curves)
    write_json(out / "report.json", data)
    plot_report(data, out)
    report = out / "report.md"
    write_text_atomic(report, render_report(data, out))
    print(f"report: {report}")
    return report


def sweep_runs(spec: ExperimentSpec, s: SweepSpec) -> list[str]:
    """The runs a sweep applies to: those named, else every run the parameter means something for."""
    if s.runs:
        return list(s.runs)
    return [r.name for r in spec.runs if r.method == "ctf" or s.param not in ("temperature2", "top_k2")]


def tokenizer_summary(path: Path) -> dict:
    from .fileio import read_meta

    if Path(path).suffix != ".safetensors":
        return {"path": str(path)}
    meta = read_meta(path, "tokenizer")
    cfg = meta.get("config", {})
    return {"path": str(path), "config": cfg, "eval": meta.get("eval", {})}


def _reference_run(spec: ExperimentSpec) -> str | None:
    """The first baseline run: what every comparison is against."""
    return next((r.name for r in spec.runs if r.method == "baseline"), None)


def comparison_table(
    spec: ExperimentSpec,
    curves: dict[str, list[dict]],
    per_seed: dict[str, dict[str, list[dict]]],
    speed: dict,
) -> list[dict]:
    """One row per run: parameters, images/s, final metrics (mean and spread over seeds), and per seed the
    epoch at which the run first reached the same seed's baseline final FID (with the speed-up over the
    baseline's epochs)."""
    from .compare import METRICS, first_epoch_reaching

    base = _reference_run(spec)
    rows = []
    for run in spec.runs:
        final = curves[run.name][-1]
        p = speed[run.name]["params"]
        row = {
            "run": run.name,
            "method": run.method,
            "clusters": run.clusters,
            "epochs": final["epoch"],
            "n_seeds": final["n_seeds"],
            "params_stage1": p["stage1"]["total"],
            "params_stage1_tables": p["stage1"]["head_and_embedding"],
            "params_stage2": p["stage2"]["total"] if "stage2" in p else None,
            "images_per_s": speed[run.name]["images_per_s"],
            **{k: v for k, v in final.items() if k in METRICS or _is_spread_key(k)},
            "reference": run.name == base,
            "epochs_to_baseline_fid": None,
            "epochs_to_baseline_fid_per_seed": None,
            "speedup_vs_baseline": None,
            "speedup_per_seed": None,
        }
        if base is not None:
            reached, ups = [], []
            for seed, curve in per_seed[run.name].items():
                target = per_seed[base][seed][-1]
                e = target["epoch"] if run.name == base else first_epoch_reaching(curve, target["fid"])
                reached.append(e)
                ups.append(target["epoch"] / e if e else None)
            row["epochs_to_baseline_fid_per_seed"], row["speedup_per_seed"] = reached, ups
            if all(e is not None for e in reached):
                row["epochs_to_baseline_fid"] = statistics.median(reached)
                row["speedup_vs_baseline"] = statistics.median(ups)
        rows.append(row)
    return rows


def _is_spread_key(k: str) -> bool:
    from .compare import METRICS

    stem, _, tail = k.rpartition("_")
    return tail in ("std", "min", "max", "all") and stem in METRICS


def verdicts(spec: ExperimentSpec, curves: dict[str, list[dict]]) -> list[dict]:
    """Every run against the baseline, and every pair of `contrasts`, on final FID and class accuracy by the
    rule of clusterar.compare: 'better' / 'worse' only when the seeds' min..max ranges do not overlap."""
    from .compare import METRICS, resolved

    base = _reference_run(spec)
    pairs = [(r.name, base) for r in spec.runs if base is not None and r.name != base]
    pairs += [(a, b) for a, b in spec.contrasts if (a, b) not in pairs]
    out = []
    for run, against in pairs:
        for key in ("fid", "class_accuracy"):
            a, b = values(curves[run][-1], key), values(curves[against][-1], key)
            if a is None or b is None:
                continue
            out.append(
                {
                    "run": run,
                    "against": against,
                    "metric": key,
                    "verdict": resolved(a, b, METRICS[key]),
                    "run_range": [min(a), max(a)],
                    "against_range": [min(b), max(b)],
                    "n_seeds": len(a),
                }
            )
    return out


def claim_results(spec: ExperimentSpec, per_seed: dict[str, dict[str, list[dict]]]) -> list[dict]:
    from .compare import check_claim

    return [check_claim(per_seed, c.run, c.against, c.speedup) | {"text": c.text} for c in spec.claims]


def convergence(spec: ExperimentSpec, curves: dict[str, list[dict]]) -> dict | None:
    """Whether the baseline's curve has flattened (see clusterar.compare.converged)."""
    from .compare import converged

    base = _reference_run(spec)
    return None if base is None else {"run": base, **converged(curves[base])}


def plot_report(data: dict, out: Path) -> None:
    from .viz import plot_series

    curves = data["curves"]

    def pts(cs: list[dict], key: str) -> list[tuple]:  # (x, mean, min, max): a band over seeds
        return [
            (c["epoch"], c[key], c.get(f"{key}_min", c[key]), c.get(f"{key}_max", c[key]))
            for c in cs
            if c.get(key) is not None
        ]

    seeds = data.get("seeds", [data["spec"]["seed"]])
    band = f" (mean and min..max over seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
    panels = {
        title: {n: pts(cs, key) for n, cs in curves.items()}
        for title, key in (
            ("FID (lower is better)", "fid"),
            ("Inception Score", "inception_score"),
            ("precision", "precision"),
            ("recall", "recall"),
            ("class accuracy of samples", "class_accuracy"),
            ("val token accuracy", "val_acc_token"),
            ("val cluster accuracy", "val_acc_cluster"),
        )
    }
    plot_series(
        panels, out / "curves.png", "epoch", title=f"{data['spec']['name']}: metrics against epochs{band}"
    )
    plot_samples(data, out)
    for param, per_run in data["sweeps"].items():
        numeric = all(isinstance(c["value"], int | float) for cs in per_run.values() for c in cs)
        if not numeric:
            continue
        sweep_panels = {
            title: {
                n: [
                    (c["value"], c[key], c.get(f"{key}_min", c[key]), c.get(f"{key}_max", c[key])) for c in cs
                ]
                for n, cs in per_run.items()
            }
            for title, key in (
                ("FID", "fid"),
                ("Inception Score", "inception_score"),
                ("precision", "precision"),
                ("recall", "recall"),
            )
        }
        plot_series(sweep_panels, out / f"sweep-{param}.png", param, title=f"sweep of {param} (final models)")


def plot_samples(data: dict, out: Path, per_class: int = 6) -> None:
    """samples.png: the first `per_class` samples of every class (one row each) of every run's final model,
    side by side, with its FID."""
    import numpy as np
    import torch

    from .viz import image_grid, plot_image_panels

    panels = {}
    for run, cs in data["curves"].items():
        final = cs[-1]
        with np.load(out / Path(final["grid"]).parent / "samples.npz") as f:
            images, labels = f["arr_0"], f["arr_1"]
        pick = [i for c in np.unique(labels) for i in np.flatnonzero(labels == c)[:per_class]]
        grid = image_grid(torch.from_numpy(images[pick]).permute(0, 3, 1, 2), nrow=per_class)
        panels[_grid_title(run, final)] = grid
    plot_image_panels(panels, out / "samples.png")


def _grid_title(run: str, point: dict) -> str:
    """A sample grid's caption: its grid is the first seed's, so is its FID (not the mean over seeds)."""
    fid = values(point, "fid")
    seeds = point.get("seeds") or [None]
    where = f"seed {seeds[0]}, " if len(seeds) > 1 else ""
    return f"{run} ({where}epoch {point['epoch']:g}, FID {_fmt(fid[0] if fid else None)})"


def _int(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_report(data: dict, out: Path) -> str:
    spec, ev = data["spec"], data["spec"]["eval"]
    tok = data["tokenizer"]
    name = spec["name"]
    lines = [
        f"# Experiment `{name}`",
        "",
        f"Written by `clusterar experiment` on {data['date']} ({data['machine']}). Wall time: "
        f"{data['timings']['total_this_invocation'] / 60:.1f} min for this invocation, "
        f"{data['timings']['all_invocations'] / 60:.1f} min for all {data['timings']['invocations']} "
        "invocations on this folder (finished stages are reused; seconds per stage in `timings.jsonl`). The "
        "spec as run is in `spec.json`.",
        "",
        "## Setup",
        "",
        f"- **Data**: `{spec['data']}` at {spec['image_size']}x{spec['image_size']}; token files "
        f"`{data['tokens']['train']}` ({_views_words(data.get('train_views'))}) and "
        f"`{data['tokens']['val']}`.",
    ]
    if "config" in tok:
        c, e = tok["config"], tok.get("eval", {})
        grid = spec["image_size"] // 2 ** (len(c.get("ch_mult", [1, 1, 1])) - 1)
        quality = ""
        if e:
            quality = f"; val PSNR {e['psnr']:.2f} dB, val codebook usage {_pct(e['usage'])}"
        lines.append(
            f"- **Tokenizer**: {c.get('codebook_size')} codes of dimension {c.get('codebook_dim')}, "
            f"{grid}x{grid} tokens per image{quality}."
        )
    else:
        lines.append(f"- **Tokenizer**: `{tok['path']}`.")
    for cname, c in data["clusters"].items():
        cs = spec["clusters"][cname]
        lines.append(
            f"- **Clusters `{cname}`**: {cs['method']}, {cs['n']} clusters of {c['min_size']}..{c['max_size']} "
            f"codes, objective {c['objective']:.2f}, fitted in {c['seconds']} s."
        )
    t = spec["train"]
    budget = f"{t['epochs']} epochs" if "epochs" in t else f"{t.get('steps')} steps"
    seeds = data.get("seeds", [spec["seed"]])
    several = len(seeds) > 1
    seed_words = (
        f"seeds {', '.join(map(str, seeds))}: every run and every sweep point once per seed, each seed's "
        "samples drawn with that seed"
        if several
        else f"seed {seeds[0]}"
    )
    if ev.get("every_steps"):
        points = f"every {ev['every_steps']} steps"
    elif ev["every_epochs"]:
        points = f"every {ev['every_epochs']:g} epochs"
    else:
        points = "of the final models"
    lines += [
        f"- **Training** (every run, {seed_words}; the tokenizer and token files are shared, seed "
        f"{spec['seed']}): {budget}, "
        + ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("epochs", "steps"))
        + "; per-run changes in the table of runs below.",
        f"- **Evaluation** ({points}): {ev['samples']} class-balanced samples per point, scored "
        f"against {data['curves'][spec['runs'][0]['name']][-1]['n_reference']} images of "
        f"`{_reference_name(spec)}` with {_extractor_name(spec, data)}: FID, Inception Score, precision "
        "and recall (k = 3), and class accuracy (the share of samples that the classifier reads as the class "
        "they were asked for), with the sampling settings of the table of runs. Val accuracies: "
        "teacher-forced on every val image (CTF: stage-2 token accuracy given the true coarse labels, "
        "stage-1 label accuracy); cluster accuracy is with respect to the run's own clusters.",
        "- **Speed**: images/s of the final models (tokens and decoding) at batch 64, median of 3 rounds "
        "timed in turns, on the same machine.",
    ]
    if several:
        lines.append(
            "- **Spread**: every figure is the mean over seeds ± the sample standard deviation (min..max). "
            "A difference counts as resolved only when the min..max ranges do not overlap (two runs that "
            f"do not differ separate this way by chance with probability {_chance(len(seeds))})."
        )
    lines += [
        "",
        "## Runs",
        "",
        "| run | method | clusters | training overrides | sampling |",
        "|---|---|---|---|---|",
    ]
    for r in spec["runs"]:
        tr = {**r["train"], **{f"refiner.{k}": v for k, v in r["refiner"].items()}}
        lines.append(
            f"| {r['name']} | {r['method']} | {r['clusters'] or '-'} | "
            f"{', '.join(f'{k}={v}' for k, v in tr.items()) or '-'} | "
            f"{_sampling(data['sampling'][r['name']], r['method'])} |"
        )
    lines += [
        "",
        "## Comparison (final models)",
        "",
        "Parameters: stage 1 is the autoregressive transformer (in brackets: its vocabulary-sized input "
        "embedding and output head), stage 2 CTF's refiner. *Epochs to baseline FID*: the first evaluated "
        "epoch at which the run's FID is at or below the baseline's final FID"
        + (" (each seed against the same seed's baseline)" if several else "")
        + ", and the baseline's epochs divided by it "
        + (
            f"(resolution: evaluations {points})."
            if points != "of the final models"
            else "(only the final models were evaluated here: 'by E' means reached at the final epoch E)."
        )
        + " The last rows are not models: the tokenizer's reconstructions of the val images (the best any "
        "transformer on these tokens can reach) and real train images, as many as a run's samples (what "
        "real data scores at this sample size).",
        "",
        "| run | method | params stage 1 | params stage 2 | img/s | FID | IS | precision | recall | "
        "class acc | val token acc | val cluster acc | epochs to baseline FID |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["table"]:
        lines.append(
            f"| {row['run']} | {row['method']} | {_int(row['params_stage1'])} "
            f"({_int(row['params_stage1_tables'])}) | {_int(row['params_stage2'])} | "
            f"{_fmt(row['images_per_s'], 1)} | {fmt_spread(row, 'fid')} | {fmt_spread(row, 'inception_score')} | "
            f"{fmt_spread(row, 'precision', 3)} | {fmt_spread(row, 'recall', 3)} | "
            f"{fmt_spread(row, 'class_accuracy', 1, pct=True)} | {fmt_spread(row, 'val_acc_token', 1, pct=True)} | "
            f"{fmt_spread(row, 'val_acc_cluster', 1, pct=True)} | {_reach(row, spec, points)} |"
        )
    names = {"tokenizer": "tokenizer (val reconstructions)", "real": "real train images"}
    for key, m in data.get("ceiling", {}).items():
        lines.append(
            f"| *{names.get(key, key)}* | - | - | - | - | {_fmt(m['fid'])} | {_fmt(m['inception_score'])} | "
            f"{_fmt(m['precision'], 3)} | {_fmt(m['recall'], 3)} | {_pct(m.get('class_accuracy'))} | - | - | - |"
        )
    ceiling = next(
        (
            c["extractor_val_accuracy"]
            for cs in data["curves"].values()
            for c in cs
            if c.get("extractor_val_accuracy")
        ),
        None,
    )
    if ceiling is not None:
        lines += [
            "",
            "class acc: the share of samples that the feature classifier reads as the class they were asked "
            f"for; the same classifier reads real val images at {_pct(ceiling)}, the ceiling of this column.",
        ]
    lines += _verdict_lines(data)
    lines += ["", "![metrics against epochs](curves.png)", "", "### FID against epochs", ""]
    epochs = sorted({c["epoch"] for cs in data["curves"].values() for c in cs})
    lines.append("| run | " + " | ".join(f"{e:.4g}" for e in epochs) + " |")
    lines.append("|---|" + "---:|" * len(epochs))
    for run, cs in data["curves"].items():
        by_epoch = {c["epoch"]: c for c in cs}
        cells = [fmt_spread(by_epoch[e], "fid") if e in by_epoch else "-" for e in epochs]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    for param, per_run in data["sweeps"].items():
        swept = [c["value"] for c in next(iter(per_run.values()))] if per_run else []
        lines += [
            "",
            f"## Sweep: {param} (final models, FID / precision / recall / class accuracy"
            + (", means over seeds" if several else "")
            + ")",
            "",
            "| run | " + " | ".join(str(v) for v in swept) + " |",
            "|---|" + "---:|" * len(swept),
        ]
        for run, cs in per_run.items():
            cells = [
                f"{_fmt(c['fid'])} / {_fmt(c['precision'], 2)} / {_fmt(c['recall'], 2)} / "
                f"{_pct(c.get('class_accuracy'))}"
                for c in cs
            ]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        if (out / f"sweep-{param}.png").exists():
            lines += ["", f"![sweep of {param}](sweep-{param}.png)"]
    lines += [
        "",
        "## Samples (final models, one row per class)",
        "",
        "![samples of every run](samples.png)",
        "",
        "The full grids (16 per class):",
        "",
    ]
    for run, cs in data["curves"].items():
        lines += [f"**{_grid_title(run, cs[-1])}**", ""]
        lines += [f"![{run} samples]({cs[-1]['grid']})", ""]
    lines += [
        "## Files",
        "",
        "`report.json` holds every number above; each run folder under `runs/` holds its model, "
        "`log.jsonl` and `curves.png`, and `evals/*/` the samples (`samples.npz`, `grid.png`) of each "
        "evaluation with its settings (`eval.json`, `sample.json`).",
        "",
    ]
    return "\n".join(lines)


def _token_views(path: Path) -> list[str]:
    from .tokens import TokenFile

    return list(TokenFile.open(path).meta["views"])


def _views_words(views: list[str] | None) -> str:
    if not views:
        return "views not recorded"
    if views == ["original"]:
        return "the images as they are, no flips"
    if views == ["original", "hflip"]:
        return "each image and its horizontal flip"
    return f"views {', '.join(views)}"


def _ep(e: float) -> str:
    return f"{e:.4g}"


def _chance(n_seeds: int) -> str:
    """P(two exchangeable runs of n seeds each have disjoint ranges) = 2 / C(2n, n)."""
    return f"{2 / math.comb(2 * n_seeds, n_seeds):.0%}"


def _reach(row: dict, spec: dict, points: str) -> str:
    per = row.get("epochs_to_baseline_fid_per_seed")
    if per is None:
        return "-"
    if row["reference"]:
        return f"{_ep(row['epochs'])} (reference)"
    if points == "of the final models":  # only final models evaluated: no finer answer
        return ", ".join(f"by {_ep(e)}" if e is not None else "not reached" for e in per)
    return ", ".join(
        f"{_ep(e)} ({u:.1f}x)" if e is not None else "not reached"
        for e, u in zip(per, row["speedup_per_seed"], strict=True)
    )


_WORDS = {"fid": ("FID", "lower"), "class_accuracy": ("class accuracy", "higher")}


def _verdict_lines(data: dict) -> list[str]:
    """The plain-words answers: differences by the range rule, the claims, the baseline's convergence."""
    lines = ["", "### Verdicts", ""]
    n = len(data.get("seeds", [0]))
    if n < 2:
        lines.append(
            "One seed: no spread is measured, so no difference below counts as resolved; repeat the runs "
            "with `seeds = [0, 1, 2]` in the spec to resolve them."
        )
    else:
        lines.append(
            f"Rule: with {n} seeds per run, a difference is resolved when the two runs' min..max ranges do not "
            "overlap; otherwise it is unresolved, whatever the means say."
        )
    lines.append("")
    for v in data.get("verdicts", []):
        metric, better = _WORDS[v["metric"]]
        nd, scale = (2, 1) if v["metric"] == "fid" else (1, 100)
        ra = "..".join(f"{scale * x:.{nd}f}" for x in v["run_range"])
        rb = "..".join(f"{scale * x:.{nd}f}" for x in v["against_range"])
        if v["verdict"] == "better":
            text = f"**{v['run']} beats {v['against']}** on final {metric} ({better} is better; {ra} against {rb})"
        elif v["verdict"] == "worse":
            text = f"**{v['against']} beats {v['run']}** on final {metric} ({rb} against {ra})"
        else:
            text = f"{v['run']} against {v['against']}, final {metric}: **unresolved** ({ra} against {rb})"
        lines.append(f"- {text}.")
    for c in data.get("claims", []):
        ups = ", ".join(f"{r['speedup']:.2g}x" if r["speedup"] else "not reached" for r in c["per_seed"])
        targets = ", ".join(
            f"{r['target_fid']:.2f}, reached at epoch {_ep(r['reference_epoch'])}" for r in c["per_seed"]
        )
        name = c["text"] or f"{c['run']} needs at most 1/{c['claimed']:g} of {c['against']}'s epochs"
        lines.append(
            f"- Claim: {name}. **{c['verdict'].capitalize()}** ({c['seeds_holding']} of {c['n_seeds']} seeds): "
            f"the target is {c['against']}'s converged FID, the mean of its last 3 evaluations ({targets}, per "
            f"seed); {c['against']}'s epochs to reach it divided by {c['run']}'s are {ups}; the claim needs "
            f"{c['claimed']:g}x."
        )
    conv = data.get("convergence")
    if conv:
        lines.append(_convergence_line(conv))
    return lines


def _convergence_line(conv: dict) -> str:
    """Whether the baseline has converged, the test that decides it first and the other one after it."""
    tests = []  # (says converged?, words)
    if "fid_change" in conv:
        tail = ", ".join(f"{x:.2f}" for x in conv.get("fid_tail", []))
        spread = (
            f"{'within' if conv['flat'] else 'more than'} the seed spread there ({conv['seed_range']:.2f})"
            if conv["seed_range"] > 0
            else "with no seed spread to compare against (one seed)"
        )
        tests.append(
            (
                conv["flat"],
                f"its mean FID moved by {conv['fid_change']:.2f} over the last {conv['points']} evaluations "
                f"({tail}), {spread}",
            )
        )
    if "val_loss_min" in conv:
        tests.append(
            (
                conv["loss_rising"],
                f"its val loss is {'above' if conv['loss_rising'] else 'at'} its minimum "
                f"({conv['val_loss_last']:.4f} now, {conv['val_loss_min']:.4f} at epoch "
                f"{_ep(conv['val_loss_min_epoch'])}"
                + ("; it has begun to over-fit)" if conv["loss_rising"] else ")"),
            )
        )
    if conv["converged"]:
        state = "**has converged**"
        words = [w for ok, w in tests if ok] + [f"but {w}" for ok, w in tests if not ok]
    else:
        state = "**has not converged** (the comparison is of models still learning)"
        words = [w for _, w in tests]
    return f"- The baseline `{conv['run']}` {state}: " + "; ".join(words) + "."


def _sampling(s: dict, method: str) -> str:
    text = f"CFG {s['cfg_scale']}, temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}"
    if method == "ctf":
        text += f"; stage 2: temperature {s['temperature2']}, top-k {s['top_k2']}, unguided"
        if s.get("cfg_scale2", 1.0) != 1.0:
            text = text.replace("unguided", f"CFG {s['cfg_scale2']}")
    return text


def _reference_name(spec: dict) -> str:
    if spec["data"].startswith("folder:"):
        return f"{spec['data'][len('folder:') :]} ({spec['eval']['reference']})"
    return f"{spec['data']}:{spec['eval']['reference']}"


def _extractor_name(spec: dict, data: dict | None = None) -> str:
    ev = spec["eval"]
    if ev.get("extractor") == "inception" or (ev.get("extractor") is None and ev.get("inception")):
        return f"Inception-v3 (`{ev['inception']}`)"
    return f"the `{spec['data']}` classifier's features (trained on its train split, cached)"

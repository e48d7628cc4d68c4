"""What an experiment asks for: the spec file's schema, its parsing and checks, and the configs it implies.

A spec (TOML) names the data, the tokenizer, the shared training budget and the runs. The tables embed the
library's own configs: [tokenizer] holds TokenizerTrainConfig fields, [train] / a run's train and refiner
tables TrainConfig fields, [eval] and a run's sample table SampleSettings fields. Every mistake is reported,
naming the table and key, before any work starts.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .. import limits
from ..clusters import CLUSTER_METHODS, UNEQUAL_METHODS, check_n_clusters
from ..convert import HEAD_INITS
from ..data import check_dataset_name
from ..errors import ClusterarError
from ..fileio import check_file, file_error, read_meta
from ..gpt import GPT_PRESETS
from ..methods import Method
from ..sample import STAGE2_SETTINGS, SampleSettings
from ..tokenizer import VQ_PRESETS, resolve_tokenizer_path, vq_preset
from ..train import TrainConfig
from ..train.tokenizer import TokenizerTrainConfig

if typing.TYPE_CHECKING:
    from .runner import SharedInputs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


RUN_METHODS = ("baseline", "iar", "ctf")
# TokenizerTrainConfig fields that the experiment sets for its tokenizer, never its [tokenizer] table
EXPERIMENT_SETS = ("data", "image_size", "seed", "device", "eval_every")
SPECS_DIR = Path(__file__).parent.parent / "specs"
# A spec name that becomes a path (the experiment's runs/NAME, a run's runs/RUN, a clusters table's
# clusters/NAME.safetensors) is a plain name: one path component that is never "." or "..", never absolute,
# never empty, and the same on every filesystem.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE_TEXT = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (it names a folder)"


@dataclass
class TokenizerSpec:
    """[tokenizer]: an existing tokenizer (`path`: tokenizer.safetensors, its run folder or a LlamaGen .pt),
    else the other keys are TokenizerTrainConfig fields to train one with. Its data, image size, seed and
    device are the experiment's (EXPERIMENT_SETS)."""

    path: str | None = None
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClustersSpec:
    method: str  # kmeans | balanced | random
    n: int
    seed: int = 0


@dataclass
class EvalSpec:
    """[eval]: when and how runs are scored. Its other keys are SampleSettings fields (the sampling of every
    run, over each method's defaults), kept in `sample`."""

    every_epochs: float = 0.0  # 0: only the final model
    every_steps: int = 0  # ... or every so many optimizer steps (finer than an epoch); not both
    samples: int = 1000  # images per evaluation, class-balanced
    reference: str = "val"  # split of the spec's data used as reference
    batch_size: int = 250
    inception: str | None = None  # path to pt_inception-2015-12-05-6726825d.pth
    extractor: str | None = None  # "classifier" | "inception"; None: inception if a path is given
    sample: dict[str, Any] = field(default_factory=dict)  # SampleSettings overrides


@dataclass
class RunSpec:
    name: str
    method: str
    clusters: str | None = None  # key of a [clusters.NAME] table
    train: dict[str, Any] = field(default_factory=dict)  # overrides of [train] for this run (stage 1 for CTF)
    refiner: dict[str, Any] = field(default_factory=dict)  # CTF stage-2 overrides of [train]
    sample: dict[str, Any] = field(default_factory=dict)  # overrides of [eval] sampling settings
    start: str | None = None  # an earlier baseline run: fine-tune its final model, converted to this method
    start_head: str = "mean"  # CTF stage-1 head of the conversion: mean or lsq (clusterar.convert)


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
    # [expected]: where single runs landed, measured (RUN = {class_accuracy = [lo, hi], fid = [lo, hi]},
    # runs = N, measured = "the command, date, seeds"); the report says whether this run is inside
    expected: dict[str, Any] = field(default_factory=dict)


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


def _tokenizer_table(d: Any, where: str) -> TokenizerSpec:
    """[tokenizer]: `path`, or TokenizerTrainConfig fields (checked by name and type here, by value in
    check_spec)."""
    if not isinstance(d, dict):
        raise ClusterarError(f"{where} must be a table, got {type(d).__name__}")
    d = dict(d)
    path = d.pop("path", None)
    if path is not None and not isinstance(path, str):
        raise ClusterarError(f"{where}: path must be a string, got {path!r}")
    known = {f.name for f in fields(TokenizerTrainConfig)} - set(EXPERIMENT_SETS)
    unknown = sorted(set(d) - known)
    if unknown:
        also = [k for k in unknown if k in EXPERIMENT_SETS]
        why = f" ({also} are the experiment's own settings)" if also else ""
        raise ClusterarError(
            f"{where}: unknown key(s) {unknown}{why}; known keys: {sorted(known | {'path'})}"
        )
    check_types(TokenizerTrainConfig, d, where)
    return TokenizerSpec(path=path, train=d)


def _eval_table(d: Any, where: str) -> EvalSpec:
    """[eval]: EvalSpec keys, and SampleSettings fields gathered into `sample`."""
    if not isinstance(d, dict):
        raise ClusterarError(f"{where} must be a table, got {type(d).__name__}")
    sampling = {f.name for f in fields(SampleSettings)}
    check_types(SampleSettings, {k: v for k, v in d.items() if k in sampling}, where)
    ev = _build(EvalSpec, {k: v for k, v in d.items() if k not in sampling and k != "sample"}, where)
    ev.sample = {k: v for k, v in d.items() if k in sampling}
    return ev


def parse_spec(d: dict, source: str = "spec") -> ExperimentSpec:
    """Build and validate a spec from a parsed TOML dict; every mistake is reported before any work starts.

    Building makes one normalisation, so that the spec as run (spec.json) is explicit: a claim without
    `against` is checked against the reference run, and says so (claim_against)."""
    d = copy.deepcopy(d)
    d.setdefault("name", Path(source).stem)
    tables = ("tokenizer", "clusters", "eval", "runs", "sweeps", "claims")
    top = {k: v for k, v in d.items() if k not in tables}
    spec = _build(ExperimentSpec, top, source)
    spec.tokenizer = _tokenizer_table(d.get("tokenizer", {}), f"{source} [tokenizer]")
    spec.clusters = {
        k: _build(ClustersSpec, v, f"{source} [clusters.{k}]") for k, v in d.get("clusters", {}).items()
    }
    spec.eval = _eval_table(d.get("eval", {}), f"{source} [eval]")
    spec.runs = [_build(RunSpec, r, f"{source} [[runs]] #{i + 1}") for i, r in enumerate(d.get("runs", []))]
    spec.sweeps = [
        _build(SweepSpec, s, f"{source} [[sweeps]] #{i + 1}") for i, s in enumerate(d.get("sweeps", []))
    ]
    claims = [
        _build(ClaimSpec, c, f"{source} [[claims]] #{i + 1}") for i, c in enumerate(d.get("claims", []))
    ]
    # the one normalisation: a claim's default `against` is spelled out, so spec.json names the run
    spec.claims = [replace(c, against=claim_against(spec, c) or "") for c in claims]
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
        text = p.read_text(
            encoding="utf-8-sig"
        )  # the byte-order mark some Windows editors write is read past
    except UnicodeDecodeError as e:
        raise file_error(p, "experiment spec", "is not a text file (binary bytes), so not TOML") from e
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise file_error(p, "experiment spec", f"is not valid TOML ({e})") from e
    if not d:
        raise file_error(p, "experiment spec", "holds no settings (an empty TOML file)")
    return parse_spec(d, str(p))


def check_name(name: Any, where: str, note: str = "") -> None:
    """A spec name that becomes a path follows NAME_RULE; `where` names the table and key."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ClusterarError(f"{where} = {name!r}{note} is not a plain name: use {NAME_RULE_TEXT}")


def check_spec(spec: ExperimentSpec, source: str) -> None:
    """Check a built spec table by table, in the order a reader meets them; the first mistake is raised,
    naming its table and key. It only reads the spec (parse_spec does the one normalisation)."""
    check_name(spec.name, f"{source}: name", " (the spec file's name when `name` is not set)")
    _check_data(spec, source)
    _check_tokenizer(spec, source)
    _check_eval(spec, source)
    _check_clusters(spec, source)
    _check_runs(spec, source)
    _check_sweeps(spec, source)
    _check_seeds(spec, source)
    _check_contrasts(spec, source)
    _check_claims(spec, source)
    _check_expected(spec, source)


def _check_data(spec: ExperimentSpec, source: str) -> None:
    """`data`: a known dataset, or a folder that exists."""
    try:
        check_dataset_name(spec.data)
    except ClusterarError as e:
        raise ClusterarError(f"{source}: data = {spec.data!r}: {e}") from e
    limits.IMAGE_SIDE.check(spec.image_size, f"{source}: image_size")


def _check_tokenizer(spec: ExperimentSpec, source: str) -> None:
    """[tokenizer]: a tokenizer to train has a known preset and settings TokenizerTrainConfig accepts."""
    if spec.tokenizer.path is not None:
        return
    preset = tokenizer_config(spec).preset
    if preset not in VQ_PRESETS:
        raise ClusterarError(
            f"{source}: unknown tokenizer preset {preset!r}; choose one of {', '.join(VQ_PRESETS)}"
        )
    try:
        tokenizer_config(spec).check()
    except ClusterarError as e:
        raise ClusterarError(f"{source} [tokenizer]: {as_spec_keys(str(e))}") from None


def _check_eval(spec: ExperimentSpec, source: str) -> None:
    """[eval] (checked before the runs: its settings shape every run's snapshots)."""
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
    limits.IMAGES.check(ev.samples, f"{source} [eval]: samples")
    if ev.every_epochs < 0:
        raise ClusterarError(
            f"{source} [eval]: every_epochs must be >= 0 (0: evaluate the final models only)"
        )
    if not spec.data.startswith("folder:") and ev.reference not in ("train", "val", "all"):
        raise ClusterarError(f"{source} [eval]: reference is a split of {spec.data}: train, val or all")


def _check_clusters(spec: ExperimentSpec, source: str) -> None:
    """Each [clusters.NAME]: a known method, and a number of clusters the codebook can be split into
    (when the codebook's size is known before any work)."""
    k = codebook_size(spec)
    for name, c in spec.clusters.items():
        check_name(name, f"{source} [clusters.NAME]: NAME")
        if c.method not in CLUSTER_METHODS:
            raise ClusterarError(
                f"{source} [clusters.{name}]: unknown method {c.method!r}; choose one of {', '.join(CLUSTER_METHODS)}"
            )
        if k is not None:
            try:
                check_n_clusters(k, c.n, balanced=c.method not in UNEQUAL_METHODS)
            except ClusterarError as e:
                raise ClusterarError(f"{source} [clusters.{name}]: n = {c.n}: {e}") from None


def _check_runs(spec: ExperimentSpec, source: str) -> None:
    """[[runs]]: at least one, names unique, each run checked against the runs listed before it."""
    if not spec.runs:
        raise ClusterarError(f"{source}: no [[runs]]; add at least one (method = baseline, iar or ctf)")
    names: set[str] = set()
    for i, r in enumerate(spec.runs):
        check_name(r.name, f"{source} [[runs]] #{i + 1}: name")
        where = f"{source} run {r.name!r}"
        if r.name in names:
            raise ClusterarError(f"{where}: two runs share this name")
        _check_start(spec, r, names, where)
        names.add(r.name)
        _check_run(spec, r, source, where)


def _check_run(spec: ExperimentSpec, r: RunSpec, source: str, where: str) -> None:
    """One run: its method and clusters, its train, refiner and sample tables, and the TrainConfig of each
    of its stages."""
    if r.method not in RUN_METHODS:
        raise ClusterarError(f"{where}: unknown method {r.method!r}; choose one of {', '.join(RUN_METHODS)}")
    if r.clusters is not None and r.clusters not in spec.clusters:
        raise ClusterarError(
            f"{where}: clusters {r.clusters!r} is not defined; defined: {sorted(spec.clusters) or 'none'}"
        )
    _check_run_method(spec, r, where)
    if r.refiner and r.method != "ctf":
        raise ClusterarError(f"{where}: a [refiner] table only applies to method ctf")
    for what, table in (("train", spec.train), ("run train", r.train), ("refiner", r.refiner)):
        _check_train_table(table, what, where, source)
    _check_run_sample(spec, r, where)
    try:
        train_configs(spec, r)
    except ClusterarError as e:
        raise ClusterarError(f"{source} {e}") from None


def _check_run_method(spec: ExperimentSpec, r: RunSpec, where: str) -> None:
    """The per-method rules of a run (`Method`'s, worded for spec keys): IAR and CTF need clusters, IAR's
    rearranged ids equal-size ones, and restrict_to_cluster is for CTF's refiner only."""
    try:
        Method.check_clusters_given(
            r.method,
            r.clusters is not None,
            method_key="method",
            clusters_key="`clusters = NAME` (a [clusters.NAME] table)",
        )
        if r.clusters:
            rearrange = r.train.get("rearrange", spec.train.get("rearrange", True))
            Method.check_equal_size(
                r.method,
                spec.clusters[r.clusters].method,
                rearrange,
                no_rearrange="set rearrange = false in the run's train table",
            )
    except ClusterarError as e:
        raise ClusterarError(f"{where}: {e}") from None
    for stage, (method, table) in run_stages(spec, r).items():
        try:
            Method.check_restrict_to_cluster(
                method,
                bool(table.get("restrict_to_cluster")),
                key="restrict_to_cluster",
                refiner="CTF's refiner (its [refiner] table)",
            )
        except ClusterarError as e:
            raise ClusterarError(f"{where} ({stage}): {e}") from None


# TrainConfig fields a run's stage gets from the experiment, never from a train table
_SET_BY_EXPERIMENT = ("method", "clusters", "tokens", "tokenizer", "seed", "device", "init_from")


def _check_train_table(table: dict, what: str, where: str, source: str) -> None:
    """A train table (`what`: [train], a run's train or refiner table, seen from run `where`): TrainConfig
    fields of the right type, none that the experiment sets, a known model preset."""
    train_fields = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(table) - train_fields)
    if bad:
        raise ClusterarError(f"{where}: unknown {what} setting(s) {bad}; known: {sorted(train_fields)}")
    check_types(TrainConfig, table, f"{source} [train]" if what == "train" else f"{where} {what} table")
    clash = sorted(set(table) & set(_SET_BY_EXPERIMENT))
    if clash:
        raise ClusterarError(f"{where}: {clash} are set by the experiment, not in a train table")
    model = table.get("model")
    if model is not None and model not in GPT_PRESETS:
        raise ClusterarError(
            f"{where}: unknown model preset {model!r}; choose one of {', '.join(GPT_PRESETS)}"
        )


def _check_run_sample(spec: ExperimentSpec, r: RunSpec, where: str) -> None:
    """A run's sample table: SampleSettings fields, stage-2 ones only for CTF, valid over [eval]'s."""
    sampling = [f.name for f in fields(SampleSettings)]
    bad = sorted(set(r.sample) - set(sampling))
    if bad:
        raise ClusterarError(f"{where}: unknown sample setting(s) {bad}; known: {sampling}")
    if r.method != "ctf" and set(STAGE2_SETTINGS) & set(r.sample):
        raise ClusterarError(f"{where}: {', '.join(STAGE2_SETTINGS)} are CTF stage-2 settings")
    try:
        SampleSettings.for_method(r.method, **sample_settings(spec, r))
    except ClusterarError as e:
        raise ClusterarError(f"{where}: {e}") from e


def _check_sweeps(spec: ExperimentSpec, source: str) -> None:
    """[[sweeps]]: a sampling setting, over named runs, with values; stage-2 settings over CTF runs only."""
    sampling = [f.name for f in fields(SampleSettings)]
    names = {r.name for r in spec.runs}
    for s in spec.sweeps:
        if s.param not in sampling:
            raise ClusterarError(
                f"{source} sweep {s.param!r}: sampling sweeps vary one of {sampling}; training "
                "settings (clusters, lambda, stage-2 size...) are swept by adding [[runs]]"
            )
        unknown = sorted(set(s.runs) - names)
        if unknown:
            raise ClusterarError(f"{source} sweep {s.param!r}: unknown run(s) {unknown}")
        if not s.values:
            raise ClusterarError(f"{source} sweep {s.param!r}: no values")
        not_ctf = [r.name for r in spec.runs if r.name in s.runs and r.method != "ctf"]
        if s.param in STAGE2_SETTINGS and not_ctf:
            raise ClusterarError(
                f"{source} sweep {s.param!r}: a CTF stage-2 setting, but {not_ctf} are not CTF"
            )


def _check_expected(spec: ExperimentSpec, source: str) -> None:
    """[expected]: `measured` (text), `runs` (how many runs the ranges span) and, per run, [lo, hi] ranges
    of class_accuracy and fid."""
    runs = {r.name for r in spec.runs}
    for key, value in spec.expected.items():
        where = f"{source} [expected] {key}"
        if key == "measured":
            if not isinstance(value, str):
                raise ClusterarError(f"{where} must be text (the command, date and seeds), got {value!r}")
            continue
        if key == "runs":
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ClusterarError(
                    f"{where} must be the number of runs the ranges span (>= 2), got {value!r}"
                )
            continue
        if key not in runs:
            raise ClusterarError(f"{where}: no run is named {key!r}; runs: {', '.join(sorted(runs))}")
        if not isinstance(value, dict) or not value or set(value) - {"class_accuracy", "fid"}:
            raise ClusterarError(
                f"{where} must be {{class_accuracy = [lo, hi], fid = [lo, hi]}}, got {value!r}"
            )
        for metric, r in value.items():
            ok = isinstance(r, list) and len(r) == 2 and all(_is_number(x) for x in r) and r[0] <= r[1]
            if not ok:
                raise ClusterarError(f"{where}.{metric} must be [lo, hi] with lo <= hi, got {r!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_seeds(spec: ExperimentSpec, source: str) -> None:
    """`seeds`: distinct whole numbers >= 0."""
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in spec.seeds):
        raise ClusterarError(f"{source}: seeds must be a list of whole numbers >= 0, got {spec.seeds}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ClusterarError(f"{source}: seeds {spec.seeds} repeat a seed; list each seed once")


def _check_contrasts(spec: ExperimentSpec, source: str) -> None:
    """`contrasts`: [run, against] pairs of two different runs."""
    names = {r.name for r in spec.runs}
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


def _check_claims(spec: ExperimentSpec, source: str) -> None:
    """[[claims]]: a run and the run it is checked against (by default the reference run), a speed-up > 0."""
    names = {r.name for r in spec.runs}
    for c in spec.claims:
        against = claim_against(spec, c)
        if not against:
            raise ClusterarError(
                f"{source} [[claims]] {c.run}: no baseline run to compare against; add one, or name the "
                "run with against = NAME"
            )
        for what, name in (("run", c.run), ("against", against)):
            if name not in names:
                raise ClusterarError(
                    f"{source} [[claims]]: {what} = {name!r} is not one of the runs {sorted(names)}"
                )
        if not c.speedup > 0:
            raise ClusterarError(
                f"{source} [[claims]] {c.run}: speedup must be a number > 0, got {c.speedup}"
            )


def eval_extractor(spec: ExperimentSpec) -> str:
    """The [eval] feature extractor: as set, else Inception when a weights path is given, else the
    classifier trained on the spec's own data."""
    return spec.eval.extractor or ("inception" if spec.eval.inception else "classifier")


def tokenizer_config(spec: ExperimentSpec):
    """The TokenizerTrainConfig of the spec's [tokenizer] table, with the experiment's data, image size,
    seed and device."""
    own = dict(data=spec.data, image_size=spec.image_size, seed=spec.seed, device=spec.device)
    return TokenizerTrainConfig(**{**spec.tokenizer.train, **own, "eval_every": 10**9})


def codebook_size(spec: ExperimentSpec) -> int | None:
    """K of the spec's tokenizer, known before any work: the preset's, or the given file's (None if that
    file does not exist yet)."""
    t = spec.tokenizer
    if t.path is None:
        cfg = tokenizer_config(spec)
        return cfg.codebook_size or vq_preset(cfg.preset).codebook_size
    try:
        path = resolve_tokenizer_path(t.path)
    except ClusterarError:
        return None
    if path.suffix != ".safetensors":
        return None
    return read_meta(path, "tokenizer").get("config", {}).get("codebook_size")


def _check_start(spec: ExperimentSpec, r: RunSpec, earlier: set[str], where: str) -> None:
    """`start` names an earlier baseline run, and `start_head` a head initialisation of `clusterar.convert`."""
    if r.start_head not in HEAD_INITS:
        raise ClusterarError(
            f"{where}: start_head must be one of {', '.join(HEAD_INITS)}, got {r.start_head!r}"
        )
    if r.start is None:
        if r.start_head != "mean":
            raise ClusterarError(f"{where}: start_head applies to a run with `start`")
        return
    if r.start not in earlier:
        raise ClusterarError(
            f"{where}: start = {r.start!r} must name a run listed before it (it is trained first); listed before: "
            f"{sorted(earlier) or 'none'}"
        )
    if next(x for x in spec.runs if x.name == r.start).method != "baseline":
        raise ClusterarError(
            f"{where}: start = {r.start!r} is not a baseline run; conversions start from a baseline"
        )
    if r.start_head != "mean" and r.method != "ctf":
        raise ClusterarError(f"{where}: start_head chooses CTF's stage-1 head; this run is {r.method}")


def train_configs(
    spec: ExperimentSpec, run: RunSpec, inputs: SharedInputs | None = None, seed: int | None = None
) -> dict[str, Any]:
    """The TrainConfig of each stage of `run` ({"model": cfg} or, for CTF, {"coarse": cfg, "refiner": cfg}).

    Without `inputs` the paths are placeholders: `check_spec` builds the configs this way to check every
    setting before any work starts.
    """
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
    out = {}
    for stage, (method, table) in run_stages(spec, run).items():
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


def run_stages(spec: ExperimentSpec, run: RunSpec) -> dict[str, tuple[str, dict[str, Any]]]:
    """The training stages of `run` as {stage: (TrainConfig method, its train table over [train])}: one
    "model" stage, or CTF's "coarse" (the run's train table) and "refiner" (its refiner table)."""
    if run.method != "ctf":
        return {"model": (run.method, {**spec.train, **run.train})}
    return {
        "coarse": ("ctf-coarse", {**spec.train, **run.train}),
        "refiner": ("ctf-refiner", {**spec.train, **run.refiner}),
    }


def sample_settings(spec: ExperimentSpec, run: RunSpec, **overrides: Any) -> dict[str, Any]:
    """The run's sampling settings over its method's defaults: [eval]'s, then the run's `sample` table,
    then `overrides` (a sweep point); CTF's stage-2 settings only for CTF runs."""
    d = {**spec.eval.sample, **run.sample, **overrides}
    return {k: v for k, v in d.items() if run.method == "ctf" or k not in STAGE2_SETTINGS}


def sweep_runs(spec: ExperimentSpec, s: SweepSpec) -> list[str]:
    """The runs a sweep applies to: those named, else every run the parameter means something for."""
    if s.runs:
        return list(s.runs)
    return [r.name for r in spec.runs if r.method == "ctf" or s.param not in STAGE2_SETTINGS]


def reference_run(spec: ExperimentSpec) -> str | None:
    """The first baseline run: what every comparison is against."""
    return next((r.name for r in spec.runs if r.method == "baseline"), None)


def claim_against(spec: ExperimentSpec, claim: ClaimSpec) -> str | None:
    """The run a claim is checked against: the one it names, else the reference run (None: neither)."""
    return claim.against or reference_run(spec)

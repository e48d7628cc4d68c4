"""The one way a command gets a flag: `add_flag(parser, name, default)`.

A flag means the same thing, with the same check and choices, on every command that takes it: what it is
is declared once, by name, in FLAGS; each command gives its default (and, where the flag names something
of its own, such as --out, its help). The flags that mirror a configuration dataclass (TrainConfig,
TokenizerTrainConfig, SampleSettings) are made from its fields by `add_config_flags`, through the same
code: the field's type (bool as --x / --no-x), its default and its help (the comment beside it).

Numbers are checked while parsing, so a bad value is one line naming the flag (exit status 2) before any
work. Choices the library defines (presets, methods, modes) are read from the library when a command's
parser is built, so help lists them as they are; nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from .. import limits

# ----------------------------------------------------------------------------- number checks


def number(
    kind: type, low: float, strict: bool, what: str, high: limits.Limit | None = None
) -> Callable[[str], object]:
    """A parse function for a number that must be >= low (> low if strict) and, given a `high` limit
    (`clusterar.limits`), within it; argparse names the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {what}, got {text!r}") from None
        if (
            value != value
            or value in (float("inf"), float("-inf"))
            or value < low
            or (strict and value == low)
        ):
            raise argparse.ArgumentTypeError(f"takes {what}, got {text}")
        if high is not None and value > high.high:
            raise argparse.ArgumentTypeError(f"{high.said()}, got {text}")
        return value

    return parse


positive_int = number(int, 0, True, "a whole number >= 1")
nonneg_int = number(int, 0, False, "a whole number >= 0")
positive_float = number(float, 0.0, True, "a number > 0")
nonneg_float = number(float, 0.0, False, "a number >= 0")
finite_float = number(
    float, -math.inf, False, "a finite number"
)  # a float field's flag, unless FLAGS checks more

# Upper bounds for sizes that cannot fit in any machine (`clusterar.limits`): refused when parsed.
THREADS = number(int, 0, True, "a whole number >= 1", limits.THREADS)
WORKERS = number(int, 0, False, "a whole number >= 0", limits.WORKERS)
IMAGE_SIDE = number(int, 0, True, "a whole number >= 1", limits.IMAGE_SIDE)
CODEBOOK = number(int, 0, True, "a whole number >= 1", limits.CODEBOOK)
IMAGES = number(int, 0, True, "a whole number >= 1", limits.IMAGES)
EPOCHS = number(float, 0.0, True, "a number > 0", limits.EPOCHS)
STEPS = number(int, 0, True, "a whole number >= 1", limits.STEPS)


# ----------------------------------------------------------------------------- choices from the library
# Called when a command's parser is built (never for `clusterar --help`): the library is the one source.


def _on_error() -> tuple[str, ...]:
    from ..data import ON_ERROR

    return ON_ERROR


def _schedules() -> tuple[str, ...]:
    from ..train.transformer import SCHEDULES

    return SCHEDULES


def _train_methods() -> tuple[str, ...]:
    from ..methods import TRAIN_METHODS

    return TRAIN_METHODS


def _gpt_presets() -> tuple[str, ...]:
    from ..gpt import GPT_PRESETS

    return tuple(GPT_PRESETS)


def _vq_presets() -> tuple[str, ...]:
    from ..tokenizer import VQ_PRESETS

    return tuple(VQ_PRESETS)


def _views() -> tuple[str, ...]:
    from ..data import VIEWS

    return ("auto", *VIEWS)


def _head_inits() -> tuple[str, ...]:
    from ..convert import HEAD_INITS

    return HEAD_INITS


def _stage2_modes() -> tuple[str, ...]:
    from ..sample import STAGE2_MODES

    return STAGE2_MODES


# ----------------------------------------------------------------------------- the table

SWITCH = None  # Flag.type of an on/off flag (store_true)
# Flag.path: what the flag's value is on disk, checked by `paths.check_paths` before any work. READS: a
# file or folder the command reads (never written over); the others name an output and what the command
# writes there (a command whose --out is a file says so with add_flag's `path=WRITES_FILE`). READS_NAMED:
# a name (mnist, classifier) or a path after "folder:" (folder:PATH, classifier:folder:PATH).
READS, READS_NAMED, WRITES_FILE, WRITES_FOLDER, WRITES_ANY = (
    "reads",
    "reads named",
    "file",
    "folder",
    "file or folder",
)
WRITES = (WRITES_FILE, WRITES_FOLDER, WRITES_ANY)
TABLE = "table"  # add_flag's `path` default: as FLAGS declares it


@dataclass(frozen=True)
class Flag:
    """What a flag is wherever it appears: its parse-and-check function (SWITCH: takes no value), its
    choices (a tuple, or a function that reads them from the library), its help, and what its value is
    on disk (`path`: READS, one of WRITES, or None: not a path)."""

    type: Callable[[str], object] | None = str
    help: str = ""
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    path: str | None = None


FLAGS: dict[str, Flag] = {
    # every command that computes
    "device": Flag(help="auto (the first CUDA GPU, else CPU), cpu or cuda[:N]"),
    "threads": Flag(THREADS, "CPU threads for PyTorch"),
    "no_progress": Flag(SWITCH, "no progress bars"),
    "seed": Flag(nonneg_int, "random seed"),
    "verbose": Flag(SWITCH, "log more"),
    # what a command reads and writes
    "out": Flag(help="output folder", path=WRITES_FOLDER),
    "out_dir": Flag(help="output folder", path=WRITES_FOLDER),
    "cache_dir": Flag(help="cache folder", path=WRITES_FOLDER),
    "resume": Flag(SWITCH, "continue the run in --out where it stopped"),
    "tokenizer": Flag(help="tokenizer.safetensors, its run folder, or a LlamaGen .pt", path=READS),
    "tokens": Flag(help="token file (clusterar encode)", path=READS),
    "clusters": Flag(help="clusters file (clusterar cluster fit)", path=READS),
    "data": Flag(help="mnist, digits or folder:PATH", path=READS_NAMED),
    "split": Flag(help="dataset split: train or val (folders: a sub-folder name)"),
    "splits": Flag(help="dataset splits"),
    "on_error": Flag(help="unreadable images: fail, or skip and list them", choices=_on_error),
    "num_workers": Flag(WORKERS, "DataLoader workers for folder datasets"),
    "views": Flag(
        help="views per image; auto: flip for image folders, none for the bundled digits (mirrored digits "
        "are not digits)",
        choices=_views,
    ),
    "save_every": Flag(
        nonneg_float,
        "save progress (SPLIT.safetensors.partial.*) this often; a rerun continues from it",
    ),
    # sizes and budgets
    "image_size": Flag(IMAGE_SIDE, "image side in pixels (images are resized and centre-cropped to it)"),
    "batch_size": Flag(positive_int, "images per batch"),
    "grid_size": Flag(positive_int, "token grid side of a LlamaGen .pt"),
    "n": Flag(IMAGES, "number of images"),
    "stop_at": Flag(
        positive_int,
        "end this session after step N with a checkpoint (time-sliced jobs); continue with --resume",
    ),
    # experiment, demo
    "quick": Flag(
        SWITCH, "the minute-sized spec (tiny models on the digits set, specs/quick.toml): a smoke test"
    ),
    "check": Flag(SWITCH, "only validate the spec"),
    # cluster
    "from_iar": Flag(
        help="import IAR's permutation file (1-D int64 [K], new_id = mapping[old_id]) instead of fitting",
        path=READS,
    ),
    "restarts": Flag(positive_int, "k-means++ starts, best kept"),
    # evaluate
    "ref": Flag(
        help="reference: mnist:val, mnist:train, digits:val, ..., an .npz (e.g. VIRTUAL_imagenet256_labeled.npz) "
        "or a folder of images",
        path=READS,
    ),
    "inception": Flag(
        help="Inception-v3 FID weights file pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)",
        path=READS,
    ),
    "extractor": Flag(
        help="classifier (of the --ref dataset), classifier:mnist, classifier:digits or classifier:folder:PATH",
        path=READS_NAMED,
    ),
    "k": Flag(positive_int, "neighbourhood size for precision/recall"),
    # sample, pipeline
    "per_class": Flag(
        SWITCH,
        "class-balanced labels, n/num_classes per class (the first n % num_classes classes get one more); "
        "default: labels uniform at random",
    ),
    "labels": Flag(help="comma-separated class ids, repeated to --n"),
    "restrict_to_cluster": Flag(SWITCH, "ctf: sample every fine token inside its coarse cluster"),
    "compile": Flag(
        SWITCH, 'torch.compile the decode step (mode "reduce-overhead": CUDA graphs) and the refiner'
    ),
    "no_images": Flag(SWITCH, "skip the per-image PNGs (grid and npz only)"),
    "coarse": Flag(help="CTF stage-1 run folder or model file (ctf-coarse)", path=READS),
    "refiner": Flag(help="CTF stage-2 run folder or model file (ctf-refiner)", path=READS),
    # convert
    "head": Flag(help="CTF stage-1 head initialisation", choices=_head_inits),
    "lsq_sequences": Flag(positive_int, "token sequences --head lsq fits on"),
    "ema": Flag(SWITCH, "a LlamaGen training checkpoint: convert its EMA weights"),
    # serve
    "host": Flag(help="address to listen on"),
    "port": Flag(nonneg_int, "port to listen on; 0 picks a free one"),
    # The checks and choices of config fields (their help is the field's comment, their type the field's).
    "method": Flag(choices=_train_methods),
    "model": Flag(choices=_gpt_presets),
    "preset": Flag(choices=_vq_presets),
    "schedule": Flag(choices=_schedules),
    "steps": Flag(STEPS),
    "epochs": Flag(EPOCHS),
    "minutes": Flag(positive_float, "the time the experiment may take on this device"),
    "grad_accum": Flag(positive_int),
    "log_every": Flag(positive_int),
    "ckpt_every": Flag(positive_int),
    "eval_every": Flag(positive_int),
    "snapshot_every": Flag(positive_float),
    "snapshot_steps": Flag(positive_int),
    "lr": Flag(positive_float),
    "min_lr": Flag(nonneg_float),
    "warmup": Flag(nonneg_int),
    "weight_decay": Flag(nonneg_float),
    "cluster_weight": Flag(nonneg_float),
    "grad_clip": Flag(nonneg_float),
    "restart_every": Flag(nonneg_int),
    "codebook_size": Flag(CODEBOOK),
    "temperature": Flag(positive_float),
    "temperature2": Flag(positive_float),
    "top_k": Flag(nonneg_int),
    "top_p": Flag(positive_float),
    "top_k2": Flag(nonneg_int),
    "cfg_scale": Flag(nonneg_float),
    "cfg_scale2": Flag(nonneg_float),
    "stage2": Flag(choices=_stage2_modes),
}


def add_flag(
    p: argparse.ArgumentParser,
    name: str,
    default: object = None,
    help: str | None = None,
    *,
    said: str | None = None,
    names: tuple[str, ...] = (),
    path: str | None = TABLE,
    **kw: object,
) -> None:
    """--NAME on parser (or argument group) `p`, as FLAGS declares it, with this command's default; the
    default is said in the help (`said` words it where the value alone would not). `help` replaces the
    table's where the flag names something of the command's own; `names` replaces --NAME (aliases);
    `path` replaces the table's (WRITES_FILE where this command's --out is a file, None for a count
    where the table has a path); keywords go to argparse and win over the table (a command's own
    choices)."""
    flag = FLAGS[name]
    if path != TABLE:
        flag = dataclasses.replace(flag, path=path)
    _add(p, name, flag, default, help, said=said, names=names, **kw)


def add_input(p: argparse.ArgumentParser, name: str, help: str, **kw: object) -> None:
    """Positional argument NAME, a file or folder the command reads (never written over, see READS)."""
    action = p.add_argument(name, help=help, **kw)
    action.path = READS  # type: ignore[attr-defined]


def _add(p, name: str, flag: Flag, default, help, *, said, names, **kw) -> None:
    text = help if help is not None else flag.help
    if said is None and default is not None and not isinstance(default, bool):
        said = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
    if said is not None or (isinstance(default, bool) and "action" in kw):
        text += f" (default: {said if said is not None else default})"
    text = text.strip().replace("%", "%%")
    names = names or ("--" + name.replace("_", "-"),)
    if flag.type is SWITCH and "type" not in kw and "action" not in kw:
        kw["action"] = "store_true"
        default = bool(default)
    elif "action" not in kw:
        kw.setdefault("type", flag.type)
        choices = flag.choices() if callable(flag.choices) else flag.choices
        kw.setdefault("choices", choices)
    action = p.add_argument(*names, dest=name, default=default, **kw)
    action.path = flag.path  # type: ignore[attr-defined]  # read by paths.check_paths
    action.help = text  # set afterwards: BooleanOptionalAction would append its own default (Python < 3.13)


def add_compute_flags(
    p: argparse.ArgumentParser, seed: bool = False, progress: bool = True, device: str | None = "auto"
) -> None:
    """--device, --threads and --no-progress, which every command that computes takes, and --seed where
    it draws random numbers. device=None: the command's spec decides (demo, experiment)."""
    said = None if device else "the spec's device, auto unless it sets one"
    add_flag(p, "device", device, said=said)
    add_flag(p, "threads", None, said="its choice")
    if progress:
        add_flag(p, "no_progress")
    if seed:
        add_flag(p, "seed", 0)


# ----------------------------------------------------------------------------- config dataclasses


def field_help(cls: type) -> dict[str, str]:
    """{field: help} from the trailing comments of a config dataclass (`steps: int = 1000  # budget ...`):
    a flag's help is written once, beside its field."""
    import inspect
    import re

    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen build): flags without help
            continue
        helps.update(re.findall(r"^    (\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M))
    return helps


def add_config_flags(
    p: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    unset: bool = False,
    said: dict[str, str] | None = None,
) -> None:
    """One flag per field of config dataclass `cls` (but `skip`), through the same table as add_flag:
    the field's type (X | None parses an X; bool is --x / --no-x; Literal gives choices) unless the table
    checks it (a positive int, ...), its default, and its help (the field's comment). unset: every
    default is None, and `said` words what None stands for."""
    import typing  # not at the top: `clusterar --help` does without it

    hints = typing.get_type_hints(cls)  # real types, also under `from __future__ import annotations`
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # `int | None` parses an int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = FLAGS.get(f.name, Flag(finite_float if kind is float else kind))
        kw: dict[str, object] = {"names": ()}
        if unset:
            default = None
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default, kw["required"] = None, True
        kw["said"] = (said or {}).get(f.name) or (
            "none" if default is None and "required" not in kw else None
        )
        if kind is bool and not unset:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(kind)
        elif flag.type in (str, SWITCH):  # else the table's check (a positive int, ...)
            kw["type"] = kind
        _add(p, f.name, flag, default, helps.get(f.name), **kw)


def config_from_args(cls: type, args: argparse.Namespace):
    """The config dataclass `cls` from the parsed flags that mirror its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

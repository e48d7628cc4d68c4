"""The model file: a GPT's weights plus `ModelInfo`, the one schema of what the file says about itself.

`clusterar train` and `clusterar convert` write model files (`save_model`); sampling, validation,
fine-tuning (--init-from), conversion and the experiment runner read them (`read_model_info` without the
weights, `load_model` with them). The info names everything a model must be used with: the method and its
id space, the tokenizer and the clusters (paths and fingerprints, checked on load by
`load_checked_tokenizer` / `load_checked_clusters`), the data it was trained on and how far.

On disk the info is the JSON metadata of the safetensors file: {"kind": "gpt", "gpt_config": {...},
"version": 1, "method": ..., ...}; a field left None is not written. Files written before the version
field existed read as version 1; a newer version is refused, so an old clusterar never misreads a newer
file. A LlamaGen .pt carries no metadata: `load_llamagen_model` gives it the info of a baseline
(source "llamagen").
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import load_state_strict
from .clusters import CodebookClusters
from .errors import ClusterarError
from .fileio import expect_kind, file_error, load_tensors, read_meta, remedy, save_tensors
from .gpt import GPT, GPTConfig, load_llamagen_gpt
from .tokenizer import VQModel, load_tokenizer, resolve_tokenizer_path

MODEL_FILE = "model.safetensors"  # a run folder's final model; snapshots sit in RUN/snapshots/
MODEL_KIND = "gpt"
MODEL_INFO_VERSION = 1  # files without a version field are version 1


@dataclass
class ModelInfo:
    """What a model file records besides its weights (None: not recorded).

    Written by `clusterar train` (`Trainer.info`) and `clusterar convert`; the tests' fixtures write the
    same fields by hand, as `clusterar train` would.
    """

    method: str | None = None  # baseline, iar, ctf-coarse or ctf-refiner
    preset: str | None = None  # the GPT preset trained (or "from PATH" for --init-from's architecture)
    tokenizer: str | None = None  # absolute path of the tokenizer whose codes the model reads/predicts
    tokenizer_fingerprint: str | None = None
    clusters: str | None = None  # absolute path of the clusters file (baseline: logging only)
    clusters_fingerprint: str | None = None
    n_clusters: int | None = None
    cluster_weight: float | None = None  # IAR's lambda (not recorded by convert)
    id_space: str = "original"  # what the token ids mean: original, rearranged (perm[old]) or coarse (phi)
    restrict_to_cluster: bool = False  # a refiner trained with the cluster mask must be sampled with it
    step: int | None = None  # optimizer steps of this run (0 for a converted model)
    epoch: float | None = None  # passes over the training images in this run
    image_size: int | None = None
    grid: list[int] | None = None  # token grid [rows, cols]
    dataset: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    tokens: str | None = None  # absolute path of the train token file
    init_from: str | None = None  # the model file this run started from (--init-from)
    init_epoch: float | None = None  # epochs the starting model had been trained before this run
    converted_from: str | None = None  # the baseline `clusterar convert` read
    conversion: dict[str, Any] | None = None  # {"method": iar|ctf|baseline, "head": mean|lsq|None}
    source: str | None = None  # "llamagen": the info `load_llamagen_model` gives a LlamaGen checkpoint
    gpt_config: GPTConfig | None = field(default=None, repr=False)  # the model's; set by `save_model`
    version: int = MODEL_INFO_VERSION

    # ------------------------------------------------------------ derived facts

    @property
    def total_epoch(self) -> float:
        """Epochs of training behind the weights: this run's plus its starting model's (one epoch axis for
        a fine-tuned run and the run it started from)."""
        return float(self.epoch or 0.0) + float(self.init_epoch or 0.0)

    @property
    def is_ctf_stage(self) -> bool:
        """One of CTF's two stages, which sample only together (a pipeline file)."""
        return self.method in ("ctf-coarse", "ctf-refiner")

    @property
    def rearranged(self) -> bool:
        """The model reads and predicts IAR's rearranged ids (mapped back with the clusters' inverse)."""
        return self.id_space == "rearranged"

    # ------------------------------------------------------------ the on-disk form

    def to_dict(self) -> dict[str, Any]:
        """The JSON metadata stored in the file (without "kind"), None fields left out."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                d[f.name] = v.to_dict() if isinstance(v, GPTConfig) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "the model file") -> ModelInfo:
        """Read the metadata of any model file written so far; refuse one of a newer format."""
        d = dict(d)
        version = d.get("version", 1)
        if not isinstance(version, int) or version > MODEL_INFO_VERSION:
            raise ClusterarError(
                f"{source} was written by a newer clusterar (model file version {version}, this one reads up "
                f"to {MODEL_INFO_VERSION}); upgrade clusterar"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ClusterarError(
                f"{source} records fields this clusterar does not know ({', '.join(unknown)}); it was written "
                "by another clusterar version"
            )
        if d.get("gpt_config") is not None:
            d["gpt_config"] = GPTConfig.from_dict(d["gpt_config"])
        return cls(**d)


# ----------------------------------------------------------------------------- files


def save_model(path: str | os.PathLike, model: GPT, info: ModelInfo) -> None:
    """Write a model's weights and its info (with the model's full GPTConfig) atomically.

    The config makes `load_model` need nothing else (grid size included, which LlamaGen files cannot tell).
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    info = dataclasses.replace(info, gpt_config=model.config, version=MODEL_INFO_VERSION)
    save_tensors(path, state, {"kind": MODEL_KIND, **info.to_dict()})


def read_model_info(path: str | os.PathLike, what: str = "model file") -> ModelInfo:
    """The info of a model file without loading weights; `what` names the role of the file in errors
    (its advice comes from fileio.REMEDIES)."""
    meta = read_meta(path, "model file")
    expect_kind(path, meta, MODEL_KIND, what)
    meta.pop("kind")
    if "gpt_config" not in meta:
        raise file_error(path, "model file", "lacks the metadata field 'gpt_config'", damaged=True)
    return ModelInfo.from_dict(meta, str(path))


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[GPT, ModelInfo]:
    """Load a model file strictly, in eval mode; returns (model, info)."""
    info = read_model_info(path)
    tensors, _ = load_tensors(path, "model file")
    with torch.device("meta"):
        model = GPT(info.gpt_config)
    model = model.to_empty(device="cpu")
    model.init_buffers()
    load_state_strict(model, tensors, source=str(path))
    return model.to(device).eval(), info


def load_llamagen_model(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    grid_size: int | None = None,
    ema: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[GPT, ModelInfo]:
    """A LlamaGen c2i checkpoint (`gpt.load_llamagen_gpt`) with the info of a baseline on original ids;
    `tokenizer` is recorded as given (the .pt names none)."""
    model = load_llamagen_gpt(path, grid_size=grid_size, ema=ema, device=device)
    info = ModelInfo(
        method="baseline",
        id_space="original",
        tokenizer=str(tokenizer) if tokenizer is not None else None,
        source="llamagen",
        gpt_config=model.config,
    )
    return model, info


def resolve_model_file(path: str | os.PathLike, what: str) -> Path:
    """A run folder means its model.safetensors; a file is itself (`what` names it in errors)."""
    p = Path(path)
    if p.is_dir():
        if not (p / MODEL_FILE).is_file():
            raise ClusterarError(
                f"{what} {p} is a folder without {MODEL_FILE}; pass a finished training run (clusterar train) or "
                "a model file such as RUN/snapshots/model-stepN.safetensors"
            )
        return p / MODEL_FILE
    if not p.exists():
        raise ClusterarError(f"{what} not found: {p}; check the path, or {remedy('model file')}")
    return p


# ----------------------------------------------------------------------------- what a model was trained with


def load_checked_tokenizer(path: str | os.PathLike, expected: str | None, who: str) -> VQModel:
    """The tokenizer at `path`, refused unless its fingerprint is `expected` (the one `who` records)."""
    if not Path(path).exists():
        raise ClusterarError(
            f"the tokenizer of {who}, {path}, is not found; pass --tokenizer with its current path"
        )
    p = resolve_tokenizer_path(path)
    tok = load_tokenizer(p)
    if expected is not None:
        fp = tok.fingerprint()
        if fp != expected:
            raise ClusterarError(
                f"{who} was trained on tokens of tokenizer {expected}, but {p} has fingerprint {fp}; pass "
                "--tokenizer with the tokenizer the model was trained with"
            )
    return tok


def load_checked_clusters(
    path: str | os.PathLike | None, expected: str | None, tokenizer: VQModel, tok_source: str, who: str
) -> CodebookClusters:
    """The clusters at `path`, refused unless their fingerprint is `expected` (the one `who` records) and
    they were computed on `tokenizer`'s codebook (`tok_source` names it)."""
    if path is None:
        raise ClusterarError(
            f"{who} records no clusters file; pass --clusters with the file it was trained with"
        )
    if not Path(path).exists():
        raise ClusterarError(
            f"clusters file {path} of {who} not found; pass --clusters with its current path"
        )
    clusters = CodebookClusters.load(path)
    if expected is not None and clusters.fingerprint() != expected:
        raise ClusterarError(
            f"{who} was trained with clusters {expected}, but {path} holds clusters {clusters.fingerprint()}; "
            "pass --clusters with the file the model was trained with"
        )
    clusters.check_codebook(
        tokenizer.quantize.embedding.weight.detach().cpu(), f"codebook of tokenizer {tok_source}"
    )
    return clusters

"""Sampling images from trained models: the LlamaGen baseline, IAR and CTF's two stages.

Token sampling follows the field's conventions (SPEC §5): classifier-free guidance on RAW logits over a
[cond; null] batch, u + s * (c - u), then temperature, then top-k / top-p, then a categorical draw; the
same token is fed to both halves. Autoregressive models decode with the static KV cache of `clusterar.gpt`
(prefill the class token, then one token per step); `use_cache=False` recomputes the full forward pass at
every step (the naive path, for the benchmark and as a reference in tests).

CTF (SPEC §4) samples in two stages: the causal coarse model generates cluster labels, then ONE forward of
the bidirectional refiner on (class, coarse sequence) gives fine logits for every position, sampled all at
once. Guidance in stage 2 is optional (`cfg_scale2`, default 1 = off: the paper guides stage 1 only). A
refiner trained with `restrict_to_cluster` is sampled with the same mask: every fine token lies in its
position's coarse cluster.

A `Pipeline` ties a tokenizer, the model(s) and the clusters together and turns class labels into uint8
images. It loads from a run folder / model file (baseline, IAR), a LlamaGen checkpoint (baseline, with
--tokenizer), or a pipeline JSON (CTF, written by `write_ctf_pipeline` / `clusterar pipeline ctf`), and
checks every fingerprint on the way, so a model is never decoded with another tokenizer or clusters than
those it was trained with. `sample_to_folder` writes what `clusterar sample` produces (grid, PNGs, an
ADM-format .npz, sample.json), batch by batch and resumable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .clusters import CodebookClusters
from .data import to_uint8
from .errors import ClusterarError
from .fileio import atomic_path, kill_point, read_json, remedy, write_json
from .gpt import GPT, MODEL_FILE, GPTConfig, load_gpt, load_llamagen_gpt, param_breakdown, read_gpt_info
from .methods import restrict_logits
from .runtime import autocast, notice
from .tokenizer import VQModel, load_tokenizer, resolve_tokenizer_path

PIPELINE_KIND = "clusterar.pipeline"
PIPELINE_VERSION = 1
LLAMAGEN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# ----------------------------------------------------------------------------- logits -> tokens


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [cond; null] batch of RAW logits [2B, ...] -> [B, ...]: u + s (c - u)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of the last axis (-inf elsewhere); 0 or >= vocab keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens until their mass reaches top_p (the token that crosses
    it included, so at least one survives); 1.0 keeps all."""
    if top_p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits [..., V] -> token ids [...]: temperature, then top-k / top-p, then one categorical draw per row."""
    x = logits.reshape(-1, logits.shape[-1]).float() / temperature
    x = filter_top_p(filter_top_k(x, top_k), top_p)
    return draw(x.softmax(dim=-1), generator).view(logits.shape[:-1])


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probabilities [R, V] (rows need not sum to 1) -> ids [R], by inverse CDF.

    Exact like torch.multinomial, but one uniform number per row instead of one per vocabulary entry:
    multinomial's exponential race spent 40% of CPU sampling time on 250 x 4,096 random numbers per token.
    A zero-probability entry is never drawn (its CDF step is empty).
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # x < total: in range
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def _check_sampling(temperature: float, top_k: int, top_p: float, what: str = "") -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ClusterarError(
            f"temperature{what} must be > 0, got {temperature} (top-k 1 gives greedy decoding)"
        )
    if top_k < 0:
        raise ClusterarError(f"top-k{what} must be >= 0 (0 = the whole vocabulary), got {top_k}")
    if not (0 < top_p <= 1):
        raise ClusterarError(f"top-p{what} must lie in (0, 1] (1 = off), got {top_p}")


def _check_labels(labels: torch.Tensor, model: GPT, what: str = "labels") -> None:
    c = model.config
    if labels.dim() != 1 or labels.dtype != torch.long:
        raise ClusterarError(
            f"{what} must be a 1-D int64 tensor of class ids, got {labels.dtype} {list(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > c.num_classes):
        raise ClusterarError(
            f"{what} must lie in [0, {c.num_classes}) ({c.num_classes} = the null class: unconditional), got "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    if model.training:
        raise ClusterarError("the model is in training mode (dropout on); call model.eval() before sampling")


# ----------------------------------------------------------------------------- autoregressive generation


def _cache_dtype(model: GPT, device: torch.device) -> torch.dtype:
    """bf16 under CUDA autocast (keys/values come out of bf16 matmuls), else the weights' dtype."""
    return torch.bfloat16 if device.type == "cuda" else model.tok_embeddings.weight.dtype


def ensure_cache(model: GPT, batch: int, device: torch.device) -> None:
    """Set up the static KV cache unless one large enough already exists. Keeping it between calls keeps a
    compiled decode step valid (new buffers would recompile it); `model.clear_cache()` frees it."""
    cache = model.layers[0].attention.kv_cache
    dtype = _cache_dtype(model, device)
    if (
        cache is not None
        and model.max_batch >= batch
        and cache.k_cache.dtype == dtype
        and cache.k_cache.device == device
    ):
        return
    model.setup_cache(batch, dtype=dtype, device=device)


def decode_fn(model: GPT, compile: bool | str = False):
    """The model's decode step, compiled once per model and mode when asked.

    True compiles with torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs on a GPU); a string
    names another torch.compile backend (e.g. "eager" checks that the step traces without graph breaks).
    """
    if not compile:
        return model.decode_step
    key = "reduce-overhead" if compile is True else str(compile)
    compiled = model.__dict__.setdefault("_clusterar_compiled", {})
    if key not in compiled:
        if compile is True:
            compiled[key] = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
        else:
            compiled[key] = torch.compile(model.decode_step, backend=compile, fullgraph=True)
    return compiled[key]


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool | str = False,
    null_batch: bool | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample token ids [B, N] from a causal model for class ids `labels` [B] (on the model's device).

    cfg_scale != 1 runs the [cond; null] batch (`null_batch=True` forces it even at scale 1, e.g. to time
    guidance or check that scale 1 equals conditional sampling). `generator` (on the model's device) makes
    the draw repeatable; the same seed gives other tokens on another device. `use_cache=False` is the naive
    path: the full forward pass recomputed at every step. With `return_logits` also returns the guided raw
    logits [B, N, V] each token was drawn from (before temperature and filtering).

    On CUDA everything runs under bf16 autocast with a bf16 KV cache; the cache stays allocated for the next
    call (`model.clear_cache()` frees it).
    """
    c = model.config
    if not c.causal:
        raise ClusterarError("generate needs a causal model; a bidirectional refiner samples with `refine`")
    _check_labels(labels, model)
    _check_sampling(temperature, top_k, top_p)
    device = labels.device
    b, n = labels.shape[0], c.seq_len
    batched = cfg_scale != 1.0 if null_batch is None else null_batch
    cond = torch.cat([labels, torch.full_like(labels, c.null_class)]) if batched else labels
    out = torch.empty(b, n, dtype=torch.long, device=device)
    kept: list[torch.Tensor] = []

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = guide(logits, cfg_scale) if batched else logits.float()
        if return_logits:
            kept.append(logits.clone())
        return sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    with autocast(device):
        if use_cache:
            ensure_cache(model, cond.shape[0], device)
            step = decode_fn(model, compile)
            positions = torch.arange(c.max_positions, device=device)
            tok = pick(model.prefill(cond)[:, -1])
            out[:, 0] = tok
            for i in range(1, n):
                x = torch.cat([tok, tok]) if batched else tok
                p = c.cls_token_num + i - 1  # sequence position of token i-1, which predicts token i
                tok = pick(step(x[:, None], positions[p : p + 1])[:, -1])
                out[:, i] = tok
        else:
            for i in range(n):
                idx = torch.cat([out[:, :i], out[:, :i]]) if batched else out[:, :i]
                out[:, i] = pick(model(idx, cond)[:, -1])
    if return_logits:
        return out, torch.stack(kept, dim=1)
    return out


@torch.no_grad()
def refine(
    refiner: GPT,
    coarse: torch.Tensor,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    cluster_labels: torch.Tensor | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CTF stage 2: fine token ids [B, N] for a coarse sequence [B, N], all positions in ONE forward pass.

    cfg_scale != 1 guides with a [cond; null] batch as in stage 1. `cluster_labels` [K] (token -> cluster)
    masks every fine logit outside its position's coarse cluster (after guidance, before temperature).
    """
    c = refiner.config
    if c.causal:
        raise ClusterarError(
            "refine needs a bidirectional (causal=False) refiner; a causal model uses `generate`"
        )
    _check_labels(labels, refiner)
    _check_sampling(temperature, top_k, top_p, " (stage 2)")
    if coarse.shape != (labels.shape[0], c.seq_len):
        raise ClusterarError(
            f"coarse sequence must be [B, {c.seq_len}] for B labels, got {list(coarse.shape)}"
        )
    with autocast(labels.device):
        if cfg_scale != 1.0:
            null = torch.full_like(labels, c.null_class)
            logits = guide(refiner(torch.cat([coarse, coarse]), torch.cat([labels, null])), cfg_scale)
        else:
            logits = refiner(coarse, labels).float()
    if cluster_labels is not None:
        logits = restrict_logits(logits, coarse, cluster_labels)
    ids = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return (ids, logits) if return_logits else ids


# ----------------------------------------------------------------------------- settings


@dataclass
class SampleSettings:
    """Sampling knobs; `for_method` fills the defaults of each method (CTF: the paper's CFG 2.0, tau 1.1)."""

    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = whole vocabulary
    top_p: float = 1.0  # 1 = off
    temperature2: float = 1.0  # CTF stage 2
    top_k2: int = 0  # CTF stage 2
    cfg_scale2: float = 1.0  # CTF stage 2 guidance; 1 = off (the paper guides stage 1 only)

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> SampleSettings:
        """Defaults of `method` ("baseline", "iar", "ctf") with the non-None overrides applied."""
        base = cls(temperature=1.1, temperature2=1.1) if method == "ctf" else cls()
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ClusterarError(f"unknown sampling setting(s) {sorted(unknown)}; known: {sorted(known)}")
        out = cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
        out.check()
        return out

    def check(self) -> None:
        _check_sampling(self.temperature, self.top_k, self.top_p)
        _check_sampling(self.temperature2, self.top_k2, 1.0, " (stage 2)")
        for name in ("cfg_scale", "cfg_scale2"):
            if not math.isfinite(getattr(self, name)):
                raise ClusterarError(f"{name} must be finite, got {getattr(self, name)}")


@dataclass
class SampledTokens:
    """One sampled batch: `ids` in the tokenizer's (original) id space, `raw` as the model produced them
    (IAR: rearranged ids), `coarse` the CTF stage-1 cluster labels (None otherwise)."""

    ids: torch.Tensor
    raw: torch.Tensor
    coarse: torch.Tensor | None = None


# ----------------------------------------------------------------------------- pipeline


def _model_file(path: str | os.PathLike, what: str) -> Path:
    """A run folder means its model.safetensors."""
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


def _load_checked_tokenizer(path: str | os.PathLike, expected: str | None, who: str) -> VQModel:
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


def _load_checked_clusters(
    path: str | os.PathLike | None, expected: str | None, tokenizer: VQModel, tok_source: str, who: str
) -> CodebookClusters:
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


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    q = Path(p)
    return str(q if q.is_absolute() else (base / q))


class Pipeline:
    """Tokenizer + method + model(s) + clusters: class labels in, uint8 images [B, H, W, 3] out.

    method "baseline" / "iar": one causal model (IAR's rearranged ids are mapped back with
    clusters.inverse before decoding). method "ctf": the coarse model (stage 1) and the refiner (stage 2).
    The constructor checks that the parts belong together; `load` reads them from files.
    """

    def __init__(
        self,
        tokenizer: VQModel,
        model: GPT,
        meta: dict,
        *,
        refiner: GPT | None = None,
        refiner_meta: dict | None = None,
        clusters: CodebookClusters | None = None,
        restrict_to_cluster: bool | None = None,
        source: str | None = None,
    ):
        self.tokenizer, self.model, self.meta = tokenizer.eval(), model.eval(), dict(meta)
        self.refiner, self.refiner_meta = refiner, dict(refiner_meta or {})
        self.clusters = clusters
        self.source = source or "the pipeline"
        self.device = model.tok_embeddings.weight.device
        method = meta.get("method")
        k = tokenizer.config.codebook_size
        c = model.config
        if refiner is None:
            if method in ("ctf-coarse", "ctf-refiner"):
                raise ClusterarError(
                    f"{self.source} is one stage of CTF ({method}); tie both stages together with `clusterar "
                    "pipeline ctf --coarse RUN1 --refiner RUN2 --out pipeline.json` and sample that"
                )
            if method not in ("baseline", "iar"):
                raise ClusterarError(
                    f"{self.source} has method {method!r}; a model file from `clusterar train` records baseline, "
                    "iar, ctf-coarse or ctf-refiner"
                )
            self.method = method
            self._check(c.causal, "the model must be causal (autoregressive)")
            self._check(
                c.vocab_size == k, f"the model predicts {c.vocab_size} tokens, the tokenizer has {k} codes"
            )
        else:
            self.method = "ctf"
            r = refiner.config
            self._check(
                method == "ctf-coarse" and self.refiner_meta.get("method") == "ctf-refiner",
                f"CTF needs a ctf-coarse and a ctf-refiner model, got {method!r} and "
                f"{self.refiner_meta.get('method')!r}",
            )
            self._check(c.causal and not r.causal, "stage 1 must be causal and the refiner bidirectional")
            self._check(clusters is not None, "CTF needs the clusters both stages were trained with")
            m = clusters.n_clusters
            self._check(c.vocab_size == m, f"stage 1 predicts {c.vocab_size} labels, the clusters are {m}")
            self._check(
                r.input_vocab_size == m,
                f"the refiner reads {r.input_vocab_size} labels, the clusters are {m}",
            )
            self._check(
                r.vocab_size == k, f"the refiner predicts {r.vocab_size} tokens, the tokenizer has {k} codes"
            )
            self._check(
                (r.grid_size, r.num_classes) == (c.grid_size, c.num_classes),
                f"stage 1 has a {c.grid_size}x{c.grid_size} grid and {c.num_classes} classes, the refiner "
                f"{r.grid_size}x{r.grid_size} and {r.num_classes}",
            )
            self._check(
                self.refiner_meta.get("tokenizer_fingerprint") == meta.get("tokenizer_fingerprint")
                and self.refiner_meta.get("clusters_fingerprint") == meta.get("clusters_fingerprint"),
                "the two stages were trained with different tokenizers or clusters",
            )
        if clusters is not None:
            self._check(
                clusters.num_codes == k, f"the clusters cover {clusters.num_codes} codes, the tokenizer {k}"
            )
            for m in (meta, self.refiner_meta):
                fp = m.get("clusters_fingerprint")
                self._check(
                    fp is None or fp == clusters.fingerprint(), "the models were trained with other clusters"
                )
        self.id_space = meta.get("id_space", "original")
        if self.method == "iar" and self.id_space == "rearranged":
            self._check(clusters is not None, "IAR's rearranged ids need the clusters file to map them back")
            self._unmap = clusters.inverse.to(self.device)
        else:
            self._unmap = None
        trained_restricted = bool(self.refiner_meta.get("restrict_to_cluster"))
        if restrict_to_cluster is False and trained_restricted:
            raise ClusterarError(
                f"the refiner of {self.source} was trained with restrict_to_cluster; it must be sampled with the "
                "same mask"
            )
        if restrict_to_cluster and self.method != "ctf":
            raise ClusterarError("restrict_to_cluster only applies to CTF pipelines")
        self.restrict_to_cluster = bool(restrict_to_cluster) or trained_restricted
        self._cluster_labels = clusters.labels.to(self.device) if self.restrict_to_cluster else None
        self.grid = c.grid_size
        self.image_size = self.grid * tokenizer.config.downsample
        self.num_classes = c.num_classes
        self.class_names = meta.get("class_names")

    def _check(self, ok: bool, msg: str) -> None:
        if not ok:
            raise ClusterarError(f"{self.source}: {msg}")

    # --------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        tokenizer: str | os.PathLike | None = None,
        clusters: str | os.PathLike | None = None,
        restrict_to_cluster: bool | None = None,
        grid_size: int | None = None,
    ) -> Pipeline:
        """From a run folder or model.safetensors (baseline, iar), a pipeline JSON (ctf), or a LlamaGen
        checkpoint .pt (baseline; needs `tokenizer`, `grid_size` defaults to 16). `tokenizer` and `clusters`
        override the paths recorded in the files (their fingerprints must still match)."""
        p = Path(path)
        if p.is_dir() and not (p / MODEL_FILE).is_file() and (p / "pipeline.json").is_file():
            p = p / "pipeline.json"
        if p.suffix == ".json":
            return cls._from_json(p, device, tokenizer, clusters, restrict_to_cluster)
        if p.suffix in LLAMAGEN_SUFFIXES:
            return cls._from_llamagen(p, device, tokenizer, grid_size)
        p = _model_file(p, "model")
        meta = read_gpt_info(p, "model to sample")
        who = f"model {p}"
        if meta.get("method") in ("ctf-coarse", "ctf-refiner"):
            raise ClusterarError(
                f"{p} is one stage of CTF ({meta['method']}); tie both stages together with `clusterar pipeline "
                "ctf --coarse RUN1 --refiner RUN2 --out pipeline.json` and sample that"
            )
        if "method" not in meta:
            raise ClusterarError(
                f"{p} records no training method; sample models written by `clusterar train`"
            )
        tok_path = tokenizer or meta.get("tokenizer")
        if tok_path is None:
            raise ClusterarError(f"{p} records no tokenizer; pass --tokenizer")
        tok = _load_checked_tokenizer(tok_path, meta.get("tokenizer_fingerprint"), who)
        cl = None
        if meta.get("method") == "iar" and meta.get("id_space") == "rearranged":
            cl = _load_checked_clusters(
                clusters or meta.get("clusters"), meta.get("clusters_fingerprint"), tok, str(tok_path), who
            )
        model, meta = load_gpt(p, device)
        return cls(tok.to(device), model, meta, clusters=cl, source=str(p))

    @classmethod
    def _from_llamagen(cls, p: Path, device, tokenizer, grid_size: int | None) -> Pipeline:
        if tokenizer is None:
            raise ClusterarError(
                f"{p} is a LlamaGen checkpoint, which names no tokenizer; pass --tokenizer (e.g. vq_ds16_c2i.pt)"
            )
        tok = load_tokenizer(resolve_tokenizer_path(tokenizer))
        model = load_llamagen_gpt(p, grid_size=grid_size or 16, device=device)
        meta = {
            "method": "baseline",
            "id_space": "original",
            "tokenizer": str(tokenizer),
            "source": "llamagen",
        }
        return cls(tok.to(device), model, meta, source=str(p))

    @classmethod
    def _from_json(cls, p: Path, device, tokenizer, clusters, restrict_to_cluster) -> Pipeline:
        d = read_json(p, "pipeline file")
        if d.get("kind") != PIPELINE_KIND or d.get("method") != "ctf":
            raise ClusterarError(
                f"{p} is not a CTF pipeline file (kind {d.get('kind')!r}, method {d.get('method')!r}); write one "
                "with `clusterar pipeline ctf`"
            )
        if d.get("version", 0) > PIPELINE_VERSION:
            raise ClusterarError(f"{p} was written by a newer clusterar (version {d['version']}); upgrade")
        base = p.resolve().parent
        try:
            coarse_p = _model_file(_resolve(base, d["coarse"]), "CTF stage-1 model")
            refiner_p = _model_file(_resolve(base, d["refiner"]), "CTF refiner")
            tok_path = tokenizer or _resolve(base, d["tokenizer"])
            cl_path = clusters or _resolve(base, d["clusters"])
            tok_fp, cl_fp = d["tokenizer_fingerprint"], d["clusters_fingerprint"]
        except KeyError as e:
            raise ClusterarError(
                f"pipeline file {p} lacks the field {e}; write it again with `clusterar pipeline ctf`"
            ) from e
        who = f"pipeline {p}"
        for mp in (coarse_p, refiner_p):
            m = read_gpt_info(mp)
            if (m.get("tokenizer_fingerprint"), m.get("clusters_fingerprint")) != (tok_fp, cl_fp):
                raise ClusterarError(
                    f"{mp} was trained with tokenizer {m.get('tokenizer_fingerprint')} and clusters "
                    f"{m.get('clusters_fingerprint')}, but {p} ties tokenizer {tok_fp} and clusters {cl_fp}; the "
                    "model file changed since the pipeline was written: write it again with `clusterar pipeline ctf`"
                )
        tok = _load_checked_tokenizer(tok_path, tok_fp, who)
        cl = _load_checked_clusters(cl_path, cl_fp, tok, str(tok_path), who)
        coarse, coarse_meta = load_gpt(coarse_p, device)
        refiner, refiner_meta = load_gpt(refiner_p, device)
        if restrict_to_cluster is None and d.get("restrict_to_cluster"):
            restrict_to_cluster = True
        return cls(
            tok.to(device),
            coarse,
            coarse_meta,
            refiner=refiner,
            refiner_meta=refiner_meta,
            clusters=cl,
            restrict_to_cluster=restrict_to_cluster,
            source=str(p),
        )

    # --------------------------------------------------------------- sampling

    def settings(self, **overrides: Any) -> SampleSettings:
        """This method's default settings with the non-None overrides applied."""
        return SampleSettings.for_method(self.method, **overrides)

    def _labels(self, labels: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1).to(self.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ClusterarError(
                f"class labels must lie in [0, {self.num_classes}) for {self.source}, got {int(t.min())}..{int(t.max())}"
            )
        return t

    def sample_tokens(
        self,
        labels: Any,
        seed: int = 0,
        *,
        settings: SampleSettings | None = None,
        compile: bool | str = False,
        use_cache: bool = True,
        **overrides: Any,
    ) -> SampledTokens:
        """Token ids for class `labels`, drawn with torch.Generator(device).manual_seed(seed)."""
        s = settings or self.settings(**overrides)
        y = self._labels(labels)
        g = torch.Generator(self.device).manual_seed(int(seed))
        common = dict(generator=g, compile=compile, use_cache=use_cache)
        if self.method == "ctf":
            coarse = generate(
                self.model,
                y,
                cfg_scale=s.cfg_scale,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                **common,
            )
            fine = refine(
                self.refiner,
                coarse,
                y,
                cfg_scale=s.cfg_scale2,
                temperature=s.temperature2,
                top_k=s.top_k2,
                generator=g,
                cluster_labels=self._cluster_labels,
            )
            return SampledTokens(ids=fine, raw=fine, coarse=coarse)
        raw = generate(
            self.model,
            y,
            cfg_scale=s.cfg_scale,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            **common,
        )
        ids = self._unmap[raw] if self._unmap is not None else raw
        return SampledTokens(ids=ids, raw=raw)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Original token ids [B, N] -> uint8 images [B, H, W, 3] on the CPU (float32 decoder, as LlamaGen)."""
        x = self.tokenizer.decode(ids.to(self.device).view(-1, self.grid, self.grid))
        img = to_uint8(x.float()).permute(0, 2, 3, 1)
        if img.shape[-1] == 1:  # grayscale tokenizer: three equal channels, as the ADM format expects
            img = img.expand(*img.shape[:-1], 3)
        return img.contiguous().cpu()

    def sample(self, labels: Any, seed: int = 0, **kw: Any) -> torch.Tensor:
        """uint8 images [B, H, W, 3] for class `labels` (see `sample_tokens` for the keywords)."""
        return self.decode(self.sample_tokens(labels, seed, **kw).ids)

    # --------------------------------------------------------------- accounting

    def params(self) -> dict[str, Any]:
        """Parameters per stage (`gpt.param_breakdown`): stage1 = the autoregressive model, stage2 = refiner."""
        out: dict[str, Any] = {"stage1": param_breakdown(self.model)}
        if self.refiner is not None:
            out["stage2"] = param_breakdown(self.refiner)
        out["total"] = sum(v["total"] for v in out.values())
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(
        self,
        batch_size: int,
        batches: int = 2,
        warmup: int = 1,
        *,
        decode: bool = True,
        compile: bool | str = False,
        use_cache: bool = True,
        seed: int = 0,
        **overrides: Any,
    ) -> dict[str, float]:
        """Images per second over `batches` timed batches after `warmup` untimed ones (compilation, CUDA
        graph capture, allocator warm-up); `decode=False` times the tokens only."""
        if batch_size < 1 or batches < 1 or warmup < 0:
            raise ClusterarError(
                f"time needs batch_size, batches >= 1 and warmup >= 0, got {batch_size}, {batches}, {warmup}"
            )
        s = self.settings(**overrides)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed))
        for i in range(warmup + batches):
            if i == warmup:
                self._sync()
                start = time.perf_counter()
            tokens = self.sample_tokens(y, seed + i, settings=s, compile=compile, use_cache=use_cache)
            if decode:
                self.decode(tokens.ids)
        self._sync()
        seconds = time.perf_counter() - start
        return {
            "images_per_s": batch_size * batches / seconds,
            "seconds": seconds,
            "images": batch_size * batches,
        }

    def describe(self) -> dict[str, Any]:
        """What sample.json records about the pipeline."""
        d = {
            "source": self.source,
            "method": self.method,
            "grid": self.grid,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "step": self.meta.get("step"),
            "tokenizer": self.meta.get("tokenizer"),
            "params": self.params(),
        }
        if self.method == "ctf":
            d.update(refiner_step=self.refiner_meta.get("step"), restrict_to_cluster=self.restrict_to_cluster)
        if self.clusters is not None:
            d["clusters"] = self.clusters.source
        return d


# ----------------------------------------------------------------------------- CTF pipeline files


def write_ctf_pipeline(
    coarse: str | os.PathLike,
    refiner: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    clusters: str | os.PathLike | None = None,
    restrict_to_cluster: bool = False,
) -> dict:
    """Write the JSON that ties a CTF stage-1 run and a refiner run to their tokenizer and clusters.

    Everything is checked first (methods, grids, classes, vocabularies, and that both stages were trained
    with the same tokenizer and clusters, the clusters computed on that tokenizer's codebook); paths are
    stored relative to the JSON's folder, so the tree can move as a whole. Returns the JSON written.
    """
    out = Path(out)
    coarse_p = _model_file(coarse, "--coarse")
    refiner_p = _model_file(refiner, "--refiner")
    cm, rm = read_gpt_info(coarse_p), read_gpt_info(refiner_p)
    if cm.get("method") != "ctf-coarse":
        raise ClusterarError(
            f"--coarse {coarse_p} is a {cm.get('method')!r} model; pass a run of --method ctf-coarse"
        )
    if rm.get("method") != "ctf-refiner":
        raise ClusterarError(
            f"--refiner {refiner_p} is a {rm.get('method')!r} model; pass a run of --method ctf-refiner"
        )
    for key, what in (("tokenizer_fingerprint", "tokenizers"), ("clusters_fingerprint", "clusters")):
        if cm.get(key) != rm.get(key):
            raise ClusterarError(
                f"the two stages were trained with different {what}: {coarse_p} with {cm.get(key)}, {refiner_p} "
                f"with {rm.get(key)}; train both on the same tokenizer and clusters file"
            )
    if not (tokenizer or cm.get("tokenizer")):
        raise ClusterarError(f"--coarse {coarse_p} records no tokenizer; pass --tokenizer")
    tok_path = Path(tokenizer or cm["tokenizer"])
    tok = _load_checked_tokenizer(tok_path, cm.get("tokenizer_fingerprint"), f"--coarse {coarse_p}")
    tok_path = resolve_tokenizer_path(tok_path)
    cl_path = clusters or cm.get("clusters")
    cl = _load_checked_clusters(
        cl_path, cm.get("clusters_fingerprint"), tok, str(tok_path), f"--coarse {coarse_p}"
    )
    # The architecture checks of the Pipeline constructor, on weightless shells.
    with torch.device("meta"):
        shells = [GPT(GPTConfig.from_dict(m["gpt_config"])) for m in (cm, rm)]
    Pipeline(
        tok,
        shells[0],
        cm,
        refiner=shells[1],
        refiner_meta=rm,
        clusters=cl,
        restrict_to_cluster=True if restrict_to_cluster else None,
        source=str(out),
    )
    base = out.resolve().parent

    def rel(p: str | os.PathLike) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    d = {
        "kind": PIPELINE_KIND,
        "version": PIPELINE_VERSION,
        "method": "ctf",
        "tokenizer": rel(tok_path),
        "tokenizer_fingerprint": cm.get("tokenizer_fingerprint"),
        "clusters": rel(cl_path),
        "clusters_fingerprint": cl.fingerprint(),
        "coarse": rel(coarse_p),
        "refiner": rel(refiner_p),
        "restrict_to_cluster": bool(restrict_to_cluster or rm.get("restrict_to_cluster")),
        "grid": cm["gpt_config"]["grid_size"],
        "num_classes": cm["gpt_config"]["num_classes"],
        "coarse_step": cm.get("step"),
        "refiner_step": rm.get("step"),
    }
    write_json(out, d)
    return d


# ----------------------------------------------------------------------------- labels and sample folders


def make_labels(
    n: int,
    num_classes: int,
    *,
    per_class: bool = False,
    labels: list[int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """n class labels and a sentence saying how they were chosen.

    per_class: class-balanced, in class order (n / num_classes each; when that does not divide, the first
    n % num_classes classes get one more). `labels`: the list repeated to n. Otherwise uniform at random
    from `seed` (what the public FID scripts do).
    """
    if n < 1:
        raise ClusterarError(f"--n must be positive, got {n}")
    if labels is not None:
        arr = np.asarray(labels, dtype=np.int64)
        if arr.size == 0 or arr.min() < 0 or arr.max() >= num_classes:
            raise ClusterarError(f"--labels must be class ids in [0, {num_classes}), got {list(labels)}")
        return np.resize(arr, n), f"the given labels {arr.tolist()} repeated to {n}"
    if per_class:
        base, extra = divmod(n, num_classes)
        counts = np.full(num_classes, base, dtype=np.int64)
        counts[:extra] += 1
        out = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
        if extra == 0:
            how = f"{base} per class for each of {num_classes} classes"
        elif base == 0:
            how = f"one each for classes 0..{extra - 1} ({n} < {num_classes} classes)"
        else:
            how = (
                f"{n} does not divide over {num_classes} classes: classes 0..{extra - 1} get {base + 1}, "
                f"the others {base}"
            )
        return out, how
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, n, dtype=np.int64), f"uniform at random over {num_classes} classes"


def _batch_seed(seed: int, batch: int) -> int:
    """Independent streams per batch (seed s batch 1 never equals seed s+1 batch 0), so resuming is exact."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0] >> 1)


def _grid_selection(labels: np.ndarray, per_class: bool, max_side: int = 16) -> tuple[list[int | None], int]:
    """Indices of the images in grid.png (None = blank) and images per row: rows by class when per-class."""
    if per_class:
        classes = np.unique(labels)[:max_side]
        rows = [np.flatnonzero(labels == c)[:max_side].tolist() for c in classes]
        width = max(len(r) for r in rows)
        return [i for r in rows for i in r + [None] * (width - len(r))], width
    n = min(len(labels), 64)
    return list(range(n)), min(8, n)


def save_sample_grid(images: np.ndarray, select: list[int | None], nrow: int, path: Path) -> None:
    from .viz import save_grid

    h, w = images.shape[1:3]
    blank = np.full((h, w, 3), 255, np.uint8)
    picked = np.stack([images[i] if i is not None else blank for i in select])
    scale = max(1, 64 // max(h, w))
    save_grid(torch.from_numpy(picked).permute(0, 3, 1, 2), path, nrow=nrow, scale=scale)


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def sample_to_folder(
    pipeline: Pipeline,
    labels: np.ndarray,
    out: str | os.PathLike,
    *,
    settings: SampleSettings,
    seed: int = 0,
    batch_size: int = 64,
    compile: bool | str = False,
    per_class: bool = False,
    write_images: bool = True,
    progress: bool = True,
    info: dict | None = None,
) -> dict:
    """Sample len(labels) images into `out`: grid.png, images/NNNNNN.png, samples.npz (ADM format: arr_0 uint8
    [N, H, W, 3], arr_1 labels) and sample.json (settings, pipeline, time, images/s).

    Batch b is drawn with its own seed derived from (seed, b), so every image depends only on the settings:
    finished batches are kept in out/parts/ and an interrupted run continues where it stopped when run
    again with the same settings; other settings in a non-empty folder are refused. The parts are removed
    once the .npz is written.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if batch_size < 1:
        raise ClusterarError(f"--batch-size must be positive, got {batch_size}")
    run = {
        "source": str(Path(pipeline.source).resolve()),  # the same file however its path is spelled
        "method": pipeline.method,
        "settings": asdict(settings),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "n": n,
        "labels_sha": hashlib.sha256(labels.tobytes()).hexdigest()[:16],
        "device": pipeline.device.type,
        "compile": compile,  # bf16 numerics of a compiled step differ slightly: other draws, same distribution
    }
    summary_path, parts = out / "sample.json", out / "parts"
    for path in (summary_path, parts / "run.json"):
        if path.exists():
            old = read_json(path, "sample record")
            old = old.get("run", old)
            if old != run:
                diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
                raise ClusterarError(
                    f"{out} holds samples made with other settings (differing: {', '.join(diff)}); delete it or "
                    "choose another --out"
                )
            if path == summary_path:
                notice(f"{out} is already complete ({n} images with these settings); nothing to do")
                if parts.exists():  # a run killed between sample.json and removing its parts
                    shutil.rmtree(parts)
                return {**read_json(summary_path), "already_complete": True}
    parts.mkdir(parents=True, exist_ok=True)
    write_json(parts / "run.json", run)
    n_batches = math.ceil(n / batch_size)
    kept = sum((parts / f"batch-{b:06d}.npy").exists() for b in range(n_batches))
    if kept:
        notice(f"resuming {out}: {kept} of {n_batches} batches are already drawn")
    timed: list[tuple[int, float]] = []  # (images, seconds) of the batches generated in this session
    reused = 0
    bar = tqdm(range(n_batches), desc="sampling", unit="batch", disable=not progress)
    for b in bar:
        part = parts / f"batch-{b:06d}.npy"
        if part.exists():
            reused += 1
            continue
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        pipeline._sync()
        t0 = time.perf_counter()
        images = pipeline.sample(
            labels[lo:hi], _batch_seed(seed, b), settings=settings, compile=compile
        ).numpy()
        pipeline._sync()
        timed.append((hi - lo, time.perf_counter() - t0))
        if write_images:
            for i, img in enumerate(images):
                _save_png(img, out / "images" / f"{lo + i:06d}.png")
        with atomic_path(part) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        kill_point("sample.batch")
    h = w = pipeline.image_size
    with atomic_path(out / "samples.npz") as tmp:
        stack = parts / "all.npy"
        arr = np.lib.format.open_memmap(stack, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
        for b in range(n_batches):
            arr[b * batch_size : min(n, (b + 1) * batch_size)] = np.load(parts / f"batch-{b:06d}.npy")
        arr.flush()
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr, arr_1=labels)
        select, nrow = _grid_selection(labels, per_class)
        save_sample_grid(arr, select, nrow, out / "grid.png")
        del arr
    seconds = sum(t for _, t in timed)
    done_images = sum(k for k, _ in timed)
    later = timed[1:]  # without the first batch: compilation, CUDA graph capture, allocator warm-up
    summary = {
        "run": run,
        **(info or {}),
        "pipeline": pipeline.describe(),
        "images": n,
        "image_shape": [h, w, 3],
        "label_counts": np.bincount(labels, minlength=pipeline.num_classes).tolist(),
        "batches_generated": len(timed),
        "batches_reused": reused,
        "seconds": round(seconds, 3),
        "images_per_s": round(done_images / seconds, 3) if seconds > 0 else None,
        "images_per_s_after_first_batch": (
            round(sum(k for k, _ in later) / sum(t for _, t in later), 3) if later else None
        ),
        "torch": torch.__version__,
        "files": {"grid": "grid.png", "npz": "samples.npz", "images": "images/" if write_images else None},
    }
    write_json(summary_path, summary)
    kill_point("sample.finish")
    shutil.rmtree(parts)
    return summary


def describe_settings(s: SampleSettings, method: str) -> str:
    """One line for the terminal."""
    d = asdict(s)
    if method != "ctf":
        for k in ("temperature2", "top_k2", "cfg_scale2"):
            d.pop(k)
    return json.dumps(d)

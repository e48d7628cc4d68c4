"""Turning a model's logits into tokens: guidance, filtering, the draw, and autoregressive decoding.

Token sampling follows the field's conventions (SPEC §5): classifier-free guidance on RAW logits over a
[cond; null] batch, u + s * (c - u), then temperature, then top-k / top-p, then a categorical draw; the
same token is fed to both halves. Autoregressive models decode with the static KV cache of `clusterar.gpt`
(prefill the class token, then one token per step); `use_cache=False` recomputes the full forward pass at
every step (the naive path, for the benchmark and as a reference in tests).

CTF (SPEC §4) samples in two stages: the causal coarse model generates cluster labels (`generate`), then ONE
forward of the bidirectional refiner on (class, coarse sequence) gives fine logits for every position,
sampled all at once (`refine`). Guidance in stage 2 is optional (`cfg_scale2`, default 1 = off: the paper
guides stage 1 only). A refiner trained with `restrict_to_cluster` is sampled with the same mask: every fine
token lies in its position's coarse cluster.

These functions work on models and tensors only; files and tokenizers are `pipeline`'s business.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..errors import ClusterarError
from ..gpt import GPT
from ..methods import restrict_logits
from ..runtime import autocast

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
    invalid: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [..., V] -> token ids [...]: temperature, then top-k / top-p, then one categorical draw per row.

    Rows that give no probabilities to draw from (NaN or infinite logits: a damaged model) are refused with
    a ClusterarError naming the settings, at once, or, given `invalid` (a bool scalar on the logits'
    device), flagged in it without waiting for the device; their ids are then in range but meaningless
    (`draw`). `u`: the draw's uniform numbers, drawn beforehand (see `draw`)."""
    x = logits.reshape(-1, logits.shape[-1]).float() / temperature
    x = filter_top_p(filter_top_k(x, top_k), top_p)
    flag = invalid if invalid is not None else torch.zeros((), dtype=torch.bool, device=x.device)
    ids = draw(x.softmax(dim=-1), generator, invalid=flag, u=u)
    if invalid is None and flag:
        raise no_distribution(f"temperature {temperature}, top-k {top_k}, top-p {top_p}")
    return ids.view(logits.shape[:-1])


def no_distribution(settings: str) -> ClusterarError:
    """The refusal of a draw whose probabilities are NaN or infinite, which accepted settings never cause
    on finite logits (SampleSettings' bounds): the model's logits are not finite."""
    return ClusterarError(
        f"sampling met NaN or infinite logits with {settings}: the model computes no distribution to draw "
        "from (damaged or diverged weights?); check the model file, or sample an earlier snapshot"
    )


def draw(
    probs: torch.Tensor,
    generator: torch.Generator | None = None,
    invalid: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """One draw per row of probabilities [R, V] (rows need not sum to 1) -> ids [R], by inverse CDF.

    Exact like torch.multinomial, but one uniform number per row instead of one per vocabulary entry:
    multinomial's exponential race spent 40% of CPU sampling time on 250 x 4,096 random numbers per token.
    A zero-probability entry is never drawn (its CDF step is empty).

    A row whose total is not a finite number > 0 (NaN or inf probabilities, all zero) has no distribution:
    refused (ClusterarError); given `invalid` (a bool scalar), a NaN row (softmax's answer to NaN or inf
    logits) is flagged in it instead, with no wait on the device. Every id stays in [0, V) either way, so
    nothing downstream indexes out of range.

    `u` [R, 1] float64: the uniform numbers, drawn beforehand (a compiled step takes no generator); the
    same numbers as `generator` would draw here give the same ids.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # x < total: in range
    ids = torch.searchsorted(cdf, x, right=True).squeeze(1)
    if invalid is None:
        if not bool((torch.isfinite(total) & (total > 0)).all()):
            raise ClusterarError("draw: a row of probabilities holds NaN or inf, or sums to 0")
    else:  # softmax rows sum to 1 or are NaN: one reduction finds the NaN ones, with no wait on the device
        invalid.logical_or_(total.sum().isnan())
    return ids.clamp_(max=probs.shape[-1] - 1)  # a no-op for every row with a distribution


# Bounds that keep the logits maths finite in float32 (largest value 3.4e38). Guided logits u + s (c - u)
# stay below (1 + 2|s|) max|logit|: about 2e5 for |s| <= 1e4 and logits of magnitude 10 (measured: 18 for
# a random tiny head; trained models are of that order); divided by a temperature >= 1e-6 they stay below
# 1e12, 26 orders of magnitude from overflow. Measured on logits of magnitude 30: logits / t is infinite
# from t = 1e-37 on, and a guidance scale of 1e300 overflows, after which softmax gives NaN. Neither bound
# takes anything away: temperature 1e-6 is greedy already (a logit gap of 1e-4 makes odds of e^-100),
# and a guidance scale past 1e4 only amplifies the float noise of c - u.
MIN_TEMPERATURE = 1e-6
MAX_CFG_SCALE = 1e4


def _check_sampling(temperature: float, top_k: int, top_p: float, what: str = "") -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ClusterarError(
            f"temperature{what} must be > 0, got {temperature} (top-k 1 gives greedy decoding)"
        )
    if temperature < MIN_TEMPERATURE:
        raise ClusterarError(
            f"temperature{what} must be >= {MIN_TEMPERATURE:g} (below it logits / temperature overflow "
            f"float32; {MIN_TEMPERATURE:g} is already greedy, as is top-k 1), got {temperature}"
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


@dataclass(frozen=True)
class PickSettings:
    """How a step turns its logits into a token: guidance, the draw order, temperature, top-k / top-p.

    Frozen and hashable: a compiled step is specialised on these numbers (a new value recompiles once)."""

    cfg_scale: float = 1.0
    batched: bool = False  # logits come from a [cond; null] batch: guide them
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def pick(
    logits: torch.Tensor, d: PickSettings, u: torch.Tensor, draw_order: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last-position logits [R, V] -> (token ids [B], invalid flag, guided logits [B, V]), with no host sync.

    `draw_order` (IAR) permutes the vocabulary the draw walks; the ids returned are the model's."""
    logits = guide(logits, d.cfg_scale) if d.batched else logits.float()
    walked = logits[..., draw_order] if draw_order is not None else logits
    invalid = torch.zeros((), dtype=torch.bool, device=logits.device)
    tok = sample_logits(walked, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, invalid=invalid, u=u)
    return (draw_order[tok] if draw_order is not None else tok), invalid, logits


def token_step(
    model: GPT,
    tok: torch.Tensor,
    input_pos: torch.Tensor,
    length: int | None,
    d: PickSettings,
    u: torch.Tensor,
    draw_order: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One whole decode step: feed the previous tokens [B] (both halves of a [cond; null] batch), then
    guidance, filtering and the draw (`pick`). Compiled, it is one graph with no host synchronisation."""
    x = torch.cat([tok, tok]) if d.batched else tok
    return pick(model.decode_step(x[:, None], input_pos, length)[:, -1], d, u, draw_order)


def compiled(fn, model: GPT, compile: bool | str, graphs: bool = True):
    """`fn` (whose first argument is `model`), compiled once per model, function and mode when asked.

    True compiles with torch.compile(fullgraph=True), mode "reduce-overhead" (CUDA graphs on a GPU) when
    `graphs`, else the default mode; a string names another torch.compile backend (e.g. "eager" checks that
    `fn` traces without graph breaks). False returns `fn` itself."""
    if not compile:
        return fn
    key = (fn, "reduce-overhead" if compile is True and graphs else str(compile))
    cache = model.__dict__.setdefault("_clusterar_compiled", {})
    if key not in cache:
        if compile is True:
            cache[key] = torch.compile(fn, mode="reduce-overhead" if graphs else None, fullgraph=True)
        else:
            cache[key] = torch.compile(fn, backend=compile, fullgraph=True)
    return cache[key]


def auto_compile(compile: bool | str | None, device: torch.device) -> bool | str:
    """None (the default): compile on CUDA, where it pays (measured: benchmarks/RESULTS.md), not on a CPU."""
    return device.type == "cuda" if compile is None else compile


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
    compile: bool | str | None = None,
    null_batch: bool | None = None,
    return_logits: bool = False,
    draw_order: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample token ids [B, N] from a causal model for class ids `labels` [B] (on the model's device).

    cfg_scale != 1 runs the [cond; null] batch (`null_batch=True` forces it even at scale 1, e.g. to time
    guidance or check that scale 1 equals conditional sampling). `generator` (on the model's device) makes
    the draw repeatable; the same seed gives other tokens on another device. `use_cache=False` is the naive
    path: the full forward pass recomputed at every step. With `return_logits` also returns the guided raw
    logits [B, N, V] each token was drawn from (before temperature and filtering).

    `draw_order` [V] lists the model's ids in the order the draw walks the vocabulary (its i-th entry is the
    model id of tokenizer code i): IAR passes its permutation, so that a model on rearranged ids draws the
    same image as the original-id model it computes the same distribution as (the inverse-CDF draw depends
    on the order of the ids, not only on their probabilities). Ids returned and fed back are the model's.

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
    d = PickSettings(cfg_scale, batched, temperature, top_k, top_p)
    cond = torch.cat([labels, torch.full_like(labels, c.null_class)]) if batched else labels
    # every step's uniform numbers at once, in the order the steps use them: the same ids as drawing them
    # step by step from `generator` (on a CPU; on CUDA the generator's stream is laid out differently)
    us = torch.rand(n, b, 1, generator=generator, device=device, dtype=torch.float64)
    out = torch.empty(b, n, dtype=torch.long, device=device)
    kept: list[torch.Tensor] = []
    invalid = torch.zeros((), dtype=torch.bool, device=device)  # a draw met no distribution (checked once)

    def keep(tok: torch.Tensor, bad: torch.Tensor, logits: torch.Tensor, i: int) -> torch.Tensor:
        invalid.logical_or_(bad)
        out[:, i] = tok
        if return_logits:
            kept.append(logits.clone())
        return tok.clone()  # a CUDA graph's outputs are overwritten by its next replay

    with autocast(device):
        if use_cache:
            ensure_cache(model, cond.shape[0], device)
            step = compiled(token_step, model, auto_compile(compile, device))
            static = step is not token_step  # compiled: one shape for every step
            positions = torch.arange(c.max_positions, device=device)
            tok = keep(*pick(model.prefill(cond)[:, -1], d, us[0], draw_order), 0)
            for i in range(1, n):
                p = c.cls_token_num + i - 1  # sequence position of token i-1, which predicts token i
                # eager: attention reads the filled prefix only; compiled: one static shape for every step
                length = None if static else p + 1
                tok = keep(*step(model, tok, positions[p : p + 1], length, d, us[i], draw_order), i)
        else:
            for i in range(n):
                idx = torch.cat([out[:, :i], out[:, :i]]) if batched else out[:, :i]
                keep(*pick(model(idx, cond)[:, -1], d, us[i], draw_order), i)
    if invalid:
        raise no_distribution(
            f"cfg scale {cfg_scale}, temperature {temperature}, top-k {top_k}, top-p {top_p}"
        )
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
    compile: bool | str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CTF stage 2: fine token ids [B, N] for a coarse sequence [B, N], all positions in ONE forward pass.

    cfg_scale != 1 guides with a [cond; null] batch as in stage 1. `cluster_labels` [K] (token -> cluster)
    masks every fine logit outside its position's coarse cluster (after guidance, before temperature).
    `compile` as in `generate` (default: on CUDA): the refiner's forward and the guidance compiled once.
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
    forward = compiled(refiner_logits, refiner, auto_compile(compile, labels.device), graphs=False)
    with autocast(labels.device):
        logits = forward(refiner, coarse, labels, cfg_scale)
    if cluster_labels is not None:
        logits = restrict_logits(logits, coarse, cluster_labels)
    invalid = torch.zeros((), dtype=torch.bool, device=logits.device)
    ids = sample_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, invalid=invalid
    )
    if invalid:
        raise no_distribution(
            f"stage 2 cfg scale {cfg_scale}, temperature {temperature}, top-k {top_k}, top-p {top_p}"
        )
    return (ids, logits) if return_logits else ids


def refiner_logits(
    refiner: GPT, coarse: torch.Tensor, labels: torch.Tensor, cfg_scale: float
) -> torch.Tensor:
    """Stage 2's guided fine logits [B, N, K] (float32), from one forward of a [cond; null] batch when
    guided."""
    if cfg_scale == 1.0:
        return refiner(coarse, labels).float()
    null = torch.full_like(labels, refiner.config.null_class)
    return guide(refiner(torch.cat([coarse, coarse]), torch.cat([labels, null])), cfg_scale)


def draw_in_cluster(
    coarse: torch.Tensor,
    clusters_inverse: torch.Tensor,
    cluster_starts: torch.Tensor,
    weights: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Refiner-free CTF stage 2 (MASC): for each coarse label [B, N], one code of that cluster, drawn with
    probability proportional to `weights` [K] (ones: uniform; training-token counts: by frequency).

    The codes are laid out cluster by cluster (`clusters_inverse`: the codes in rearranged-id order, cluster
    c occupying positions cluster_starts[c] .. cluster_starts[c + 1] - 1), so one cumulative sum over that
    layout serves every cluster: a draw is one uniform number and one binary search, O(log K) per position
    with no [B, N, K] tensor. A cluster whose codes all weigh 0 is drawn uniformly.
    """
    w = weights.double()[clusters_inverse]
    starts, ends = cluster_starts[:-1], cluster_starts[1:]
    mass = torch.zeros(len(starts), dtype=w.dtype, device=w.device).index_add_(
        0, torch.repeat_interleave(torch.arange(len(starts), device=w.device), ends - starts), w
    )
    empty = (mass == 0).repeat_interleave(ends - starts)
    w = torch.where(empty, torch.ones_like(w), w)
    cdf = torch.cumsum(w, 0)
    below = torch.cat([cdf.new_zeros(1), cdf])  # cdf before position i: below[i]
    c = coarse.reshape(-1)
    lo, hi = below[starts[c]], below[ends[c]]
    u = torch.rand(c.shape[0], generator=generator, device=c.device, dtype=torch.float64)
    x = lo + u * (hi - lo)
    pos = torch.searchsorted(cdf, x, right=True)
    pos = torch.minimum(torch.maximum(pos, starts[c]), ends[c] - 1)  # float edge cases stay in the cluster
    return clusters_inverse[pos].view(coarse.shape)


# ----------------------------------------------------------------------------- settings


# SampleSettings' fields that only CTF's stage 2 (the refiner) reads
STAGE2_SETTINGS = ("temperature2", "top_k2", "cfg_scale2", "stage2")
# CTF's stage 2: the refiner, or a refiner-free draw inside each position's cluster (MASC)
STAGE2_MODES = ("refiner", "uniform", "frequency")


@dataclass
class SampleSettings:
    """Sampling knobs; `for_method` fills the defaults of each method (CTF: the paper's CFG 2.0, tau 1.1)."""

    cfg_scale: float = 2.0  # classifier-free guidance; 1 = off
    temperature: float = 1.0  # softmax temperature (CTF: of stage 1)
    top_k: int = 0  # keep the k most likely tokens; 0 = whole vocabulary
    top_p: float = 1.0  # nucleus sampling; 1 = off
    temperature2: float = 1.0  # CTF stage 2 temperature
    top_k2: int = 0  # CTF stage 2 top-k; 0 = all
    cfg_scale2: float = 1.0  # CTF stage 2 guidance; 1 = off (the paper guides stage 1 only)
    stage2: str = "refiner"  # CTF stage 2: refiner; or no refiner, a code of the cluster: uniform, frequency

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
            if abs(getattr(self, name)) > MAX_CFG_SCALE:
                raise ClusterarError(
                    f"{name} must lie in [-{MAX_CFG_SCALE:g}, {MAX_CFG_SCALE:g}] (beyond it guided logits "
                    f"overflow float32 at low temperatures; 1 = off, 1.5-4 is usual), got {getattr(self, name)}"
                )
        if self.stage2 not in STAGE2_MODES:
            raise ClusterarError(f"stage2 must be one of {', '.join(STAGE2_MODES)}, got {self.stage2!r}")


@dataclass
class SampledTokens:
    """One sampled batch: `ids` in the tokenizer's (original) id space, `raw` as the model produced them
    (IAR: rearranged ids), `coarse` the CTF stage-1 cluster labels (None otherwise)."""

    ids: torch.Tensor
    raw: torch.Tensor
    coarse: torch.Tensor | None = None


def describe_settings(s: SampleSettings, method: str) -> str:
    """One line for the terminal."""
    d = asdict(s)
    if method != "ctf":
        for k in STAGE2_SETTINGS:
            d.pop(k)
    return json.dumps(d)

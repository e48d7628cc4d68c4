"""The LlamaGen class-to-image transformer, shared by the baseline, IAR and both CTF stages.

Module names, parameter shapes, 2-D RoPE layout and initialisation follow LlamaGen exactly (SPEC §1), so
its released `c2i_*.pt` files load strictly into the GPT-* presets and compute the same function. Two
additions: `input_vocab_size` (CTF stage 2 reads M coarse labels and predicts K fine tokens) and
`causal=False` (CTF stage 2 attends bidirectionally). The loss lives in `clusterar.losses`.

Sequence layout: position 0 holds the class token, token i of the raster-ordered grid sits at position
1 + i. Sampling uses a static per-layer KV cache (`setup_cache`, `prefill`, `decode_step`) whose shapes
never change, so the decode step compiles with torch.compile(mode="reduce-overhead", fullgraph=True).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_state_strict, load_torch_weights
from .errors import ClusterarError, config_from_dict
from .fileio import atomic_path
from .runtime import num_params


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384  # output vocabulary
    input_vocab_size: int | None = None  # token-embedding rows; None means vocab_size
    grid_size: int = 16  # tokens per side; the sequence has grid_size**2 tokens
    num_classes: int = 1000  # the class table has one more row: the null class used for CFG
    cls_token_num: int = 1
    causal: bool = True  # False: bidirectional attention (CTF stage 2)
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    multiple_of: int = 256  # FFN hidden size is int(8 * dim / 3) rounded up to a multiple of this

    def __post_init__(self) -> None:
        if self.input_vocab_size is None:
            self.input_vocab_size = self.vocab_size
        if self.dim % self.n_head:
            raise ClusterarError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.head_dim % 4:
            raise ClusterarError(
                f"head_dim={self.head_dim} (dim / n_head) must be a multiple of 4: 2-D RoPE splits each "
                "head into rotation pairs, half for rows and half for columns"
            )
        if self.cls_token_num != 1:
            raise ClusterarError(
                f"cls_token_num={self.cls_token_num}: class-to-image models use one class token; "
                "text conditioning (several tokens) is not implemented"
            )
        for name in ("vocab_size", "input_vocab_size", "grid_size", "num_classes", "n_layer", "multiple_of"):
            if getattr(self, name) < 1:
                raise ClusterarError(f"GPT config {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = 8 * self.dim // 3
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def seq_len(self) -> int:
        """Image tokens per sample."""
        return self.grid_size * self.grid_size

    @property
    def max_positions(self) -> int:
        """Class token(s) plus every image token: the RoPE table and KV cache length."""
        return self.cls_token_num + self.seq_len

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        return config_from_dict(cls, d, "GPT")


def _llamagen(dim: int, n_layer: int, n_head: int) -> GPTConfig:
    return GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head)


def _cpu(dim: int, n_layer: int, n_head: int, vocab: int = 4096) -> GPTConfig:
    # 8x8 token grids of the cpu-32 tokenizer (4096 codes) and 10 digit classes. multiple_of=32 keeps the
    # FFN at ~8/3 dim instead of rounding a small dim up to 256.
    return GPTConfig(
        dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, grid_size=8, num_classes=10, multiple_of=32
    )


GPT_PRESETS: dict[str, GPTConfig] = {
    # LlamaGen's class-to-image models (ImageNet, VQ-16 at 256 px: 16x16 tokens; pass grid_size=24 for
    # their 384 px files).
    "GPT-B": _llamagen(768, 12, 12),
    "GPT-L": _llamagen(1024, 24, 16),
    "GPT-XL": _llamagen(1280, 36, 20),
    "GPT-XXL": _llamagen(1536, 48, 24),
    "GPT-1B": _llamagen(2048, 22, 32),
    "GPT-3B": _llamagen(3200, 24, 32),
    # CPU presets for 32x32 images. cpu-xs: about 3x fewer multiply-adds per token than cpu-s, so that
    # the `claims` spec trains 27 models to convergence on 2 cores.
    "cpu-xs": _cpu(64, 4, 4),
    "cpu-s": _cpu(128, 4, 4),
    "cpu-m": _cpu(256, 6, 8),
    # Tests: the tiny tokenizer's 512 codes (4 heads like cpu-xs, so a dim-64 file names its head count).
    "tiny": _cpu(64, 2, 4, vocab=512),
}


def gpt_preset(name: str, **overrides) -> GPTConfig:
    """A preset with fields replaced; overriding vocab_size alone also sets input_vocab_size."""
    if name not in GPT_PRESETS:
        raise ClusterarError(f"unknown GPT preset '{name}'; choose one of {', '.join(GPT_PRESETS)}")
    d = GPT_PRESETS[name].to_dict()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "vocab_size" in overrides and "input_vocab_size" not in overrides:
        d["input_vocab_size"] = None
    d.update(overrides)
    return GPTConfig.from_dict(d)


# ----------------------------------------------------------------------------- rotary embedding


def rope_table(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """[cls_token_num + grid**2, head_dim/2, 2] (cos, sin) per position and rotation pair.

    Of the head_dim/2 pairs the first quarter of head_dim rotates by row * f_i, the second by col * f_i,
    f_i = base^(-2i / (head_dim/2)). Class positions get cos = sin = 0 (their q and k become zero),
    exactly as LlamaGen, whose weights were trained with it.
    """
    half, quarter = head_dim // 2, head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[:quarter].float() / half))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float32), freqs)  # [grid, quarter]
    grid = torch.cat(
        [
            angles[:, None, :].expand(grid_size, grid_size, quarter),  # row index
            angles[None, :, :].expand(grid_size, grid_size, quarter),  # column index
        ],
        dim=-1,
    )
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # raster order
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ADJACENT pairs (x[2k], x[2k+1]) of x [B, S, H, D] by freqs [S, D/2, 2], in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xs.shape[1], 1, xs.shape[3], 2)
    a, b = xs[..., 0], xs[..., 1]
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(3).type_as(x)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # float32 even under bf16 autocast
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """Class label -> one embedding row; in training a label becomes the null class with p=dropout."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(
        self,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """labels [B] -> [B, 1, dim]. `drop` [B] bool, when given, says which labels become null (in any
        mode) instead of drawing them."""
        if drop is None and self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.dropout
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class KVCache(nn.Module):
    """Static keys/values [max_batch, heads, max_len, head_dim]; not part of the state_dict."""

    def __init__(self, max_batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_head, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, S, D] at positions input_pos [S]; return the first B rows of the cache."""
        kc, vc = self.k_cache[: k.shape[0]], self.v_cache[: v.shape[0]]
        kc.index_copy_(2, input_pos, k.to(kc.dtype))
        vc.index_copy_(2, input_pos, v.to(vc.dtype))
        return kc, vc


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.causal = cfg.causal
        self.attn_dropout = cfg.attn_dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # rows [q | k | v], heads contiguous
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split(self.dim, dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), freqs)
        k = apply_rope(k.view(b, s, self.n_head, self.head_dim), freqs)
        v = v.view(b, s, self.n_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        p = self.attn_dropout if self.training else 0.0
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if mask.shape[-1] < k.shape[2]:  # read only the filled prefix the mask covers (`GPT.decode_step`)
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, dropout_p=p).to(x.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, s, self.dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    """LlamaGen's Transformer: class token + image tokens -> next-token (bidirectional: per-token) logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.cls_embedding = LabelEmbedder(c.num_classes, c.dim, c.class_dropout)
        self.tok_embeddings = nn.Embedding(c.input_vocab_size, c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)  # untied from tok_embeddings
        # LlamaGen files carry neither buffer: both are rebuilt, never loaded.
        self.register_buffer("freqs_cis", self._rope(), persistent=False)
        self.register_buffer("causal_mask", None, persistent=False)
        self.max_batch = 0
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # uniform first prediction: initial loss is exactly ln(V)

    def _rope(self) -> torch.Tensor:
        c = self.config
        return rope_table(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def init_buffers(self) -> None:
        """Recompute the RoPE table, e.g. after `to_empty` on a model built on the meta device."""
        self.freqs_cis = self._rope().to(self.freqs_cis.device)

    # --------------------------------------------------------------- teacher forcing (training)

    def forward(
        self,
        idx: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        class_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits, float32.

        Causal: idx = [t0 .. t(T-1)] with T <= N-1 (pass tokens[:, :-1]); returns [B, T+1, vocab] whose
        position i predicts t_i. Bidirectional: idx = all N coarse labels; returns [B, N, vocab], one per
        token position. `cond` [B] holds class ids (num_classes = null); in train mode each is replaced by
        the null class with p=class_dropout, drawn from `generator` (default: torch's global RNG), or as
        the bool mask `class_drop` [B] says. torch.compile(fullgraph=True) cannot take a Generator: a
        compiled trainer draws the mask outside (`class_drop_mask`) or relies on the global RNG.
        """
        c = self.config
        if idx.dim() != 2 or cond.shape != (idx.shape[0],):
            raise ClusterarError(
                f"GPT expects token ids [B, T] and class ids [B], "
                f"got {list(idx.shape)} and {list(cond.shape)}"
            )
        limit = c.seq_len - 1 if c.causal else c.seq_len
        if idx.shape[1] > limit:
            hint = " (a causal model never reads the last token: pass tokens[:, :-1])" if c.causal else ""
            raise ClusterarError(f"{idx.shape[1]} input tokens, at most {limit} fit this model{hint}")
        h = torch.cat([self.cls_embedding(cond, generator, class_drop), self.tok_embeddings(idx)], dim=1)
        h = self.tok_dropout(h)
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs)
        start = c.cls_token_num - 1 if c.causal else c.cls_token_num
        return self.output(self.norm(h[:, start:])).float()

    def class_drop_mask(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The [batch] bool mask of labels to replace by the null class in a training step."""
        u = torch.rand(batch, generator=generator, device=device)
        return u < self.config.class_dropout

    # --------------------------------------------------------------- KV-cache sampling

    def setup_cache(
        self, max_batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        """Allocate a static KV cache per layer (dtype defaults to the weights'; use bf16 under autocast)."""
        c = self.config
        if not c.causal:
            raise ClusterarError(
                "a bidirectional model predicts every token in one forward pass; call it without a KV cache"
            )
        w = self.tok_embeddings.weight
        dtype = dtype or w.dtype
        device = torch.device(device) if device is not None else w.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch, c.n_head, c.max_positions, c.head_dim, dtype, device
            )
        self.causal_mask = torch.tril(
            torch.ones(c.max_positions, c.max_positions, dtype=torch.bool, device=device)
        )
        self.max_batch = max_batch

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    def _check_batch(self, b: int) -> None:
        if self.causal_mask is None:
            raise ClusterarError("call setup_cache(max_batch) before prefill/decode_step")
        if b > self.max_batch:
            raise ClusterarError(f"batch {b} exceeds the KV cache's max_batch={self.max_batch}")

    def _step(self, h: torch.Tensor, input_pos: torch.Tensor, length: int | None = None) -> torch.Tensor:
        h = self.tok_dropout(h)
        freqs = self.freqs_cis[input_pos]
        mask = self.causal_mask[None, None, input_pos, :length]  # [1, 1, S, length or max_positions]
        for layer in self.layers:
            h = layer(h, freqs, mask, input_pos)
        return self.output(self.norm(h)).float()

    def prefill(self, cond: torch.Tensor) -> torch.Tensor:
        """Write the class token(s) of cond [B] to the cache; return logits [B, cls_token_num, vocab]
        whose last row predicts t0."""
        self._check_batch(cond.shape[0])
        pos = torch.arange(self.config.cls_token_num, device=cond.device)
        return self._step(self.cls_embedding(cond), pos, self.config.cls_token_num)

    def decode_step(
        self, idx: torch.Tensor, input_pos: torch.Tensor | int, length: int | None = None
    ) -> torch.Tensor:
        """Feed tokens idx [B, S] at sequence positions input_pos [S] (token i sits at cls_token_num + i);
        return logits [B, S, vocab], row s predicting the token after position input_pos[s].

        `length` (> every input_pos): attention reads only the cache's first `length` positions, the filled
        ones, instead of all max_positions (the same logits; at the first steps a fraction of the reads).
        None reads the whole static cache: one shape for every step, which a compiled step needs."""
        self._check_batch(idx.shape[0])
        if not isinstance(input_pos, torch.Tensor):
            input_pos = torch.tensor([input_pos], device=idx.device)
        return self._step(self.tok_embeddings(idx), input_pos, length)

    # --------------------------------------------------------------- checkpoints

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, config: GPTConfig | None = None, **kw) -> GPT:
        """Shorthand for `load_llamagen_gpt`."""
        return load_llamagen_gpt(path, config, **kw)


# ----------------------------------------------------------------------------- parameter accounting


def param_breakdown(model: GPT) -> dict[str, int]:
    """Parameters in the vocabulary-sized tables (input embedding, output head) vs the transformer body.

    CTF's stage 1 shrinks both tables from K rows to M; the body is unchanged.
    """
    tok = model.tok_embeddings.weight.numel()
    head = model.output.weight.numel()
    cls = model.cls_embedding.embedding_table.weight.numel()
    total = num_params(model)
    return {
        "tok_embeddings": tok,
        "output": head,
        "cls_embedding": cls,
        "head_and_embedding": tok + head,
        "body": total - tok - head - cls,
        "total": total,
    }


# ----------------------------------------------------------------------------- LlamaGen checkpoints


def gpt_config_from_state_dict(
    state: dict[str, torch.Tensor],
    n_head: int | None = None,
    grid_size: int | None = None,
    causal: bool = True,
) -> GPTConfig:
    """GPTConfig of a LlamaGen-layout state_dict, from its shapes.

    Shapes cannot tell the number of heads, the grid size (RoPE is not stored) nor causal vs
    bidirectional: n_head defaults to that of the preset with the same width, grid_size to 16 (LlamaGen's
    256 px files; their 384 px files need 24).
    """
    try:
        n_in, dim = state["tok_embeddings.weight"].shape
        vocab = state["output.weight"].shape[0]
        num_classes = state["cls_embedding.embedding_table.weight"].shape[0] - 1
        n_layer = len({k.split(".")[1] for k in state if re.match(r"layers\.\d+\.", k)})
        hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise ClusterarError(f"not a LlamaGen-layout GPT state_dict: key {e} is missing") from e
    if n_head is None:
        heads = {p.n_head for p in GPT_PRESETS.values() if p.dim == dim}
        if len(heads) != 1:
            raise ClusterarError(
                f"cannot tell the number of attention heads of a dim={dim} model from its weights; "
                "pass n_head"
            )
        n_head = heads.pop()
    base = 8 * dim // 3
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if -(-base // m) * m == hidden), None)
    if multiple is None:
        raise ClusterarError(
            f"FFN hidden size {hidden} is not int(8*{dim}/3)={base} rounded up to a power of two; "
            "this is not a LlamaGen-layout model"
        )
    return GPTConfig(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        vocab_size=vocab,
        input_vocab_size=n_in,
        grid_size=grid_size or 16,
        num_classes=num_classes,
        causal=causal,
        multiple_of=multiple,
    )


def load_llamagen_gpt(
    path: str | os.PathLike,
    config: GPTConfig | None = None,
    *,
    ema: bool = False,
    n_head: int | None = None,
    grid_size: int | None = None,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> GPT:
    """Load a LlamaGen GPT checkpoint (bare state_dict, {"model"}, {"module"}, {"state_dict"} or a training
    checkpoint; `ema=True` picks its EMA weights) strictly, in eval mode.

    Without `config` the architecture is read off the weights (`gpt_config_from_state_dict`). The model is
    built on the meta device first, so no time goes into random initialisation of weights about to be
    overwritten.
    """
    state = load_torch_weights(path, "ema" if ema else "model", what="LlamaGen model")
    if config is None:
        config = gpt_config_from_state_dict(state, n_head=n_head, grid_size=grid_size, causal=causal)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    model.init_buffers()
    load_state_strict(model, state, source=str(path))
    return model.to(device).eval()


# ----------------------------------------------------------------------------- LlamaGen export


def export_llamagen(model: GPT, path: str | os.PathLike) -> None:
    """Write {"model": state_dict} as LlamaGen's own training script does, loadable by its sample scripts."""
    model = getattr(getattr(model, "_orig_mod", model), "module", model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state}, tmp)

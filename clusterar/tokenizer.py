"""The LlamaGen VQ tokenizer: images <-> grids of discrete codes.

The architecture, parameter names and shapes follow LlamaGen's VQ model exactly, so that a user's
`vq_ds16_c2i.pt` loads strictly into the `vq-16` preset. Smaller presets reuse the same code with fewer
channels and levels, for 32x32 images on a CPU.

Images enter as float in [-1, 1] (see `clusterar.data.to_float`), codes are ids into the codebook, and the
codebook lookup is cosine (L2-normalised latents against L2-normalised codes).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import PT_SUFFIXES, load_state_strict, load_torch_weights
from .errors import ClusterarError, config_from_dict
from .fileio import check_file, expect_kind, file_error, fingerprint, load_tensors, read_meta, save_tensors


@dataclass
class VQConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True
    beta: float = 0.25  # commitment loss weight
    enc_res_blocks: int = 2
    dec_res_blocks: int = 3  # LlamaGen's decoder has one more res block per level than the encoder
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                raise ClusterarError(
                    f"tokenizer channels {c} (ch={self.ch} x ch_mult) are not divisible by norm_groups="
                    f"{self.norm_groups}; pick ch as a multiple of {self.norm_groups}"
                )
        if self.codebook_size < 2:
            raise ClusterarError(f"codebook_size must be at least 2, got {self.codebook_size}")

    @property
    def downsample(self) -> int:
        """Image pixels per token side: 2 ** (levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        return config_from_dict(cls, d, "tokenizer")


VQ_PRESETS: dict[str, VQConfig] = {
    # LlamaGen VQ-16: 256 px -> 16x16 tokens, 71.9M parameters.
    "vq-16": VQConfig(),
    # LlamaGen VQ-8: one level less, 256 px -> 32x32 tokens.
    "vq-8": VQConfig(ch_mult=(1, 2, 2, 4)),
    # CPU preset: 32x32 images -> 8x8 tokens with a codebook that is large for the data (4096 codes),
    # which is the regime both IAR and CTF are about.
    "cpu-32": VQConfig(
        ch=32, ch_mult=(1, 2, 2), z_channels=64, codebook_size=4096, enc_res_blocks=1, dec_res_blocks=1
    ),
    # Tiny preset for tests and the minute-sized demo specs.
    "tiny": VQConfig(
        ch=32, ch_mult=(1, 1, 2), z_channels=32, codebook_size=512, enc_res_blocks=1, dec_res_blocks=1
    ),
}


def vq_preset(name: str, **overrides) -> VQConfig:
    if name not in VQ_PRESETS:
        raise ClusterarError(f"unknown tokenizer preset '{name}'; choose one of {', '.join(VQ_PRESETS)}")
    d = VQ_PRESETS[name].to_dict()
    d.update({k: v for k, v in overrides.items() if v is not None})
    return VQConfig.from_dict(d)


# ----------------------------------------------------------------------------- building blocks


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions (1x1 conv projections)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as the original
        return x + self.proj_out(o.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as LlamaGen/taming


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampling."""

    def __init__(
        self, cin: int, cout: int, n_res: int, attn: bool, resample: type[nn.Module] | None, cfg: VQConfig
    ):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, cfg.norm_groups, cfg.dropout) for i in range(n_res)
        )
        self.attn = nn.ModuleList(AttnBlock(cout, cfg.norm_groups) for _ in range(n_res if attn else 0))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


def _mid(c: int, cfg: VQConfig) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(c, c, cfg.norm_groups, cfg.dropout),
            AttnBlock(c, cfg.norm_groups),
            ResnetBlock(c, c, cfg.norm_groups, cfg.dropout),
        ]
    )


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        n = len(chans)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        cin = [cfg.ch, *chans[:-1]]
        self.conv_blocks = nn.ModuleList(
            _Level(
                cin[i],
                chans[i],
                cfg.enc_res_blocks,
                attn=i == n - 1,
                resample=Downsample if i < n - 1 else None,
                cfg=cfg,
            )
            for i in range(n)
        )
        self.mid = _mid(chans[-1], cfg)
        self.norm_out = _norm(chans[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # deepest level first
        n = len(chans)
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[0], 3, 1, 1)
        self.mid = _mid(chans[0], cfg)
        cin = [chans[0], *chans[:-1]]
        self.conv_blocks = nn.ModuleList(
            _Level(
                cin[i],
                chans[i],
                cfg.dec_res_blocks,
                attn=i == 0,
                resample=Upsample if i < n - 1 else None,
                cfg=cfg,
            )
            for i in range(n)
        )
        self.norm_out = _norm(chans[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with a straight-through gradient, codebook and commitment losses."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.l2_norm
        self.beta = cfg.beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        # LlamaGen keeps this buffer in its checkpoints; we keep it so they load strictly. Unused here.
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup (normalised when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes for latents z [..., D] (already normalised when l2_norm)."""
        e = self.codes()
        flat = z.reshape(-1, z.shape[-1])
        d = (flat**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).reshape(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z [B, D, H, W] -> (quantised z_q [B, D, H, W], ids [B, H, W], losses)."""
        z = z.permute(0, 2, 3, 1).float()  # the lookup runs in float32 even under autocast
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        ids = self.nearest(z)
        z_q = self.codes()[ids]
        losses = {
            "codebook": F.mse_loss(z_q, z.detach()),
            "commit": self.beta * F.mse_loss(z, z_q.detach()),
        }
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), ids, losses


class VQModel(nn.Module):
    """Encoder -> 1x1 conv to code dim -> quantiser -> 1x1 conv back -> decoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [B, D, h, w] for images x in [-1, 1]."""
        return self.quant_conv(self.encoder(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct x; returns (reconstruction, code ids [B, h, w], quantiser losses)."""
        z_q, ids, losses = self.quantize(self.latents(x))
        return self.decoder(self.post_quant_conv(z_q)), ids, losses

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> code ids [B, H/f, W/f] (int64)."""
        self._check_images(x)
        z = self.latents(x).permute(0, 2, 3, 1)
        if self.config.l2_norm:
            z = F.normalize(z, dim=-1)
        return self.quantize.nearest(z)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids [B, h, w] (or [B, h*w] for a square grid) -> images [B, 3, h*f, w*f] in [-1, 1]."""
        if ids.dim() == 2:
            side = math.isqrt(ids.shape[1])
            if side * side != ids.shape[1]:
                raise ClusterarError(
                    f"cannot decode {ids.shape[1]} tokens: not a square grid; pass ids as [B, h, w]"
                )
            ids = ids.reshape(ids.shape[0], side, side)
        k = self.config.codebook_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
            raise ClusterarError(f"token ids must lie in [0, {k}), got [{int(ids.min())}, {int(ids.max())}]")
        z_q = self.quantize.codes()[ids.long()].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1, 1)

    def _check_images(self, x: torch.Tensor) -> None:
        f = self.config.downsample
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f:
            raise ClusterarError(
                f"tokenizer expects images [B, 3, H, W] with H and W multiples of {f}, got {list(x.shape)}"
            )

    def fingerprint(self) -> str:
        """Content hash of all weights: token files and pipelines record it to refuse a mismatch."""
        return fingerprint(self.state_dict())

    def codebook_fingerprint(self) -> str:
        return fingerprint(self.quantize.embedding.weight)


def vq_loss(
    x: torch.Tensor, recon: torch.Tensor, q_losses: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """LlamaGen's loss without its perceptual and adversarial terms (both need downloaded weights):
    L2 reconstruction + codebook + beta * commitment. Returns the total as "loss" and its parts."""
    parts = {"l2": F.mse_loss(recon.float(), x.float()), **q_losses}
    parts["loss"] = parts["l2"] + parts["codebook"] + parts["commit"]
    return parts


def vq_config_from_state_dict(state: dict[str, torch.Tensor]) -> VQConfig:
    """Infer the architecture of a LlamaGen-layout VQ state_dict from its shapes (no preset needed)."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks.")})
        ch_mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels)
        n_enc = len({k.split(".")[4] for k in state if k.startswith("encoder.conv_blocks.0.res.")})
        n_dec = len({k.split(".")[4] for k in state if k.startswith("decoder.conv_blocks.0.res.")})
        k, d = state["quantize.embedding.weight"].shape
        z = state["quant_conv.weight"].shape[1]
    except KeyError as e:
        raise ClusterarError(f"not a LlamaGen-layout VQ tokenizer state_dict: key {e} is missing") from e
    return VQConfig(
        ch=ch,
        ch_mult=ch_mult,
        z_channels=z,
        codebook_size=k,
        codebook_dim=d,
        enc_res_blocks=n_enc,
        dec_res_blocks=n_dec,
    )


TOKENIZER_FILE = "tokenizer.safetensors"


def save_tokenizer(model: VQModel, path: str | os.PathLike, info: dict | None = None) -> None:
    """Weights + config (+ free-form info such as training figures) in one self-describing file."""
    meta = {
        "kind": "clusterar.tokenizer",
        "config": model.config.to_dict(),
        "fingerprint": model.fingerprint(),
        **(info or {}),
    }
    save_tensors(path, model.state_dict(), meta)


def resolve_tokenizer_path(path: str | os.PathLike) -> Path:
    """A run folder means the tokenizer file inside it."""
    p = Path(path)
    if p.is_dir():
        if not (p / TOKENIZER_FILE).is_file():
            raise file_error(
                p, "tokenizer", f"is a folder without {TOKENIZER_FILE}, so not a tokenizer run folder"
            )
        return p / TOKENIZER_FILE
    return check_file(p, "tokenizer", (".safetensors", *PT_SUFFIXES))


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """The content hash of a tokenizer's weights, read from a clusterar file's metadata without loading it
    (a LlamaGen checkpoint is loaded and hashed)."""
    p = resolve_tokenizer_path(path)
    if p.suffix == ".safetensors":
        return read_meta(p, "tokenizer")["fingerprint"]
    return load_tokenizer(p).fingerprint()


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> VQModel:
    """Load a clusterar tokenizer file/run folder, or a LlamaGen checkpoint (.pt/.pth, e.g. vq_ds16_c2i.pt)."""
    p = resolve_tokenizer_path(path)
    if p.suffix in PT_SUFFIXES:
        state = load_torch_weights(p, what="tokenizer")
        cfg = vq_config_from_state_dict(state)
    else:
        meta = read_meta(p, "tokenizer")
        expect_kind(p, meta, "clusterar.tokenizer", "tokenizer")
        cfg = VQConfig.from_dict(meta["config"])
        state, _ = load_tensors(p, "tokenizer")
    model = VQModel(cfg)
    load_state_strict(model, state, source=str(p))
    return model.to(device).eval()

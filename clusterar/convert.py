"""Starting points for IAR and CTF from a trained baseline (a LlamaGen c2i checkpoint or a `clusterar train`
baseline), which `clusterar train --init-from` fine-tunes (`clusterar convert`).

- IAR: the rows of the input embedding and of the output head are permuted into the rearranged id space
  (`clusters.permute_rows`). Nothing else changes, so the converted model computes exactly the original's
  distribution over images, and the sampler, which draws in the tokenizer's id order, draws the same
  images under the same seed.
- CTF: both stages keep the original's transformer body and class table. Stage 1 reads and predicts
  cluster labels: its M-row input table is the mean of each cluster's member rows, and its head is either
  the mean of the member output rows ("mean"), or the least-squares fit that makes its logits track the
  original's log-probability mass per cluster on hidden states of real token sequences ("lsq"; softmax
  ignores a constant per position, so the fit is to the centred log-mass). The refiner (stage 2) turns
  the body bidirectional, reads cluster labels through the same mean table, and keeps the original head
  (it predicts the tokenizer's codes).
- baseline: the weights as they are, in clusterar's model-file format (a LlamaGen .pt then records its
  tokenizer), for a baseline fine-tune under the same conditions.

The functions on models (`to_iar`, `to_ctf`, `cluster_means`, `lsq_head`) are the library's; `convert`
adds the files: it checks that model, tokenizer and clusters belong together before any work, and writes
model files that record what they were converted from.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .checkpoints import PT_SUFFIXES
from .clusters import CodebookClusters, permute_rows
from .errors import ClusterarError
from .gpt import GPT, GPTConfig
from .methods import Method
from .model_file import (
    MODEL_FILE,
    ModelInfo,
    load_checked_tokenizer,
    load_llamagen_model,
    load_model,
    read_model_info,
    resolve_model_file,
    save_model,
)
from .sample import write_ctf_pipeline
from .tokenizer import VQModel, load_tokenizer, resolve_tokenizer_path
from .tokens import TokenFile

CONVERT_METHODS = ("iar", "ctf", "baseline")
HEAD_INITS = ("mean", "lsq")


# ----------------------------------------------------------------------------- on models


def _clone_with(model: GPT, config: GPTConfig, tables: dict[str, torch.Tensor]) -> GPT:
    """A new GPT of `config` holding `model`'s weights, with the tables named in `tables` replaced."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({k: v.detach().clone().to(state[k].dtype) for k, v in tables.items()})
    with torch.device("meta"):
        new = GPT(config)
    new = new.to_empty(device=model.tok_embeddings.weight.device)
    new.init_buffers()
    new.load_state_dict(state, strict=True)
    return new.eval()


def to_iar(model: GPT, clusters: CodebookClusters) -> GPT:
    """The IAR model on rearranged ids that computes exactly `model`'s distribution: logits
    out[..., perm[k]] == model's logits[..., k] for every code k."""
    _check_vocab(model, clusters.num_codes)
    return _clone_with(
        model,
        model.config,
        {
            "tok_embeddings.weight": permute_rows(model.tok_embeddings.weight, clusters),
            "output.weight": permute_rows(model.output.weight, clusters),
        },
    )


def cluster_means(weight: torch.Tensor, clusters: CodebookClusters) -> torch.Tensor:
    """[M, d]: the mean of each cluster's member rows of a [K, d] table indexed by code id."""
    labels = clusters.labels.to(weight.device)
    sums = torch.zeros(clusters.n_clusters, weight.shape[1], dtype=torch.float64, device=weight.device)
    sums.index_add_(0, labels, weight.detach().double())
    return (sums / clusters.sizes.to(weight.device).double().unsqueeze(1)).to(weight.dtype)


@torch.no_grad()
def lsq_head(
    model: GPT,
    clusters: CodebookClusters,
    codes: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 32,
    ridge: float = 1e-4,
) -> torch.Tensor:
    """[M, d] head rows W whose logits h @ W.T best match (least squares, up to a constant per position) the
    log-probability mass that `model` puts on each cluster, over the hidden states of the token sequences
    `codes` [B, N] (original ids) with class `labels` [B]. Accumulates the normal equations batch by batch,
    so the [B, N, K] logits of a large vocabulary never exist at once."""
    model.eval()
    d, m = model.config.dim, clusters.n_clusters
    onehot = torch.nn.functional.one_hot(clusters.labels, m).double().to(model.output.weight.device)
    hth = torch.zeros(d, d, dtype=torch.float64, device=onehot.device)
    hty = torch.zeros(d, m, dtype=torch.float64, device=onehot.device)
    hidden: list[torch.Tensor] = []
    hook = model.output.register_forward_hook(lambda mod, args, out: hidden.append(args[0]))
    try:
        for lo in range(0, codes.shape[0], batch_size):
            x = codes[lo : lo + batch_size].to(onehot.device)
            y = labels[lo : lo + batch_size].to(onehot.device)
            hidden.clear()
            logits = model(x[:, :-1], y).double().reshape(-1, onehot.shape[0])
            h = hidden[0].double().reshape(-1, d)
            # log mass per cluster, stably: logsumexp over each cluster's members
            top = logits.max(dim=1, keepdim=True).values
            mass = (logits - top).exp() @ onehot
            target = mass.clamp_min(1e-300).log()
            target = target - target.mean(dim=1, keepdim=True)
            hth += h.T @ h
            hty += h.T @ target
    finally:
        hook.remove()
    scale = hth.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(hth + ridge * scale * torch.eye(d, dtype=hth.dtype, device=hth.device), hty)
    return w.T.to(model.output.weight.dtype)


def to_ctf(
    model: GPT, clusters: CodebookClusters, head: str = "mean", head_rows: torch.Tensor | None = None
) -> tuple[GPT, GPT]:
    """(stage 1, refiner) initialised from a baseline `model` (see the module docstring). `head="lsq"` needs
    the rows from `lsq_head` in `head_rows`."""
    _check_vocab(model, clusters.num_codes)
    if head not in HEAD_INITS:
        raise ClusterarError(
            f"unknown CTF head initialisation {head!r}; choose one of {', '.join(HEAD_INITS)}"
        )
    m = clusters.n_clusters
    embed = cluster_means(model.tok_embeddings.weight, clusters)
    if head == "mean":
        head_rows = cluster_means(model.output.weight, clusters)
    elif head_rows is None or tuple(head_rows.shape) != (m, model.config.dim):
        raise ClusterarError(f"head 'lsq' needs head_rows of shape ({m}, {model.config.dim}) from lsq_head")
    coarse_cfg = dataclasses.replace(model.config, vocab_size=m, input_vocab_size=m, causal=True)
    refiner_cfg = dataclasses.replace(model.config, input_vocab_size=m, causal=False)
    coarse = _clone_with(model, coarse_cfg, {"tok_embeddings.weight": embed, "output.weight": head_rows})
    refiner = _clone_with(model, refiner_cfg, {"tok_embeddings.weight": embed})
    return coarse, refiner


def _check_vocab(
    model: GPT, codes: int, source: str = "the model", tokenizer: str = "the clusters' codebook"
) -> None:
    c = model.config
    if not c.causal or c.vocab_size != c.input_vocab_size:
        shape = (
            "bidirectional" if not c.causal else f"reads {c.input_vocab_size} ids, predicts {c.vocab_size}"
        )
        raise ClusterarError(
            f"{source} is not a baseline class-to-image model ({shape}); convert a baseline: a LlamaGen c2i "
            "checkpoint or a `clusterar train --method baseline` run"
        )
    if c.vocab_size != codes:
        raise ClusterarError(
            f"{source} predicts {c.vocab_size} tokens, but {tokenizer} has {codes} codes; pass the tokenizer "
            "the model was trained with (LlamaGen's c2i models: vq_ds16_c2i.pt, 16,384 codes)"
        )


# ----------------------------------------------------------------------------- files


def load_baseline(
    source: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    grid_size: int | None = None,
    ema: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[GPT, ModelInfo, VQModel, Path]:
    """(model, its info, tokenizer, tokenizer path) of a baseline to convert, checked to belong together.

    `source` is a run folder or model file of `clusterar train --method baseline`, or a LlamaGen c2i
    checkpoint (.pt; needs `tokenizer`, and `grid_size` for other than 256 px models with 16x16 tokens)."""
    p = Path(source)
    if p.suffix in PT_SUFFIXES:
        if tokenizer is None:
            raise ClusterarError(
                f"{p} is a LlamaGen checkpoint, which names no tokenizer; pass --tokenizer (e.g. vq_ds16_c2i.pt)"
            )
        model, info = load_llamagen_model(p, grid_size=grid_size, ema=ema, device=device)
        tok_path = resolve_tokenizer_path(tokenizer).resolve()
        tok = load_tokenizer(tok_path)
    else:
        if ema or grid_size is not None:
            raise ClusterarError(
                f"--ema and --grid-size apply to LlamaGen checkpoints; {p} is a clusterar model, whose file "
                "records its grid (and holds the EMA weights when it was trained with --ema)"
            )
        p = resolve_model_file(p, "model to convert")
        info = read_model_info(p, "model to convert")
        if info.method != "baseline":
            raise ClusterarError(
                f"{p} is a {info.method!r} model; convert a baseline (`clusterar train --method "
                "baseline`, or a LlamaGen c2i checkpoint)"
            )
        tok_path = tokenizer or info.tokenizer
        if tok_path is None:
            raise ClusterarError(f"{p} records no tokenizer; pass --tokenizer")
        tok = load_checked_tokenizer(tok_path, info.tokenizer_fingerprint, f"model {p}")
        tok_path = resolve_tokenizer_path(tok_path).resolve()
        model, info = load_model(p, device)
    _check_vocab(model, tok.config.codebook_size, str(p), f"tokenizer {tok_path}")
    return model, info, tok, tok_path


def _sequences(
    tokens: str | os.PathLike, tokenizer_fp: str, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random train sequences (first view) and labels of a token file made by the tokenizer."""
    tf = TokenFile.open(tokens)
    if tf.meta.get("tokenizer_fingerprint") != tokenizer_fp:
        raise ClusterarError(
            f"--tokens {tokens} was encoded by tokenizer {tf.meta.get('tokenizer_fingerprint')}, but the model's "
            f"tokenizer is {tokenizer_fp}; pass the train token file of the model's tokenizer"
        )
    if tf.meta.get("permutation"):
        raise ClusterarError(f"--tokens {tokens} holds remapped ids; pass the original token file")
    pick = torch.randperm(len(tf), generator=torch.Generator().manual_seed(seed))[:n].sort().values.numpy()
    codes, labels = tf.batch(pick, [0] * len(pick))
    return codes, labels


def convert(
    source: str | os.PathLike,
    method: str,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    clusters: str | os.PathLike | None = None,
    head: str = "mean",
    tokens: str | os.PathLike | None = None,
    lsq_sequences: int = 512,
    grid_size: int | None = None,
    ema: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Path]:
    """Convert a baseline into `method`'s starting point under the folder `out`; returns what was written:
    {"model": OUT/model.safetensors} (iar, baseline) or {"coarse": OUT/coarse/model.safetensors, "refiner":
    OUT/refiner/model.safetensors, "pipeline": OUT/pipeline.json} (ctf). Every check runs before any work."""
    if method not in CONVERT_METHODS:
        raise ClusterarError(f"unknown --method {method!r}; choose one of {', '.join(CONVERT_METHODS)}")
    if head not in HEAD_INITS:
        raise ClusterarError(f"unknown --head {head!r}; choose one of {', '.join(HEAD_INITS)}")
    if method != "ctf" and (head != "mean" or tokens is not None):
        raise ClusterarError(
            "--head and --tokens choose CTF's stage-1 head; they do not apply to --method " + method
        )
    if method == "ctf" and head == "lsq" and tokens is None:
        raise ClusterarError(
            "--head lsq fits the head on real token sequences: pass --tokens TRAIN.safetensors"
        )
    Method.check_clusters_given(method, clusters is not None)
    if lsq_sequences < 1:
        raise ClusterarError(f"--lsq-sequences must be at least 1, got {lsq_sequences}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ClusterarError(f"{out} exists and is not empty; choose another --out or delete it")
    model, base, tok, tok_path = load_baseline(source, tokenizer, grid_size=grid_size, ema=ema, device=device)
    cl = None
    if clusters is not None:
        cl = CodebookClusters.load(clusters)
        cl.check_codebook(tok.quantize.embedding.weight.detach().cpu(), f"codebook of tokenizer {tok_path}")
        Method.check_equal_size(method, cl, no_rearrange=None)  # convert's IAR always rearranges
    seqs = (
        _sequences(tokens, tok.fingerprint(), lsq_sequences, seed)
        if method == "ctf" and head == "lsq"
        else None
    )

    info = ModelInfo(
        preset=base.preset,
        tokenizer=str(tok_path),
        tokenizer_fingerprint=tok.fingerprint(),
        clusters=str(Path(clusters).resolve()) if cl is not None else None,
        clusters_fingerprint=cl.fingerprint() if cl is not None else None,
        n_clusters=cl.n_clusters if cl is not None else None,
        restrict_to_cluster=False,
        step=0,
        epoch=0.0,
        init_epoch=base.total_epoch,
        converted_from=str(Path(source).resolve()),
        conversion={"method": method, "head": head if method == "ctf" else None},
        image_size=base.image_size,
        grid=base.grid or [model.config.grid_size] * 2,
        dataset=base.dataset,
        num_classes=model.config.num_classes,
        class_names=base.class_names,
    )
    out.mkdir(parents=True, exist_ok=True)
    if method in ("iar", "baseline"):
        new = to_iar(model, cl) if method == "iar" else model
        path = out / MODEL_FILE
        space = "rearranged" if method == "iar" else "original"
        save_model(path, new, dataclasses.replace(info, method=method, id_space=space))
        return {"model": path}
    rows = lsq_head(model, cl, *seqs) if seqs is not None else None
    coarse, refiner = to_ctf(model, cl, head, rows)
    paths = {"coarse": out / "coarse" / MODEL_FILE, "refiner": out / "refiner" / MODEL_FILE}
    for stage, net, name, space in (
        (coarse, "coarse", "ctf-coarse", "coarse"),
        (refiner, "refiner", "ctf-refiner", "original"),
    ):
        paths[net].parent.mkdir(exist_ok=True)
        save_model(paths[net], stage, dataclasses.replace(info, method=name, id_space=space))

    paths["pipeline"] = out / "pipeline.json"
    write_ctf_pipeline(paths["coarse"], paths["refiner"], paths["pipeline"])
    return paths

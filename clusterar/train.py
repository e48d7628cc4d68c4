"""Training the transformer of every method (`clusterar train`): baseline, IAR, CTF stage 1 and stage 2.

One loop serves all four methods (`clusterar.methods` says what each feeds the model and scores), with
LlamaGen's recipe: AdamW (0.9, 0.95), weight decay 0.05 on parameters with >= 2 dims, gradient clipping
1.0, lr 1e-4 constant or cosine to 1e-5 (CTF), class dropout 0.1, a random view (original / flip) per
sample, bf16 autocast on CUDA and float32 on CPU.

Determinism, which makes `--resume` continue bit for bit and lets N processes reproduce one:

- the data order is a permutation that depends only on (seed, epoch); step s of an epoch takes the
  s-th slice of GLOBAL batch size G = batch x grad_accum x world;
- views and class-dropout masks are drawn for the whole global batch from a generator seeded by
  (seed, step), then sliced per micro-batch and rank;
- the global RNG (dropout inside the model) is re-seeded every step from (seed, step, rank);
- the checkpoint holds model, optimizer, EMA and step. Nothing else carries state between steps.

Distributed: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK) the run uses DDP (NCCL on CUDA, gloo on
CPU) or, with --fsdp, FSDP2 `fully_shard` (parameters, gradients and optimizer state sharded,
parameters re-gathered per block and freed after forward: ZeRO-3 / FULL_SHARD). Only rank 0 writes
files. Checkpoints have the same layout whatever the world size or sharding, so a run can resume with
another setup as long as the global batch stays the same.

The run folder (the sampler's contract): model.safetensors (`gpt.save_gpt`, EMA weights if --ema, with
the info the sampler needs: method, tokenizer and clusters paths and fingerprints, id space, ...),
checkpoint.safetensors, log.jsonl, curves.png, config.json, and snapshots/model-stepNNNNNNN.safetensors
every --snapshot-every epochs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoints import (
    _unflatten_optimizer,
    load_checkpoint,
    load_state_strict,
    run_checkpoint,
    save_checkpoint,
)
from .clusters import CodebookClusters
from .errors import ClusterarError
from .fileio import kill_point, load_tensors, write_json
from .gpt import GPT, GPT_PRESETS, MODEL_FILE, load_gpt, read_gpt_info, save_gpt
from .methods import TRAIN_METHODS, Method
from .runtime import autocast, notice, num_params, pick_device
from .tokenizer import load_tokenizer, resolve_tokenizer_path
from .tokenizer_train import truncate_log
from .tokens import TokenFile
from .viz import plot_curves

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_KIND = "clusterar.gpt-checkpoint"
LOG_FILE = "log.jsonl"
SNAPSHOT_DIR = "snapshots"
BETAS = (0.9, 0.95)
SCHEDULES = ("constant", "cosine")
# Settings that may differ when a run is resumed: they change how a session runs, not what it computes.
SESSION_FIELDS = ("log_every", "ckpt_every", "snapshot_every", "snapshot_steps", "compile", "device", "fsdp")
# The budget may grow on resume (a finished run extended); the rest of the run stays as it was.
BUDGET_FIELDS = ("steps", "epochs")


@dataclass
class TrainConfig:
    tokens: str = ""  # train split token file (`clusterar encode`)
    tokenizer: str = ""  # the tokenizer that made it (checked; recorded for the sampler)
    method: str = "baseline"  # baseline | iar | ctf-coarse | ctf-refiner
    model: str = "cpu-s"  # GPT preset; vocabularies, grid, classes and causality come from data + method
    clusters: str | None = None  # clusters file (IAR: balanced; CTF: k-means); baseline: logging only
    cluster_weight: float = 1.0  # IAR's lambda
    rearrange: bool = True  # IAR: contiguous cluster ids; False: original ids + segment cluster CE
    restrict_to_cluster: bool = False  # CTF refiner: mask logits outside each position's cluster
    epochs: float | None = None  # budget: epochs (one pass over the N images) ...
    steps: int | None = None  # ... or optimizer steps; exactly one of the two
    batch_size: int = 64  # per process and micro-batch; global batch = batch x grad_accum x world
    grad_accum: int = 1
    lr: float = 1e-4
    schedule: str = "constant"  # constant (LlamaGen, IAR) | cosine to min_lr (CTF)
    min_lr: float = 1e-5
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # 0 = off
    class_dropout: float = 0.1
    dropout: float | None = None  # token/residual/FFN dropout; None keeps the preset's (0.1)
    ema: float | None = None  # EMA decay, e.g. 0.9999; the model file then holds the EMA weights
    compile: bool = False
    fsdp: bool = False
    log_every: int = 10
    ckpt_every: int = 1000
    snapshot_every: float | None = None  # epochs between snapshots/model-stepNNNNNNN.safetensors
    snapshot_steps: int | None = None  # ... or optimizer steps between them (finer than an epoch)
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """Check every setting before any file is read, with the flag to fix in the message."""
        if not self.tokens:
            raise ClusterarError("--tokens is required: the train token file written by `clusterar encode`")
        if not self.tokenizer:
            raise ClusterarError("--tokenizer is required: the tokenizer that encoded --tokens")
        if self.method not in TRAIN_METHODS:
            raise ClusterarError(
                f"unknown --method {self.method!r}; choose one of {', '.join(TRAIN_METHODS)}"
            )
        if self.model not in GPT_PRESETS:
            raise ClusterarError(
                f"unknown --model preset {self.model!r}; choose one of {', '.join(GPT_PRESETS)}"
            )
        if self.method != "baseline" and not self.clusters:
            raise ClusterarError(
                f"--method {self.method} needs --clusters FILE (made with `clusterar cluster`; IAR: balanced, "
                "CTF: k-means)"
            )
        if (self.epochs is None) == (self.steps is None):
            raise ClusterarError("give the training budget as exactly one of --epochs or --steps")
        if self.epochs is not None and not self.epochs > 0:
            raise ClusterarError(f"--epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ClusterarError(f"--steps must be positive, got {self.steps}")
        for name in ("batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ClusterarError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.schedule not in SCHEDULES:
            raise ClusterarError(
                f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ClusterarError(f"--lr must be a positive number, got {self.lr}")
        if self.schedule == "cosine" and not 0 <= self.min_lr <= self.lr:
            raise ClusterarError(f"--min-lr must lie in [0, --lr={self.lr}], got {self.min_lr}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ClusterarError("--warmup, --weight-decay and --grad-clip must be >= 0")
        for name in ("class_dropout", "dropout"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ClusterarError(f"--{name.replace('_', '-')} must lie in [0, 1), got {v}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ClusterarError(f"--ema is a decay in (0, 1), e.g. 0.9999; got {self.ema}")
        if self.snapshot_every is not None and not self.snapshot_every > 0:
            raise ClusterarError(
                f"--snapshot-every is a positive number of epochs, got {self.snapshot_every}"
            )
        if self.snapshot_steps is not None and self.snapshot_steps < 1:
            raise ClusterarError(f"--snapshot-steps must be at least 1, got {self.snapshot_steps}")
        if self.snapshot_steps is not None and self.snapshot_every is not None:
            raise ClusterarError("give snapshots as one of --snapshot-every (epochs) or --snapshot-steps")
        if self.seed < 0:
            raise ClusterarError(f"--seed must be >= 0, got {self.seed}")


# ----------------------------------------------------------------------------- schedule and randomness


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, step, rank...): no two streams collide."""
    s = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(s[0]) << 31) | (int(s[1]) >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 0, epoch)))


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- distributed setup


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on CPU);
    a plain single process otherwise. Each process uses GPU LOCAL_RANK."""
    dev = pick_device(device)
    if dist.is_initialized():  # a caller set the group up
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info = DistInfo(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True
        )
    else:
        return DistInfo(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if info.owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def close_distributed(all_finished: bool) -> None:
    """Leave the process group so that no rank exits while another still talks to it.

    Rank 0 writes files and plots after the last collective while the others reach this point at once;
    a rank that tore gloo down (and exited) then, with FSDP's modules, device mesh and pending work
    objects still alive in reference cycles, died now and then at interpreter exit with SIGABRT
    ("terminate called without an active exception"). So: free what holds the group (gc, for the
    cycles), wait for every rank (`all_finished`: every rank returned; skipped after an error, where a peer
    may never arrive), then destroy the group while the interpreter is whole.
    """
    gc.collect()
    if all_finished:
        dist.barrier()
    dist.destroy_process_group()


class _StateDict:
    """Hands ready-made state dicts to `save_checkpoint` (FSDP: gathered full tensors, not the module's)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


# ----------------------------------------------------------------------------- inputs


@dataclass
class TrainData:
    tokens: TokenFile
    tokenizer_path: Path
    tokenizer_fingerprint: str
    clusters: CodebookClusters | None
    method: Method


def load_inputs(cfg: TrainConfig) -> TrainData:
    """Open the token file, tokenizer and clusters, and check that they belong together."""
    tf = TokenFile.open(cfg.tokens)
    if tf.meta.get("permutation"):
        raise ClusterarError(
            f"{cfg.tokens} holds remapped ids ({tf.meta['permutation']}); pass the original token file: the "
            "trainer remaps ids itself (--method iar) and records the mapping for the sampler"
        )
    if tf.grid[0] != tf.grid[1]:
        raise ClusterarError(
            f"{cfg.tokens} has a {tf.grid[0]}x{tf.grid[1]} token grid; the GPT needs a square one"
        )
    tok_path = resolve_tokenizer_path(cfg.tokenizer).resolve()
    tokenizer = load_tokenizer(tok_path)
    tf.check_tokenizer(tokenizer, tok_path)
    clusters = None
    if cfg.clusters:
        clusters = CodebookClusters.load(cfg.clusters)
        clusters.check_codebook(tokenizer.quantize.embedding.weight, f"codebook of tokenizer {tok_path}")
    method = Method(
        cfg.method,
        tf.codebook_size,
        clusters,
        cluster_weight=cfg.cluster_weight,
        rearrange=cfg.rearrange,
        restrict_to_cluster=cfg.restrict_to_cluster,
    )
    return TrainData(tf, tok_path, tokenizer.fingerprint(), clusters, method)


def _normalised(cfg: TrainConfig) -> dict:
    """The config as compared on resume: absolute paths, session-only fields left out."""
    d = asdict(cfg)
    for k in ("tokens", "tokenizer", "clusters"):
        if d[k]:
            d[k] = str(Path(d[k]).resolve())
    return {k: v for k, v in d.items() if k not in SESSION_FIELDS}


# ----------------------------------------------------------------------------- the run


class Trainer:
    """State of one training session; `train` below is the entry point."""

    def __init__(self, cfg: TrainConfig, out: Path, di: DistInfo, device: torch.device):
        self.cfg, self.out, self.di, self.device = cfg, out, di, device
        self.ckpt = out / CHECKPOINT
        self.inputs = load_inputs(cfg)
        self.method = self.inputs.method.to(device)
        tf = self.inputs.tokens
        self.global_batch = cfg.batch_size * cfg.grad_accum * di.world
        self.per_epoch = len(tf) // self.global_batch
        if self.per_epoch == 0:
            raise ClusterarError(
                f"the global batch (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {di.world} "
                f"processes = {self.global_batch}) is larger than the {len(tf)} images of {cfg.tokens}"
            )
        self.total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * self.per_epoch))
        self.model_config = self.method.model_config(
            cfg.model, tf.grid[0], tf.num_classes, cfg.class_dropout, cfg.dropout
        )
        self.tokens_per_step = self.global_batch * tf.seq_len
        self.is_fsdp = cfg.fsdp
        if cfg.fsdp and di.world < 2:
            raise ClusterarError(
                "--fsdp shards the model over processes: launch with torchrun --nproc_per_node N"
            )

    # ------------------------------------------------------------ model and optimizer

    def build(self, resume: bool) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        bare = GPT(self.model_config)
        names = [n for n, _ in bare.named_parameters()]
        self.decay_names = [n for n, p in bare.named_parameters() if p.dim() >= 2]
        self.nodecay_names = [n for n, p in bare.named_parameters() if p.dim() < 2]
        self.opt_names = self.decay_names + self.nodecay_names  # optimizer index order
        self.step, self.elapsed_before, meta, extra = 0, 0.0, None, {}
        if resume and self.ckpt.exists():
            if self.is_fsdp:  # weights now, into the unsharded module; optimizer state after sharding
                tensors, meta = load_tensors(self.ckpt, "checkpoint")
                load_state_strict(
                    bare, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(self.ckpt)
                )
                extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
                osd = _unflatten_optimizer(
                    {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"]
                )
        if self.is_fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in bare.layers:
                fully_shard(layer)
            fully_shard(bare)  # moves the parameter shards to this rank's device
            bare.freqs_cis = bare.freqs_cis.to(self.device)
        else:
            bare.to(self.device)
        self.bare = bare
        params = dict(bare.named_parameters())
        groups = [
            {"params": [params[n] for n in self.decay_names], "weight_decay": cfg.weight_decay},
            {"params": [params[n] for n in self.nodecay_names], "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda" and not self.is_fsdp
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, fused=fused or None)
        if resume and self.ckpt.exists():
            if self.is_fsdp:
                self._load_fsdp_optimizer(osd)
            else:
                meta, extra = load_checkpoint(self.ckpt, bare, self.opt)
            self._check_resume(meta)
            self.step, self.elapsed_before = int(meta["step"]), float(meta.get("elapsed", 0.0))
            self.ckpt_meta = meta
            self._say_resumed(meta)
        elif resume and self.di.main:
            notice(f"--resume: {self.out} holds no checkpoint yet; starting a new run there")
        self.params = [params[n] for n in names]
        self.param_names = names
        self.ema = None
        if cfg.ema is not None:
            self.ema = [p.detach().clone() for p in self.params]
            if extra:
                self._load_ema(extra)
        model: torch.nn.Module = bare
        if self.di.world > 1 and not self.is_fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(bare, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = model if model is not bare else None
        self.model, self.loss_fn = model, self.method.loss
        if cfg.compile:
            # Static shapes (they never change in a run), and a fresh cache: a process that trains several
            # models (an experiment, a benchmark) would otherwise hit dynamo's recompile limit or switch to
            # dynamic shapes. The loss is compiled on its own so that its passes over the [B, T, V] logits
            # fuse (DDP and FSDP stay outside the compiled loss).
            torch._dynamo.reset()
            self.model = torch.compile(model, dynamic=False)
            self.loss_fn = torch.compile(self.method.loss, dynamic=False)

    def _say_resumed(self, meta: dict) -> None:
        """One line: where the run continues, and what a changed budget means for the schedule."""
        saved = meta["train_config"]
        saved_total = (
            saved["steps"]
            if saved.get("steps") is not None
            else max(1, round(saved["epochs"] * self.per_epoch))
        )
        if self.total < self.step:
            raise ClusterarError(
                f"cannot resume {self.ckpt} with a budget of {self.total} steps: it is already at step "
                f"{self.step}; give a larger --steps/--epochs to extend it, or the run's own budget to finish it"
            )
        line = f"resuming {self.out} at step {self.step} of {self.total}"
        if saved_total != self.total:
            line += f" (the budget was {saved_total} steps"
            if self.cfg.schedule == "cosine" or self.cfg.warmup > min(saved_total, self.step):
                line += "; the learning-rate schedule is stretched to the new budget from here on"
            line += ")"
        if self.di.main:
            notice(line)

    def _check_resume(self, meta: dict) -> None:
        saved = meta["train_config"]
        now = _normalised(self.cfg)
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k not in BUDGET_FIELDS}
        if diff:
            raise ClusterarError(
                f"cannot resume {self.ckpt}: settings differ from the saved run (saved, now): {diff}. Only "
                f"{', '.join(SESSION_FIELDS)} may change; start a new run folder for other settings"
            )
        if meta["global_batch"] != self.global_batch:
            raise ClusterarError(
                f"cannot resume {self.ckpt} exactly: it was trained with global batch {meta['global_batch']}, "
                f"now batch x grad-accum x processes = {self.global_batch}; keep the global batch the same"
            )

    def _load_fsdp_optimizer(self, osd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self.opt_names
        full = {
            "state": {names[int(i)]: s for i, s in osd["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]],
        }
        set_optimizer_state_dict(self.bare, self.opt, full, options=StateDictOptions(full_state_dict=True))

    def _load_ema(self, extra: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.param_names if f"ema.{n}" not in extra]
        if missing:
            raise ClusterarError(
                f"{self.ckpt} holds no EMA weights for {missing[:3]}...: it was trained without --ema; "
                "resume without --ema or start a new run"
            )
        for i, n in enumerate(self.param_names):
            full = extra[f"ema.{n}"]
            e = self.ema[i]
            if _is_dtensor(e):
                from torch.distributed.tensor import distribute_tensor

                self.ema[i] = distribute_tensor(full.to(e.device), e.device_mesh, e.placements)
            else:
                e.copy_(full)

    # ------------------------------------------------------------ state out

    def _full(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: full CPU tensor} for tensors aligned with the parameters (all ranks call it under FSDP)."""
        return {
            n: (t.full_tensor() if _is_dtensor(t) else t).detach().cpu()
            for n, t in zip(self.param_names, tensors, strict=True)
        }

    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights that go into model.safetensors: EMA if --ema, else the raw ones (full, on CPU)."""
        return self._full(self.ema if self.ema is not None else self.params)

    def info(self) -> dict[str, Any]:
        """The model file's metadata: everything the sampler needs to use it (see the module docstring)."""
        inp, tf, cl = self.inputs, self.inputs.tokens, self.inputs.clusters
        return {
            "method": self.cfg.method,
            "preset": self.cfg.model,
            "tokenizer": str(inp.tokenizer_path),
            "tokenizer_fingerprint": inp.tokenizer_fingerprint,
            "clusters": str(Path(cl.source).resolve()) if cl is not None else None,
            "clusters_fingerprint": cl.fingerprint() if cl is not None else None,
            "n_clusters": cl.n_clusters if cl is not None else None,
            "cluster_weight": self.cfg.cluster_weight,
            "id_space": self.method.id_space,
            "restrict_to_cluster": self.cfg.restrict_to_cluster,
            "step": self.step,
            "epoch": round(self.step / self.per_epoch, 4),
            "image_size": tf.meta.get("image_size"),
            "grid": list(tf.grid),
            "dataset": tf.meta.get("dataset"),
            "num_classes": tf.num_classes,
            "class_names": tf.meta.get("class_names"),
            "tokens": str(Path(self.cfg.tokens).resolve()),
        }

    def write_model(self, path: Path) -> None:
        state = self.model_state()
        if self.di.main:
            with torch.device("meta"):
                shell = GPT(self.model_config)
            shell.load_state_dict(state, assign=True)
            save_gpt(path, shell, self.info())

    def weights_finite(self) -> bool:
        """True if every weight is finite (on every rank): a non-finite one must never reach a checkpoint."""
        local = [p.to_local() if _is_dtensor(p) else p for p in self.params]
        ok = torch.stack([t.detach().isfinite().all() for t in local]).all().to(torch.int32)
        if self.di.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def check_finite(self) -> None:
        """Stop before a file is written from non-finite weights (all ranks)."""
        if not self.weights_finite():
            raise ClusterarError(
                f"training diverged: weights became non-finite by step {self.step}; "
                f"{self._kept()}. Lower --lr (or add --warmup) and start again"
            )

    def save(self) -> None:
        """model.safetensors, then the checkpoint, each written atomically (rank 0; all ranks gather under
        FSDP). The checkpoint comes last: killed between the two, the run resumes from the previous
        checkpoint and writes the same model file again, while the other order would leave a checkpoint
        at the last step beside a model file of an earlier one."""
        self.write_model(self.out / MODEL_FILE)
        meta = {
            "kind": CHECKPOINT_KIND,
            "step": self.step,
            "epoch": self.step / self.per_epoch,
            "train_config": _normalised(self.cfg),
            "global_batch": self.global_batch,
            "world_size": self.di.world,
            "elapsed": self.elapsed(),
            "gpt_config": self.model_config.to_dict(),
        }
        extra = {f"ema.{n}": t for n, t in self._full(self.ema).items()} if self.ema is not None else {}
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.bare, options=opts)
            osd = get_optimizer_state_dict(self.bare, self.opt, options=opts)
            if self.di.main:
                index = {n: i for i, n in enumerate(self.opt_names)}
                osd = {
                    "state": {index[n]: s for n, s in osd["state"].items()},
                    "param_groups": [
                        dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]
                    ],
                }
                save_checkpoint(self.ckpt, _StateDict(msd), _StateDict(osd), meta, extra)
        elif self.di.main:
            save_checkpoint(self.ckpt, self.bare, self.opt, meta, extra)

    def _kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint (step {self.saved_step}) is kept in {self.ckpt}"

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.tic - self.paused, 3)

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, perm: torch.Tensor, want_metrics: bool) -> dict[str, float]:
        cfg, di, tf = self.cfg, self.di, self.inputs.tokens
        step, b = self.step, cfg.batch_size
        pos = step % self.per_epoch
        idx = perm[pos * self.global_batch : (pos + 1) * self.global_batch]
        gen = torch.Generator().manual_seed(_seed(cfg.seed, 1, step))
        views = torch.randint(tf.num_views, (self.global_batch,), generator=gen)
        drop = self.bare.class_drop_mask(self.global_batch, gen)
        torch.manual_seed(_seed(cfg.seed, 2, step, di.rank))  # dropout inside the model
        lr = lr_at(step, cfg, self.total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        names = [n for n in self.method.metric_names() if want_metrics or not n.startswith("acc")]
        sums = torch.zeros(len(names), device=self.device)
        for a in range(cfg.grad_accum):
            lo = (a * di.world + di.rank) * b
            codes, labels = tf.batch(idx[lo : lo + b].numpy(), views[lo : lo + b].numpy())
            codes = codes.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            inputs, targets, coarse = self.method.prepare(codes)
            last = a == cfg.grad_accum - 1
            if self.is_fsdp:
                self.bare.set_requires_gradient_sync(last)
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                with autocast(self.device):
                    logits = self.model(inputs, labels, class_drop=drop[lo : lo + b].to(self.device))
                parts = self.loss_fn(logits, targets, coarse)
                (parts["loss"] / cfg.grad_accum).backward()
            if want_metrics:
                parts.update(self.method.metrics(logits.detach(), targets, coarse))
            sums += torch.stack([parts[n].detach().float() for n in names]) / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        if di.world > 1:
            dist.all_reduce(sums)
            sums /= di.world
        values = torch.cat([sums, norm.detach().float().reshape(1).to(sums.device)]).tolist()
        if not all(math.isfinite(v) for v in values):
            got = ", ".join(f"{n} {v:.4g}" for n, v in zip(names + ["grad_norm"], values, strict=True))
            raise ClusterarError(
                f"training diverged in optimizer step {step + 1} (lr {lr:.3g}): {got}; the weights were not "
                f"updated, {self._kept()}. Lower --lr (or add --warmup) and start again"
            )
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                if self.is_fsdp:  # DTensor shards
                    for e, p in zip(self.ema, self.params, strict=True):
                        e.lerp_(p.detach(), 1.0 - cfg.ema)
                else:
                    torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - cfg.ema)
        self.step += 1
        out = dict(zip(names, values[:-1], strict=True))
        out.update(grad_norm=values[-1], lr=lr)
        return out

    # ------------------------------------------------------------ the loop

    def _interrupted_first_save(self) -> bool:
        """True if the folder holds only what a session killed inside its first save leaves: the model
        file of that save (written before the checkpoint) and no checkpoint. Such a run starts over, and
        recomputes the same steps. A model file of any later step, or of the final one (a run whose
        checkpoint was deleted, or a one-save run killed in it: the two look alike), is still refused by
        `run_checkpoint`, so that a finished model is never overwritten by a run started over."""
        model = self.out / MODEL_FILE
        if self.ckpt.exists() or not model.exists():
            return False
        step = read_gpt_info(model).get("step")
        return step == min(self.cfg.ckpt_every, self.total) and step < self.total

    def fit(self, resume: bool, stop_at: int | None, progress: bool) -> dict:
        cfg, di, out = self.cfg, self.di, self.out
        if resume and self._interrupted_first_save():
            if di.main:
                notice(f"--resume: {out} was stopped inside its first checkpoint; starting the run over")
                (out / MODEL_FILE).unlink()
            if di.world > 1:
                dist.barrier()
        run_checkpoint(self.ckpt, CHECKPOINT_KIND, resume, MODEL_FILE)
        self.ckpt_meta = None
        self.build(resume)
        self.saved_step = self.step if self.ckpt_meta is not None else None
        log = None
        if di.main:
            out.mkdir(parents=True, exist_ok=True)
            if self.step:
                truncate_log(out / LOG_FILE, self.step)
            elif (out / LOG_FILE).exists():
                (out / LOG_FILE).unlink()  # a fresh run in a folder whose earlier run never checkpointed
            write_json(
                out / "config.json",
                {
                    "train": asdict(cfg),
                    "model": self.model_config.to_dict(),
                    "info": {k: v for k, v in self.info().items() if k not in ("step", "epoch")},
                    "params": num_params(self.bare),
                    "world_size": di.world,
                    "global_batch": self.global_batch,
                    "steps_per_epoch": self.per_epoch,
                    "total_steps": self.total,
                },
            )
            log = open(out / LOG_FILE, "a")  # noqa: SIM115 - closed in finally
        snap_every = cfg.snapshot_steps
        if cfg.snapshot_every is not None:
            snap_every = max(1, round(cfg.snapshot_every * self.per_epoch))
        end = min(self.total, stop_at) if stop_at is not None else self.total
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc=cfg.method,
            disable=not (progress and di.main),
            dynamic_ncols=True,
        )
        self.tic, self.paused = time.perf_counter(), 0.0
        start_step, window_tic, window_start = self.step, self.tic, self.step
        last: dict[str, float] = {}
        perm, perm_epoch = None, -1
        try:
            while self.step < end:
                epoch = self.step // self.per_epoch
                if epoch != perm_epoch:
                    perm, perm_epoch = epoch_permutation(len(self.inputs.tokens), cfg.seed, epoch), epoch
                nxt = self.step + 1
                want = nxt % cfg.log_every == 0 or nxt == end
                rec = self.train_step(perm, want)
                bar.update(1)
                if want:
                    now = time.perf_counter()
                    rate = (self.step - window_start) * self.tokens_per_step / max(now - window_tic, 1e-9)
                    window_tic, window_start = now, self.step
                    last = {"step": self.step, "epoch": round(self.step / self.per_epoch, 4)}
                    last.update({k: round(v, 6) for k, v in rec.items() if k != "lr"})
                    last.update(lr=rec["lr"], tokens_per_s=round(rate, 1), elapsed=self.elapsed())
                    if log is not None:
                        log.write(json.dumps(last) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                kill_point("train.step")
                snap = snap_every is not None and (self.step % snap_every == 0 or self.step == self.total)
                ckpt = self.step % cfg.ckpt_every == 0 or self.step == end
                if ckpt or snap:
                    t0 = time.perf_counter()
                    self.check_finite()
                    # The snapshot before the checkpoint: a run resumed from a checkpoint has every
                    # snapshot up to it (a kill in between repeats steps that rewrite the same file).
                    if snap:
                        path = out / SNAPSHOT_DIR / f"model-step{self.step:07d}.safetensors"
                        self.write_model(path)
                    if ckpt:
                        self.save()
                        self.saved_step = self.step
                    self.paused += time.perf_counter() - t0
                    window_tic += time.perf_counter() - t0
        finally:
            bar.close()
            if log is not None:
                log.close()
        train_s = time.perf_counter() - self.tic - self.paused
        if di.main:
            records = [json.loads(line) for line in open(out / LOG_FILE)]
            plot_curves(
                records,
                ["loss", "acc_token", "acc_cluster", "cluster_ce", "lr"],
                out / "curves.png",
                title=f"{cfg.method} ({cfg.model})",
            )
            if not last and records:
                last = records[-1]
        return {
            "method": cfg.method,
            "model": cfg.model,
            "params": num_params(self.bare),
            "finished": self.step >= self.total,
            "step": self.step,
            "total_steps": self.total,
            "epoch": round(self.step / self.per_epoch, 4),
            **{k: last[k] for k in ("loss", "acc_token", "acc_cluster") if k in last},
            "tokens_per_s": round((self.step - start_step) * self.tokens_per_step / max(train_s, 1e-9), 1),
            "train_seconds": round(train_s, 2),
            "global_batch": self.global_batch,
            "world_size": di.world,
            "model_file": str(out / MODEL_FILE),
        }


@torch.no_grad()
def validation_loss(
    model_file: str | os.PathLike,
    tokens: str | os.PathLike,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss and accuracies of a model file on a token file (view 0 of every image, classes given).

    The same `Method` as in training scores it, so the numbers sit on the scale of log.jsonl's: val
    `loss`, `acc_token`, `acc_cluster` (and IAR's `token_ce`, `cluster_ce`), averaged over images.
    """
    model, meta = load_gpt(model_file, device)
    tf = TokenFile.open(tokens)
    if tf.meta.get("tokenizer_fingerprint") != meta.get("tokenizer_fingerprint"):
        raise ClusterarError(
            f"{tokens} was encoded by another tokenizer than the one {model_file} was trained with; encode the "
            "val split with the model's tokenizer"
        )
    clusters = CodebookClusters.load(meta["clusters"]) if meta.get("clusters") else None
    method = Method(
        meta["method"],
        tf.codebook_size,
        clusters,
        cluster_weight=meta.get("cluster_weight", 1.0),
        rearrange=meta.get("id_space") == "rearranged",
        restrict_to_cluster=bool(meta.get("restrict_to_cluster")),
    ).to(torch.device(device))
    sums: dict[str, float] = {}
    for lo in range(0, len(tf), batch_size):
        hi = min(len(tf), lo + batch_size)
        codes, labels = tf.batch(np.arange(lo, hi))
        inputs, targets, coarse = method.prepare(codes.to(device))
        with autocast(torch.device(device)):
            logits = model(inputs, labels.to(device))
        parts = {**method.loss(logits, targets, coarse), **method.metrics(logits, targets, coarse)}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * (hi - lo)
    return {k: v / len(tf) for k, v in sums.items()}


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Train into run folder `out`; return a summary (final loss and accuracies, params, tokens/s, time).

    `stop_at` ends this session after that many optimizer steps (counted from the start of the run) with
    a checkpoint, for time-sliced jobs and for testing resume; `resume=True` continues a run where its
    checkpoint stopped, bit for bit. Under torchrun every process calls this; only rank 0 writes files.
    """
    cfg.check()
    di, device = init_distributed(cfg.device)
    trainer, finished = None, False
    try:
        trainer = Trainer(cfg, Path(out), di, device)
        summary = trainer.fit(resume, stop_at, progress)
        finished = True
        return summary
    finally:
        if di.owns_group and dist.is_initialized():
            del trainer
            close_distributed(finished)

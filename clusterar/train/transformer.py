"""Training the transformer of every method (`clusterar train`): baseline, IAR, CTF stage 1 and stage 2.

One loop serves all four methods (`clusterar.methods` says what each feeds the model and scores), with
LlamaGen's recipe: AdamW (0.9, 0.95), weight decay 0.05 on parameters with >= 2 dims, gradient clipping
1.0, lr 1e-4 constant or cosine to 1e-5 (CTF), class dropout 0.1, a random view (original / flip) per
sample, bf16 autocast on CUDA and float32 on CPU. The run-folder, resume, schedule and log rules are
`train.loop`'s (shared with the tokenizer trainer); DDP / FSDP are `train.parallel`'s.

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

The run folder (the sampler's contract): model.safetensors (`model_file.save_model`, EMA weights if --ema,
with the `ModelInfo` the sampler needs: method, tokenizer and clusters paths and fingerprints, id space, ...),
checkpoint.safetensors, log.jsonl, curves.png, config.json, and snapshots/model-stepNNNNNNN.safetensors
every --snapshot-every epochs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import limits
from ..checkpoints import Checkpoint, load_state_strict, read_checkpoint, save_checkpoint
from ..clusters import CodebookClusters
from ..errors import ClusterarError
from ..fileio import load_tensors, read_meta, write_json
from ..gpt import GPT, GPT_PRESETS, GPTConfig
from ..killpoints import kill_point
from ..lock import folder_lock
from ..methods import TRAIN_METHODS, Method
from ..model_file import MODEL_FILE, ModelInfo, load_model, read_model_info, resolve_model_file, save_model
from ..runtime import autocast, notice, num_params
from ..stopping import Terminated, at_step_boundaries, requested
from ..tokenizer import load_tokenizer, resolve_tokenizer_path
from ..tokens import TokenFile
from ..viz import plot_curves
from .divergence import DivergenceWatch
from .loop import (
    CHECKPOINT,
    LOG_FILE,
    BatchOrder,
    JsonlLog,
    Schedule,
    announce_resume,
    check_resumed_settings,
    check_run_folder,
    mix_seeds,
    read_log,
    say_new_run,
)
from .parallel import DistInfo, Parallel, close_distributed, init_distributed

CHECKPOINT_KIND = "clusterar.gpt-checkpoint"
SNAPSHOT_DIR = "snapshots"
BETAS = (0.9, 0.95)
SCHEDULES = ("constant", "cosine")
# Settings that may differ when a run is resumed: they change how a session runs, not what it computes.
SESSION_FIELDS = ("log_every", "ckpt_every", "snapshot_every", "snapshot_steps", "compile", "device", "fsdp")
# The budget may grow on resume (a finished run extended); the rest of the run stays as it was.
BUDGET_FIELDS = ("steps", "epochs")
# The streams of `mix_seeds(seed, stream, ...)`: 0 is the data order (`loop.epoch_permutation`).
VIEWS_STREAM, MODEL_RNG_STREAM = 1, 2


@dataclass
class TrainConfig:
    tokens: str = ""  # train token file (`clusterar encode`)
    tokenizer: str = ""  # the tokenizer that encoded --tokens (checked; recorded for the sampler)
    method: str = "baseline"  # baseline, iar, ctf-coarse (CTF stage 1) or ctf-refiner (CTF stage 2)
    model: str = "cpu-s"  # GPT preset; vocabularies, grid, classes and causality come from data + method
    clusters: str | None = None  # clusters file: balanced for iar, k-means for ctf-*; baseline: logging only
    cluster_weight: float = 1.0  # IAR's lambda on the cluster CE
    rearrange: bool = True  # iar: contiguous cluster ids; --no-rearrange: original ids + segment cluster CE
    restrict_to_cluster: bool = False  # ctf-refiner: mask logits outside each position's coarse cluster
    epochs: float | None = None  # budget in epochs (passes over the images; a float is fine) ...
    steps: int | None = None  # ... or in optimizer steps; exactly one of the two
    batch_size: int = 64  # per process and micro-batch; global batch = this x grad-accum x processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (AdamW)
    schedule: str = "constant"  # constant (LlamaGen, IAR) or cosine to --min-lr (CTF)
    min_lr: float = 1e-5  # the cosine schedule's floor
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 0.05  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clipping; 0 = off
    class_dropout: float = 0.1  # class-label dropout, which trains the unconditional branch of CFG
    dropout: float | None = None  # token/residual/FFN dropout; none keeps the preset's (0.1)
    ema: float | None = None  # EMA decay, e.g. 0.9999; the model file then holds the EMA weights
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard parameters and optimizer over processes (FSDP2)
    log_every: int = 10  # steps between log records
    ckpt_every: int = 1000  # steps between checkpoints
    snapshot_every: float | None = None  # epochs between snapshots/model-stepNNNNNNN.safetensors
    snapshot_steps: int | None = None  # ... or optimizer steps between them (finer than an epoch)
    init_from: str | None = None  # start from this model (clusterar convert, a run) instead of random weights
    seed: int = 0  # random seed
    device: str = "auto"  # auto, cpu or cuda[:N]

    def check(self) -> None:
        """Check every setting before any file is read, with the flag to fix in the message."""
        self._check_inputs()
        self._check_budget()
        self._check_optimizer()
        self._check_saves()

    def _check_inputs(self) -> None:
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
        Method.check_clusters_given(self.method, bool(self.clusters))

    def _check_budget(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ClusterarError("give the training budget as exactly one of --epochs or --steps")
        if self.epochs is not None and not self.epochs > 0:
            raise ClusterarError(f"--epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ClusterarError(f"--steps must be positive, got {self.steps}")
        if self.epochs is not None:
            limits.EPOCHS.check(self.epochs, "--epochs")
        if self.steps is not None:
            limits.STEPS.check(self.steps, "--steps")
        for name in ("batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ClusterarError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )

    def _check_optimizer(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ClusterarError(
                f"unknown --schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ClusterarError(f"--lr must be a positive number, got {self.lr}")
        if not (self.cluster_weight >= 0 and math.isfinite(self.cluster_weight)):
            raise ClusterarError(
                f"--cluster-weight must be a number >= 0 (IAR's lambda), got {self.cluster_weight}"
            )
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

    def _check_saves(self) -> None:
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

    def lr_schedule(self) -> Schedule:
        """The learning rate of every step (`loop.Schedule`): warm-up, then constant or cosine to min_lr."""
        return Schedule(self.lr, self.warmup, self.schedule, self.min_lr)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine to min_lr."""
    return cfg.lr_schedule().at(step, total)


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


# what a starting model must share with the run (the rest of its architecture is its own)
INIT_MUST_MATCH = ("vocab_size", "input_vocab_size", "grid_size", "num_classes", "causal")
DROPOUTS = ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout")


def _init_config(
    path: Path, info: ModelInfo, want: GPTConfig, inputs: TrainData, method: Method
) -> GPTConfig:
    """The architecture of --init-from's model with the run's dropouts, after refusing a model of another
    method, tokenizer, clusters, id space or data shape (each named with the file to fix)."""
    cfg_name = method.name
    if info.method != cfg_name:
        raise ClusterarError(
            f"--init-from {path} is a {info.method!r} model and --method is {cfg_name}; start from a model "
            f"of the same method (`clusterar convert BASELINE --method {cfg_name.split('-')[0]}` makes one)"
        )
    if info.tokenizer_fingerprint != inputs.tokenizer_fingerprint:
        raise ClusterarError(
            f"--init-from {path} was made with tokenizer {info.tokenizer_fingerprint}, but --tokens "
            f"{inputs.tokens.path} were encoded by {inputs.tokenizer_path} ({inputs.tokenizer_fingerprint}); "
            "train on tokens of the tokenizer the model was made with"
        )
    cl = inputs.clusters
    if Method.needs_clusters(cfg_name) and info.clusters_fingerprint != cl.fingerprint():
        raise ClusterarError(
            f"--init-from {path} was made with clusters {info.clusters_fingerprint} "
            f"({info.clusters}), but --clusters {cl.source} holds {cl.fingerprint()}; pass the clusters "
            "file the model was converted with"
        )
    if info.id_space != method.id_space:
        raise ClusterarError(
            f"--init-from {path} works on {info.id_space} ids, this run on {method.id_space} ids "
            "(--no-rearrange keeps the original ids); drop --no-rearrange or convert with the same setting"
        )
    have = info.gpt_config
    wrong = [
        f"{k} {getattr(have, k)} (run: {getattr(want, k)})"
        for k in INIT_MUST_MATCH
        if getattr(have, k) != getattr(want, k)
    ]
    if wrong:
        raise ClusterarError(
            f"--init-from {path} does not fit the data of --tokens {inputs.tokens.path}: {', '.join(wrong)}"
        )
    return dataclasses.replace(have, **{k: getattr(want, k) for k in DROPOUTS})


def _normalised(cfg: TrainConfig) -> dict:
    """The config as compared on resume: absolute paths, session-only fields left out."""
    d = asdict(cfg)
    for k in ("tokens", "tokenizer", "clusters", "init_from"):
        if d[k]:
            d[k] = str(Path(d[k]).resolve())
    return {k: v for k, v in d.items() if k not in SESSION_FIELDS}


# ----------------------------------------------------------------------------- the run


class Trainer:
    """One training session. The constructor sets everything up (inputs, sizes, model, optimizer and EMA,
    restored from the checkpoint on resume); `fit` runs the loop. `train` below is the entry point."""

    def __init__(self, cfg: TrainConfig, out: Path, di: DistInfo, device: torch.device, resume: bool):
        self.cfg, self.out, self.di, self.device = cfg, out, di, device
        self.ckpt = out / CHECKPOINT
        self.inputs = load_inputs(cfg)
        self.method = self.inputs.method.to(device)
        tf = self.inputs.tokens

        # sizes: global batch, data order, budget
        self.global_batch = cfg.batch_size * cfg.grad_accum * di.world
        self.order = BatchOrder(len(tf), self.global_batch, cfg.seed)
        self.per_epoch = self.order.per_epoch
        if self.per_epoch == 0:
            raise ClusterarError(
                f"the global batch (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {di.world} "
                f"processes = {self.global_batch}) is larger than the {len(tf)} images of {cfg.tokens}"
            )
        self.total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * self.per_epoch))
        self.schedule = cfg.lr_schedule()
        self.model_config = self.method.model_config(
            cfg.model, tf.grid[0], tf.num_classes, cfg.class_dropout, cfg.dropout
        )
        self.preset = cfg.model  # --init-from's own architecture replaces it
        self.tokens_per_step = self.global_batch * tf.seq_len
        self.par = Parallel(di, device, cfg.fsdp)
        self._check_folder(resume)
        self.init_from: Path | None = None  # --init-from's model file (None on resume: the checkpoint rules)
        self.init_epoch = (
            0.0  # epochs the starting model had been trained (the report's epoch axis adds them)
        )
        if cfg.init_from:
            self._set_init(resume and self.ckpt.exists())

        # model and optimizer; on resume the weights are loaded before the model is placed (sharded)
        torch.manual_seed(cfg.seed)
        bare = GPT(self.model_config)
        self.param_names = [n for n, _ in bare.named_parameters()]
        decay = [n for n, p in bare.named_parameters() if p.dim() >= 2]
        nodecay = [n for n, p in bare.named_parameters() if p.dim() < 2]
        self.opt_names = decay + nodecay  # the optimizer's index order
        saved = read_checkpoint(self.ckpt, bare) if resume and self.ckpt.exists() else None
        if saved is None and self.init_from is not None:
            tensors, _ = load_tensors(self.init_from, "--init-from model")
            load_state_strict(bare, tensors, str(self.init_from))
        self.par.place(bare)
        self.bare = bare
        params = dict(bare.named_parameters())
        self.params = [params[n] for n in self.param_names]
        groups = [
            {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
            {"params": [params[n] for n in nodecay], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, fused=self.par.fused_optimizer or None)
        self.step, self.elapsed_before = 0, 0.0
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.ema: list[torch.Tensor] | None = None
        if cfg.ema is not None:
            self.ema = [p.detach().clone() for p in self.params]
        if saved is not None:
            self._resume_from(saved)
        elif resume and di.main:
            say_new_run(out)
        self.watched = [n for n in self.method.metric_names() if not n.startswith("acc")] + ["grad_norm"]
        self.watch = DivergenceWatch(self.opt, self.watched, self.device, self.step)
        self.model, self.loss_fn = self.par.wrap(bare), self.method.loss
        if cfg.compile:
            # Static shapes (they never change in a run), and a fresh cache: a process that trains several
            # models (an experiment, a benchmark) would otherwise hit dynamo's recompile limit or switch to
            # dynamic shapes. The loss is compiled on its own so that its passes over the [B, T, V] logits
            # fuse (DDP and FSDP stay outside the compiled loss).
            torch._dynamo.reset()
            self.model = torch.compile(self.model, dynamic=False)
            self.loss_fn = torch.compile(self.method.loss, dynamic=False)
        self.tic, self.paused = 0.0, 0.0  # the session's start and its time spent saving (set by `fit`)

    # ------------------------------------------------------------ the starting model

    def _set_init(self, resuming: bool) -> None:
        """Take the architecture of --init-from's model (the checkpoint's on resume, so the file may have
        moved since), after checking that it belongs to this run's method, tokenizer, clusters and data."""
        if resuming:
            meta = read_meta(self.ckpt, "checkpoint")
            self.model_config = GPTConfig.from_dict(meta["gpt_config"])
            self.init_epoch = float(meta.get("init_epoch", 0.0))
            self.preset = meta.get("preset", self.preset)
            return
        path = resolve_model_file(self.cfg.init_from, "--init-from model")
        info = read_model_info(path, "--init-from model")
        self.model_config = _init_config(path, info, self.model_config, self.inputs, self.method)
        self.init_from, self.preset = path, info.preset or f"from {path}"
        self.init_epoch = info.total_epoch

    # ------------------------------------------------------------ the run folder and resuming

    def _interrupted_first_save(self) -> bool:
        """True if the folder holds only what a session killed inside its first save leaves: the model
        file of that save (written before the checkpoint) and no checkpoint. Such a run starts over, and
        recomputes the same steps. A model file of any later step, or of the final one (a run whose
        checkpoint was deleted, or a one-save run killed in it: the two look alike), is still refused by
        `check_run_folder`, so that a finished model is never overwritten by a run started over."""
        model = self.out / MODEL_FILE
        if self.ckpt.exists() or not model.exists():
            return False
        step = read_model_info(model).step
        return step == min(self.cfg.ckpt_every, self.total) and step < self.total

    def _check_folder(self, resume: bool) -> None:
        """Refuse to overwrite a run (`loop.check_run_folder`), after removing what a session killed in its
        first save left."""
        if resume and self._interrupted_first_save():
            if self.di.main:
                notice(f"--resume: {self.out} was stopped inside its first checkpoint; starting the run over")
                (self.out / MODEL_FILE).unlink()
            self.par.barrier()
        check_run_folder(self.ckpt, CHECKPOINT_KIND, resume, MODEL_FILE, "training run")

    def _resume_from(self, saved: Checkpoint) -> None:
        """Continue the checkpoint's run: its settings checked, its optimizer, step, time and EMA taken."""
        self.par.load_optimizer(self.opt, saved.optimizer, self.opt_names)
        self._check_resume(saved.meta)
        self.step = self.saved_step = int(saved.meta["step"])
        self.elapsed_before = float(saved.meta.get("elapsed", 0.0))
        self._say_resumed(saved.meta)
        if self.ema is not None and saved.extra:
            self._load_ema(saved.extra)

    def _check_resume(self, meta: dict) -> None:
        check_resumed_settings(
            self.ckpt, meta["train_config"], _normalised(self.cfg), SESSION_FIELDS, BUDGET_FIELDS
        )
        if meta["global_batch"] != self.global_batch:
            raise ClusterarError(
                f"cannot resume {self.ckpt} exactly: it was trained with global batch {meta['global_batch']}, "
                f"now batch x grad-accum x processes = {self.global_batch}; keep the global batch the same"
            )

    def _say_resumed(self, meta: dict) -> None:
        """Refuse a budget below the step reached; say where the run continues (rank 0)."""
        saved = meta["train_config"]
        saved_total = (
            saved["steps"]
            if saved.get("steps") is not None
            else max(1, round(saved["epochs"] * self.per_epoch))
        )
        announce_resume(
            self.out,
            self.ckpt,
            self.step,
            self.total,
            saved_total,
            self.schedule,
            BUDGET_FIELDS,
            say=self.di.main,
        )

    def _load_ema(self, extra: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.param_names if f"ema.{n}" not in extra]
        if missing:
            raise ClusterarError(
                f"{self.ckpt} holds no EMA weights for {missing[:3]}...: it was trained without --ema; "
                "resume without --ema or start a new run"
            )
        for i, n in enumerate(self.param_names):
            self.ema[i] = self.par.set_full(self.ema[i], extra[f"ema.{n}"])

    # ------------------------------------------------------------ state out

    def _full(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: full CPU tensor} for tensors aligned with the parameters (all ranks call it under FSDP)."""
        return {n: self.par.full(t).detach().cpu() for n, t in zip(self.param_names, tensors, strict=True)}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights that go into model.safetensors: EMA if --ema, else the raw ones (full, on CPU)."""
        return self._full(self.ema if self.ema is not None else self.params)

    def info(self) -> ModelInfo:
        """The model file's info: everything the sampler needs to use it (see the module docstring)."""
        inp, tf, cl = self.inputs, self.inputs.tokens, self.inputs.clusters
        return ModelInfo(
            method=self.cfg.method,
            preset=self.preset,
            tokenizer=str(inp.tokenizer_path),
            tokenizer_fingerprint=inp.tokenizer_fingerprint,
            clusters=str(Path(cl.source).resolve()) if cl is not None else None,
            clusters_fingerprint=cl.fingerprint() if cl is not None else None,
            n_clusters=cl.n_clusters if cl is not None else None,
            cluster_weight=self.cfg.cluster_weight,
            id_space=self.method.id_space,
            restrict_to_cluster=self.cfg.restrict_to_cluster,
            step=self.step,
            epoch=round(self.step / self.per_epoch, 4),
            image_size=tf.meta.get("image_size"),
            grid=list(tf.grid),
            dataset=tf.meta.get("dataset"),
            num_classes=tf.num_classes,
            class_names=tf.meta.get("class_names"),
            tokens=str(Path(self.cfg.tokens).resolve()),
            init_from=str(self.init_from or self.cfg.init_from or "") or None,
            init_epoch=self.init_epoch,
        )

    def write_model(self, path: Path) -> None:
        state = self.model_state()
        if self.di.main:
            with torch.device("meta"):
                shell = GPT(self.model_config)
            shell.load_state_dict(state, assign=True)
            save_model(path, shell, self.info())

    def weights_finite(self) -> bool:
        """True if every weight is finite (on every rank): a non-finite one must never reach a checkpoint."""
        return self.par.all_true(
            torch.stack([self.par.local(p).detach().isfinite().all() for p in self.params]).all()
        )

    def check_finite(self) -> None:
        """Stop before a file is written after a diverged step, or from non-finite weights (all ranks)."""
        self.check_diverged()
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
            "init_epoch": self.init_epoch,
            "preset": self.preset,
        }
        extra = {f"ema.{n}": t for n, t in self._full(self.ema).items()} if self.ema is not None else {}
        state = self.par.checkpoint_state(self.opt, self.opt_names)  # all ranks gather under FSDP
        if state is not None:
            save_checkpoint(self.ckpt, *state, meta, extra)

    def _kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint (step {self.saved_step}) is kept in {self.ckpt}"

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.tic - self.paused, 3)

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, idx: torch.Tensor, want_metrics: bool) -> dict[str, float]:
        """One optimizer step on the global batch `idx` (this rank trains on its slices of it)."""
        cfg, di, tf = self.cfg, self.di, self.inputs.tokens
        step, b = self.step, cfg.batch_size
        gen = torch.Generator().manual_seed(mix_seeds(cfg.seed, VIEWS_STREAM, step))
        views = torch.randint(tf.num_views, (self.global_batch,), generator=gen)
        drop = self.bare.class_drop_mask(self.global_batch, gen)
        torch.manual_seed(mix_seeds(cfg.seed, MODEL_RNG_STREAM, step, di.rank))  # dropout inside the model
        lr = self.schedule.at(step, self.total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        losses = self.watched[:-1]
        names = losses + (
            [n for n in self.method.metric_names() if n.startswith("acc")] if want_metrics else []
        )
        sums = torch.zeros(len(names), device=self.device)
        for a in range(cfg.grad_accum):
            lo = (a * di.world + di.rank) * b
            codes, labels = tf.batch(idx[lo : lo + b].numpy(), views[lo : lo + b].numpy())
            codes = codes.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            inputs, targets, coarse = self.method.prepare(codes)
            with self.par.grad_sync(a == cfg.grad_accum - 1):
                with autocast(self.device):
                    logits = self.model(inputs, labels, class_drop=drop[lo : lo + b].to(self.device))
                parts = self.loss_fn(logits, targets, coarse)
                (parts["loss"] / cfg.grad_accum).backward()
            if want_metrics:
                parts.update(self.method.metrics(logits.detach(), targets, coarse))
            sums += torch.stack([parts[n].detach().float() for n in names]) / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = self.par.full(norm)
        self.par.mean(sums)
        watched = torch.cat([sums[: len(losses)], norm.detach().float().reshape(1).to(sums.device)])
        self.watch.see(watched)  # a non-finite step skips its update on the device (`train.divergence`)
        if self.watch.must_check_now:
            self.check_diverged()
        self.opt.step()
        if self.ema is not None:
            self.par.ema_update(self.ema, self.params, 1.0 - cfg.ema)
        self.step += 1
        if not want_metrics:
            return {}  # the host reads nothing: it queues the next step while the device works
        self.check_diverged()
        values = torch.cat([watched, sums[len(losses) :]]).tolist()
        out = dict(zip(self.watched + names[len(losses) :], values, strict=True))
        out.update(lr=lr)
        return out

    def check_diverged(self) -> None:
        """Stop if an optimizer step so far was not finite (waits for the device)."""
        self.watch.check(lambda step: self.schedule.at(step, self.total), self._kept())

    # ------------------------------------------------------------ the loop

    def fit(self, stop_at: int | None, progress: bool) -> dict:
        """Train from `self.step` to the budget (or to `stop_at`, with a checkpoint); return the summary."""
        cfg, di = self.cfg, self.di
        log = self._start_folder()
        end = min(self.total, stop_at) if stop_at is not None else self.total
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc=cfg.method,
            disable=not (progress and di.main),
            dynamic_ncols=True,
        )
        self.tic, self.paused = time.perf_counter(), 0.0
        start_step, window = self.step, [self.tic, self.step]  # the tokens/s window: (start time, step)
        last: dict[str, float] = {}
        # SIGTERM: the checkpoint at the step reached, then Terminated (`clusterar.stopping`)
        with at_step_boundaries():
            try:
                while self.step < end:
                    want = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == end
                    rec = self.train_step(self.order(self.step), want)
                    bar.update(1)
                    if want:
                        last = self._log_step(rec, window, log)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    kill_point("train.step")
                    window[0] += self._save_due(end)
            finally:
                bar.close()
                if log is not None:
                    log.close()
        return self._finish(start_step, last)

    def _start_folder(self) -> JsonlLog | None:
        """config.json and the session's log (rank 0; None elsewhere)."""
        cfg, di, out = self.cfg, self.di, self.out
        if not di.main:
            return None
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / "config.json",
            {
                "train": asdict(cfg),
                "model": self.model_config.to_dict(),
                "info": {k: v for k, v in self.info().to_dict().items() if k not in ("step", "epoch")},
                "params": num_params(self.bare),
                "world_size": di.world,
                "global_batch": self.global_batch,
                "steps_per_epoch": self.per_epoch,
                "total_steps": self.total,
            },
        )
        return JsonlLog(out / LOG_FILE, self.step)

    def _log_step(self, rec: dict[str, float], window: list[float], log: JsonlLog | None) -> dict[str, float]:
        """The log record of the step just taken (tokens/s over the `window` since the last one)."""
        now = time.perf_counter()
        rate = (self.step - window[1]) * self.tokens_per_step / max(now - window[0], 1e-9)
        window[:] = [now, self.step]
        last = {"step": self.step, "epoch": round(self.step / self.per_epoch, 4)}
        last.update({k: round(v, 6) for k, v in rec.items() if k != "lr"})
        last.update(lr=rec["lr"], tokens_per_s=round(rate, 1), elapsed=self.elapsed())
        if log is not None:
            log.write(last)
        return last

    def _snapshot_every(self) -> int | None:
        """Steps between snapshots (--snapshot-every in epochs, or --snapshot-steps), None for none."""
        if self.cfg.snapshot_every is not None:
            return max(1, round(self.cfg.snapshot_every * self.per_epoch))
        return self.cfg.snapshot_steps

    def _save_due(self, end: int) -> float:
        """The snapshot and checkpoint due at this step, if any; return the seconds they took. After SIGTERM
        on any rank (`clusterar.stopping`) a checkpoint is due now, and `Terminated` follows it."""
        every = self._snapshot_every()
        snap = every is not None and (self.step % every == 0 or self.step == self.total)
        stop = self.par.any_rank(requested())
        ckpt = self.step % self.cfg.ckpt_every == 0 or self.step == end or stop
        if not (ckpt or snap):
            return 0.0
        t0 = time.perf_counter()
        self.check_finite()
        # The snapshot before the checkpoint: a run resumed from a checkpoint has every snapshot up to it
        # (a kill in between repeats steps that rewrite the same file).
        if snap:
            self.write_model(self.out / SNAPSHOT_DIR / f"model-step{self.step:07d}.safetensors")
        if ckpt:
            self.save()
            self.saved_step = self.step
        if stop:
            if self.di.main:
                notice(f"checkpoint written at step {self.step} of {self.total}: {self.ckpt}")
            raise Terminated
        took = time.perf_counter() - t0
        self.paused += took
        return took

    def _finish(self, start_step: int, last: dict[str, float]) -> dict:
        """Curves (rank 0) and the session's summary."""
        cfg, di, out = self.cfg, self.di, self.out
        train_s = time.perf_counter() - self.tic - self.paused
        if di.main:
            records = read_log(out / LOG_FILE)
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
    model, info = load_model(model_file, device)
    tf = TokenFile.open(tokens)
    if tf.meta.get("tokenizer_fingerprint") != info.tokenizer_fingerprint:
        raise ClusterarError(
            f"{tokens} was encoded by another tokenizer than the one {model_file} was trained with; encode the "
            "val split with the model's tokenizer"
        )
    clusters = CodebookClusters.load(info.clusters) if info.clusters else None
    method = Method.from_info(info, tf.codebook_size, clusters).to(torch.device(device))
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
    The folder is locked for the session (`clusterar.lock`): a second process training into it is refused.
    """
    cfg.check()
    di, device = init_distributed(cfg.device)
    trainer, finished = None, False
    try:
        with folder_lock(out, active=di.main):  # one writer per run folder; rank 0 holds it for the job
            trainer = Trainer(cfg, Path(out), di, device, resume)
            summary = trainer.fit(stop_at, progress)
        finished = True
        return summary
    finally:
        if di.owns_group and dist.is_initialized():
            del trainer
            close_distributed(finished)

"""Training and evaluating the VQ tokenizer (`clusterar tokenizer train|eval`).

The loss is LlamaGen's without the parts that need downloaded weights (LPIPS) or long schedules (GAN):
L2 reconstruction + codebook + 0.25 x commitment. Large codebooks lose codes ("dead codes") when only a
few codes win the early nearest-neighbour races, and a dead code never receives a gradient again; every
`restart_every` steps we re-seed the codes that no latent chose in that window with random encoder
latents of the current batch. This is what keeps most of a 4096-code codebook in use on MNIST.

Runs are resumable and bit-exact: the data order is a function of (seed, epoch), restarts draw from a
generator seeded by (seed, step), and the checkpoint holds model, optimizer, step and the window's code
counts. The run-folder, resume, schedule (warm-up, cosine to lr x min_lr_ratio) and log rules are
`train.loop`'s, shared with the transformer trainer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import limits
from ..checkpoints import load_checkpoint, save_checkpoint
from ..data import ImageDataset, load_dataset, to_float, to_uint8
from ..errors import ClusterarError
from ..fileio import write_json, write_text_atomic
from ..killpoints import kill_point
from ..lock import folder_lock
from ..runtime import autocast, notice, num_params, pick_device
from ..stopping import Terminated, at_step_boundaries, requested
from ..tokenizer import TOKENIZER_FILE, VQModel, save_tokenizer, vq_loss, vq_preset
from ..viz import plot_curves, save_grid
from .loop import (
    CHECKPOINT,
    LOG_FILE,
    BatchOrder,
    JsonlLog,
    Schedule,
    announce_resume,
    check_resumed_settings,
    check_run_folder,
    linear_seed,
    read_log,
    say_new_run,
)

CHECKPOINT_KIND = "clusterar.tokenizer-checkpoint"
# The strides of `loop.linear_seed(seed, stride, i)`: the data order of epoch i, the code restarts of step i.
DATA_STRIDE, RESTART_STRIDE = 1_000_003, 7919


@dataclass
class TokenizerTrainConfig:
    data: str = "mnist"  # dataset: mnist, digits or folder:PATH
    preset: str = "cpu-32"  # architecture preset (tokenizer.VQ_PRESETS)
    image_size: int = 32  # image side in pixels
    codebook_size: int | None = None  # override the preset's codebook size
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # peak learning rate (Adam)
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup: int = 100  # linear warm-up steps
    restart_every: int = 100  # dead-code restart window in steps; 0 turns it off
    restart_until: float = 0.9  # no restarts after this fraction of the steps, so every code settles
    eval_every: int = 1000  # steps between val PSNR / codebook-usage evaluations
    ckpt_every: int = 500  # steps between checkpoints
    log_every: int = 25  # steps between log records
    seed: int = 0  # random seed
    device: str = "auto"  # auto, cpu or cuda[:N]
    num_workers: int = 0  # DataLoader workers for folder datasets
    on_error: str = "fail"  # unreadable images: fail, or skip and list them

    def check(self) -> None:
        """Check every setting before a file is read or written, naming the flag to fix."""
        positive = ("steps", "batch_size", "image_size", "eval_every", "ckpt_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ClusterarError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("warmup", "restart_every", "seed", "num_workers"):
            if getattr(self, name) < 0:
                raise ClusterarError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ClusterarError(f"--lr must be a positive number, got {self.lr}")
        for name in ("min_lr_ratio", "restart_until"):
            if not 0 <= getattr(self, name) <= 1:
                raise ClusterarError(
                    f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(self, name)}"
                )
        if self.codebook_size is not None and self.codebook_size < 2:
            raise ClusterarError(f"--codebook-size must be at least 2, got {self.codebook_size}")
        limits.STEPS.check(self.steps, "--steps")
        limits.IMAGE_SIDE.check(self.image_size, "--image-size")
        if self.codebook_size is not None:
            limits.CODEBOOK.check(self.codebook_size, "--codebook-size")
        limits.WORKERS.check(self.num_workers, "--num-workers")
        if self.on_error not in ("fail", "skip"):
            raise ClusterarError(f"--on-error is fail or skip, got {self.on_error!r}")

    def lr_schedule(self) -> Schedule:
        """The learning rate of every step (`loop.Schedule`): warm-up, then cosine to lr x min_lr_ratio."""
        return Schedule(self.lr, self.warmup, "cosine", min_lr_ratio=self.min_lr_ratio)


def fetch(dataset: ImageDataset, idx: torch.Tensor) -> torch.Tensor:
    """uint8 images for the indices; fast path for in-memory datasets."""
    images = getattr(dataset, "images", None)
    if images is not None:  # bundled grayscale sets may keep one channel in memory
        return images[idx].expand(-1, 3, -1, -1)
    items = [dataset[int(i)][0] for i in idx]
    bad = [dataset.path(int(i)) for i, im in zip(idx, items, strict=True) if im is None]
    if bad:
        raise ClusterarError(f"cannot train on unreadable images: {bad[:5]}")
    return torch.stack(items)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between uint8 images (peak 255)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def restart_dead_codes(
    model: VQModel,
    opt: torch.optim.Optimizer,
    counts: torch.Tensor,
    latents: torch.Tensor,
    gen: torch.Generator,
) -> int:
    """Re-seed codes with zero uses in the window with random current latents; reset their Adam moments."""
    dead = (counts == 0).nonzero().squeeze(1)
    if dead.numel() == 0:
        return 0
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    if model.config.l2_norm:
        z = F.normalize(z, dim=-1)
    pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=gen).to(z.device)
    noise = torch.randn(dead.numel(), z.shape[1], generator=gen).to(z.device) * 1e-3
    weight = model.quantize.embedding.weight
    weight[dead] = (z[pick] + noise).to(weight.dtype)
    state = opt.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return int(dead.numel())


@torch.no_grad()
def evaluate_tokenizer(
    model: VQModel, dataset: ImageDataset, device: torch.device, batch_size: int = 256, progress: bool = False
) -> dict:
    """Mean PSNR (dB) of reconstructions, and the share of codes used, over a dataset."""
    model.eval()
    k = model.config.codebook_size
    used = torch.zeros(k, dtype=torch.bool, device=device)
    scores = []
    n = len(dataset)
    for i in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
        x8 = fetch(dataset, torch.arange(i, min(n, i + batch_size))).to(device)
        with autocast(device):
            ids = model.encode(to_float(x8))
            rec = model.decode(ids)
        used[ids.flatten()] = True
        scores.append(psnr(to_uint8(rec.float()), x8).cpu())
    s = torch.cat(scores)
    return {
        "psnr": float(s.mean()),
        "psnr_min": float(s.min()),
        "usage": float(used.float().mean()),
        "codes_used": int(used.sum()),
        "images": n,
    }


def reconstruction_grid(
    model: VQModel, dataset: ImageDataset, path: Path, device: torch.device, n: int = 32
) -> None:
    """Originals on odd rows, their reconstructions below them."""
    idx = torch.linspace(0, len(dataset) - 1, n).long()
    x8 = fetch(dataset, idx).to(device)
    with torch.no_grad(), autocast(device):
        rec = to_uint8(model.decode(model.encode(to_float(x8))).float())
    per_row = 8
    rows = [t for i in range(0, n, per_row) for t in (x8[i : i + per_row], rec[i : i + per_row])]
    save_grid(torch.cat(rows).cpu(), path, nrow=per_row, scale=max(1, 128 // x8.shape[-1]))


class TokenizerRun:
    """One session of a tokenizer run: the plan (`__init__`: folder rules, data, model, optimizer, the
    checkpoint's state on resume), one optimizer step (`step_once`), the checkpoint (`save`)."""

    def __init__(self, cfg: TokenizerTrainConfig, out: Path, resume: bool):
        self.cfg, self.out, self.ckpt = cfg, out, out / CHECKPOINT
        self.device = device = pick_device(cfg.device)
        check_run_folder(self.ckpt, CHECKPOINT_KIND, resume, TOKENIZER_FILE, "tokenizer run")
        self.train = load_dataset(cfg.data, "train", cfg.image_size, on_error=cfg.on_error)
        self.val = load_dataset(cfg.data, "val", cfg.image_size, on_error=cfg.on_error)
        if len(self.train) < cfg.batch_size:
            raise ClusterarError(
                f"--batch-size {cfg.batch_size} is larger than the train split ({len(self.train)} images)"
            )
        self.model_cfg = model_cfg = vq_preset(cfg.preset, codebook_size=cfg.codebook_size)
        if cfg.image_size % model_cfg.downsample:
            raise ClusterarError(
                f"--image-size {cfg.image_size} is not a multiple of the preset's downsampling factor "
                f"{model_cfg.downsample}"
            )
        torch.manual_seed(cfg.seed)
        self.model = VQModel(model_cfg).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
        self.schedule = cfg.lr_schedule()
        self.step = 0
        self.counts = torch.zeros(model_cfg.codebook_size, dtype=torch.long, device=device)
        if resume and self.ckpt.exists():
            self._resume()
        elif resume:
            say_new_run(out)
        self.order = BatchOrder(len(self.train), cfg.batch_size, cfg.seed, stride=DATA_STRIDE)
        self.last_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (images, reconstructions)

    def _resume(self) -> None:
        """The checkpoint's weights, optimizer, step and code counts, once its settings are checked."""
        cfg, ckpt = self.cfg, self.ckpt
        meta, extra = load_checkpoint(ckpt, self.model, self.opt)
        saved = meta["train_config"]
        check_resumed_settings(ckpt, saved, asdict(cfg), budget=("steps",))
        self.step, self.counts = meta["step"], extra["code_counts"].to(self.device)
        announce_resume(self.out, ckpt, self.step, cfg.steps, saved.get("steps"), self.schedule, ("steps",))

    def step_once(self) -> dict:
        """One optimizer step, then the dead-code restart when a window ends; return its log record
        (without the batch's PSNR, `batch_psnr`, computed only for the records written)."""
        cfg, model, opt, step = self.cfg, self.model, self.opt, self.step
        epoch, idx = step // self.order.per_epoch, self.order(step)
        model.train()
        lr = self.schedule.at(step, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_float(fetch(self.train, idx).to(self.device))
        with autocast(self.device):
            latents = model.latents(x)
            z_q, ids, q_losses = model.quantize(latents)
            recon = model.decoder(model.post_quant_conv(z_q))
        parts = vq_loss(x, recon, q_losses)
        if not torch.isfinite(parts["loss"]):
            raise ClusterarError(
                f"tokenizer loss became {parts['loss'].item()} at step {step}; the last good checkpoint is "
                f"kept in {self.ckpt}. Lower --lr and resume with --resume."
            )
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        parts = {k: v.detach() for k, v in parts.items()}
        opt.step()
        self.counts += torch.bincount(ids.flatten(), minlength=self.counts.numel())
        self.step += 1
        rec = {"step": self.step, "epoch": epoch, "lr": lr, **self._restart(latents)}
        rec.update({k: round(v.item(), 6) for k, v in parts.items()})
        rec["images"] = len(idx)
        self.last_batch = (x, recon.detach())
        return rec

    def batch_psnr(self) -> float:
        """The PSNR of the last step's reconstructions of its batch (for the log)."""
        x, recon = self.last_batch
        return round(float(psnr(to_uint8(recon.float()), to_uint8(x)).mean()), 3)

    def _restart(self, latents: torch.Tensor) -> dict:
        """At the end of a restart window: re-seed the dead codes (until `restart_until`); say how many."""
        cfg, step = self.cfg, self.step
        if not (cfg.restart_every and step % cfg.restart_every == 0):
            return {}
        window_usage = float((self.counts > 0).float().mean())
        restarted = 0
        if step < cfg.restart_until * cfg.steps:
            gen = torch.Generator().manual_seed(linear_seed(cfg.seed, RESTART_STRIDE, step))
            restarted = restart_dead_codes(self.model, self.opt, self.counts, latents.detach(), gen)
        self.counts.zero_()
        return {"window_usage": round(window_usage, 4), "restarted": restarted}

    def save(self) -> None:
        meta = {"kind": CHECKPOINT_KIND, "step": self.step, "train_config": asdict(self.cfg)}
        save_checkpoint(self.ckpt, self.model, self.opt, meta, extra={"code_counts": self.counts})


def train_tokenizer(
    cfg: TokenizerTrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict | None:
    """Train a tokenizer into folder `out`; return the final evaluation. See the module docstring.

    `stop_at` ends this session after that many steps with a checkpoint (time-sliced jobs; tests of resume);
    the run is then finished with `resume=True`, and None is returned.
    """
    cfg.check()
    with folder_lock(out):  # one writer per run folder (`clusterar.lock`)
        return _train_session(cfg, Path(out), resume, progress, stop_at)


def _train_session(
    cfg: TokenizerTrainConfig, out: Path, resume: bool, progress: bool, stop_at: int | None
) -> dict | None:
    """`train_tokenizer`'s session, in its locked folder."""
    run = TokenizerRun(cfg, out, resume)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"train": asdict(cfg), "model": run.model_cfg.to_dict()})
    log = JsonlLog(out / LOG_FILE, run.step)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="tokenizer", disable=not progress, dynamic_ncols=True)
    tic, seen = time.perf_counter(), 0
    stopping = run.step < cfg.steps and stop_at is not None  # a session that may end at stop_at
    with at_step_boundaries():  # SIGTERM: the checkpoint at the step reached (`clusterar.stopping`)
        try:
            while run.step < cfg.steps and run.step != stop_at:
                rec = run.step_once()
                step, seen = run.step, seen + rec.pop("images")
                if step % cfg.log_every == 0 or step == cfg.steps or "window_usage" in rec:
                    rec["batch_psnr"] = run.batch_psnr()
                    rec["img_per_s"] = round(seen / (time.perf_counter() - tic), 1)
                    rec["elapsed_s"] = round(time.perf_counter() - tic, 1)
                    log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", psnr=f"{rec['batch_psnr']:.1f}")
                if step % cfg.eval_every == 0 and step < cfg.steps:
                    ev = evaluate_tokenizer(run.model, run.val, run.device)
                    log.write({"step": step, **{f"val_{k}": v for k, v in ev.items()}})
                kill_point("tokenizer.step")
                stop = requested()
                if step % cfg.ckpt_every == 0 or step in (cfg.steps, stop_at) or stop:
                    run.save()
                bar.update(1)
                if stop:
                    notice(f"checkpoint written at step {step} of {cfg.steps}: {run.ckpt}")
                    raise Terminated
        finally:
            bar.close()
            log.close()
    if stopping and run.step == stop_at:
        return None
    return finalize(run.model, cfg, out, run.train, run.val, run.device, time.perf_counter() - tic)


def finalize(
    model: VQModel,
    cfg: TokenizerTrainConfig,
    out: Path,
    train: ImageDataset,
    val: ImageDataset,
    device: torch.device,
    train_seconds: float,
) -> dict:
    """Evaluate on val (and usage on train), write eval.json, the log's final record, curves, a recon grid
    and, last, tokenizer.safetensors: once that file exists the run is complete (the experiment runner
    reuses it). Run again after an interruption (`--resume` at the last step), it writes the same files."""
    ev = evaluate_tokenizer(model, val, device)
    ev["train_usage"] = evaluate_tokenizer(model, train, device)["usage"]
    ev.update(data=cfg.data, preset=cfg.preset, steps=cfg.steps, params=num_params(model))
    ev["train_seconds_this_session"] = round(train_seconds, 1)
    write_json(out / "eval.json", ev)
    log_path = out / LOG_FILE
    records = read_log(log_path)
    records = [r for r in records if not _is_final_record(r, cfg.steps)]  # from an interrupted finalize
    records.append({"step": cfg.steps, "val_psnr": ev["psnr"], "val_usage": ev["usage"]})
    write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
    plot_curves(
        records,
        ["loss", "batch_psnr", "val_psnr", "val_usage"],
        out / "curves.png",
        title="tokenizer training",
    )
    reconstruction_grid(model, val, out / "recon.png", device)
    save_tokenizer(
        model, out / TOKENIZER_FILE, info={"eval": ev, "data": cfg.data, "image_size": cfg.image_size}
    )
    return ev


def _is_final_record(record: dict, steps: int) -> bool:
    """The log record `finalize` adds: the val figures at the last step (the loop never evaluates there)."""
    return record.get("step") == steps and "val_psnr" in record and "loss" not in record

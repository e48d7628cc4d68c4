"""What every training loop of clusterar shares: the rules of a run folder, the learning-rate schedule,
the batch order, seeds and the JSONL log. The transformer (`train.transformer`) and the tokenizer
(`train.tokenizer`) trainers both follow them, so this file is where to read them.

A run folder holds checkpoint.safetensors (model, optimizer, step: `clusterar.checkpoints`), log.jsonl,
config.json and the trained model file. The rules:

- a fresh run into a folder that already holds one is refused (`check_run_folder`); `--resume` there
  continues it, and `--resume` in a folder without a checkpoint starts a new run (job scripts can always
  pass it);
- a resumed run must have the saved run's settings, except the session-only ones and the budget, which
  may grow to extend a finished run but not fall below the step reached (`check_resumed_settings`, on
  `clusterar.resume`'s policy, with the checkpoint's config as the record; `announce_resume`);
- log.jsonl gets one JSON record per logged step, appended and flushed at once; a resumed run first cuts
  it back to the checkpoint's step, so that each step is logged exactly once (`JsonlLog`).

Resumed runs continue bit for bit because nothing random depends on the session: the batch of step s is
a function of (seed, s) (`BatchOrder`), every other draw comes from a generator seeded by the step, and
the learning rate is a function of the step and the budget (`Schedule`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ClusterarError
from ..fileio import KIND_NAMES, FileError, describe_kind, expect_kind, read_meta, write_text_atomic
from ..resume import check_settings
from ..runtime import notice

CHECKPOINT = "checkpoint.safetensors"
LOG_FILE = "log.jsonl"

# ----------------------------------------------------------------------------- the run folder


def check_run_folder(
    ckpt: str | os.PathLike, kind: str, resume: bool, model_file: str, run_name: str = "training run"
) -> dict[str, Any] | None:
    """The metadata of a run folder's checkpoint, or None if the folder has none, checked before any work.

    Refused, each with what to do: a checkpoint without --resume (the run would be overwritten); --resume
    in a folder that has the run's model file but no checkpoint (the checkpoint was deleted: starting
    from scratch would silently replace the model); and a checkpoint that is damaged, truncated, a folder
    or another kind of file. --resume in a folder without a run starts one, so a job script can always
    pass it.
    """
    ckpt = Path(ckpt)
    run = ckpt.parent
    if not ckpt.exists() and not ckpt.is_symlink():
        if resume and (run / model_file).exists():
            raise ClusterarError(
                f"{run} holds {model_file} but no {ckpt.name}, so there is nothing to resume from; "
                + _start_over(run, ckpt, model_file)
            )
        return None
    try:
        meta = read_meta(ckpt, "training checkpoint")
        if meta.get("kind") not in KIND_NAMES:  # not a clusterar file's kind: damaged or foreign
            expect_kind(ckpt, meta, kind, "training checkpoint")
    except FileError as e:
        raise ClusterarError(
            f"{e.sentence}, so the run cannot resume from it; {_start_over(run, ckpt, model_file)}"
        ) from e
    if meta["kind"] != kind:  # another command's run: not ours to touch
        raise ClusterarError(
            f"{run} holds another kind of run ({ckpt.name} is {describe_kind(meta['kind'])}), not a "
            f"{run_name}; choose another --out (that folder is left as it is)"
        )
    if not resume:
        raise ClusterarError(
            f"{run} already holds a {run_name} (checkpoint at step {meta.get('step', '?')}); pass --resume to "
            "continue it, or choose another --out"
        )
    return meta


def _start_over(run: Path, ckpt: Path, model_file: str) -> str:
    """What to do with a run that cannot resume: the same words for every trainer."""
    keep = [name for name in (model_file, "snapshots") if (run / name).exists()]
    kept = (
        f" ({' and '.join(keep)} there {'hold' if len(keep) > 1 else 'holds'} the weights of its last "
        f"{'saves' if len(keep) > 1 else 'save'}, for sampling; training resumes only from {ckpt.name})"
        if keep
        else ""
    )
    return f"start over with another --out, or delete {run} and run the command again{kept}"


def say_new_run(out: Path) -> None:
    """What `--resume` in a folder without a checkpoint does."""
    notice(f"--resume: {out} holds no checkpoint yet; starting a new run there")


def _flags(names: Sequence[str]) -> list[str]:
    return [f"--{n.replace('_', '-')}" for n in names]


def check_resumed_settings(
    ckpt: Path,
    saved: dict[str, Any],
    now: dict[str, Any],
    session: Sequence[str] = (),
    budget: Sequence[str] = (),
) -> None:
    """Refuse to resume with settings other than the saved run's (`saved`: the checkpoint's config;
    `now`: this session's), under `clusterar.resume`'s policy. Only the `session` fields (how a session
    runs, not what it computes) and the `budget` fields (to extend a run) may differ."""
    may = _flags(session) + ([f"{' or '.join(_flags(budget))} (to extend a run)"] if budget else [])
    todo = (
        f"Only {', '.join(may) or 'nothing'} may change when resuming; start a new run folder (--out) for "
        "other settings"
    )
    check_settings(ckpt, "a run", saved, now, todo, free=(*session, *budget))


def announce_resume(
    out: Path,
    ckpt: Path,
    step: int,
    total: int,
    saved_total: int,
    schedule: Schedule,
    budget: Sequence[str],
    say: bool = True,
) -> None:
    """Refuse a budget (`total` steps; set by the `budget` flags) below the step the checkpoint reached;
    then say (if `say`) where the run continues and, if the budget changed, what that does to the
    learning rate from here on."""
    if total < step:
        raise ClusterarError(
            f"cannot resume {ckpt} with a budget of {total} steps: it is already at step {step}; give a larger "
            f"{'/'.join(_flags(budget))} to extend it, or the run's own budget to finish it"
        )
    line = f"resuming {out} at step {step} of {total}"
    if saved_total != total:
        line += f" (the budget was {saved_total} steps"
        if schedule.follows_budget:
            line += f"; the {schedule.kind} schedule is stretched to the new budget from here on"
        line += ")"
    if say:
        notice(line)


# ----------------------------------------------------------------------------- learning rate


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each optimizer step: a linear warm-up over `warmup` steps, then `lr`
    ("constant") or a half cosine from `lr` at the end of the warm-up to a floor at the last step
    ("cosine").

    The floor is `min_lr` or, given `min_lr_ratio`, `lr * min_lr_ratio` (the tokenizer's setting). The two
    are computed as min_lr + (lr - min_lr) * c and lr * (r + (1 - r) * c), c = (1 + cos) / 2: equal in
    exact arithmetic but not always in floats, and each trainer keeps its own form (operation order
    included) so that its runs stay bit for bit the same.
    """

    lr: float
    warmup: int = 0
    kind: str = "constant"  # constant | cosine
    min_lr: float = 0.0
    min_lr_ratio: float | None = None

    @property
    def follows_budget(self) -> bool:
        """True if the rates depend on the total number of steps (a changed budget changes them)."""
        return self.kind == "cosine"

    def at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step `step` (0-based) of a `total`-step run."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        t = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        cos = math.cos(math.pi * t)
        if self.min_lr_ratio is not None:
            r = self.min_lr_ratio
            return self.lr * (r + (1 - r) * 0.5 * (1 + cos))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + cos)


# ----------------------------------------------------------------------------- seeds and batch order


def mix_seeds(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, step, rank...): no two streams collide."""
    s = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(s[0]) << 31) | (int(s[1]) >> 1)


def linear_seed(seed: int, stride: int, index: int) -> int:
    """seed * stride + index: the tokenizer's seeds (stride 1_000_003 for the data order, 7919 for code
    restarts). Unlike `mix_seeds` two (seed, index) pairs can give one seed; kept so that tokenizer runs
    stay bit for bit what they were."""
    return seed * stride + index


def epoch_permutation(n: int, seed: int, epoch: int, stride: int | None = None) -> torch.Tensor:
    """The order of n examples in epoch `epoch`: a function of (seed, epoch) only. The generator's seed is
    `mix_seeds(seed, 0, epoch)`, or `linear_seed(seed, stride, epoch)` given `stride`."""
    s = mix_seeds(seed, 0, epoch) if stride is None else linear_seed(seed, stride, epoch)
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


class BatchOrder:
    """The examples of each optimizer step: step s takes the (s mod E)-th slice of `batch` examples of
    epoch s // E's permutation, E = n // batch steps per epoch (the last partial batch is left out)."""

    def __init__(self, n: int, batch: int, seed: int, stride: int | None = None):
        self.n, self.batch, self.seed, self.stride = n, batch, seed, stride
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, made when the epoch starts
            self._perm, self._epoch = epoch_permutation(self.n, self.seed, epoch, self.stride), epoch
        return self._perm[pos * self.batch : (pos + 1) * self.batch]


# ----------------------------------------------------------------------------- the log


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl, [] if there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def truncate_log(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint we resume from, so curves do not double back."""
    if path.exists():
        keep = [
            line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
        ]
        write_text_atomic(path, "".join(line + "\n" for line in keep))


class JsonlLog:
    """log.jsonl of a session that starts at `step`: cut back to that step (resumed) or removed (a fresh
    run in a folder whose earlier session never checkpointed), then appended to, one flushed line per
    record, so a killed session loses nothing it logged."""

    def __init__(self, path: Path, step: int):
        if step:
            truncate_log(path, step)
        elif path.exists():
            path.unlink()
        self.path = path
        self.file = open(path, "a")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

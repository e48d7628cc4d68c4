"""Training: the transformer of every method and the VQ tokenizer, on one set of loop rules.

- `loop`: what both trainers share: run-folder and resume rules, learning-rate schedule, batch order,
  seeds, the JSONL log;
- `parallel`: torchrun, DDP and FSDP for the transformer (DistInfo, init/close_distributed, Parallel);
- `transformer`: `clusterar train` (TrainConfig, Trainer, train, validation_loss);
- `tokenizer`: `clusterar tokenizer train|eval` (TokenizerTrainConfig, train_tokenizer, ...).

The names below are the package's API; `from clusterar.train import train, TrainConfig` is the usual use.
"""

from .loop import CHECKPOINT, LOG_FILE, BatchOrder, JsonlLog, Schedule, epoch_permutation, mix_seeds
from .parallel import DistInfo, Parallel, close_distributed, init_distributed
from .tokenizer import (
    TokenizerTrainConfig,
    evaluate_tokenizer,
    fetch,
    finalize,
    psnr,
    reconstruction_grid,
    restart_dead_codes,
    train_tokenizer,
)
from .transformer import (
    BETAS,
    BUDGET_FIELDS,
    CHECKPOINT_KIND,
    SCHEDULES,
    SESSION_FIELDS,
    SNAPSHOT_DIR,
    TrainConfig,
    TrainData,
    Trainer,
    load_inputs,
    lr_at,
    train,
    validation_loss,
)

__all__ = [
    "BETAS",
    "BUDGET_FIELDS",
    "CHECKPOINT",
    "CHECKPOINT_KIND",
    "LOG_FILE",
    "SCHEDULES",
    "SESSION_FIELDS",
    "SNAPSHOT_DIR",
    "BatchOrder",
    "DistInfo",
    "JsonlLog",
    "Parallel",
    "Schedule",
    "TokenizerTrainConfig",
    "TrainConfig",
    "TrainData",
    "Trainer",
    "close_distributed",
    "epoch_permutation",
    "evaluate_tokenizer",
    "fetch",
    "finalize",
    "init_distributed",
    "load_inputs",
    "lr_at",
    "mix_seeds",
    "psnr",
    "reconstruction_grid",
    "restart_dead_codes",
    "train",
    "train_tokenizer",
    "validation_loss",
]

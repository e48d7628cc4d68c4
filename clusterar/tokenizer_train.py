"""The old import path of the tokenizer trainer, kept so that existing imports keep working: the code is
in `clusterar.train.tokenizer` (and the loop rules it shares with the transformer in `clusterar.train.loop`).
"""

from .train.loop import CHECKPOINT, truncate_log
from .train.tokenizer import (
    CHECKPOINT_KIND,
    TokenizerTrainConfig,
    evaluate_tokenizer,
    fetch,
    finalize,
    psnr,
    reconstruction_grid,
    restart_dead_codes,
    train_tokenizer,
)

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_KIND",
    "TokenizerTrainConfig",
    "evaluate_tokenizer",
    "fetch",
    "finalize",
    "psnr",
    "reconstruction_grid",
    "restart_dead_codes",
    "train_tokenizer",
    "truncate_log",
]

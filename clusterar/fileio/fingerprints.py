"""Content fingerprints of tensors: what files record to say which tokenizer, clusters or weights they
were made with."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def fingerprint(tensors: Mapping[str, torch.Tensor] | torch.Tensor) -> str:
    """A short content hash (sha256, 16 hex digits) of tensors: names, shapes, dtypes and values."""
    if isinstance(tensors, torch.Tensor):
        tensors = {"": tensors}
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.reshape(-1)  # a 0-d tensor cannot be viewed as bytes; the bytes are the same
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]

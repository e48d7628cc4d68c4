"""Device choice and numeric precision, in one place for every command."""

from __future__ import annotations

import torch

from .errors import ClusterarError


def pick_device(device: str = "auto") -> torch.device:
    """ "auto" means the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClusterarError(f"--device {device} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ClusterarError(
            f"--device {device!r} is not a device PyTorch knows ({e}); use auto, cpu or cuda"
        ) from e


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on CPU (bf16 is very slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)

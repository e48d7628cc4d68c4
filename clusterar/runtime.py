"""Device choice and numeric precision, in one place for every command."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from .errors import ClusterarError


def num_params(model: torch.nn.Module) -> int:
    """Parameters of a model (tokenizer or transformer), as the papers count them."""
    return sum(p.numel() for p in model.parameters())


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


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The transformers' weight dtype for sampling: bf16 on CUDA (each decode step reads every weight, so
    half the bytes; LlamaGen samples in bf16 too), float32 on CPU (bf16 is slow there). Training keeps
    float32 weights under autocast."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters (not the buffers: the RoPE table stays float32) of `model`, in place."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def describe_machine(device: torch.device | None = None) -> str:
    """One line saying where figures were measured (CPU model, cores, torch, threads, GPU): every report
    and benchmark states it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    use_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    gpu = (
        f", GPU {torch.cuda.get_device_name(device if device is not None else 0)}" if use_gpu else ", no GPU"
    )
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads{gpu}"
    )


def notice(message: str) -> None:
    """Tell the user what a command decided (resuming at step N, nothing left to do) on stderr, on a
    line of its own even while a progress bar is drawn."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)

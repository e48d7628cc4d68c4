"""Training checkpoints and model files, all in safetensors.

A training checkpoint is ONE safetensors file holding the model weights (`model.*`), the optimizer state
(`optim.*`), any extra tensors of the run (`extra.*`, e.g. RNG states, EMA weights) and a JSON header with
the step counters and the configs. One file means one atomic rename: an interrupted save never leaves a
checkpoint whose weights and optimizer disagree.

Loading is strict: a missing or unexpected key is an error that names the keys, never a silently
half-random model.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ClusterarError
from .fileio import (
    check_file,
    file_error,
    first_line,
    load_tensors,
    save_tensors,
)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model + optimizer + extra tensors + meta to one safetensors file, atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    save_tensors(path, tensors, meta)


@dataclass
class Checkpoint:
    """What a checkpoint restores besides the model weights, which are loaded as it is read."""

    meta: dict[str, Any]  # step, the run's config, ...
    optimizer: dict[str, Any] | None  # `Optimizer.state_dict` form (parameters by index); None if not kept
    extra: dict[str, torch.Tensor]  # the run's other tensors (RNG states, EMA weights, code counts)


def read_checkpoint(path: str | os.PathLike, model: nn.Module, need_optimizer: bool = True) -> Checkpoint:
    """THE checkpoint reader: load `save_checkpoint`'s weights into `model` (strictly), return the rest.

    The optimizer state is returned, not loaded, so that a sharded trainer can place it; with
    `need_optimizer` a checkpoint without one is refused (a run cannot resume from it).
    """
    tensors, meta = load_tensors(path, "checkpoint")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_strict(model, weights, source=str(path))
    optimizer = None
    if "optimizer" in meta:
        opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer = _unflatten_optimizer(opt, meta["optimizer"])
    elif need_optimizer:
        raise ClusterarError(f"checkpoint {path} has no optimizer state, so the run cannot resume from it")
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return Checkpoint(meta, optimizer, extra)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model (and optimizer) in place from `save_checkpoint`'s file; return (meta, extra tensors)."""
    ckpt = read_checkpoint(path, model, need_optimizer=optimizer is not None)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    return ckpt.meta, ckpt.extra


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error message a user can act on."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the {type(model).__name__} it is loaded into:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {label}: {_preview(keys)}")
        if wrong:
            lines.append(
                "  shape mismatches: "
                + _preview(
                    [f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
                )
            )
        lines.append(
            "Check that the preset/config matches the checkpoint (e.g. grid size, codebook size, depth)."
        )
        raise ClusterarError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _preview(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """Read a PyTorch .pt/.pth file safely: the one place clusterar calls torch.load.

    torch.load runs with weights_only=True, so only tensors, containers and plain values are rebuilt; a file
    that pickles other objects (which could run code when unpickled) is refused with one line saying so,
    instead of PyTorch's advice to retry with weights_only=False. argparse.Namespace, which LlamaGen stores
    under "args", is allow-listed. Missing, empty, truncated and foreign files get `file_error`'s message.
    """
    p = check_file(path, what, PT_SUFFIXES)
    with open(p, "rb") as f:
        head = f.read(4)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ClusterarError(
                f"{what} {p} holds Python objects other than tensors (it names {found.group(1)}), so it is "
                "refused for safety: unpickling them could run code from the file. clusterar reads only "
                "tensors from .pt files: where the file comes from, re-save the weights as a state_dict (a "
                "dict of tensors) and pass that"
            ) from e
        problem = _torch_file_problem(head, e)
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        problem = _torch_file_problem(head, e)
    raise file_error(p, what, problem, damaged=True)


def _torch_file_problem(head: bytes, e: BaseException) -> str:
    if head == b"PK\x03\x04":  # torch.save's zip format: the end of the archive is missing or damaged
        return "is truncated or damaged (its zip archive cannot be read)"
    if head[:1] == b"\x80":  # a pickle: PyTorch's legacy format
        return f"is truncated or damaged (unreadable pickle: {first_line(e)})"
    return "is not a PyTorch file (torch.save writes a zip archive)"


def load_torch_weights(
    path: str | os.PathLike, which: str = "model", what: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Read a state_dict from a PyTorch .pt/.pth file of LlamaGen or another trainer, safely.

    Accepts a bare state_dict or one wrapped as "model", "ema", "module" or "state_dict" (LlamaGen's
    released files and training checkpoints, DDP and Lightning-style trainers). `which="ema"` picks the
    EMA weights of a training checkpoint. Reads with `load_torch_file` (weights_only=True). Prefixes added
    by DDP ("module.") and torch.compile ("_orig_mod.") are removed. `what` names the file in errors.
    """
    obj = load_torch_file(path, what)
    path = os.fspath(path)
    if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif which == "ema":
        raise ClusterarError(f"{path} holds no 'ema' weights; drop the EMA option to load its model weights")
    else:
        for key in ("model", "module", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise file_error(
            path, what, "is not a state_dict nor one wrapped as 'model', 'ema', 'module' or 'state_dict'"
        )
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out

"""Training checkpoints and model files, all in safetensors.

A training checkpoint is ONE safetensors file holding the model weights (`model.*`), the optimizer state
(`optim.*`), any extra tensors of the run (`extra.*`, e.g. RNG states, EMA weights) and a JSON header with
the step counters and the configs. One file means one atomic rename: an interrupted save never leaves a
checkpoint whose weights and optimizer disagree.

Loading is strict: a missing or unexpected key is an error that names the keys, never a silently
half-random model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import ClusterarError
from .fileio import load_tensors, save_tensors


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


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model (and optimizer) in place from `save_checkpoint`'s file; return (meta, extra tensors)."""
    tensors, meta = load_tensors(path, "checkpoint")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_strict(model, weights, source=str(path))
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ClusterarError(
                f"checkpoint {path} has no optimizer state, so the run cannot resume from it"
            )
        opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer.load_state_dict(_unflatten_optimizer(opt, meta["optimizer"]))
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return meta, extra


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


def load_torch_weights(path: str | os.PathLike, which: str = "model") -> dict[str, torch.Tensor]:
    """Read a state_dict from a PyTorch .pt/.pth file of LlamaGen or another trainer, safely.

    Accepts a bare state_dict or one wrapped as "model", "ema", "module" or "state_dict" (LlamaGen's
    released files and training checkpoints, DDP and Lightning-style trainers). `which="ema"` picks the
    EMA weights of a training checkpoint. Loads with weights_only=True; argparse.Namespace, which LlamaGen
    stores under "args", is allow-listed rather than unpickled freely. Prefixes added by DDP ("module.")
    and torch.compile ("_orig_mod.") are removed.
    """
    import argparse

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ClusterarError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here: say which file and why
        raise ClusterarError(f"could not read {path} as a PyTorch checkpoint (weights_only=True): {e}") from e
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
        raise ClusterarError(
            f"{path} is not a state_dict nor one wrapped as 'model', 'ema', 'module' or 'state_dict'"
        )
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out

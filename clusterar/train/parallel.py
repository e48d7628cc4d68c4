"""How the transformer trainer spreads one model over the processes of a torchrun job, in one place.

Three modes: one process; DDP (a replica per process, gradients averaged in backward); FSDP2
`fully_shard` (parameters, gradients and optimizer state sharded: parameters and EMA weights are DTensor
shards, re-gathered per block in forward). `Parallel` holds the mode, so that the trainer calls named
methods (place, wrap, grad_sync, full, ...) and never branches on it. Checkpoints hold full tensors
whatever the mode, so a run can resume with another world size or sharding.
"""

from __future__ import annotations

import contextlib
import gc
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ClusterarError
from ..runtime import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (NCCL on CUDA, gloo on CPU);
    a plain single process otherwise. Each process uses GPU LOCAL_RANK."""
    dev = pick_device(device)
    if dist.is_initialized():  # a caller set the group up
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info = DistInfo(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True
        )
    else:
        return DistInfo(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if info.owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def close_distributed(all_finished: bool) -> None:
    """Leave the process group so that no rank exits while another still talks to it.

    Rank 0 writes files and plots after the last collective while the others reach this point at once;
    a rank that tore gloo down (and exited) then, with FSDP's modules, device mesh and pending work
    objects still alive in reference cycles, died now and then at interpreter exit with SIGABRT
    ("terminate called without an active exception"). So: free what holds the group (gc, for the
    cycles), wait for every rank (`all_finished`: every rank returned; skipped after an error, where a peer
    may never arrive), then destroy the group while the interpreter is whole.
    """
    gc.collect()
    if all_finished:
        dist.barrier()
    dist.destroy_process_group()


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


class _StateDict:
    """Hands ready-made state dicts to `save_checkpoint` (FSDP: gathered full tensors, not the module's)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class Parallel:
    """The parallel mode of this process's model: `di` (rank and world), `device`, and `fsdp` (shard with
    FSDP2; otherwise DDP when world > 1). `place` and `wrap` set the model up; the rest are the operations
    of a training step and of checkpointing that differ between the modes."""

    def __init__(self, di: DistInfo, device: torch.device, fsdp: bool):
        if fsdp and di.world < 2:
            raise ClusterarError(
                "--fsdp shards the model over processes: launch with torchrun --nproc_per_node N"
            )
        self.di, self.device, self.fsdp = di, device, fsdp
        self.module: nn.Module | None = None  # the model `place` set up (sharded in place under FSDP)
        self.ddp: nn.Module | None = None  # its DDP wrapper, if any

    # ------------------------------------------------------------ setting the model up

    def place(self, model: nn.Module) -> None:
        """Move `model` to the device, or shard it (each block, then the whole) under FSDP."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)  # moves the parameter shards to this rank's device
            model.freqs_cis = model.freqs_cis.to(self.device)
        else:
            model.to(self.device)
        self.module = model

    @property
    def fused_optimizer(self) -> bool:
        """Whether AdamW uses its fused kernel: on CUDA (not on DTensor shards), where it is one kernel per
        step and skips a non-finite step on the device (`train.divergence`). A CPU keeps the default
        foreach step, whose results the CPU runs and tests were measured with."""
        return self.device.type == "cuda" and not self.fsdp

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training step calls: DDP around the placed model with world > 1 (not under FSDP, which
        sharded it in place), else the model itself."""
        if self.di.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            return self.ddp
        return model

    # ------------------------------------------------------------ a training step

    def grad_sync(self, on: bool) -> AbstractContextManager:
        """Context for one micro-batch's backward: reduce gradients over ranks only if `on` (the last
        micro-batch of a step); the others accumulate locally."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(on)
        if self.ddp is not None and not on:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over ranks, in place."""
        if self.di.world > 1:
            dist.all_reduce(t)
            t /= self.di.world
        return t

    def all_true(self, flag: torch.Tensor) -> bool:
        """True if the 0-dim bool `flag` is true on every rank."""
        ok = flag.to(torch.int32)
        if self.di.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def any_rank(self, flag: bool) -> bool:
        """True if the host-side `flag` is true on any rank (no device sync with one process)."""
        if self.di.world == 1:
            return flag
        return not self.all_true(torch.tensor(not flag, device=self.device))

    def barrier(self) -> None:
        if self.di.world > 1:
            dist.barrier()

    def ema_update(self, ema: list[torch.Tensor], params: list[torch.Tensor], weight: float) -> None:
        """ema += weight * (param - ema), for each pair."""
        with torch.no_grad():
            if self.fsdp:  # DTensor shards
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p.detach(), weight)
            else:
                torch._foreach_lerp_(ema, [p.detach() for p in params], weight)

    # ------------------------------------------------------------ full tensors in and out

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor (gathered from all ranks for a DTensor shard: every rank must call it)."""
        return t.full_tensor() if is_dtensor(t) else t

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        """This rank's part of `t` (its shard for a DTensor)."""
        return t.to_local() if is_dtensor(t) else t

    @staticmethod
    def set_full(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """`full` laid out like `like`: copied into it, or distributed as its shards (a new DTensor)."""
        if is_dtensor(like):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
        return like.copy_(full)

    def load_optimizer(self, opt: torch.optim.Optimizer, state: dict, names: list[str]) -> None:
        """Load a checkpoint's optimizer state (`Optimizer.state_dict` form, keyed by index in `names`
        order) into `opt`, sharding it under FSDP."""
        if not self.fsdp:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = {
            "state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]],
        }
        set_optimizer_state_dict(self.module, opt, full, options=StateDictOptions(full_state_dict=True))

    def checkpoint_state(self, opt: torch.optim.Optimizer, names: list[str]) -> tuple[Any, Any] | None:
        """(model, optimizer) to hand to `save_checkpoint` on the rank that writes (None elsewhere): the
        module and optimizer themselves, or under FSDP their gathered full state (all ranks must call
        this), the optimizer's keyed by index in `names` order as `Optimizer.state_dict` keys it."""
        if not self.fsdp:
            return (self.module, opt) if self.di.main else None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.module, options=opts)
        osd = get_optimizer_state_dict(self.module, opt, options=opts)
        if not self.di.main:
            return None
        index = {n: i for i, n in enumerate(names)}
        osd = {
            "state": {index[n]: s for n, s in osd["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]],
        }
        return _StateDict(msd), _StateDict(osd)

"""Catching a diverged optimizer step without waiting for the device after every step.

A step whose loss or gradient norm is not finite must not update the weights: the run stops with the last
good checkpoint kept. Reading the step's values on the host before the update would stall the GPU's queue
once per step (the host waits for the step to finish before it queues the next). Instead the check stays
on the device: AdamW's fused kernel takes a `found_inf` flag (the way torch.amp's GradScaler skips steps)
and skips its update, and every later one, once a step was not finite, so the weights stay those of the
last good step while the host goes on queueing. The host reads the flag where it reads the device anyway:
at a log step, and before anything is written.

Optimizers without that flag (FSDP's DTensor shards) are checked on the host after every step, before the
update, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ClusterarError


class DivergenceWatch:
    """The first optimizer step whose watched values [n] were not all finite, kept on the device."""

    def __init__(self, opt: torch.optim.Optimizer, names: list[str], device: torch.device, step0: int = 0):
        self.opt, self.names, self.step0 = opt, names, step0  # step0: optimizer steps taken before
        self.on_device = bool(opt.defaults.get("fused"))  # the fused AdamW skips its update on found_inf
        self.bad = torch.zeros((), device=device)  # 1.0 from the first non-finite step on
        self.count = torch.zeros((), dtype=torch.long, device=device)  # steps seen (on the device: no copy)
        self.step = torch.zeros((), dtype=torch.long, device=device)  # the first non-finite step (1-based)
        self.values = torch.zeros(len(names), device=device)  # its values

    def see(self, values: torch.Tensor) -> None:
        """Record this step's values (no host sync); arm the optimizer's skip when it can take one."""
        self.count.add_(1)
        first = (self.bad == 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, self.count, self.step)
        self.values = torch.where(first, values.float(), self.values)
        self.bad = torch.maximum(self.bad, first.float())
        if self.on_device:
            self.opt.found_inf = self.bad  # read by the fused kernel at `opt.step()`

    @property
    def must_check_now(self) -> bool:
        """Whether the host must look before the update (the optimizer cannot skip it on the device)."""
        return not self.on_device

    def check(self, lr_at: Callable[[int], float], kept: str) -> None:
        """Raise if a step seen so far was not finite (waits for the device). `lr_at(step)`: the learning
        rate of 0-based step `step`; `kept`: what was kept, for the message."""
        if not bool(self.bad):
            return
        step = self.step0 + int(self.step)
        got = ", ".join(f"{n} {v:.4g}" for n, v in zip(self.names, self.values.tolist(), strict=True))
        raise ClusterarError(
            f"training diverged in optimizer step {step} (lr {lr_at(step - 1):.3g}): {got}; the weights were not "
            f"updated from then on, {kept}. Lower --lr (or add --warmup) and start again"
        )

"""Learning-rate schedules as pure functions of the step count.

A schedule multiplies the base learning rate at step s (an optimizer step for text-to-image
training, an iteration for robot policies) of S in all, with W warmup steps and a final ratio r:

    warmup    f(s) = (s + 1) / W                                     for s < W
    constant  f(s) = 1                                               for s >= W
    linear    f(s) = r + (1 - r) * (1 - p)
    cosine    f(s) = r + (1 - r) * (1 + cos(pi p)) / 2               (Loshchilov & Hutter 2017)
              with p = min(1, (s - W) / max(1, S - 1 - W)), so the last step runs at r exactly.

DPPO (Ren et al. 2024) runs its actor and critic rates through warmup schedulers; a linear
warmup also tames Adam's first steps, which move every weight by about the learning rate
whatever its gradient. Being a function of the step alone, which every checkpoint stores, a
resumed run gets exactly the learning rates of the uninterrupted one: there is no scheduler
state to save.
"""

from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant", final_ratio: float = 0.0
) -> float:
    """The multiplier f(step) of the base learning rate (see the module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    decay = 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return final_ratio + (1.0 - final_ratio) * decay


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Set each parameter group's learning rate to its base rate times ``factor``."""
    if len(base_lrs) != len(optimizer.param_groups):
        raise ValueError(
            f"{len(base_lrs)} base learning rates for {len(optimizer.param_groups)} param groups"
        )
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * factor

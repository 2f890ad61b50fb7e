"""Advantages for trajectory-level rewards.

    B  trajectories; rewards are (B,), one per final sample.

- DDPO (Black et al. 2023): per-prompt statistics over a running buffer of recent rewards,
  A = (r - mean_prompt) / (std_prompt + eps), falling back to batch statistics until a prompt
  has ``min_count`` rewards.
- GRPO (Shao et al. 2024; Flow-GRPO, Liu et al. 2025): G samples per prompt in the batch,
  A = (r - mean_group) / (std + eps), std over the group or the whole batch.
- LOOP / RLOO (Kool et al. 2019; Gupta et al. 2025): leave-one-out baseline,
  A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalizer; its buffers are part of the training state.

    Args:
        buffer_size: how many recent rewards per prompt are kept.
        min_count: below this many, the prompt's rewards are normalized with batch statistics.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: Tensor, eps: float = 1e-6) -> Tensor:
        """Add this batch's rewards to the buffers and return (B,) advantages."""
        r = rewards.detach().double().cpu().numpy()
        out = np.empty_like(r)
        prompts_arr = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order (deterministic)
            mask = prompts_arr == prompt
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[mask].tolist())
            if len(buf) < self.min_count:
                mean, std = r.mean(), r.std()
            else:
                mean, std = np.mean(buf), np.std(buf)
            out[mask] = (r[mask] - mean) / (std + eps)
        return torch.as_tensor(out, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def _group_index(groups: Tensor) -> Tensor:
    """(B,) dense ids 0..n-1 of each trajectory's group."""
    return torch.unique(groups, return_inverse=True)[1]


def group_advantages(
    rewards: Tensor, groups: Tensor, std_scope: str = "group", eps: float = 1e-6, std_eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """GRPO advantages (B,) and a (B,) mask of trajectories in groups whose rewards vary.

    ``groups`` (B,) says which samples share a prompt draw (G samples of one prompt).

    ``std_scope="group"`` divides by each group's std (GRPO), ``"batch"`` by the batch std
    (Flow-GRPO's option, Dr. GRPO's argument), ``"none"`` centers only. A group whose rewards are
    all equal (std <= ``eps``) carries no signal: its advantages are 0 and the mask says so
    (Flow-GRPO leaves them out of the update: ``algorithm.drop_zero_std``). The std is divided
    with ``std_eps`` added (Flow-GRPO's PerPromptStatTracker: std + 1e-4, the population std).
    """
    g = _group_index(groups).to(rewards.device)
    n = int(g.max()) + 1
    count = torch.zeros(n, device=rewards.device).index_add_(0, g, torch.ones_like(rewards))
    mean = torch.zeros(n, device=rewards.device).index_add_(0, g, rewards) / count
    centered = rewards - mean[g]
    var = torch.zeros(n, device=rewards.device).index_add_(0, g, centered**2) / count
    group_std = var.sqrt()[g]
    informative = group_std > eps
    if std_scope == "group":
        adv = centered / (group_std + std_eps)
    elif std_scope == "batch":
        adv = centered / (rewards.std(unbiased=False) + std_eps)
    elif std_scope == "none":
        adv = centered
    else:
        raise ValueError(f"algorithm.std_scope must be 'group', 'batch' or 'none', got {std_scope!r}")
    return torch.where(informative, adv, torch.zeros_like(adv)), informative


def leave_one_out_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """LOOP/RLOO: A_i = r_i - mean of the other samples of the same prompt, (B,).

    Every group needs at least 2 samples."""
    g = _group_index(groups).to(rewards.device)
    n = int(g.max()) + 1
    count = torch.zeros(n, device=rewards.device).index_add_(0, g, torch.ones_like(rewards))
    if (count < 2).any():
        raise ValueError(
            "leave-one-out advantages need at least 2 samples per prompt (algorithm.group_size >= 2)"
        )
    total = torch.zeros(n, device=rewards.device).index_add_(0, g, rewards)
    baseline = (total[g] - rewards) / (count[g] - 1)
    return rewards - baseline

"""What the guidance methods share: their result, and scoring with a reward callable."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class GuidanceResult:
    """Final samples of a guided run.

    Attributes:
        latents: (B, C, H, W) final samples (one per prompt).
        images: (B, C', H', W') decoded images in [0, 1].
        rewards: (B,) the reward of each returned sample.
        nfe: network evaluations spent per returned sample (a forward counts 1, a backward 2).
        info: method-specific diagnostics (e.g. SMC's effective sample sizes).
    """

    latents: Tensor
    images: Tensor
    rewards: Tensor
    nfe: float
    info: dict = field(default_factory=dict)


def score(reward, images: Tensor, prompts: list[str]) -> Tensor:
    """(B,) float32 rewards from a :class:`~flowrl.rewards.Reward` or a plain reward function."""
    out = (
        reward(images, prompts)
        if hasattr(reward, "terms")
        else reward(images, prompts, [{} for _ in prompts])
    )
    values = out[0] if isinstance(out, tuple) else out
    return torch.as_tensor(values, dtype=torch.float32, device=images.device)

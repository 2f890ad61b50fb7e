"""The policy-gradient core: advantages and losses for any Gaussian denoising chain."""

from flowrl.core.advantages import (
    PerPromptStatTracker,
    group_advantages,
    leave_one_out_advantages,
)
from flowrl.core.gae import generalized_advantage_estimate
from flowrl.core.losses import gaussian_entropy, gaussian_kl, policy_loss

__all__ = [
    "PerPromptStatTracker",
    "gaussian_entropy",
    "gaussian_kl",
    "generalized_advantage_estimate",
    "group_advantages",
    "leave_one_out_advantages",
    "policy_loss",
]

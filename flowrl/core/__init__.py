"""The policy-gradient core: advantages and losses for any Gaussian denoising chain."""

from flowrl.core.advantages import (
    PerPromptStatTracker,
    group_advantages,
    leave_one_out_advantages,
)
from flowrl.core.gae import generalized_advantage_estimate
from flowrl.core.gaussian import gaussian_entropy, gaussian_kl, gaussian_log_prob, reduce_event
from flowrl.core.losses import policy_loss
from flowrl.core.schedule import lr_factor, set_lr

__all__ = [
    "PerPromptStatTracker",
    "gaussian_entropy",
    "gaussian_kl",
    "gaussian_log_prob",
    "generalized_advantage_estimate",
    "group_advantages",
    "leave_one_out_advantages",
    "lr_factor",
    "policy_loss",
    "reduce_event",
    "set_lr",
]

"""What every sampler shares: the Gaussian log-density and its reduction over event dims."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

LOGPROB_REDUCTIONS = ("mean", "sum")


def reduce_event(x: Tensor, reduction: str) -> Tensor:
    """Reduce (B, *event) to (B,) by ``mean`` (as DDPO and Flow-GRPO do) or ``sum`` (the true
    log-density of the whole event). The PPO clip range must be chosen with this choice: with
    ``mean`` a per-step log-ratio is the per-dimension average, so DDPO's clip range 1e-4 applies."""
    dims = tuple(range(1, x.ndim))
    if reduction == "mean":
        return x.mean(dim=dims)
    if reduction == "sum":
        return x.sum(dim=dims)
    raise ValueError(f"logprob_reduction must be one of {LOGPROB_REDUCTIONS}, got {reduction!r}")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """log N(x; mean, std^2 I), elementwise then reduced over event dims: (B, *event) -> (B,).

    ``std`` broadcasts against ``x`` (a (B, 1, 1, 1) per-sample std or a full tensor).
    """
    log_density = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return reduce_event(log_density, reduction)


@dataclass
class StepOutput:
    """One transition x_t -> x_{t-1} of a Gaussian sampler.

    Attributes:
        prev_sample: (B, *event) x_{t-1}, drawn (when sampling) or given (when re-evaluating).
        mean: (B, *event) the Gaussian's mean mu_theta(x_t, t, c).
        std: (B, 1, ...) the Gaussian's std, broadcastable to the event shape.
        log_prob: (B,) log p(x_{t-1} | x_t, c), reduced over event dims.
        pred_original_sample: (B, *event) the predicted clean sample x0_hat.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    pred_original_sample: Tensor

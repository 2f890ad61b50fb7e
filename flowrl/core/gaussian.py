"""Gaussian densities over an event, the only distribution a denoising-chain MDP step needs.

    B  transitions in the batch      event  the sample's own dims ((C, H, W) or (Ta, Da))

Every per-step quantity is elementwise and then reduced over the event dims by
:func:`reduce_event`: ``mean`` as DDPO and Flow-GRPO do (so a clip range is per dimension) or
``sum`` (the true log-density of the whole event). A KL or entropy is reduced the same way as
the log-probs it sits beside, so its coefficient is on their scale.
"""

from __future__ import annotations

import math

import torch
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


def gaussian_log_prob(
    x: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean", clamp: tuple[float, float] | None = None
) -> Tensor:
    """log N(x; mean, std^2 I), elementwise then reduced over event dims: (B, *event) -> (B,).

    ``std`` broadcasts against ``x`` (a (B, 1, 1, 1) per-sample std or a full tensor). ``clamp``
    = (lo, hi) clamps each element's log-density before the reduction (DPPO's [-5, 2]).
    """
    log_density = -((x - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    if clamp is not None:
        log_density = log_density.clamp(*clamp)
    return reduce_event(log_density, reduction)


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) = ||mean - ref_mean||^2 / (2 std^2) per
    transition, (B,), reduced over event dims the same way as the log-probs (so beta is on the
    log-prob's scale)."""
    return reduce_event((mean - ref_mean) ** 2 / (2 * std**2), reduction)


def gaussian_entropy(std: Tensor, event_shape: torch.Size, reduction: str = "mean") -> Tensor:
    """Entropy of N(mu, std^2 I) per transition, (B,): log std + 1/2 log(2 pi e) per dimension,
    reduced over the event dims like the log-probs. ``std`` broadcasts to (B, *event_shape)."""
    per_dim = std.log() + 0.5 * math.log(2 * math.pi * math.e)
    return reduce_event(per_dim.expand(std.shape[0], *event_shape), reduction)

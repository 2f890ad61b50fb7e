"""Generalized advantage estimation over environment steps (Schulman et al. 2016,
https://arxiv.org/abs/1506.02438, eq. 11-16), as DPPO and ReinFlow use it with a value function.

    T  environment steps (one action chunk each) in sampling order     N  environments
"""

from __future__ import annotations

import torch
from torch import Tensor


def generalized_advantage_estimate(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    done: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) advantages and TD(lambda) returns, both (T, *N), time first.

    Args:
        rewards: (T, *N) r_t, the reward of step t.
        values: (T, *N) V(s_t) of the state step t started from.
        next_values: (T, *N) V(s_{t+1}) of the state step t reached; for an episode cut by a time
            limit this is the value of its final observation (the bootstrap), not of the reset.
        terminated: (T, *N) bool, s_{t+1} is terminal: its value is 0.
        done: (T, *N) bool, the episode ended at step t (terminated or truncated): the
            lambda-trace does not cross into the next episode.
        gamma: discount per step.
        lam: GAE's lambda.

    With delta_t = r_t + gamma (1 - terminated_t) V(s_{t+1}) - V(s_t) (eq. 11),

        A_t = delta_t + gamma lambda (1 - done_t) A_{t+1}       (eq. 16, as a reversed recursion)
        returns_t = A_t + V(s_t)

    The last step's trace starts from A_T = 0: ``next_values[-1]`` bootstraps what lies beyond.
    """
    not_terminal = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - done.to(rewards.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values
    advantages = torch.zeros_like(deltas)
    lastgaelam = torch.zeros_like(deltas[0])
    for t in reversed(range(deltas.shape[0])):
        lastgaelam = deltas[t] + gamma * lam * not_done[t] * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values

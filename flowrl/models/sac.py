"""SAC's networks as DSRL configures them: the squashed-Gaussian actor head and the twin Q.

    B  batch   Ta, Da  the noise action's chunk shape (the frozen chain's x_T)   D_s  flattened state

DSRL (Wagenmaker et al. 2025, arXiv 2506.15799) trains stable-baselines3's SAC ``MlpPolicy`` with
``net_arch = [layer_size] * num_layers`` for both actor and critic, ``activation_fn = Tanh`` and
``post_linear_modules = [LayerNorm]`` (its ``use_layer_norm``; gym configs: 3 layers of 128 for
Hopper), so every hidden layer is

    h <- tanh(LayerNorm(W h + b))

- :class:`SquashedGaussianHead` (SB3's ``Actor``): a trunk of such layers, then two linear maps to
  the mean mu(s) and the log std, clamped to [-20, 2] (SB3's LOG_STD_MIN / LOG_STD_MAX); the
  action is tanh(u), u ~ N(mu, sigma^2), and the noise DSRL hands the frozen chain is w = b tanh(u).
- :class:`TwinQ` (SB3's ``ContinuousCritic`` with ``n_critics``): Q_i(s, a) = MLP_i([s, a]) on the
  action scaled to [-1, 1] (a = w / b, what SB3's replay buffer stores).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # stable-baselines3's sac/policies.py


def layer_norm_mlp(in_dim: int, hidden: list[int], layer_norm: bool = True) -> nn.Sequential:
    """Linear -> LayerNorm -> Tanh per hidden width (SB3's ``create_mlp`` with DSRL's
    ``post_linear_modules``); no output layer."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), *([nn.LayerNorm(h)] if layer_norm else []), nn.Tanh()]
        in_dim = h
    return nn.Sequential(*layers)


class SquashedGaussianHead(nn.Module):
    """(B, D_s) -> (mu (B, Ta, Da), sigma (B, Ta, Da)), both state-dependent (module docstring)."""

    def __init__(self, in_dim: int, action_shape: tuple[int, int], hidden_dims: list[int]):
        super().__init__()
        self.action_shape = tuple(action_shape)
        out = math.prod(self.action_shape)
        self.trunk = layer_norm_mlp(in_dim, hidden_dims)
        self.mu = nn.Linear(hidden_dims[-1], out)
        self.log_std = nn.Linear(hidden_dims[-1], out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(h)
        shape = (h.shape[0], *self.action_shape)
        log_std = self.log_std(z).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return self.mu(z).view(shape), log_std.exp().view(shape)


class TwinQ(nn.Module):
    """``n`` Q networks over (state (B, D_s), action (B, D_a)) -> (n, B)."""

    def __init__(
        self, state_dim: int, action_dim: int, hidden_dims: list[int], n: int = 2, layer_norm: bool = True
    ):
        super().__init__()
        self.qs = nn.ModuleList(
            nn.Sequential(
                layer_norm_mlp(state_dim + action_dim, hidden_dims, layer_norm), nn.Linear(hidden_dims[-1], 1)
            )
            for _ in range(n)
        )

    def forward(self, s: Tensor, a: Tensor) -> Tensor:
        x = torch.cat([s, a], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])


__all__ = ["LOG_STD_MAX", "LOG_STD_MIN", "SquashedGaussianHead", "TwinQ", "layer_norm_mlp"]

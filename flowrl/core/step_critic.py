"""A critic over denoising steps: per-step advantages for a text-to-image chain from a learned
value V(x_k, t_k, c), in the spirit of AC-Flow (Fan et al. 2025, "Fine-tuning Flow Matching
Generative Models with Intermediate Feedback", arXiv 2510.18072).

    B  trajectories   K  denoising steps (transitions)   C, H, W  the latent   D  text-embedding width

The chain is an MDP whose only reward comes at its end: transition k maps x_k to x_{k+1}, and the
last one (k = K - 1) earns the *shaped* reward R~ of the final sample (reward shaping: the raw
reward through one of the trajectory estimators, e.g. GRPO's (r - mean_group) / (std + eps), so
the critic regresses a well-normalized target; ``algorithm.step_critic_shaping``):

    r_k = R~ if k = K - 1 else 0,      V(x_K) = 0 (the chain has ended)
    delta_k = r_k + gamma V(x_{k+1}) - V(x_k)
    A_k = delta_k + gamma lambda A_{k+1}          (GAE over the denoising steps, A_K = 0)
    G_k = A_k + V(x_k)                            (the critic's target, TD(lambda))

then A_k is clipped to [-adv_clip_max, adv_clip_max] (AC-Flow's advantage clipping), and the
first ``critic_warmup_epochs`` train the critic alone (its warm-up). With gamma = lambda = 1,
A_k = R~ - V(x_k): the critic is a per-step baseline; with a zero critic every step's advantage is
R~, the trajectory advantage the estimator starts from (the critic's last layer is zero at
initialization, so the first epoch trains on exactly that). lambda < 1 credits each step with the
critic's change of its prediction, V(x_{k+1}) - V(x_k): the intermediate feedback.

The critic (:class:`StepCritic`) is small: two strided convolutions pooled over the latent, a
sinusoidal embedding of t_k / T, and the mean over tokens of the prompt embedding, into an MLP.
It is trained beside the policy with the family's value loss, 1/2 mean_{b,k} (V(x_k) - G_k)^2
weighted by ``vf_coef``, on every step of each minibatch's trajectories; its parameters are a
parameter group of the run's optimizer (``optim.value_learning_rate``) and are saved with the
model's in the checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowrl.chain import Chain
from flowrl.core.gae import generalized_advantage_estimate


def denoising_gae(
    terminal_rewards: Tensor, values: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """(B, K) advantages A_k and returns G_k of chains whose only reward is ``terminal_rewards``
    (B,), earned by the last transition; ``values`` (B, K) is V(x_k) of each transition's start
    state (see the module docstring)."""
    B, K = values.shape
    rewards = torch.zeros_like(values)
    rewards[:, -1] = terminal_rewards.to(values.dtype)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    last = torch.zeros(B, K, dtype=torch.bool, device=values.device)
    last[:, -1] = True
    adv, returns = generalized_advantage_estimate(
        rewards.T, values.T, next_values.T, last.T, last.T, gamma, lam
    )
    return adv.T.contiguous(), returns.T.contiguous()


def _time_embedding(t: Tensor, dim: int) -> Tensor:
    """(N,) times in about [0, 1] -> (N, dim) sinusoidal features (frequencies 1 .. 1000)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device))
    angles = t[:, None].float() * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], 1)


class StepCritic(nn.Module):
    """V(x_k, t_k, c): (N, C, H, W) latents, (N,) timesteps and (N, L, D) prompt embeddings -> (N,).

    Args:
        latent_shape: (C, H, W) of the model's latents.
        cond_dim: D, the width of ``cond["prompt_embeds"]``.
        hidden_dims: the MLP's hidden widths.
        time_scale: the timesteps' range (the scheduler's ``num_train_timesteps``; t / time_scale in [0, 1]).
        channels: the convolutions' width.
        time_dim: the width of the time embedding.
    """

    per_step = True  # the family's value loss trains it on every denoising step (objectives.base)

    def __init__(
        self,
        latent_shape: tuple[int, ...],
        cond_dim: int,
        hidden_dims: list[int],
        time_scale: float = 1000.0,
        channels: int = 32,
        time_dim: int = 16,
    ):
        super().__init__()
        from flowrl.models.policy import mlp

        self.time_scale, self.time_dim = float(time_scale), time_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(latent_shape[0], channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = mlp(channels + time_dim + cond_dim, list(hidden_dims), 1)
        last = [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)  # V = 0 at first: the first epoch's advantages are the trajectory's
        nn.init.zeros_(last.bias)

    def forward(self, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor) -> Tensor:
        dtype = next(self.parameters()).dtype
        features = torch.cat(
            [
                self.encoder(latents.to(dtype)),
                _time_embedding(timesteps / self.time_scale, self.time_dim).to(dtype),
                prompt_embeds.to(dtype).mean(1),
            ],
            1,
        )
        return self.head(features).squeeze(-1)

    def chain_values(self, chain: Chain, rows: Tensor | None = None) -> Tensor:
        """(M, K) V(x_k, t_k, c) of every transition's start state of the chain's ``rows`` (all by default)."""
        rows = torch.arange(len(chain), device=chain.latents.device) if rows is None else rows
        states = chain.latents[rows, :-1]  # (M, K, C, H, W)
        M, K = states.shape[:2]
        embeds = chain.cond["prompt_embeds"][rows]  # (M, L, D)
        v = self(
            states.reshape(M * K, *states.shape[2:]),
            chain.timesteps[rows].reshape(-1).to(states.device),
            embeds.repeat_interleave(K, 0),
        )
        return v.view(M, K)

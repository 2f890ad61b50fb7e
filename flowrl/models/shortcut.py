"""Shortcut flow policies: a velocity network that also reads the step size d, so that 1 to 4
Euler steps give good actions (Shortcut Models, Frans et al. 2024, https://arxiv.org/abs/2410.12557;
fine-tuned with ReinFlow, Zhang et al. 2025, https://arxiv.org/abs/2505.22094, whose
``ShortCutFlow`` / ``ShortCutFlowMLP`` / ``PPOShortCut`` this follows).

    B   batch       Ta  action horizon   Da  action dim   To  observation history   Do  observation dim
    t   flow time in [0, 1] (x_0 ~ N(0, I) noise, x_1 the action chunk)     d  step size

Network (ReinFlow's ``ShortCutFlowMLP``, ``embed_combination_type: concate``): t and d go through
one sinusoidal map (t scaled by 100 as in flowrl's flow policy, d unscaled as in ReinFlow), their
embeddings are concatenated and squeezed back by Linear(2E, E) - Mish - Linear(E, E); the velocity
MLP reads [x_t, obs, td_emb]:

    s_theta(x_t, t, d, obs)                                  d = 0: the instantaneous velocity

Pre-training (ReinFlow's ``ShortCutFlow.loss``), one batch of B chunks split in two:

    x_t = (1 - (1 - delta) t) x_0 + t x_1                                   delta = 1e-5
    the first n = int(B f) rows, f = model.shortcut_sc_fraction (ReinFlow's self_consistency_k 0.25):
        j ~ U{0, ..., L - 1}, d = 2^-j                 L = model.shortcut_levels (ReinFlow: M - 1 = 19)
        t ~ U{0, d, 2d, ..., 1 - d}                    (t on the grid of step d)
        target = (s(x_t, t, d/2) + s(x_t + (d/2) s(x_t, t, d/2), t + d/2, d/2)) / 2   (no gradient)
    the other B - n rows (flow matching): t ~ U(0, 1), d = 0, target = x_1 - (1 - delta) x_0
    loss = mean over the batch and the chunk of (s_theta(x_t, t, d) - target)^2

that is the self-consistency s(x_t, t, 2d) = (s(x_t, t, d) + s(x_{t+d}, t + d, d)) / 2 with 2d the
network's step. Fine-tuning: ReinFlow's chain (:class:`~flowrl.samplers.reinflow.ReinFlowSampler`,
its per-step log-probs unchanged) with t_k = k / K and every step at d = 1 / K, which must be on
the grid: K a power of two, at most 2^(L - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowrl.core.seeding import draw_device, randn
from flowrl.errors import ConfigError
from flowrl.models.policy import FlowPolicy, mlp, sinusoidal_embedding


class ShortcutDenoiser(nn.Module):
    """MLP from (x_t (B, Ta, Da), t (B,), d (B,), obs (B, To, Do)) to the (B, Ta, Da) velocity.

    t and d go through one sinusoidal map, at ``time_scale`` x t (100, the flow policy's) and
    ``step_scale`` x d (1, ReinFlow's: the finest bootstrap step 2^-L then embeds next to the
    flow-matching rows' d = 0), then ReinFlow's shortcut squeeze Linear(2E, E) - Mish - Linear(E, E)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        hidden_dims: list[int],
        time_dim: int = 16,
        time_scale: float = 100.0,
        step_scale: float = 1.0,
    ):
        super().__init__()
        self.action_shape = (action_horizon, action_dim)
        self.time_dim, self.time_scale, self.step_scale = time_dim, time_scale, step_scale
        self.td_mlp = nn.Sequential(
            nn.Linear(2 * time_dim, time_dim), nn.Mish(), nn.Linear(time_dim, time_dim)
        )
        in_dim = action_horizon * action_dim + obs_horizon * obs_dim + time_dim
        self.net = mlp(in_dim, hidden_dims, action_horizon * action_dim)

    def forward(self, x: Tensor, t: Tensor, d: Tensor, obs: Tensor) -> Tensor:
        B = x.shape[0]
        emb = [
            sinusoidal_embedding(v.expand(B) * scale, self.time_dim)
            for v, scale in ((t, self.time_scale), (d, self.step_scale))
        ]
        td = self.td_mlp(torch.cat(emb, dim=-1))  # (B, time_dim)
        h = torch.cat([x.reshape(B, -1), obs.reshape(B, -1), td], dim=-1)
        return self.net(h).view(B, *self.action_shape)


class ShortcutFlowPolicy(FlowPolicy):
    """A flow policy whose velocity also reads the step size d (``model.shortcut: true``).

    ``forward(x, t, cond)`` takes d from ``cond["step_size"]`` (B,) when there is one (the ReinFlow
    sampler puts d = 1 / K there) and d = 0, the instantaneous velocity, when not (flow-matching
    losses such as FPO's). Its noise network and fine-tuning are the flow policy's.

    Args (beyond the flow policy's):
        levels: L, the self-consistency targets' d grid {1, 1/2, ..., 2^-(L-1)} (ReinFlow's
            max_denoising_steps M draws d_base = randint(0, M - 1): L = M - 1; its gym configs M = 20).
        sc_fraction: the share of each BC batch given self-consistency targets (ReinFlow: 0.25).
        delta: x_t = (1 - (1 - delta) t) x_0 + t x_1 (ReinFlow: 1e-5).
    """

    kind = "shortcut"
    takes_step_size = True  # the ReinFlow sampler passes d = 1 / K (cond["step_size"])

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        hidden_dims: list[int],
        time_dim: int = 16,
        levels: int = 19,
        sc_fraction: float = 0.25,
        delta: float = 1e-5,
    ):
        if not isinstance(levels, int) or levels < 1:
            raise ConfigError(f"model.shortcut_levels must be an integer >= 1 (ReinFlow: 19), got {levels!r}")
        if not 0 <= sc_fraction < 1:
            raise ConfigError(
                f"model.shortcut_sc_fraction must be in [0, 1) (ReinFlow: 0.25), got {sc_fraction}"
            )
        if not 0 <= delta < 1:
            raise ConfigError(f"model.shortcut_delta must be in [0, 1) (ReinFlow: 1e-5), got {delta}")
        super().__init__(obs_dim, action_dim, obs_horizon, action_horizon, hidden_dims, time_dim)
        self.arch.update(levels=levels, sc_fraction=sc_fraction, delta=delta)
        self.levels, self.sc_fraction, self.delta = levels, sc_fraction, delta
        self.net = ShortcutDenoiser(obs_dim, action_dim, obs_horizon, action_horizon, hidden_dims, time_dim)

    # ------------------------------------------------------------------ the adapter protocol
    def _step_size(self, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        d = cond.get("step_size")
        return torch.zeros(x.shape[0], device=x.device) if d is None else d

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """s_theta(x_t, t, d, obs), d from ``cond["step_size"]`` (0 without one)."""
        return self.net(x, t, self._step_size(x, cond), cond["obs"])

    @torch.no_grad()
    def reference_forward(
        self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0
    ) -> Tensor:
        net = self.net if self.reference is None else self.reference
        return net(x, t, self._step_size(x, cond), cond["obs"])

    def check_num_steps(self, num_steps: int) -> None:
        """K Euler steps run at d = 1 / K: it must be on the self-consistency grid."""
        top = 2 ** (self.levels - 1)
        if num_steps < 1 or num_steps & (num_steps - 1) or num_steps > top:
            grid = ", ".join(str(2**j) for j in range(min(self.levels, 4)))
            raise ConfigError(
                f"sampler.num_steps={num_steps}: a shortcut policy runs every step at d = 1/K, and it was trained "
                f"on d = 1, 1/2, ..., 1/{top} only; set sampler.num_steps to a power of two up to {top} ({grid}, ...)"
            )

    # ------------------------------------------------------------------ pre-training
    def self_consistency_target(self, x_t: Tensor, t: Tensor, d: Tensor, obs: Tensor) -> Tensor:
        """(s(x_t, t, d/2) + s(x_t + (d/2) s(x_t, t, d/2), t + d/2, d/2)) / 2, the target of s(x_t, t, d)."""
        half = d / 2
        with torch.no_grad():
            v1 = self.net(x_t, t, half, obs)
            v2 = self.net(x_t + half.view(-1, 1, 1) * v1, t + half, half, obs)
        return (v1 + v2) / 2

    def shortcut_loss(self, obs: Tensor, x1: Tensor, x0: Tensor, t: Tensor, d: Tensor, n_sc: int) -> Tensor:
        """The loss of a batch whose first ``n_sc`` rows are self-consistency rows at (t, d) and the
        rest flow-matching rows (d = 0), from the noise x0 and the chunks x1."""
        tt = t.view(-1, 1, 1)
        x_t = (1 - (1 - self.delta) * tt) * x0 + tt * x1
        target = torch.cat(
            [
                self.self_consistency_target(x_t[:n_sc], t[:n_sc], d[:n_sc], obs[:n_sc]),
                x1[n_sc:] - (1 - self.delta) * x0[n_sc:],
            ]
        )
        return F.mse_loss(self.net(x_t, t, d, obs), target)

    def draw_shortcut_batch(
        self, actions: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """(x0, t, d, n_sc) of one batch: d = 2^-j, j ~ U{0..L-1}, t on d's grid for the first n_sc
        rows; t ~ U(0, 1), d = 0 for the rest."""
        B, dev = actions.shape[0], actions.device
        n_sc = int(B * self.sc_fraction)
        where = draw_device(generator, dev)
        j = torch.randint(0, self.levels, (n_sc,), generator=generator, device=where).to(dev)
        u = torch.rand((B,), generator=generator, device=where).to(dev)
        x0 = randn(actions.shape, generator, dev)
        sections = torch.pow(2.0, j.float())  # 1 / d
        t_sc = torch.minimum(torch.floor(u[:n_sc] * sections), sections - 1) / sections
        t = torch.cat([t_sc, u[n_sc:]])
        d = torch.cat([1 / sections, torch.zeros(B - n_sc, device=dev)])
        return x0, t, d, n_sc

    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ReinFlow's shortcut loss on normalized (B, To, Do) observations and (B, Ta, Da) actions."""
        x0, t, d, n_sc = self.draw_shortcut_batch(actions, generator)
        return self.shortcut_loss(obs, actions.float(), x0, t, d, n_sc)


def shortcut_kwargs(model_cfg) -> dict:
    """The shortcut policy's arguments beyond the flow policy's, from ``model`` (``flowrl pretrain``)."""
    m = model_cfg
    return {"levels": m.shortcut_levels, "sc_fraction": m.shortcut_sc_fraction, "delta": m.shortcut_delta}

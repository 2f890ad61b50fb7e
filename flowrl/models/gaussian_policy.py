"""Gaussian policies over a robot's MDP action: the Gaussian MLP baseline, residual policies on a
frozen chain, and DSRL's policy over a frozen chain's initial noise.

    B   batch        To  observation history   Do  observation dim
    Ta  action horizon                         Da  action dim

Each is an adapter (a :class:`~flowrl.models.policy.ChunkPolicy`) whose chain, run by
:class:`~flowrl.samplers.gaussian.GaussianChainSampler`, has one Gaussian step (the MDP's only
stochastic step, trained by PPO) and at most one frozen, deterministic step (the pre-trained
diffusion or flow policy run as a black box, part of the environment). ``layout`` names the
steps in order; ``gaussian(x, cond)`` gives the Gaussian step's (mu, sigma, shift, scale):

    z ~ N(mu, sigma^2 I),   x_{k+1} = shift + scale * z,   log pi = log N(z; mu, sigma^2 I)

- :class:`GaussianPolicy` (``gaussian_policy``, DPPO's ``Gaussian_MLP`` with ``learn_fixed_std``;
  Ren et al. 2024's Gaussian baseline): layout (gaussian,); mu = tanh(MLP(s)) (``tanh_mean``),
  sigma = exp(clamp(log sigma, log sigma_min, log sigma_max)) a learned, state-independent std
  per action dimension (shared by the chunk's Ta steps); x_1 = z is the normalized chunk.
- :class:`ResidualPolicy` (``residual_policy``, ResiP: Ankile et al. 2024, arXiv 2407.16677):
  layout (frozen, gaussian); x_1 = base(x_0, s) the frozen chain's chunk (from its own x_0 ~
  N(0, I), or from 0), then r = z ~ N(MLP(s, x_1), sigma^2) and x_2 = x_1 + alpha r (ResiP's
  ``action_scale``); the MLP's last layer starts at zero without a bias (ResiP's
  ``action_head_std`` 0), so the start is the base policy.
- :class:`DSRLPolicy` (``dsrl_policy``, DSRL: Wagenmaker et al. 2025, arXiv 2506.15799): layout
  (gaussian, frozen); u = z ~ N(MLP(s), sigma^2) is the MDP action, w = b tanh(u) the initial
  noise (DSRL's noise action space [-b, b], ``action_magnitude``, squashed as SAC squashes), and
  x_2 = base(w, s) the frozen chain run deterministically (flow ODE / DDIM eta 0). The ratio of
  u equals the ratio of w (tanh is a bijection whose Jacobian does not depend on the weights).
  ``model.dsrl_head: squashed`` is SAC's actor instead, mu(s) and sigma(s) both from the state
  (:mod:`flowrl.models.sac`; DSRL-SAC, :mod:`flowrl.objectives.sac`).

Only the head's parameters train; the base (a BC or fine-tuned diffusion / flow policy) stays as
loaded, and a checkpoint folder holds both (``policy.json`` names the base's own description).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.errors import ConfigError
from flowrl.models.policy import POLICIES, ChunkPolicy, mlp


class GaussianHead(nn.Module):
    """MLP mean (B, in_dim) -> (B, Ta, Da) and a learned log std (Da,), clamped where it is used.

    Args:
        in_dim: the flattened input's width.
        action_shape: (Ta, Da).
        hidden_dims: the MLP's hidden widths (Mish, DPPO's default activation).
        std_init / std_min / std_max: sigma at the start and its bounds (DPPO: 0.1, 0.01, 0.2).
        tanh_mean: squash the mean into [-1, 1] (DPPO's ``tanh_output``).
        last_gain: None for PyTorch's default init of the last layer; a float for an orthogonal
            init with that gain and no bias (ResiP's ``action_head_std``; 0: zero weights).
    """

    def __init__(
        self,
        in_dim: int,
        action_shape: tuple[int, int],
        hidden_dims: list[int],
        std_init: float,
        std_min: float,
        std_max: float,
        tanh_mean: bool = False,
        last_gain: float | None = None,
    ):
        super().__init__()
        if not 0 < std_min <= std_init <= std_max:
            raise ConfigError(
                f"model.gaussian_std_min <= gaussian_std_init <= gaussian_std_max must hold with min > 0, got "
                f"{std_min}, {std_init}, {std_max}; DPPO's are 0.01, 0.1, 0.2"
            )
        self.action_shape = tuple(action_shape)
        self.tanh_mean = tanh_mean
        self.net = mlp(in_dim, hidden_dims, math.prod(self.action_shape))
        if last_gain is not None:
            last = self.net[-1]
            self.net[-1] = nn.Linear(last.in_features, last.out_features, bias=False)
            if last_gain == 0:
                nn.init.zeros_(self.net[-1].weight)
            else:
                nn.init.orthogonal_(self.net[-1].weight, last_gain)
        self.log_std = nn.Parameter(torch.full((self.action_shape[1],), math.log(std_init)))
        self.register_buffer("log_std_min", torch.tensor(math.log(std_min)))
        self.register_buffer("log_std_max", torch.tensor(math.log(std_max)))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(B, in_dim) -> (mu (B, Ta, Da), sigma (B, Ta, Da))."""
        mu = self.net(h).view(h.shape[0], *self.action_shape)
        if self.tanh_mean:
            mu = torch.tanh(mu)
        std = self.log_std.clamp(self.log_std_min, self.log_std_max).exp()  # (Da,)
        return mu, std.expand_as(mu)


def _head_kwargs(arch: dict) -> dict:
    return {k: arch[k] for k in ("std_init", "std_min", "std_max")}


class _HeadPolicy(ChunkPolicy):
    """What the three share: the head is ``net``; forward gives the Gaussian step's mean."""

    kind = "_head"  # replaced by each subclass (and removed from the registry below)
    layout: tuple[str, ...] = ()

    def head_input(self, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return cond["obs"].reshape(cond["obs"].shape[0], -1)

    def gaussian(self, x: Tensor, cond: dict[str, Tensor], reference: bool = False):
        """(mu, sigma, shift, scale) of the Gaussian step from state x (see the module docstring)."""
        head = self.net if (not reference or self.reference is None) else self.reference
        with torch.no_grad() if reference else torch.enable_grad():
            mu, std = head(self.head_input(x, cond))
        return mu, std, None, None

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        return self.gaussian(x, cond)[0]

    @torch.no_grad()
    def reference_forward(self, x, t, cond, guidance_scale: float = 1.0) -> Tensor:
        return self.gaussian(x, cond, reference=True)[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())


class GaussianPolicy(_HeadPolicy):
    """DPPO's Gaussian MLP policy (see the module docstring), pre-trained as DPPO does: the NLL of
    the demonstrated chunk under N(mu(s), std_init^2) (its fixed_std 0.1), i.e. a scaled MSE."""

    kind = "gaussian"
    family = "gaussian_policy"
    layout = ("gaussian",)

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        hidden_dims: list[int],
        std_init: float = 0.1,
        std_min: float = 0.01,
        std_max: float = 0.2,
        tanh_mean: bool = True,
    ):
        super().__init__(
            obs_dim=obs_dim,
            action_dim=action_dim,
            obs_horizon=obs_horizon,
            action_horizon=action_horizon,
            hidden_dims=list(hidden_dims),
            std_init=std_init,
            std_min=std_min,
            std_max=std_max,
            tanh_mean=tanh_mean,
        )
        self.net = GaussianHead(
            obs_horizon * obs_dim, self.action_shape, hidden_dims, std_init, std_min, std_max, tanh_mean
        )

    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """-mean log N(a; mu(s), std_init^2) over the chunk's elements (DPPO's pre-training)."""
        mu, _ = self.net(obs.reshape(obs.shape[0], -1))
        std = torch.full_like(mu, self.arch["std_init"])
        return -gaussian_log_prob(actions.float(), mu, std, "mean").mean()

    @classmethod
    def for_finetuning(cls, cfg, task_name: str, device: torch.device) -> ChunkPolicy:
        """The BC policy (``model.pretrained``, else ``flowrl pretrain``'s folder), or with
        ``model.pretrained: scratch`` a fresh one seeded by train.seed (observations unnormalized,
        actions scaled from the env's bounds): PPO from scratch, DPPO's gym "scratch" baseline."""
        if cfg.model.pretrained != "scratch":
            return super().for_finetuning(cfg, task_name, device)
        import gymnasium as gym

        env = gym.make(cfg.env.id, **cfg.env.kwargs)
        obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
        low, high = env.action_space.low, env.action_space.high
        env.close()
        m = cfg.model
        torch.manual_seed(cfg.train.seed)
        policy = cls(
            obs_dim,
            action_dim,
            cfg.env.obs_horizon,
            m.action_horizon,
            m.hidden_dims,
            m.gaussian_std_init,
            m.gaussian_std_min,
            m.gaussian_std_max,
            m.gaussian_tanh_mean,
        )
        n = policy.normalizer
        n.action_low.copy_(torch.as_tensor(low, dtype=torch.float32))
        n.action_high.copy_(torch.as_tensor(high, dtype=torch.float32))
        return policy.to(device)


def build_base(description: dict) -> ChunkPolicy:
    """A policy from its policy.json description (``kind`` and architecture), weights unset."""
    arch = dict(description)
    kind, noise_net, reference = arch.pop("kind"), arch.pop("noise_net", None), arch.pop("reference", False)
    policy = POLICIES[kind](**arch)
    if noise_net is not None:
        policy.add_noise_net(**noise_net)
    if reference:
        policy.freeze_reference()
    return policy


class _SteeredPolicy(_HeadPolicy):
    """A head on a frozen base policy (``base``, a diffusion or flow policy)."""

    def __init__(
        self,
        base: dict | ChunkPolicy,
        hidden_dims: list[int],
        std_init: float,
        std_min: float,
        std_max: float,
        last_gain: float | None,
        head_in_extra: int = 0,
        **extra,
    ):
        base = build_base(base) if isinstance(base, dict) else base
        if base.family not in ("diffusion_policy", "flow_policy"):
            raise ConfigError(
                f"model.base_family: a {self.family} steers a diffusion_policy or flow_policy, not {base.family}"
            )
        description = {"kind": base.kind, **base.arch}
        super().__init__(
            obs_dim=base.obs_dim,
            action_dim=base.action_dim,
            obs_horizon=base.obs_horizon,
            action_horizon=base.action_horizon,
            base=description,
            hidden_dims=list(hidden_dims),
            std_init=std_init,
            std_min=std_min,
            std_max=std_max,
            **extra,
        )
        self.base = base.requires_grad_(False)
        self.normalizer.load_state_dict(base.normalizer.state_dict())
        in_dim = self.obs_horizon * self.obs_dim + head_in_extra  # + the inputs beyond the observations
        self.net = GaussianHead(
            in_dim, self.action_shape, hidden_dims, std_init, std_min, std_max, last_gain=last_gain
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    def base_noise(self, x: Tensor) -> Tensor:
        """The frozen chain's initial noise, from the state its frozen step starts at."""
        return x

    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise ConfigError(
            f"algorithm.bc_coef: a {self.family} trains a head on a frozen policy, which has no BC loss of its "
            "own; set algorithm.bc_coef=0"
        )

    @classmethod
    def for_finetuning(cls, cfg, task_name: str, device: torch.device) -> ChunkPolicy:
        """The frozen base (``model.pretrained``, else ``flowrl pretrain``'s folder) with a fresh head
        seeded by train.seed."""
        from flowrl.models.policy import load_policy

        m = cfg.model
        folder = Path(m.pretrained) if m.pretrained else cfg.bc_dir(task_name)
        base = load_policy(folder, device)
        if base.family != m.base_family:
            raise ConfigError(
                f"model.pretrained: {folder} holds a {base.family} policy but model.base_family={m.base_family}; "
                f"set model.base_family={base.family}"
            )
        torch.manual_seed(cfg.train.seed)
        return cls.from_base(base, cfg).to(device)


class ResidualPolicy(_SteeredPolicy):
    """ResiP's residual policy on a frozen chain (see the module docstring)."""

    kind = "residual"
    family = "residual_policy"
    layout = ("frozen", "gaussian")

    def __init__(
        self,
        base: dict | ChunkPolicy,
        hidden_dims: list[int],
        std_init: float = math.exp(-1.5),
        std_min: float = 1e-3,
        std_max: float = 1.0,
        scale: float = 0.1,
        base_noise: str = "sampled",
        **_,
    ):
        if scale <= 0:
            raise ConfigError(f"model.residual_scale must be > 0, got {scale}; ResiP's action_scale is 0.1")
        if base_noise not in ("sampled", "zero"):
            raise ConfigError(f"model.base_noise must be sampled or zero, got {base_noise!r}")
        b = build_base(base) if isinstance(base, dict) else base
        extra = b.action_horizon * b.action_dim  # the head also sees the base's chunk
        super().__init__(
            b, hidden_dims, std_init, std_min, std_max, 0.0, extra, scale=scale, base_noise=base_noise
        )
        self.scale, self.noise_mode = scale, base_noise

    @classmethod
    def from_base(cls, base: ChunkPolicy, cfg) -> ResidualPolicy:
        m = cfg.model
        return cls(
            base,
            m.head_hidden_dims,
            m.gaussian_std_init,
            m.gaussian_std_min,
            m.gaussian_std_max,
            m.residual_scale,
            m.base_noise,
        )

    def head_input(self, x: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """(B, To * Do + Ta * Da): the observation history and the base action (ResiP's input)."""
        B = x.shape[0]
        return torch.cat([cond["obs"].reshape(B, -1), x.reshape(B, -1).float()], dim=-1)

    def gaussian(self, x: Tensor, cond: dict[str, Tensor], reference: bool = False):
        mu, std, _, _ = super().gaussian(x, cond, reference)
        return mu, std, x, self.scale

    def base_noise(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x) if self.noise_mode == "zero" else x


class DSRLPolicy(_SteeredPolicy):
    """DSRL's policy over the frozen chain's initial noise (see the module docstring)."""

    kind = "dsrl"
    family = "dsrl_policy"
    layout = ("gaussian", "frozen")

    def __init__(
        self,
        base: dict | ChunkPolicy,
        hidden_dims: list[int],
        std_init: float = 1.0,
        std_min: float = 0.01,
        std_max: float = 2.0,
        noise_bound: float = 1.5,
        head: str = "gaussian",
        **_,
    ):
        if noise_bound <= 0:
            raise ConfigError(
                f"model.dsrl_noise_bound must be > 0, got {noise_bound}; DSRL's action_magnitude is 1.5"
            )
        if head not in ("gaussian", "squashed"):
            raise ConfigError(f"model.dsrl_head must be gaussian or squashed (SAC's actor), got {head!r}")
        super().__init__(
            base, hidden_dims, std_init, std_min, std_max, 0.0, noise_bound=noise_bound, head=head
        )
        self.noise_bound = noise_bound
        if head == "squashed":  # DSRL-SAC's actor (flowrl/models/sac.py): state-dependent std
            from flowrl.models.sac import SquashedGaussianHead

            self.net = SquashedGaussianHead(self.obs_horizon * self.obs_dim, self.action_shape, hidden_dims)
        # DSRL-SAC's warm-up rollouts act with the base policy's own noise, clip(N(0, I), -b, b)
        self.warmup = False

    @classmethod
    def from_base(cls, base: ChunkPolicy, cfg) -> DSRLPolicy:
        m = cfg.model
        return cls(
            base,
            m.head_hidden_dims,
            m.gaussian_std_init,
            m.gaussian_std_min,
            m.gaussian_std_max,
            m.dsrl_noise_bound,
            m.dsrl_head,
        )

    def gaussian(self, x: Tensor, cond: dict[str, Tensor], reference: bool = False):
        if self.warmup:  # u ~ N(0, I)
            zero = torch.zeros(x.shape[0], *self.action_shape, device=x.device)
            return zero, torch.ones_like(zero), None, None
        return super().gaussian(x, cond, reference)

    def base_noise(self, x: Tensor) -> Tensor:
        """w = b tanh(u): the MDP action u squashed into DSRL's noise action space [-b, b] (while
        warming up: w = clip(u, -b, b))."""
        if self.warmup:
            return x.float().clamp(-self.noise_bound, self.noise_bound)
        return self.noise_bound * torch.tanh(x.float())


POLICIES.pop("_head", None)
__all__ = ["DSRLPolicy", "GaussianHead", "GaussianPolicy", "ResidualPolicy", "build_base"]

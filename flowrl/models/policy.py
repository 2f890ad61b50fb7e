"""Robot policies as model adapters: diffusion and flow-matching policies over action chunks,
and the value network of GAE.

    B   batch                 To  observation history   Do  observation dim
    Ta  action horizon        Da  action dim            T   diffusion steps of the DDPM policy

A policy is an adapter like the text-to-image ones (:mod:`flowrl.models.base`), with the same
protocol: ``condition(obs)`` (observation histories in the env's units -> ``{"obs": normalized}``),
``forward(x, t, cond)`` (the network's prediction), ``reference_forward``, the trainable
parameters and their state, ``decode`` (a normalized chunk -> actions in the env's units) and
``save_pretrained_weights``. The samplers and guidance methods run it like any adapter.

Both policies see normalized observations and produce normalized actions in [-1, 1]; the
``Normalizer`` they carry (saved with their weights) maps to and from the environment's units.

- :class:`DiffusionPolicy` (family ``diffusion_policy``) predicts the noise eps (DDPM, Ho et al.
  2020), sampled by :class:`~flowrl.samplers.ddpm_policy.DDPMPolicySampler` (DPPO). For
  fine-tuning it keeps a frozen copy of the pre-trained network (``reference_forward``) for the
  steps that are not tuned.
- :class:`FlowPolicy` (family ``flow_policy``) predicts the rectified-flow velocity (Liu et al.
  2022), sampled by :class:`~flowrl.samplers.reinflow.ReinFlowSampler`; for fine-tuning it gains
  a small noise network whose std is squashed into [min_std, max_std] (ReinFlow).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from flowrl.core.seeding import draw_device, randn
from flowrl.errors import InputError, MissingFileError, load_weights, read_json
from flowrl.samplers.ddpm_policy import cosine_beta_schedule


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) times -> (B, dim) sin/cos features at frequencies 1 ... 1/10000 (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def mlp(in_dim: int, hidden: list[int], out_dim: int, activation: type[nn.Module] = nn.Mish) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), activation()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class Normalizer(nn.Module):
    """Observations to z-scores (clipped to +-10), actions between the env's bounds and [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("action_low", -torch.ones(action_dim))
        self.register_buffer("action_high", torch.ones(action_dim))

    def fit(self, observations: Tensor, action_low: Tensor, action_high: Tensor) -> None:
        """Observation statistics from (N, Do) demonstrations; action bounds from the env's action space."""
        self.obs_mean.copy_(observations.float().mean(0))
        self.obs_std.copy_(observations.float().std(0).clamp(min=1e-3))
        self.action_low.copy_(torch.as_tensor(action_low, dtype=torch.float32))
        self.action_high.copy_(torch.as_tensor(action_high, dtype=torch.float32))

    def normalize_obs(self, obs: Tensor) -> Tensor:
        return ((obs.float() - self.obs_mean) / self.obs_std).clamp(-10, 10)

    def normalize_action(self, action: Tensor) -> Tensor:
        return 2 * (action.float() - self.action_low) / (self.action_high - self.action_low) - 1

    def unnormalize_action(self, action: Tensor) -> Tensor:
        """[-1, 1] -> env units; values outside [-1, 1] are clipped first (the env's bounds)."""
        return self.action_low + (action.clamp(-1, 1) + 1) / 2 * (self.action_high - self.action_low)


class ChunkDenoiser(nn.Module):
    """MLP from (x_t (B, Ta, Da), t (B,), obs (B, To, Do)) to a (B, Ta, Da) prediction.

    ``time_scale`` multiplies t before its sinusoidal embedding (1 for integer DDPM steps, 100
    for flow times in [0, 1])."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        hidden_dims: list[int],
        time_dim: int = 16,
        time_scale: float = 1.0,
    ):
        super().__init__()
        self.action_shape = (action_horizon, action_dim)
        self.time_dim, self.time_scale = time_dim, time_scale
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, 2 * time_dim), nn.Mish(), nn.Linear(2 * time_dim, time_dim)
        )
        in_dim = action_horizon * action_dim + obs_horizon * obs_dim + time_dim
        self.net = mlp(in_dim, hidden_dims, action_horizon * action_dim)

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        B = x.shape[0]
        temb = self.time_mlp(sinusoidal_embedding(t * self.time_scale, self.time_dim))  # (B, time_dim)
        h = torch.cat([x.reshape(B, -1), obs.reshape(B, -1), temb], dim=-1)
        return self.net(h).view(B, *self.action_shape)


class NoiseStdNet(nn.Module):
    """ReinFlow's noise network: (t, obs) -> a per-dimension std in [min_std, max_std], (B, Ta, Da).

    log std = log min_std + (log max_std - log min_std) * (tanh(h) + 1) / 2, so the std stays in
    its bounds whatever the weights (starting in the middle of them on log scale)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        min_std: float,
        max_std: float,
        hidden_dims: list[int],
        time_dim: int = 16,
    ):
        super().__init__()
        if not 0 < min_std <= max_std:
            raise ValueError(
                f"noise std bounds must satisfy 0 < min_std <= max_std, got {min_std}, {max_std}"
            )
        self.action_shape = (action_horizon, action_dim)
        self.time_dim = time_dim
        self.register_buffer("log_min", torch.tensor(math.log(min_std)))
        self.register_buffer("log_max", torch.tensor(math.log(max_std)))
        self.net = mlp(obs_horizon * obs_dim + time_dim, hidden_dims, action_horizon * action_dim, nn.Tanh)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: Tensor, obs: Tensor) -> Tensor:
        B = obs.shape[0]
        h = self.net(torch.cat([obs.reshape(B, -1), sinusoidal_embedding(t * 100, self.time_dim)], dim=-1))
        log_std = self.log_min + (self.log_max - self.log_min) * (torch.tanh(h) + 1) / 2
        return log_std.exp().view(B, *self.action_shape)


class ChunkPolicy(nn.Module):
    """What both policy families share: the adapter protocol, shapes, the normalizer, saving and
    loading.

    Subclasses set ``kind`` (their name in policy.json) and ``family`` (their registry name), and
    implement ``bc_loss(obs, actions)``."""

    kind: str = ""
    family: str = ""
    uses_cfg = False  # no classifier-free guidance: a guidance scale is ignored

    def __init__(self, **arch):
        super().__init__()
        self.arch = dict(arch)  # what rebuilds the module (saved as policy.json)
        self.obs_dim, self.action_dim = arch["obs_dim"], arch["action_dim"]
        self.obs_horizon, self.action_horizon = arch["obs_horizon"], arch["action_horizon"]
        self.action_shape = (self.action_horizon, self.action_dim)
        self.normalizer = Normalizer(self.obs_dim, self.action_dim)
        self.reference: nn.Module | None = None  # the frozen pre-trained network (freeze_reference)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.kind:
            raise TypeError(f"{cls.__name__} must set a class attribute `kind` (its name in policy.json)")
        POLICIES[cls.kind] = cls

    # ------------------------------------------------------------------ the adapter protocol
    @property
    def device(self) -> torch.device:
        return self.normalizer.obs_mean.device

    @property
    def latent_shape(self) -> tuple[int, int]:
        return tuple(self.action_shape)

    @property
    def trainable_module(self) -> nn.Module:
        """The module that holds every trained parameter (what accelerate prepares): the policy."""
        return self

    def enable_gradient_checkpointing(self) -> None:
        from flowrl.errors import ConfigError

        raise ConfigError(
            "train.gradient_checkpointing: policy MLPs are small; set train.gradient_checkpointing=false"
        )

    def compile_network(self) -> None:
        self.net.compile(dynamic=False)

    def condition(self, obs, guidance_scale: float = 1.0) -> dict[str, Tensor]:
        """``{"obs": (B, To, Do)}`` normalized, from observation histories in the env's units (a
        (B, To, Do) tensor or array, or a list of (To, Do))."""
        if isinstance(obs, (list, tuple)):
            obs = torch.stack([torch.as_tensor(o) for o in obs])
        return {"obs": self.normalizer.normalize_obs(torch.as_tensor(obs, device=self.device))}

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        """The network's prediction (eps or velocity) at x_t (B, Ta, Da), t (B,), ``cond["obs"]``."""
        return self.net(x, t, cond["obs"])

    @property
    def has_reference(self) -> bool:
        """Whether a frozen copy of the pre-trained network is kept (``freeze_reference``)."""
        return self.reference is not None

    @torch.no_grad()
    def reference_forward(
        self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0
    ) -> Tensor:
        """The frozen pre-trained network's prediction (the trained one until :meth:`freeze_reference`)."""
        return (self.net if self.reference is None else self.reference)(x, t, cond["obs"])

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current network: the reference policy (KL, RL guidance's
        base, the steps DPPO does not fine-tune)."""
        self.reference = copy.deepcopy(self.net).requires_grad_(False)
        self.arch["reference"] = True

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything that restores the policy: weights, the normalizer, the frozen copy, the noise network."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state)

    def decode_latents(self, x: Tensor) -> Tensor:
        """A normalized chunk (B, Ta, Da) -> actions in the env's units, clipped to its bounds (differentiable)."""
        return self.normalizer.unnormalize_action(x)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.decode_latents(x)

    def save_pretrained_weights(self, folder: str | os.PathLike) -> None:
        """A checkpoint's policy files: ``policy.safetensors`` + ``policy.json``, loadable by :func:`load_policy`."""
        self.save(folder)

    @classmethod
    def for_finetuning(cls, cfg, task_name: str, device: torch.device) -> ChunkPolicy:
        """The pre-trained policy a task fine-tunes (``model.pretrained``, else the folder
        ``flowrl pretrain`` writes), prepared for the task's sampler by :meth:`prepare`."""
        folder = Path(cfg.model.pretrained) if cfg.model.pretrained else cfg.bc_dir(task_name)
        policy = load_policy(folder, device)
        if not isinstance(policy, cls):
            from flowrl.errors import ConfigError

            raise ConfigError(
                f"model.pretrained: {folder} holds a {policy.family} policy but model.family={cls.family}; "
                f"set model.family={policy.family} (or auto)"
            )
        policy.prepare(cfg)
        return policy

    def prepare(self, cfg) -> None:
        """Whatever fine-tuning with the task's sampler needs beyond the pre-trained weights."""

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike) -> None:
        """``policy.safetensors`` (all weights and normalizer) and ``policy.json`` (kind and shapes)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # each file is written under a temporary name and renamed: a crash leaves the old one whole
        tmp = folder / f".tmp-policy-{os.getpid()}"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / "policy.safetensors")
        tmp.write_text(json.dumps({"kind": self.kind, **self.arch}, indent=2))
        os.replace(tmp, folder / "policy.json")


POLICIES: dict[str, type[ChunkPolicy]] = {}


def load_policy(folder: str | os.PathLike, device: str | torch.device = "cpu") -> ChunkPolicy:
    """Rebuild a policy saved by :meth:`ChunkPolicy.save`: the BC folder, or a fine-tuning checkpoint
    folder (which also holds the noise network or the frozen reference)."""
    folder = Path(folder)
    if not (folder / "policy.json").is_file():
        raise MissingFileError(
            f"{folder} holds no pre-trained policy (policy.json); run `flowrl pretrain <task>` first"
        )
    arch = read_json(folder / "policy.json", "policy file")
    if not isinstance(arch, dict):
        raise InputError(
            f"{folder}/policy.json is not a policy description (a JSON object); save it with policy.save"
        )
    kind, noise_net, reference = (
        arch.pop("kind", None),
        arch.pop("noise_net", None),
        arch.pop("reference", False),
    )
    import flowrl.models.gaussian_policy  # noqa: F401  (registers the Gaussian heads' kinds)
    import flowrl.models.shortcut  # noqa: F401  (registers the shortcut flow policy's kind)

    if kind not in POLICIES:
        raise InputError(f"{folder}/policy.json: unknown policy kind {kind!r}; known: {sorted(POLICIES)}")
    weights = load_weights(folder / "policy.safetensors", "policy weights")
    try:
        policy = POLICIES[kind](**arch)
        if noise_net is not None:  # a ReinFlow-fine-tuned flow policy
            policy.add_noise_net(**noise_net)
        if reference:  # a DPPO-fine-tuned diffusion policy: its frozen pre-trained network
            policy.freeze_reference()
        policy.load_state_dict(weights)
    except (TypeError, RuntimeError) as e:  # arguments or tensors that do not fit
        raise InputError(
            f"policy folder {folder}: policy.json and policy.safetensors do not fit each other or flowrl's "
            f"{kind} policy ({type(e).__name__}: {str(e).splitlines()[0]}); save it again with flowrl pretrain"
        ) from None
    return policy.to(device)


class DiffusionPolicy(ChunkPolicy):
    """eps-prediction DDPM policy over T steps (cosine schedule), pre-trained with the DDPM loss
    ||eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, s)||^2 (Ho et al. 2020, eq. 14)."""

    kind = "diffusion"
    family = "diffusion_policy"

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        hidden_dims: list[int],
        time_dim: int = 16,
        num_train_steps: int = 20,
    ):
        super().__init__(
            obs_dim=obs_dim,
            action_dim=action_dim,
            obs_horizon=obs_horizon,
            action_horizon=action_horizon,
            hidden_dims=list(hidden_dims),
            time_dim=time_dim,
            num_train_steps=num_train_steps,
        )
        self.num_train_steps = num_train_steps
        self.net = ChunkDenoiser(obs_dim, action_dim, obs_horizon, action_horizon, hidden_dims, time_dim)
        self.register_buffer(
            "alphas_cumprod", torch.cumprod(1 - cosine_beta_schedule(num_train_steps), 0).float()
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def prepare(self, cfg) -> None:
        """DPPO runs the first T - K steps on the frozen pre-trained network: keep a copy of it."""
        self.freeze_reference()

    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The DDPM loss on normalized (B, To, Do) observations and (B, Ta, Da) actions."""
        B = actions.shape[0]
        where = draw_device(generator, actions.device)
        t = torch.randint(0, self.num_train_steps, (B,), generator=generator, device=where).to(actions.device)
        eps = randn(actions.shape, generator, actions.device)
        a = self.alphas_cumprod[t].view(B, 1, 1)
        x_t = a.sqrt() * actions + (1 - a).sqrt() * eps
        return F.mse_loss(self.net(x_t, t, obs), eps)


class FlowPolicy(ChunkPolicy):
    """Rectified-flow policy, pre-trained with ||(x_1 - x_0) - v_theta(t x_1 + (1 - t) x_0, t, s)||^2
    for x_0 ~ N(0, I), x_1 the demonstrated chunk, t ~ U(0, 1) (Liu et al. 2022, eq. 1)."""

    kind = "flow"
    family = "flow_policy"

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        obs_horizon: int,
        action_horizon: int,
        hidden_dims: list[int],
        time_dim: int = 16,
    ):
        super().__init__(
            obs_dim=obs_dim,
            action_dim=action_dim,
            obs_horizon=obs_horizon,
            action_horizon=action_horizon,
            hidden_dims=list(hidden_dims),
            time_dim=time_dim,
        )
        self.net = ChunkDenoiser(
            obs_dim, action_dim, obs_horizon, action_horizon, hidden_dims, time_dim, time_scale=100.0
        )
        self.noise_net: NoiseStdNet | None = None

    def add_noise_net(self, min_std: float, max_std: float, hidden_dims: list[int]) -> None:
        """Give the policy ReinFlow's noise network (before fine-tuning)."""
        self.noise_net = NoiseStdNet(
            self.obs_dim,
            self.action_dim,
            self.obs_horizon,
            self.action_horizon,
            min_std,
            max_std,
            hidden_dims,
        ).to(self.normalizer.obs_mean.device)
        self.arch["noise_net"] = {"min_std": min_std, "max_std": max_std, "hidden_dims": list(hidden_dims)}

    def prepare(self, cfg) -> None:
        """ReinFlow learns the std of every step: a noise network, its weights seeded by train.seed."""
        s = cfg.sampler
        if s.name in ("reinflow", "flow_noise") and self.noise_net is None:
            torch.manual_seed(cfg.train.seed)
            self.add_noise_net(s.noise_min_std, s.noise_max_std, s.noise_hidden_dims)

    def noise_std(self, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """sigma_theta'(t, s), (B, Ta, Da), from the noise network."""
        if self.noise_net is None:
            raise RuntimeError(
                "this flow policy has no noise network; call add_noise_net(min_std, max_std, hidden)"
            )
        return self.noise_net(t, cond["obs"])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters()) + (list(self.noise_net.parameters()) if self.noise_net else [])

    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The flow-matching loss on normalized (B, To, Do) observations and (B, Ta, Da) actions."""
        B = actions.shape[0]
        where = draw_device(generator, actions.device)
        t = torch.rand((B,), generator=generator, device=where).to(actions.device)
        x0 = randn(actions.shape, generator, actions.device)
        tt = t.view(B, 1, 1)
        x_t = tt * actions + (1 - tt) * x0
        return F.mse_loss(self.net(x_t, t, obs), actions - x0)


class ValueNet(nn.Module):
    """V(s) on the normalized, flattened observation history: (B, To, Do) -> (B,)."""

    def __init__(self, obs_dim: int, obs_horizon: int, hidden_dims: list[int]):
        super().__init__()
        self.net = mlp(obs_dim * obs_horizon, hidden_dims, 1)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs.reshape(obs.shape[0], -1)).squeeze(-1)

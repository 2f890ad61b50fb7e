"""A policy over the initial noise x_T of a frozen denoiser (FIND, Chen et al. 2024, arXiv 2407.19453).

    B  samples    event  the latent's shape (C, H, W)    D  the prompt embedding's width

The chain's first state is drawn from a trainable Gaussian instead of N(0, I):

    z ~ N(0, I)                         (the same draw the frozen chain would start from)
    x_T = mu_phi(c) + sigma_phi(c) * z  so  log pi_phi(x_T | c) = log N(x_T; mu_phi(c), sigma_phi(c)^2 I)

exactly, elementwise then reduced over the event like every log-prob in flowrl. Everything after
x_T is the frozen denoiser's chain; only phi trains (:mod:`flowrl.objectives.find`).

Parameterizations (``model.noise_policy``):

    free         mu and sigma are parameters of the latent's shape, mu = 0 and sigma = 1 at the
                 start, one distribution for every prompt; sigma is clamped to >= 1e-4 where it is
                 used. This is FIND's code (``MyModel`` in dist_train2.py of github.com/vpx-ecnu/FIND,
                 which trains one prompt per run and clamps the std parameter after each step).
    conditional  mu_phi(c), log sigma_phi(c) = a 2-layer MLP (SiLU) on the prompt embedding's mean
                 over tokens, its last layer zero, so the start is N(0, I) for every prompt: one
                 run for many prompts (flowrl's addition; the paper's distribution is per prompt).

At the start (mu = 0, sigma = 1) x_T is the frozen chain's own z, so the evaluation before
training is the pretrained model's. :class:`NoisePolicyAdapter` puts the policy in front of a
frozen adapter: the samplers draw x_T from it (``ChainSampler.sample``), the optimizer, the
checkpoint and EMA see only its parameters, and ``save_pretrained_weights`` writes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import randn

NOISE_POLICIES = ("free", "conditional")
MIN_STD = 1e-4  # FIND's check_std clamp
HIDDEN = 256


class NoisePolicy(nn.Module):
    """The Gaussian over x_T (see the module docstring).

    Args:
        kind: ``free`` or ``conditional``.
        latent_shape: the event (C, H, W) of x_T.
        embed_dim: D, the prompt embedding's width (``conditional``).
    """

    def __init__(self, kind: str, latent_shape: tuple[int, ...], embed_dim: int | None = None):
        super().__init__()
        if kind not in NOISE_POLICIES:
            raise ValueError(f"model.noise_policy must be one of {NOISE_POLICIES} or null, got {kind!r}")
        self.kind, self.latent_shape = kind, tuple(latent_shape)
        n = math.prod(self.latent_shape)
        if kind == "free":
            self.mean = nn.Parameter(torch.zeros(1, *self.latent_shape))
            self.std = nn.Parameter(torch.ones(1, *self.latent_shape))
        else:
            if embed_dim is None:
                raise ValueError("a conditional noise policy needs the prompt embedding's width")
            self.net = nn.Sequential(nn.Linear(embed_dim, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, 2 * n))
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)

    def distribution(self, cond: dict[str, Tensor], batch: int) -> tuple[Tensor, Tensor]:
        """(mu, sigma), each (B, *event) float32, for the prompts in ``cond``."""
        if self.kind == "free":
            mu, std = self.mean, self.std.clamp(min=MIN_STD)
            return mu.expand(batch, *self.latent_shape), std.expand(batch, *self.latent_shape)
        if "prompt_embeds" not in cond:
            raise ValueError(
                "model.noise_policy=conditional reads the prompt embeddings (cond['prompt_embeds']), which this "
                "model's condition lacks; use model.noise_policy=free"
            )
        h = cond["prompt_embeds"].float().mean(dim=1)  # (B, D)
        out = self.net(h).view(batch, 2, *self.latent_shape)
        return out[:, 0], out[:, 1].exp().clamp(min=MIN_STD)

    @torch.no_grad()
    def sample(self, cond: dict[str, Tensor], batch: int, generator, device) -> Tensor:
        """(B, *event) x_T = mu + sigma * z with z ~ N(0, I) drawn from ``generator``."""
        z = randn((batch, *self.latent_shape), generator, device)
        mu, std = self.distribution(cond, batch)
        return mu + std * z

    def log_prob(self, x: Tensor, cond: dict[str, Tensor], reduction: str = "mean") -> Tensor:
        """(B,) log N(x_T; mu_phi(c), sigma_phi(c)^2 I), differentiable in phi."""
        mu, std = self.distribution(cond, x.shape[0])
        return gaussian_log_prob(x.float().detach(), mu, std, reduction)

    def config(self) -> dict:
        return {"kind": self.kind, "latent_shape": list(self.latent_shape)}


class NoisePolicyAdapter(nn.Module):
    """A frozen model adapter with a trainable :class:`NoisePolicy` in front of its chain.

    It answers the adapter protocol by delegating to ``base`` (any attribute it does not define
    is the base adapter's), except what training touches: ``trainable_parameters``,
    ``trainable_module``, ``trainable_state_dict`` / ``load_trainable_state_dict`` (the policy's,
    under ``noise_policy.``) and ``save_pretrained_weights`` (``noise_policy.safetensors`` and
    ``noise_policy.json``: the denoiser is the unchanged pretrained one)."""

    def __init__(self, base: nn.Module, kind: str):
        super().__init__()
        if any(p.requires_grad for p in base.parameters()):
            raise ValueError(
                "a noise policy trains in front of a frozen denoiser: build the adapter with finetune=frozen"
            )
        self.base = base
        embed_dim = None
        if kind == "conditional":  # the width of the prompt embeddings the condition holds
            embed_dim = base.condition([""], 1.0).get("prompt_embeds", torch.zeros(1, 1, 1)).shape[-1]
        self.noise_policy = NoisePolicy(kind, base.latent_shape, embed_dim).to(base.device)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["base"], name)

    def forward(self, latents, timesteps, cond, guidance_scale: float = 1.0):
        return self.base(latents, timesteps, cond, guidance_scale)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.noise_policy.parameters())

    @property
    def trainable_module(self) -> nn.Module:
        return self.noise_policy

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {f"noise_policy.{n}": p.detach() for n, p in self.noise_policy.named_parameters()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        own = self.trainable_state_dict()
        if set(state) != set(own):
            raise KeyError(
                f"checkpoint does not match the noise policy: expected {sorted(own)[:3]}, got {sorted(state)[:3]}. "
                "Was it written with the same model.noise_policy?"
            )
        with torch.no_grad():
            params = dict(self.noise_policy.named_parameters())
            for n, t in state.items():
                params[n.removeprefix("noise_policy.")].copy_(t)

    def save_pretrained_weights(self, folder) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in self.noise_policy.named_parameters()}
        save_file(state, str(folder / "noise_policy.safetensors"))
        (folder / "noise_policy.json").write_text(json.dumps(self.noise_policy.config()))

    @property
    def device(self) -> torch.device:
        return self.base.device


def load_noise_policy(folder, device="cpu") -> NoisePolicy:
    """The noise policy ``save_pretrained_weights`` wrote to ``folder`` (for sampling without flowrl's
    trainer: x_T = policy.sample(cond, B, generator, device), then the pipeline's ``latents=``).
    A conditional policy needs the prompt embedding's width, read from its first layer."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "noise_policy.json").read_text())
    state = load_file(str(folder / "noise_policy.safetensors"))
    embed_dim = state["net.0.weight"].shape[1] if meta["kind"] == "conditional" else None
    policy = NoisePolicy(meta["kind"], tuple(meta["latent_shape"]), embed_dim)
    policy.load_state_dict(state)
    return policy.to(device)

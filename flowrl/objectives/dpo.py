"""Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908; reference: github.com/SalesforceAIResearch/DiffusionDPO, train.py):
offline training from preference pairs (``train.pairs``, :mod:`flowrl.data.pairs`).

    M  pairs of the minibatch   x_w, x_l  the chosen and rejected images' latents   c  the prompt

Each pair gets one timestep t and one noise eps, the same for both images (the reference's
``timesteps.chunk(2)[0].repeat(2)``); with the forward process x_t = sqrt(a_t) x + sqrt(1 - a_t) eps
and the network's own target (eps for an eps-model, v for a v-model):

    l_theta(x) = mean_dims (net_theta(x_t, t, c) - target)^2          (the reference's model_losses)
    d          = (l_theta(x_w) - l_theta(x_l)) - (l_ref(x_w) - l_ref(x_l))
    inside     = -0.5 * beta * d                                      (the implicit reward margin)
    loss       = mean_M -log sigmoid(inside)

The reference policy is the model the run starts from: the denoiser with its LoRA adapter
disabled, or, with ``model.finetune=full``, a frozen copy of it (the reference's ``ref_unet``).
At the start they are equal, so d = 0 and the loss is log 2. Logged as the reference does:
``implicit_acc`` (the fraction of pairs with inside > 0), ``model_mse`` (0.5 (mean l_theta(x_w) +
mean l_theta(x_l))), ``ref_mse`` (mean of both reference losses), and ``dpo_margin`` (mean inside).

``dpo_timesteps``: ``train`` draws t uniformly from the model's training timesteps {0..T-1}, as
the reference (a DDIM-family model); ``sampler`` draws the step k uniformly over the run
sampler's K steps and noises to its level (any sampler with a denoising loss, flow models too).
No classifier-free guidance in the loss (the reference's conditional forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core import seeding
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective


@dataclass
class DPOOptions:
    # the DPO temperature beta (Diffusion-DPO's beta_dpo: 5000 for SD1.5 and SDXL)
    beta_dpo: float = 5000.0
    # where t is drawn: train (uniform over the model's training timesteps, the reference) | sampler
    # (uniform over the sampler's steps: any sampler with a denoising loss, flow models too)
    dpo_timesteps: str = "train"


class _Reference:
    """The adapter seen through its reference policy (LoRA disabled, or the frozen copy): what a
    sampler's ``denoising_loss`` calls as the model."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, x, t, cond, guidance_scale=1.0):
        return self.adapter.reference_forward(x, t, cond, guidance_scale)


def forward_process(adapter, sampler, where: str):
    """The sampler whose ``denoising_loss`` noises to t: the run's, or a DDIM over all T training
    timesteps (k = T - 1 - t, so k uniform is t uniform over {0..T-1})."""
    if where == "sampler":
        return sampler
    from flowrl.samplers.ddim import DDIMSampler

    config = dict(adapter.scheduler_config)
    T = int(config.get("num_train_timesteps", 1000))
    config.update(steps_offset=0, timestep_spacing="leading")
    return DDIMSampler(config, num_steps=T, eta=0.0)


def dpo_terms(mse_w: Tensor, mse_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> dict[str, Tensor]:
    """The Diffusion-DPO loss and the reference's diagnostics from the four (M,) losses."""
    inside = -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))
    loss = -F.logsigmoid(inside).mean()
    return {
        "loss": loss,
        "loss_dpo": loss.detach(),
        "implicit_acc": (inside > 0).float().mean().detach(),
        "dpo_margin": inside.mean().detach(),
        "model_mse": (0.5 * (mse_w.mean() + mse_l.mean())).detach(),
        "ref_mse": (0.5 * (ref_w.mean() + ref_l.mean())).detach(),
    }


class DiffusionDPO(Objective):
    """Diffusion-DPO on preference pairs (see the module docstring)."""

    Options = DPOOptions
    needs_log_probs = False

    def __init__(self, cfg, adapter, sampler, value=None, demonstrations=None, reward=None):
        super().__init__(cfg, adapter, sampler, value, demonstrations, reward)
        self.process = forward_process(adapter, sampler, self.options.dpo_timesteps)

    @classmethod
    def keeps_reference(cls, cfg) -> bool:
        return True  # the reference's denoising losses of both images, always

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.algorithm.options
        if not cfg.train.pairs:
            raise ConfigError(
                "algorithm.name=dpo trains on preference pairs from a file: set train.pairs=path/to/pairs.jsonl "
                '(one {"prompt", "chosen", "rejected"} per line, see flowrl.data.pairs)'
            )
        if not o.beta_dpo > 0:
            raise ConfigError(f"algorithm.beta_dpo must be > 0, got {o.beta_dpo}; Diffusion-DPO uses 5000")
        if o.dpo_timesteps not in ("train", "sampler"):
            raise ConfigError(f"algorithm.dpo_timesteps must be train or sampler, got {o.dpo_timesteps!r}")
        if cfg.sampler.name in ("lcm", "reinflow"):
            raise ConfigError(
                f"Diffusion-DPO trains the model's denoising loss, which sampler {cfg.sampler.name!r} does not define; "
                "use a ddim or flow sampler"
            )
        if o.dpo_timesteps == "train" and cfg.sampler.name not in (None, "ddim"):
            raise ConfigError(
                "algorithm.dpo_timesteps=train draws t over a diffusion model's training timesteps; with sampler "
                f"{cfg.sampler.name!r} set algorithm.dpo_timesteps=sampler"
            )

    @property
    def steps(self) -> str:
        return "none"

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        device = chain.latents.device
        rows = mb.rows.to(device, non_blocking=True)
        x_w, x_l = chain.latents[rows, -1], chain.metadata["rejected"][rows]
        cond = {n: v[rows] for n, v in chain.cond.items()}
        M = len(rows)
        k = torch.randint(0, self.process.num_steps, (M,), generator=generator)  # CPU, like every step index
        noise = seeding.randn(tuple(x_w.shape), generator, device)
        # one forward for both images: the same t and noise, the prompt twice
        x = torch.cat([x_w, x_l])
        both = {n: torch.cat([v, v]) for n, v in cond.items()}
        kk, nn = torch.cat([k, k]), torch.cat([noise, noise])
        mse = self.process.denoising_loss(self.adapter, x, both, kk, nn, 1.0, target="model")
        with torch.no_grad():
            ref = self.process.denoising_loss(_Reference(self.adapter), x, both, kk, nn, 1.0, target="model")
        return dpo_terms(mse[:M], mse[M:], ref[:M], ref[M:], self.options.beta_dpo)

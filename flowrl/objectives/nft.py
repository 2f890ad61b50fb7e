"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", arXiv 2509.16117; reference: github.com/NVlabs/DiffusionNFT, scripts/train_nft_sd3.py):
negative-aware fine-tuning on the forward process of a flow model. Likelihood-free (only the final
samples x0 are kept), CFG-free, any sampler (the reference samples with a deterministic solver).

    M  rows of the minibatch   K  sampler steps   Kt = int(timestep_fraction x K) steps per sample

The *old* policy v_old is a float32 copy of the trained weights. It draws the epoch's samples
and is the anchor of the loss; after each epoch (before the next one samples) it moves toward the
trained weights, old <- d old + (1 - d) theta, with d = decay(s) of the optimizer steps s so far
(``old_decay_type`` 1: min(0.001 s, 0.5); 2: 0 below s = 75, then min(0.0075 (s - 75), 0.999);
0: d = 0). With A the advantage clipped to [-C, C] (C = adv_clip_max; group mean, batch std):

    r  = clamp(A / C / 2 + 1/2, 0, 1)                               optimality probability
    x_t = (1 - t) x0 + t eps,  t = sigma_k,  k: Kt distinct steps of the schedule per sample
    v+ = (1 - beta) v_old + beta v_theta      v- = (1 + beta) v_old - beta v_theta      (implicit policies)
    x0+- = x_t - t v+-,  w+- = sg(mean |x0+- - x0|) clipped >= 1e-5                    (adaptive weight)
    l+- = mean (x0+- - x0)^2 / w+-        (``nft_weighting: velocity``: mean (v+- - (eps - x0))^2)
    loss = C / beta * mean_{rows, steps} [ r l+ + (1 - r) l- ]  +  kl_coef * mean (v_theta - v_ref)^2

with v_ref the reference (LoRA off, or a frozen copy). At v_theta = v_old (the first epoch's
first step with d = 0, or beta -> 0) v+ = v- = v_old. ``prepare`` draws the (step, noise) pairs
and evaluates v_old (and v_ref) once per epoch, so the update passes need one forward each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core import seeding
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective

ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


@dataclass
class NFTOptions:
    # beta: how far the implicit positive/negative policies move with v_theta (reference: 1.0; 0.1 for OCR, multi-reward)
    nft_beta: float = 1.0
    # KL weight toward the reference model, kl_coef * mean (v_theta - v_ref)^2 (reference: train.beta 1e-4)
    kl_coef: float = 1.0e-4
    # Kt = int(timestep_fraction x K) distinct sampler steps per sample, each with fresh noise (reference: 0.99, 9 of 10)
    timestep_fraction: float = 0.99
    # adaptive: x0-space error over its detached mean |error| (reference); velocity: plain ||v -+ (eps - x0)||^2
    nft_weighting: str = "adaptive"
    # old policy's decay schedule over optimizer steps s: 0: none; 1: min(0.001 s, 0.5) (reference); 2: after 75, 0.0075/step to 0.999 (OCR)
    old_decay_type: int = 1
    # how advantages enter r: all (reference) | positive_only | negative_only | one_only (1 if A > 0) | binary (sign A)
    nft_adv_mode: str = "all"


def old_decay(step: int, decay_type: int) -> float:
    """The reference's ``return_decay``: the old policy's EMA decay after ``step`` optimizer steps."""
    flat, rate, hold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, hold)


def optimality(adv: Tensor, clip: float, mode: str = "all") -> Tensor:
    """r in [0, 1] from advantages clipped to [-clip, clip], as the reference maps them."""
    a = adv.clamp(-clip, clip)
    if mode == "positive_only":
        a = a.clamp(0, clip)
    elif mode == "negative_only":
        a = a.clamp(-clip, 0)
    elif mode == "one_only":
        a = (a > 0).to(a.dtype)
    elif mode == "binary":
        a = torch.sign(a)
    return (a / clip / 2.0 + 0.5).clamp(0, 1)


class NFT(Objective):
    """DiffusionNFT (see the module docstring)."""

    Options = NFTOptions
    needs_log_probs = False

    def __init__(self, cfg, adapter, sampler, value=None, demonstrations=None, reward=None):
        super().__init__(cfg, adapter, sampler, value, demonstrations, reward)
        self.old = {k: v.detach().clone().float() for k, v in adapter.trainable_state_dict().items()}

    @classmethod
    def keeps_reference(cls, cfg) -> bool:
        return cfg.algorithm.options.kl_coef > 0  # v_ref of the KL term

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.algorithm.options
        if not o.nft_beta > 0:
            raise ConfigError(
                f"algorithm.nft_beta must be > 0, got {o.nft_beta}: the loss divides by it; DiffusionNFT uses 1.0"
            )
        if o.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef must be >= 0, got {o.kl_coef}; DiffusionNFT uses 1e-4")
        if not 0 < o.timestep_fraction <= 1:
            raise ConfigError(
                f"algorithm.timestep_fraction must be in (0, 1], got {o.timestep_fraction}; DiffusionNFT uses 0.99"
            )
        for key, allowed in (("nft_weighting", ("adaptive", "velocity")), ("nft_adv_mode", ADV_MODES)):
            if getattr(o, key) not in allowed:
                raise ConfigError(f"algorithm.{key} must be one of {list(allowed)}, got {getattr(o, key)!r}")
        if o.old_decay_type not in (0, 1, 2):
            raise ConfigError(
                f"algorithm.old_decay_type must be 0, 1 or 2, got {o.old_decay_type}; DiffusionNFT uses 1 (2 for OCR)"
            )
        if not cfg.sampler.name.startswith("flow_"):
            raise ConfigError(
                f"algorithm.name={cfg.algorithm.name} trains a flow model's velocity on its forward process, and "
                f"sampler.name={cfg.sampler.name} is not a flow chain; use sampler.name=flow_sde (noise_level 0: the ODE)"
            )
        if cfg.train.minibatch_unit != "trajectory":
            raise ConfigError("DiffusionNFT trains on whole samples: set train.minibatch_unit=trajectory")

    @property
    def steps(self) -> str:
        return "none"

    # ------------------------------------------------------------------ the old policy
    def state_dict(self) -> dict[str, Tensor]:
        return {f"old.{k}": v for k, v in self.old.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        old = {k[4:]: v.detach().clone().float() for k, v in state.items() if k.startswith("old.")}
        if old.keys() != self.old.keys():
            raise ConfigError(
                "the checkpoint has no DiffusionNFT old policy matching this model (written by another method, "
                "or another model.finetune / lora_rank); resume it with the method that wrote it"
            )
        self.old = {k: v.to(self.old[k].device) for k, v in old.items()}

    @contextlib.contextmanager
    def old_weights(self):
        """Context in which the adapter's trained parameters hold the old policy."""
        backup = {k: v.clone() for k, v in self.adapter.trainable_state_dict().items()}
        self.adapter.load_trainable_state_dict(self.old)
        try:
            yield
        finally:
            self.adapter.load_trainable_state_dict(backup)

    @torch.no_grad()
    def update_old(self, global_step: int) -> float:
        """old <- d old + (1 - d) theta (the reference's end-of-epoch update); returns d."""
        d = old_decay(global_step, self.options.old_decay_type)
        for k, v in self.adapter.trainable_state_dict().items():
            self.old[k] = self.old[k] * d + v.detach().float() * (1.0 - d)
        return d

    def sampling(self, epoch: int, global_step: int):
        """Epoch ``epoch`` samples with the old policy, moved first by the epochs before it (done
        here rather than at the end of an update, so a resumed run repeats it exactly)."""
        if epoch > 0:
            self.update_old(global_step)
        return self.old_weights()

    # ------------------------------------------------------------------ the loss
    def _noised(self, chain: Chain, rows: Tensor, k: Tensor, noise: Tensor):
        """x0 (M*Kt, ...), x_t, t (M*Kt, 1, ...) and the conditions, for the rows' (step, noise) pairs."""
        M, Kt = k.shape
        x0 = chain.latents[rows, -1].float().repeat_interleave(Kt, 0)
        eps = noise.reshape(M * Kt, *noise.shape[2:]).float()
        shape = (-1,) + (1,) * (x0.ndim - 1)
        t = self.sampler.sigmas[k.reshape(-1).cpu()].to(x0.device).view(shape)
        cond = {n: v[rows].repeat_interleave(Kt, 0) for n, v in chain.cond.items()}
        return x0, eps, (1 - t) * x0 + t * eps, t, cond

    def _predict(self, chain, x_t, k, cond, reference=False) -> Tensor:
        return self.sampler.predict(
            self.adapter, x_t, k.reshape(-1), cond, chain.guidance_scale, reference=reference
        ).float()

    @torch.no_grad()
    def prepare(self, chain: Chain, epoch: int, generator: torch.Generator) -> None:
        """Draw each sample's Kt distinct steps and their noise; evaluate v_old (and v_ref) there."""
        B, K, device = len(chain), self.sampler.num_steps, chain.latents.device
        Kt = max(1, int(self.options.timestep_fraction * K))
        k = torch.argsort(torch.rand(B, K, generator=generator), dim=1)[:, :Kt]  # a random subset per row
        noise = seeding.randn((B, Kt, *chain.latents.shape[2:]), generator, device)
        v_old = torch.empty(noise.shape, device=device)
        v_ref = torch.empty(noise.shape, device=device) if self.options.kl_coef > 0 else None
        size = self.cfg.train.minibatch_size

        def fill(out: Tensor, reference: bool) -> None:
            for i in range(0, B, size):
                rows = torch.arange(i, min(i + size, B))
                on = rows.to(device)
                _, _, x_t, _, cond = self._noised(chain, on, k[rows], noise[on])
                out[on] = self._predict(chain, x_t, k[rows], cond, reference).view(out[on].shape)

        with self.old_weights():
            fill(v_old, reference=False)
        if v_ref is not None:
            fill(v_ref, reference=True)
        chain.metadata.update(nft_steps=k, nft_noise=noise, nft_old=v_old, nft_ref=v_ref)

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        o, md, C = self.options, chain.metadata, self.algo.adv_clip_max
        device = chain.latents.device
        rows = mb.rows.to(device, non_blocking=True)
        k = md["nft_steps"][mb.rows]  # (M, Kt)
        Kt = k.shape[1]
        x0, eps, x_t, t, cond = self._noised(chain, rows, k, md["nft_noise"][rows])
        v = self._predict(chain, x_t, k, cond)  # v_theta, with gradient
        v_old = md["nft_old"][rows].reshape(v.shape)
        r = optimality(self.minibatch_advantages(chain, rows), C, o.nft_adv_mode).repeat_interleave(Kt)
        beta = o.nft_beta
        v_pos = beta * v + (1 - beta) * v_old
        v_neg = (1 + beta) * v_old - beta * v
        dims = tuple(range(1, x0.ndim))

        def term(vp: Tensor) -> Tensor:
            if o.nft_weighting == "velocity":
                return (vp - (eps - x0)).pow(2).mean(dims)
            err = x_t - t * vp - x0  # the x0 the prediction implies, minus x0
            w = err.detach().double().abs().mean(dims, keepdim=True).clamp(min=1e-5)
            return (err.pow(2) / w.to(err.dtype)).mean(dims)

        pos, neg = term(v_pos), term(v_neg)
        loss_policy = (C * (r * pos + (1 - r) * neg) / beta).mean()
        terms = {
            "loss_policy": loss_policy.detach(),
            "loss_positive": pos.mean().detach(),
            "loss_negative": neg.mean().detach(),
            "old_deviation": (v - v_old).detach().pow(2).mean(),
            "optimality_mean": r.mean().detach(),
        }
        loss = loss_policy
        if o.kl_coef > 0:
            kl = (v - md["nft_ref"][rows].reshape(v.shape)).pow(2).mean(dims).mean()
            loss = loss + o.kl_coef * kl
            terms["loss_kl"], terms["kl"] = (o.kl_coef * kl).detach(), kl.detach()
        terms["loss"] = loss
        return terms

"""Reward backpropagation through the sampling chain, for differentiable rewards.

    M  rows of the minibatch   K  chain steps   k_s  the step the gradient starts at

Each row is a trajectory of the epoch's Chain (sampled without gradient by the run's sampler).
The objective re-runs part of that trajectory *with* gradient under the current parameters, from
a recorded state x_{k_s}, decodes the result and maximizes the reward:

    x_{k_s}            the recorded state (no gradient flows before it)
    x_{k+1} = T_theta(x_k, eps_k)      k = k_s .. K-1, the sampler's own transition with fresh noise
    loss    = -reward_scale * mean_rows r(decode(x_K))

    draft      DRaFT-K (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable
               Rewards", arXiv 2309.17400): k_s = K - backprop_steps, the last K steps (DRaFT-1: K = 1)
    alignprop  AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739; its sd_pipeline.py): randomized
               truncated backpropagation, k_s drawn per minibatch, ``truncation: gaussian`` (its
               default: int(N(0.84 K, 0.1 K)), 42 +- 5 of its 50 steps) or ``uniform`` (U{0..K-1}),
               kept in [0, K-1] (a draw past the last step would train nothing); each step checkpointed
    refl       ReFL (Xu et al. 2023, ImageReward, arXiv 2304.05977; its train_refl.py): one prediction
               from a random late step k_s ~ U{refl_steps} (default the last quarter: 30..39 of 40,
               as ImageReward): loss = -reward_scale * mean r(decode(x0_hat_theta(x_{k_s})))
    draft_lv   DRaFT-LV (the same paper, sec. 4.2): DRaFT-1 with a lower-variance gradient. The recorded
               final sample x_K (sampled without gradient) is noised n = ``lv_samples`` times to the
               last step's level with fresh noise, x_{K-1}^i = q(x_{K-1} | x_K) (DDIM:
               sqrt(a_t) x_K + sqrt(1 - a_t) eps_i; flow: (1 - s) x_K + s eps_i), each denoised once
               with gradient, and the rewards averaged: loss = -reward_scale * mean_i mean_rows
               r(decode(T_theta(x_{K-1}^i))). The paper reports n = 2; no reference code is public.

With ``grad_checkpointing`` each re-run step's activations are recomputed in the backward pass,
so memory holds one step's activations, not k's (AlignProp's and DRaFT's choice for long chains).
The recorded state is on the policy's own distribution in the epoch's first pass; the steps after
it are fresh samples of the current policy, so every minibatch is an on-policy reward gradient
(``train.update_epochs`` > 1 reuses the recorded starts). The epoch's recorded rewards are logged as
usual; the objective scores its own re-run samples (``reward_backprop`` in the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flowrl.chain import Chain
from flowrl.core.seeding import randn
from flowrl.errors import ConfigError
from flowrl.objectives.base import Minibatch, Objective

MODES = ("draft", "alignprop", "refl", "draft_lv")


@dataclass
class RewardBackpropOptions:
    # draft: gradients through the last backprop_steps steps (DRaFT-K) | alignprop: from a random start
    # step drawn per minibatch (AlignProp) | refl: one x0 prediction from a random late step (ReFL)
    mode: str = "draft"
    # draft: DRaFT's K (DRaFT-1: 1; null: the whole chain)
    backprop_steps: int | None = 1
    # alignprop: the start step's distribution: gaussian (AlignProp's default) | uniform over the chain
    truncation: str = "gaussian"
    # alignprop, gaussian: mean and std of the start step (null: 0.84 K and 0.1 K, AlignProp's 42 and 5 of 50)
    truncation_mean: float | None = None
    truncation_std: float | None = None
    # refl: [first, last] chain step the prediction starts from, 0 = the noisiest (null: the last quarter)
    refl_steps: list[int] | None = None
    # recompute each re-run step's activations in the backward pass (memory of one step)
    grad_checkpointing: bool = True
    # loss = -reward_scale x the mean reward
    reward_scale: float = 1.0
    # draft_lv: n, the noisings of the final sample each denoised once with gradient (DRaFT-LV: 2)
    lv_samples: int = 2


class RewardBackprop(Objective):
    """DRaFT-K, DRaFT-LV, AlignProp or ReFL on a differentiable reward (see the module docstring)."""

    Options = RewardBackpropOptions
    needs_log_probs = False

    @classmethod
    def validate(cls, cfg) -> None:
        from flowrl.rewards import resolve_reward

        o = cfg.algorithm.options
        if o.mode not in MODES:
            raise ConfigError(f"algorithm.mode must be one of {list(MODES)}, got {o.mode!r}")
        if o.truncation not in ("gaussian", "uniform"):
            raise ConfigError(f"algorithm.truncation must be 'gaussian' or 'uniform', got {o.truncation!r}")
        if o.truncation_std is not None and o.truncation_std < 0:
            raise ConfigError(f"algorithm.truncation_std must be >= 0, got {o.truncation_std}")
        if o.backprop_steps is not None and o.backprop_steps < 1:
            raise ConfigError(
                f"algorithm.backprop_steps must be >= 1 (or null: the whole chain), got {o.backprop_steps}"
            )
        if o.lv_samples < 1:
            raise ConfigError(f"algorithm.lv_samples must be >= 1 (DRaFT-LV: 2), got {o.lv_samples}")
        if o.mode == "draft_lv" and cfg.sampler.name not in ("ddim", "flow_sde", "flow_cps"):
            raise ConfigError(
                f"DRaFT-LV noises the final sample with the forward process, which sampler {cfg.sampler.name!r} "
                "does not define here; use a ddim or flow sampler"
            )
        if o.refl_steps is not None and (
            len(o.refl_steps) != 2 or not 0 <= o.refl_steps[0] <= o.refl_steps[1]
        ):
            raise ConfigError(
                f"algorithm.refl_steps must be [first, last] with 0 <= first <= last, got {o.refl_steps}"
            )
        if cfg.sampler.name == "lcm":
            raise ConfigError(
                "reward backprop re-runs the chain's transitions from recorded states, which LCM's re-noised "
                "last step does not keep in the chain; use a ddim or flow sampler"
            )
        for i, r in enumerate(cfg.rewards):
            try:
                _, differentiable = resolve_reward(r.name)
            except (KeyError, AttributeError):
                continue  # an unknown name is reported by the collector's check, with suggestions
            if not differentiable:
                raise ConfigError(
                    f"rewards[{i}].name={r.name!r} is not differentiable, and {cfg.algorithm.name} backpropagates "
                    "the reward's gradient: use a differentiable reward (aesthetic, clip_score, pickscore, hpsv2, "
                    "imagereward, digit_alignment, ...) or a policy-gradient method (algorithm.name=ddpo / grpo)"
                )

    @property
    def steps(self) -> str:
        return "none"

    # ------------------------------------------------------------------ the re-run
    def start_step(self, generator: torch.Generator | None) -> int:
        """k_s, the chain step the gradient starts at (one draw per minibatch)."""
        o, K = self.options, self.sampler.recorded_steps
        if o.mode == "draft_lv":
            return K - 1
        if o.mode == "draft":
            return max(0, K - (o.backprop_steps or K))
        if o.mode == "alignprop":
            if o.truncation == "uniform":
                return int(torch.randint(0, K, (1,), generator=generator))
            mean = 0.84 * K if o.truncation_mean is None else o.truncation_mean
            std = 0.1 * K if o.truncation_std is None else o.truncation_std
            draw = float(torch.normal(mean, std, (1,), generator=generator))
            return min(max(int(draw), 0), K - 1)
        lo, hi = o.refl_steps or (K - max(1, K // 4), K - 1)
        hi = min(hi, K - 1)
        return int(torch.randint(min(lo, hi), hi + 1, (1,), generator=generator))

    def rerun(self, chain: Chain, rows: Tensor, k_start: int, generator: torch.Generator | None) -> Tensor:
        """(M, *event) the final samples (ReFL: x0_hat) re-run with gradient from x_{k_start}."""
        sampler, adapter, o = self.sampler, self.adapter, self.options
        device = chain.latents.device
        cond = {n: v[rows] for n, v in chain.cond.items()}
        x = chain.latents[rows, k_start].float()
        M, g = len(rows), chain.guidance_scale
        stochastic = (
            torch.isfinite(chain.log_probs[rows]).all(0).cpu()
        )  # (K,) the recorded chain's noisy steps
        last = k_start + 1 if o.mode == "refl" else sampler.recorded_steps
        for k in range(k_start, last):
            kb = torch.full((M,), k + sampler.recorded_from, dtype=torch.long)
            noisy = bool(stochastic[k]) and o.mode != "refl"
            noise = randn(tuple(x.shape), generator, device)

            def step(x, kb=kb, noisy=noisy, noise=noise):
                out = sampler.predict(adapter, x, kb, cond, g, stochastic=noisy)
                s = sampler.transition(kb, out, x, cond, noise=noise, stochastic=noisy)
                return s.pred_original_sample if o.mode == "refl" else s.prev_sample

            x = (
                checkpoint(step, x, use_reentrant=False)
                if o.grad_checkpointing and torch.is_grad_enabled()
                else step(x)
            )
        return x

    def loss(self, chain: Chain, mb: Minibatch, epoch: int, generator: torch.Generator) -> dict[str, Tensor]:
        if self.reward is None:
            raise ConfigError(
                "reward backprop needs the task's reward; build the objective through flowrl.run.Run"
            )
        rows = mb.rows.to(chain.latents.device)
        k_start = self.start_step(generator)
        prompts = [chain.prompts[i] for i in mb.rows.tolist()] if chain.prompts else [""] * len(rows)
        meta = chain.metadata.get("prompt_metadata")  # the prompts' metadata, as the collector scored them
        metadata = [meta[i] for i in mb.rows.tolist()] if meta else None
        if self.options.mode == "draft_lv":
            r = torch.stack(
                [
                    self.reward(self.adapter.decode_latents(f), prompts, metadata)[0]
                    for f in self.lv_rerun(chain, rows, generator)
                ]
            )  # (n, M)
        else:
            final = self.rerun(chain, rows, k_start, generator)
            r, _ = self.reward(self.adapter.decode_latents(final), prompts, metadata)
        loss = -self.options.reward_scale * r.mean()
        return {
            "loss": loss,
            "reward_backprop": r.detach().mean(),
            "backprop_steps": torch.tensor(
                float(self.sampler.recorded_steps - k_start if self.options.mode != "refl" else 1)
            ),
        }

    def noised(self, x0: Tensor, k: int, noise: Tensor) -> Tensor:
        """x0 noised by the forward process to the level of recorded step k (the state it starts at)."""
        s = self.sampler
        k = k + s.recorded_from
        if hasattr(s, "alphas_cumprod"):  # DDIM: sqrt(a_t) x0 + sqrt(1 - a_t) eps
            a = float(s._alpha_prod(s.timesteps[k : k + 1]))
            return a**0.5 * x0 + (1 - a) ** 0.5 * noise
        sigma = float(s.sigmas[k])  # flow: (1 - s) x0 + s eps
        return (1 - sigma) * x0 + sigma * noise

    def lv_rerun(self, chain: Chain, rows: Tensor, generator: torch.Generator | None) -> list[Tensor]:
        """DRaFT-LV's n final samples: the recorded x_K noised to the last step's level n times, each
        denoised by the last step with gradient (draws per sample: the noising, then the step's noise)."""
        sampler, adapter, o = self.sampler, self.adapter, self.options
        device, K = chain.latents.device, sampler.recorded_steps
        cond = {n: v[rows] for n, v in chain.cond.items()}
        x0 = chain.latents[rows, -1].float()
        M, g = len(rows), chain.guidance_scale
        noisy = bool(torch.isfinite(chain.log_probs[rows, K - 1]).all())
        kb = torch.full((M,), K - 1 + sampler.recorded_from, dtype=torch.long)
        finals = []
        for _ in range(o.lv_samples):
            x = self.noised(x0, K - 1, randn(tuple(x0.shape), generator, device))
            noise = randn(tuple(x0.shape), generator, device)

            def step(x, noise=noise):
                out = sampler.predict(adapter, x, kb, cond, g, stochastic=noisy)
                return sampler.transition(kb, out, x, cond, noise=noise, stochastic=noisy).prev_sample

            finals.append(
                checkpoint(step, x, use_reentrant=False)
                if o.grad_checkpointing and torch.is_grad_enabled()
                else step(x)
            )
        return finals

"""What every sampler shares: the Gaussian log-density and its reduction over event dims."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.gaussian import LOGPROB_REDUCTIONS, gaussian_log_prob, reduce_event  # noqa: F401
from flowrl.core.seeding import draw_device, randn  # noqa: F401


@dataclass
class StepOutput:
    """One transition x_t -> x_{t-1} of a Gaussian sampler.

    Attributes:
        prev_sample: (B, *event) x_{t-1}, drawn (when sampling) or given (when re-evaluating).
        mean: (B, *event) the Gaussian's mean mu_theta(x_t, t, c).
        std: (B, 1, ...) the Gaussian's std, broadcastable to the event shape.
        log_prob: (B,) log p(x_{t-1} | x_t, c), reduced over event dims.
        pred_original_sample: (B, *event) the predicted clean sample x0_hat.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    pred_original_sample: Tensor


class ChainSampler:
    """The loop every sampler shares. A subclass defines its schedule and one transition:

    - ``model_timesteps``: (K,) the timestep fed to the network at step k;
    - ``next_timesteps``: (K,) where step k lands (stored in the Chain for inspection);
    - ``transition(k, out, x, ...)``: the Gaussian step k (per-sample k, (B,) long), returning a
      :class:`StepOutput`; with ``stochastic=False`` it returns the step's mean (no noise, NaN
      log-prob);
    - optionally ``stochastic_steps(generator)``: which steps of one batch inject noise.
    """

    num_steps: int
    model_timesteps: Tensor
    next_timesteps: Tensor

    def transition(
        self,
        k: Tensor,
        model_output: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        stochastic: bool = True,
    ) -> StepOutput:
        raise NotImplementedError

    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        return set(range(self.num_steps))

    @torch.no_grad()
    def sample(
        self,
        adapter,
        prompts: list[str],
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
        progress: bool = False,
    ) -> Chain:
        """Run the chain from x_T ~ N(0, I) and record every transition with its log-prob
        (NaN on deterministic steps, which are not part of the MDP)."""
        device = adapter.device
        cond = adapter.condition(prompts, guidance_scale) if cond is None else cond
        B = len(prompts)
        if latents is None:
            latents = randn((B, *adapter.latent_shape), generator, device)
        stochastic = self.stochastic_steps(generator)
        states, log_probs = [latents.float()], []
        steps = range(self.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for k in steps:
            kb = torch.full((B,), k, dtype=torch.long)
            out = adapter(states[-1], self.model_timesteps[kb].to(device), cond, guidance_scale)
            step = self.transition(kb, out, states[-1], generator=generator, stochastic=k in stochastic)
            states.append(step.prev_sample)
            log_probs.append(step.log_prob)
        return Chain(
            latents=torch.stack(states, dim=1),  # (B, K+1, C, H, W)
            timesteps=self.model_timesteps.to(device).expand(B, -1).clone(),  # (B, K)
            next_timesteps=self.next_timesteps.to(device).expand(B, -1).clone(),  # (B, K)
            log_probs=torch.stack(log_probs, dim=1),  # (B, K)
            cond=cond,
            prompts=list(prompts),
            guidance_scale=guidance_scale,
        )

    def log_prob(
        self,
        adapter,
        chain: Chain,
        step_index: Tensor,
        net=None,
        reference: bool = False,
        traj_index: Tensor | None = None,
    ) -> StepOutput:
        """Re-evaluate transitions of a chain under the adapter's current parameters
        (differentiably), or the reference policy's with ``reference=True``.

        ``step_index`` is (P,) long: pair p is step ``step_index[p]`` of trajectory
        ``traj_index[p]`` (default: trajectory p, so P = B). Pairs from any trajectories and steps
        go through one batched forward: each trajectory may train on its own denoising steps
        (timestep subsampling), and several steps of a trajectory may share a forward (timestep
        batching). Keep ``step_index`` on the CPU: the schedule is indexed there, and the GPU
        never waits. ``net`` overrides the module called (the DDP wrapper in training)."""
        device = chain.latents.device
        k = step_index.cpu()
        b = torch.arange(len(chain)) if traj_index is None else traj_index.cpu()
        b_dev, k_dev = b.to(device, non_blocking=True), k.to(device, non_blocking=True)
        x, x_next = chain.latents[b_dev, k_dev], chain.latents[b_dev, k_dev + 1]  # (P, C, H, W) each
        cond = chain.cond if traj_index is None else {n: v[b_dev] for n, v in chain.cond.items()}
        t = self.model_timesteps[k].to(device, non_blocking=True)  # (P,)
        if reference:
            out = adapter.reference_forward(x, t, cond, chain.guidance_scale)
        else:
            out = adapter(x, t, cond, chain.guidance_scale, net=net)
        return self.transition(k, out, x, prev_sample=x_next)

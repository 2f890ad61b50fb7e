"""The one contract every chain implements, images and robot policies alike.

    B  trajectories in the batch     K  steps the sampler runs     event  (C, H, W) or (Ta, Da)

A sampler turns a denoising chain into an MDP: each step k is a Gaussian transition
x_k -> x_{k+1} with a mean and std the step's math computes from the model's prediction, so
its log-likelihood is exact. A subclass defines its schedule and one transition:

- ``num_steps`` K and ``model_timesteps`` (K,), the time fed to the network at step k, and
  ``next_timesteps`` (K,), where step k lands (stored in the Chain for inspection);
- ``transition(k, out, x, cond, ...)``: step k for per-sample step indices k (B,) long, returning
  a :class:`StepOutput`; with ``stochastic=False`` the step's mean (no noise, NaN log-prob);
- optionally ``predict``: what a step needs from the model (default: the adapter's prediction at
  ``model_timesteps[k]``; ReinFlow adds its learned std, DPPO runs the frozen network on the
  steps it does not fine-tune);
- optionally ``stochastic_steps(generator)``: which steps of one batch inject noise (an SDE
  window), and ``recorded_from``: steps before it run but are not part of the MDP and are not
  recorded (DPPO's frozen first T - K steps);
- optionally ``denoising_loss``: the model's own training loss at a noised sample, for
  objectives that need no likelihood (FPO).

The condition (prompt embeddings, or observation histories) reaches every prediction and
every transition. :meth:`ChainSampler.sample` runs the chain and records it as a
:class:`~flowrl.chain.Chain`; :meth:`ChainSampler.log_prob` re-evaluates recorded transitions
under the model's current parameters (differentiably), or the reference policy's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.gaussian import LOGPROB_REDUCTIONS
from flowrl.core.seeding import randn


@dataclass
class StepOutput:
    """One transition x_k -> x_{k+1} of a Gaussian sampler.

    Attributes:
        prev_sample: (B, *event) x_{k+1}, drawn (when sampling) or given (when re-evaluating).
        mean: (B, *event) the Gaussian's mean mu_theta(x_k, t_k, c).
        std: (B, 1, ...) or (B, *event) the Gaussian's std, broadcastable to the event shape.
        log_prob: (B,) log p(x_{k+1} | x_k, c), reduced over event dims (NaN on a mean-path step).
        pred_original_sample: (B, *event) the predicted clean sample x0_hat (reward guidance
            scores it).
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    pred_original_sample: Tensor


def check_reduction(reduction: str) -> None:
    if reduction not in LOGPROB_REDUCTIONS:
        raise ValueError(f"sampler.logprob_reduction must be one of {LOGPROB_REDUCTIONS}, got {reduction!r}")


class ChainSampler:
    """The loop every sampler shares (see the module docstring for what a subclass defines).

    ``name`` is the sampler's registry name (``sampler.name``), ``prediction_type`` what the
    network predicts (epsilon, v_prediction, sample, flow, velocity), ``logprob_reduction`` how log-probs
    reduce over the event (see :func:`~flowrl.core.gaussian.reduce_event`).
    """

    name: str = ""
    num_steps: int
    model_timesteps: Tensor
    next_timesteps: Tensor
    logprob_reduction: str = "mean"
    prediction_type: str = ""
    recorded_from: int = 0  # steps before this one run, but are not part of the MDP (not recorded)

    # ------------------------------------------------------------------ what a subclass defines
    def transition(
        self,
        k: Tensor,
        model_output,
        sample: Tensor,
        cond: dict[str, Tensor],
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        stochastic: bool = True,
    ) -> StepOutput:
        raise NotImplementedError

    def predict(
        self,
        adapter,
        x: Tensor,
        k: Tensor,
        cond: dict[str, Tensor],
        guidance_scale: float = 1.0,
        reference: bool = False,
        stochastic: bool = True,
    ):
        """What step k (B,) needs from the model at x_k: by default the network's raw output
        (with classifier-free guidance), or the reference policy's with ``reference=True``."""
        t = self.model_timesteps[k.cpu()].to(x.device, non_blocking=True)
        if reference:
            return adapter.reference_forward(x, t, cond, guidance_scale)
        return adapter(x, t, cond, guidance_scale)

    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        return set(range(self.num_steps))

    def set_epoch(self, epoch: int) -> dict:
        """Called by the collector before it samples an epoch (a window that moves with training,
        MixGRPO's); returns values to log with the epoch's metrics."""
        return {}

    def denoising_loss(
        self,
        adapter,
        x0: Tensor,
        cond: dict[str, Tensor],
        k: Tensor,
        noise: Tensor,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """(B,) the model's training loss at x0 noised to the level of step k with ``noise``."""
        raise NotImplementedError(
            f"sampler {self.name!r} defines no denoising loss, which likelihood-free objectives such as "
            "FPO need; use a flow or diffusion sampler that does"
        )

    # ------------------------------------------------------------------ the chain
    @property
    def recorded_steps(self) -> int:
        """K', the steps recorded in a Chain (its ``num_steps``)."""
        return self.num_steps - self.recorded_from

    @torch.no_grad()
    def sample(
        self,
        adapter,
        inputs,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
        progress: bool = False,
        deterministic: bool = False,
    ) -> Chain:
        """Run the chain from x_0 ~ N(0, I) and record its MDP steps with their log-probs.

        Args:
            adapter: the model (a text-to-image adapter or a policy).
            inputs: what the adapter conditions on: a list of prompts, or (B, To, Do)
                observation histories; ``cond`` instead gives the condition tensors themselves.
            guidance_scale: classifier-free guidance (1 = off; policies ignore it).
            generator: the randomness of the initial noise and every step.
            deterministic: every step its mean (the evaluation path; log-probs NaN).
        """
        device = adapter.device
        cond = adapter.condition(inputs, guidance_scale) if cond is None else cond
        B = len(inputs)
        if latents is None:  # x_0 ~ N(0, I), or from a trained noise policy (FIND: models/noise_policy.py)
            policy = getattr(adapter, "noise_policy", None)
            shape = (B, *adapter.latent_shape)
            latents = (
                randn(shape, generator, device)
                if policy is None
                else policy.sample(cond, B, generator, device)
            )
        stochastic = set() if deterministic else self.stochastic_steps(generator)
        x = latents.float()
        states, log_probs = [], []
        if self.recorded_from == 0:
            states.append(x)
        steps = range(self.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for k in steps:
            kb = torch.full((B,), k, dtype=torch.long)
            noisy = k in stochastic
            out = self.predict(adapter, x, kb, cond, guidance_scale, stochastic=noisy)
            step = self.transition(kb, out, x, cond, generator=generator, stochastic=noisy)
            x = step.prev_sample
            if k + 1 >= self.recorded_from:
                states.append(x)
            if k >= self.recorded_from:
                log_probs.append(step.log_prob)
        recorded = slice(self.recorded_from, None)
        return Chain(
            latents=torch.stack(states, dim=1),  # (B, K'+1, *event)
            timesteps=self.model_timesteps[recorded].to(device).expand(B, -1).clone(),  # (B, K')
            next_timesteps=self.next_timesteps[recorded].to(device).expand(B, -1).clone(),  # (B, K')
            log_probs=torch.stack(log_probs, dim=1),  # (B, K')
            cond=cond,
            prompts=list(inputs)
            if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
            else [],
            guidance_scale=guidance_scale,
        )

    def log_prob(
        self,
        adapter,
        chain: Chain,
        step_index: Tensor,
        traj_index: Tensor | None = None,
        reference: bool = False,
    ) -> StepOutput:
        """Re-evaluate recorded transitions of a chain under the adapter's current parameters
        (differentiably), or the reference policy's with ``reference=True``.

        ``step_index`` is (P,) long, indices into the chain's recorded steps: pair p is step
        ``step_index[p]`` of trajectory ``traj_index[p]`` (default: trajectory p, so P = B). Pairs
        from any trajectories and steps go through one batched forward: each trajectory may train
        on its own steps (timestep subsampling), and several steps of a trajectory may share a
        forward (timestep batching). Keep ``step_index`` on the CPU: the schedule is indexed
        there, and the GPU never waits."""
        device = chain.latents.device
        k = step_index.cpu()
        b = torch.arange(len(chain)) if traj_index is None else traj_index.cpu()
        b_dev, k_dev = b.to(device, non_blocking=True), k.to(device, non_blocking=True)
        x, x_next = chain.latents[b_dev, k_dev], chain.latents[b_dev, k_dev + 1]  # (P, *event) each
        cond = chain.cond if traj_index is None else {n: v[b_dev] for n, v in chain.cond.items()}
        k = k + self.recorded_from  # the sampler's own step index
        out = self.predict(adapter, x, k, cond, chain.guidance_scale, reference=reference)
        return self.transition(k, out, x, cond, prev_sample=x_next)

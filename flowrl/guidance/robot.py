"""Inference-time guidance for robot policies over action chunks: the same four methods as for
images, on DPPO's DDPM policies and ReinFlow's flow policies.

    B   environments (one chunk each)   Ta  action horizon        Da  action dim
    To  observation history             Do  observation dim       K   denoising / flow steps

- RL guidance is a policy: :class:`RLGuidedPolicy` mixes a base (BC) and a fine-tuned policy's
  predictions, so the robot samplers, ``evaluate`` and ``record_video`` run it like any policy.
- Reward gradient, best-of-N and SMC are the loops of :mod:`flowrl.guidance`, unchanged. They
  ask a model for a prediction and a sampler for a transition, step by step; a policy answers
  through two small faces:

      PolicyAdapter      the adapter: condition = normalized observations, prediction = the
                         network the robot sampler calls at that step, decode = the chunk in the
                         env's units
      PolicyStepSampler  the ChainSampler: the robot sampler's step as transition(k, out, x)

  :class:`PolicyGuide` puts them together and is itself a drop-in robot sampler (``sample``
  returns the guided chunk), so ``evaluate(policy, PolicyGuide(...), cfg, ...)`` runs guided
  evaluation rollouts.

An action reward is ``reward(obs, actions) -> (B,)`` in the env's units: obs (B, To, Do) the
observation history, actions (B, Ta, Da) the whole chunk. A reward without gradients (a simulator,
a lookup) says so with an attribute ``differentiable = False``; see :data:`ACTION_REWARDS`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from flowrl.chain import Chain
from flowrl.guidance.best_of_n import best_of_n
from flowrl.guidance.common import GuidanceResult
from flowrl.guidance.reward_gradient import reward_gradient_guidance
from flowrl.guidance.rl_guidance import rl_guidance_mix
from flowrl.guidance.smc import smc_guidance
from flowrl.samplers.base import ChainSampler, StepOutput
from flowrl.samplers.ddpm_policy import DDPMPolicySampler
from flowrl.samplers.reinflow import ReinFlowSampler

METHODS = ("reward-grad", "best-of-n", "smc")


# ------------------------------------------------------------------ RL guidance
class RLGuidedPolicy(nn.Module):
    """The w-mix of a base and a fine-tuned policy, f_w = f_0 + w (f_1 - f_0) on eps (DDPM) or the
    velocity (flow) at the same (x_t, t, s): w = 0 is the base policy, w = 1 the fine-tune exactly,
    w > 1 extrapolates (see :mod:`flowrl.guidance.rl_guidance` for why w is an inverse KL weight).

    Robot fine-tunes are full fine-tunes, so the base is a second network: ``base`` (the BC policy,
    ``load_policy(<pretrain folder>)``) or, when None, the frozen pre-trained copy a DPPO fine-tune
    keeps (``tuned.reference``). Everything else (normalizer, shapes, ReinFlow's noise network) is
    the fine-tune's. Costs two network evaluations per step.
    """

    def __init__(self, tuned: nn.Module, weight: float, base: nn.Module | None = None):
        super().__init__()
        if base is None and getattr(tuned, "reference", None) is None:
            raise ValueError(
                "RL guidance needs the base policy: pass base=load_policy(<BC folder>) (a ReinFlow "
                "fine-tune keeps no copy of it; a DPPO fine-tune does)"
            )
        if base is not None and (base.kind, base.action_shape) != (tuned.kind, tuned.action_shape):
            raise ValueError(
                f"base and fine-tuned policy differ: {base.kind} {base.action_shape} vs "
                f"{tuned.kind} {tuned.action_shape}"
            )
        self.tuned, self.base, self.weight = tuned, base, weight

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.tuned, name)

    def _base(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        return self.tuned.reference_forward(x, t, obs) if self.base is None else self.base(x, t, obs)

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        return rl_guidance_mix(self._base(x, t, obs), self.tuned(x, t, obs), self.weight)

    def reference_forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        """The steps DPPO does not fine-tune (t >= K): the mix of the two frozen networks there."""
        return rl_guidance_mix(self._base(x, t, obs), self.tuned.reference_forward(x, t, obs), self.weight)


# ------------------------------------------------------------------ the two faces of a policy
class PolicyAdapter(nn.Module):
    """A chunk policy as the guidance loops' adapter. "Prompts" are observation histories in the
    env's units ((B, To, Do), or a list of (To, Do)); samples are normalized chunks (B, Ta, Da)."""

    uses_cfg = False

    def __init__(self, policy: nn.Module, sampler: DDPMPolicySampler | ReinFlowSampler):
        super().__init__()
        self.policy = policy
        # DPPO runs the frozen pre-trained network on the steps it does not fine-tune (t >= K)
        # (for a policy that keeps no frozen copy that is its own network: called directly, so
        # reward gradients flow through it on every step)
        self.ft_steps = sampler.ft_steps if isinstance(sampler, DDPMPolicySampler) else None
        self._has_reference = getattr(policy, "reference", None) is not None or isinstance(
            policy, RLGuidedPolicy
        )

    @property
    def device(self) -> torch.device:
        return self.policy.normalizer.obs_mean.device

    @property
    def latent_shape(self) -> tuple[int, int]:
        return tuple(self.policy.action_shape)

    def condition(self, obs, guidance_scale: float = 1.0) -> dict[str, Tensor]:
        obs = torch.stack(list(obs)).to(self.device)  # (B, To, Do)
        return {"obs": self.policy.normalizer.normalize_obs(obs)}

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance_scale: float = 1.0) -> Tensor:
        if self.ft_steps is not None and int(t.max()) >= self.ft_steps and self._has_reference:
            return self.policy.reference_forward(x, t, cond["obs"])
        return self.policy(x, t, cond["obs"])

    def decode_latents(self, x: Tensor) -> Tensor:
        """Normalized chunk -> env units (clipped to the action bounds), differentiably."""
        return self.policy.normalizer.unnormalize_action(x)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return self.decode_latents(x)


class PolicyStepSampler(ChainSampler):
    """A robot sampler as a :class:`~flowrl.samplers.base.ChainSampler`: every denoising step of
    the chunk, in sampling order, as ``transition(k, out, x)``.

    DDPM (DPPO): all T steps t = T-1 .. 0, each with std max(sqrt(beta_tilde_t), sigma_min).
    Flow (ReinFlow): the K Euler steps t_k = k / K with a fixed std ``flow_std``: the learned noise
    network depends on the observation, which a transition does not see, and evaluation runs with
    the noise off anyway. With ``stochastic=False`` every step is its mean (the evaluation path).
    """

    def __init__(
        self,
        sampler: DDPMPolicySampler | ReinFlowSampler,
        stochastic: bool = True,
        flow_std: float = 0.1,
    ):
        self.inner, self.stochastic, self.flow_std = sampler, stochastic, flow_std
        if isinstance(sampler, DDPMPolicySampler):
            self.num_steps = sampler.num_train_steps
            self.model_timesteps = sampler.timesteps  # (T,) T-1 .. 0
            self.next_timesteps = sampler.timesteps - 1
        elif isinstance(sampler, ReinFlowSampler):
            self.num_steps = sampler.num_steps
            self.model_timesteps = sampler.timesteps[:-1]  # (K,) t_k
            self.next_timesteps = sampler.timesteps[1:]  # (K,) t_{k+1}
        else:
            raise TypeError(f"expected a DDPMPolicySampler or ReinFlowSampler, got {type(sampler).__name__}")

    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        return set(range(self.num_steps)) if self.stochastic else set()

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
        t = self.model_timesteps[k.cpu()].to(sample.device)
        if isinstance(self.inner, DDPMPolicySampler):
            return self.inner.step(
                model_output, t, sample, prev_sample, generator, noise, deterministic=not stochastic
            )
        std = torch.full_like(sample, self.flow_std if stochastic else 0.0)
        next_t = self.next_timesteps[k.cpu()].to(sample.device)
        return self.inner.step(model_output, std, t, next_t, sample, prev_sample, generator, noise)


class ChunkReward:
    """An action reward ``reward(obs, actions)`` behind the ``(samples, prompts, metadata)``
    signature the guidance loops score with (the "prompts" are the observations)."""

    def __init__(self, reward):
        self.reward = reward
        self.differentiable = getattr(reward, "differentiable", True)

    def __call__(self, actions: Tensor, obs, metadata=None) -> Tensor:
        return self.reward(torch.stack(list(obs)).to(actions.device), actions)


# ------------------------------------------------------------------ guided sampling
class PolicyGuide:
    """Reward-guided action chunks from a policy, and a drop-in robot sampler for ``evaluate``.

    Args:
        sampler: the policy's DDPMPolicySampler or ReinFlowSampler.
        method: ``reward-grad`` (DPS on the predicted clean chunk), ``best-of-n`` or ``smc``.
        reward: an action reward ``reward(obs, actions) -> (B,)`` in env units.
        stochastic: sample every step (DDPM's std floor, ``flow_std`` for flow) or, False, run
            the mean path as evaluation does. None: True for SMC (its resampled copies of a
            particle stay identical without noise) and for best-of-N on a DDPM policy (its mean
            path nearly forgets x_T, so the candidates would barely differ); False otherwise (a
            flow policy's ODE maps different x_0 to different chunks, and noise on its few steps
            is never denoised: on InvertedPendulum it cost a BC flow policy most of its return).
        flow_std: the std of a flow policy's guided steps (see :class:`PolicyStepSampler`).
        options: the method's own, e.g. ``scale``/``schedule`` (reward-grad), ``n`` (best-of-n),
            ``num_particles``/``lam``/``potential`` (smc).
    """

    def __init__(
        self,
        sampler: DDPMPolicySampler | ReinFlowSampler,
        method: str,
        reward,
        stochastic: bool | None = None,
        flow_std: float = 0.1,
        **options,
    ):
        if method not in METHODS:
            raise ValueError(f"guidance method must be one of {METHODS}, got {method!r}")
        if stochastic is None:
            stochastic = method == "smc" or (method == "best-of-n" and isinstance(sampler, DDPMPolicySampler))
        self.inner, self.method, self.options = sampler, method, options
        self.steps = PolicyStepSampler(sampler, stochastic, flow_std)
        self.reward = ChunkReward(reward)

    def guide(
        self, policy: nn.Module, obs: Tensor, generator: torch.Generator | None = None
    ) -> GuidanceResult:
        """Guided chunks for observation histories ``obs`` (B, To, Do) in env units: ``latents``
        the normalized chunk (B, Ta, Da), ``images`` the chunk in env units, ``rewards`` (B,)."""
        adapter = PolicyAdapter(policy, self.inner)
        run = {"reward-grad": reward_gradient_guidance, "best-of-n": best_of_n, "smc": smc_guidance}[
            self.method
        ]
        return run(self.steps, adapter, self.reward, obs, generator=generator, **self.options)

    @torch.no_grad()
    def sample(
        self,
        policy: nn.Module,
        obs: Tensor,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Chain:
        """The robot samplers' ``sample`` on normalized observations (what ``act`` calls): a
        Chain holding only the guided chunk, ``latents`` (B, 1, Ta, Da). ``deterministic`` is
        ignored: the guide's ``stochastic`` decides."""
        n = policy.normalizer
        obs_env = obs * n.obs_std + n.obs_mean  # back to env units (exact unless clipped at +-10 std)
        chunk = self.guide(policy, obs_env, generator).latents  # (B, Ta, Da)
        B = chunk.shape[0]
        empty = torch.zeros(B, 0, device=chunk.device)
        return Chain(chunk[:, None], empty, empty, empty, {"obs": obs}, [""] * B)


# ------------------------------------------------------------------ action rewards
def target_reward(target: list[float]):
    """-mean ||a - target||^2 over the chunk: pull every action toward ``target`` (env units)."""

    def reward(obs: Tensor, actions: Tensor) -> Tensor:
        goal = torch.as_tensor(target, dtype=actions.dtype, device=actions.device)
        return -((actions - goal) ** 2).sum(-1).mean(-1)

    return reward


def smoothness_reward():
    """-mean ||a_{i+1} - a_i||^2 over the chunk: penalize jerky chunks."""

    def reward(obs: Tensor, actions: Tensor) -> Tensor:
        return -(actions.diff(dim=1) ** 2).sum(-1).mean(-1)

    return reward


class SimulatedReturn:
    """The env's own return of the chunk, simulated from the state in the last observation: a
    one-chunk model-predictive lookahead (not differentiable). Only for MuJoCo envs whose
    observation is the full state (qpos, qvel), e.g. InvertedPendulum-v5. A termination inside
    the chunk costs ``termination_penalty``; ``state_cost`` (nq + nv weights q) subtracts the
    quadratic cost sum_i q_i s_i^2 of the state s the chunk ends in (an LQR-like shaping: a short
    lookahead's returns often tie)."""

    differentiable = False

    def __init__(
        self,
        env_id: str,
        termination_penalty: float = 0.0,
        state_cost: list[float] | None = None,
        env_kwargs: dict | None = None,
    ):
        import gymnasium as gym

        self.env = gym.make(env_id, **(env_kwargs or {})).unwrapped
        self.env.reset(seed=0)
        nq, nv = self.env.model.nq, self.env.model.nv
        if self.env.observation_space.shape != (nq + nv,):
            raise ValueError(
                f"{env_id}: its observation is not the full state (qpos, qvel), so a chunk cannot be "
                "simulated from it; use a learned reward"
            )
        if state_cost is not None and len(state_cost) != nq + nv:
            raise ValueError(f"state_cost needs {nq + nv} weights (qpos, qvel), got {len(state_cost)}")
        self.nq, self.penalty = nq, termination_penalty
        self.state_cost = None if state_cost is None else np.asarray(state_cost, dtype=np.float64)

    def __call__(self, obs: Tensor, actions: Tensor) -> Tensor:
        state, acts = obs[:, -1].double().cpu().numpy(), actions.double().cpu().numpy()
        out = torch.zeros(len(state))
        for i in range(len(state)):
            self.env.set_state(state[i, : self.nq], state[i, self.nq :])
            for a in acts[i]:
                _, r, terminated, _, _ = self.env.step(a)
                out[i] += float(r)
                if terminated:
                    out[i] -= self.penalty
                    break
            if self.state_cost is not None:
                s = np.concatenate([self.env.data.qpos, self.env.data.qvel])
                out[i] -= float((self.state_cost * s**2).sum())
        return out.to(actions.device)


ACTION_REWARDS = {
    "target": target_reward,
    "smoothness": smoothness_reward,
    "simulated_return": SimulatedReturn,
}

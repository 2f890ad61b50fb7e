"""pi-RL's two ways to make a flow policy an MDP (Chen et al. 2025, "pi-RL: online RL fine-tuning
for flow-based vision-language-action models", https://arxiv.org/abs/2510.25889; RLinf's
``OpenPi0ForRLActionPrediction.sample_mean_var_val``, ``noise_method``): Flow-SDE and Flow-Noise.

Shapes:  B  environments (one action chunk each)   Ta  action horizon   Da  action dim   K  flow steps

flowrl's flow policies run from noise (t = 0) to the action chunk (t = 1), v = x_1 - eps
(:mod:`flowrl.samplers.reinflow`); pi-RL's time runs the other way, tau = 1 - t from noise (1) to
action (0). With t_k = k / K, dt = t_{k+1} - t_k, tau = 1 - t_k and tau' = 1 - t_{k+1}:

    a_hat = x + (1 - t_k) v        the action the velocity points to   (pi-RL's x0_pred)
    n_hat = x - t_k v              the noise it came from              (pi-RL's x1_pred)

**Flow-SDE** (``sampler.name: flow_sde`` on a flow policy): the ODE turned into an SDE with the
fixed noise schedule sigma(tau) = a sqrt(tau / (1 - tau)) (a = ``sampler.noise_level``, pi-RL's
0.5; at tau = 1 the denominator takes tau_1, as RLinf does, so sigma_0 = a sqrt(K)):

    mean = t_{k+1} a_hat + (tau' - sigma^2 dt / (2 tau)) n_hat,     std = sqrt(dt) sigma

which is the Euler step when sigma = 0 (the same SDE Flow-GRPO uses for images,
:mod:`flowrl.samplers.flow`). pi-RL's default makes ONE step of each chunk stochastic, drawn
uniformly per batch (``sampler.sde_window: 1``; its other steps are the ODE, their log-prob NaN),
and PPO trains that step's log-prob (``algorithm.ratio_scope: step``); ``sde_window: 0`` makes every
step stochastic. The denoising steps are an inner MDP of the environment step (pi-RL's two-layer
MDP): one reward and one value per chunk. RLinf's ``double_layer`` flag ("designed for flow-sde
without acceleration") is read by none of its sampling, log-prob or loss code, only asserted
exclusive with ``joint_logprob``; Flow-SDE without the one-step acceleration is ``sde_window: 0``.

**Flow-Noise** (``sampler.name: flow_noise``): the Euler mean with a learned, bounded std from a
noise network (pi-RL's ``noise_logvar_range`` [0.08, 0.16]), every step stochastic, and the chain's
joint log-prob (log N(x_0; 0, I) + sum_k log N(x_{k+1}; mu_k, std_k^2)) / (K + 1), pi-RL's
``joint_logprob`` (``algorithm.ratio_scope: chain`` with ``chain_logprob: reinflow``). This is
ReinFlow's chain (:class:`~flowrl.samplers.reinflow.ReinFlowSampler`); the difference is the noise
network's input (pi-RL: the action expert's features; here the flow time and the observation, as
ReinFlow) and that pi-RL clips neither the mean nor the noise (set ``denoised_clip`` and
``noise_clip`` to null for that).
"""

from __future__ import annotations

import torch

from flowrl.core.gaussian import gaussian_log_prob
from flowrl.core.seeding import draw_device, randn
from flowrl.samplers.base import StepOutput
from flowrl.samplers.reinflow import ReinFlowSampler, with_step_size

DEFAULT_NOISE_LEVEL = 0.5  # pi-RL / RLinf: noise_level 0.5


class FlowSDEPolicySampler(ReinFlowSampler):
    """K steps of a flow policy, each the ODE step or pi-RL's Flow-SDE step with a fixed schedule.

    Args:
        num_steps: K, flow steps per action chunk (pi-RL: 10 for pi0; small policies 4).
        noise_level: a, the schedule's scale (pi-RL: 0.5).
        sde_window: how many consecutive steps of a batch are stochastic (pi-RL: 1, drawn per
            batch); 0: every step.
        logprob_reduction: ``"mean"`` or ``"sum"`` over the (Ta, Da) chunk.
    """

    def __init__(
        self,
        num_steps: int = 4,
        noise_level: float = DEFAULT_NOISE_LEVEL,
        sde_window: int = 1,
        logprob_reduction: str = "mean",
    ):
        super().__init__(num_steps, logprob_reduction, fixed_std=0.0, learned=False)
        if noise_level <= 0:
            raise ValueError(f"sampler.noise_level must be > 0 for flow_sde, got {noise_level}")
        if not 0 <= sde_window <= num_steps:
            raise ValueError(f"sampler.sde_window must be in [0, {num_steps}], got {sde_window}")
        self.name, self.noise_level, self.sde_window = "flow_sde", noise_level, sde_window
        tau = 1 - self.timesteps  # (K+1,) pi-RL's time, 1 (noise) .. 0 (action)
        denom = torch.where(tau == 1, tau[1], tau)
        self.sigmas = noise_level * torch.sqrt(tau / (1 - denom))[:-1]  # (K,) sigma at each step's start

    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        """All K steps, or a window of ``sde_window`` steps whose start is drawn uniformly per batch."""
        if self.sde_window == 0:
            return set(range(self.num_steps))
        hi = self.num_steps - self.sde_window
        start = 0
        if hi > 0:
            where = draw_device(generator, "cpu")
            start = int(torch.randint(0, hi + 1, (1,), generator=generator, device=where).item())
        return set(range(start, start + self.sde_window))

    def predict(self, adapter, x, k, cond, guidance_scale=1.0, reference=False, stochastic=True):
        """The velocity at step k; the std is the schedule's (no noise network)."""
        t = self.model_timesteps[k.cpu()].to(x.device, non_blocking=True)
        cond = with_step_size(adapter, cond, t, self.num_steps)  # a shortcut policy reads d = 1/K
        v = adapter.reference_forward(x, t, cond) if reference else adapter(x, t, cond)
        return v, None

    def transition(
        self,
        k,
        model_output,
        sample,
        cond=None,
        prev_sample=None,
        generator=None,
        noise=None,
        stochastic=True,
    ) -> StepOutput:
        """Step k (B,): Flow-SDE when ``stochastic`` (re-evaluation always is), else the ODE step."""
        velocity, _ = model_output
        kc = k.cpu()
        t = self.model_timesteps[kc].to(sample.device)
        next_t = self.next_timesteps[kc].to(sample.device)
        if not stochastic:
            return self.step(
                velocity, torch.zeros_like(velocity), t, next_t, sample, prev_sample, generator, noise
            )
        v, x = velocity.float(), sample.float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        tt, tn = t.view(shape), next_t.view(shape)
        dt, tau, tau_next = tn - tt, 1 - tt, 1 - tn
        sigma = self.sigmas[kc].to(x.device).view(shape)
        # 1. the action and the noise the velocity implies
        a_hat, n_hat = x + (1 - tt) * v, x - tt * v
        # 2. pi-RL's Flow-SDE mean and std (the Euler step plus the drift that keeps the marginals)
        mean = tn * a_hat + (tau_next - sigma**2 * dt / (2 * tau)) * n_hat
        std = (dt.sqrt() * sigma).expand_as(x)
        # 3. draw x_{t_{k+1}} unless given, and its log-density
        if prev_sample is None:
            z = randn(x.shape, generator, x.device) if noise is None else noise
            prev_sample = mean + std * z
        prev_sample = prev_sample.float()
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, self.logprob_reduction)
        return StepOutput(prev_sample, mean, std, log_prob, a_hat)


def from_config(sc, adapter, evaluation: bool = False):
    """A flow policy's pi-RL chain: Flow-SDE (``flow_sde``) or Flow-Noise (``flow_noise``); a
    shortcut policy runs at d = 1/K, which must be on its grid."""
    if getattr(adapter, "takes_step_size", False):
        adapter.check_num_steps(sc.num_steps)
    if sc.name == "flow_noise":
        sampler = ReinFlowSampler(
            sc.num_steps, sc.logprob_reduction, denoised_clip=sc.denoised_clip, noise_clip=sc.noise_clip
        )
        sampler.name = "flow_noise"
        return sampler
    level = DEFAULT_NOISE_LEVEL if sc.noise_level is None else sc.noise_level
    return FlowSDEPolicySampler(sc.num_steps, level, sc.sde_window, sc.logprob_reduction)


__all__ = ["DEFAULT_NOISE_LEVEL", "FlowSDEPolicySampler", "from_config"]

"""Samplers: turn a denoising chain into an MDP with exact per-step Gaussian log-probs.

ddim      DDIM(eta > 0), eps / v / x0 prediction   (SD 1.x/2.x, SDXL; DDPO)
flow_sde  Flow-GRPO's SDE over a flow-matching schedule (SD3, Flux)
flow_cps  coefficient-preserving flow sampling (SD3, Flux)
lcm       multistep consistency sampling with re-noising (LCM; RLCM)
ddpm      DDPM with a std floor, the last K steps an MDP (diffusion policies; DPPO)
reinflow  Euler steps of a flow policy with a learned noise std (flow policies; ReinFlow)

Every one subclasses :class:`~flowrl.samplers.base.ChainSampler`.
"""

from __future__ import annotations

from flowrl.core.gaussian import gaussian_log_prob, reduce_event
from flowrl.samplers.base import ChainSampler, StepOutput
from flowrl.samplers.ddim import DDIMSampler

SAMPLERS = ("ddim", "flow_sde", "flow_cps", "lcm")
DEFAULT_NOISE_LEVEL = {"flow_sde": 0.7, "flow_cps": 0.8}  # Flow-GRPO's defaults


def build_sampler(
    name: str,
    scheduler_config: dict,
    num_steps: int,
    *,
    eta: float = 1.0,
    noise_level: float | None = None,
    sde_window: int = 0,
    window_max_start: int | None = None,
    logprob_reduction: str = "mean",
    deterministic: bool = False,
):
    """A sampler by name; ``deterministic=True`` gives its evaluation version (eta 0 / noise 0)."""
    if name == "ddim":
        return DDIMSampler(scheduler_config, num_steps, 0.0 if deterministic else eta, logprob_reduction)
    if name in ("flow_sde", "flow_cps"):
        from flowrl.samplers.flow import FlowSampler

        level = DEFAULT_NOISE_LEVEL[name] if noise_level is None else noise_level
        return FlowSampler(
            scheduler_config,
            num_steps,
            0.0 if deterministic else level,
            kind=name.removeprefix("flow_"),
            sde_window=0 if deterministic else sde_window,
            window_max_start=window_max_start,
            logprob_reduction=logprob_reduction,
        )
    if name == "lcm":
        from flowrl.samplers.lcm import LCMSampler

        return LCMSampler(scheduler_config, num_steps, logprob_reduction)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


__all__ = [
    "SAMPLERS",
    "ChainSampler",
    "DDIMSampler",
    "StepOutput",
    "build_sampler",
    "gaussian_log_prob",
    "reduce_event",
]

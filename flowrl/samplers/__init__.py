"""Samplers: turn a denoising chain into an MDP with exact per-step Gaussian log-probs.

ddim      DDIM(eta > 0), eps / v / x0 prediction   (SD 1.x/2.x, SDXL; DDPO)
flow_sde  Flow-GRPO's SDE over a flow-matching schedule (SD3, Flux)
flow_cps  coefficient-preserving flow sampling (SD3, Flux)
lcm       multistep consistency sampling with re-noising (LCM; RLCM)
ddpm      DDPM with a std floor, the last K steps an MDP (diffusion policies; DPPO)
reinflow  Euler steps of a flow policy with a learned noise std (flow policies; ReinFlow)
euler     the flow policy's Euler steps with a fixed std (0: the ODE, exploration from x_0 alone; FPO)
flow_sde  on a flow policy: pi-RL's Flow-SDE, the ODE made an SDE with a fixed schedule (one step or all)
flow_noise  on a flow policy: pi-RL's Flow-Noise, a learned std and the joint chain log-prob
ddim      on a diffusion policy: DPPO's DDIM fine-tuning (DDIM steps over the DDPM schedule, std floor)
gaussian  a Gaussian head's one-step chain, beside a frozen policy's deterministic chain (Gaussian MLP, residual, DSRL)

Every one subclasses :class:`~flowrl.samplers.base.ChainSampler`; :data:`SAMPLERS` maps a name to
the function that builds it from a task's ``sampler`` section.
"""

from __future__ import annotations

import importlib

from flowrl.core.gaussian import gaussian_log_prob, reduce_event
from flowrl.errors import ConfigError
from flowrl.errors import suggest as _suggest
from flowrl.samplers.base import ChainSampler, StepOutput
from flowrl.samplers.ddim import DDIMSampler

# name -> "module:function" building it from (sampler config, adapter, evaluation)
SAMPLERS = {
    "ddim": "flowrl.samplers.ddim:from_config",
    "flow_sde": "flowrl.samplers.flow:from_config",
    "flow_cps": "flowrl.samplers.flow:from_config",
    "lcm": "flowrl.samplers.lcm:from_config",
    "ddpm": "flowrl.samplers.ddpm_policy:from_config",
    "reinflow": "flowrl.samplers.reinflow:from_config",
    "euler": "flowrl.samplers.reinflow:from_config",
    "gaussian": "flowrl.samplers.gaussian:from_config",
    "flow_noise": "flowrl.samplers.pi_rl:from_config",
}
# a name that means another chain on an env task's policy (pi-RL's Flow-SDE on a flow policy)
ENV_SAMPLERS = {
    "flow_sde": "flowrl.samplers.pi_rl:from_config",
    "ddim": "flowrl.samplers.ddim_policy:from_config",
}
DEFAULT_NOISE_LEVEL = {"flow_sde": 0.7, "flow_cps": 0.8}  # Flow-GRPO's defaults


def sampler_for(cfg, adapter, evaluation: bool = False) -> ChainSampler:
    """The sampler a task's ``sampler`` section names, for ``adapter``. ``evaluation=True`` gives
    the evaluation sampler of a text-to-image task (DDIM eta 0 / the flow ODE, eval_num_steps)."""
    table = ENV_SAMPLERS if cfg.kind == "env" and cfg.sampler.name in ENV_SAMPLERS else SAMPLERS
    module, _, fn = table[cfg.sampler.name].partition(":")
    return getattr(importlib.import_module(module), fn)(cfg.sampler, adapter, evaluation)


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
    cps_logprob: str = "flow_grpo",
    window_schedule: str = "random",
    window_shift_interval: int = 25,
    window_stride: int = 1,
    ode_solver: str = "euler",
    ode_compress: float = 1.0,
):
    """A text-to-image sampler by name and scheduler config; ``deterministic=True`` gives its
    evaluation version (eta 0 / noise 0)."""
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
            cps_logprob=cps_logprob,
            window_schedule=window_schedule,
            window_shift_interval=window_shift_interval,
            window_stride=window_stride,
            ode_solver="euler" if deterministic else ode_solver,
            ode_compress=1.0 if deterministic else ode_compress,
        )
    if name == "lcm":
        from flowrl.samplers.lcm import LCMSampler

        return LCMSampler(scheduler_config, num_steps, logprob_reduction)
    raise ValueError(f"unknown sampler {name!r}; choose one of {tuple(SAMPLERS)}")


def known_family(cfg) -> str | None:
    """The model family when it is known without loading anything (set, built in, or a local
    folder's model_index.json / policy.json); None when it takes the hub."""
    from flowrl.models import BUILTIN_MODELS, detect_family

    m = cfg.model
    if m.family != "auto":
        return m.family
    if m.pretrained in BUILTIN_MODELS:
        return "sd"
    if m.pretrained is not None:
        from pathlib import Path

        folder = Path(m.pretrained).expanduser()
        if (folder / "model_index.json").is_file() or (folder / "policy.json").is_file():
            try:
                return detect_family(m.pretrained)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError(str(e)) from e
    return None


def check_fits(cfg, family: str) -> None:
    """The sampler fits the family (and the family the task's kind); fills a null sampler.name."""
    from flowrl.models import FAMILIES

    f = FAMILIES[family]
    if f.kind != cfg.kind:
        raise ConfigError(
            f"model.family={family!r} is a {f.kind} model and this task is kind: {cfg.kind}; use one of "
            f"{[n for n, ff in FAMILIES.items() if ff.kind == cfg.kind]}"
        )
    s = cfg.sampler
    if s.name is None:
        s.name = f.samplers[0]
    if s.name not in f.samplers:
        raise ConfigError(
            f"sampler.name {s.name!r} does not fit model family {family!r}; use sampler.name={f.samplers[0]}"
            + (f" (or one of {list(f.samplers)})" if len(f.samplers) > 1 else "")
        )


def validate_sampler(cfg) -> None:
    """The ``sampler`` section's checks (names the field and the fix), as far as the task is known
    before any weights load."""
    from flowrl.models import FAMILIES

    s, m = cfg.sampler, cfg.model
    if m.family != "auto" and m.family not in FAMILIES:
        raise ConfigError(
            f"model.family: unknown family {m.family!r}{_suggest(m.family, [*FAMILIES, 'auto'])}; "
            f"choose one of {['auto', *FAMILIES]}"
        )
    if s.name is not None and s.name not in SAMPLERS:
        raise ConfigError(
            f"sampler.name: unknown sampler {s.name!r}{_suggest(s.name, SAMPLERS)}; choose one of {list(SAMPLERS)}"
        )
    family = known_family(cfg)
    if family is not None:
        check_fits(cfg, family)
    needs_log_probs = cfg.method.objective_class().needs_log_probs
    if s.name == "gaussian":  # the Gaussian heads' options (Gaussian MLP, residual, DSRL)
        from flowrl.samplers.gaussian import validate as validate_head

        validate_head(cfg)
    if s.num_steps < 1:
        raise ConfigError(
            f"sampler.num_steps must be >= 1, got {s.num_steps}: a chain needs at least one denoising step; "
            f"set e.g. sampler.num_steps={4 if cfg.kind == 'env' else 20}"
        )
    if s.eval_num_steps is not None and s.eval_num_steps < 1:
        raise ConfigError(
            f"sampler.eval_num_steps must be >= 1 or null, got {s.eval_num_steps}; "
            "set sampler.eval_num_steps=null to evaluate with sampler.num_steps"
        )
    if s.noise_level is not None and (s.noise_level < 0 or (needs_log_probs and s.noise_level == 0)):
        raise ConfigError(
            f"sampler.noise_level must be > 0 or null, got {s.noise_level}: noise level 0 is the ODE and has no "
            "log-prob; set sampler.noise_level=null for Flow-GRPO's default"
        )
    if not 0 <= s.sde_window <= s.num_steps:
        raise ConfigError(
            f"sampler.sde_window must be in [0, sampler.num_steps={s.num_steps}], got {s.sde_window}; "
            "set 0 for every step stochastic, or a window of a few steps"
        )
    if s.window_schedule not in ("random", "progressive"):
        raise ConfigError(
            f"sampler.window_schedule must be random (Flow-GRPO-Fast) or progressive (MixGRPO), got "
            f"{s.window_schedule!r}"
        )
    if s.window_shift_interval < 1 or s.window_stride < 0:
        raise ConfigError(
            f"sampler.window_shift_interval must be >= 1 and sampler.window_stride >= 0, got "
            f"{s.window_shift_interval} and {s.window_stride}; MixGRPO's are 25 and 1"
        )
    if s.window_max_start is not None and s.window_max_start < 0:
        raise ConfigError(
            f"sampler.window_max_start must be >= 0 or null, got {s.window_max_start}; null: the schedule's default"
        )
    if s.group_same_noise and (cfg.kind != "text_to_image" or getattr(m, "noise_policy", None) is not None):
        raise ConfigError(
            "sampler.group_same_noise shares one N(0, I) initial noise per prompt draw of a text-to-image task; "
            "it does not apply to this task (an env, or a model.noise_policy that draws x_T): set it to false"
        )
    if s.ode_solver not in ("euler", "dpmpp2m") or not 0 < s.ode_compress <= 1:
        raise ConfigError(
            f"sampler.ode_solver must be euler or dpmpp2m and sampler.ode_compress in (0, 1], got "
            f"{s.ode_solver!r} and {s.ode_compress}; MixGRPO-Flash's are dpmpp2m and 0.4"
        )
    if s.ode_compress < 1 and (
        s.ode_solver != "dpmpp2m" or s.window_schedule != "progressive" or not s.sde_window
    ):
        raise ConfigError(
            "sampler.ode_compress < 1 compresses the ODE steps after a progressive SDE window (MixGRPO-Flash); "
            "set sampler.ode_solver=dpmpp2m, sampler.window_schedule=progressive and sampler.sde_window > 0, "
            "or sampler.ode_compress=1"
        )
    if s.ode_solver != "euler" and (
        cfg.kind != "text_to_image" or s.name not in (None, "flow_sde", "flow_cps")
    ):
        raise ConfigError(
            f"sampler.ode_solver={s.ode_solver} applies to the flow samplers (flow_sde, flow_cps), not "
            f"{s.name!r}; set sampler.ode_solver=euler"
        )
    if s.window_schedule == "progressive" and s.sde_window == 0:
        raise ConfigError(
            "sampler.window_schedule=progressive slides an SDE window, but sampler.sde_window=0 makes every "
            "step stochastic; set sampler.sde_window (MixGRPO: 4)"
        )
    if (
        s.name in (None, "ddim")
        and cfg.kind == "text_to_image"
        and (s.eta < 0 or (needs_log_probs and s.eta == 0))
    ):
        raise ConfigError(
            f"sampler.eta must be > 0 for training, got {s.eta}: eta=0 is deterministic DDIM and has no "
            "log-prob; set sampler.eta=1.0 (DDPO)"
        )
    if s.guidance_scale < 1.0:
        raise ConfigError(
            f"sampler.guidance_scale must be >= 1, got {s.guidance_scale}; set sampler.guidance_scale=1 "
            "for no classifier-free guidance"
        )
    if s.logprob_reduction not in ("mean", "sum"):
        raise ConfigError(
            f"sampler.logprob_reduction: unknown reduction {s.logprob_reduction!r}; "
            "set sampler.logprob_reduction=mean (DDPO, Flow-GRPO) or sum"
        )
    if s.name == "ddim" and cfg.kind == "env":
        if not 1 <= s.ft_steps <= s.num_steps <= m.num_train_steps:
            raise ConfigError(
                f"sampler.ft_steps <= sampler.num_steps <= model.num_train_steps must hold for DPPO's DDIM, got "
                f"{s.ft_steps}, {s.num_steps}, {m.num_train_steps}; DPPO: 5 DDIM steps, all fine-tuned, of 100"
            )
    if s.logprob_horizon is not None and not 1 <= s.logprob_horizon <= m.action_horizon:
        raise ConfigError(
            f"sampler.logprob_horizon must be in [1, model.action_horizon={m.action_horizon}] or null, got "
            f"{s.logprob_horizon}; DPPO's reward_horizon is env.action_steps"
        )
    if s.name == "ddpm":
        if not 1 <= s.ft_steps <= m.num_train_steps:
            raise ConfigError(
                f"sampler.ft_steps must be in [1, model.num_train_steps={m.num_train_steps}], got {s.ft_steps}"
            )
        if s.min_std <= 0:
            raise ConfigError(
                f"sampler.min_std must be > 0 (the last DDPM step has no other noise), got {s.min_std}"
            )
    if not 0 < s.noise_min_std <= s.noise_max_std:
        raise ConfigError(
            "sampler.noise_min_std and noise_max_std must satisfy 0 < min <= max, got "
            f"{s.noise_min_std}, {s.noise_max_std}"
        )
    if s.noise_std < 0:
        raise ConfigError(f"sampler.noise_std must be >= 0, got {s.noise_std}; set 0 for the plain ODE")
    if needs_log_probs and s.name == "euler" and s.noise_std == 0:
        raise ConfigError(
            f"sampler.name=euler with sampler.noise_std=0 is the deterministic ODE, with no per-step log-prob for "
            f"{cfg.algorithm.name}; set sampler.noise_std > 0, use sampler.name=reinflow, or a likelihood-free "
            "method such as algorithm.name=fpo"
        )


__all__ = [
    "SAMPLERS",
    "ChainSampler",
    "DDIMSampler",
    "StepOutput",
    "build_sampler",
    "gaussian_log_prob",
    "reduce_event",
    "sampler_for",
    "validate_sampler",
]

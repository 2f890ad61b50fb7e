"""Flow-matching SDE samplers as Gaussian policies (Flow-GRPO, Liu et al. 2025,
https://arxiv.org/abs/2505.05470; coefficient-preserving sampling (CPS), Wang et al. 2025,
https://arxiv.org/abs/2509.05952).

Rectified flow: x_s = (1 - s) x_0 + s eps, the network predicts the velocity v = eps - x_0, and
sampling integrates s from 1 (noise) to 0 (data) over the scheduler's sigmas.

Notation:
    sigma       -> s        current noise level (the flow time), in (0, 1]
    sigma_next  -> s'       the level the step lands on, s' < s
    dt          -> s' - s   (negative)
    noise_level -> a        the SDE's noise scale

SDE step (Flow-GRPO, eq. 8, Euler-Maruyama of the marginal-preserving reverse SDE):

    sigma_s = a * sqrt(s / (1 - s))      at s = 1: a * sqrt(1 / (1 - sigmas[1])), as Flow-GRPO's code
                                         (only the denominator's s is replaced)
    mean    = x + [v + sigma_s^2 / (2 s) * (x + (1 - s) v)] dt
    std     = sigma_s * sqrt(-dt)

CPS step (keeps the coefficients of x_0 and eps those of the marginal at s'):

    x0_hat  = x - s v,   eps_hat = x + (1 - s) v
    std     = s' * sin(a * pi / 2)
    mean    = (1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat

Log-probs: the SDE's is the Gaussian log-density, reduced over the event (Flow-GRPO: the mean).
CPS's is, by default, Flow-GRPO's unnormalised -(x' - mean)^2 (its code drops every constant,
the 1 / (2 std^2) included, so a log-ratio is 2 std^2 times the density's and the clip range is a
trust region on that scale); ``cps_logprob="normalized"`` gives the true Gaussian log-density, whose
log-ratio does not depend on the step's noise level (one clip range means the same at every step).

With a = 0 both reduce to the Euler ODE step x' = x + dt * v (diffusers'
FlowMatchEulerDiscreteScheduler.step). Steps outside the SDE window are ODE steps: deterministic,
log-prob NaN, not trained. Under CPS the last step lands on s' = 0, so its std is 0: it is
deterministic too (log-prob NaN, never trained).

The SDE window of w = ``sde_window`` consecutive steps (0: every step stochastic) is placed by
``window_schedule``:

    random       (Flow-GRPO-Fast) start ~ U{0, ..., min(window_max_start, K - w)}, one draw per batch
    progressive  (MixGRPO, Li et al. 2025, arXiv 2507.21802; its GRPOTrainingStates "progressive" with
                 prog_overlap and roll_back) a sliding window that moves with the epoch e:
                 start(e) = stride * ((e // interval) mod P),  P = window_max_start // stride + 1
                 (stride 0: start 0 always), window = {start, ..., min(start + w, K - 2) - 1}
                 (MixGRPO's max_timesteps = K - 2: the last two steps stay ODE steps); the default
                 window_max_start is K - 3, the last start whose window is not empty

The progressive window is a pure function of the epoch the collector passes to :meth:`set_epoch`
(the epoch counter is in every checkpoint, so a resumed run slides it exactly as the uninterrupted
one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowrl.core.gaussian import gaussian_log_prob, reduce_event
from flowrl.core.seeding import draw_device, randn
from flowrl.samplers.base import ChainSampler, StepOutput, check_reduction
from flowrl.samplers.dpm import ODE_SOLVERS, compressed_sigmas, dpmpp_2m_step

FLOW_SAMPLERS = ("flow_sde", "flow_cps")


class FlowSampler(ChainSampler):
    """Flow-GRPO SDE (``kind="sde"``) or CPS (``kind="cps"``) over a FlowMatchEulerDiscrete schedule.

    Args:
        scheduler_config: the pipeline's ``FlowMatchEulerDiscreteScheduler`` config (shift and
            dynamic shifting honoured as the scheduler computes its sigmas).
        num_steps: K denoising steps.
        noise_level: a (Flow-GRPO: 0.7 for the SDE; CPS: 0.8). 0 gives the deterministic ODE.
        kind: ``"sde"`` or ``"cps"``.
        sde_window: 0 = every step is stochastic; w > 0 = only a window of w consecutive steps.
        window_max_start: last allowed window start (``random``: default K // 2 - sde_window, the
            window in the first half of the chain, as Flow-GRPO-Fast's randint(0, K // 2 - window)
            with its sde_window_range (0, K // 2); ``progressive``: default K - 3).
        window_schedule: ``"random"`` (Flow-GRPO-Fast: the start drawn per batch from [0,
            window_max_start]) or ``"progressive"`` (MixGRPO: the window slides with the epoch).
        window_shift_interval: progressive: epochs the window stays in place (MixGRPO's iters_per_group, 25).
        window_stride: progressive: steps it moves by (MixGRPO's prog_overlap_step, 1; 0 = fixed at 0).
        logprob_reduction: ``"mean"`` (as Flow-GRPO) or ``"sum"``.
        image_seq_len: for schedulers with dynamic shifting, the token count that sets mu (null:
            the config's ``_image_seq_len``, which the SD3 and Flux adapters record, else base_image_seq_len).
        cps_logprob: CPS only: ``"flow_grpo"`` (default, Flow-GRPO's -(x' - mean)^2) or
            ``"normalized"`` (the Gaussian log-density).
        sigma_schedule: the base sigmas before shifting, as the family's pipeline chooses them:
            ``"timesteps"`` (the scheduler's own linspace over its shifted range; SD3) or ``"flux"``
            (linspace(1, 1/K, K); FluxPipeline). Null: the config's ``_sigma_schedule``, else
            ``"timesteps"``. (Private ``_`` keys are ignored by diffusers' ``from_config``.)
    """

    def __init__(
        self,
        scheduler_config: dict,
        num_steps: int = 10,
        noise_level: float = 0.7,
        kind: str = "sde",
        sde_window: int = 0,
        window_max_start: int | None = None,
        logprob_reduction: str = "mean",
        image_seq_len: int | None = None,
        sigma_schedule: str | None = None,
        cps_logprob: str = "flow_grpo",
        window_schedule: str = "random",
        window_shift_interval: int = 25,
        window_stride: int = 1,
        ode_solver: str = "euler",
        ode_compress: float = 1.0,
    ):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        if kind not in ("sde", "cps"):
            raise ValueError(f"flow sampler kind must be 'sde' or 'cps', got {kind!r}")
        if num_steps < 2:
            raise ValueError(f"sampler.num_steps must be >= 2 for a flow sampler, got {num_steps}")
        if noise_level < 0 or (kind == "cps" and noise_level > 1):
            raise ValueError(f"sampler.noise_level must be >= 0 (and <= 1 for CPS), got {noise_level}")
        if not 0 <= sde_window <= num_steps:
            raise ValueError(f"sampler.sde_window must be in [0, num_steps={num_steps}], got {sde_window}")
        check_reduction(logprob_reduction)
        if window_schedule not in ("random", "progressive"):
            raise ValueError(
                f"sampler.window_schedule must be 'random' or 'progressive', got {window_schedule!r}"
            )
        if window_shift_interval < 1 or window_stride < 0:
            raise ValueError(
                f"sampler.window_shift_interval must be >= 1 and window_stride >= 0, got "
                f"{window_shift_interval}, {window_stride}"
            )
        self.window_schedule = window_schedule
        self.window_shift_interval, self.window_stride = window_shift_interval, window_stride
        self.epoch = 0
        if cps_logprob not in ("flow_grpo", "normalized"):
            raise ValueError(f"sampler.cps_logprob must be 'flow_grpo' or 'normalized', got {cps_logprob!r}")
        self.cps_logprob = cps_logprob
        if ode_solver not in ODE_SOLVERS or not 0 < ode_compress <= 1:
            raise ValueError(
                f"sampler.ode_solver must be one of {ODE_SOLVERS} and ode_compress in (0, 1], got "
                f"{ode_solver!r}, {ode_compress}"
            )
        if ode_compress < 1 and (
            ode_solver != "dpmpp2m" or window_schedule != "progressive" or not sde_window
        ):
            raise ValueError(
                "sampler.ode_compress < 1 compresses the ODE steps after a progressive SDE window (MixGRPO-Flash); "
                "set ode_solver=dpmpp2m, window_schedule=progressive and sde_window > 0, or ode_compress=1"
            )
        self.ode_solver, self.ode_compress = ode_solver, ode_compress
        self._ode = None  # while sampling: the previous step's (k, s, x0_hat), and the first DPM step
        sigma_schedule = sigma_schedule or scheduler_config.get("_sigma_schedule") or "timesteps"
        if sigma_schedule not in ("timesteps", "flux"):
            raise ValueError(
                f"flow sampler sigma_schedule must be 'timesteps' or 'flux', got {sigma_schedule!r}"
            )
        image_seq_len = image_seq_len or scheduler_config.get("_image_seq_len")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        kwargs = {}
        if sigma_schedule == "flux":
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            cfg = scheduler.config
            kwargs["mu"] = calculate_shift(
                image_seq_len or cfg.get("base_image_seq_len", 256),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, **kwargs)
        self._scheduler, self._mu = scheduler, kwargs.get("mu")
        self.config = scheduler.config
        self.sigma_schedule = sigma_schedule
        self.num_steps = num_steps
        self.noise_level = noise_level
        self.kind = kind
        self.name = f"flow_{kind}"
        self.sde_window = sde_window
        default_start = (
            max(0, num_steps // 2 - sde_window) if window_schedule == "random" else max(0, num_steps - 3)
        )
        self.window_max_start = default_start if window_max_start is None else window_max_start
        self.logprob_reduction = logprob_reduction
        self.prediction_type = "flow"
        self.sigmas = scheduler.sigmas.float().cpu()  # (K+1,) from ~1 down to 0
        self.timesteps = scheduler.timesteps.float().cpu()  # (K,) = sigmas[:-1] * num_train_timesteps
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        # the network's time input is s * 1000, as the SD3 pipeline feeds it
        self.model_timesteps = self.sigmas[:-1] * self.num_train_timesteps
        self.next_timesteps = self.sigmas[1:] * self.num_train_timesteps
        self.full_sigmas, self.full_num_steps = self.sigmas, num_steps  # before any ode_compress

    # ------------------------------------------------------------------ one step
    def step(
        self,
        model_output: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        sample: Tensor,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        noise_level: float | None = None,
    ) -> StepOutput:
        """One SDE/CPS transition in float32. ``sigma``, ``sigma_next``: (B,) noise levels s, s'."""
        a = self.noise_level if noise_level is None else noise_level
        v, x = model_output.float(), sample.float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        s, s_next = sigma.float().to(x.device).view(shape), sigma_next.float().to(x.device).view(shape)
        dt = s_next - s
        pred_original = x - s * v  # x0_hat
        if self.kind == "sde":
            # 1. sigma_s = a sqrt(s / (1 - s)); at s = 1 the denominator's s becomes sigmas[1] (as Flow-GRPO)
            s_den = torch.where(s >= 1, torch.full_like(s, float(self.sigmas[1])), s)
            sigma_s = a * (s / (1 - s_den)).sqrt()
            # 2. drift of the marginal-preserving SDE, Euler-Maruyama step of size dt < 0
            mean = x + (v + sigma_s**2 / (2 * s) * (x + (1 - s) * v)) * dt
            std = sigma_s * (-dt).sqrt()
        else:
            # 1. CPS std and the noise estimate
            std = s_next * math.sin(a * math.pi / 2) * torch.ones_like(s)
            pred_noise = x + (1 - s) * v
            # 2. mean with the marginal's coefficients at s'
            mean = (1 - s_next) * pred_original + (s_next**2 - std**2).clamp(min=0).sqrt() * pred_noise
        if prev_sample is None:
            if noise is None:
                noise = randn(x.shape, generator, x.device)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        if not (std > 0).all():
            log_prob = torch.full((x.shape[0],), float("nan"), device=x.device)
        elif self.kind == "cps" and self.cps_logprob == "flow_grpo":
            log_prob = reduce_event(-((prev_sample.detach() - mean) ** 2), self.logprob_reduction)
        else:
            log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, self.logprob_reduction)
        return StepOutput(prev_sample, mean, std, log_prob, pred_original)

    def step_dt(self, k: Tensor) -> Tensor:
        """(P,) |dt| = s - s' of steps k (P,), on the CPU (GRPO-Guard's gradient reweighting)."""
        k = k.cpu()
        return self.sigmas[k] - self.sigmas[k + 1]

    def flow_grpo_kl_std(self, k: Tensor, std: Tensor) -> Tensor:
        """The std Flow-GRPO's KL term divides by, for steps k (P,) with transition stds ``std``:
        the SDE's sigma_s = std / sqrt(|dt|) (its code omits the step's |dt|), CPS's own std."""
        if self.kind == "cps":
            return std
        k = k.cpu()
        dt = (self.sigmas[k] - self.sigmas[k + 1]).to(std.device).view((-1,) + (1,) * (std.ndim - 1))
        return std / dt.sqrt()

    def set_epoch(self, epoch: int) -> dict:
        """The epoch about to be sampled (the progressive window's position); returns what to log."""
        self.epoch = epoch
        if self.window_schedule != "progressive" or self.sde_window == 0 or self.noise_level == 0:
            return {}
        start = self.window_start(epoch)
        if self.ode_compress < 1:  # MixGRPO-Flash: fewer ODE levels after this epoch's window
            last = min(start + self.sde_window, self.full_num_steps - 2) - 1
            self._set_sigmas(compressed_sigmas(self.full_sigmas, last, self.ode_compress, self._warp))
            return {"sde_window_start": start, "chain_steps": self.num_steps}
        return {"sde_window_start": start}

    def _warp(self, t: Tensor) -> Tensor:
        """The scheduler's shift of unshifted times t (float64): static, or dynamic with mu."""
        if self.config.get("use_dynamic_shifting", False):
            return self._scheduler.time_shift(self._mu, 1.0, t)
        shift = self.config.shift
        return shift * t / (1 + (shift - 1) * t)

    def _set_sigmas(self, sigmas: Tensor) -> None:
        self.sigmas, self.num_steps = sigmas, len(sigmas) - 1
        self.model_timesteps = self.sigmas[:-1] * self.num_train_timesteps
        self.next_timesteps = self.sigmas[1:] * self.num_train_timesteps

    def sample(self, *args, **kwargs):
        """The chain (:meth:`ChainSampler.sample`); with ``ode_solver="dpmpp2m"`` the ODE steps after
        the last SDE step are DPM-Solver++(2M) steps (:mod:`flowrl.samplers.dpm`)."""
        if self.ode_solver == "euler":
            return super().sample(*args, **kwargs)
        self._ode = {"prev": None, "from": 0}  # stochastic_steps moves "from" past the window
        try:
            return super().sample(*args, **kwargs)
        finally:
            self._ode = None

    def window_start(self, epoch: int) -> int:
        """MixGRPO's window start at ``epoch``: it moves by the stride every interval epochs and
        rolls back to 0 once past window_max_start."""
        if self.window_stride == 0:
            return 0
        positions = self.window_max_start // self.window_stride + 1
        return self.window_stride * ((epoch // self.window_shift_interval) % positions)

    def stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        """The stochastic steps of one batch: all K, a window of ``sde_window`` steps whose start
        is drawn from [0, window_max_start] (Flow-GRPO-Fast), or MixGRPO's sliding window at the
        epoch of :meth:`set_epoch` (no draw from the generator)."""
        steps = self._stochastic_steps(generator)
        if self._ode is not None:  # DPM-Solver++ after the window's last step (MixGRPO-Flash "post")
            self._ode["from"] = max(steps) + 1 if steps else 0
        return steps

    def _stochastic_steps(self, generator: torch.Generator | None = None) -> set[int]:
        if self.noise_level == 0:
            return set()
        if self.sde_window == 0:
            return set(range(self.num_steps))
        if self.window_schedule == "progressive":
            start = self.window_start(self.epoch)
            return set(range(start, min(start + self.sde_window, self.full_num_steps - 2)))
        hi = min(self.window_max_start, self.num_steps - self.sde_window)
        start = 0
        if hi > 0:
            where = draw_device(generator, "cpu")
            start = int(torch.randint(0, hi + 1, (1,), generator=generator, device=where).item())
        return set(range(start, start + self.sde_window))

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
        """Step k (B,): SDE/CPS with the sampler's noise level, or the ODE step when not stochastic
        (Euler; DPM-Solver++(2M) after the window with ``ode_solver="dpmpp2m"``, while sampling)."""
        s, s_next = self.sigmas[k], self.sigmas[k + 1]
        ode = self._ode if prev_sample is None else None
        if ode is not None:
            j, x = int(k[0]), sample.float()
            x0 = x - float(s[0]) * model_output.float()
            prev, ode["prev"] = ode["prev"], (j, float(s[0]), x0)
            if not stochastic and j >= ode["from"]:
                hist = prev if prev is not None and prev[0] == j - 1 else (None, None, None)
                y = dpmpp_2m_step(x, x0, float(s[0]), float(s_next[0]), hist[2], hist[1])
                nan = torch.full((x.shape[0],), float("nan"), device=x.device)
                return StepOutput(y, y, torch.zeros((x.shape[0],) + (1,) * (x.ndim - 1)).to(x), nan, x0)
        return self.step(
            model_output,
            s,
            s_next,
            sample,
            prev_sample,
            generator,
            noise,
            noise_level=None if stochastic else 0.0,
        )

    # ------------------------------------------------------------------ the forward process
    def denoising_loss(self, adapter, x0, cond, k, noise, guidance_scale=1.0, target="eps") -> Tensor:
        """(B,) the conditional flow-matching loss at x0 noised to the level s = sigmas[k] of step k:

            x_s = (1 - s) x0 + s eps,   v_theta(x_s, 1000 s, c) ~ eps - x0   (rectified flow)

        ``target="eps"``: mean (eps - eps_hat)^2 with eps_hat = x_s + (1 - s) v_theta, the noise the
        velocity implies (FPO's default, "u_but_supervise_as_eps"); ``"model"``: mean (v_theta -
        (eps - x0))^2, the network's own regression target."""
        x0, noise = x0.float(), noise.float()
        shape = (-1,) + (1,) * (x0.ndim - 1)
        s = self.sigmas[k.cpu()].to(x0.device).view(shape)
        x_s = (1 - s) * x0 + s * noise
        v = self.predict(adapter, x_s, k, cond, guidance_scale).float()
        err = noise - (x_s + (1 - s) * v) if target == "eps" else v - (noise - x0)
        return err.pow(2).mean(dim=tuple(range(1, x0.ndim)))


def from_config(sc, adapter, evaluation: bool = False) -> FlowSampler:
    """A task's flow SDE / CPS chain (``evaluation``: the ODE over ``eval_num_steps``)."""
    from flowrl.samplers import DEFAULT_NOISE_LEVEL

    steps = (sc.eval_num_steps or sc.num_steps) if evaluation else sc.num_steps
    level = DEFAULT_NOISE_LEVEL[sc.name] if sc.noise_level is None else sc.noise_level
    return FlowSampler(
        adapter.scheduler_config,
        steps,
        0.0 if evaluation else level,
        kind=sc.name.removeprefix("flow_"),
        sde_window=0 if evaluation else sc.sde_window,
        window_max_start=sc.window_max_start,
        logprob_reduction=sc.logprob_reduction,
        cps_logprob=sc.cps_logprob,
        window_schedule=sc.window_schedule,
        window_shift_interval=sc.window_shift_interval,
        window_stride=sc.window_stride,
        ode_solver="euler" if evaluation else sc.ode_solver,
        ode_compress=1.0 if evaluation else sc.ode_compress,
    )

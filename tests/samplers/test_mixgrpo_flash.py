"""MixGRPO-Flash (Li et al. 2025, arXiv 2507.21802; github.com/Tencent-Hunyuan/MixGRPO, its
sampling_utils.py dpm_step with dpmsolver++, order 2, midpoint, the "post" strategy):
``sampler.ode_solver=dpmpp2m`` makes the ODE steps after the SDE window DPM-Solver++(2M) steps.

Checked here: an all-ODE chain against diffusers' DPMSolverMultistepScheduler (flow sigmas, flow
prediction, the same levels); on Gaussian data, whose probability-flow ODE has the exact solution
x(0) = c x(1), DPM-Solver++(2M) at K steps beats Euler at K and at 2K steps; on the tiny SD3 model the
window's SDE steps and their log-probs are bit-identical to the Euler chain's, re-evaluating them
gives ratio exactly 1, and every step after the window is the 2M midpoint formula in log-SNR form
written here; the compressed schedule (dpm_post_compress_ratio) against the reference's
sd3_time_shift(shift, linspace(t_{L+1}, 0, n))."""

import copy
import math

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models import build_adapter
from flowrl.samplers import build_sampler

PROMPTS = ["a cat", "a red square"]


class GaussianFlow:
    """The exact velocity of rectified flow from N(0, c^2 I) data: x_s = (1 - s) x0 + s eps has
    variance v_s = (1 - s)^2 c^2 + s^2, and E[eps - x0 | x_s = x] = (s - (1 - s) c^2) / v_s x. Its
    probability-flow ODE keeps x / sqrt(v_s) constant: x(0) = c x(1)."""

    device = torch.device("cpu")
    noise_policy = None

    def __init__(self, c: float, shape=(4, 8, 8)):
        self.c, self.latent_shape = c, shape

    def condition(self, inputs, guidance_scale=1.0):
        return {}

    def __call__(self, x, t, cond, guidance_scale=1.0):
        s = (t.double() / 1000).view(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * self.c**2 + s**2
        return ((s - (1 - s) * self.c**2) / var * x.double()).float()


def _config(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift).config


def _lam(s):
    return math.log((1 - s) / s) if 0 < s < 1 else (math.inf if s <= 0 else -math.inf)


def test_all_ode_chain_matches_diffusers_dpm_solver_pp_2m():
    from diffusers import DPMSolverMultistepScheduler

    K, model = 8, GaussianFlow(0.3)
    sampler = build_sampler("flow_sde", _config(), K, ode_solver="dpmpp2m", noise_level=0.7)
    x1 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    chain = sampler.sample(model, ["a", "b"], 1.0, latents=x1, deterministic=True)
    ref = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    ref.set_timesteps(K)
    ref.sigmas, ref.timesteps = sampler.sigmas.clone(), sampler.model_timesteps.clone()
    ref.set_begin_index(0)
    x = x1.clone()
    for k in range(K):
        v = model(x, sampler.model_timesteps[k].expand(2), {})
        x = ref.step(v, ref.timesteps[k], x).prev_sample
        torch.testing.assert_close(chain.latents[:, k + 1], x, rtol=1e-5, atol=1e-5)
    assert torch.isnan(chain.log_probs).all()
    # the same chain with the Euler solver is a different chain (the solver is in use)
    euler = build_sampler("flow_sde", _config(), K, noise_level=0.7)
    other = euler.sample(model, ["a", "b"], 1.0, latents=x1, deterministic=True)
    assert not torch.allclose(other.latents[:, -1], chain.latents[:, -1], atol=1e-4)


def test_fewer_steps_accuracy_on_the_exact_gaussian_solution():
    """x(0) = c x(1) exactly; the relative error of the final sample, c = 0.3, on Flux's levels
    linspace(1, 1/K, K) unshifted (SD3's diffusers levels end with one long step onto 1/1000, where
    every solver's error is that step's). Measured: dpmpp2m 12 steps 0.029, Euler 12 steps 0.149,
    Euler 48 steps 0.039 (the last step of both solvers lands on x0_hat, first order)."""
    model = GaussianFlow(0.3)
    x1 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    exact = model.c * x1
    config = dict(_config(1.0), _sigma_schedule="flux")

    def error(solver, K):
        sampler = build_sampler("flow_sde", config, K, ode_solver=solver, noise_level=0.7)
        x0 = sampler.sample(model, ["a", "b"], 1.0, latents=x1, deterministic=True).latents[:, -1]
        return float((x0 - exact).norm() / exact.norm())

    dpm12, euler12, euler48 = error("dpmpp2m", 12), error("euler", 12), error("euler", 48)
    assert dpm12 < euler48 < euler12, (dpm12, euler12, euler48)
    assert dpm12 < 0.25 * euler12, (dpm12, euler12)


@pytest.fixture(scope="module")
def sd3():
    from flowrl.models.sd3 import build_tiny_sd3_pipeline
    from tests.conftest import perturb_lora

    adapter = build_adapter(copy.deepcopy(build_tiny_sd3_pipeline()), "sd3", "lora", lora_rank=4)
    perturb_lora(adapter)
    return adapter


def _pair(sd3, K, epoch, **kw):
    common = dict(noise_level=0.7, sde_window=2, window_schedule="progressive", window_shift_interval=2)
    out = []
    for solver in ("euler", "dpmpp2m"):
        sampler = build_sampler("flow_sde", sd3.scheduler_config, K, ode_solver=solver, **common, **kw)
        sampler.set_epoch(epoch)
        out.append(sampler)
    return out


def test_window_unchanged_ratio_one_and_2m_after_the_window(sd3):
    K, epoch = 7, 4  # start (4 // 2) * 1 = 2: SDE steps 2 and 3; Euler 0, 1; DPM-Solver++ 4..6
    euler, flash = _pair(sd3, K, epoch)
    ce = euler.sample(sd3, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    cf = flash.sample(sd3, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    finite = torch.isfinite(cf.log_probs)
    assert finite.any(0).nonzero().flatten().tolist() == [2, 3] and (finite == finite[0]).all()
    assert torch.equal(ce.latents[:, :5], cf.latents[:, :5])  # up to the window's landing state
    assert torch.equal(ce.log_probs[:, 2:4], cf.log_probs[:, 2:4])
    assert not torch.allclose(ce.latents[:, -1], cf.latents[:, -1], atol=1e-4)
    # on-policy: re-evaluating the window steps reproduces the recorded log-probs exactly
    for k in (2, 3):
        with torch.no_grad():
            out = flash.log_prob(sd3, cf, torch.full((len(PROMPTS),), k))
        assert torch.equal(out.log_prob, cf.log_probs[:, k])
    # after the window: x' = (s'/s) x - alpha' (e^-h - 1) (D0 + D1 / 2), D1 = (h / h0)(D0 - x0_prev)
    sig, cond = flash.sigmas.double(), sd3.condition(PROMPTS, 1.0)
    x0 = {}
    for k in range(K):
        with torch.no_grad():
            v = sd3(cf.latents[:, k], flash.model_timesteps[k].expand(len(PROMPTS)), cond, 1.0).double()
        x = cf.latents[:, k].double()
        x0[k] = x - float(sig[k]) * v
        if k < 4:
            continue
        s, s2, sp = float(sig[k]), float(sig[k + 1]), float(sig[k - 1])
        if s2 == 0:  # the last step: first order, onto x0_hat
            want = x0[k]
        else:
            h, h0 = _lam(s2) - _lam(s), _lam(s) - _lam(sp)
            d = x0[k] + 0.5 * (h / h0) * (x0[k] - x0[k - 1])
            want = (s2 / s) * x - (1 - s2) * (math.exp(-h) - 1) * d
        torch.testing.assert_close(cf.latents[:, k + 1].double(), want, rtol=1e-4, atol=1e-4)


def test_compressed_schedule_as_the_reference(sd3):
    shift, K, ratio = 3.0, 25, 0.4
    sampler = build_sampler(
        "flow_sde", _config(shift), K, noise_level=0.7, sde_window=4, window_schedule="progressive",
        window_shift_interval=20, window_stride=1, ode_solver="dpmpp2m", ode_compress=ratio,
    )  # fmt: skip
    full = sampler.full_sigmas.double()
    for epoch, start in ((0, 0), (45, 2), (20 * 21, 21)):
        log = sampler.set_epoch(epoch)
        last = min(start + 4, K - 2) - 1
        n = max(int((K - last) * ratio), 2)
        s = float(full[last + 1])
        t0 = s / (shift - (shift - 1) * s)  # the static shift's inverse
        t = torch.linspace(t0, 0, n, dtype=torch.float64)
        post = shift * t / (1 + (shift - 1) * t)
        want = torch.cat([full[: last + 1], post])
        torch.testing.assert_close(sampler.sigmas.double(), want, rtol=1e-5, atol=1e-6)
        assert log == {"sde_window_start": start, "chain_steps": last + n}
        assert sampler.num_steps == last + n and len(sampler.model_timesteps) == last + n
    # a chain on the compressed schedule: the window trained with ratio exactly 1, fewer forwards
    small = build_sampler(
        "flow_sde", sd3.scheduler_config, 8, noise_level=0.7, sde_window=2, window_schedule="progressive",
        window_shift_interval=1, ode_solver="dpmpp2m", ode_compress=0.4,
    )  # fmt: skip
    small.set_epoch(1)  # window 1, 2: 6 levels left -> max(int(2.4), 2) = 2, one DPM step onto s = 0
    chain = small.sample(sd3, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    assert chain.num_steps == 4 and float(small.sigmas[-1]) == 0.0
    assert torch.isfinite(chain.log_probs).any(0).nonzero().flatten().tolist() == [1, 2]
    with torch.no_grad():
        out = small.log_prob(sd3, chain, torch.full((len(PROMPTS),), 2))
    assert torch.equal(out.log_prob, chain.log_probs[:, 2])


def test_flash_task_and_config_checks():
    cfg = load_config("mixgrpo_flash_tiny")
    s = cfg.sampler
    assert (s.ode_solver, s.ode_compress, s.window_schedule) == ("dpmpp2m", 0.4, "progressive")
    flux = load_config("mixgrpo_flash_flux", ["model.pretrained=tiny", "model.resolution=64"])
    assert (flux.sampler.ode_solver, flux.sampler.ode_compress, flux.sampler.window_shift_interval) == (
        "dpmpp2m",
        0.4,
        20,
    )
    with pytest.raises(ConfigError, match="ode_solver must be euler or dpmpp2m"):
        load_config("mixgrpo_tiny", ["sampler.ode_solver=heun"])
    with pytest.raises(ConfigError, match="ode_compress < 1 compresses"):
        load_config("flow_grpo_tiny", ["sampler.ode_solver=dpmpp2m", "sampler.ode_compress=0.4"])
    with pytest.raises(ConfigError, match="applies to the flow samplers"):
        load_config("digits", ["sampler.ode_solver=dpmpp2m"])


@pytest.mark.slow
def test_mixgrpo_flash_raises_the_reward_and_resumes_bit_identically(tmp_path):
    """tasks/mixgrpo_flash_tiny.yaml, 8 epochs: the chain compressed to 4, 4, 5, 5, 5, 5, 6, 6 steps
    as the window moves. The reward is the mean over 4 fixed sampling epochs (64 samples from 16
    initial noises), whose seed noise is about 0.0023 kB (tests/samplers/test_mixgrpo.py); the bar is
    3 of those, 0.007, as MixGRPO's. Measured gains on training seeds 0, 1, 2: +0.026, +0.011,
    +0.026 kB. Then the run resumed from its epoch-4 checkpoint ends with the same weights, bit for bit."""
    import shutil

    from flowrl.run import Run

    flags = [f"train.output_dir={tmp_path}", "train.save_every=4"]
    run = Run(load_config("mixgrpo_flash_tiny", flags), progress=False)

    def reward() -> float:
        return float(torch.stack([run.collector.collect(1000 + e)[0].rewards for e in range(4)]).mean())

    before = reward()
    history = run.train()
    final = {k: v.detach().clone() for k, v in run.adapter.trainable_state_dict().items()}
    after = reward()
    assert [r["chain_steps"] for r in history[1:]] == [4, 4, 5, 5, 5, 5, 6, 6]
    assert after - before > 0.007, (before, after)
    shutil.rmtree(run.run_dir / "checkpoints" / "epoch_000008")
    resumed = Run(load_config("mixgrpo_flash_tiny", [*flags, "train.resume=auto"]), progress=False)
    assert resumed.start_epoch == 4
    resumed.train()
    again = resumed.adapter.trainable_state_dict()
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)

"""RLCM's consistency chain (flowrl/samplers/lcm.py) against RLCM's reference formulas written out
by hand (lcm_rl_pytorch/diffusers_patch/lcm_scheduler.py in Owen-Oertell/rlcm), diffusers' own
LCMScheduler.step, and the on-policy ratio exactly 1, middle and last step."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from flowrl.config import load_config
from flowrl.samplers.lcm import RENOISED, LCMSampler, from_config

# diffusers' LCMScheduler defaults, which RLCM's LCMScheduler() also has (and Dreamshaper v7 uses)
CONFIG = dict(LCMScheduler().config)
K = 4
EVENT = (4, 4, 4)


def _alphas_cumprod_by_hand() -> np.ndarray:
    """scaled_linear betas (beta_start 0.00085, beta_end 0.012, 1000 steps), float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _hand_density(x, mean, std):
    """log N(x; mean, std^2) per element, float64 numpy."""
    return -((x - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * math.log(2 * math.pi)


def _inputs(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, *EVENT, generator=g),
        torch.randn(B, *EVENT, generator=g),
        torch.randn(B, *EVENT, generator=g),
    )


# ------------------------------------------------------------------ the schedule
def test_rlcm_schedule_is_the_reference_set_timesteps():
    # RLCM: c = 1000 // 50 = 20, timesteps 19, 39, ..., 999; every (50 // K)-th from the last, the first K
    assert LCMSampler(CONFIG, 4).timesteps.tolist() == [999, 759, 519, 279]
    assert LCMSampler(CONFIG, 8).timesteps.tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    assert LCMSampler(CONFIG, 2).timesteps.tolist() == [999, 499]
    for steps in (2, 4, 8):
        ref = LCMScheduler.from_config(CONFIG)
        ref.set_timesteps(steps)
        ours = LCMSampler(CONFIG, steps, schedule="diffusers")
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        assert ours.next_timesteps.tolist() == ref.timesteps.tolist()[1:] + [-1]


# ------------------------------------------------------------------ one step, by hand
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, K - 1])  # a middle step and the last
def test_step_equals_the_reference_formula_by_hand(k, reduction):
    sampler = LCMSampler(CONFIG, K, logprob_reduction=reduction)
    x, eps, noise = _inputs()
    kb = torch.full((3,), k)
    cond = {"prompt_embeds": torch.zeros(3, 1)}
    step = sampler.transition(kb, eps, x, cond, noise=noise)
    # by hand, float64: RLCM's LCMScheduler.step
    ac = _alphas_cumprod_by_hand()
    t = [999, 759, 519, 279][k]
    a_t = ac[t]
    # after the last timestep the scheduler's "previous timestep" is the current one
    a_prev = ac[[999, 759, 519, 279][k + 1]] if k < K - 1 else a_t
    tau = 10.0 * t
    c_skip, c_out = 0.25 / (tau**2 + 0.25), tau / math.sqrt(tau**2 + 0.25)
    xd, ed, nd = x.double().numpy(), eps.double().numpy(), noise.double().numpy()
    x0 = (xd - math.sqrt(1 - a_t) * ed) / math.sqrt(a_t)
    denoised = c_out * x0 + c_skip * xd
    mean, std = math.sqrt(a_prev) * denoised, math.sqrt(1 - a_prev)
    x_next = mean + std * nd  # the re-noised sample, on the last step too
    dens = _hand_density(x_next, mean, std).reshape(3, -1)
    expected = dens.mean(1) if reduction == "mean" else dens.sum(1)
    np.testing.assert_allclose(step.mean.double().numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step.std.flatten().double().numpy(), [std] * 3, rtol=1e-5)
    np.testing.assert_allclose(step.pred_original_sample.double().numpy(), denoised, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(step.log_prob.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(step.log_prob).all()
    if k < K - 1:
        np.testing.assert_allclose(step.prev_sample.double().numpy(), x_next, rtol=1e-4, atol=1e-5)
        assert RENOISED not in cond
    else:
        # the chain lands on f(x_t), the latent RLCM's pipeline decodes; x_K is kept in the condition
        torch.testing.assert_close(step.prev_sample, step.pred_original_sample, rtol=0, atol=0)
        np.testing.assert_allclose(cond[RENOISED].double().numpy(), x_next, rtol=1e-4, atol=1e-5)
    # the same density through the scheduler-level step, with x_K given
    low = sampler.step(
        eps, sampler.timesteps[kb], sampler.next_timesteps[kb], x, torch.from_numpy(x_next).float()
    )
    np.testing.assert_allclose(low.log_prob.double().numpy(), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ against diffusers' step
@pytest.mark.parametrize("schedule", ["rlcm", "diffusers"])
def test_deterministic_last_step_equals_diffusers_denoised(schedule):
    sampler = LCMSampler(CONFIG, K, last_step="deterministic", schedule=schedule)
    ref = LCMScheduler.from_config(CONFIG)
    ref.set_timesteps(timesteps=sampler.timesteps.tolist())
    x, eps, _ = _inputs(1)
    for k, t in enumerate(ref.timesteps):
        kb = torch.full((3,), k)
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(k))
        step = sampler.transition(kb, eps, x, {}, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(step.pred_original_sample, expected.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
        if k < K - 1:
            assert torch.isfinite(step.log_prob).all()
        else:  # diffusers' last step: prev_sample = denoised, no noise
            torch.testing.assert_close(step.prev_sample, expected.denoised, rtol=1e-5, atol=1e-5)
            assert (step.std == 0).all() and torch.isnan(step.log_prob).all()
    # the default chain draws the same noise and lands on the same f(x_t), with a finite last log-prob
    renoise = LCMSampler(CONFIG, K, schedule=schedule)
    kb = torch.full((3,), K - 1)
    a = renoise.transition(kb, eps, x, {}, generator=torch.Generator().manual_seed(0))
    b = sampler.transition(kb, eps, x, {}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=0)
    assert torch.isfinite(a.log_prob).all()


# ------------------------------------------------------------------ on-policy ratio 1
@pytest.mark.parametrize("last_step", ["renoise", "deterministic"])
@pytest.mark.parametrize("k", [1, K - 1])
def test_recorded_step_log_prob_is_recomputed_identically(k, last_step):
    sampler = LCMSampler(CONFIG, K, last_step=last_step)
    x, eps, _ = _inputs(2)
    kb = torch.full((3,), k)
    cond: dict = {}
    drawn = sampler.transition(kb, eps, x, cond, generator=torch.Generator().manual_seed(5))
    again = sampler.transition(kb, eps, x, cond, prev_sample=drawn.prev_sample)
    finite = k < K - 1 or last_step == "renoise"
    assert bool(torch.isfinite(drawn.log_prob).all()) == finite
    torch.testing.assert_close(again.log_prob, drawn.log_prob, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(again.prev_sample, drawn.prev_sample, rtol=0, atol=0)
    if finite:
        assert torch.equal(torch.exp(again.log_prob - drawn.log_prob), torch.ones(3))


class _Adapter:
    """Elementwise stand-in for a denoiser (batch-independent to the bit): out = w x + c + t / 1000."""

    device = torch.device("cpu")
    latent_shape = EVENT

    def __init__(self, w=0.5):
        self.w = w

    def condition(self, prompts, guidance_scale):
        return {"prompt_embeds": torch.tensor([float(len(p)) for p in prompts]).view(-1, 1, 1, 1) / 10}

    def __call__(self, x, t, cond, guidance_scale=1.0):
        return self.w * x + cond["prompt_embeds"] + t.float().view(-1, 1, 1, 1) / 1000

    def reference_forward(self, x, t, cond, guidance_scale=1.0):
        return _Adapter(0.25)(x, t, cond, guidance_scale)


def test_chain_on_policy_ratio_is_one_on_every_step_including_the_last():
    sampler = LCMSampler(CONFIG, K)
    adapter = _Adapter()
    prompts = ["a cat", "a dog", "a red square"]
    given = adapter.condition(prompts, 1.0)
    chain = sampler.sample(adapter, prompts, 1.0, generator=torch.Generator().manual_seed(0), cond=given)
    assert RENOISED not in given  # the caller's condition is not touched
    assert torch.isfinite(chain.log_probs).all() and chain.log_probs.shape == (3, K)
    # the chain ends on the last step's f(x_t), not on the re-noised x_K
    last = sampler.log_prob(adapter, chain, torch.full((3,), K - 1))
    torch.testing.assert_close(chain.latents[:, -1], last.pred_original_sample, rtol=0, atol=0)
    assert not torch.equal(chain.latents[:, -1], chain.cond[RENOISED])
    for k in range(K):
        new = sampler.log_prob(adapter, chain, torch.full((3,), k))
        assert torch.equal(new.log_prob, chain.log_probs[:, k]), k
    # pairs of mixed steps and trajectories in one forward, and a sub-batch
    b, k = torch.tensor([2, 0, 1, 2, 0]), torch.tensor([K - 1, 1, K - 1, 0, K - 1])
    new = sampler.log_prob(adapter, chain, k, traj_index=b)
    assert torch.equal(new.log_prob, chain.log_probs[b, k])
    sub = chain.select([2, 0])
    new = sampler.log_prob(adapter, sub, torch.full((2,), K - 1))
    assert torch.equal(new.log_prob, sub.log_probs[:, -1])
    # the reference policy differs, so its last-step log-prob does too
    ref = sampler.log_prob(adapter, chain, torch.full((3,), K - 1), reference=True)
    assert not torch.equal(ref.log_prob, chain.log_probs[:, -1])
    # without the recorded x_K the last step cannot be re-evaluated
    chain.cond.pop(RENOISED)
    with pytest.raises(ValueError, match=RENOISED):
        sampler.log_prob(adapter, chain, torch.full((3,), K - 1))


def test_deterministic_chain_keeps_the_old_nan_last_step():
    sampler = LCMSampler(CONFIG, K, last_step="deterministic")
    adapter = _Adapter()
    chain = sampler.sample(adapter, ["a", "bb"], 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(chain.log_probs[:, :-1]).all() and torch.isnan(chain.log_probs[:, -1]).all()
    renoise = LCMSampler(CONFIG, K).sample(
        adapter, ["a", "bb"], 1.0, generator=torch.Generator().manual_seed(0)
    )
    # the same noise draws: every state and the final image agree, only the last log-prob differs
    torch.testing.assert_close(chain.latents, renoise.latents, rtol=0, atol=0)
    torch.testing.assert_close(chain.log_probs[:, :-1], renoise.log_probs[:, :-1], rtol=0, atol=0)


# ------------------------------------------------------------------ config
def test_config_keys_build_the_sampler():
    adapter = SimpleNamespace(scheduler_config=CONFIG)
    cfg = load_config("tasks/rlcm.yaml")
    s = from_config(cfg.sampler, adapter)
    assert (s.last_step, s.schedule, s.num_steps) == ("renoise", "rlcm", 8)
    cfg = load_config(
        "tasks/rlcm.yaml",
        ["sampler.lcm_last_step=deterministic", "sampler.lcm_schedule=diffusers", "sampler.eval_num_steps=4"],
    )
    s = from_config(cfg.sampler, adapter, evaluation=True)
    assert (s.last_step, s.schedule, s.timesteps.tolist()) == (
        "deterministic",
        "diffusers",
        [999, 759, 499, 259],
    )
    with pytest.raises(ValueError, match="lcm_last_step"):
        LCMSampler(CONFIG, K, last_step="stop")
    with pytest.raises(ValueError, match="lcm_schedule"):
        LCMSampler(CONFIG, K, schedule="linspace")
    with pytest.raises(ValueError, match="num_steps"):
        LCMSampler(CONFIG, 1)

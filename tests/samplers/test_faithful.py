"""Each named method against its reference implementation's formula, written out here from the
reference code (not by calling flowrl's math): Flow-GRPO's SDE step (the sigma = 1 edge) and CPS
step (its unnormalised log-prob, the last step), Flow-GRPO's KL and timestep choice, DPPO's
log-density clamp, clipped noise and evaluation noise, ReinFlow's clipped means, noise and final
action, its chain log-prob (initial noise, / (K + 1), clamp) and entropy rate. The references:
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py and scripts/train_sd3.py (Flow-GRPO),
model/diffusion/diffusion_vpg.py and diffusion_ppo.py (DPPO), model/flow/ft_ppo/ppoflow.py
(ReinFlow)."""

import math

import numpy as np
import pytest
import torch

import flowrl.objectives.ppo as ppo_module
from flowrl.config import load_config
from flowrl.errors import ConfigError
from flowrl.models.policy import FlowPolicy
from flowrl.objectives.base import Minibatch
from flowrl.samplers import build_sampler
from flowrl.samplers.ddpm_policy import DDPMPolicySampler
from flowrl.samplers.reinflow import ReinFlowSampler
from flowrl.train import plan

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _flow_config():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0).config


def _density(y, mean, std):
    """log N(y; mean, std^2) per element, as the references write it."""
    return -((y - mean) ** 2) / (2 * std**2) - np.log(std) - LOG_SQRT_2PI


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).double()


# ------------------------------------------------------------------ Flow-GRPO SDE
def _flow_grpo_sde(x, v, s, s_next, sigma_max, a):
    """Flow-GRPO's sde_step_with_logprob: (mean, transition std, std_dev_t)."""
    std_dev_t = math.sqrt(s / (1 - (sigma_max if s == 1 else s))) * a  # only the denominator's s swapped
    dt = s_next - s
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev_t * math.sqrt(-dt), std_dev_t


@pytest.mark.parametrize("k", [0, 2, 5])  # s = 1, a middle step, the last (s' = 0)
def test_flow_grpo_sde_step_matches_the_reference(k):
    sampler = build_sampler("flow_sde", _flow_config(), 6, noise_level=0.7)
    assert float(sampler.sigmas[0]) == 1.0
    x, v = _randn(2, 4, 4, 4, seed=0), _randn(2, 4, 4, 4, seed=1)
    s, s2, s1 = (float(sampler.sigmas[i]) for i in (k, k + 1, 1))
    kk = torch.full((2,), k)
    out = sampler.transition(kk, v.float(), x.float(), generator=torch.Generator().manual_seed(2))
    mean, std, std_dev_t = _flow_grpo_sde(x.numpy(), v.numpy(), s, s2, s1, 0.7)
    np.testing.assert_allclose(out.mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std.double().flatten().numpy(), [std] * 2, rtol=1e-6)
    y = out.prev_sample.double().numpy()
    expected = _density(y, mean, std).reshape(2, -1).mean(1)
    np.testing.assert_allclose(out.log_prob.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    again = sampler.transition(kk, v.float(), x.float(), prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)  # the on-policy ratio is exactly 1
    # the KL term's std: Flow-GRPO divides by 2 std_dev_t^2 (no |dt|)
    kl_std = sampler.flow_grpo_kl_std(kk, out.std)
    np.testing.assert_allclose(kl_std.double().flatten().numpy(), [std_dev_t] * 2, rtol=1e-5)
    if k == 0:  # swapping s in the numerator too would give a std sqrt(s1) times this
        assert abs(std / (0.7 * math.sqrt(s1 / (1 - s1)) * math.sqrt(s - s2)) - 1 / math.sqrt(s1)) < 1e-9


# ------------------------------------------------------------------ Flow-GRPO CPS
def _flow_grpo_cps(x, v, s, s_next, a):
    std = s_next * math.sin(a * math.pi / 2)
    mean = (x - s * v) * (1 - s_next) + (x + v * (1 - s)) * math.sqrt(s_next**2 - std**2)
    return mean, std


@pytest.mark.parametrize("k", [0, 3])
def test_flow_grpo_cps_log_prob_is_the_references_unnormalised_square(k):
    config = _flow_config()
    sampler = build_sampler("flow_cps", config, 6, noise_level=0.8)
    normalized = build_sampler("flow_cps", config, 6, noise_level=0.8, cps_logprob="normalized")
    x, v = _randn(3, 4, 4, 4, seed=3), _randn(3, 4, 4, 4, seed=4)
    s, s2 = float(sampler.sigmas[k]), float(sampler.sigmas[k + 1])
    kk = torch.full((3,), k)
    out = sampler.transition(kk, v.float(), x.float(), generator=torch.Generator().manual_seed(5))
    mean, std = _flow_grpo_cps(x.numpy(), v.numpy(), s, s2, 0.8)
    y = out.prev_sample.double().numpy()
    np.testing.assert_allclose(out.mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out.log_prob.double().numpy(), (-((y - mean) ** 2)).reshape(3, -1).mean(1), rtol=1e-5
    )
    norm = normalized.transition(kk, v.float(), x.float(), prev_sample=out.prev_sample)
    np.testing.assert_allclose(
        norm.log_prob.double().numpy(), _density(y, mean, std).reshape(3, -1).mean(1), rtol=1e-5, atol=1e-5
    )
    # the same policy change moves Flow-GRPO's log-ratio 2 std^2 times as far as the density's
    v2 = (v + 0.3 * _randn(3, 4, 4, 4, seed=6)).float()
    a, b = sampler.transition(kk, v2, x.float(), prev_sample=out.prev_sample), norm
    c = normalized.transition(kk, v2, x.float(), prev_sample=out.prev_sample)
    torch.testing.assert_close(
        a.log_prob - out.log_prob, 2 * std**2 * (c.log_prob - b.log_prob), rtol=1e-3, atol=1e-6
    )
    assert torch.equal(sampler.flow_grpo_kl_std(kk, out.std), out.std)


def test_cps_last_step_is_deterministic_and_never_trained():
    sampler = build_sampler("flow_cps", _flow_config(), 6, noise_level=0.8)
    x, v = _randn(2, 4, 4, 4, seed=7).float(), _randn(2, 4, 4, 4, seed=8).float()
    s = float(sampler.sigmas[5])
    assert float(sampler.sigmas[6]) == 0.0
    out = sampler.transition(torch.full((2,), 5), v, x, generator=torch.Generator().manual_seed(0))
    assert (out.std == 0).all() and torch.isnan(out.log_prob).all()
    torch.testing.assert_close(out.prev_sample, x - s * v)  # lands on x0_hat


# ------------------------------------------------------------------ Flow-GRPO: steps and options
def _chain(log_probs):
    from flowrl.chain import Chain

    B, K = log_probs.shape
    return Chain(torch.zeros(B, K + 1, 1), torch.zeros(B, K), torch.zeros(B, K), log_probs, {})


@pytest.mark.parametrize("last_finite", [True, False])  # SDE, CPS
def test_flow_grpo_trains_the_first_int_fraction_k_steps_in_order(last_finite):
    """train_sd3.py: num_train_timesteps = int(num_steps * timestep_fraction); j in range(it)."""
    lp = torch.zeros(5, 10)
    if not last_finite:
        lp[:, -1] = float("nan")
    g = torch.Generator().manual_seed(0)
    (mb,) = plan(_chain(lp), "sampled", "trajectory", 8, 0.99, 0, 1, g, "first")[0]
    assert mb.steps.tolist() == [list(range(9))] * 5
    # DDPO: each trajectory its own random int(fraction * K) steps
    forwards = plan(_chain(torch.zeros(5, 10)), "sampled", "trajectory", 8, 0.75, 0, 1, g)[0]
    steps = forwards[0].steps
    assert steps.shape == (5, 7) and len({tuple(r) for r in steps.sort(1).values.tolist()}) > 1


def test_flow_grpo_drops_zero_std_groups_and_keeps_the_number_of_minibatches():
    """train_sd3.py: samples whose advantages are all 0 are masked out, the rest reshaped into
    num_batches_per_epoch smaller minibatches (so every process takes the same number of steps)."""
    lp = torch.zeros(8, 3)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    mbs = plan(_chain(lp), "sampled", "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0), keep=keep)
    assert len(mbs) == 2 and sorted(len(f[0].rows) for f in mbs) == [2, 3]
    assert sorted(torch.cat([f[0].rows for f in mbs]).tolist()) == [0, 2, 3, 5, 7]
    every = plan(_chain(lp), "sampled", "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0))
    same = plan(
        _chain(lp), "sampled", "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0), keep=keep | True
    )
    assert [f[0].rows.tolist() for f in same] == [f[0].rows.tolist() for f in every]
    one = torch.zeros(8, dtype=torch.bool)
    one[3] = True  # fewer kept rows than minibatches: all stay (the update still takes its steps)
    few = plan(_chain(lp), "sampled", "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0), keep=one)
    assert sorted(torch.cat([f[0].rows for f in few]).tolist()) == list(range(8))


def test_flow_grpo_task_files_use_its_objective_and_bad_pairings_are_rejected():
    for task in ("flow_grpo_sd3", "flow_grpo_flux", "flow_grpo_fast_sd3", "flow_grpo_tiny"):
        cfg = load_config(f"tasks/{task}.yaml")
        o = cfg.algorithm.options
        assert (o.kl_estimator, o.timestep_selection, cfg.algorithm.drop_zero_std) == (
            "flow_grpo",
            "first",
            True,
        )
    with pytest.raises(ConfigError, match="kl_estimator=exact"):
        load_config("tasks/jpeg_tiny.yaml", ["algorithm.kl_estimator=flow_grpo"])
    with pytest.raises(ConfigError, match="chain_logprob=sum"):
        load_config("tasks/robot_inverted_pendulum_dppo.yaml", ["algorithm.chain_logprob=reinflow"])


# ------------------------------------------------------------------ DPPO
def _posterior(T, t):
    """(beta_t, a_t, a_{t-1}, posterior variance) of DPPO's cosine schedule, float64."""
    s = 0.008
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    abar = [f[i] / f[0] for i in range(T + 1)]
    beta = min(1 - abar[t + 1] / abar[t], 0.999)
    return beta, abar[t + 1], abar[t], (1 - abar[t]) / (1 - abar[t + 1]) * beta


def test_dppo_clamps_each_elements_log_density_to_minus_5_2_before_the_mean():
    sampler = DDPMPolicySampler(8, 4, min_std=0.01)  # std 0.01 at t = 0: densities up to 3.7
    x, eps = _randn(3, 4, 2, seed=0).float(), _randn(3, 4, 2, seed=1).float()
    t = torch.zeros(3, dtype=torch.long)
    out = sampler.step(eps, t, x, generator=torch.Generator().manual_seed(2))
    y = out.prev_sample.clone()
    y[0, 0] += 0.2  # far in the tail: below -5
    res = sampler.step(eps, t, x, prev_sample=y)
    dens = _density(y.double().numpy(), res.mean.double().numpy(), 0.01)
    assert dens.max() > 2 and dens.min() < -5
    expected = np.clip(dens, -5, 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(res.log_prob.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    exact = DDPMPolicySampler(8, 4, min_std=0.01, logprob_clip=None).step(eps, t, x, prev_sample=y)
    np.testing.assert_allclose(exact.log_prob.double().numpy(), dens.reshape(3, -1).mean(1), rtol=1e-5)


def test_dppo_clips_the_sampling_noise_to_three():
    sampler = DDPMPolicySampler(8, 4, min_std=0.1)
    x, eps = _randn(4000, 4, 2, seed=3).float(), _randn(4000, 4, 2, seed=4).float()
    t = torch.full((4000,), 5)
    noise = _randn(4000, 4, 2, seed=5).float() * 1.5
    out = sampler.step(eps, t, x, noise=noise)
    z = (out.prev_sample - out.mean) / out.std
    torch.testing.assert_close(z, noise.clamp(-3, 3), rtol=1e-4, atol=1e-4)
    drawn = sampler.step(eps, t, x, generator=torch.Generator().manual_seed(6))
    z = ((drawn.prev_sample - drawn.mean) / drawn.std).abs()
    assert z.max() <= 3 + 1e-4 and (z > 2.999).sum() > 0  # 0.27% of 32000 draws lie beyond 3


@pytest.mark.parametrize("t", [3, 0])
def test_dppo_evaluation_keeps_the_posterior_noise_but_not_at_the_last_step(t):
    sampler = DDPMPolicySampler(8, 8, min_std=0.1)
    x, eps = _randn(2, 4, 2, seed=7).float(), _randn(2, 4, 2, seed=8).float()
    out = sampler.step(
        eps, torch.full((2,), t), x, generator=torch.Generator().manual_seed(9), deterministic=True
    )
    *_, var = _posterior(8, t)
    expected = 0.0 if t == 0 else max(math.sqrt(var), 1e-3)
    np.testing.assert_allclose(out.std.double().flatten().numpy(), [expected] * 2, rtol=1e-5)
    assert torch.isnan(out.log_prob).all()
    if t == 0:
        torch.testing.assert_close(out.prev_sample, out.mean, rtol=0, atol=0)


# ------------------------------------------------------------------ ReinFlow
def test_reinflow_step_clips_the_mean_the_noise_and_the_final_action():
    sampler = ReinFlowSampler(4, denoised_clip=1.0, noise_clip=3.0)
    x, v = _randn(5, 4, 2, seed=0).float() * 1.5, _randn(5, 4, 2, seed=1).float() * 3
    std, noise = torch.full((5, 4, 2), 0.2), _randn(5, 4, 2, seed=2).float() * 2
    xd, vd, nd = (a.double().numpy() for a in (x, v, noise))
    for t, expect_final in ((0.25, False), (0.75, True)):
        out = sampler.step(v, std, torch.full((5,), t), torch.full((5,), t + 0.25), x, noise=noise)
        mean = np.clip(xd + 0.25 * vd, -1, 1)  # ppoflow.py: xt += vt * dt; xt.clamp(-c, c)
        y = mean + 0.2 * np.clip(nd, -3, 3)  # dist.sample().clamp_(loc -/+ 3 scale)
        if expect_final:
            y = np.clip(y, -1, 1)  # the last step: xt.clamp_(act_min, act_max)
        np.testing.assert_allclose(out.mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.prev_sample.double().numpy(), y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            out.log_prob.double().numpy(), _density(y, mean, 0.2).reshape(5, -1).mean(1), rtol=1e-5, atol=1e-5
        )


def test_reinflow_objective_is_the_references_chain_log_prob_clamp_and_entropy_rate(monkeypatch):
    """ppoflow.py get_logprobs + loss, with account_for_initial_stochasticity, normalize_denoising_horizon
    and normalize_act_space_dimension (train_ppo_flow_agent.py sets all three), logprob_min/max -1/1."""
    from flowrl.objectives.ppo import PPO

    torch.manual_seed(0)
    policy = FlowPolicy(obs_dim=3, action_dim=2, obs_horizon=2, action_horizon=4, hidden_dims=[32, 32])
    policy.add_noise_net(0.05, 0.3, [16])
    with torch.no_grad():
        for p in policy.noise_net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    cfg = load_config("tasks/robot_inverted_pendulum_reinflow.yaml", ["algorithm.ent_coef=0.01"])
    sampler = ReinFlowSampler(4, denoised_clip=1.0, noise_clip=3.0)
    obs = torch.randn(6, 2, 3)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    chain.advantages = torch.linspace(-1, 1, 6)
    seen = {}
    real = ppo_module.policy_loss

    def spy(new, old, adv, clip, kl=None, kl_coef=0.0, entropy=None, ent_coef=0.0):
        seen.update(new=new.detach(), old=old, entropy=entropy.detach())
        return real(new, old, adv, clip, kl, kl_coef, entropy, ent_coef)

    monkeypatch.setattr(ppo_module, "policy_loss", spy)
    terms = PPO(cfg, policy, sampler).loss(
        chain, Minibatch(torch.arange(6), torch.arange(4).expand(6, 4), 1.0), 0, None
    )
    # by hand, float64: log p(x_0) + the K transitions', / (K + 1), per dimension, clamped
    lat = chain.latents.double()
    with torch.no_grad():
        total = _density(lat[:, 0].numpy(), 0.0, 1.0).reshape(6, -1).mean(1)
        ent = np.full(6, 0.5 * math.log(2 * math.pi * math.e))  # H(x_0) per dimension
        for k in range(4):
            t = torch.full((6,), k / 4)
            vel = policy(chain.latents[:, k], t, {"obs": obs}).double().numpy()
            std = policy.noise_std(t, {"obs": obs}).double().numpy()
            mean = np.clip(lat[:, k].numpy() + vel / 4, -1, 1)
            total += _density(lat[:, k + 1].numpy(), mean, std).reshape(6, -1).mean(1)
            ent += (np.log(std) + 0.5 * math.log(2 * math.pi * math.e)).reshape(6, -1).mean(1)
    expected = np.clip(total / 5, -1, 1)
    assert (np.abs(total / 5) < 1).sum() >= 3  # most rows inside the clamp: the formula is what is tested
    np.testing.assert_allclose(seen["new"].double().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["old"], seen["new"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(seen["entropy"].double().numpy(), ent / 5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["ratio_mean"], torch.tensor(1.0), rtol=0, atol=1e-6)


def test_flow_grpo_fast_window_starts_in_the_first_half():
    """sd3_pipeline_with_logprob_fast: start = randint(range[0], range[1] - window), range (0, K // 2)."""
    sampler = build_sampler("flow_cps", _flow_config(), 10, noise_level=0.8, sde_window=2)
    g = torch.Generator().manual_seed(0)
    starts = {min(sampler.stochastic_steps(g)) for _ in range(300)}
    assert starts == {0, 1, 2, 3}

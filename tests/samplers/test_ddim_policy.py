"""DPPO's DDIM chain on a diffusion policy against DPPO's formulas written out by hand and against
diffusers' DDIMScheduler; the on-policy ratio exactly 1 with frozen leading steps; DPPO's clip
schedule over denoising steps, its advantage quantiles and its reward horizon in the PPO loss."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from flowrl.models.policy import DiffusionPolicy
from flowrl.samplers.ddim_policy import DDIMPolicySampler
from flowrl.samplers.ddpm_policy import DDPMPolicySampler, cosine_beta_schedule


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DIMS = dict(
    obs_dim=3, action_dim=2, obs_horizon=1, action_horizon=4, hidden_dims=[32, 32], num_train_steps=20
)


def _dppo_ddim_step(x, eps, i, T, S, eta, min_std, clip=1.0):
    """DPPO's p_mean_var (use_ddim) and std floor for DDIM index i (S - 1 first), float64 numpy."""
    x_ = np.linspace(0, T, T + 1)
    f = np.cos((x_ / T + 0.008) / 1.008 * math.pi / 2) ** 2
    ac = f / f[0]
    betas = np.clip(1 - ac[1:] / ac[:-1], None, 0.999)
    alphas_cumprod = np.cumprod(1 - betas)
    ddim_t = np.arange(S) * (T // S)
    alpha = alphas_cumprod[ddim_t][i]
    alpha_prev = np.concatenate([[1.0], alphas_cumprod[ddim_t[:-1]]])[i]
    x0 = np.clip((x - np.sqrt(1 - alpha) * eps) / np.sqrt(alpha), -clip, clip)
    eps = (x - np.sqrt(alpha) * x0) / np.sqrt(1 - alpha)
    sigma = max(eta * np.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)), 1e-10)
    mu = np.sqrt(alpha_prev) * x0 + np.sqrt(max(1 - alpha_prev - sigma**2, 0)) * eps
    return mu, max(sigma, min_std), ddim_t[i]


@pytest.mark.parametrize("k", [0, 2, 4])
def test_ddim_step_is_dppos_formula_and_diffusers(k):
    T, S, eta = 20, 5, 1.0
    sampler = DDIMPolicySampler(T, S, S, eta, min_std=0.1, logprob_reduction="sum", logprob_clip=None)
    g = torch.Generator().manual_seed(k)
    x, eps = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    kb = torch.full((3,), k)
    step = sampler.transition(kb, eps, x, generator=torch.Generator().manual_seed(1))
    i = S - 1 - k  # DPPO's index runs from S - 1 down to 0
    mu, std, tau = _dppo_ddim_step(x.double().numpy(), eps.double().numpy(), i, T, S, eta, 0.1)
    assert int(sampler.timesteps[k]) == tau
    np.testing.assert_allclose(step.mean.double().numpy(), mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step.std.double().numpy().max(), std, rtol=1e-6)
    y = step.prev_sample.double().numpy()
    density = -((y - mu) ** 2) / (2 * std**2) - np.log(std) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(step.log_prob.double().numpy(), density.reshape(3, -1).sum(1), rtol=1e-5)
    # diffusers' DDIM step (leading spacing, x0 clipped, eps re-derived from it) has the same mean
    sched = DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=cosine_beta_schedule(T).numpy(),
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )
    sched.set_timesteps(S)
    assert sched.timesteps.tolist() == sampler.timesteps.tolist()
    ref = sched.step(
        eps,
        int(sched.timesteps[k]),
        x,
        eta=eta,
        use_clipped_model_output=True,
        variance_noise=torch.zeros_like(x),
    )
    torch.testing.assert_close(step.mean, ref.prev_sample, rtol=1e-4, atol=1e-5)
    # evaluation: std 0, the mean itself
    ev = sampler.transition(kb, eps, x, stochastic=False)
    torch.testing.assert_close(ev.prev_sample, step.mean)
    assert torch.isnan(ev.log_prob).all()


def test_ddim_chain_on_policy_ratio_is_one_and_leading_steps_are_frozen():
    torch.manual_seed(0)
    policy = DiffusionPolicy(**DIMS)
    policy.freeze_reference()
    with torch.no_grad():  # the fine-tuned network moves away from the frozen copy
        for p in policy.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    sampler = DDIMPolicySampler(20, ddim_steps=5, ft_steps=3)
    obs = torch.randn(6, 1, 3)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    assert chain.num_steps == 3 and torch.isfinite(chain.log_probs).all()
    for k in range(3):
        new = sampler.log_prob(policy, chain, torch.full((6,), k))
        torch.testing.assert_close(new.log_prob, chain.log_probs[:, k], rtol=0, atol=1e-5)
    # the two unrecorded leading steps ran the frozen copy: redo them by hand from the same x_T
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 2, generator=g)
    cond = policy.condition(obs)
    for k in range(2):
        kb = torch.full((6,), k)
        eps = policy.reference_forward(x, sampler.timesteps[kb], cond)
        x = sampler.transition(kb, eps, x, generator=g).prev_sample
    torch.testing.assert_close(x, chain.latents[:, 0])


def test_logprob_horizon_covers_the_executed_actions_only():
    """DPPO's reward_horizon: the log-prob of the chunk's first h actions (DDPM and DDIM alike)."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 2, generator=g), torch.randn(2, 4, 2, generator=g)
    for full, part in (
        (
            DDPMPolicySampler(20, 10, logprob_clip=None),
            DDPMPolicySampler(20, 10, logprob_clip=None, logprob_horizon=2),
        ),
        (
            DDIMPolicySampler(20, 5, 5, logprob_clip=None),
            DDIMPolicySampler(20, 5, 5, logprob_clip=None, logprob_horizon=2),
        ),
    ):
        kb = torch.full((2,), 3)
        a = full.transition(kb, eps, x, generator=torch.Generator().manual_seed(1))
        b = part.transition(kb, eps, x, prev_sample=a.prev_sample)
        by_hand = torch.distributions.Normal(a.mean[:, :2], a.std.expand_as(a.mean)[:, :2])
        torch.testing.assert_close(b.log_prob, by_hand.log_prob(a.prev_sample[:, :2]).mean((1, 2)))


def test_dppo_clip_schedule_and_advantage_quantiles_in_the_ppo_loss():
    """loss_pg = mean over pairs of max(-A_k r, -A_k clip(r, 1 - c_k, 1 + c_k)), with DPPO's
    c_k = base + (clip - base) (e^{3 t} - 1) / (e^3 - 1), t = k / (K - 1), and A clamped to its
    quantiles then discounted by 0.99 ** (K - 1 - k): written out here from the re-evaluated log-probs."""
    import types

    from flowrl.objectives.base import Minibatch
    from flowrl.objectives.ppo import PPO, PPOOptions

    torch.manual_seed(0)
    policy = DiffusionPolicy(**DIMS)
    sampler = DDIMPolicySampler(20, ddim_steps=5, ft_steps=5)
    obs = torch.randn(8, 1, 3)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    chain.advantages = torch.linspace(-2, 3, 8)
    with torch.no_grad():  # move the policy so that ratios differ from 1 and some clip
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opts = PPOOptions(
        clip_range_base=1e-3, clip_range_rate=3.0, adv_quantiles=[0.1, 0.9], denoising_discount=0.99
    )
    algo = types.SimpleNamespace(
        options=opts,
        clip_range=0.02,
        normalize_advantages=False,
        critic_warmup_epochs=0,
        bc_coef=0.0,
        vf_coef=0.5,
    )
    cfg = types.SimpleNamespace(algorithm=algo, train=types.SimpleNamespace(minibatch_size=40))
    objective = PPO(cfg, policy, sampler)
    rows = torch.arange(8)
    steps = torch.arange(5).expand(8, 5).clone()
    terms = objective.loss(chain, Minibatch(rows, steps, 1.0), 0, torch.Generator())
    b, k = rows.repeat_interleave(5), steps.reshape(-1)
    with torch.no_grad():
        new = sampler.log_prob(policy, chain, k, traj_index=b).log_prob.double()
    ratio = (new - chain.log_probs[b, k].double()).exp()
    adv = chain.advantages[b].double()
    lo, hi = np.quantile(adv.numpy(), [0.1, 0.9])
    adv = adv.clamp(float(lo), float(hi)) * 0.99 ** (4 - k).double()
    t = k.double() / 4
    c = 1e-3 + (0.02 - 1e-3) * (torch.exp(3 * t) - 1) / (math.exp(3) - 1)
    assert c[0] == pytest.approx(1e-3) and c[4] == pytest.approx(0.02)
    by_hand = torch.maximum(-adv * ratio, -adv * torch.minimum(torch.maximum(ratio, 1 - c), 1 + c)).mean()
    assert float(terms["loss_pg"]) == pytest.approx(float(by_hand), rel=1e-5)
    assert 0 < float(terms["clipfrac"]) < 1

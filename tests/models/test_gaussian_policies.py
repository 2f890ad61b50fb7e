"""The Gaussian heads (flowrl/models/gaussian_policy.py, flowrl/samplers/gaussian.py): DPPO's
Gaussian MLP, ResiP's residual on a frozen chain, DSRL's policy over a frozen chain's noise.

Each step's log-prob is checked against torch.distributions written out here, the PPO loss
against its formula computed by hand, the on-policy ratio is exactly 1, the frozen chains
against independent samplers (flowrl's ReinFlow ODE; diffusers' DDIM with eta = 0), and bad
options stop with a ConfigError naming the field.
"""

import math

import pytest
import torch
from torch.distributions import Normal

from flowrl.config import ConfigError, load_config
from flowrl.models.gaussian_policy import DSRLPolicy, GaussianPolicy, ResidualPolicy
from flowrl.models.policy import DiffusionPolicy, FlowPolicy, load_policy
from flowrl.objectives.base import Minibatch
from flowrl.objectives.ppo import PPO
from flowrl.samplers.gaussian import GaussianChainSampler
from flowrl.samplers.reinflow import ReinFlowSampler

SHAPES = dict(obs_dim=3, action_dim=2, obs_horizon=1, action_horizon=4)


def _fit(policy):
    torch.manual_seed(1)
    policy.normalizer.fit(torch.randn(50, 3) * 2 + 1, -2 * torch.ones(2), 3 * torch.ones(2))
    return policy


def _flow():
    torch.manual_seed(0)
    return _fit(FlowPolicy(**SHAPES, hidden_dims=[16, 16]))


def _diffusion():
    torch.manual_seed(0)
    return _fit(DiffusionPolicy(**SHAPES, hidden_dims=[16, 16], num_train_steps=20))


def _gaussian():
    torch.manual_seed(0)
    policy = _fit(GaussianPolicy(**SHAPES, hidden_dims=[16, 16], std_init=0.1, std_min=0.01, std_max=0.2))
    with torch.no_grad():  # distinct stds per action dimension, one of them at its upper clamp
        policy.net.log_std.copy_(torch.tensor([math.log(0.05), math.log(0.5)]))
    return policy


def _sample(policy, sampler, B=6, seed=0):
    obs = torch.randn(B, 1, 3)
    return sampler.sample(policy, obs, generator=torch.Generator().manual_seed(seed))


def test_gaussian_policy_step_is_dppo_gaussian():
    policy = _gaussian()
    sampler = GaussianChainSampler(policy.layout, "mean", noise_clip=3.0, logprob_clip=(-5.0, 2.0))
    chain = _sample(policy, sampler)
    assert chain.latents.shape == (6, 2, 4, 2) and chain.num_steps == 1
    # by hand: mu = tanh(MLP(s)), sigma = exp(clamp(log sigma)) per action dim, shared over the chunk
    obs = chain.cond["obs"].reshape(6, -1)
    mu = torch.tanh(policy.net.net(obs)).view(6, 4, 2)
    std = torch.tensor([0.05, 0.2]).expand(6, 4, 2)  # 0.5 clamped to std_max 0.2
    x = chain.latents[:, 1]
    assert ((x - mu).abs() <= 3 * std + 1e-6).all()  # randn_clip_value 3
    expected = Normal(mu, std).log_prob(x).mean(dim=(1, 2)).clamp(-5, 2)
    torch.testing.assert_close(chain.log_probs[:, 0], expected, rtol=0, atol=1e-5)
    # on-policy: re-evaluating the recorded chain gives the same log-prob bit for bit
    out = sampler.log_prob(policy, chain, torch.zeros(6, dtype=torch.long))
    assert torch.equal(out.log_prob, chain.log_probs[:, 0])
    assert torch.equal(torch.exp(out.log_prob - chain.log_probs[:, 0]), torch.ones(6))
    # the mean path (evaluation) is the mean itself
    det = sampler.sample(policy, chain.cond["obs"], cond=chain.cond, deterministic=True)
    torch.testing.assert_close(det.latents[:, 1], mu, rtol=0, atol=1e-6)
    assert torch.isnan(det.log_probs).all()


def test_gaussian_bc_loss_is_dppo_nll():
    policy = _gaussian()
    obs, actions = torch.randn(5, 1, 3), torch.rand(5, 4, 2) * 2 - 1
    mu = torch.tanh(policy.net.net(obs.reshape(5, -1))).view(5, 4, 2)
    expected = -Normal(mu, 0.1).log_prob(actions).mean()  # DPPO's fixed_std 0.1 in pre-training
    torch.testing.assert_close(policy.bc_loss(obs, actions), expected)


def _ppo(task, adapter, sampler, clip=0.2):
    cfg = load_config(task, [f"algorithm.clip_range={clip}"])
    return PPO(cfg, adapter, sampler)


def test_ppo_loss_on_the_gaussian_step_matches_the_formula():
    policy = _gaussian()
    sampler = GaussianChainSampler(policy.layout, "mean", noise_clip=3.0, logprob_clip=None)
    chain = _sample(policy, sampler, B=8)
    chain.advantages = torch.linspace(-1, 2, 8)
    objective = _ppo("robot_inverted_pendulum_gaussian", policy, sampler, clip=0.05)
    rows, steps = torch.arange(8), torch.zeros(8, 1, dtype=torch.long)
    with torch.no_grad():  # move the policy so the ratios differ from 1, some beyond the clip
        policy.net.net[-1].bias.add_(0.01)
        policy.net.log_std.add_(0.02)
    terms = objective.loss(chain, Minibatch(rows, steps), 0, torch.Generator().manual_seed(0))
    # by hand: the new policy's log-prob of the recorded chunk, its ratio, the clipped objective
    mu = torch.tanh(policy.net.net(chain.cond["obs"].reshape(8, -1))).view(8, 4, 2)
    std = policy.net.log_std.clamp(math.log(0.01), math.log(0.2)).exp().expand(8, 4, 2)
    new = Normal(mu, std).log_prob(chain.latents[:, 1]).mean(dim=(1, 2))
    ratio = torch.exp(new - chain.log_probs[:, 0])
    adv = (chain.advantages - chain.advantages.mean()) / (chain.advantages.std() + 1e-8)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.95, 1.05)).mean()
    torch.testing.assert_close(terms["loss_pg"], expected, rtol=1e-5, atol=1e-6)
    assert 0 < float(terms["clipfrac"]) < 1


def test_residual_step_is_resip():
    base = _flow()
    torch.manual_seed(2)
    policy = ResidualPolicy(base, [16], std_init=0.2, std_min=1e-3, std_max=1.0, scale=0.1)
    with torch.no_grad():  # a head away from its near-zero start
        policy.net.net[-1].weight.normal_(0, 0.3)
    sampler = GaussianChainSampler(policy.layout, "sum", noise_clip=None, logprob_clip=None, base_steps=4)
    chain = _sample(policy, sampler)
    assert chain.latents.shape == (6, 3, 4, 2) and torch.isnan(chain.log_probs[:, 0]).all()
    # step 0: the frozen flow policy's ODE from the chain's x_0 (flowrl's own ReinFlow sampler, noise off)
    ode = ReinFlowSampler(4, fixed_std=0.0, learned=False, denoised_clip=1.0)
    ref = ode.sample(
        base, chain.cond["obs"], latents=chain.latents[:, 0], cond=chain.cond, deterministic=True
    )
    torch.testing.assert_close(chain.latents[:, 1], ref.latents[:, -1], rtol=0, atol=1e-6)
    # step 1: r ~ N(MLP(s, a_base), sigma^2), a = a_base + alpha r, log N(r) summed (ResiP)
    base_action, action = chain.latents[:, 1], chain.latents[:, 2]
    h = torch.cat([chain.cond["obs"].reshape(6, -1), base_action.reshape(6, -1)], dim=-1)
    mu = policy.net.net(h).view(6, 4, 2)
    r = (action - base_action) / 0.1
    expected = Normal(mu, torch.full_like(mu, 0.2)).log_prob(r).sum(dim=(1, 2))
    torch.testing.assert_close(chain.log_probs[:, 1], expected, rtol=1e-5, atol=1e-4)
    out = sampler.log_prob(policy, chain, torch.ones(6, dtype=torch.long))
    assert torch.equal(out.log_prob, chain.log_probs[:, 1])  # on-policy ratio exactly 1
    assert list(p for p in policy.trainable_parameters()) == list(policy.net.parameters())
    assert not any(p.requires_grad for p in policy.base.parameters())


def test_residual_starts_near_the_base_policy():
    torch.manual_seed(2)
    policy = ResidualPolicy(_flow(), [16, 16], scale=0.1)
    sampler = GaussianChainSampler(policy.layout, "sum", None, None, base_steps=4)
    det = sampler.sample(
        policy, torch.randn(16, 1, 3), generator=torch.Generator().manual_seed(0), deterministic=True
    )
    assert torch.equal(det.latents[:, 2], det.latents[:, 1])  # the head's last layer starts at zero (ResiP)


@pytest.mark.parametrize("family", ["flow", "diffusion"])
def test_dsrl_runs_the_frozen_chain_from_the_squashed_noise(family):
    base = _flow() if family == "flow" else _diffusion()
    torch.manual_seed(3)
    policy = DSRLPolicy(base, [16], std_init=0.5, std_min=0.01, std_max=1.0, noise_bound=1.5)
    with torch.no_grad():
        policy.net.net[-1].weight.normal_(0, 1.0)
    K = 4 if family == "flow" else 5
    sampler = GaussianChainSampler(policy.layout, "sum", None, None, base_steps=K)
    chain = _sample(policy, sampler)
    assert torch.isnan(chain.log_probs[:, 1]).all()
    u, action = chain.latents[:, 1], chain.latents[:, 2]
    mu = policy.net.net(chain.cond["obs"].reshape(6, -1)).view(6, 4, 2)
    expected = Normal(mu, torch.full_like(mu, 0.5)).log_prob(u).sum(dim=(1, 2))
    torch.testing.assert_close(chain.log_probs[:, 0], expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(
        sampler.log_prob(policy, chain, torch.zeros(6, dtype=torch.long)).log_prob, chain.log_probs[:, 0]
    )
    w = 1.5 * torch.tanh(u)  # DSRL's noise action in [-1.5, 1.5]
    if family == "flow":
        ode = ReinFlowSampler(4, fixed_std=0.0, learned=False, denoised_clip=1.0)
        ref = ode.sample(base, chain.cond["obs"], latents=w, cond=chain.cond, deterministic=True).latents[
            :, -1
        ]
    else:  # diffusers' DDIM, eta 0, "leading" timesteps, clipped x0 and eps re-derived from it, alpha_prev 1 at the end
        from diffusers import DDIMScheduler

        betas = 1 - base.alphas_cumprod / torch.cat([torch.ones(1), base.alphas_cumprod[:-1]])
        scheduler = DDIMScheduler(
            num_train_timesteps=20,
            trained_betas=betas.double().numpy(),
            clip_sample=True,
            clip_sample_range=1.0,
            set_alpha_to_one=True,
            timestep_spacing="leading",
            steps_offset=0,
        )
        scheduler.set_timesteps(5)
        assert scheduler.timesteps.tolist() == [16, 12, 8, 4, 0]
        x = w
        for t in scheduler.timesteps:
            eps = base(x, torch.full((6,), int(t)), chain.cond)
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        ref = x.clamp(-1, 1)
    torch.testing.assert_close(action, ref, rtol=0, atol=1e-5)


def test_policies_save_and_load(tmp_path):
    for policy in (_gaussian(), ResidualPolicy(_flow(), [16]), DSRLPolicy(_diffusion(), [16])):
        policy.save(tmp_path / policy.kind)
        loaded = load_policy(tmp_path / policy.kind)
        assert type(loaded) is type(policy)
        a, b = policy.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.gaussian_std_min=0.5"], "gaussian_std_min"),
        (["algorithm.name=residual_ppo", "algorithm.bc_coef=0.1"], "bc_coef"),
        (["algorithm.name=dsrl_ppo", "model.base_family=gaussian_policy"], "base_family"),
        (["algorithm.name=residual_ppo", "model.residual_scale=0"], "residual_scale"),
        (["algorithm.name=residual_ppo", "model.base_noise=none"], "base_noise"),
        (
            ["algorithm.name=dsrl_ppo", "model.base_family=diffusion_policy", "sampler.num_steps=30"],
            "num_steps",
        ),
    ],
)
def test_bad_head_options_stop_with_a_clear_message(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("robot_inverted_pendulum_gaussian", overrides)


def test_scratch_gaussian_policy_takes_the_env_bounds():
    cfg = load_config("robot_inverted_pendulum_gaussian", ["model.pretrained=scratch"])
    a, b = (GaussianPolicy.for_finetuning(cfg, "t", torch.device("cpu")) for _ in range(2))
    assert a.normalizer.action_low.tolist() == [-3.0] and a.normalizer.action_high.tolist() == [3.0]
    assert torch.equal(a.normalizer.obs_mean, torch.zeros(4)) and torch.equal(
        a.normalizer.obs_std, torch.ones(4)
    )
    assert all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict()
    )  # seeded by train.seed

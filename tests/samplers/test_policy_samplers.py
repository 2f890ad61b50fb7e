"""The robot samplers (DPPO's DDPM with a std floor, ReinFlow's learned-noise flow) against the
Gaussian density written out by hand; on-policy ratio exactly 1; GAE against a plain loop."""

import math

import numpy as np
import pytest
import torch

from flowrl.core import gaussian_entropy, generalized_advantage_estimate, policy_loss
from flowrl.models.policy import DiffusionPolicy, FlowPolicy
from flowrl.samplers.ddpm_policy import DDPMPolicySampler
from flowrl.samplers.reinflow import ReinFlowSampler


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These networks are tiny: one thread is fastest, and avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DIMS = dict(obs_dim=3, action_dim=2, obs_horizon=2, action_horizon=4, hidden_dims=[32, 32])


def _hand_density(x, mean, std):
    """log N(x; mean, std^2) per element, float64 numpy."""
    return -((x - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * math.log(2 * math.pi)


def _perturb(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- DDPM with a std floor (DPPO)
@pytest.mark.parametrize("t", [7, 3, 0])
def test_ddpm_step_log_prob_equals_hand_written_density(t):
    T = 8
    sampler = DDPMPolicySampler(T, ft_steps=4, min_std=0.1, logprob_reduction="sum", logprob_clip=None)
    torch.manual_seed(0)
    x, eps = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t_b = torch.full((3,), t)
    step = sampler.step(eps, t_b, x, generator=torch.Generator().manual_seed(1))
    # by hand, float64: the cosine schedule (Nichol & Dhariwal eq. 17) and DDPM eq. (7), (15)
    s = 0.008
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    abar = [f[i] / f[0] for i in range(T + 1)]  # abar[i] = a_{i-1}; abar[0] = 1
    beta = min(1 - abar[t + 1] / abar[t], 0.999)
    a_t, a_prev = abar[t + 1], abar[t]
    xd, ed, yd = x.double().numpy(), eps.double().numpy(), step.prev_sample.double().numpy()
    x0 = np.clip((xd - math.sqrt(1 - a_t) * ed) / math.sqrt(a_t), -1, 1)
    mu = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * xd
    sigma = max(math.sqrt((1 - a_prev) / (1 - a_t) * beta), 0.1)
    if t == 0:
        assert sigma == 0.1  # beta_tilde_0 = 0: the floor is the last step's std
    expected = _hand_density(yd, mu, sigma).reshape(3, -1)
    np.testing.assert_allclose(step.mean.double().numpy(), mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step.log_prob.double().numpy(), expected.sum(1), rtol=1e-5, atol=1e-4)
    mean_red = DDPMPolicySampler(T, 4, 0.1, logprob_reduction="mean", logprob_clip=None).step(
        eps, t_b, x, prev_sample=step.prev_sample
    )
    np.testing.assert_allclose(mean_red.log_prob.double().numpy(), expected.mean(1), rtol=1e-5, atol=1e-5)


def test_ddpm_chain_on_policy_ratio_is_one_and_untuned_steps_use_the_frozen_network():
    torch.manual_seed(0)
    policy = DiffusionPolicy(**DIMS, num_train_steps=10)
    policy.freeze_reference()
    _perturb(policy.net)  # the tuned network now differs from the frozen one
    sampler = DDPMPolicySampler(num_train_steps=10, ft_steps=4, min_std=0.1)
    obs = torch.randn(5, 2, 3)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    assert chain.latents.shape == (5, 5, 4, 2) and chain.log_probs.shape == (5, 4)
    assert chain.timesteps[0].tolist() == [3, 2, 1, 0]
    assert torch.isfinite(chain.log_probs).all()
    for k in range(4):
        new = sampler.log_prob(policy, chain, torch.full((5,), k))
        torch.testing.assert_close(new.log_prob, chain.log_probs[:, k], rtol=0, atol=1e-5)
    # mixed steps per row (minibatches of (env step, denoising step) pairs), with repeats
    sub = chain.select(torch.tensor([4, 0, 0, 2]))
    idx = torch.tensor([0, 3, 1, 2])
    new = sampler.log_prob(policy, sub, idx)
    torch.testing.assert_close(
        new.log_prob, sub.log_probs.gather(1, idx[:, None]).squeeze(1), rtol=0, atol=1e-5
    )
    # the first T - K steps run the frozen network: changing the tuned one leaves x_{K} unchanged
    _perturb(policy.net, seed=1)
    again = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.latents[:, 0], chain.latents[:, 0], rtol=0, atol=0)
    assert not torch.allclose(again.latents[:, -1], chain.latents[:, -1])


def test_ddpm_deterministic_chain_is_the_mean_path():
    torch.manual_seed(0)
    policy = DiffusionPolicy(**DIMS, num_train_steps=6)
    sampler = DDPMPolicySampler(num_train_steps=6, ft_steps=6, min_std=0.1, eval_noise="mean")
    obs = torch.randn(3, 2, 3)
    a = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0), deterministic=True)
    b = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0), deterministic=True)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert torch.isnan(a.log_probs).all()
    for k in range(6):  # each recorded state is the previous one's mean
        step = sampler.step(
            policy(a.latents[:, k], a.timesteps[:, k], {"obs": obs}), a.timesteps[:, k], a.latents[:, k]
        )
        torch.testing.assert_close(step.mean, a.latents[:, k + 1])


# ---------------------------------------------------------------- learned-noise flow (ReinFlow)
def test_reinflow_step_log_prob_equals_hand_written_density():
    sampler = ReinFlowSampler(num_steps=4, logprob_reduction="sum")
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    std = torch.rand(3, 4, 2) * 0.2 + 0.05
    t, next_t = torch.full((3,), 0.25), torch.full((3,), 0.5)
    step = sampler.step(v, std, t, next_t, x, generator=torch.Generator().manual_seed(1))
    xd, vd, sd, yd = (a.double().numpy() for a in (x, v, std, step.prev_sample))
    mu = xd + 0.25 * vd  # Euler step with dt = 1/4
    expected = _hand_density(yd, mu, sd).reshape(3, -1)
    np.testing.assert_allclose(step.log_prob.double().numpy(), expected.sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        step.pred_original_sample.double().numpy(), xd + 0.75 * vd, rtol=1e-6, atol=1e-6
    )


def test_reinflow_constant_velocity_integrates_exactly():
    class Constant(torch.nn.Module):
        """The smallest policy: the adapter protocol around a constant velocity field."""

        latent_shape, device = (4, 2), torch.device("cpu")

        def condition(self, obs, guidance_scale=1.0):
            return {"obs": obs}

        def forward(self, x, t, cond, guidance_scale=1.0):
            return torch.full_like(x, 0.7)

    sampler = ReinFlowSampler(num_steps=3)
    chain = sampler.sample(
        Constant(), torch.zeros(2, 1, 1), generator=torch.Generator().manual_seed(0), deterministic=True
    )
    torch.testing.assert_close(chain.latents[:, -1], chain.latents[:, 0] + 0.7)
    torch.testing.assert_close(chain.timesteps[0], torch.tensor([0.0, 1 / 3, 2 / 3]))
    assert torch.isnan(chain.log_probs).all()


@pytest.mark.parametrize("num_steps", [1, 4])
def test_reinflow_chain_on_policy_ratio_is_one(num_steps):
    torch.manual_seed(0)
    policy = FlowPolicy(**DIMS)
    policy.add_noise_net(0.05, 0.3, [16])
    _perturb(policy.noise_net)  # a std that varies with t and the observation
    sampler = ReinFlowSampler(num_steps=num_steps)
    obs = torch.randn(6, 2, 3)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    std = policy.noise_std(chain.timesteps[:, 0], {"obs": obs})
    assert std.shape == (6, 4, 2) and std.min() >= 0.05 - 1e-6 and std.max() <= 0.3 + 1e-6
    assert std.std() > 0
    for k in range(num_steps):
        new = sampler.log_prob(policy, chain, torch.full((6,), k))
        torch.testing.assert_close(new.log_prob, chain.log_probs[:, k], rtol=0, atol=1e-5)
    # gradients reach both the velocity and the noise network
    idx = torch.arange(6) % num_steps
    new = sampler.log_prob(policy, chain, idx)
    ent = gaussian_entropy(new.std, new.mean.shape[1:])
    adv = torch.linspace(-1, 1, 6)
    terms = policy_loss(
        new.log_prob,
        chain.log_probs.gather(1, idx[:, None]).squeeze(1),
        adv,
        0.01,
        entropy=ent,
        ent_coef=0.01,
    )
    torch.testing.assert_close(terms["ratio_mean"], torch.tensor(1.0), rtol=0, atol=1e-5)
    terms["loss"].backward()
    assert all(p.grad is not None for p in policy.net.parameters())
    assert sum(p.grad.abs().sum() for p in policy.noise_net.parameters()) > 0


def test_gaussian_entropy_matches_torch_distributions():
    std = torch.rand(3, 4, 2) + 0.1
    expected = torch.distributions.Normal(torch.zeros_like(std), std).entropy()
    torch.testing.assert_close(gaussian_entropy(std, std.shape[1:], "sum"), expected.sum((1, 2)))
    torch.testing.assert_close(gaussian_entropy(std[:, :1, :1], std.shape[1:], "mean"), expected[:, 0, 0])


def test_policy_loss_without_entropy_keeps_its_terms():
    lp = torch.randn(4)
    terms = policy_loss(lp, lp, torch.ones(4), 0.2)
    assert "entropy" not in terms and "loss_entropy" not in terms
    with_ent = policy_loss(lp, lp, torch.ones(4), 0.2, entropy=torch.full((4,), 2.0), ent_coef=0.5)
    torch.testing.assert_close(with_ent["loss"], terms["loss"] - 1.0)


# ---------------------------------------------------------------- GAE
def _gae_by_definition(r, v, nv, term, done, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} up to the episode's end (a forward loop per env)."""
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, w = 0.0, 1.0
            for u in range(t, T):
                delta = r[u, n] + gamma * (0.0 if term[u, n] else nv[u, n]) - v[u, n]
                total += w * delta
                if done[u, n]:
                    break
                w *= gamma * lam
            adv[t, n] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("T,N", [(1, 1), (7, 3), (20, 5)])
def test_gae_matches_definition(gamma, lam, T, N):
    rng = np.random.default_rng(T * 100 + N)
    r, v, nv = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=(T, N))
    done = rng.random((T, N)) < 0.2
    term = done & (rng.random((T, N)) < 0.5)  # some episodes end by termination, some by the time limit
    adv, ret = generalized_advantage_estimate(
        *(torch.tensor(a) for a in (r, v, nv, term, done)), gamma=gamma, lam=lam
    )
    expected = _gae_by_definition(r, v, nv, term, done, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), expected + v, rtol=1e-10, atol=1e-10)


def test_gae_lambda_one_no_ends_is_discounted_return_minus_value():
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [0.0], [-1.0]])
    nv = torch.tensor([[0.0], [-1.0], [4.0]])
    z = torch.zeros(3, 1, dtype=torch.bool)
    adv, ret = generalized_advantage_estimate(r, v, nv, z, z, gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret[0, 0], torch.tensor(1.0 + 0.5 * 2.0 + 0.25 * 3.0 + 0.125 * 4.0))

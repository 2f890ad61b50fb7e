"""pi-RL's Flow-SDE chain on a flow policy against RLinf's formulas written out by hand in pi-RL's
own convention (time from noise 1 to action 0, v = noise - action); the on-policy ratio exactly 1
with one stochastic step drawn per batch; the SDE keeps the ODE's marginals (a Gaussian data
distribution with its exact velocity field); Flow-Noise is ReinFlow's chain with pi-RL's defaults."""

import math

import numpy as np
import pytest
import torch

from flowrl.config import load_config
from flowrl.models.policy import FlowPolicy
from flowrl.samplers import sampler_for
from flowrl.samplers.pi_rl import FlowSDEPolicySampler
from flowrl.samplers.reinflow import ReinFlowSampler


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DIMS = dict(obs_dim=3, action_dim=2, obs_horizon=2, action_horizon=4, hidden_dims=[32, 32])


def _rlinf_sde_mean_std(x, v_ours, idx, K, a):
    """RLinf's ``sample_mean_var_val`` for ``flow_sde``, float64 numpy, in pi-RL's convention:
    timesteps linspace(1, 1/K, K) + [0], v_pi = -v_ours (it points from the action to the noise)."""
    timesteps = np.concatenate([np.linspace(1, 1 / K, K), [0.0]])
    v = -v_ours
    t, delta = timesteps[idx], timesteps[idx] - timesteps[idx + 1]
    denom = np.where(timesteps == 1, timesteps[1], timesteps)
    sigma = (a * np.sqrt(timesteps / (1 - denom)))[:-1][idx]
    x0_pred, x1_pred = x - v * t, x + v * (1 - t)
    x0_weight = 1 - (t - delta)
    x1_weight = t - delta - sigma**2 * delta / (2 * t)
    return x0_pred * x0_weight + x1_pred * x1_weight, np.sqrt(delta) * sigma


@pytest.mark.parametrize("k", [0, 1, 3])
def test_flow_sde_step_is_rlinfs_formula(k):
    K, a = 4, 0.5
    sampler = FlowSDEPolicySampler(num_steps=K, noise_level=a, sde_window=0, logprob_reduction="sum")
    g = torch.Generator().manual_seed(k)
    x, v = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    kb = torch.full((3,), k)
    step = sampler.transition(kb, (v, None), x, generator=torch.Generator().manual_seed(1))
    mean, std = _rlinf_sde_mean_std(x.double().numpy(), v.double().numpy(), k, K, a)
    np.testing.assert_allclose(step.mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.std.double().numpy(), np.broadcast_to(std, mean.shape), rtol=1e-6)
    y = step.prev_sample.double().numpy()
    density = -((y - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(step.log_prob.double().numpy(), density.reshape(3, -1).sum(1), rtol=1e-5)
    if k == 0:  # at tau = 1 the schedule's denominator takes tau_1: sigma_0 = a sqrt(K)
        assert sampler.sigmas[0].item() == pytest.approx(a * math.sqrt(K))
    # the deterministic version of the step is the Euler step
    ode = sampler.transition(kb, (v, None), x, stochastic=False)
    torch.testing.assert_close(ode.prev_sample, x + v / K)


def test_flow_sde_on_policy_ratio_is_one_with_one_step_per_batch():
    torch.manual_seed(0)
    policy = FlowPolicy(**DIMS)
    sampler = FlowSDEPolicySampler(num_steps=4, noise_level=0.5, sde_window=1)
    obs = torch.randn(5, 2, 3)
    drawn = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        chain = sampler.sample(policy, obs, generator=g)
        finite = torch.isfinite(chain.log_probs)
        (cols,) = torch.nonzero(finite.all(0), as_tuple=True)
        assert len(cols) == 1 and int(finite.sum()) == 5  # one step, the same for the whole batch
        k = int(cols[0])
        drawn.add(k)
        new = sampler.log_prob(policy, chain, torch.full((5,), k))
        torch.testing.assert_close(new.log_prob, chain.log_probs[:, k], rtol=0, atol=1e-5)
    assert drawn == {0, 1, 2, 3}  # pi-RL draws the step uniformly
    new.log_prob.sum().backward()
    assert all(p.grad is not None for p in policy.net.parameters())


def test_flow_sde_keeps_the_marginals_of_the_flow():
    """x_1 ~ N(m, s^2) and x_t = t x_1 + (1 - t) eps have the exact velocity
    v(x, t) = m + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t m); the SDE with it must land on
    N(m, s^2) (without the drift correction the spread would grow)."""
    m, s = 0.7, 0.3

    class Exact(torch.nn.Module):
        latent_shape, device = (1, 1), torch.device("cpu")

        def condition(self, obs, guidance_scale=1.0):
            return {"obs": obs}

        def forward(self, x, t, cond, guidance_scale=1.0):
            t = t.view(-1, 1, 1).double()
            var = t**2 * s**2 + (1 - t) ** 2
            return (m + (t * s**2 - (1 - t)) / var * (x.double() - t * m)).float()

    sampler = FlowSDEPolicySampler(num_steps=200, noise_level=0.5, sde_window=0)
    chain = sampler.sample(Exact(), torch.zeros(20000, 1, 1), generator=torch.Generator().manual_seed(0))
    final = chain.latents[:, -1].flatten().double()
    assert final.mean().item() == pytest.approx(m, abs=0.01)
    assert final.std().item() == pytest.approx(s, abs=0.01)


def test_task_files_build_the_pi_rl_chains():
    sde = load_config("tasks/robot_inverted_pendulum_flow_sde.yaml")
    assert (
        sde.sampler.name == "flow_sde"
        and sde.sampler.sde_window == 1
        and sde.algorithm.options.ratio_scope == "step"
    )
    policy = FlowPolicy(obs_dim=4, action_dim=1, obs_horizon=1, action_horizon=4, hidden_dims=[16])
    s = sampler_for(sde, policy)
    assert isinstance(s, FlowSDEPolicySampler) and s.noise_level == sde.sampler.noise_level
    noise = load_config("tasks/robot_inverted_pendulum_flow_noise.yaml")
    assert noise.sampler.name == "flow_noise" and noise.algorithm.options.chain_logprob == "reinflow"
    s = sampler_for(noise, policy)
    assert type(s) is ReinFlowSampler and s.learned and s.name == "flow_noise"
    policy.prepare(noise)
    assert policy.noise_net is not None

"""The LQR value action reward (flowrl.guidance.lqr_value) against independent computations:
scipy's discrete Riccati solution, the chunk cost summed by hand in numpy, the Bellman identity
(the LQR feedback's own chunk scores -x0' P x0 and every other chunk less), the linearization
against MuJoCo's own step, and the gradient reward-gradient guidance follows."""

import numpy as np
import pytest
import torch

from flowrl.guidance.lqr_value import LQRValue

ENV = "InvertedPendulum-v5"


@pytest.fixture(scope="module")
def value():
    return LQRValue(ENV, q=[1.0, 2.0, 0.1, 0.3], r=0.5)


def _np(v):
    return (m.numpy() for m in (v.A, v.B, v.c, v.Q, v.R, v.P))


def test_riccati_matches_scipy(value):
    from scipy.linalg import solve_discrete_are

    A, B, _, Q, R, P = _np(value)
    np.testing.assert_allclose(P, solve_discrete_are(A, B, Q, R), rtol=1e-7)


def test_score_is_the_linear_rollout_cost_by_hand(value):
    A, B, c, Q, R, P = _np(value)
    g = np.random.default_rng(0)
    obs, acts = g.normal(size=(5, 1, 4)) * 0.05, g.normal(size=(5, 4, 1))
    expected = []
    for o, a in zip(obs, acts):
        x, cost = o[-1].copy(), 0.0
        for ai in a:
            cost += x @ Q @ x + ai @ R @ ai
            x = A @ x + B @ ai + c
        expected.append(-(cost + x @ P @ x))
    got = value(torch.as_tensor(obs), torch.as_tensor(acts))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_the_lqr_feedback_chunk_scores_the_cost_to_go_and_is_the_best(value):
    """Bellman: with a_i = -K x_i along the model the chunk cost plus x_T'Px_T is x_0'Px_0; any
    other chunk costs more (the LQR actions are optimal for the linear problem: c = 0 here)."""
    import copy

    value = copy.copy(value)
    value.c = torch.zeros_like(value.c)
    A, B, _, Q, R, P = _np(value)
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    x0 = np.array([0.1, -0.05, 0.2, 0.1])
    x, acts = x0.copy(), []
    for _ in range(4):
        acts.append(-K @ x)
        x = A @ x + B @ acts[-1]
    best = torch.as_tensor(np.array(acts))[None]  # (1, 4, 1)
    obs = torch.as_tensor(x0)[None, None]
    assert value(obs, best).item() == pytest.approx(-x0 @ P @ x0, rel=1e-9)
    others = best + 0.1 * torch.randn(
        8, 4, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert (value(obs.expand(8, 1, 4), others) < value(obs, best)).all()


def test_the_linearization_predicts_mujoco_near_upright(value):
    import gymnasium as gym

    env = gym.make(ENV).unwrapped
    env.reset(seed=0)
    A, B, c = value.A.numpy(), value.B.numpy(), value.c.numpy()
    x, a = np.array([0.02, 0.01, -0.03, 0.02]), np.array([0.05])
    env.set_state(x[:2], x[2:])
    true = env.step(a)[0]
    np.testing.assert_allclose(A @ x + B @ a + c, true, atol=1e-5)  # second order in |x| ~ 0.03
    assert np.abs(A @ x + B @ a - true).max() > 1e-3  # without c the pole's lean is missed
    env.close()


def test_gradient_matches_autograd_gradcheck(value):
    obs = torch.randn(3, 1, 4, dtype=torch.float64) * 0.05
    acts = torch.randn(3, 4, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: value(obs, a), (acts,))
    assert LQRValue.differentiable


def test_bad_input_is_one_config_error():
    from flowrl.errors import ConfigError

    with pytest.raises(ConfigError, match="full state"):
        LQRValue("Reacher-v5")
    with pytest.raises(ConfigError, match="q needs 4 weights"):
        LQRValue(ENV, q=[1.0, 1.0])
    with pytest.raises(ConfigError, match="r must be > 0"):
        LQRValue(ENV, r=0.0)


def test_the_double_pendulum_state_is_read_from_its_observation():
    """InvertedDoublePendulum-v5 observes (x, sin, cos, velocities, a force), not (qpos, qvel):
    the value recovers the state from it, checked against the simulator's own."""
    import gymnasium as gym

    value = LQRValue("InvertedDoublePendulum-v5")
    env = gym.make("InvertedDoublePendulum-v5")
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs = env.step(env.action_space.sample() * 0.1)[0]
    d = env.unwrapped.data
    state = value.state_from_obs(torch.as_tensor(obs, dtype=torch.float64))
    np.testing.assert_allclose(state.numpy(), np.concatenate([d.qpos, d.qvel]), atol=1e-12)
    assert value(torch.as_tensor(obs)[None, None], torch.zeros(1, 4, 1)).shape == (1,)
    env.close()

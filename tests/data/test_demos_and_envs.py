"""Robot data plumbing: the action-chunk wrapper's bookkeeping, vectorized autoreset, the
demonstration format and its readers, the scripted experts, and behavior cloning."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from flowrl.data.demos import Demonstrations, load_demonstrations
from flowrl.envs.wrappers import ActionChunkWrapper, executed_steps, make_vector_env
from flowrl.models.policy import DiffusionPolicy, FlowPolicy, load_policy


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These networks are tiny: one thread is fastest, and avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CounterEnv(gym.Env):
    """obs = [step count, last action]; reward = 10 * step + action; terminates after `length`
    steps when `terminate`, else a TimeLimit wrapper truncates it."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, length: int = 5, terminate: bool = True):
        self.length, self.terminate = length, terminate

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        a = float(action[0])
        obs = np.array([self.t, a], np.float32)
        return obs, 10.0 * self.t + a, self.terminate and self.t >= self.length, False, {}


def test_chunk_wrapper_sums_rewards_stacks_history_and_stops_at_episode_end():
    env = ActionChunkWrapper(CounterEnv(length=5), obs_horizon=3, action_steps=2)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 2) and (obs == 0).all()  # the first observation, repeated To times
    assert env.action_space.shape == (2, 1)
    obs, r, term, trunc, info = env.step(np.array([[0.1], [0.2]], np.float32))
    assert r == pytest.approx(10 + 0.1 + 20 + 0.2) and info["chunk_steps"] == 2
    np.testing.assert_allclose(obs[:, 0], [0, 1, 2])  # history: reset obs, step 1, step 2
    env.step(np.array([[0.0], [0.0]], np.float32))  # steps 3, 4
    obs, r, term, trunc, info = env.step(np.array([[0.5], [0.7]], np.float32))  # step 5 ends it
    assert term and not trunc and info["chunk_steps"] == 1
    assert r == pytest.approx(50.5)  # the second action of the chunk was not executed
    np.testing.assert_allclose(obs[:, 0], [3, 4, 5])
    assert info["episode_length"] == 5
    assert info["episode_return"] == pytest.approx(10 + 20 + 30 + 40 + 50 + 0.1 + 0.2 + 0.5)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 1), np.float32))


def test_vector_env_autoreset_keeps_final_observation_and_truncation():
    gym.register("flowrl-test/Counter-v0", entry_point=CounterEnv, kwargs={"terminate": False})
    vec = make_vector_env(
        2, env_id="flowrl-test/Counter-v0", obs_horizon=1, action_steps=3, max_episode_steps=4
    )
    obs, _ = vec.reset(seed=[0, 1])
    chunk = np.zeros((2, 3, 1), np.float32)
    obs, r, term, trunc, info = vec.step(chunk)  # steps 1..3
    np.testing.assert_allclose(r, [60, 60])
    obs, r, term, trunc, info = vec.step(chunk)  # step 4 hits the time limit after one action
    assert trunc.all() and not term.any()
    np.testing.assert_allclose(r, [40, 40])
    np.testing.assert_allclose(executed_steps(info, trunc), [1, 1])  # from final_info: info is the reset's
    np.testing.assert_allclose(np.stack(info["final_obs"])[:, 0, 0], [4, 4])  # the ended episode's last obs
    np.testing.assert_allclose(obs[:, 0, 0], [0, 0])  # already the next episode's first
    np.testing.assert_allclose(info["final_info"]["episode_return"], [100, 100])
    vec.close()


def _toy_demos(n_episodes=3, length=6, obs_dim=2, act_dim=1, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n_episodes * length, obs_dim)).astype(np.float32)
    return Demonstrations(
        obs,
        np.tanh(obs[:, :act_dim] * 2),
        np.arange(1, n_episodes + 1) * length,
        np.ones(n_episodes * length),
    )


def test_demonstrations_npz_round_trip_and_windows(tmp_path):
    demos = _toy_demos()
    demos.save(tmp_path / "d.npz")
    back = load_demonstrations(tmp_path / "d.npz")
    np.testing.assert_array_equal(back.observations, demos.observations)
    np.testing.assert_array_equal(back.episode_ends, [6, 12, 18])
    np.testing.assert_allclose(back.episode_returns(), [6, 6, 6])
    obs_w, act_w = back.windows(obs_horizon=2, action_horizon=3)
    assert obs_w.shape == (18, 2, 2) and act_w.shape == (18, 3, 1)
    # step 6 starts episode 2: its history repeats its own first observation
    np.testing.assert_array_equal(obs_w[6], demos.observations[[6, 6]])
    # step 11 ends episode 2: the chunk repeats its last action
    np.testing.assert_array_equal(act_w[11], demos.actions[[11, 11, 11]])
    np.testing.assert_array_equal(act_w[7], demos.actions[[7, 8, 9]])
    with pytest.raises(ValueError, match="episode_ends"):
        Demonstrations(demos.observations, demos.actions, [6, 5, 18])


def test_hdf5_readers(tmp_path):
    h5py = pytest.importorskip("h5py")
    demos = _toy_demos()
    with h5py.File(tmp_path / "d4rl.hdf5", "w") as f:  # D4RL: flat arrays, episode ends by flags
        f["observations"], f["actions"], f["rewards"] = demos.observations, demos.actions, demos.rewards
        ends = np.zeros(18, bool)
        ends[[5, 11]] = True
        f["terminals"], f["timeouts"] = ends, np.zeros(18, bool)  # the last episode is unfinished
    with h5py.File(tmp_path / "robomimic.hdf5", "w") as f:
        for i in range(3):
            g = f.create_group(f"data/demo_{i}")
            g["obs/a_pos"] = demos.observations[i * 6 : (i + 1) * 6, :1]
            g["obs/b_vel"] = demos.observations[i * 6 : (i + 1) * 6, 1:]
            g["actions"] = demos.actions[i * 6 : (i + 1) * 6]
    with h5py.File(tmp_path / "main_data.hdf5", "w") as f:  # Minari: one more observation per episode
        for i in range(3):
            s = slice(i * 6, (i + 1) * 6)
            f[f"episode_{i}/observations"] = np.concatenate(
                [demos.observations[s], np.zeros((1, 2), np.float32)]
            )
            f[f"episode_{i}/actions"], f[f"episode_{i}/rewards"] = demos.actions[s], demos.rewards[s]
    for fmt, name in (("d4rl", "d4rl.hdf5"), ("robomimic", "robomimic.hdf5"), ("minari", "main_data.hdf5")):
        back = load_demonstrations(tmp_path / name, fmt)
        np.testing.assert_allclose(back.observations, demos.observations)
        np.testing.assert_allclose(back.actions, demos.actions)
        np.testing.assert_array_equal(back.episode_ends, [6, 12, 18])


def test_lqr_expert_balances_the_pendulum_and_demos_are_recorded():
    from flowrl.data.experts import collect_demonstrations

    demos = collect_demonstrations(
        "InvertedPendulum-v5", "lqr", 2, seed=0, expert_kwargs={"q": [1, 1, 0.1, 0.1]}
    )
    assert demos.num_episodes == 2 and demos.episode_ends.tolist() == [1000, 2000]  # full LQR: the cap
    assert demos.observations.shape == (2000, 4) and demos.actions.shape == (2000, 1)
    weak = collect_demonstrations(
        "InvertedPendulum-v5", "lqr", 2, seed=0, expert_kwargs={"q": [0.001, 1, 0.001, 0.1], "drop": [0, 2]}
    )
    assert weak.episode_ends[-1] < 1000  # without cart feedback the cart drifts into the rail's end


def test_reacher_expert_reaches_the_target():
    from flowrl.data.experts import collect_demonstrations

    demos = collect_demonstrations(
        "Reacher-v5", "reacher_ik_pd", 3, seed=0, expert_kwargs={"kp": 1.0, "kd": 0.1}
    )
    final = demos.observations[demos.episode_ends - 1, 8:10]  # fingertip - target at the last step
    assert np.linalg.norm(final, axis=1).max() < 0.02


@pytest.mark.parametrize("cls", [DiffusionPolicy, FlowPolicy])
def test_bc_loss_decreases_and_policy_round_trips(cls, tmp_path):
    torch.manual_seed(0)
    demos = _toy_demos(n_episodes=4, length=16)
    kwargs = dict(obs_dim=2, action_dim=1, obs_horizon=1, action_horizon=2, hidden_dims=[64, 64])
    policy = cls(**kwargs)
    policy.normalizer.fit(torch.as_tensor(demos.observations), torch.tensor([-1.0]), torch.tensor([1.0]))
    obs_w, act_w = demos.windows(1, 2)
    obs_w = policy.normalizer.normalize_obs(torch.as_tensor(obs_w))
    act_w = policy.normalizer.normalize_action(torch.as_tensor(act_w))
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def eval_loss():  # the same noise draws each time, so the losses compare
        return policy.bc_loss(obs_w, act_w, generator=torch.Generator().manual_seed(1)).item()

    before = eval_loss()
    for _ in range(200):
        loss = policy.bc_loss(obs_w, act_w, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
    policy.save(tmp_path / "bc")
    back = load_policy(tmp_path / "bc")
    assert type(back) is cls
    x, t = torch.randn(3, 2, 1), torch.tensor([0, 5, 9]) if cls is DiffusionPolicy else torch.rand(3)
    cond = {"obs": obs_w[:3]}
    torch.testing.assert_close(back(x, t, cond), policy(x, t, cond))
    torch.testing.assert_close(back.normalizer.obs_mean, policy.normalizer.obs_mean)


def test_reward_scaler_tracks_the_std_of_discounted_returns():
    from flowrl.collectors.env import RewardScaler

    rng = np.random.default_rng(0)
    scaler, all_returns = RewardScaler(gamma=0.9), []
    for _ in range(3):  # three rollouts of 20 steps in 4 envs, episodes ending at random
        r, d = rng.normal(1.0, 2.0, (20, 4)), rng.random((20, 4)) < 0.1
        ret = np.zeros(4)
        for t in range(20):  # the discounted return, reset after an episode's last step
            ret = 0.9 * ret + r[t]
            all_returns.append(ret.copy())
            ret = ret * (1 - d[t])
        scaled = scaler(r, d)
    np.testing.assert_allclose(scaler.var, np.var(np.concatenate(all_returns)), rtol=1e-4)
    np.testing.assert_allclose(scaled, r / np.sqrt(scaler.var + 1e-8))

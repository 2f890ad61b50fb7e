"""Running observation normalization and reward scaling (issue 17, CleanRL's PPO-MuJoCo recipe):
the running statistics against numpy over the whole sample, the reward scaler against a hand
computation, and in a run: statistics updated by training rollouts only, frozen at evaluation,
resumed bit-identically, carried by the checkpoint into ``demos.expert: policy``."""

import json

import numpy as np
import pytest
import torch

from flowrl.config import load_config
from flowrl.data.experts import collect_demonstrations
from flowrl.envs.normalize import ObservationNormalizer, RewardScaler, RunningMeanStd
from flowrl.envs.rollouts import evaluate
from flowrl.errors import ConfigError
from flowrl.models.policy import Normalizer, load_policy
from flowrl.run import Run
from flowrl.samplers import sampler_for

PRIOR = 1e-4  # gymnasium's RunningMeanStd starts at mean 0, var 1, count 1e-4


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_batched_updates_give_the_whole_samples_mean_and_var():
    rng = np.random.default_rng(0)
    rms, rows = RunningMeanStd((3,)), []
    for size in (1, 7, 2, 50, 13):  # batches of any size, one row included
        batch = rng.normal([5.0, -2.0, 0.0], [3.0, 0.1, 10.0], (size, 3))
        rms.update(batch)
        rows.append(batch)
    x = np.concatenate(rows)
    n = len(x)
    np.testing.assert_allclose(rms.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rms.var, x.var(0), rtol=1e-3)  # the prior weighs 1e-4 / 73 rows
    # exactly: the sample pooled with the prior pseudo-sample (mean 0, var 1, weight 1e-4)
    mean = x.sum(0) / (n + PRIOR)
    var = (PRIOR * (1 + mean**2) + ((x - mean) ** 2).sum(0)) / (n + PRIOR)
    np.testing.assert_allclose(rms.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(rms.var, var, rtol=1e-12)
    assert rms.count == n + PRIOR
    back = RunningMeanStd((3,))
    back.load_state_dict(json.loads(json.dumps(rms.state_dict())))  # through state.json: exact
    assert np.array_equal(back.mean, rms.mean) and np.array_equal(back.var, rms.var)


def test_observation_normalizer_writes_the_policys_normalizer():
    """The newest frame of each (N, To, Do) history is merged; the policy's normalizer then gives
    gymnasium's (obs - mean) / sqrt(var + 1e-8), clipped at +-10."""
    rng = np.random.default_rng(1)
    norm = Normalizer(obs_dim=2, action_dim=1)
    on = ObservationNormalizer(norm)
    frames = []
    for _ in range(4):
        obs = rng.normal([1.0, 100.0], [2.0, 0.5], (3, 2, 2)).astype(np.float32)  # N=3, To=2
        on.update(obs)
        frames.append(obs[:, -1])
    x = np.concatenate(frames).astype(np.float64)
    test = rng.normal([1.0, 100.0], [20.0, 0.5], (5, 2))
    want = np.clip((test - on.rms.mean) / np.sqrt(on.rms.var + 1e-8), -10, 10)
    np.testing.assert_allclose(on.rms.mean, x.mean(0), rtol=1e-4)
    got = norm.normalize_obs(torch.as_tensor(test, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got).max() == 10  # the outlier in dim 0 is clipped


def test_reward_scaler_by_hand():
    """gamma 0.5, one env, rewards 1, 2, 4 with an episode end after the second step: discounted
    returns 1, 0.5 * 1 + 2 = 2.5, then 4 (restarted); their moments pooled with the prior."""
    scaler = RewardScaler(gamma=0.5)
    rewards = np.array([[1.0], [2.0], [4.0]])
    dones = np.array([[False], [True], [False]])
    scaled = scaler(rewards, dones)
    returns = np.array([1.0, 2.5, 4.0])
    mean = returns.sum() / (3 + PRIOR)
    var = (PRIOR * (1 + mean**2) + ((returns - mean) ** 2).sum()) / (3 + PRIOR)
    assert scaler.var == pytest.approx(var, rel=1e-12)
    np.testing.assert_allclose(scaled, rewards / np.sqrt(var + 1e-8), rtol=1e-12)


TASK = "robot_hopper_gaussian_expert"
TINY = [
    "env.num_envs=2",
    "env.n_steps=16",
    "env.eval_episodes=1",
    "train.eval_every=0",
    "train.save_every=2",
    "train.minibatch_size=16",
    "train.device=cpu",
    "env.normalize_obs=true",
    "optim.lr_schedule=constant",  # so the resumed run may name its longer length (a linear one may not)
]


def _run(root, name, extra):
    cfg = load_config(TASK, [f"train.output_dir={root}", f"train.run_name={name}", *TINY, *extra])
    run = Run(cfg, TASK, progress=False)
    return run, run.train()


def test_statistics_update_in_training_freeze_at_evaluation_and_resume_exactly(tmp_path):
    straight, rows = _run(tmp_path, "straight", ["train.num_epochs=4"])
    rms = straight.collector.obs_norm.rms
    assert rms.count == pytest.approx(PRIOR + 4 * 2 * (16 + 1))  # 4 rollouts: N resets + S steps of N envs
    n = straight.adapter.normalizer
    assert torch.equal(n.obs_mean, torch.as_tensor(rms.mean, dtype=torch.float32))
    assert n.obs_mean.abs().sum() > 0 and not torch.allclose(n.obs_std, torch.ones_like(n.obs_std))
    before = (n.obs_mean.clone(), n.obs_std.clone(), rms.count)
    straight.collector.evaluate(4)  # evaluation reads the statistics, never updates them
    assert torch.equal(n.obs_mean, before[0]) and torch.equal(n.obs_std, before[1]) and rms.count == before[2]

    _run(tmp_path, "resumed", ["train.num_epochs=2"])
    resumed, rows_b = _run(tmp_path, "resumed", ["train.num_epochs=4", "train.resume=auto"])
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and "normalizer.obs_mean" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert straight.collector.state_dict() == resumed.collector.state_dict()
    assert rows[-1]["loss_pg"] == rows_b[-1]["loss_pg"]

    # the checkpoint's policy folder carries the statistics: its demonstrations are its evaluation
    folder = resumed.run_dir / "checkpoints" / "epoch_000004"
    policy = load_policy(folder)
    assert torch.equal(policy.normalizer.obs_mean, n.obs_mean)
    demos = collect_demonstrations("Hopper-v5", "policy", 2, 7, expert_kwargs={"path": str(folder)})
    cfg = resumed.cfg
    sampler = sampler_for(cfg, policy)
    want = [evaluate(policy, sampler, cfg, 1, 7 + e)["returns"][0] for e in range(2)]
    assert np.allclose(demos.episode_returns(), want)


def test_bad_input():
    with pytest.raises(ConfigError, match="env.normalize_obs.*model.pretrained=scratch"):
        load_config("robot_inverted_pendulum_reinflow", ["env.normalize_obs=true"])

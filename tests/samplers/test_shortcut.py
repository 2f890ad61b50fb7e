"""Shortcut flow policies (Frans et al. 2024, as ReinFlow's ``ShortCutFlow`` pre-trains them and its
``PPOShortCut`` fine-tunes them): the self-consistency target and the whole BC loss against a
by-hand computation; the 1-step chain is the Euler step at d = 1; the ReinFlow chain's on-policy
ratio is exactly 1; shortcut BC beats plain flow BC at 1 and 2 steps on a 2-D mixture; ReinFlow
fine-tuning of a 2-step shortcut BC policy raises the InvertedPendulum return; resume is bit-identical;
a step count off the d grid is refused in one line."""

import math

import pytest
import torch

from flowrl.config import load_config
from flowrl.core import policy_loss
from flowrl.errors import ConfigError
from flowrl.models.policy import FlowPolicy, load_policy
from flowrl.models.shortcut import ShortcutFlowPolicy
from flowrl.pretrain import build_policy, pretrain
from flowrl.run import Run
from flowrl.samplers.reinflow import ReinFlowSampler, from_config


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These networks are tiny: one thread is fastest, and avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DIMS = dict(obs_dim=3, action_dim=2, obs_horizon=2, action_horizon=4, hidden_dims=[32, 32])


def _policy(levels=5, seed=0, noise=True):
    torch.manual_seed(seed)
    policy = ShortcutFlowPolicy(**DIMS, levels=levels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights away from their init, so that d and t change the velocity
        for p in policy.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    if noise:
        policy.add_noise_net(0.05, 0.3, [16])
        with torch.no_grad():
            for p in policy.noise_net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return policy


# ---------------------------------------------------------------- pre-training: the targets
def test_self_consistency_target_and_bc_loss_equal_the_formula_by_hand():
    policy = _policy(noise=False)
    B, L = 16, policy.levels
    obs, x1 = torch.randn(B, 2, 3), torch.rand(B, 4, 2) * 2 - 1
    net = policy.net

    def s(x, t, d, o):  # the network on one row, scalars for t and d
        return net(x[None], torch.tensor([t]), torch.tensor([d]), o[None])[0]

    # the whole loss from the generator's draws, replayed in the order bc_loss makes them
    g = torch.Generator().manual_seed(3)
    loss = policy.bc_loss(obs, x1, generator=g)
    g = torch.Generator().manual_seed(3)
    n = int(B * 0.25)  # ReinFlow's self_consistency_k
    j = torch.randint(0, L, (n,), generator=g)
    u = torch.rand((B,), generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    delta, terms = 1e-5, []
    for i in range(B):
        if i < n:  # self-consistency: d = 2^-j, t on d's grid; two half steps of the network
            d = 2.0 ** -int(j[i])
            t = math.floor(float(u[i]) / d) * d
            xt = (1 - (1 - delta) * t) * x0[i] + t * x1[i]
            with torch.no_grad():
                v1 = s(xt, t, d / 2, obs[i])
                v2 = s(xt + d / 2 * v1, t + d / 2, d / 2, obs[i])
            target = (v1 + v2) / 2
            torch.testing.assert_close(  # the method alone, on this row
                policy.self_consistency_target(xt[None], torch.tensor([t]), torch.tensor([d]), obs[i][None])[
                    0
                ],
                target,
            )
            assert 0 <= t <= 1 - d and abs(t / d - round(t / d)) < 1e-9
        else:  # flow matching at d = 0
            d, t = 0.0, float(u[i])
            xt = (1 - (1 - delta) * t) * x0[i] + t * x1[i]
            target = x1[i] - (1 - delta) * x0[i]
        terms.append(((s(xt, t, d, obs[i]) - target) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()  # the targets carry no gradient; the prediction does
    assert all(p.grad is not None for p in policy.net.parameters())


def test_draws_cover_the_d_grid_with_t_on_it():
    policy = _policy(levels=4, noise=False)
    x0, t, d, n = policy.draw_shortcut_batch(torch.zeros(4000, 4, 2), torch.Generator().manual_seed(0))
    assert n == 1000 and (d[n:] == 0).all()
    assert set(d[:n].tolist()) == {1.0, 0.5, 0.25, 0.125}  # 2^-j, j in 0 .. L - 1
    k = t[:n] / d[:n]
    assert torch.equal(k, k.round()) and (t[:n] + d[:n] <= 1).all()
    assert ((t[:n] > 0) & (d[:n] == 0.5)).any()  # t = 1/2 drawn at d = 1/2


# ---------------------------------------------------------------- the chain at d = 1/K
def test_one_step_chain_is_the_euler_step_at_d_one():
    policy = _policy()
    obs = torch.randn(5, 2, 3)
    sampler = ReinFlowSampler(num_steps=1, denoised_clip=1.0, noise_clip=3.0)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    x0, x1, o = chain.latents[:, 0], chain.latents[:, 1], chain.cond["obs"]
    B = x0.shape[0]
    v = policy.net(x0, torch.zeros(B), torch.ones(B), o)  # t = 0, d = 1
    mean = (x0 + v).clamp(-1, 1)
    std = policy.noise_net(torch.zeros(B), o)
    step = sampler.log_prob(policy, chain, torch.zeros(B, dtype=torch.long))
    torch.testing.assert_close(step.mean, mean)
    hand = (-((x1 - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).mean((1, 2))
    torch.testing.assert_close(chain.log_probs[:, 0], hand, rtol=1e-5, atol=1e-5)
    assert x1.abs().max() <= 1  # the action clamp of the last step
    # the deterministic chain (evaluation) is the plain Euler step; a d = 0 velocity is another field
    det = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0), deterministic=True)
    x0 = det.latents[:, 0]
    torch.testing.assert_close(
        det.latents[:, 1], (x0 + policy.net(x0, torch.zeros(B), torch.ones(B), o)).clamp(-1, 1)
    )
    assert not torch.allclose(
        policy(x0, torch.zeros(B), {"obs": o}), policy.net(x0, torch.zeros(B), torch.ones(B), o)
    )


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_reinflow_shortcut_on_policy_ratio_is_exactly_one(num_steps):
    policy = _policy()
    sampler = ReinFlowSampler(num_steps=num_steps, denoised_clip=1.0, noise_clip=3.0)
    obs = torch.randn(6, 2, 3)
    chain = sampler.sample(policy, obs, generator=torch.Generator().manual_seed(0))
    for k in range(num_steps):
        new = sampler.log_prob(policy, chain, torch.full((6,), k))
        torch.testing.assert_close(new.log_prob, chain.log_probs[:, k], rtol=0, atol=0)
        t = torch.full((6,), k / num_steps)  # every step at d = 1/K
        v = policy.net(chain.latents[:, k], t, torch.full((6,), 1 / num_steps), chain.cond["obs"])
        torch.testing.assert_close(new.mean, (chain.latents[:, k] + v / num_steps).clamp(-1, 1))
    idx = torch.arange(6) % num_steps
    new = sampler.log_prob(policy, chain, idx)
    old = chain.log_probs.gather(1, idx[:, None]).squeeze(1)
    terms = policy_loss(new.log_prob, old, torch.linspace(-1, 1, 6), 0.01)
    assert terms["ratio_mean"].item() == 1.0
    terms["loss"].backward()
    assert all(p.grad is not None for p in policy.net.parameters())


def test_pi_rl_flow_sde_runs_a_shortcut_policy_at_d_one_over_k():
    """pi-RL's Flow-SDE chain (its own predict) feeds a shortcut policy d = 1/K as ReinFlow's does:
    the step mean is pi-RL's formula on the d = 1/K velocity, the ratio exactly 1; K off the grid is
    refused there too."""
    from flowrl.samplers.pi_rl import FlowSDEPolicySampler
    from flowrl.samplers.pi_rl import from_config as pirl_from_config

    policy, K, B = _policy(noise=False), 2, 6
    sampler = FlowSDEPolicySampler(K, 0.5, 0, "mean")
    chain = sampler.sample(policy, torch.randn(B, 2, 3), generator=torch.Generator().manual_seed(0))
    for k in range(K):
        x, t, tn = chain.latents[:, k], k / K, (k + 1) / K
        v = policy.net(x, torch.full((B,), t), torch.full((B,), 1 / K), chain.cond["obs"])
        sigma = sampler.sigmas[k].item()
        a_hat, n_hat = x + (1 - t) * v, x - t * v  # pi-RL's Flow-SDE mean, by hand
        mean = tn * a_hat + ((1 - tn) - sigma**2 * (tn - t) / (2 * (1 - t))) * n_hat
        new = sampler.log_prob(policy, chain, torch.full((B,), k))
        torch.testing.assert_close(new.mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.log_prob, chain.log_probs[:, k], rtol=0, atol=0)
    cfg = load_config(
        "robot_inverted_pendulum_reinflow_shortcut",
        ["algorithm.name=pirl_flow_sde", "sampler.name=flow_sde", "sampler.num_steps=8"],
    )
    with pytest.raises(ConfigError, match="up to 4"):
        pirl_from_config(cfg.sampler, _policy(levels=3, noise=False))


def test_step_count_off_the_grid_is_refused_in_one_line():
    cfg = load_config("robot_inverted_pendulum_reinflow_shortcut", ["sampler.num_steps=3"])
    with pytest.raises(ConfigError) as e:
        build_policy(cfg, 4, 1)  # before any cloning
    msg = str(e.value)
    assert "\n" not in msg and "sampler.num_steps=3" in msg and "power of two" in msg
    policy = _policy(levels=3, noise=False)
    with pytest.raises(ConfigError, match="up to 4"):  # d = 1/8 is below a 3-level grid
        from_config(
            load_config("robot_inverted_pendulum_reinflow_shortcut", ["sampler.num_steps=8"]).sampler, policy
        )
    with pytest.raises(ConfigError, match="model.shortcut_levels"):
        build_policy(
            load_config("robot_inverted_pendulum_reinflow_shortcut", ["model.shortcut_levels=0"]), 4, 1
        )


# ---------------------------------------------------------------- BC: shortcut vs flow at few steps
def mixture(n, generator):
    """(n, 1, 2) draws from 4 Gaussians at (+-0.5, +-0.5), std 0.05: far from their mean."""
    centers = torch.tensor([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])
    idx = torch.randint(0, 4, (n,), generator=generator)
    return (centers[idx] + 0.05 * torch.randn(n, 2, generator=generator))[:, None]


def fit_2d(kind, seed, steps, levels):
    """A flow or shortcut policy (no observation to speak of: a constant one) cloned on the mixture
    with pretrain's optimizer (AdamW, lr 1e-3), batch 256."""
    torch.manual_seed(seed)
    dims = dict(obs_dim=1, action_dim=2, obs_horizon=1, action_horizon=1, hidden_dims=[64, 64])
    policy = ShortcutFlowPolicy(**dims, levels=levels) if kind == "shortcut" else FlowPolicy(**dims)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    obs = torch.zeros(256, 1, 1)
    for _ in range(steps):
        loss = policy.bc_loss(obs, mixture(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def sample_2d(policy, num_steps, seed, n=1024):
    """(n, 2) actions of the K-step Euler chain (the deterministic ReinFlow chain, no clips)."""
    sampler = ReinFlowSampler(num_steps=num_steps)
    with torch.no_grad():
        chain = sampler.sample(
            policy, torch.zeros(n, 1, 1), generator=torch.Generator().manual_seed(seed), deterministic=True
        )
    return chain.latents[:, -1, 0]


def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely): 0 iff the two distributions are equal."""
    y = y.reshape(len(y), -1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


# Measured at 300 BC steps, L = 19 (ReinFlow's grid), energy distance to 1024 fresh draws (0: the
# same distribution), seeds 0, 1, 2: 1 step flow 0.323, 0.358, 0.285 vs shortcut 0.074, 0.073, 0.083;
# 2 steps flow 0.277, 0.281, 0.284 vs shortcut 0.109, 0.104, 0.122 (4 steps: 0.116, 0.111, 0.114 vs
# 0.075, 0.077, 0.081). The margins are 3x the seed-to-seed std of the gap (1 step: 0.249, 0.285,
# 0.202, std 0.042; 2 steps: 0.168, 0.177, 0.162, std 0.008, floored at 0.08), below every seed's gap.
# (At 200 steps the shortcut's d = 1 is not learnt yet: 1 step 0.213 vs flow's 0.222.)
BC_STEPS, BC_LEVELS = 300, 19
BC_MARGIN = {1: 0.12, 2: 0.08}


def test_shortcut_bc_beats_flow_bc_at_one_and_two_steps():
    """Plain flow matching at 1 Euler step lands every draw on the data's mean (v(x_0, 0) = E[x_1]
    - x_0), at 2 steps between the modes; the shortcut's d = 1 and d = 1/2 velocities reach them."""
    data = mixture(1024, torch.Generator().manual_seed(1000))
    flow, short = (fit_2d(kind, 0, BC_STEPS, BC_LEVELS) for kind in ("flow", "shortcut"))
    for k in (1, 2):
        e_flow, e_short = (energy_distance(sample_2d(p, k, 0), data) for p in (flow, short))
        assert e_short + BC_MARGIN[k] < e_flow, (k, e_short, e_flow)


# ---------------------------------------------------------------- ReinFlow on the pendulum
TASK = "robot_inverted_pendulum_reinflow_shortcut"
BC_OVERRIDES: list[str] = []  # the task's BC (2000 steps)
# Measured on seed 0: the shortcut BC's deterministic 2-step return 380 +/- 265 over the 10 fixed
# evaluation episodes (flow BC at 2 steps: 198; at 1 step both fail, 50 and 52; at 4 steps 267 and
# 318), then 405, 531, 407, 438, 642, 798 after 1-6 ReinFlow epochs. The margin is the flow tests'
# (tests/collectors/test_env.py): 300, 3.6 standard errors of the BC's per-episode spread (265 / sqrt(10)).
FT_EPOCHS, FT_MARGIN = 6, 300.0


@pytest.fixture(scope="module")
def shortcut_bc(tmp_path_factory):
    """The task's shortcut BC policy (seed 0), shared by the fine-tuning tests."""
    root = tmp_path_factory.mktemp("shortcut")
    cfg = load_config(TASK, [f"train.output_dir={root}", *BC_OVERRIDES])
    return root, pretrain(cfg, TASK, progress=False)


def _finetune(root, run, overrides):
    cfg = load_config(TASK, [f"train.output_dir={root}", f"train.run_name={run}", *BC_OVERRIDES, *overrides])
    trainer = Run(cfg, TASK, progress=False)
    return trainer, trainer.train()


@pytest.mark.slow
def test_reinflow_raises_the_two_step_shortcut_policys_return(shortcut_bc):
    root, summary = shortcut_bc
    assert load_policy(root / f"{TASK}_bc").kind == "shortcut"
    trainer, history = _finetune(root, "learn", [f"train.num_epochs={FT_EPOCHS}", "train.eval_every=0"])
    before, after = history[0], history[-1]
    assert trainer.sampler.num_steps == 2  # the task: 2 steps at d = 1/2
    assert before["eval_return_mean"] == pytest.approx(summary["eval_return_mean"])  # the BC policy
    assert after["eval_return_mean"] >= before["eval_return_mean"] + FT_MARGIN, (before, after)


def test_shortcut_resume_is_exact(shortcut_bc):
    root, _ = shortcut_bc
    tiny = [
        "env.n_steps=8",
        "env.num_envs=2",
        "train.eval_every=0",
        "env.eval_episodes=1",
        "train.save_every=2",
        "train.minibatch_size=16",
        "sampler.num_steps=2",  # two steps at d = 1/2
    ]
    straight, rows = _finetune(root, "straight", [*tiny, "train.num_epochs=4"])
    _finetune(root, "resumed", [*tiny, "train.num_epochs=2"])
    resumed, rows_b = _finetune(root, "resumed", [*tiny, "train.num_epochs=4", "train.resume=auto"])
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and any(k.startswith("noise_net.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert rows[-1]["loss_pg"] == rows_b[-1]["loss_pg"]
    policy = load_policy(resumed.run_dir / "checkpoints" / "epoch_000004")  # a shortcut policy again
    assert isinstance(policy, ShortcutFlowPolicy) and policy.noise_net is not None

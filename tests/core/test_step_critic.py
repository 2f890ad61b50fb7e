"""The step critic (advantage: step_critic, AC-Flow style): GAE over denoising steps against the
recursion written out here, the zero critic's reduction to the trajectory advantage, the
collector's per-step advantages and the PPO and value losses against a computation by hand on a
tiny SD3-style flow model, the config checks, a learning run on fixed seeds and an exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flowrl.config import ConfigError, load_config
from flowrl.core.advantages import group_advantages
from flowrl.core.step_critic import denoising_gae
from flowrl.objectives.base import Minibatch


def _gae_by_hand(R, V, gamma, lam):
    """A_k = sum_{j >= k} (gamma lam)^(j - k) delta_j, delta_j = r_j + gamma V_{j+1} - V_j, with
    r_j = R only at the last step and V_K = 0; returns G_k = A_k + V_k."""
    B, K = V.shape
    A = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            total = 0.0
            for j in range(k, K):
                r = float(R[b]) if j == K - 1 else 0.0
                v_next = float(V[b, j + 1]) if j + 1 < K else 0.0
                delta = r + gamma * v_next - float(V[b, j])
                total += (gamma * lam) ** (j - k) * delta
            A[b, k] = total
    return A, A + V.double()


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.9), (0.95, 0.8), (0.99, 0.0)])
def test_denoising_gae_matches_the_recursion_by_hand(gamma, lam):
    g = torch.Generator().manual_seed(0)
    R, V = (
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(5, 6, generator=g, dtype=torch.float64),
    )
    adv, ret = denoising_gae(R, V, gamma, lam)
    want_adv, want_ret = _gae_by_hand(R, V, gamma, lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


def test_a_zero_critic_gives_the_trajectory_advantage():
    R = torch.tensor([1.5, -0.5, 0.25])
    adv, ret = denoising_gae(R, torch.zeros(3, 4), 1.0, 1.0)
    torch.testing.assert_close(adv, R[:, None].expand(3, 4))  # every step: the trajectory's advantage
    torch.testing.assert_close(ret, R[:, None].expand(3, 4))
    adv, _ = denoising_gae(R, torch.zeros(3, 4), 1.0, 0.5)  # lambda < 1: discounted toward the start
    torch.testing.assert_close(adv, R[:, None] * 0.5 ** torch.arange(3, -1, -1.0)[None])


def test_config_checks():
    cfg = load_config("acflow_tiny")
    assert cfg.advantage == "step_critic" and cfg.algorithm.step_critic_shaping == "group"
    with pytest.raises(ConfigError, match="step_critic_shaping"):
        load_config("acflow_tiny", ["algorithm.step_critic_shaping=median"])
    with pytest.raises(ConfigError, match="only the PPO family"):
        load_config("acflow_tiny", ["algorithm.name=fpo"])
    with pytest.raises(ConfigError, match="ratio_scope=chain"):
        load_config("acflow_tiny", ["algorithm.ratio_scope=chain"])
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config("acflow_tiny", ["algorithm.group_size=1", "train.sample_batch_size=16"])
    with pytest.raises(ConfigError, match="does not fit kind: env"):
        load_config("robot_inverted_pendulum_reinflow", ["algorithm.advantage=step_critic"])


SMALL = [
    "train.sample_batch_size=8",
    "train.minibatch_size=4",
    "train.eval_every=0",
    "train.eval_prompts=[red]",
]


def test_per_step_advantages_and_the_losses_by_hand(tmp_path):
    """One epoch collected with a critic whose last layer is perturbed (a zero critic would hide
    the values): the collector's step advantages against GAE written out on the critic's values
    computed step by step, then one minibatch's PPO loss (on-policy: ratio 1, so the clipped
    surrogate is -mean A over its pairs) and value loss against the formulas."""
    from flowrl.run import Run

    run = Run(load_config("acflow_tiny", [f"train.output_dir={tmp_path}", *SMALL]), progress=False)
    a = run.cfg.algorithm
    with torch.no_grad():
        for p in run.value.head[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    chain, _ = run.collector.collect(0)
    chain.advantages, info = run.collector.advantages(chain)
    B, K = len(chain), chain.num_steps
    with torch.no_grad():
        V = torch.stack(
            [
                run.value(chain.latents[:, k], chain.timesteps[:, k], chain.cond["prompt_embeds"])
                for k in range(K)
            ],
            1,
        )
    shaped, _ = group_advantages(chain.rewards, chain.metadata["group"], a.std_scope)
    want_adv, want_ret = _gae_by_hand(shaped, V, a.gamma, a.gae_lambda)
    step = chain.metadata["step_advantages"]
    assert step.shape == (B, K) and V.abs().max() > 0.05
    torch.testing.assert_close(
        step.double(), want_adv.clamp(-a.adv_clip_max, a.adv_clip_max), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(chain.metadata["returns"].double(), want_ret, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chain.advantages, shaped.clamp(-a.adv_clip_max, a.adv_clip_max))
    assert "explained_variance" in info

    rows, steps = torch.tensor([0, 3, 5]), torch.tensor([[0, 2], [1, 3], [3, 0]])
    mb = Minibatch(rows, steps)
    terms = run.objective.loss(chain, mb, epoch=1, generator=torch.Generator().manual_seed(0))
    pairs = step[rows[:, None], steps].reshape(-1)
    torch.testing.assert_close(terms["loss_pg"], -pairs.mean(), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        v_rows = torch.stack(
            [
                run.value(chain.latents[rows, k], chain.timesteps[rows, k], chain.cond["prompt_embeds"][rows])
                for k in range(K)
            ],
            1,
        )
    want_v = 0.5 * ((v_rows - chain.metadata["returns"][rows]) ** 2).mean()
    torch.testing.assert_close(terms["loss_value"], want_v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["loss_pg"] + a.vf_coef * want_v, atol=1e-6, rtol=1e-5)
    # critic warm-up: the value loss alone
    warm = run.objective.loss(chain, mb, epoch=0, generator=torch.Generator().manual_seed(0))
    assert "loss_pg" not in warm
    torch.testing.assert_close(warm["loss"], a.vf_coef * want_v, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_step_critic_ppo_raises_the_jpeg_reward_on_fixed_seeds(tmp_path):
    """tasks/acflow_tiny.yaml (8 epochs of 16 samples, the first one critic warm-up). The untrained
    model's 16-sample batch-mean JPEG reward has std 0.0026 over 12 sampling seeds, so the 64-sample
    mean below about 0.0013; we ask for 4 of those, 0.0052 (the FPO test's rule). Measured gains on
    training seeds 0, 1, 2: +0.017, +0.026, +0.014 (plain GRPO, advantage=group, the same settings:
    +0.024 on seed 0, +0.009 on seed 2)."""
    from flowrl.run import Run

    run = Run(
        load_config("acflow_tiny", [f"train.output_dir={tmp_path}", "train.eval_every=0"]), progress=False
    )

    def reward() -> float:
        return float(torch.stack([run.collector.collect(1000 + e)[0].rewards for e in range(4)]).mean())

    before = reward()
    history = run.train()
    after = reward()
    assert after - before > 0.0052, (before, after)
    assert all(r["loss_value"] > 0 for r in history[1:])
    # the warm-up epoch trains the critic alone
    assert "loss_pg" not in history[1] and "loss_pg" in history[2]


def test_resume_is_exact(tmp_path):
    """1 epoch (the critic's warm-up), then resumed for a PPO epoch, equals 2 straight: the model's
    and the critic's weights bit for bit (and so the optimizer's state of both), and the metrics."""
    from flowrl.run import Run

    def cfg(name, *extra):
        return load_config(
            "acflow_tiny",
            [*SMALL, f"train.output_dir={tmp_path}", f"train.run_name={name}", "train.save_every=1", *extra],
        )

    Run(cfg("straight", "train.num_epochs=2"), progress=False).train()
    Run(cfg("split", "train.num_epochs=1"), progress=False).train()
    Run(cfg("split", "train.num_epochs=2", "train.resume=auto"), progress=False).train()
    a, b = (
        load_file(str(tmp_path / n / "checkpoints/epoch_000002/trainable.safetensors"))
        for n in ("straight", "split")
    )
    assert any(k.startswith("value.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("straight", "split")
    ]
    keys = ("reward_mean", "loss_pg", "loss_value", "explained_variance", "value_mean")
    assert [[r.get(k) for k in keys] for r in rows[0]] == [[r.get(k) for k in keys] for r in rows[1]]
    assert "loss_pg" in rows[1][2] and "loss_pg" not in rows[1][1]

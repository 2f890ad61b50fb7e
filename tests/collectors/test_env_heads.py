"""The Gaussian heads end to end on InvertedPendulum (tasks/robot_inverted_pendulum_{gaussian,
residual,dsrl}.yaml): PPO on the shared loop raises the deterministic evaluation return; resume
is bit-identical; a checkpoint folder is a policy folder.

The learning tests run a small version of each task (4 envs x 125 chunks = 2000 env steps an
epoch, 5 fixed evaluation seeds) from a weak BC policy, and ask for +300 on the 1000-step cap,
the margin of the DPPO and ReinFlow tests on this task (tests/collectors/test_env.py). Measured on
seed 0, before -> after (the per-episode std of the start over the 5 seeds): Gaussian MLP 204 ->
1000 (34) in 4 epochs, residual 350 -> 884 (261) in 2, DSRL 184 -> 1000 (1) in 3. The noisiest
start, the residual's, has a standard error of 261 / sqrt(5) = 117 on its 5-episode mean: 300 is
2.6 of them, and each measured gain is at least 4.5 of them.
"""

import pytest
import torch

from flowrl.config import load_config
from flowrl.models.policy import load_policy
from flowrl.pretrain import pretrain
from flowrl.run import Run

MARGIN = 300.0
SMALL = [
    "env.num_envs=4",
    "env.n_steps=125",
    "env.eval_episodes=5",
    "train.eval_every=0",
    "train.save_every=0",
]
# BC on few demonstrations: the Gaussian MLP from 200 steps on 5 episodes, the flow policy under
# the residual and DSRL heads from 500 steps on 10 (with more, the Gaussian BC already scores 1000)
BC = {
    "robot_inverted_pendulum_gaussian": ["pretrain.steps=200", "demos.num_episodes=5"],
    "robot_inverted_pendulum_dsrl": ["pretrain.steps=500", "demos.num_episodes=10"],
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bc(tmp_path_factory):
    """The weak BC policies: a Gaussian MLP, and the flow policy the residual and DSRL heads steer."""
    root = tmp_path_factory.mktemp("heads")
    for task, options in BC.items():
        cfg = load_config(task, [f"train.output_dir={root}", "pretrain.eval_episodes=0", *options])
        pretrain(cfg, task, progress=False)
    flow = root / "robot_inverted_pendulum_dsrl_bc"
    return {
        "robot_inverted_pendulum_gaussian": [],
        "robot_inverted_pendulum_residual": [f"model.pretrained={flow}"],
        "robot_inverted_pendulum_dsrl": [],
        "root": root,
    }


def _run(bc, task, name, overrides):
    cfg = load_config(
        task, [f"train.output_dir={bc['root']}", f"train.run_name={name}", *bc[task], *overrides]
    )
    run = Run(cfg, task, progress=False)
    return run, run.train()


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, epochs, extra",
    [
        # DPPO's fine-tuning clip 0.01 learns slowly at this size; its scratch runs' 0.1 here
        ("robot_inverted_pendulum_gaussian", 4, ["algorithm.clip_range=0.1", "optim.learning_rate=3e-4"]),
        # ResiP's target KL 0.1 stops most of an epoch's passes at this batch size (DPPO's 1.0 here),
        # and its learning rate 3e-4 needs 6 such epochs (measured: 350 -> 828 at 1e-3 but 350 -> 440 at 3e-4)
        ("robot_inverted_pendulum_residual", 2, ["algorithm.target_kl=1.0", "optim.learning_rate=1e-3"]),
        ("robot_inverted_pendulum_dsrl", 3, []),
    ],
)
def test_head_raises_the_return(bc, task, epochs, extra):
    run, history = _run(bc, task, f"learn_{task}", [*SMALL, f"train.num_epochs={epochs}", *extra])
    before, after = history[0]["eval_return_mean"], history[-1]["eval_return_mean"]
    assert after >= before + MARGIN, (before, after)
    assert {"loss_pg", "approx_kl", "clipfrac", "loss_value"} <= set(history[1])


@pytest.mark.parametrize(
    "task",
    ["robot_inverted_pendulum_gaussian", "robot_inverted_pendulum_residual", "robot_inverted_pendulum_dsrl"],
)
def test_head_resume_is_exact(bc, task):
    tiny = ["env.n_steps=16", "env.num_envs=2", "env.eval_episodes=1", "env.max_episode_steps=40"]
    tiny += ["train.eval_every=0", "train.save_every=1"]
    tiny += ["train.minibatch_size=16", "optim.lr_warmup=2"]  # a warmup across the resume
    straight, rows = _run(bc, task, f"straight_{task}", [*tiny, "train.num_epochs=2"])
    _run(bc, task, f"resumed_{task}", [*tiny, "train.num_epochs=1"])
    resumed, rows_b = _run(bc, task, f"resumed_{task}", [*tiny, "train.num_epochs=2", "train.resume=auto"])
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows[-1]["loss_pg"] == rows_b[-1]["loss_pg"] and rows[-1]["env_steps"] == rows_b[-1]["env_steps"]
    # the checkpoint folder is a policy folder: the trained head (and its frozen base) load on their own
    policy = load_policy(resumed.run_dir / "checkpoints" / "epoch_000002")
    sampler = resumed.sampler
    chain = sampler.sample(resumed.adapter, torch.randn(3, 1, 4), generator=torch.Generator().manual_seed(0))
    k = next(i for i, s in enumerate(sampler.layout) if s == "gaussian")
    new = sampler.log_prob(policy, chain, torch.full((3,), k)).log_prob
    torch.testing.assert_close(new, chain.log_probs[:, k], rtol=0, atol=1e-5)

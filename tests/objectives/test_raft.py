"""RAFT: each group's best samples are kept, and the loss is the model's own denoising loss on them,
against diffusers' DDIMScheduler.add_noise and the epsilon target written here."""

import copy
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.objectives.base import Minibatch
from flowrl.objectives.raft import RAFT, top_in_groups
from flowrl.samplers import DDIMSampler

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a cat"] * 4 + ["a dog"] * 4


def test_top_in_groups_keeps_each_groups_best():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.9, 3.0, -1.0, 2.0, 0.0])
    groups = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2])
    assert top_in_groups(rewards, groups, 1).tolist() == [0, 1, 0, 0, 1, 0, 0, 0]  # a tie: the first
    assert top_in_groups(rewards, groups, 2).tolist() == [0, 1, 0, 1, 1, 0, 1, 0]


def test_top_in_groups_equals_a_per_group_sort():
    """The vectorized ranking against each group sorted by hand (best reward first, ties by
    index), on random batches: uneven groups under scattered labels, many ties, keep above a size."""
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        B = int(torch.randint(1, 40, (1,), generator=g))
        groups = torch.randint(-3, 6, (B,), generator=g) * 1000  # labels, not 0..n-1; uneven sizes
        rewards = torch.randint(0, 4, (B,), generator=g).float() / 2  # 4 values: ties everywhere
        keep = int(torch.randint(1, 6, (1,), generator=g))
        expected, r, labels = [False] * B, rewards.tolist(), groups.tolist()
        for label in set(labels):
            members = sorted((i for i in range(B) if labels[i] == label), key=lambda i: (-r[i], i))
            for i in members[:keep]:
                expected[i] = True
        assert top_in_groups(rewards, groups, keep).tolist() == expected


def test_loss_is_the_denoising_loss_of_the_kept_rows(tiny_pipe):
    from diffusers import DDIMScheduler

    cfg = load_config(
        str(REPO / "tasks/jpeg_tiny.yaml"),
        [
            "algorithm.name=raft",
            "algorithm.num_loss_samples=2",
            "sampler.num_steps=4",
            "train.sample_batch_size=8",
        ],
    )
    adapter = StableDiffusionAdapter(copy.deepcopy(tiny_pipe), finetune="full")
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=4, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    chain.rewards = torch.tensor([0.0, 2.0, 1.0, 0.5, 5.0, 1.0, 4.0, 3.0])
    chain.metadata["group"] = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    obj = RAFT(cfg, adapter, sampler)
    obj.prepare(chain, 0, torch.Generator().manual_seed(1))
    assert chain.metadata["raft_keep"].tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
    rows = torch.tensor([1, 2, 4, 5])
    terms = obj.loss(
        chain, Minibatch(rows, torch.zeros(4, 0, dtype=torch.long)), 0, torch.Generator().manual_seed(3)
    )
    # by hand: the same draws, x_t by diffusers' add_noise, eps-prediction's squared error
    ref = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ref.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    x0, cond = chain.latents[rows, -1], {n: v[rows] for n, v in chain.cond.items()}
    per_row = torch.zeros(4)
    for _ in range(2):
        k = torch.randint(0, 4, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = ref.timesteps[k]
        x_t = ref.add_noise(x0, noise, t)
        per_row += (adapter(x_t, t, cond, 1.0) - noise).pow(2).mean(dim=(1, 2, 3)) / 2
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = (per_row * keep).sum() / 2
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    assert terms["kept_fraction"].item() == 0.5 and terms["kept_reward_mean"].item() == 3.5


def test_raft_needs_groups_and_a_denoising_loss():
    with pytest.raises(ConfigError, match="raft_keep must be in"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["algorithm.name=raft", "algorithm.group_size=1"])


@pytest.mark.slow
def test_raft_raises_prompt_alignment_on_fixed_seeds(tmp_path):
    """tasks/digits_raft.yaml (best of 8 per prompt, the denoising loss on it) for 9 epochs raises
    the alignment on each of the 4 fixed evaluation seeds. Measured (seed 0): 0.728 / 0.808 /
    0.711 / 0.743 -> 0.820 / 0.896 / 0.815 / 0.835, a mean gain of 0.094 (min 0.088), about 35 s
    of training on 2 idle cores; 9 epochs is the benchmark's peak (its held-out alignment falls
    after, 0.786 at 30). The bar is the DDPO and DRaFT tests': a 4-seed mean of the untrained
    alignment has std about 0.021, so a mean gain > 0.08 and a gain on every seed."""
    import statistics

    from tests.conftest import digits_alignment_gains

    before, after, _ = digits_alignment_gains("digits_raft", tmp_path, epochs=9)
    gains = [a - b for a, b in zip(after, before)]
    assert statistics.mean(gains) > 0.08 and min(gains) > 0, (before, after)

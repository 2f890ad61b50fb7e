"""D3PO: pairs ranked within their group (or named by a human-labels file), the per-step loss
against the reference code's formula written here (ratio = clamp(exp(logp - logp_ref), 1 - eps,
1 + eps), -log sigmoid(beta log ratio_w - beta log ratio_l)) with log-probs from diffusers'
DDIMScheduler.step, log 2 at the start, and exact resume."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.objectives.base import Minibatch
from flowrl.objectives.d3po import D3PO, pairs_by_reward
from flowrl.run import Run
from flowrl.samplers import DDIMSampler

REPO = Path(__file__).resolve().parents[2]
TASK = str(REPO / "tasks/digits_d3po.yaml")


def test_pairs_are_neighbours_of_a_group_the_higher_reward_preferred():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.5, 3.0, -1.0])
    partner, pref = pairs_by_reward(rewards, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert partner.tolist() == [1, 0, 3, 2, 5, 4]
    assert pref.tolist() == [-1, 1, 0, 0, 1, -1]  # a tie: no preference


def _setup(tiny_pipe, *extra):
    cfg = load_config(TASK, ["model.pretrained=tiny", "sampler.num_steps=4", *extra])
    adapter = StableDiffusionAdapter(copy.deepcopy(tiny_pipe), finetune="lora", lora_rank=4)
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=4, eta=1.0)
    chain = sampler.sample(
        adapter, ["a cat"] * 2 + ["a dog"] * 2, 1.0, generator=torch.Generator().manual_seed(0)
    )
    chain.metadata["group"] = torch.tensor([0, 0, 1, 1])
    chain.rewards = torch.tensor([0.0, 1.0, 2.0, 1.0])
    return cfg, adapter, sampler, chain, D3PO(cfg, adapter, sampler)


def test_loss_is_the_reference_formula_per_step(tiny_pipe, tmp_path):
    from diffusers import DDIMScheduler

    cfg, adapter, sampler, chain, obj = _setup(tiny_pipe, "algorithm.d3po_eps=0.01")
    obj.prepare(chain, 0, torch.Generator())
    rows, steps = torch.tensor([0, 1, 2]), torch.tensor([[0, 2], [1, 3], [3, 1]])
    mb = Minibatch(rows, steps)
    start = obj.loss(chain, mb, 0, torch.Generator())
    assert start["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: p_theta = p_ref
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in adapter.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    terms = obj.loss(chain, mb, 0, torch.Generator())
    # by hand: the pairs whose winner is in the minibatch: 1 (over 0, on 1's steps 1, 3), 2 (over 3, steps 3, 1)
    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(4)

    def logp(b, k, reference):
        t = sched.timesteps[k]
        x, x_next = chain.latents[b, k][None], chain.latents[b, k + 1][None]
        cond = {n: v[b : b + 1] for n, v in chain.cond.items()}
        if reference:
            adapter.unet.disable_adapters()
        eps = adapter(x, t.expand(1), cond, 1.0)
        adapter.unet.enable_adapters()
        out = sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x))
        mean = out.prev_sample  # the step's mean (zero noise)
        std = 1.0 * sched._get_variance(t, t - 250).sqrt()
        lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return lp.mean()

    losses = []
    with torch.no_grad():
        for w, lo, ks in [(1, 0, (1, 3)), (2, 3, (3, 1))]:
            for k in ks:
                r0 = torch.clamp(torch.exp(logp(w, k, False) - logp(w, k, True)), 1 - 0.01, 1 + 0.01)
                r1 = torch.clamp(torch.exp(logp(lo, k, False) - logp(lo, k, True)), 1 - 0.01, 1 + 0.01)
                losses.append(-torch.log(torch.sigmoid(0.1 * torch.log(r0) - 0.1 * torch.log(r1))))
    torch.testing.assert_close(terms["loss"], torch.stack(losses).mean(), rtol=1e-4, atol=1e-7)
    assert terms["pair_fraction"].item() == pytest.approx(2 / 3)

    # a human-labels file names the pairs instead: here 0 over 1 (the reward says otherwise)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"epoch": 0, "chosen": 0, "rejected": 1}) + "\n")
    human = D3PO(
        load_config(TASK, ["model.pretrained=tiny", f"algorithm.d3po_labels={labels}"]), adapter, sampler
    )
    human.prepare(chain, 0, torch.Generator())
    assert chain.metadata["d3po_pref"].tolist() == [1, -1, 0, 0]
    labels.write_text(json.dumps({"epoch": 0, "chosen": 0, "rejected": 2}) + "\n")
    with pytest.raises(ConfigError, match="not samples of one prompt group"):
        D3PO(
            load_config(TASK, ["model.pretrained=tiny", f"algorithm.d3po_labels={labels}"]), adapter, sampler
        ).prepare(chain, 0, torch.Generator())
    labels.write_text('{"epoch": 0, "chosen": 1}\n')
    with pytest.raises(ConfigError, match="line 1 is not a preference"):
        load_config(TASK, [f"algorithm.d3po_labels={labels}"])
    with pytest.raises(ConfigError, match="group_size must be even"):
        load_config(TASK, ["algorithm.group_size=3", "train.sample_batch_size=21", "train.minibatch_size=21"])


def test_resume_is_exact(tmp_path):
    def cfg(name, *extra):
        return load_config(
            TASK,
            [
                f"train.output_dir={tmp_path}",
                f"train.run_name={name}",
                "sampler.num_steps=4",
                "train.sample_batch_size=8",
                "train.num_batches_per_epoch=1",
                "train.minibatch_size=4",
                "train.eval_every=0",
                "train.save_every=1",
                "train.eval_prompts=[a handwritten digit 3]",
                *extra,
            ],
        )

    Run(cfg("straight", "train.num_epochs=3"), progress=False).train()
    Run(cfg("split", "train.num_epochs=2"), progress=False).train()
    Run(cfg("split", "train.num_epochs=3", "train.resume=auto"), progress=False).train()
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / n / "checkpoints/epoch_000003/trainable.safetensors"))
        for n in ("straight", "split")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and {"implicit_acc", "d3po_margin", "clipfrac"} <= rows[
        1
    ].keys()
    assert rows[1]["loss_d3po"] > 0


@pytest.mark.slow
def test_d3po_raises_prompt_alignment_on_fixed_seeds(tmp_path):
    """tasks/digits_d3po.yaml as it is (10 epochs, pairs ranked by the digit classifier): the
    deterministic-DDIM alignment of 10 samples per digit rises on each of 4 fixed evaluation seeds
    (the same noise before and after: an unchanged model gains exactly 0). Measured +0.047 (every
    seed +0.038 or more, see the task file); the bar, a gain on every seed and a mean > 0.02, is
    under it."""
    import statistics

    from tests.conftest import digits_alignment_gains

    before, after, _ = digits_alignment_gains(TASK, tmp_path, "train.run_name=learn")
    gains = [x - y for x, y in zip(after, before)]
    assert min(gains) > 0 and statistics.mean(gains) > 0.02, (before, after)

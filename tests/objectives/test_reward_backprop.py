"""Reward backprop (DRaFT-K, AlignProp, ReFL): the loss and its gradient against a re-run of the
chain's last steps written here with diffusers' own DDIMScheduler.step; a non-differentiable
reward is refused; the digits model's alignment rises; resume is exact."""

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.objectives.base import Minibatch
from flowrl.objectives.reward_backprop import RewardBackprop
from flowrl.rewards import Reward
from flowrl.run import Run
from flowrl.samplers import DDIMSampler

REPO = Path(__file__).resolve().parents[2]
BRIGHTNESS = str(REPO / "rewards" / "brightness.py")  # a differentiable user reward script
PROMPTS = ["a cat", "a dog", "a red square", "a fox"]
SMALL = [
    "model.finetune=lora",
    "model.lora_rank=4",
    "sampler.num_steps=3",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=2",
    "train.minibatch_size=4",
    "train.eval_every=2",
    "train.save_every=2",
    "optim.learning_rate=1e-2",
    "rewards=[{name: " + BRIGHTNESS + "}]",
]


def _objective(tiny_pipe, *overrides):
    cfg = load_config(str(REPO / "tasks/jpeg_tiny.yaml"), [*SMALL, *overrides])
    adapter = StableDiffusionAdapter(copy.deepcopy(tiny_pipe), finetune="lora", lora_rank=4)
    with torch.no_grad():  # LoRA B starts at 0; move it so the gradient reaches A too
        for n, p in adapter.unet.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=4, eta=1.0)
    obj = RewardBackprop(cfg, adapter, sampler, reward=Reward([{"name": BRIGHTNESS}]))
    chain = sampler.sample(adapter, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    return obj, adapter, sampler, chain


def _by_hand(tiny_pipe, adapter, chain, rows, k_start, k_end, g, refl):
    """The steps k_start..k_end-1 re-run with diffusers' DDIMScheduler.step and the same fresh noise."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ref.set_timesteps(4)
    cond = {n: v[rows] for n, v in chain.cond.items()}
    x = chain.latents[rows, k_start].float()
    for k in range(k_start, k_end):
        noise = torch.randn(x.shape, generator=g)
        t = ref.timesteps[k]
        eps = adapter(x, t.expand(len(rows)), cond, 1.0)
        out = ref.step(eps, t, x, eta=0.0 if refl else 1.0, variance_noise=noise)
        x = out.pred_original_sample if refl else out.prev_sample
    return -adapter.decode_latents(x).mean(dim=(1, 2, 3)).mean()


def _grads(loss, adapter):
    params = adapter.trainable_parameters()
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("mode, k_start", [("draft", 2), ("refl", 3)])
def test_loss_and_gradient_match_a_hand_rerun_with_diffusers_ddim(tiny_pipe, mode, k_start):
    """DRaFT-2: the last 2 of 4 DDIM(eta 1) steps re-run with gradient from the recorded x_2;
    ReFL: one x0 prediction from the recorded x_3 (start drawn from refl_steps [3, 3])."""
    extra = ["algorithm.name=draft", "algorithm.backprop_steps=2"]
    if mode == "refl":
        extra = ["algorithm.name=refl", "algorithm.refl_steps=[3, 3]"]
    obj, adapter, _, chain = _objective(tiny_pipe, *extra)
    rows = torch.tensor([2, 0, 3])
    mb = Minibatch(rows, torch.zeros(3, 0, dtype=torch.long))
    terms = obj.loss(chain, mb, 0, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, in the objective's order
    if mode == "refl":
        torch.randint(3, 4, (1,), generator=g)  # its start step
    k_end = 4 if mode == "draft" else k_start + 1
    hand = _by_hand(tiny_pipe, adapter, chain, rows, k_start, k_end, g, mode == "refl")
    torch.testing.assert_close(terms["loss"], hand, rtol=1e-5, atol=1e-6)
    ours, theirs = _grads(terms["loss"], adapter), _grads(hand, adapter)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert sum(a.abs().sum() for a in ours) > 0


def test_alignprop_truncation_is_its_gaussian_or_uniform_start_and_draft_its_last_k(tiny_pipe):
    """sd_pipeline.py: backprop_timestep = int(Normal(42, 5).sample()) of 50 steps (gaussian, the
    default) or randint(0, 50) (uniform); the network outputs before it are detached."""
    obj, *_ = _objective(tiny_pipe, "algorithm.name=alignprop", "algorithm.truncation=uniform")
    g = torch.Generator().manual_seed(0)
    assert {obj.start_step(g) for _ in range(200)} == {0, 1, 2, 3}
    obj, *_ = _objective(
        tiny_pipe, "algorithm.name=alignprop", "algorithm.truncation_mean=2.0", "algorithm.truncation_std=0.7"
    )
    g, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(50):
        expected = min(max(int(float(torch.normal(2.0, 0.7, (1,), generator=ref))), 0), 3)
        assert obj.start_step(g) == expected
    assert obj.options.reward_scale == 0.01  # AlignProp's loss_coeff
    draft, *_ = _objective(tiny_pipe, "algorithm.name=draft", "algorithm.backprop_steps=3")
    assert draft.start_step(g) == 1


def test_a_non_differentiable_reward_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="not differentiable.*policy-gradient method"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["algorithm.name=draft"])


def test_resume_is_exact(tmp_path):
    def cfg(name, *extra):
        return load_config(
            str(REPO / "tasks/jpeg_tiny.yaml"),
            [
                *SMALL,
                "algorithm.name=alignprop",
                f"train.output_dir={tmp_path}",
                f"train.run_name={name}",
                *extra,
            ],
        )

    Run(cfg("straight", "train.num_epochs=4")).train()
    Run(cfg("split", "train.num_epochs=2")).train()
    Run(cfg("split", "train.num_epochs=4", "train.resume=auto")).train()
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / n / "checkpoints/epoch_000004/trainable.safetensors"))
        for n in ("straight", "split")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(ln) for ln in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4] and "reward_backprop" in rows[1]


@pytest.mark.slow
def test_draft_raises_prompt_alignment_on_fixed_seeds(tmp_path):
    """tasks/digits_draft.yaml (DRaFT-2) for 4 epochs raises the deterministic-DDIM alignment of 10
    samples per digit on each of 4 fixed evaluation seeds. Measured (seed 0): 0.728 / 0.808 /
    0.711 / 0.743 before -> 0.974 / 0.973 / 0.965 / 0.986 after, a mean gain of 0.227 in 47 s of
    training (DDPO's 15 epochs in the same test gain 0.148). The bar is the DDPO test's
    (tests/demo/test_digits.py): the seed-to-seed std of the untrained alignment is 0.043, so a
    4-seed mean has std about 0.021; the test asks for a mean gain > 0.08 and a gain on every seed."""
    from tests.conftest import digits_alignment_gains

    before, after, _ = digits_alignment_gains("digits_draft", tmp_path, epochs=4)
    gains = [a - b for a, b in zip(after, before)]
    assert statistics.mean(gains) > 0.08 and min(gains) > 0, (before, after)


def test_draft_lv_averages_n_one_step_denoisings_of_the_noised_final_sample(tiny_pipe):
    """DRaFT-LV, n = 2: the recorded x_4 noised to the last step's level by diffusers' add_noise,
    denoised once by DDIMScheduler.step(eta 1) with fresh noise, the two rewards averaged."""
    from diffusers import DDIMScheduler

    obj, adapter, _, chain = _objective(tiny_pipe, "algorithm.name=draft-lv")
    assert obj.options.mode == "draft_lv" and obj.options.lv_samples == 2  # the paper's n
    rows = torch.tensor([3, 1])
    mb = Minibatch(rows, torch.zeros(2, 0, dtype=torch.long))
    terms = obj.loss(chain, mb, 0, torch.Generator().manual_seed(5))
    ref = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ref.set_timesteps(4)
    t, g = ref.timesteps[3], torch.Generator().manual_seed(5)  # the same draws, in the objective's order
    x0, cond = chain.latents[rows, -1], {n: v[rows] for n, v in chain.cond.items()}
    rewards = []
    for _ in range(2):
        x = ref.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        noise = torch.randn(x0.shape, generator=g)
        out = ref.step(adapter(x, t.expand(2), cond, 1.0), t, x, eta=1.0, variance_noise=noise).prev_sample
        rewards.append(adapter.decode_latents(out).mean(dim=(1, 2, 3)))  # the brightness reward
    hand = -torch.stack(rewards).mean()
    torch.testing.assert_close(terms["loss"], hand, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(terms["loss"], adapter), _grads(hand, adapter)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert terms["backprop_steps"].item() == 1.0
    with pytest.raises(ConfigError, match="lv_samples must be >= 1"):
        _objective(tiny_pipe, "algorithm.name=draft-lv", "algorithm.lv_samples=0")


@pytest.mark.slow
def test_draft_lv_raises_prompt_alignment_on_fixed_seeds(tmp_path):
    """tasks/digits_draft_lv.yaml (DRaFT-LV, n = 2) for 4 epochs raises the deterministic-DDIM
    alignment of 10 samples per digit on each of 4 fixed evaluation seeds. Measured (seed 0):
    0.728 / 0.808 / 0.711 / 0.743 -> 0.807 / 0.844 / 0.787 / 0.791, a mean gain of 0.060 (min
    0.036) in 91 s of training on a loaded 2-core machine (6 epochs on the first two: +0.055);
    DRaFT-2's +0.227 in 4 epochs above trains two steps, DRaFT-LV only the last, least noisy one.
    The bar: the seed-to-seed std of the untrained alignment is 0.043, so a 4-seed mean has std
    about 0.021 (paired before / after, the gain's is smaller); the test asks for a mean gain
    > 0.04 (about twice that) and a gain on every seed, below the DRaFT-K test's 0.08."""
    from tests.conftest import digits_alignment_gains

    before, after, _ = digits_alignment_gains("digits_draft_lv", tmp_path, epochs=4)
    gains = [a - b for a, b in zip(after, before)]
    assert statistics.mean(gains) > 0.04 and min(gains) > 0, (before, after)

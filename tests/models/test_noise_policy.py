"""FIND's initial-noise policy: x_T's log-density against torch.distributions, the objective's loss
and gradient against FIND's formula written here, the on-policy ratio exactly 1, the frozen
denoiser unchanged by training, an exact resume, the saved policy reloaded, clear config errors,
and the digits model's alignment rising with only x_T trained."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from flowrl.config import ConfigError, load_config
from flowrl.models.noise_policy import NoisePolicy, NoisePolicyAdapter, load_noise_policy
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.objectives.base import Minibatch
from flowrl.objectives.find import FIND
from flowrl.run import Run
from flowrl.samplers import DDIMSampler

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a cat", "a dog", "a red square", "a fox"]
SMALL = [
    "algorithm.name=find",
    "algorithm.clip_range=0.2",  # FIND's ratio_clip (jpeg_tiny.yaml sets DDPO's 1e-4)
    "sampler.num_steps=1",
    "sampler.eta=0.0",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=2",
    "train.minibatch_size=4",
    "train.eval_every=2",
    "train.save_every=2",
    "optim.learning_rate=1e-2",
]


def _perturb(policy: NoisePolicy, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)


def _setup(tiny_pipe, kind, *overrides):
    cfg = load_config(str(REPO / "tasks/jpeg_tiny.yaml"), [*SMALL, f"model.noise_policy={kind}", *overrides])
    base = StableDiffusionAdapter(tiny_pipe, finetune="frozen")
    adapter = NoisePolicyAdapter(base, kind)
    _perturb(adapter.noise_policy)
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=1, eta=0.0)  # only x_T is trained
    chain = sampler.sample(adapter, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    chain.advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return cfg, adapter, sampler, chain


def test_x_T_is_mu_plus_sigma_z_and_its_log_density_is_the_normal_one(tiny_pipe):
    base = StableDiffusionAdapter(tiny_pipe, finetune="frozen")
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=1, eta=0.0)
    # at the start (mu = 0, sigma = 1) the chain starts from the frozen chain's own z
    a = sampler.sample(
        NoisePolicyAdapter(base, "free"), PROMPTS, 1.0, generator=torch.Generator().manual_seed(3)
    )
    b = sampler.sample(base, PROMPTS, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.latents, b.latents)
    cond = base.condition(PROMPTS, 1.0)
    for kind in ("free", "conditional"):
        policy = NoisePolicyAdapter(base, kind).noise_policy
        _perturb(policy)
        if kind == "free":
            mu = policy.mean.expand(4, -1, -1, -1)
            sigma = policy.std.clamp(min=1e-4).expand(4, -1, -1, -1)
        else:
            out = policy.net(cond["prompt_embeds"].mean(1)).view(4, 2, *base.latent_shape)
            mu, sigma = out[:, 0], out[:, 1].exp()
        z = torch.randn((4, *base.latent_shape), generator=torch.Generator().manual_seed(5))
        x = policy.sample(cond, 4, torch.Generator().manual_seed(5), "cpu")
        torch.testing.assert_close(x, mu + sigma * z)
        normal = Normal(mu, sigma)
        torch.testing.assert_close(policy.log_prob(x, cond, "mean"), normal.log_prob(x).mean((1, 2, 3)))
        torch.testing.assert_close(policy.log_prob(x, cond, "sum"), normal.log_prob(x).sum((1, 2, 3)))


def test_loss_and_gradient_are_finds_formula(tiny_pipe):
    cfg, adapter, sampler, chain = _setup(tiny_pipe, "conditional")
    rows = torch.tensor([2, 0, 3])
    for clip in ("clamp", "ppo"):
        cfg.algorithm.options.noise_clip = clip
        obj = FIND(cfg, adapter, sampler)
        obj.prepare(chain, 0, torch.Generator())
        terms = obj.loss(chain, Minibatch(rows, torch.zeros(3, 0, dtype=torch.long)), 0, torch.Generator())
        got = torch.autograd.grad(terms["loss"], adapter.trainable_parameters())

        # by hand: dist_train2.py's ratio to the initial N(0, I), reward_weight 10, ratio_clip 0.2,
        # kl_weight 0.01 times mean((mu - 0)^2 + (sigma - 1)^2)
        x = chain.latents[rows, 0]
        out = adapter.noise_policy.net(chain.cond["prompt_embeds"][rows].mean(1)).view(3, 2, *x.shape[1:])
        mu, sigma = out[:, 0], out[:, 1].exp()
        log_prob = Normal(mu, sigma).log_prob(x).mean((1, 2, 3))
        old = Normal(torch.zeros_like(x), torch.ones_like(x)).log_prob(x).mean((1, 2, 3))
        ratio, adv = torch.exp(log_prob - old), 10 * chain.advantages[rows]
        if clip == "clamp":
            pg = (-adv * ratio.clamp(0.8, 1.2)).mean()
        else:
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        reg = ((mu - 0) ** 2 + (sigma - 1) ** 2).mean()
        want = pg + 0.01 * reg
        torch.testing.assert_close(terms["loss"], want)
        for g, w in zip(got, torch.autograd.grad(want, adapter.trainable_parameters())):
            torch.testing.assert_close(g, w)
        assert (ratio - 1).abs().max() > 0.01  # the perturbed policy is off the prior: the test has teeth


def test_exact_kl_regularizer_is_the_closed_form(tiny_pipe):
    cfg, adapter, sampler, chain = _setup(tiny_pipe, "free", "algorithm.noise_reg=kl")
    obj = FIND(cfg, adapter, sampler)
    mu, std = adapter.noise_policy.mean, adapter.noise_policy.std
    kl = torch.distributions.kl_divergence(
        Normal(mu, std), Normal(torch.zeros_like(mu), torch.ones_like(std))
    )
    torch.testing.assert_close(obj.regularizer(mu, std), kl.mean((1, 2, 3)))


def test_on_policy_ratio_is_exactly_one(tiny_pipe):
    for kind in ("free", "conditional"):
        cfg, adapter, sampler, chain = _setup(tiny_pipe, kind, "algorithm.noise_ratio=sampling")
        obj = FIND(cfg, adapter, sampler)
        obj.prepare(chain, 0, torch.Generator())
        mb = Minibatch(torch.tensor([3, 1]), torch.zeros(2, 0, dtype=torch.long))
        terms = obj.loss(chain, mb, 0, None)
        assert terms["ratio_min"].item() == 1.0 and terms["ratio_max"].item() == 1.0, kind


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.noise_policy"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["model.noise_policy=free"])
    with pytest.raises(ConfigError, match="model.noise_policy=free or conditional"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["algorithm.name=find", "model.noise_policy=null"])
    with pytest.raises(ConfigError, match="algorithm.noise_clip"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["algorithm.name=find", "algorithm.noise_clip=min"])


def test_denoiser_frozen_resume_exact_and_the_saved_policy_reloads(tmp_path):
    def cfg(name, *extra):
        return load_config(
            str(REPO / "tasks/jpeg_tiny.yaml"),
            [
                *SMALL,
                "model.noise_policy=conditional",
                "model.tiny_image_size=16",
                "train.num_batches_per_epoch=1",
                "train.eval_every=0",
                "train.save_every=1",
                "train.eval_prompts=[a cat, a dog]",
                f"train.output_dir={tmp_path}",
                f"train.run_name={name}",
                *extra,
            ],
        )

    run = Run(cfg("straight", "train.num_epochs=3"), progress=False)
    before = {n: p.detach().clone() for n, p in run.adapter.base.named_parameters()}
    assert len(run.optimizer.param_groups[0]["params"]) == 4  # the policy's two layers, nothing else
    run.train()
    assert all(torch.equal(p, before[n]) for n, p in run.adapter.base.named_parameters())
    Run(cfg("split", "train.num_epochs=2"), progress=False).train()
    Run(cfg("split", "train.num_epochs=3", "train.resume=auto"), progress=False).train()
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / n / "checkpoints/epoch_000003/trainable.safetensors"))
        for n in ("straight", "split")
    )
    assert set(a) == {f"noise_policy.net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["noise_policy.net.2.weight"].abs().max() > 0  # it trained (the last layer starts at 0)
    rows = [json.loads(ln) for ln in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and "ratio_mean" in rows[1]
    policy = load_noise_policy(tmp_path / "straight/checkpoints/epoch_000003")
    state = run.adapter.trainable_state_dict()
    assert all(torch.equal(p, state[f"noise_policy.{n}"]) for n, p in policy.state_dict().items())


@pytest.mark.slow
def test_find_raises_prompt_alignment_on_fixed_seeds(tmp_path):
    """tasks/digits_find.yaml (the denoiser frozen, only x_T's conditional Gaussian trained), for 5
    epochs at lr 3e-3 to keep it short, raises the deterministic-DDIM alignment of 10 samples per
    digit on each of 4 fixed evaluation seeds. Measured (seed 0): 0.728 / 0.808 / 0.711 / 0.743
    before -> 0.774 / 0.868 / 0.796 / 0.841 after, a mean gain of 0.072 (the task file's 10 epochs
    at 1e-3: 0.092). The bar is the DDPO test's noise (tests/demo/test_digits.py): the seed-to-seed
    std of the untrained alignment is 0.043, so a 4-seed mean has std about 0.021; the test asks
    for a mean gain > 0.05 (2.4 of those stds; FIND moves only the initial noise's distribution,
    not the weights, so it is held below the weight-training methods' 0.08) and a gain on every seed."""
    from tests.conftest import digits_alignment_gains

    before, after, _ = digits_alignment_gains("digits_find", tmp_path, "optim.learning_rate=3e-3", epochs=5)
    gains = [a - b for a, b in zip(after, before)]
    assert statistics.mean(gains) > 0.05 and min(gains) > 0, (before, after)

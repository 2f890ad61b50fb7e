"""On-policy ratio is exactly 1 when stored transitions are re-evaluated with unchanged parameters;
the KL to the reference is 0 before the first update."""

import pytest
import torch

from flowrl.core import gaussian_kl, policy_loss
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.samplers import DDIMSampler
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a dog", "a red square", "a fox", "a bird"]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("pipe_name", ["tiny_pipe", "tiny_pipe_v"])
def test_ratio_is_one_on_policy(request, pipe_name, guidance_scale):
    pipe = request.getfixturevalue(pipe_name)
    adapter = StableDiffusionAdapter(pipe, finetune="lora", lora_rank=4)
    perturb_lora(adapter)
    sampler = DDIMSampler(pipe.scheduler.config, num_steps=4, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS, guidance_scale, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(chain.log_probs).all()
    for batch in ([0, 1, 2, 3, 4], [1, 3], [4]):  # batches of different sizes
        sub = chain.select(batch)
        for k in range(chain.num_steps):
            idx = torch.full((len(sub),), k)
            new = sampler.log_prob(adapter, sub, idx)
            ratio = torch.exp(new.log_prob - sub.log_probs[:, k])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    # mixed steps per trajectory (timestep subsampling) in one batched forward
    idx = torch.tensor([3, 0, 2, 1, 0])
    new = sampler.log_prob(adapter, chain, idx)
    torch.testing.assert_close(
        new.log_prob, chain.log_probs.gather(1, idx[:, None]).squeeze(1), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("algorithm_clip", [1e-4, None])
def test_loss_terms_and_lora_only_gradients(tiny_pipe, algorithm_clip):
    adapter = StableDiffusionAdapter(tiny_pipe, finetune="lora", lora_rank=4)
    perturb_lora(adapter)
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=3, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS[:4], 3.0, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1, 2, 1])
    new = sampler.log_prob(adapter, chain, idx)
    ref = sampler.log_prob(adapter, chain, idx, reference=True)
    kl = gaussian_kl(new.mean, ref.mean, new.std)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    terms = policy_loss(
        new.log_prob, chain.log_probs.gather(1, idx[:, None]).squeeze(1), adv, algorithm_clip, kl, 0.1
    )
    assert {"loss", "loss_pg", "loss_kl", "approx_kl", "clipfrac", "ratio_mean"} <= set(terms)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    torch.testing.assert_close(terms["ratio_mean"], torch.tensor(1.0), atol=1e-5, rtol=0)
    terms["loss"].backward()
    lora, other = [], []
    for n, p in adapter.unet.named_parameters():
        (lora if "lora_" in n else other).append((n, p))
    assert lora and all(p.grad is not None for _, p in lora)
    assert sum(p.grad.abs().sum().item() for _, p in lora) > 0
    assert all(p.grad is None for _, p in other)
    assert all(p.grad is None for p in adapter.text_encoder.parameters())


def test_kl_to_reference_is_zero_before_update(tiny_pipe):
    adapter = StableDiffusionAdapter(tiny_pipe, finetune="lora", lora_rank=4)  # B = 0 at init
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=3, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS, 3.0, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1, 2, 0, 1])
    new = sampler.log_prob(adapter, chain, idx)
    ref = sampler.log_prob(adapter, chain, idx, reference=True)
    assert gaussian_kl(new.mean, ref.mean, new.std).abs().max().item() == 0.0
    perturb_lora(adapter)  # and the reference really is the adapter switched off
    new = sampler.log_prob(adapter, chain, idx)
    ref2 = sampler.log_prob(adapter, chain, idx, reference=True)
    torch.testing.assert_close(ref2.mean, ref.mean, rtol=0, atol=0)
    assert gaussian_kl(new.mean, ref2.mean, new.std).min().item() > 0


def test_full_finetune_reference_copy(tiny_pipe):
    adapter = StableDiffusionAdapter(tiny_pipe, finetune="full", keep_reference=True)
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=2, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1])
    new, ref = sampler.log_prob(adapter, chain, idx), sampler.log_prob(adapter, chain, idx, reference=True)
    assert gaussian_kl(new.mean, ref.mean, new.std).abs().max().item() == 0.0
    new.log_prob.sum().backward()
    assert all(p.grad is not None for p in adapter.unet.parameters() if p.requires_grad)


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m1, m2, std = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.rand(3, 1, 1) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, std.expand_as(m1)), torch.distributions.Normal(m2, std.expand_as(m2))
    )
    torch.testing.assert_close(gaussian_kl(m1, m2, std, "sum"), expected.sum((1, 2)))
    torch.testing.assert_close(gaussian_kl(m1, m2, std, "mean"), expected.mean((1, 2)))


def test_ppo_clip_zeroes_gradient_outside_the_trust_region():
    lp = torch.tensor([0.0, 0.0], requires_grad=True)
    old = torch.tensor([-0.5, 0.5])  # ratios e^0.5 and e^-0.5, far outside clip 0.1
    adv = torch.tensor([1.0, -1.0])  # ... in the direction the advantage favours
    terms = policy_loss(lp, old, adv, 0.1)
    terms["loss"].backward()
    assert lp.grad.abs().sum() == 0
    assert terms["clipfrac"].item() == 1.0

"""The DDIM(eta) sampler against diffusers' own step and the Gaussian density written by hand."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from flowrl.models.sd import StableDiffusionAdapter
from flowrl.samplers import DDIMSampler

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_step_matches_diffusers_ddim_step(prediction_type, eta):
    config = dict(SD_SCHEDULER, prediction_type=prediction_type)
    ref = DDIMScheduler(**config)
    ref.set_timesteps(10)
    sampler = DDIMSampler(ref.config, num_steps=10, eta=eta)
    torch.manual_seed(0)
    for k, t in enumerate(ref.timesteps):
        x = torch.randn(2, 4, 8, 8)
        out = torch.randn(2, 4, 8, 8)
        noise = torch.randn(2, 4, 8, 8)
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        t_b = t.expand(2)
        step = sampler.step(out, t_b, sampler.prev_timesteps[k].expand(2), x, noise=noise)
        torch.testing.assert_close(step.prev_sample, expected, rtol=1e-5, atol=1e-5)
        # and the deterministic part is the mean: with zero noise diffusers' step gives it
        mean = ref.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-5)


def test_log_prob_equals_hand_written_gaussian_density():
    sampler = DDIMSampler(SD_SCHEDULER, num_steps=5, eta=1.0, logprob_reduction="sum")
    sampler_mean = DDIMSampler(SD_SCHEDULER, num_steps=5, eta=1.0, logprob_reduction="mean")
    torch.manual_seed(1)
    x, out = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = sampler.timesteps[2].expand(3)
    prev = sampler.prev_timesteps[2].expand(3)
    step = sampler.step(out, t, prev, x, generator=torch.Generator().manual_seed(0))
    # by hand, float64: a_t, a_prev from the scheduler's cumulative alphas
    ac = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod.double().numpy()
    a_t, a_p = ac[int(t[0])], ac[int(prev[0])]
    xd, od, yd = x.double().numpy(), out.double().numpy(), step.prev_sample.double().numpy()
    x0 = (xd - math.sqrt(1 - a_t) * od) / math.sqrt(a_t)
    sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * od
    dens = -((yd - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    expected_sum = dens.reshape(3, -1).sum(1)
    np.testing.assert_allclose(step.log_prob.double().numpy(), expected_sum, rtol=1e-4)
    np.testing.assert_allclose(step.std.flatten()[0].item(), sigma, rtol=1e-5)
    lp_mean = sampler_mean.step(out, t, prev, x, prev_sample=step.prev_sample).log_prob
    np.testing.assert_allclose(lp_mean.double().numpy(), dens.reshape(3, -1).mean(1), rtol=1e-4)


def test_eta_zero_is_deterministic(tiny_pipe):
    adapter = StableDiffusionAdapter(tiny_pipe, finetune="frozen")
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=4, eta=0.0)
    x_T = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(0))
    a = sampler.sample(adapter, ["a cat", "a dog"], latents=x_T, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(adapter, ["a cat", "a dog"], latents=x_T, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert torch.isnan(a.log_probs).all()  # no density: not an MDP step
    # and equals diffusers' own pipeline loop with eta = 0
    ref = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ref.set_timesteps(4)
    x = x_T.clone()
    emb = adapter.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(tiny_pipe.unet(x, t, encoder_hidden_states=emb).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(a.latents[:, -1], x, rtol=1e-5, atol=1e-5)


def test_zero_std_schedule_is_rejected():
    bad = dict(SD_SCHEDULER, steps_offset=0, set_alpha_to_one=True)
    with pytest.raises(ValueError, match="steps_offset=1"):
        DDIMSampler(bad, num_steps=10, eta=1.0)
    DDIMSampler(bad, num_steps=10, eta=0.0)  # fine for deterministic evaluation


def test_thresholding_is_rejected():
    with pytest.raises(ValueError, match="thresholding"):
        DDIMSampler(dict(SD_SCHEDULER, thresholding=True), num_steps=4)

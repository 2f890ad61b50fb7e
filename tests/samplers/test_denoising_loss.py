"""Each sampler's forward process (``denoising_loss``, what FPO and behavior cloning train with)
against an independent computation: diffusers' own noising (``DDIMScheduler.add_noise`` /
``get_velocity``, ``FlowMatchEulerDiscreteScheduler.scale_noise``) or the formula by hand, with a
model whose prediction is known."""

import math

import pytest
import torch

from flowrl.samplers import build_sampler
from flowrl.samplers.ddpm_policy import DDPMPolicySampler
from flowrl.samplers.reinflow import ReinFlowSampler


class Recorder(torch.nn.Module):
    """An adapter that records its inputs and answers ``fn(x, t)``."""

    def __init__(self, fn, latent_shape=(4, 8, 8)):
        super().__init__()
        self.fn, self.seen, self.latent_shape = fn, [], latent_shape

    def forward(self, x, t, cond, guidance_scale=1.0):
        self.seen.append((x.clone(), t.clone()))
        return self.fn(x, t)


def _sd_ddim_config(prediction_type):
    from flowrl.models.tiny import sd_ddim_scheduler

    return dict(sd_ddim_scheduler(prediction_type).config)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_forward_process_is_diffusers_add_noise(prediction_type):
    from diffusers import DDIMScheduler

    sampler = build_sampler("ddim", _sd_ddim_config(prediction_type), 10)
    ref = DDIMScheduler.from_config(_sd_ddim_config(prediction_type))
    torch.manual_seed(0)
    x0, eps, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    k = torch.tensor([0, 4, 9])
    model = Recorder(lambda x, t: out)
    loss = sampler.denoising_loss(model, x0, {}, k, eps, target="model")
    t = sampler.timesteps[k]
    x_t, t_in = model.seen[0]
    torch.testing.assert_close(x_t, ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(t_in.cpu(), t)
    goal = {"epsilon": eps, "v_prediction": ref.get_velocity(x0, eps, t), "sample": x0}[prediction_type]
    torch.testing.assert_close(loss, (out - goal).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # a perfect prediction has zero loss under either target
    a = ref.alphas_cumprod[t].view(-1, 1, 1, 1)
    perfect = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[
        prediction_type
    ]
    for target in ("eps", "model"):
        zero = sampler.denoising_loss(Recorder(lambda x, t: perfect), x0, {}, k, eps, target=target)
        assert zero.abs().max() < 1e-4, (target, zero)


@pytest.mark.parametrize("kind", ["flow_sde", "flow_cps"])
def test_flow_forward_process_is_diffusers_scale_noise(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampler = build_sampler(kind, {"shift": 3.0}, 6)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    torch.manual_seed(0)
    x0, eps, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    k = torch.tensor([0, 2, 5])
    model = Recorder(lambda x, t: v)
    loss_v = sampler.denoising_loss(model, x0, {}, k, eps, target="model")
    x_s, t_in = model.seen[0]
    torch.testing.assert_close(x_s, ref.scale_noise(x0, ref.timesteps[k], eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_in.cpu(), ref.timesteps[k], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(loss_v, (v - (eps - x0)).pow(2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # eps target: the noise the velocity implies, eps_hat = x_s + (1 - s) v, i.e. (1 - s)^2 times the velocity error
    s = ref.sigmas[k].view(-1, 1, 1, 1)
    loss_eps = sampler.denoising_loss(model, x0, {}, k, eps, target="eps")
    torch.testing.assert_close(
        loss_eps, ((1 - s) ** 2 * (v - (eps - x0)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5
    )


def test_reinflow_forward_process_by_hand():
    sampler = ReinFlowSampler(num_steps=4)
    torch.manual_seed(0)
    x1, eps, v = torch.randn(5, 4, 2), torch.randn(5, 4, 2), torch.randn(5, 4, 2)
    k = torch.tensor([0, 1, 2, 3, 1])
    model = Recorder(lambda x, t: v, latent_shape=(4, 2))
    loss_v = sampler.denoising_loss(model, x1, {}, k, eps, target="model")
    x_t, t = model.seen[0]
    tt = (k.float() / 4).view(-1, 1, 1)
    torch.testing.assert_close(t, k.float() / 4)
    torch.testing.assert_close(x_t, tt * x1 + (1 - tt) * eps)  # t = 0 is noise, t = 1 the chunk
    torch.testing.assert_close(loss_v, (v - (x1 - eps)).pow(2).mean(dim=(1, 2)))
    loss_eps = sampler.denoising_loss(model, x1, {}, k, eps, target="eps")
    torch.testing.assert_close(
        loss_eps, (tt**2 * (v - (x1 - eps)) ** 2).mean(dim=(1, 2)), rtol=1e-5, atol=1e-6
    )


def test_ddpm_policy_forward_process_by_hand():
    T = 8
    sampler = DDPMPolicySampler(num_train_steps=T, ft_steps=4)
    torch.manual_seed(0)
    x0, eps, out = torch.randn(3, 4, 2), torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    k = torch.tensor([0, 5, 7])  # sampler steps: t = T - 1 - k
    model = Recorder(lambda x, t: out, latent_shape=(4, 2))
    loss = sampler.denoising_loss(model, x0, {}, k, eps)
    x_t, t = model.seen[0]
    s = 0.008
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]  # the cosine schedule, clipped (eq. 17)
    a = torch.tensor([math.prod(1 - b for b in betas[: int(ti) + 1]) for ti in t]).view(-1, 1, 1)
    assert t.tolist() == [7, 2, 0]
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, (eps - out).pow(2).mean(dim=(1, 2)))

"""Flux on the same core: the adapter's ODE chain against diffusers' own FluxPipeline and
FlowMatchEulerDiscreteScheduler (shifted sigmas, packed latents, guidance embedding), SDE/CPS
log-probs against the hand-written density, on-policy ratio 1 and KL 0 at start, training through
the Trainer, and LoRA loading into the plain FluxPipeline."""

import copy
import math

import numpy as np
import pytest
import torch

from flowrl.config import load_config
from flowrl.core import gaussian_kl
from flowrl.models import FAMILIES, build_adapter, detect_family, load_pipeline
from flowrl.run import Run
from flowrl.samplers import build_sampler
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a dog", "a red square"]


@pytest.fixture(scope="module")
def pipes():
    from flowrl.models.flux import build_tiny_flux_pipeline

    return {"dev": build_tiny_flux_pipeline(), "schnell": build_tiny_flux_pipeline(guidance_embeds=False)}


def _adapter(pipes, kind="dev", finetune="lora"):
    adapter = build_adapter(copy.deepcopy(pipes[kind]), "flux", finetune, lora_rank=4)
    if finetune == "lora":
        perturb_lora(adapter)
    return adapter


def _flux_sigmas(adapter, num_steps):
    """Flux's schedule as FluxPipeline.__call__ sets it: linspace(1, 1/K, K), shifted by mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler.from_config(adapter.pipeline.scheduler.config)
    c = ref.config
    seq_len = (adapter.latent_shape[1] // 2) * (adapter.latent_shape[2] // 2)  # packed tokens
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return ref


@pytest.mark.parametrize("name", ["flow_sde", "flow_cps"])
def test_flux_ode_matches_diffusers_scheduler_and_pipeline(pipes, name):
    adapter = _adapter(pipes)
    ref = _flux_sigmas(adapter, 5)
    sampler = build_sampler(name, adapter.scheduler_config, 5, noise_level=0.0)
    torch.testing.assert_close(sampler.sigmas, ref.sigmas.float())
    assert sampler.sigmas[1] > (1 - 1 / 5) + 0.05  # mu > 0 shifted the schedule towards noise
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = adapter.condition(PROMPTS[:2], 3.5)
    chain = sampler.sample(adapter, PROMPTS[:2], 3.5, latents=x, cond=cond)
    assert torch.isnan(chain.log_probs).all()
    # 1. diffusers' Euler step, step by step, on the adapter's velocity
    y = x.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(adapter(y, t.expand(2), cond), t, y).prev_sample
    torch.testing.assert_close(chain.latents[:, -1], y, rtol=1e-5, atol=1e-5)
    # 2. the whole FluxPipeline (its packing, ids, timestep / 1000, guidance embedding, schedule)
    pipe = adapter.pipeline
    B, C, H, W = x.shape
    with torch.no_grad():
        out = pipe(
            PROMPTS[:2],
            height=H * pipe.vae_scale_factor,
            width=W * pipe.vae_scale_factor,
            num_inference_steps=5,
            guidance_scale=3.5,
            latents=pipe._pack_latents(x, B, C, H, W),
            max_sequence_length=adapter.max_sequence_length,
            output_type="latent",
        ).images
    ours = pipe._pack_latents(chain.latents[:, -1], B, C, H, W)
    torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, a", [("flow_sde", 0.7), ("flow_cps", 0.8)])
def test_flux_step_log_prob_equals_hand_written_gaussian(pipes, name, a):
    adapter = _adapter(pipes, "schnell")
    sampler = build_sampler(name, adapter.scheduler_config, 4, noise_level=a, logprob_reduction="sum")
    chain = sampler.sample(adapter, PROMPTS[:2], 1.0, generator=torch.Generator().manual_seed(1))
    k = 1
    s, s2 = float(sampler.sigmas[k]), float(sampler.sigmas[k + 1])
    x, y = chain.latents[:, k].double(), chain.latents[:, k + 1].double()
    with torch.no_grad():
        v = adapter(chain.latents[:, k], torch.full((2,), s * 1000), chain.cond).double()
    dt = s2 - s
    if name == "flow_sde":
        sig = a * math.sqrt(s / (1 - s))
        mean = x + (v + sig**2 / (2 * s) * (x + (1 - s) * v)) * dt
        std = sig * math.sqrt(-dt)
    else:
        std = s2 * math.sin(a * math.pi / 2)
        mean = (1 - s2) * (x - s * v) + math.sqrt(s2**2 - std**2) * (x + (1 - s) * v)
    if name == "flow_sde":
        dens = -((y - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    else:  # Flow-GRPO's CPS log-prob: -(x' - mean)^2, every constant dropped
        dens = -((y - mean) ** 2)
    np.testing.assert_allclose(chain.log_probs[:, k].double().numpy(), dens.sum((1, 2, 3)).numpy(), rtol=1e-4)


@pytest.mark.parametrize(
    "kind, sampler_name, guidance",
    [("dev", "flow_sde", 3.5), ("dev", "flow_cps", 3.5), ("schnell", "flow_sde", 1.0)],
)
def test_flux_on_policy_ratio_is_one_and_kl_zero_at_start(pipes, kind, sampler_name, guidance):
    adapter = _adapter(pipes, kind)
    sampler = build_sampler(sampler_name, adapter.scheduler_config, 4)
    chain = sampler.sample(adapter, PROMPTS, guidance, generator=torch.Generator().manual_seed(0))
    finite = torch.isfinite(chain.log_probs)  # CPS's last step lands on s' = 0: std 0, no log-prob
    assert finite[:, :-1].all() and finite[:, -1].all() == (sampler_name == "flow_sde")
    for batch in ([0, 1, 2], [1]):
        sub = chain.select(batch)
        for k in range(chain.num_steps):
            if not finite[batch[0], k]:
                continue
            new = sampler.log_prob(adapter, sub, torch.full((len(batch),), k))
            ratio = torch.exp(new.log_prob - sub.log_probs[:, k])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    fresh = build_adapter(copy.deepcopy(pipes[kind]), "flux", "lora", lora_rank=4)  # B = 0
    idx = torch.zeros(3, dtype=torch.long)
    new, ref = sampler.log_prob(fresh, chain, idx), sampler.log_prob(fresh, chain, idx, reference=True)
    assert gaussian_kl(new.mean, ref.mean, new.std).abs().max().item() == 0.0


def test_flux_family_is_detected_from_a_saved_pipeline(pipes, tmp_path):
    pipes["schnell"].save_pretrained(tmp_path / "flux")
    assert detect_family(str(tmp_path / "flux")) == "flux"
    loaded = load_pipeline(str(tmp_path / "flux"), "flux")
    assert type(loaded).__name__ == FAMILIES["flux"].pipeline
    ours = build_adapter(copy.deepcopy(pipes["schnell"]), "flux", "frozen")
    theirs = build_adapter(loaded, "flux", "frozen")  # at its own 32 px, not FluxPipeline's 1024 default
    assert theirs.latent_shape == ours.latent_shape
    x = torch.randn(2, *ours.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 200.0])
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(x, t, theirs.condition(PROMPTS[:2], 1.0)), ours(x, t, ours.condition(PROMPTS[:2], 1.0))
        )


def test_flux_trains_and_its_lora_loads_into_the_plain_pipeline(tmp_path):
    import diffusers

    cfg = load_config(
        "tasks/jpeg_tiny.yaml",
        [
            "model.family=flux",
            "model.finetune=lora",
            "model.lora_rank=4",
            "sampler.name=flow_sde",
            "sampler.num_steps=4",
            "sampler.eval_num_steps=6",
            "sampler.sde_window=2",
            "sampler.guidance_scale=3.5",
            "algorithm.name=grpo",
            "algorithm.group_size=2",
            "algorithm.kl_coef=0.04",
            "algorithm.clip_range=1e-2",
            "optim.learning_rate=1e-2",
            "train.sample_batch_size=4",
            "train.num_batches_per_epoch=1",
            "train.minibatch_size=4",
            "train.num_epochs=2",
            "train.eval_every=2",
            "train.save_every=2",
            f"train.output_dir={tmp_path}",
        ],
    )
    trainer = Run(cfg)
    history = [r for r in trainer.train() if "loss" in r]  # the epochs' rows
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)
    assert history[-1]["kl_ref"] > 0
    folder = tmp_path / "task" / "checkpoints" / "epoch_000002"
    plain = load_pipeline("tiny", "flux")
    assert isinstance(plain, diffusers.FluxPipeline)
    plain.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    ours = trainer.adapter
    x = torch.randn(2, *ours.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 300.0])
    cond = ours.condition(PROMPTS[:2], 3.5)
    B, C, H, W = x.shape
    packed = plain._pack_latents(x, B, C, H, W)
    with torch.no_grad():
        # the plain pipeline's transformer, called the way FluxPipeline.__call__ calls it
        theirs = plain.transformer(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=cond["guidance"],
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
            img_ids=plain._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype),
        ).sample
        mine = ours(x, t, cond)
        base = ours.reference_forward(x, t, cond)
    torch.testing.assert_close(theirs, plain._pack_latents(mine, B, C, H, W), rtol=1e-4, atol=1e-5)
    assert (mine - base).abs().max() > 1e-4  # training changed the model


def test_flux_task_file_loads():
    cfg = load_config("tasks/flow_grpo_flux.yaml")
    assert cfg.description and cfg.model.family == "flux" and cfg.sampler.name in FAMILIES["flux"].samplers

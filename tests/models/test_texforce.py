"""TexForce: the text encoder as the trained part (``model.text_encoder_finetune``), alone or with
the UNet. Its LoRA gets the gradient while a frozen UNet stays bit-for-bit; the on-policy ratio is
exactly 1 with the embeddings recomputed from the stored token ids; each step's log-prob equals
diffusers' own ``encode_prompt`` + UNet + ``DDIMScheduler.step`` density written out here; the
reference disables the text encoder's LoRA too; saved weights load into the plain pipeline;
resume is bit-identical; the digits model learns with only its text encoder trained."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models import text_encoder_options
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.samplers import DDIMSampler

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a cat", "a dog", "a red square", "a fox"]
GUIDANCE = 3.0  # classifier-free guidance on: the negative prompt goes through the trained encoder too


def _perturb(module, scale=0.1, seed=0):
    """LoRA B starts at 0 (the adapted model equals the base): give it values so it matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapter(tiny_pipe, finetune="frozen", text="lora", scale=0.1, **kw):
    adapter = StableDiffusionAdapter(
        tiny_pipe, finetune=finetune, lora_rank=4, text_encoder_finetune=text, text_encoder_lora_rank=4, **kw
    )
    _perturb(adapter.text_encoder, scale)
    return adapter


def test_text_encoder_lora_alone_gets_the_gradient_ratio_one_and_a_frozen_unet(tiny_pipe):
    """The PPO loss on a sampled chain: ratio exactly 1 and KL 0 on-policy (the embeddings recomputed
    from the token ids in the minibatch's forward, with gradient), the gradient on the text
    encoder's LoRA only, and an optimizer step moves it and nothing else."""
    from flowrl.objectives.base import Minibatch
    from flowrl.objectives.ppo import PPO

    adapter = _adapter(tiny_pipe)
    unet_before = {k: v.clone() for k, v in adapter.unet.state_dict().items()}
    params = adapter.trainable_parameters()
    assert params and all(any(p is q for q in adapter.text_encoder.parameters()) for p in params)
    assert not any(p.requires_grad for p in adapter.unet.parameters())
    assert set(adapter.trainable_state_dict()) == {
        "text_encoder." + n for n, p in adapter.text_encoder.named_parameters() if "lora_" in n
    }
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=4, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS, GUIDANCE, generator=torch.Generator().manual_seed(0))
    assert {"input_ids", "negative_input_ids"} <= set(chain.cond) and chain.cond[
        "input_ids"
    ].dtype == torch.long
    chain.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    # every stored step re-evaluated in shuffled sub-batches of other sizes than sampling's
    for rows in (torch.tensor([2, 0]), torch.tensor([3, 1, 0])):
        for k in range(4):
            out = sampler.log_prob(adapter, chain, torch.full((len(rows),), k), traj_index=rows)
            ratio = torch.exp(out.log_prob - chain.log_probs[rows, k])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)

    cfg = load_config(
        str(REPO / "tasks/jpeg_tiny.yaml"),
        ["model.finetune=frozen", "model.text_encoder_finetune=lora", "algorithm.kl_coef=0.1"],
    )
    obj = PPO(cfg, adapter, sampler)
    mb = Minibatch(torch.tensor([0, 1, 2, 3]), torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1]]))
    terms = obj.loss(chain, mb, 0, torch.Generator().manual_seed(1))
    assert terms["clipfrac"].item() == 0.0 and abs(terms["approx_kl"].item()) < 1e-10
    terms["loss"].backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in adapter.unet.parameters())
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=1.0).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(v, adapter.unet.state_dict()[k]) for k, v in unet_before.items())


def test_step_log_prob_matches_diffusers_encode_prompt_and_ddim_step_by_hand(tiny_pipe):
    """Step k's log-prob under the current policy and the reference, computed here from the
    pipeline's own encode_prompt (CFG with the empty negative prompt), one batched UNet forward
    and DDIMScheduler.step's mean and std: log N(x_{k+1}; mu, sigma^2) averaged over dims. The
    reference is the same pipeline with the text encoder's LoRA layers switched off."""
    from diffusers import DDIMScheduler
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = _adapter(
        tiny_pipe, finetune="lora", scale=1.0
    )  # the UNet's LoRA at B = 0: the text encoder is under test
    pipe = adapter.pipeline  # the same modules: the text encoder carries the injected LoRA
    sampler = DDIMSampler(tiny_pipe.scheduler.config, num_steps=4, eta=1.0)
    chain = sampler.sample(adapter, PROMPTS, GUIDANCE, generator=torch.Generator().manual_seed(0))
    ref = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ref.set_timesteps(4)

    def by_hand(k: int) -> torch.Tensor:
        with torch.no_grad():
            pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * 4)
            t = ref.timesteps[k]
            x, x_next = chain.latents[:, k], chain.latents[:, k + 1]
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, pos])).sample
            uncond, text = out.chunk(2)
            eps = uncond + GUIDANCE * (text - uncond)
            prev_t = t - ref.config.num_train_timesteps // 4
            mean = ref.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
            std = math.sqrt(ref._get_variance(t, prev_t).item())
            log_density = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
            return log_density.mean(dim=(1, 2, 3))

    for k in range(4):
        torch.testing.assert_close(chain.log_probs[:, k], by_hand(k), rtol=1e-4, atol=1e-4)
    # the reference: the text encoder's LoRA off (the UNet's LoRA is at B = 0, so off changes nothing there)
    k = 1
    policy = by_hand(k)
    for m in pipe.text_encoder.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(False)
    base = by_hand(k)
    for m in pipe.text_encoder.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(True)
    with torch.no_grad():
        reference = sampler.log_prob(adapter, chain, torch.full((4,), k), reference=True).log_prob
    torch.testing.assert_close(reference, base, rtol=1e-4, atol=1e-4)
    assert (reference - policy).abs().max() > 1e-3  # 10x the tolerance: the LoRA matters


def test_no_grad_embeddings_follow_the_text_encoders_current_weights(tiny_pipe):
    """Sampling reuses one encoding per id tensor, but never past a change of the weights (an
    optimizer step, a checkpoint load): the same condition after a step gives the new embeddings."""
    adapter = _adapter(tiny_pipe)
    cond = adapter.condition(PROMPTS, GUIDANCE)
    x, t = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    with torch.no_grad():
        before = adapter(x, t, cond, GUIDANCE)
        assert torch.equal(adapter(x, t, cond, GUIDANCE), before)
        _perturb(adapter.text_encoder, seed=5)
        after = adapter(x, t, cond, GUIDANCE)
        fresh = adapter(x, t, adapter.condition(PROMPTS, GUIDANCE), GUIDANCE)
    assert not torch.allclose(after, before) and torch.equal(after, fresh)


@pytest.mark.parametrize("unet, text", [("lora", "lora"), ("frozen", "full")])
def test_saved_weights_load_into_the_plain_pipeline(tiny_pipe, tmp_path, unet, text):
    """The text encoder's LoRA (diffusers' text_encoder.* keys beside the UNet's) through
    StableDiffusionPipeline.load_lora_weights, or its full weights as a text_encoder folder, give
    the trained embeddings; full fine-tuning keeps a frozen copy as the reference."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    plain = copy.deepcopy(tiny_pipe)
    adapter = _adapter(tiny_pipe, finetune=unet, text=text, keep_reference=True)
    if text == "full":
        with torch.no_grad():
            for p in adapter.text_encoder.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    ids = adapter.token_ids(PROMPTS)
    trained = adapter._encode_ids(ids)
    with torch.no_grad():
        base = plain.text_encoder(ids)[0]
    assert (base - trained).abs().max() > 1e-3
    adapter.save_pretrained_weights(tmp_path)
    if text == "lora":
        assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
        loaded = StableDiffusionPipeline(**plain.components)
        loaded.load_lora_weights(tmp_path)
        encoder = loaded.text_encoder
    else:
        assert (
            not (tmp_path / "unet").exists() and not (tmp_path / "pytorch_lora_weights.safetensors").exists()
        )
        encoder = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
        with adapter.reference_mode(), torch.no_grad():
            torch.testing.assert_close(
                adapter._encode_ids(ids), plain.text_encoder(ids)[0], rtol=0, atol=1e-6
            )
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids)[0], trained, rtol=1e-5, atol=1e-5)


def test_families_without_it_and_bad_settings_are_refused_with_the_fix():
    m = load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["model.text_encoder_finetune=lora"]).model
    assert text_encoder_options(m, "sd")["text_encoder_finetune"] == "lora"
    for family in ("sdxl", "sd3", "flux", "lcm"):
        with pytest.raises(ConfigError, match=f"implemented for the sd family.*not {family}.*=frozen"):
            text_encoder_options(m, family)
    tiny = str(REPO / "tasks/jpeg_tiny.yaml")
    for overrides, match in [
        (["model.text_encoder_finetune=half"], "text_encoder_finetune: unknown mode 'half'"),
        (["model.finetune=frozen"], "frozen .* needs something else that does"),
        (["model.text_encoder_finetune=lora", "model.text_encoder_lora_rank=0"], "text_encoder_lora_rank"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(tiny, overrides)
    with pytest.raises(ConfigError, match="text_encoder_finetune=lora trains a text-to-image.*kind: env"):
        load_config(
            str(REPO / "tasks/robot_inverted_pendulum_dppo.yaml"),
            ["model.text_encoder_finetune=lora"],
        )


SMALL = [
    "model.finetune=frozen",
    "model.text_encoder_finetune=lora",
    "model.text_encoder_lora_rank=4",
    "algorithm.kl_coef=0.1",  # the reference (both LoRAs off) in every loss
    "sampler.num_steps=3",
    "sampler.guidance_scale=3.0",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=2",
    "train.minibatch_size=4",
    "train.eval_every=1",
    "train.save_every=1",
    "optim.learning_rate=1e-2",
]


def test_resume_is_exact_and_only_the_text_encoder_trains(tmp_path, tiny_pipe):
    """A run resumed at epoch 1 ends bit-identical to the straight run (the text encoder's LoRA and
    its optimizer state are in the checkpoint); the UNet is the pretrained one throughout."""
    from safetensors.torch import load_file

    from flowrl.run import Run

    def cfg(name, *extra):
        return load_config(
            str(REPO / "tasks/jpeg_tiny.yaml"),
            [*SMALL, f"train.output_dir={tmp_path}", f"train.run_name={name}", *extra],
        )

    straight = Run(cfg("straight", "train.num_epochs=2"), progress=False)
    straight.train()
    Run(cfg("split", "train.num_epochs=1"), progress=False).train()
    Run(cfg("split", "train.num_epochs=2", "train.resume=auto"), progress=False).train()
    a, b = (
        load_file(str(tmp_path / n / "checkpoints/epoch_000002/trainable.safetensors"))
        for n in ("straight", "split")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a and all(k.startswith("text_encoder.") for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained away from B = 0
    assert all(
        torch.equal(v, straight.adapter.unet.state_dict()[k]) for k, v in tiny_pipe.unet.state_dict().items()
    )
    rows = [json.loads(ln) for ln in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["approx_kl"]) for r in rows[1:])
    lora = load_file(str(tmp_path / "split/checkpoints/epoch_000002/pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("text_encoder.") for k in lora)


@pytest.mark.slow
def test_training_only_the_text_encoder_raises_digit_alignment_on_fixed_seeds(tmp_path):
    """tasks/digits_texforce.yaml: the digits model's UNet frozen, its CLIP text encoder trained
    (DRaFT-2's reward gradient, as TexForce trains ReFL-style on SD-Turbo; the prompt embeddings
    are the only thing that moves). Measured (seed 0): 0.728 / 0.808 / 0.711 / 0.743 before ->
    0.801 / 0.848 / 0.791 / 0.809 after 4 epochs, a mean gain of 0.065. The bar: the seed-to-seed
    std of the untrained alignment is 0.043 (tests/demo/test_digits.py), so a 4-seed mean has std
    about 0.021 (paired before/after differences on the same noise vary less); the test asks for a
    mean gain > 0.04, about two such stds, and a gain on every seed. That is below the 0.08 the
    UNet objectives' tests ask: ten prompt embeddings are all the encoder can move."""
    import statistics

    from flowrl.demo.digits import load_digits_pipeline
    from tests.conftest import digits_alignment_gains

    before, after, trainer = digits_alignment_gains("digits_texforce", tmp_path)
    unet = load_digits_pipeline(progress=False).unet.state_dict()  # the frozen UNet: the shipped weights
    gains = [a - b for a, b in zip(after, before)]
    assert statistics.mean(gains) > 0.04 and min(gains) > 0, (before, after)
    assert all(torch.equal(v, trainer.adapter.unet.state_dict()[k]) for k, v in unet.items())

"""flowrl.memory: the order-of-magnitude estimate of a run's peak memory, made before any weights
load, against measured reality on tiny models; the refusal, the warning zone and the override."""

import json
import math

import pytest
import torch

from flowrl import memory
from flowrl.config import load_config

TASK = "tasks/jpeg_tiny.yaml"


def saved_activation_bytes(fn, params) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn()`` (each storage once,
    the parameters left out: the estimate counts them as weights)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize(
    "side, channels, checkpointing",
    [
        (16, (32, 64), False),
        (32, (32, 64), False),
        (16, (64, 128), False),
        (16, (32, 64, 64), False),
        (32, (32, 64), True),
    ],
    ids=["16px-latents", "32px-latents", "wider", "three-levels", "checkpointing"],
)
def test_activations_within_a_factor_of_two_of_autograd(side, channels, checkpointing):
    """A (the activation elements a training forward keeps) against the bytes autograd saves in
    the tiny UNet's forward: at the sizes ALPHA was fitted on, and at widths and depths it was not."""
    from flowrl.models.tiny import tiny_unet

    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    unet = tiny_unet(side, block_out_channels=channels, down_block_types=down, up_block_types=up)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    rows = 2
    x, t, c = torch.randn(rows, 4, side, side), torch.full((rows,), 500), torch.randn(rows, 77, 32)
    measured = saved_activation_bytes(lambda: unet(x, t, c).sample, unet.parameters())
    estimate = rows * memory.unet_blocks(dict(unet.config), side).saved(checkpointing) * 4
    assert 0.5 < estimate / measured < 2, (estimate, measured)


def test_sizes_read_from_a_folder_without_loading_weights(tmp_path):
    """A saved pipeline folder: parameters from the safetensors headers equal the modules' own
    counts, LoRA's per-rank count equals what peft adds at rank 1, latents from the configs."""
    from peft import LoraConfig

    from flowrl.models.sd import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(16)
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    sizes = memory.read_model_sizes(str(tmp_path / "m"))
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert sizes.denoiser_params == numel(pipe.unet)
    assert sizes.other_params == numel(pipe.vae) + numel(pipe.text_encoder)
    assert sizes.latent == (4, 8, 8) and sizes.image_side == 16
    before = numel(pipe.unet)
    pipe.unet.add_adapter(LoraConfig(r=1, target_modules=list(memory.LORA_TARGETS)))
    assert sizes.lora_params_per_rank == numel(pipe.unet) - before


def test_chain_term_is_the_stored_chain(tmp_path):
    """The chain term against the Chain the tiny model samples (latents, text embeddings, images)."""
    from flowrl.models import build_adapter, load_pipeline
    from flowrl.samplers import build_sampler

    cfg = load_config(
        TASK,
        [
            "train.sample_batch_size=4",
            "train.num_batches_per_epoch=1",
            "sampler.num_steps=3",
            "model.tiny_image_size=16",
            "train.minibatch_size=4",
        ],
    )
    adapter = build_adapter(load_pipeline("tiny", "sd", image_size=16), "sd", finetune="frozen")
    sampler = build_sampler("ddim", adapter.scheduler_config, 3, eta=1.0)
    chain = sampler.sample(
        adapter, ["a"] * 4, cfg.sampler.guidance_scale, generator=torch.Generator().manual_seed(0)
    )
    stored = chain.latents.nbytes + sum(v.nbytes for v in chain.cond.values() if v.is_floating_point())
    stored += adapter.decode(chain.latents[:, -1]).nbytes
    est = memory.estimate_text_to_image(cfg, "sd", memory.read_model_sizes("tiny", 16))
    term = next(t for t in est.terms if t.name.startswith("the stored chain"))
    assert math.isclose(term.bytes, stored, rel_tol=0.05), (term.bytes, stored)


def test_normal_tasks_pass_and_huge_sizes_are_refused():
    """Every built-in task whose model's sizes are readable here fits this machine's estimate;
    the same task at a size that cannot fit is refused naming the dominant term and its fix."""
    import glob

    for task in sorted(glob.glob("tasks/*.yaml")):
        cfg = load_config(task)
        memory.check_run(cfg, "t")  # no refusal
    cfg = load_config(TASK, ["train.sample_batch_size=4000000"])
    with pytest.raises(memory.MemoryEstimateError, match="lower train.sample_batch_size") as err:
        memory.check_run(cfg)
    assert "order-of-magnitude estimate" in str(err.value) and "train.skip_memory_check=true" in str(
        err.value
    )
    memory.check_run(load_config(TASK, ["train.sample_batch_size=4000000", "train.skip_memory_check=true"]))


def test_warning_zone(capsys):
    cfg = load_config(TASK)
    est = memory.estimate_text_to_image(cfg, "sd", memory.read_model_sizes("tiny", 32))
    memory.check(est, "cpu", "x", available=est.total * 2)
    assert capsys.readouterr().err == ""
    memory.check(est, "cpu", "x", available=est.total / 2)  # 2x: warned, not refused
    err = capsys.readouterr().err
    assert err.startswith("flowrl: warning: this run needs about") and "it may run out of memory" in err
    with pytest.raises(memory.MemoryEstimateError, match=r"5x the"):
        memory.check(est, "cpu", "x", available=est.total / 5)


def test_available_memory_reads_the_machine():
    free, what = memory.available_memory("cpu")
    assert free is not None and 0 < free < 2**50 and "CPU" in what


def test_env_estimate_reads_policy_json(tmp_path):
    cfg = load_config("tasks/robot_inverted_pendulum_reinflow.yaml", [f"model.pretrained={tmp_path}"])
    assert memory._policy_dims(cfg, "t") is None  # no policy yet: nothing estimated
    (tmp_path / "policy.json").write_text(json.dumps({"kind": "flow", "obs_dim": 4, "action_dim": 1}))
    assert memory._policy_dims(cfg, "t") == (4, 1)
    memory.check_run(cfg, "t")
    big = load_config(
        "tasks/robot_inverted_pendulum_reinflow.yaml",
        [f"model.pretrained={tmp_path}", "env.num_envs=1000000", "env.n_steps=1000000"],
    )
    with pytest.raises(memory.MemoryEstimateError, match="lower env.num_envs or env.n_steps"):
        memory.check_run(big, "t")


def test_sizes_at_a_resolution_scale_with_the_area():
    """model.resolution (an int or [H, W] pixels): latents, feature maps and images scale with the
    area; at the model's own size nothing changes."""
    from flowrl.models.tiny import tiny_unet

    base = memory.read_model_sizes("tiny", 32)
    assert (
        base.at_resolution(None) is base and base.at_resolution(32).denoiser.saved() == base.denoiser.saved()
    )
    tall = base.at_resolution([64, 32])
    assert (
        tall.latent == (4, 32, 16) and tall.pixels == 64 * 32 and tall.describe().startswith("64x32 images")
    )
    assert math.isclose(tall.denoiser.saved(), 2 * base.denoiser.saved())
    # and against the UNet's own blocks at the square of the same area
    unet = tiny_unet(16)
    square = memory.unet_blocks(dict(unet.config), 32).saved()
    assert math.isclose(base.at_resolution(64).denoiser.saved(), square)

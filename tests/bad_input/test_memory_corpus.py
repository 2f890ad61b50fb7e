"""Sizes that cannot fit, refused before any weights load (issue 18): each case one in-process
``flowrl`` call ending with exit code 2, one ``flowrl: error:`` line naming the dominant term of
the memory estimate (flowrl.memory) and the option that shrinks it, nothing left behind. The model
folders here hold configs only, no weights: a refusal proves the check ran before loading."""

import json
from pathlib import Path

import pytest
import torch

from .conftest import ROBOT_TASK, TASK


def big_model(tmp_path: Path) -> str:
    """A Stable Diffusion folder (configs only) whose UNet samples 8192x8192 latents: 65536 px images."""
    folder = tmp_path / "big"
    files = {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        },
        "unet/config.json": {
            "sample_size": 8192,
            "in_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
        },
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2},
        "text_encoder/config.json": {"model_type": "clip_text_model", "hidden_size": 768},
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    return str(folder)


TRAIN_CASES = {
    "image-size-65536": (lambda tp: [f"model.pretrained={big_model(tp)}"], "65536x65536 images"),
    "sample-batch-huge": (
        lambda tp: ["train.sample_batch_size=4000000"],
        "lower train.sample_batch_size",
    ),
    "epoch-huge": (
        lambda tp: [
            "train.num_batches_per_epoch=1000000",
            "train.sample_batch_size=64",
            "train.minibatch_size=64",
        ],
        "the stored chain (64000000 trajectories",
    ),
    "minibatch-huge": (
        lambda tp: ["model.tiny_image_size=512", "train.minibatch_size=32", "train.timestep_batch=0"],
        "lower train.minibatch_size, set train.timestep_batch=1",
    ),
    "reward-backprop-huge": (
        lambda tp: [
            "algorithm.name=draft",
            "rewards=[{name: digit_alignment}]",
            "model.tiny_image_size=512",
            "algorithm.backprop_steps=null",
            "algorithm.grad_checkpointing=false",
            "train.sample_batch_size=256",
            "train.minibatch_size=256",
        ],
        "reward-backprop activations",
    ),
}


@pytest.mark.parametrize("make, cause", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_train_sizes(refuse, tmp_path, make, cause):
    out = tmp_path / "out"
    msg = refuse(["train", TASK, f"train.output_dir={out}", *make(tmp_path)], cause, out)
    assert "order-of-magnitude estimate" in msg and "train.skip_memory_check=true" in msg


SAMPLE_CASES = {
    "n-huge": (lambda tp: ["-n", "10000000"], "lower -n/--num-per-prompt"),
    "particles-huge": (
        lambda tp: ["--guide", "best-of-n", "--reward", "jpeg_compressibility", "--particles", "10000000"],
        "--particles",
    ),
    "image-size-65536": (lambda tp: ["--model", big_model(tp)], "65536x65536 images"),
}


@pytest.mark.parametrize("make, cause", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_sizes(refuse, tmp_path, make, cause):
    out = tmp_path / "out"
    msg = refuse(["sample", "--prompt", "a", "--out", out, *make(tmp_path)], cause, out)
    assert "--skip-memory-check" in msg


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    from flowrl.models.policy import FlowPolicy

    folder = tmp_path_factory.mktemp("policy") / "p"
    torch.manual_seed(0)
    p = FlowPolicy(obs_dim=4, action_dim=1, obs_horizon=1, action_horizon=4, hidden_dims=[16])
    p.normalizer.fit(torch.randn(100, 4) * 0.1, torch.tensor([-3.0]), torch.tensor([3.0]))
    p.save(folder)
    return str(folder)


def test_evaluate_episodes_huge(refuse, tmp_path, policy):
    out = tmp_path / "out"
    argv = ["evaluate", ROBOT_TASK, f"train.output_dir={out}", "--policy", policy, "--episodes", "100000000"]
    refuse(argv, "lower --episodes", out)


def test_evaluate_particles_huge(refuse, tmp_path, policy):
    out = tmp_path / "out"
    argv = ["evaluate", ROBOT_TASK, f"train.output_dir={out}", "--policy", policy, "--episodes", "10"]
    refuse(
        [*argv, "--guide", "best-of-n", "--reward", "smoothness", "--particles", "100000000"],
        "particles",
        out,
    )


def test_env_rollouts_huge(refuse, tmp_path, policy):
    out = tmp_path / "out"
    argv = ["train", ROBOT_TASK, f"train.output_dir={out}", f"model.pretrained={policy}"]
    refuse([*argv, "env.num_envs=100000", "env.n_steps=1000000"], "lower env.num_envs or env.n_steps", out)

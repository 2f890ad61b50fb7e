"""Every text-to-image family from a saved local folder, as a user with downloaded weights runs it
(issue 19): ``save_pretrained`` to a folder; reloaded, the model samples at its own size (Flux's
``default_sample_size`` is not saved; an SD3 folder without T5 loads); at a ``model.resolution``
that is not its own (and not square) it samples, scores a step's log-prob with gradient and
decodes at that size; ``flowrl train`` and ``flowrl sample`` run from such folders."""

import importlib

import pytest
import torch
from PIL import Image

from flowrl.cli import main as cli_main
from flowrl.config import ConfigError, load_config
from flowrl.models import build_adapter, build_model
from flowrl.samplers import sampler_for

TINY = {  # the tiny pipelines, built at 32 px (latents 4 x 16 x 16: the tiny VAE halves)
    "sd": ("flowrl.models.sd", "build_tiny_sd_pipeline", ["sampler.name=ddim"]),
    "sdxl": ("flowrl.models.sdxl", "build_tiny_sdxl_pipeline", ["sampler.name=ddim"]),
    "sd3": ("flowrl.models.sd3", "build_tiny_sd3_pipeline", ["sampler.name=flow_sde"]),
    "flux": ("flowrl.models.flux", "build_tiny_flux_pipeline", ["sampler.name=flow_sde"]),
    "lcm": (
        "flowrl.models.lcm",
        "build_tiny_lcm_pipeline",
        ["sampler.name=lcm", "sampler.guidance_scale=4.0"],
    ),
}
SMALL = [
    "model.finetune=lora",
    "sampler.num_steps=2",
    "train.sample_batch_size=2",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=2",
    "train.num_epochs=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.eval_prompts=[a cat]",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny pipeline, saved with ``save_pretrained`` (SD3's without T5)."""
    root = tmp_path_factory.mktemp("saved")
    for family, (module, builder, _) in TINY.items():
        getattr(importlib.import_module(module), builder)().save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", list(TINY))
def test_family_from_a_saved_folder_samples_at_its_size_and_at_model_resolution(folders, family):
    folder = str(folders / family)
    cfg = load_config(
        "tasks/jpeg_tiny.yaml",
        [f"model.pretrained={folder}", "model.resolution=[16, 24]", *SMALL, *TINY[family][2]],
    )
    adapter = build_model(cfg, "t", torch.device("cpu"), torch.float32, keep_reference=False)
    assert adapter.family == family  # detected from the folder's model_index.json
    assert adapter.latent_shape == (4, 8, 12)  # 16 x 24 px through the VAE's factor 2
    if family in ("sd3", "flux"):  # the flow schedule's shift counts the image tokens at that size
        assert adapter.scheduler_config["_image_seq_len"] == (8 * 12 if family == "sd3" else 4 * 6)
    sampler = sampler_for(cfg, adapter)
    g = cfg.sampler.guidance_scale
    chain = sampler.sample(adapter, ["a cat"], g, generator=torch.Generator().manual_seed(0))
    assert tuple(chain.latents.shape[-3:]) == (4, 8, 12)
    step = sampler.log_prob(adapter, chain, torch.tensor([0]))
    step.log_prob.sum().backward()  # one update's gradient reaches the LoRA weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters())
    assert tuple(adapter.decode(chain.latents[:, -1]).shape[-2:]) == (16, 24)
    # without model.resolution the reloaded model samples at the size it was saved at (32 px),
    # whatever the pipeline class's default (Flux: 1024)
    assert build_adapter(adapter.pipeline, family, "frozen").latent_shape == (4, 16, 16)


def test_flowrl_train_and_sample_run_from_saved_folders_at_model_resolution(folders, tmp_path):
    """``flowrl train`` from the SD3 folder without T5, ``flowrl sample --resolution`` from the Flux one."""
    folder = folders / "sd3"
    overrides = [f"model.pretrained={folder}", "model.resolution=[16, 24]", *SMALL, "sampler.name=flow_sde"]
    assert cli_main(["train", "tasks/jpeg_tiny.yaml", *overrides, f"train.output_dir={tmp_path}"]) == 0
    run = tmp_path / "jpeg_tiny"
    assert (run / "samples" / "epoch_0001.png").is_file() and (run / "metrics.jsonl").is_file()

    out = tmp_path / "samples"
    common = ["sample", "--model", str(folders / "flux"), "--prompt", "a cat", "--num-steps", "2"]
    assert cli_main([*common, "--resolution", "16", "24", "--out", str(out)]) == 0
    assert Image.open(out / "0000.png").size == (24, 16)  # (width, height)


def test_a_resolution_the_folder_cannot_sample_stops_before_any_weights_load(folders):
    """The task's checks (before the run loads the model) read the folder's VAE and transformer
    configs: tiny VAE scale 2; SD3 patch 1; Flux packs 2x2 (so multiples of 4 px)."""
    from flowrl.collectors.text_to_image import TextToImageCollector

    for family, bad, good in (("sd", "[17, 24]", "[18, 24]"), ("flux", "[18, 24]", "[20, 24]")):
        for resolution, ok in ((bad, False), (good, True)):
            cfg = load_config(
                "tasks/jpeg_tiny.yaml",
                [f"model.pretrained={folders / family}", f"model.resolution={resolution}", *TINY[family][2]],
            )
            if ok:
                TextToImageCollector.check(cfg, "t")
            else:
                with pytest.raises(ConfigError, match=f"a {family} model's height and width"):
                    TextToImageCollector.check(cfg, "t")


def test_a_resolution_the_model_cannot_sample_is_one_line(capsys):
    from flowrl.models.sd3 import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline()
    with pytest.raises(ConfigError, match=r"multiples of 2 px .*model.resolution=\[16, 24\]"):
        build_adapter(pipe, "sd3", "frozen", resolution=[17, 24])
    with pytest.raises(ConfigError, match="position embedding covers at most 192 px"):
        build_adapter(pipe, "sd3", "frozen", resolution=256)
    with pytest.raises(ConfigError, match=r"model.resolution must be a size in pixels"):
        load_config("tasks/jpeg_tiny.yaml", ["model.resolution=[16, 24, 32]"])
    with pytest.raises(ConfigError, match="tiny model"):
        load_config("tasks/jpeg_tiny.yaml", ["model.resolution=1024"])
    assert cli_main(["sample", "--prompt", "a cat", "--resolution", "16", "24", "32"]) == 2
    assert "--resolution takes one size" in capsys.readouterr().err


def test_flow_grpo_tasks_train_at_512():
    """Flow-GRPO's recipes (config/grpo.py: config.resolution = 512) sample at 512, not SD3.5's
    and FLUX.1's 1024; MixGRPO's at 720."""
    for task in ("flow_grpo_sd3", "flow_grpo_fast_sd3", "flow_grpo_flux"):
        assert load_config(f"tasks/{task}.yaml").model.resolution == 512, task
    assert load_config("tasks/mixgrpo_flux.yaml").model.resolution == 720

"""SMC over a deterministic chain is best-of-N (issue 19): resampling copies particles that then
never diverge. ``smc_guidance`` warns in one line; ``flowrl sample --guide smc`` samples with
noise by default (eta 1, as ``flowrl evaluate`` samples SMC's chunks stochastically) and refuses
an explicit 0."""

import warnings

import pytest

from flowrl.cli import main as cli_main
from flowrl.guidance import smc_guidance
from flowrl.models import StableDiffusionAdapter
from flowrl.models.tiny import build_tiny_pixel_pipeline
from flowrl.samplers import DDIMSampler


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pixel_pipeline(image_size=8)


@pytest.mark.parametrize("eta, deterministic", [(0.0, False), (1.0, True)])
def test_smc_over_a_deterministic_chain_warns(pipe, eta, deterministic):
    adapter = StableDiffusionAdapter(pipe, "frozen")
    sampler = DDIMSampler(pipe.scheduler.config, 2, eta=eta)
    with pytest.warns(UserWarning, match="best-of-N"):
        smc_guidance(sampler, adapter, brightness, ["a cat"], num_particles=2, deterministic=deterministic)
    with warnings.catch_warnings():  # with noise: no warning
        warnings.simplefilter("error")
        smc_guidance(DDIMSampler(pipe.scheduler.config, 2, eta=1.0), adapter, brightness, ["a cat"], 2)


def test_cli_smc_samples_with_noise_and_refuses_eta_0(tmp_path, capsys):
    common = ["sample", "--prompt", "a cat", "--num-steps", "2", "--guide", "smc", "--particles", "2"]
    common += ["--reward", "jpeg_compressibility", "--tiny-image-size", "16"]
    assert cli_main([*common, "--eta", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--guide smc with --eta 0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings():  # the default draws noise: SMC is not best-of-N
        warnings.filterwarnings("error", message="smc_guidance")
        assert cli_main([*common, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "grid.png").is_file()

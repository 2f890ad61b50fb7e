"""What makes the same code run on a GPU, checked on the CPU: an adapter owns every network it
calls (so ``adapter.to(device)`` moves the text encoders too), fp16 keeps a VAE that asks for
float32 in float32, and seeded noise comes from the generator's device (a CPU generator gives
the same noise wherever the network runs)."""

import pytest
import torch

from flowrl.models import build_adapter, load_pipeline
from flowrl.samplers.base import randn

COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "lcm", "flux"])
def test_the_adapter_owns_every_network_it_runs(family):
    pipe = load_pipeline("tiny", family)
    adapter = build_adapter(pipe, family, "lora", lora_rank=2)
    owned = {id(p) for p in adapter.parameters()}
    networks = {n: getattr(pipe, n, None) for n in COMPONENTS}
    networks = {n: m for n, m in networks.items() if isinstance(m, torch.nn.Module)}
    assert "vae" in networks and len(networks) >= 3
    for name, module in networks.items():
        missing = [p for p in module.parameters() if id(p) not in owned]
        assert not missing, (
            f"{family}: {name} is not a submodule of the adapter; .to(device) would leave it behind"
        )
    # so a dtype (like a device) change reaches them all
    adapter.to(torch.float64)
    assert all(p.dtype == torch.float64 for m in networks.values() for p in m.parameters())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_fp16_keeps_a_force_upcast_vae_in_float32(family):
    pipe = load_pipeline("tiny", family)
    assert pipe.vae.config.force_upcast  # as the SD and SDXL VAEs say
    adapter = build_adapter(pipe, family, "lora", lora_rank=2, weight_dtype=torch.float16)
    assert next(pipe.vae.parameters()).dtype == torch.float32
    assert next(pipe.text_encoder.parameters()).dtype == torch.float16
    images = adapter.decode(torch.randn(1, *adapter.latent_shape))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_noise_is_drawn_on_the_generators_device():
    a = randn((2, 3), torch.Generator().manual_seed(7), "cpu")
    b = torch.randn((2, 3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.float32
    meta = randn((2, 3), torch.Generator().manual_seed(7), "meta")  # any target device: drawn, then moved
    assert meta.device.type == "meta" and meta.shape == (2, 3)


def test_fp16_keeps_what_transformers_keeps_in_float32():
    """T5 (Flux's second text encoder) in fp16 keeps its feed-forward output projections in
    float32, as transformers' own fp16 loading does (they overflow otherwise); the rest is fp16."""
    pipe = load_pipeline("tiny", "flux")
    adapter = build_adapter(pipe, "flux", "lora", lora_rank=2, weight_dtype=torch.float16)
    t5 = pipe.text_encoder_2
    dtypes = {n: m.weight.dtype for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {d for n, d in dtypes.items() if n.endswith(".wo")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo")} == {torch.float16}
    cond = adapter.condition(["a cat"], 1.0)
    assert all(torch.isfinite(v).all() for v in cond.values())


def test_the_gpu_check_script_runs_here():
    """scripts/cuda_check.py is what a session with a GPU runs; on the CPU it is its own dry run."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "cuda_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--skip-train"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "10 of 10 checks passed" in proc.stdout, proc.stdout[-2000:]

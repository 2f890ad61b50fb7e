"""Model adapters: wrap a network so a sampler can ask for its prediction at (x_t, t, c).

Families (``model.family``; ``auto`` reads a pipeline folder's ``model_index.json``):

    sd    Stable Diffusion 1.x/2.x   UNet, DDIM(eta) chain          StableDiffusionAdapter
    sdxl  SDXL                       UNet + micro-conditioning      SDXLAdapter
    sd3   SD3-style flow transformer velocity, flow SDE/CPS chain   SD3Adapter
    lcm   latent consistency model   UNet + w-conditioning, LCM     LCMAdapter
    flux  Flux (dev / schnell)       packed-latent velocity, flow   FluxAdapter
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from flowrl.models.base import DenoiserAdapter
from flowrl.models.sd import StableDiffusionAdapter, build_tiny_sd_pipeline, load_sd_pipeline

# family -> (diffusers pipeline class name, samplers that fit its prediction)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd": ("StableDiffusionPipeline", ("ddim",)),
    "sdxl": ("StableDiffusionXLPipeline", ("ddim",)),
    "sd3": ("StableDiffusion3Pipeline", ("flow_sde", "flow_cps")),
    "lcm": ("LatentConsistencyModelPipeline", ("lcm",)),
    "flux": ("FluxPipeline", ("flow_sde", "flow_cps")),
}
BUILTIN_MODELS = ("tiny", "digits")


def _check_local(pretrained: str) -> Path | None:
    """The local folder ``pretrained`` names, None for a hub id; clear errors for bad folders."""
    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1 or os.sep == "\\"
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.pretrained: {pretrained!r} has no model_index.json, so it is not a diffusers pipeline "
                "folder. Save one with `pipeline.save_pretrained(folder)` or give a hub id."
            )
        return path
    if looks_local:
        raise FileNotFoundError(
            f"model.pretrained: folder {pretrained!r} does not exist. Give a local diffusers pipeline "
            "folder (one with model_index.json), a hub id such as 'runwayml/stable-diffusion-v1-5', or 'tiny'."
        )
    return None


def detect_family(pretrained: str, family: str = "auto") -> str:
    """The model family, without loading weights (reads model_index.json for local folders and
    hub ids)."""
    if family != "auto":
        if family not in FAMILIES:
            raise ValueError(f"model.family must be 'auto' or one of {sorted(FAMILIES)}, got {family!r}")
        return family
    if pretrained in BUILTIN_MODELS:
        return "sd"
    path = _check_local(pretrained)
    if path is not None:
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    else:
        from diffusers import DiffusionPipeline

        try:
            class_name = DiffusionPipeline.load_config(pretrained).get("_class_name", "")
        except OSError as e:  # not on the hub, no network, HF_HUB_OFFLINE=1, gated repo
            raise FileNotFoundError(
                f"model.pretrained: {pretrained!r} is neither a local folder nor a reachable hub pipeline "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a local diffusers "
                "pipeline folder (one with model_index.json), check the hub id, or 'tiny'"
            ) from e
    for name, (cls, _) in FAMILIES.items():
        if class_name == cls:
            return name
    raise ValueError(
        f"model.pretrained: {pretrained!r} is a {class_name or 'unknown'} pipeline; flowrl supports "
        f"{', '.join(c for c, _ in FAMILIES.values())}. Set model.family if the folder is one of those under another name."
    )


def load_pipeline(
    pretrained: str,
    family: str,
    *,
    revision: str | None = None,
    prediction_type: str | None = None,
    image_size: int = 32,
    seed: int = 0,
):
    """A diffusers pipeline of the family, with the scheduler its sampler needs."""
    if family == "sd":
        tiny = {"image_size": image_size, "seed": seed} if pretrained == "tiny" else {}
        return load_sd_pipeline(pretrained, revision=revision, prediction_type=prediction_type, **tiny)
    if pretrained == "tiny":
        if family == "sdxl":
            from flowrl.models.sdxl import build_tiny_sdxl_pipeline

            return build_tiny_sdxl_pipeline(image_size, seed, prediction_type or "epsilon")
        if family == "sd3":
            from flowrl.models.sd3 import build_tiny_sd3_pipeline

            return build_tiny_sd3_pipeline(image_size, seed)
        if family == "flux":
            from flowrl.models.flux import build_tiny_flux_pipeline

            return build_tiny_flux_pipeline(image_size, seed)
        from flowrl.models.lcm import build_tiny_lcm_pipeline

        return build_tiny_lcm_pipeline(image_size, seed)
    import diffusers

    path = _check_local(pretrained)
    source = str(path) if path is not None else pretrained
    cls = getattr(diffusers, FAMILIES[family][0])
    kwargs: dict = {"revision": revision}
    if family == "lcm":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(source, **kwargs)
    if family == "sdxl":
        config = dict(pipe.scheduler.config)
        if prediction_type is not None:
            config["prediction_type"] = prediction_type
        pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    return pipe


def adapter_class(family: str) -> type[DenoiserAdapter]:
    """The adapter class of a model family (its module imported on demand)."""
    if family == "sd":
        return StableDiffusionAdapter
    if family == "sdxl":
        from flowrl.models.sdxl import SDXLAdapter

        return SDXLAdapter
    if family == "sd3":
        from flowrl.models.sd3 import SD3Adapter

        return SD3Adapter
    if family == "lcm":
        from flowrl.models.lcm import LCMAdapter

        return LCMAdapter
    if family == "flux":
        from flowrl.models.flux import FluxAdapter

        return FluxAdapter
    raise ValueError(f"unknown model family {family!r}")


def build_adapter(
    pipeline,
    family: str,
    finetune: str = "lora",
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    weight_dtype: torch.dtype = torch.float32,
    keep_reference: bool = False,
    **family_kwargs,
) -> DenoiserAdapter:
    """The family's adapter around a loaded pipeline; ``family_kwargs`` go to its constructor
    (e.g. Flux's ``image_size``, ``max_sequence_length``)."""
    cls = adapter_class(family)
    return cls(pipeline, finetune, lora_rank, lora_alpha, weight_dtype, keep_reference, **family_kwargs)


__all__ = [
    "FAMILIES",
    "DenoiserAdapter",
    "adapter_class",
    "StableDiffusionAdapter",
    "build_adapter",
    "build_tiny_sd_pipeline",
    "detect_family",
    "load_pipeline",
]

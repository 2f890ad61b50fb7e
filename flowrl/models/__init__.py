"""Model adapters: wrap a network so a sampler can ask for its prediction at (x_t, t, c).

Families (``model.family``; ``auto`` reads a pipeline folder's ``model_index.json`` or a policy
folder's ``policy.json``):

    sd                Stable Diffusion 1.x/2.x   UNet, DDIM(eta) chain            StableDiffusionAdapter
    sdxl              SDXL                       UNet + micro-conditioning        SDXLAdapter
    sd3               SD3-style flow transformer velocity, flow SDE/CPS chain     SD3Adapter
    lcm               latent consistency model   UNet + w-conditioning, LCM       LCMAdapter
    flux              Flux (dev / schnell)       packed-latent velocity, flow     FluxAdapter
    diffusion_policy  DDPM policy, action chunks eps, DPPO's DDPM chain         DiffusionPolicy
    flow_policy       flow policy, action chunks velocity, ReinFlow / Euler     FlowPolicy
    gaussian_policy   Gaussian MLP policy        mean + learned std, one step     GaussianPolicy
    residual_policy   residual on a frozen chain Gaussian correction (ResiP)      ResidualPolicy
    dsrl_policy       noise policy, frozen chain Gaussian initial noise (DSRL)    DSRLPolicy

Every adapter answers the same protocol (:mod:`flowrl.models.base`): ``condition(inputs)``,
``forward(x, t, cond)``, ``reference_forward``, ``trainable_parameters()`` and their state,
``decode``, ``save_pretrained_weights``. A family is one module plus an entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flowrl.errors import ConfigError, MissingFileError, read_json
from flowrl.models.sd import StableDiffusionAdapter, build_tiny_sd_pipeline


@dataclass(frozen=True)
class Family:
    """A model family: its adapter, the samplers that fit its prediction, how to recognize it."""

    # the collector (task kind) its models serve
    kind: str
    # "module:Class" of its adapter, imported on demand
    adapter: str
    # the samplers that fit its prediction; the first is the default
    samplers: tuple[str, ...]
    # text_to_image: the diffusers pipeline class; env: the policy.json kind
    pipeline: str


FAMILIES: dict[str, Family] = {
    "sd": Family(
        "text_to_image", "flowrl.models.sd:StableDiffusionAdapter", ("ddim",), "StableDiffusionPipeline"
    ),
    "sdxl": Family("text_to_image", "flowrl.models.sdxl:SDXLAdapter", ("ddim",), "StableDiffusionXLPipeline"),
    "sd3": Family(
        "text_to_image", "flowrl.models.sd3:SD3Adapter", ("flow_sde", "flow_cps"), "StableDiffusion3Pipeline"
    ),
    "lcm": Family(
        "text_to_image", "flowrl.models.lcm:LCMAdapter", ("lcm",), "LatentConsistencyModelPipeline"
    ),
    "flux": Family(
        "text_to_image", "flowrl.models.flux:FluxAdapter", ("flow_sde", "flow_cps"), "FluxPipeline"
    ),
    "diffusion_policy": Family("env", "flowrl.models.policy:DiffusionPolicy", ("ddpm", "ddim"), "diffusion"),
    "flow_policy": Family(
        "env", "flowrl.models.policy:FlowPolicy", ("reinflow", "euler", "flow_sde", "flow_noise"), "flow"
    ),
    # Gaussian heads (flowrl/models/gaussian_policy.py): DPPO's Gaussian MLP, ResiP's residual, DSRL's noise policy
    "gaussian_policy": Family(
        "env", "flowrl.models.gaussian_policy:GaussianPolicy", ("gaussian",), "gaussian"
    ),
    "residual_policy": Family(
        "env", "flowrl.models.gaussian_policy:ResidualPolicy", ("gaussian",), "residual"
    ),
    "dsrl_policy": Family("env", "flowrl.models.gaussian_policy:DSRLPolicy", ("gaussian",), "dsrl"),
}
BUILTIN_MODELS = ("tiny", "digits")


def adapter_class(family: str):
    """The adapter class of a model family (its module imported on demand)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    module, _, cls = FAMILIES[family].adapter.partition(":")
    return getattr(importlib.import_module(module), cls)


def _check_local(pretrained: str) -> Path | None:
    """The local folder ``pretrained`` names, None for a hub id; clear errors for bad folders."""
    path = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1 or os.sep == "\\"
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise MissingFileError(
                f"model.pretrained: {pretrained!r} has no model_index.json, so it is not a diffusers pipeline "
                "folder. Save one with `pipeline.save_pretrained(folder)` or give a hub id."
            )
        return path
    if looks_local:
        raise MissingFileError(
            f"model.pretrained: folder {pretrained!r} does not exist. Give a local diffusers pipeline "
            "folder (one with model_index.json), a hub id such as 'runwayml/stable-diffusion-v1-5', or 'tiny'."
        )
    return None


def detect_family(pretrained: str | None, family: str = "auto") -> str:
    """The model family, without loading weights (reads model_index.json for local folders and
    hub ids, policy.json for policy folders)."""
    if family != "auto":
        if family not in FAMILIES:
            raise ConfigError(f"model.family must be 'auto' or one of {sorted(FAMILIES)}, got {family!r}")
        return family
    if pretrained in BUILTIN_MODELS:
        return "sd"
    if pretrained is not None and (Path(pretrained).expanduser() / "policy.json").is_file():
        meta = read_json(Path(pretrained).expanduser() / "policy.json", "model.pretrained: policy file")
        kind = meta.get("kind") if isinstance(meta, dict) else None
        for name, f in FAMILIES.items():
            if f.kind == "env" and f.pipeline == kind:
                return name
        raise ConfigError(f"model.pretrained: {pretrained}/policy.json names an unknown policy kind {kind!r}")
    if pretrained is None:
        raise ConfigError("model.family=auto needs model.pretrained: set model.family (e.g. flow_policy)")
    path = _check_local(pretrained)
    if path is not None:
        index = read_json(path / "model_index.json", "model.pretrained: pipeline index")
        class_name = index.get("_class_name", "") if isinstance(index, dict) else ""
    else:
        from diffusers import DiffusionPipeline

        try:
            class_name = DiffusionPipeline.load_config(pretrained).get("_class_name", "")
        except OSError as e:  # not on the hub, no network, HF_HUB_OFFLINE=1, gated repo
            raise MissingFileError(
                f"model.pretrained: {pretrained!r} is neither a local folder nor a reachable hub pipeline "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a local diffusers "
                "pipeline folder (one with model_index.json), check the hub id, or 'tiny'"
            ) from e
    for name, f in FAMILIES.items():
        if f.kind == "text_to_image" and class_name == f.pipeline:
            return name
    supported = ", ".join(f.pipeline for f in FAMILIES.values() if f.kind == "text_to_image")
    raise ConfigError(
        f"model.pretrained: {pretrained!r} is a {class_name or 'unknown'} pipeline; flowrl supports "
        f"{supported}. Set model.family if the folder is one of those under another name."
    )


def check_resolution(m, family: str) -> None:
    """``model.resolution`` against the VAE scale x patch size before any weights load (the adapter
    checks it again on the loaded model): a local folder's ``vae`` and ``transformer`` configs,
    the tiny models' (VAE scale 2, patch 1), or a hub model's (scale 8; SD3 patch 2); Flux's latents
    are packed 2x2."""
    if m.resolution is None or FAMILIES[family].kind != "text_to_image" or m.pretrained == "digits":
        return
    from flowrl.models.base import latent_size

    scale, patch = (2, 1) if m.pretrained == "tiny" else (8, 2)
    folder = None if m.pretrained == "tiny" else Path(m.pretrained).expanduser()
    if folder is not None and (folder / "vae" / "config.json").is_file():
        vae = read_json(folder / "vae" / "config.json", "model.pretrained: VAE config")
        scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        net = folder / "transformer" / "config.json"
        if net.is_file():
            patch = read_json(net, "model.pretrained: transformer config").get("patch_size", 1)
    patch = 2 if family == "flux" else patch if family == "sd3" else 1
    latent_size(m.resolution, (0, 0), scale, scale * patch, family)


def load_pipeline(
    pretrained: str,
    family: str,
    *,
    revision: str | None = None,
    prediction_type: str | None = None,
    image_size: int = 32,
    seed: int = 0,
):
    """A diffusers pipeline of the family (``tiny``: random weights from config), with the
    scheduler its sampler needs."""
    cls = adapter_class(family)
    if pretrained == "tiny":
        return cls.tiny_pipeline(image_size, seed, prediction_type)
    if pretrained == "digits":
        if family != "sd":
            raise ConfigError(
                f"model.pretrained=digits is a Stable Diffusion-style model; set model.family=sd, not {family}"
            )
        from flowrl.demo.digits import load_digits_pipeline

        return load_digits_pipeline()
    path = _check_local(pretrained)
    return cls.load_pipeline(str(path) if path is not None else pretrained, revision, prediction_type)


def build_adapter(
    pipeline,
    family: str,
    finetune: str = "lora",
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    weight_dtype: torch.dtype = torch.float32,
    keep_reference: bool = False,
    **family_kwargs,
):
    """The family's adapter around a loaded pipeline; ``family_kwargs`` go to its constructor
    (e.g. ``resolution``, Flux's ``max_sequence_length``)."""
    cls = adapter_class(family)
    return cls(pipeline, finetune, lora_rank, lora_alpha, weight_dtype, keep_reference, **family_kwargs)


def text_encoder_options(m, family: str) -> dict:
    """The adapter's keyword arguments for a trained text encoder (TexForce: ``model.text_encoder_finetune``),
    empty when it is frozen; a ConfigError for a family whose adapter does not implement it."""
    mode = getattr(m, "text_encoder_finetune", "frozen")
    if mode == "frozen":
        return {}
    if not getattr(adapter_class(family), "trains_text_encoder", False):
        raise ConfigError(
            f"model.text_encoder_finetune={mode}: training the text encoder is implemented for the sd family "
            f"(Stable Diffusion 1.x/2.x, the digits model), not {family} yet; set model.text_encoder_finetune=frozen"
        )
    return {
        "text_encoder_finetune": mode,
        "text_encoder_lora_rank": m.text_encoder_lora_rank,
        "text_encoder_lora_alpha": m.text_encoder_lora_alpha,
    }


def build_model(cfg, task_name: str, device: torch.device, weight_dtype: torch.dtype, keep_reference: bool):
    """The adapter a task trains: a text-to-image pipeline's (loaded, wrapped, on ``device``) or a
    pre-trained policy prepared for its sampler."""
    m = cfg.model
    family = detect_family(m.pretrained, m.family)
    cls = adapter_class(family)
    if FAMILIES[family].kind == "env":
        return cls.for_finetuning(cfg, task_name, device)
    text = text_encoder_options(m, family)
    pipe = load_pipeline(
        m.pretrained,
        family,
        revision=m.revision,
        prediction_type=m.prediction_type,
        image_size=m.tiny_image_size,
        seed=m.tiny_seed,
    )
    adapter = build_adapter(
        pipe,
        family,
        m.finetune,
        m.lora_rank,
        m.lora_alpha,
        weight_dtype,
        keep_reference,
        resolution=m.resolution,
        **text,
    ).to(device)
    if getattr(m, "noise_policy", None) is not None:  # FIND: a trained x_T in front of the frozen denoiser
        from flowrl.models.noise_policy import NoisePolicyAdapter

        return NoisePolicyAdapter(adapter, m.noise_policy)
    return adapter


__all__ = [
    "FAMILIES",
    "StableDiffusionAdapter",
    "build_tiny_sd_pipeline",
    "Family",
    "adapter_class",
    "build_adapter",
    "build_model",
    "check_resolution",
    "detect_family",
    "load_pipeline",
    "text_encoder_options",
]

"""Model adapters: wrap a network so a sampler can ask for its prediction at (x_t, t, c)."""

from flowrl.models.sd import StableDiffusionAdapter, build_tiny_sd_pipeline

__all__ = ["StableDiffusionAdapter", "build_tiny_sd_pipeline"]

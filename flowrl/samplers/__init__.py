"""Samplers: turn a denoising chain into an MDP with exact per-step Gaussian log-probs."""

from flowrl.samplers.base import StepOutput, gaussian_log_prob, reduce_event
from flowrl.samplers.ddim import DDIMSampler

__all__ = ["DDIMSampler", "StepOutput", "gaussian_log_prob", "reduce_event"]

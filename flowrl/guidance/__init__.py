"""Inference-time reward guidance on the same adapters and samplers (no training, or a dial on
a fine-tune), for text-to-image models and robot policies alike.

    rl_guidance          RLGuidedAdapter: base and fine-tuned predictions mixed with weight w
    reward_gradient      DPS-style gradient of a differentiable reward at the predicted x0
    best_of_n            N samples per input, keep the best
    smc                  sequential Monte Carlo with reward potentials (FK steering)
    sampler              GuidedSampler: any of the three above as a drop-in sampler
    actions              action rewards for robot policies (target, smoothness, simulated return)
    lqr_value            the LQR value of an action chunk (a long-horizon score for balancing tasks)

Every method works with any :class:`~flowrl.samplers.base.ChainSampler` (DDIM, flow SDE/ODE,
LCM, DPPO's DDPM, ReinFlow) and returns a :class:`GuidanceResult` that counts network
evaluations (NFE).
"""

from flowrl.guidance.actions import ACTION_REWARDS, ChunkReward
from flowrl.guidance.best_of_n import best_of_n
from flowrl.guidance.common import GuidanceResult
from flowrl.guidance.reward_gradient import reward_gradient_guidance
from flowrl.guidance.rl_guidance import RLGuidedAdapter
from flowrl.guidance.sampler import GuidedSampler
from flowrl.guidance.smc import smc_guidance

__all__ = [
    "ACTION_REWARDS",
    "ChunkReward",
    "GuidanceResult",
    "GuidedSampler",
    "RLGuidedAdapter",
    "best_of_n",
    "reward_gradient_guidance",
    "smc_guidance",
]

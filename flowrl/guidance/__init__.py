"""Inference-time reward guidance on the same samplers (no training, or a dial on a fine-tune).

    rl_guidance          RLGuidedAdapter: base and fine-tuned predictions mixed with weight w
    reward_gradient      DPS-style gradient of a differentiable reward at the predicted x0
    best_of_n            N samples per prompt, keep the best
    smc                  sequential Monte Carlo with reward potentials (FK steering)
    robot                the same four on robot policies (DPPO's DDPM, ReinFlow's flow):
                         RLGuidedPolicy, and PolicyGuide running the loops above on a policy

Every method works with any :class:`~flowrl.samplers.base.ChainSampler` (DDIM, flow SDE/ODE,
LCM, a robot policy's sampler seen through ``robot.PolicyStepSampler``) and returns a
:class:`GuidanceResult` that counts network evaluations (NFE).
"""

from flowrl.guidance.best_of_n import best_of_n
from flowrl.guidance.common import GuidanceResult
from flowrl.guidance.reward_gradient import reward_gradient_guidance
from flowrl.guidance.rl_guidance import RLGuidedAdapter
from flowrl.guidance.robot import ACTION_REWARDS, PolicyGuide, RLGuidedPolicy
from flowrl.guidance.smc import smc_guidance

__all__ = [
    "ACTION_REWARDS",
    "GuidanceResult",
    "PolicyGuide",
    "RLGuidedAdapter",
    "RLGuidedPolicy",
    "best_of_n",
    "reward_gradient_guidance",
    "smc_guidance",
]

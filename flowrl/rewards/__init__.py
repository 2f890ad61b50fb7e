"""Rewards: one protocol, a registry by name, user scripts by path, weighted sums.

    reward_fn(images, prompts, metadata) -> (rewards, info)

``registry`` holds the machinery (:class:`Reward`, :func:`register_reward`, :func:`resolve_reward`);
the other modules are the built-in rewards (JPEG size, the LAION aesthetic predictor, CLIP score,
PickScore, HPSv2, ImageReward and OCR) and ``clip``, the OpenCLIP loading they share. Reward
scripts users copy and edit live in the checkout's top-level ``rewards/`` folder and are used by path.
"""

from flowrl.rewards.registry import (
    BUILTIN_MODULES,
    Reward,
    RewardEntry,
    RewardError,
    RewardFn,
    UnknownRewardError,
    available_rewards,
    example_rewards_dir,
    register_reward,
    resolve_reward,
    validate_rewards,
)

__all__ = [
    "BUILTIN_MODULES",
    "Reward",
    "RewardEntry",
    "RewardError",
    "RewardFn",
    "UnknownRewardError",
    "available_rewards",
    "example_rewards_dir",
    "register_reward",
    "resolve_reward",
    "validate_rewards",
]

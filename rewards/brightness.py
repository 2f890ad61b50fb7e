"""An example of a user's reward script: mean image brightness.

Use it by path in a task file (``rewards: [{name: rewards/brightness.py}]``). A reward script
defines ``reward_fn(images, prompts, metadata) -> (rewards, info)`` with images (B, 3, H, W) in
[0, 1] and returns B floats, or a factory ``make_reward(**kwargs)`` that returns such a function.
"""

DIFFERENTIABLE = True


def reward_fn(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}

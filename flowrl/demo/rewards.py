"""Rewards for the digits quickstart model (``model.pretrained: digits``, see flowrl.demo.digits).

images are (B, 1, 8, 8) in [0, 1]; prompts name one digit each ("a handwritten digit 3").

- ``digit_alignment``: prompt alignment, the probability a small classifier trained on the same
  bundled data (:class:`flowrl.demo.digits.DigitClassifier`, 97% accuracy on held-out digits)
  gives the digit the prompt names, p(d(prompt) | image) in [0, 1]. Differentiable.
- ``digit_thickness``: mean ink, the average pixel value in [0, 1] (a bold digit scores higher).
  Trivial to hack (a white square scores 1), which makes it the demo of reward hacking and of
  what a KL penalty to the pre-trained model buys. Differentiable.
"""

from __future__ import annotations

import torch

from flowrl.rewards import register_reward


@register_reward("digit_alignment", differentiable=True)
def digit_alignment(device: str | torch.device = "cpu"):
    from flowrl.demo.digits import load_digit_classifier, parse_digit

    classifier = load_digit_classifier().to(device)

    def reward_fn(images, prompts, metadata):
        digits = torch.tensor([parse_digit(p) for p in prompts], device=device)  # (B,)
        probs = classifier(images.to(device)).softmax(dim=-1)  # (B, 10)
        correct = (probs.argmax(dim=-1) == digits).float()  # (B,)
        return probs.gather(1, digits[:, None]).squeeze(1), {"accuracy": correct.mean()}

    return reward_fn


@register_reward("digit_thickness", differentiable=True)
def digit_thickness():
    def reward_fn(images, prompts, metadata):
        if images.shape[1:] != (1, 8, 8):
            raise ValueError(
                f"digit_thickness scores the digits model's (B, 1, 8, 8) images, got {tuple(images.shape)}"
            )
        return images.float().mean(dim=(1, 2, 3)), {}

    return reward_fn

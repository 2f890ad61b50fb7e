"""The digits quickstart: the pre-trained model, the classifier rewards, a fine-tuning gain, the
compare-algorithms example.

The first test that needs the pre-trained digits model builds it into ``$FLOWRL_CACHE``
(scripts/test.sh sets a repo-local ``.cache``): about PRETRAIN seconds on 2 CPU cores, once;
later runs load it in a second.
"""

from pathlib import Path

import pytest
import torch

from flowrl.models.digits import digit_prompt, digits_dataset, load_digits_pipeline, parse_digit
from flowrl.models.sd import StableDiffusionAdapter
from flowrl.rewards import Reward, RewardError
from flowrl.samplers.ddim import DDIMSampler

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_pipe():
    return load_digits_pipeline()


def test_parse_digit():
    assert parse_digit("a handwritten digit 3") == 3
    assert parse_digit("A handwritten SEVEN") == 7
    assert parse_digit("digit 0, a zero") == 0
    for bad, match in [("a cat", "names no digit"), ("a 3 and a 4", r"several digits \[3, 4\]")]:
        with pytest.raises(ValueError, match=match):
            parse_digit(bad)


def test_alignment_reward_on_heldout_digits():
    """Real digits the classifier never saw: high p for their own class, low for any other."""
    images, labels = digits_dataset("heldout")
    reward = Reward([{"name": "digit_alignment"}])
    assert reward.differentiable
    right, _ = reward(images, [digit_prompt(int(d)) for d in labels])
    wrong, _ = reward(images, [digit_prompt(int(d + 1) % 10) for d in labels])
    assert right.mean() > 0.9 and (right > 0.5).float().mean() > 0.93
    assert wrong.mean() < 0.03
    # differentiable in the images
    x = images[:4].clone().requires_grad_(True)
    _, _, fn = reward.terms[0]
    fn(x, [digit_prompt(int(d)) for d in labels[:4]], [{}] * 4)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_prompt_and_bad_images_stop_with_a_clear_error():
    images, _ = digits_dataset("heldout")
    with pytest.raises(RewardError, match="'a cat' names no digit"):
        Reward([{"name": "digit_alignment"}])(images[:2], ["a handwritten digit 1", "a cat"])
    with pytest.raises(RewardError, match=r"\(B, 1, 8, 8\)"):
        Reward([{"name": "digit_alignment"}])(torch.rand(2, 3, 32, 32), ["a 1", "a 2"])


def test_thickness_reward_is_mean_ink():
    images = torch.zeros(2, 1, 8, 8)
    images[1, :, :4] = 1.0
    values, _ = Reward([{"name": "digit_thickness"}])(images, ["a 1", "a 2"])
    torch.testing.assert_close(values, torch.tensor([0.0, 0.5]))


def test_model_samples_digits_and_is_on_policy(digits_pipe):
    """The pre-trained model's DDIM(eta 1) chain re-evaluates to a ratio of exactly 1, and its
    samples are (B, 1, 8, 8) images in [0, 1]."""
    adapter = StableDiffusionAdapter(digits_pipe, finetune="full")
    assert adapter.latent_shape == (1, 8, 8)
    sampler = DDIMSampler(digits_pipe.scheduler.config, num_steps=10, eta=1.0)
    prompts = [digit_prompt(d) for d in range(10)]
    chain = sampler.sample(adapter, prompts, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(chain.log_probs).all()
    for k in range(chain.num_steps):
        new = sampler.log_prob(adapter, chain, torch.full((10,), k))
        ratio = torch.exp(new.log_prob - chain.log_probs[:, k])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    images = adapter.decode(chain.latents[:, -1])
    assert images.shape == (10, 1, 8, 8) and 0 <= images.min() and images.max() <= 1

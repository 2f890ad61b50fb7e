"""Advantages against plain reference loops."""

import numpy as np
import pytest
import torch

from flowrl.core import PerPromptStatTracker, group_advantages, leave_one_out_advantages


def test_group_advantages_match_loop():
    torch.manual_seed(0)
    rewards = torch.randn(12)
    groups = torch.tensor([5, 5, 5, 2, 2, 2, 9, 9, 9, 7, 7, 7])
    rewards[9:] = 3.0  # a group with zero variance: no signal
    adv, informative = group_advantages(rewards, groups, "group")
    for g in groups.unique():
        m = groups == g
        r = rewards[m]
        if r.std() == 0:
            assert (adv[m] == 0).all() and not informative[m].any()
        else:
            torch.testing.assert_close(adv[m], (r - r.mean()) / (r.std(unbiased=False) + 1e-4))
    adv_b, _ = group_advantages(rewards, groups, "batch")
    m = groups == 5
    torch.testing.assert_close(
        adv_b[m], (rewards[m] - rewards[m].mean()) / (rewards.std(unbiased=False) + 1e-4)
    )


def test_leave_one_out_matches_loop():
    torch.manual_seed(1)
    rewards = torch.randn(8)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = leave_one_out_advantages(rewards, groups)
    for i in range(8):
        others = [j for j in range(8) if groups[j] == groups[i] and j != i]
        torch.testing.assert_close(adv[i], rewards[i] - rewards[others].mean())
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(rewards[:3], torch.tensor([0, 0, 1]))


def test_per_prompt_stat_tracker_and_state_roundtrip():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    prompts = ["a", "a", "b"]
    adv = tracker.update(prompts, torch.tensor([1.0, 3.0, 10.0]))
    # "a" has 2 rewards -> its own stats; "b" has 1 < min_count -> batch stats
    np.testing.assert_allclose(adv[:2].numpy(), [-1.0, 1.0], atol=1e-5)
    r = np.array([1.0, 3.0, 10.0])
    np.testing.assert_allclose(adv[2].item(), (10 - r.mean()) / (r.std() + 1e-6), rtol=1e-5)
    state = tracker.state_dict()
    clone = PerPromptStatTracker()
    clone.load_state_dict(state)
    for _ in range(3):  # the buffer keeps the last 4 rewards
        tracker.update(["a"], torch.tensor([5.0]))
        clone.update(["a"], torch.tensor([5.0]))
    assert list(clone.stats["a"]) == [3.0, 5.0, 5.0, 5.0] == list(tracker.stats["a"])

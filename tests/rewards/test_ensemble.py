"""Reward ensembles against over-optimisation (Coste et al. 2024): the combined total against the
formulas written here, per-member logging, and the config checks."""

from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.rewards import Reward

REPO = Path(__file__).resolve().parents[2]


def _scripts(tmp_path):
    (tmp_path / "dark.py").write_text(
        "DIFFERENTIABLE = True\n\ndef reward_fn(images, prompts, metadata):\n    return 1 - images.amax(dim=(1, 2, 3)), {}\n"
    )
    return [str(REPO / "rewards/brightness.py"), str(tmp_path / "dark.py")]


@pytest.mark.parametrize("combine", ["sum", "mean", "wco", "uwo"])
def test_combined_total_is_the_formula(tmp_path, combine):
    names = _scripts(tmp_path)
    specs = [{"name": names[0], "weight": 2.0}, {"name": names[1], "weight": 1.0}]
    reward = Reward(specs, combine=combine, uwo_coef=0.5)
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    total, info = reward(images, [""] * 5)
    a = 2.0 * images.mean(dim=(1, 2, 3))
    b = 1 - images.amax(dim=(1, 2, 3))
    expected = {
        "sum": a + b,
        "mean": (a + b) / 2,
        "wco": torch.minimum(a, b),
        "uwo": (a + b) / 2 - 0.5 * ((a - b) / 2) ** 2,  # the population variance of two members
    }[combine]
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(info["reward/brightness"], images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(info["reward/dark"], b)
    torch.testing.assert_close(info["reward/ensemble_std"], (a - b).abs() / 2)


def test_ensembles_need_two_members(tmp_path):
    with pytest.raises(ValueError, match="at least 2 rewards"):
        Reward([{"name": _scripts(tmp_path)[0]}], combine="wco")
    with pytest.raises(ConfigError, match="list at least 2 rewards or set reward_combine=sum"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["reward_combine=uwo"])
    with pytest.raises(ConfigError, match="choose sum, mean, wco or uwo"):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), ["reward_combine=max"])

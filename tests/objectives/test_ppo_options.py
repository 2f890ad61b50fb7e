"""PPO-family options on flow chains: GRPO-Guard's RatioNorm and 1 / |dt| step weights (Wang et al.
2025, arXiv 2510.22319) and per-trajectory clipping (``ratio_scope: chain``) on a text-to-image
chain, each against the formula written out here from the network's velocity (Flow-GRPO's SDE
step by hand), the on-policy ratio exactly 1, and the config checks."""

import copy
import math
import types

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models import build_adapter
from flowrl.objectives.base import Minibatch
from flowrl.objectives.ppo import PPO, PPOOptions
from flowrl.samplers import build_sampler
from flowrl.train import plan
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a dog", "a red square", "a fox"]
A = 0.7  # the SDE's noise level


@pytest.fixture(scope="module")
def sd3_pipe():
    from flowrl.models.sd3 import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline()


def _setup(sd3_pipe, clip_range=0.05, **options):
    adapter = build_adapter(copy.deepcopy(sd3_pipe), "sd3", "lora", lora_rank=4)
    perturb_lora(adapter)
    sampler = build_sampler(
        "flow_sde", adapter.scheduler_config, 6, noise_level=A, sde_window=3, window_schedule="progressive",
        window_shift_interval=1,
    )  # fmt: skip
    sampler.set_epoch(1)  # the window: steps 1, 2, 3
    algo = types.SimpleNamespace(
        options=PPOOptions(**options),
        clip_range=clip_range,
        normalize_advantages=False,
        critic_warmup_epochs=0,
        bc_coef=0.0,
        vf_coef=0.5,
    )
    cfg = types.SimpleNamespace(algorithm=algo, train=types.SimpleNamespace(minibatch_size=5))
    chain = sampler.sample(adapter, PROMPTS, 1.0, generator=torch.Generator().manual_seed(0))
    chain.advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    objective = PPO(cfg, adapter, sampler)
    objective.prepare(chain, 0, torch.Generator())
    return adapter, sampler, chain, objective


def _by_hand(adapter, sampler, chain, k):
    """Flow-GRPO's SDE step k of every trajectory, from the network's velocity: (mean, std,
    log-prob (B,), |dt|)."""
    sig = sampler.sigmas.double()
    s, s2 = float(sig[k]), float(sig[k + 1])
    x, y = chain.latents[:, k].double(), chain.latents[:, k + 1].double()
    with torch.no_grad():
        v = adapter(
            chain.latents[:, k], sampler.model_timesteps[k].expand(len(chain)), chain.cond, 1.0
        ).double()
    sigma = A * math.sqrt(s / (1 - (float(sig[1]) if s == 1 else s)))
    dt = s2 - s
    mean = x + (v + sigma**2 / (2 * s) * (x + (1 - s) * v)) * dt
    std = sigma * math.sqrt(-dt)
    logp = (
        (-((y - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    )
    return mean, std, logp, -dt


ROWS, STEPS = torch.tensor([2, 0, 3, 1]), torch.tensor([[1, 3], [2, 1], [3, 2], [1, 2]])


def test_grpo_guard_ratio_norm_and_step_weights(sd3_pipe):
    # the normalised log-ratio is on the scale of the mean's change: a small clip range
    adapter, sampler, chain, objective = _setup(sd3_pipe, 5e-4, ratio_norm=True, step_weight="inv_dt")
    mb = Minibatch(ROWS, STEPS)
    terms = objective.loss(chain, mb, 0, torch.Generator())
    assert 1 - terms["ratio_min"] < 1e-5 and terms["ratio_max"] - 1 < 1e-5  # on-policy: exactly 1
    pairs = [(int(b), int(k)) for b, ks in zip(ROWS, STEPS) for k in ks]
    old = {k: _by_hand(adapter, sampler, chain, k) for k in (1, 2, 3)}
    perturb_lora(adapter, 0.5, seed=1)
    terms = objective.loss(chain, mb, 0, torch.Generator())
    new = {k: _by_hand(adapter, sampler, chain, k) for k in (1, 2, 3)}
    ratios, losses = [], []
    for b, k in pairs:
        (mu_old, std, lp_old, dt), (mu_new, _, lp_new, _) = old[k], new[k]
        mu_old, mu_new, lp_old, lp_new = mu_old[b], mu_new[b], lp_old[b], lp_new[b]
        # RatioNorm: (log-ratio + mean (mu_new - mu_old)^2 / (2 std^2)) * std ...
        ratio = torch.exp((lp_new - lp_old + ((mu_new - mu_old) ** 2).mean() / (2 * std**2)) * std)
        # ... which is exp(mean(eps * (mu_new - mu_old))) with eps the step's sampling noise
        eps = (chain.latents[b, k + 1].double() - mu_old) / std
        torch.testing.assert_close(ratio, torch.exp((eps * (mu_new - mu_old)).mean()), rtol=1e-6, atol=1e-9)
        adv = float(chain.advantages[b]) / dt  # GRPO-Guard's 1 / |dt| weight of the step
        losses.append(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 5e-4, 1 + 5e-4)))
        ratios.append(ratio)
    ratios = torch.stack(ratios)
    assert (ratios - 1).abs().max() > 5e-4 and (ratios - 1).abs().min() < 5e-4  # some clipped, some not
    torch.testing.assert_close(terms["loss_pg"].double(), torch.stack(losses).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["ratio_mean"].double(), ratios.mean(), rtol=1e-4, atol=1e-6)


def test_per_trajectory_clipping_on_a_flow_chain(sd3_pipe):
    """``ratio_scope: chain``: one ratio per trajectory, exp of the summed log-prob change over its
    trained steps (here MixGRPO's window 1..3, what the update's plan gives it), clipped once."""
    adapter, sampler, chain, objective = _setup(sd3_pipe, 3e-3, ratio_scope="chain")
    (mb,) = plan(chain, objective.steps, "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0))[0]
    assert mb.steps.tolist() == [[1, 2, 3]] * 4
    terms = objective.loss(chain, mb, 0, torch.Generator())
    assert 1 - terms["ratio_min"] < 1e-5 and terms["ratio_max"] - 1 < 1e-5
    old = sum(_by_hand(adapter, sampler, chain, k)[2] for k in (1, 2, 3))  # (B,) summed log-probs
    perturb_lora(adapter, 0.5, seed=1)
    terms = objective.loss(chain, mb, 0, torch.Generator())
    new = sum(_by_hand(adapter, sampler, chain, k)[2] for k in (1, 2, 3))
    ratios, losses = [], []
    for b in mb.rows.tolist():
        ratio, adv = torch.exp(new[b] - old[b]), float(chain.advantages[b])
        losses.append(torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 3e-3, 1 + 3e-3)))
        ratios.append(ratio)
    assert (torch.stack(ratios) - 1).abs().max() > 3e-3  # the clip is active
    torch.testing.assert_close(terms["loss_pg"].double(), torch.stack(losses).mean(), rtol=1e-4, atol=1e-6)


def test_config_checks():
    cfg = load_config("grpo_guard_tiny")
    assert (cfg.algorithm.options.ratio_norm, cfg.algorithm.options.step_weight) == (True, "inv_dt")
    bad = [
        (["sampler.name=flow_cps"], "sampler.cps_logprob=normalized"),
        (
            ["algorithm.ratio_scope=chain", "algorithm.timestep_fraction=1.0"],
            "set algorithm.ratio_scope=step",
        ),
        (["algorithm.step_weight=dt"], "step_weight must be 'none' or 'inv_dt'"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config("grpo_guard_tiny", overrides)
    load_config("grpo_guard_tiny", ["sampler.name=flow_cps", "sampler.cps_logprob=normalized"])
    with pytest.raises(ConfigError, match="timestep_fraction=0.5 would be ignored"):
        load_config("flow_grpo_tiny", ["algorithm.ratio_scope=chain", "algorithm.timestep_fraction=0.5"])
    with pytest.raises(ConfigError, match="step_weight=inv_dt divides by a flow step"):
        load_config("jpeg_tiny", ["algorithm.step_weight=inv_dt"])

"""The update loop's guarantees: timestep batching changes speed, not the update; non-finite
values never reach the weights (train.on_nonfinite stop | skip)."""

from pathlib import Path

import pytest
import torch

from flowrl.config import load_config
from flowrl.errors import NonFiniteError
from flowrl.run import Run
from flowrl.train import update

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.finetune=full",
    "sampler.num_steps=4",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=2",
    "train.minibatch_size=4",
    "train.eval_every=0",
    "train.save_every=0",
    "train.num_epochs=1",
    "train.async_reward=false",
    "optim.learning_rate=1e-3",
    "algorithm.clip_range=1e-2",
]


def _trainer(tmp_path, *extra, name="run"):
    cfg = load_config(
        str(REPO / "tasks/jpeg_tiny.yaml"),
        SMALL + [f"train.output_dir={tmp_path}", f"train.run_name={name}", *extra],
    )
    return Run(cfg, name)


def _epoch_gradients(trainer):
    """Sample epoch 0 and train on it with the optimizer step replaced by a recorder (so every
    minibatch sees the sampling weights): (chain, (optimizer steps, parameters) gradients, info)."""
    chain = trainer.collector.collect(0)[0]
    chain.advantages, _ = trainer.collector.advantages(chain)
    params = trainer.adapter.trainable_parameters()
    seen = []
    trainer.optimizer.step = lambda *a, **k: seen.append(torch.cat([p.grad.flatten() for p in params]))
    trainer.modules.train()
    info = update(trainer, chain, 0)
    return chain, torch.stack(seen), info


@pytest.mark.parametrize("extra", [[], ["algorithm.kl_coef=0.1", "algorithm.timestep_fraction=0.75"]])
def test_timestep_batching_gives_the_same_gradient(tmp_path, extra):
    """One step per forward (DDPO's loop), two, or all steps per forward: the same gradient at
    every optimizer step of an epoch on the same chain (up to float summation order). Gradients
    are compared, not weights after Adam, whose first step is sign-like and would turn rounding
    in near-zero gradient entries into full-size differences."""
    grads = {}
    for j in (1, 2, 0):
        _, grads[j], _ = _epoch_gradients(
            _trainer(tmp_path, f"train.timestep_batch={j}", *extra, name=f"j{j}")
        )
    assert grads[1].shape[0] == 2 and grads[1].norm() > 0
    for j in (2, 0):
        torch.testing.assert_close(grads[j], grads[1], rtol=0, atol=1e-5 * grads[1].abs().max().item())


def _nan_reward_script(tmp_path) -> Path:
    script = tmp_path / "nan_on_red.py"
    script.write_text(
        "import torch\n"
        "def reward_fn(images, prompts, metadata):\n"
        "    r = images.float().mean(dim=(1, 2, 3))\n"
        "    return torch.where(torch.tensor(['red' in p for p in prompts]), float('nan'), r), {}\n"
    )
    return script


def test_nonfinite_reward_stops_naming_epoch_term_and_prompt(tmp_path):
    trainer = _trainer(
        tmp_path, f"rewards.0.name={_nan_reward_script(tmp_path)}", "train.prompts=[a red square]"
    )
    before = [p.detach().clone() for p in trainer.adapter.trainable_parameters()]
    with pytest.raises(
        NonFiniteError, match=r"rewards \(reward/nan_on_red\).*'a red square'.*epoch 0.*on_nonfinite=skip"
    ):
        trainer.train()
    for a, b in zip(before, trainer.adapter.trainable_parameters()):
        assert torch.equal(a, b)


def test_nonfinite_skip_leaves_weights_alone_and_logs_it(tmp_path):
    trainer = _trainer(
        tmp_path,
        f"rewards.0.name={_nan_reward_script(tmp_path)}",
        "train.prompts=[a red square]",
        "train.on_nonfinite=skip",
        "train.num_epochs=2",
    )
    before = [p.detach().clone() for p in trainer.adapter.trainable_parameters()]
    history = trainer.train()
    assert [r.get("skipped_updates") for r in history] == [None, 1, 1] and trainer.global_step == 0
    assert "rewards" in history[1]["nonfinite"]
    for a, b in zip(before, trainer.adapter.trainable_parameters()):
        assert torch.equal(a, b)


def test_nonfinite_gradient_is_never_applied(tmp_path, monkeypatch):
    """A loss that turns NaN mid-epoch (a broken model, a bad learning rate) is caught at the
    optimizer step: stop raises, skip drops exactly those updates."""
    for mode in ("stop", "skip"):
        trainer = _trainer(tmp_path, f"train.on_nonfinite={mode}", name=mode)
        chain = trainer.collector.collect(0)[0]
        chain.advantages, _ = trainer.collector.advantages(chain)
        chain.advantages[0] = float("nan")  # poisons the first minibatch's loss only
        before = [p.detach().clone() for p in trainer.adapter.trainable_parameters()]
        if mode == "stop":
            with pytest.raises(NonFiniteError, match="non-finite loss at epoch 0"):
                update(trainer, chain, 0)
            for a, b in zip(before, trainer.adapter.trainable_parameters()):
                assert torch.equal(a, b)
        else:
            info = update(trainer, chain, 0)
            assert info["skipped_updates"] == 1 and trainer.global_step == 1  # the other minibatch
            assert all(torch.isfinite(p).all() for p in trainer.adapter.trainable_parameters())


def test_fp16_gradient_overflow_lowers_the_loss_scale_and_goes_on(tmp_path):
    """fp16 on CUDA trains behind accelerate's GradScaler, whose scale starts high on purpose: an
    overflowing gradient tells it to back off. That must skip the step and lower the scale (not
    stop the run as a non-finite gradient, and not leave the scaler half-way, which would make the
    next unscale raise). Here the scaler accelerate builds on CUDA is given to this CPU trainer the
    way ``Accelerator.prepare`` gives it (torch's GradScaler runs on the CPU too): its first scale
    overflows, the next one (300) does not."""
    from accelerate.optimizer import AcceleratedOptimizer

    def with_scaler(trainer):
        acc = trainer.accelerator
        acc.native_amp = True  # as on CUDA: backward scales the loss, clip_grad_norm_ unscales
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=1e-36, growth_interval=1000)
        trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, scaler=acc.scaler)
        return trainer

    fp16 = ["train.mixed_precision=fp16", "train.num_epochs=2"]
    trainer = with_scaler(_trainer(tmp_path, *fp16))
    acc = trainer.accelerator
    start = [p.detach().clone() for p in trainer.adapter.trainable_parameters()]
    history = trainer.train()  # on_nonfinite=stop: an overflow is not an error
    assert history[1]["fp16_overflow_steps"] == 1 and "fp16_overflow_steps" not in history[2]
    assert trainer.global_step == 3  # 2 epochs x 2 optimizer steps, less the overflow
    assert acc.scaler.get_scale() == pytest.approx(300.0, rel=1e-5)
    params = trainer.adapter.trainable_parameters()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(start, params))
    # the scale found is part of the checkpoint: a resumed run does not start over at 3e38
    resumed = with_scaler(_trainer(tmp_path, *fp16, name="resumed"))
    resumed._load(trainer.run_dir / "checkpoints" / "epoch_000002")
    assert resumed.accelerator.scaler.get_scale() == pytest.approx(300.0, rel=1e-5)


@pytest.mark.slow
def test_compile_changes_speed_not_the_update(tmp_path):
    """train.compile=true (torch.compile in place): the same chain, log-probs, on-policy ratio 1
    and gradient as eager, through LoRA, CFG and the KL reference (adapter disabled), with the
    parameter names checkpoints use unchanged."""
    extra = [
        "model.finetune=lora",
        "sampler.guidance_scale=3.0",
        "algorithm.kl_coef=0.1",
        "train.timestep_batch=0",
    ]
    out = {}
    for compiled in (False, True):
        trainer = _trainer(tmp_path, *extra, f"train.compile={str(compiled).lower()}", name=f"c{compiled}")
        out[compiled] = (*_epoch_gradients(trainer), sorted(trainer.adapter.trainable_state_dict()))
    (c0, g0, i0, k0), (c1, g1, i1, k1) = out[False], out[True]
    assert k1 == k0 and not any("_orig_mod" in k for k in k1)
    torch.testing.assert_close(c1.latents, c0.latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(c1.log_probs, c0.log_probs, rtol=1e-5, atol=1e-3, equal_nan=True)
    assert abs(i1["ratio_mean"] - 1) < 1e-5 and abs(i0["ratio_mean"] - 1) < 1e-5, (i0, i1)
    assert g0.norm() > 0
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-3 * g0.abs().max().item())


def _chain_with_log_probs(log_probs):
    from flowrl.chain import Chain

    B, K = log_probs.shape
    return Chain(
        latents=torch.zeros(B, K + 1, 1),
        timesteps=torch.zeros(B, K),
        next_timesteps=torch.zeros(B, K),
        log_probs=log_probs,
        cond={},
    )


def test_chain_scope_trains_the_stochastic_columns_and_rejects_ragged_rows():
    """steps "all" (a chain-scope ratio) sums log-probs over whole rows, so a deterministic step
    (NaN log-prob: LCM's, CPS's last) must be left out, and it can only be when every row has it
    at the same column."""
    from flowrl.errors import ConfigError
    from flowrl.train import plan

    lp = torch.zeros(6, 4)
    lp[:, 3] = float("nan")
    mbs = plan(_chain_with_log_probs(lp), "all", "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0))
    assert [len(f) for f in mbs] == [1, 1]
    for (mb,) in mbs:
        assert mb.steps.tolist() == [[0, 1, 2]] * len(mb.rows)
    assert sorted(torch.cat([f[0].rows for f in mbs]).tolist()) == list(range(6))
    lp[0, 3], lp[0, 0] = 0.0, float("nan")  # row 0's deterministic step elsewhere
    with pytest.raises(ConfigError, match="ratio_scope=step"):
        plan(_chain_with_log_probs(lp), "all", "trajectory", 4, 1.0, 0, 1, torch.Generator().manual_seed(0))

"""Learning-rate schedules: the multiplier against its formula, the rates the trainers really
step with, and resume under a schedule (the rate is a function of the stored step count)."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.config import ConfigError, load_config
from flowrl.core.schedule import lr_factor, set_lr
from flowrl.run import Run

REPO = Path(__file__).resolve().parents[2]


def test_warmup_is_linear_and_reaches_the_base_rate():
    assert [lr_factor(s, 100, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 100) == 1.0  # no warmup: the base rate from the first step


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_runs_from_the_base_rate_to_the_final_ratio(schedule):
    S, W, r = 11, 2, 0.1
    f = [lr_factor(s, S, W, schedule, r) for s in range(S)]
    assert f[0] == 0.5 and f[1] == f[W] == 1.0 and f[-1] == pytest.approx(r)
    assert all(a >= b for a, b in zip(f[W:], f[W + 1 :]))  # never rises after warmup
    mid = W + (S - 1 - W) // 2  # p = 1/2: halfway in both schedules
    assert f[mid] == pytest.approx(r + (1 - r) * 0.5)
    q = W + (S - 1 - W) // 4  # p = 1/4
    expected = 1 - 0.25 if schedule == "linear" else (1 + math.cos(math.pi / 4)) / 2
    assert f[q] == pytest.approx(r + (1 - r) * expected)
    assert lr_factor(S + 5, S, W, schedule, r) == pytest.approx(r)  # past the end: stays at r


def test_set_lr_scales_every_group_from_its_own_base():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 9.0}, {"params": [b], "lr": 9.0}])
    set_lr(opt, [1e-4, 1e-3], 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 5e-4]
    with pytest.raises(ValueError, match="1 base learning rates for 2 param groups"):
        set_lr(opt, [1e-4], 1.0)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr_schedule=cosin", r"did you mean 'cosine'"),
        ("optim.lr_warmup=-1", "optim.lr_warmup must be >= 0"),
        ("optim.lr_final_ratio=2", r"optim.lr_final_ratio must be in \[0, 1\]"),
    ],
)
def test_bad_schedule_stops_at_config_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(str(REPO / "tasks/jpeg_tiny.yaml"), [override])


SMALL = [
    "model.finetune=lora",
    "sampler.num_steps=3",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=2",
    "train.minibatch_size=4",  # 2 optimizer steps per epoch
    "train.num_epochs=4",
    "train.eval_every=0",
    "train.save_every=2",
    "train.async_reward=false",
    "optim.learning_rate=1e-2",
    "optim.lr_schedule=cosine",
    "optim.lr_warmup=3",
    "optim.lr_final_ratio=0.1",
]


def test_trainer_steps_with_the_scheduled_rates_and_resumes_them(tmp_path):
    cfg = load_config(str(REPO / "tasks/jpeg_tiny.yaml"), SMALL + [f"train.output_dir={tmp_path}"])
    trainer = Run(cfg, "sched")
    assert trainer.schedule_steps == 8
    used = []
    trainer.optimizer.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    history = trainer.train()
    expected = [1e-2 * lr_factor(s, 8, 3, "cosine", 0.1) for s in range(8)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[-1] == pytest.approx(1e-3) and max(used) == pytest.approx(1e-2)
    assert [row["lr"] for row in history if "lr" in row] == pytest.approx(expected[1::2], rel=1e-12)

    # drop the last checkpoint and resume from epoch 2: the same rates, the same weights
    ckpts = tmp_path / "sched" / "checkpoints"
    final = load_file(str(ckpts / "epoch_000004" / "trainable.safetensors"))
    shutil.rmtree(ckpts / "epoch_000004")
    resumed = Run(
        load_config(
            str(REPO / "tasks/jpeg_tiny.yaml"), [*SMALL, f"train.output_dir={tmp_path}", "train.resume=auto"]
        ),
        "sched",
    )
    assert resumed.start_epoch == 2 and resumed.global_step == 4
    again = []
    resumed.optimizer.optimizer.register_step_pre_hook(
        lambda opt, *_: again.append(opt.param_groups[0]["lr"])
    )
    resumed.train()
    assert again == used[4:]
    after = load_file(str(ckpts / "epoch_000004" / "trainable.safetensors"))
    for k in final:
        assert torch.equal(final[k], after[k]), k

"""Determinism: the same task and seed, run twice in one process, gives the same metrics and the
same weights. (Resumed runs are compared with uninterrupted ones in test_train.py and
test_crash_resume.py.)"""

from pathlib import Path

import torch

from flowrl.config import load_config
from flowrl.run import Run

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.finetune=lora",
    "sampler.num_steps=3",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=4",
    "train.num_epochs=2",
    "train.eval_every=0",
    "train.save_every=0",
    "optim.learning_rate=1e-2",
    "algorithm.clip_range=1e-2",
]
TIMING = ("time_", "samples_per_s")


def _run(tmp_path, name: str, seed: int) -> tuple[list[dict], dict]:
    cfg = load_config(
        str(REPO / "tasks/jpeg_tiny.yaml"),
        [*SMALL, f"train.seed={seed}", f"train.output_dir={tmp_path}", f"train.run_name={name}"],
    )
    trainer = Run(cfg)
    history = trainer.train()
    rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in history]
    return rows, {k: v.detach().clone() for k, v in trainer.adapter.trainable_state_dict().items()}


def test_same_seed_same_metrics(tmp_path):
    rows_a, w_a = _run(tmp_path, "a", seed=3)
    rows_b, w_b = _run(tmp_path, "b", seed=3)
    assert (
        len(rows_a) == 3 and rows_a == rows_b
    )  # evaluation, reward, loss, KL, clip fraction, grad norm: exact
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert all(r["grad_norm"] > 0 for r in rows_a[1:])  # it did train: the comparison is not vacuous

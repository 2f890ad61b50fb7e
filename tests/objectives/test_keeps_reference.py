"""``Objective.keeps_reference(cfg)``: each objective of a registered text-to-image method says
whether the run keeps the frozen reference copy (``model.finetune=full``), and its answer is what
one real epoch of it uses: every call of the adapter's reference policy is counted. A method that
calls it without a kept copy stops (full fine-tuning has no reference otherwise); one that keeps a
copy it never calls fails here. Robot policies ignore the answer (``build_model`` passes it only
to text-to-image adapters), so the env-only methods are not run.

Each case is one epoch (no evaluation, no checkpoint) of 4 samples of 8x8 pixels (the digits
model's 16x16) in groups of 2, 2 denoising steps."""

import pytest
from PIL import Image

from flowrl.config import load_config, tasks_dir
from flowrl.models.base import DenoiserAdapter
from flowrl.objectives import METHODS
from flowrl.run import Run
from flowrl.train import update

TINY = [
    "model.finetune=full",
    "model.tiny_image_size=8",
    "train.num_epochs=1",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=2",
    "algorithm.group_size=2",
    "algorithm.stat_min_count=1",
    "sampler.num_steps=2",
    "train.eval_every=0",
    "train.save_every=0",
    "train.torch_threads=1",
]
# each objective through one of its text-to-image methods (the others differ in defaults and
# advantages, not in what the loss calls), with every option that changes the answer both ways
CASES = {
    "ddpo-kl_coef=0": ("ddpo", ["algorithm.kl_coef=0"]),  # the PPO family
    "ddpo-kl_coef=0.04": ("ddpo", ["algorithm.kl_coef=0.04"]),
    "fpo": ("fpo", []),
    "draft": ("draft", []),  # reward backprop: a differentiable reward, the digits model's alignment
    "prdp-pretrained": ("prdp", ["algorithm.prdp_reference=pretrained"]),
    "prdp-sampling": ("prdp", ["algorithm.prdp_reference=sampling"]),
    "raft": ("raft", []),
    "find": ("find", []),
    "diffusion_nft-kl_coef=0": ("diffusion_nft", ["algorithm.kl_coef=0"]),
    "diffusion_nft-kl_coef=1e-4": ("diffusion_nft", ["algorithm.kl_coef=1e-4"]),
    "dpo": ("dpo", []),
    "d3po": ("d3po", []),
}
TASKS = {"diffusion_nft": "nft_flow_tiny.yaml", "draft": "digits_draft.yaml"}


def test_every_text_to_image_objective_has_a_case():
    """A new text-to-image objective is not left out of the check below."""
    run = {METHODS[name].objective for name, _ in CASES.values()}
    assert {m.objective for m in METHODS.values() if "text_to_image" in m.kinds} <= run


def _pairs(tmp_path) -> str:
    """Two preference pairs of random 8x8 images (Diffusion-DPO's offline data)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        for side in ("w", "l"):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}{side}.png")
        lines.append(f'{{"prompt": "a cat", "chosen": "{i}w.png", "rejected": "{i}l.png"}}')
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "pairs.jsonl")


@pytest.mark.parametrize("name, variant", CASES.values(), ids=CASES.keys())
def test_keeps_reference_is_what_the_epoch_calls(name, variant, tmp_path, monkeypatch):
    overrides = [*TINY, f"algorithm.name={name}", *variant]
    overrides += [f"train.output_dir={tmp_path}", "train.run_name=r"]
    if name == "dpo":
        overrides.append(f"train.pairs={_pairs(tmp_path)}")
    cfg = load_config(str(tasks_dir() / TASKS.get(name, "jpeg_tiny.yaml")), overrides)
    keeps = cfg.method.objective_class().keeps_reference(cfg)

    calls = []
    reference_mode = DenoiserAdapter.reference_mode

    def counted(self):
        calls.append(type(self).__name__)
        return reference_mode(self)

    monkeypatch.setattr(DenoiserAdapter, "reference_mode", counted)
    run = Run(cfg, task_name="t", progress=False)
    if cfg.model.finetune == "full":  # (FIND's denoiser is frozen: its own reference)
        assert run.adapter.has_reference == keeps
    try:  # the run's epoch without its evaluations and checkpoint: collect, advantages, update
        with run.objective.sampling(0, 0):
            chain, _ = run.collector.collect(0)
        chain.advantages, _ = run.collector.advantages(chain)
        update(run, chain, 0)
    finally:
        run.collector.close()
        run.folder.release()
    assert bool(calls) == keeps, (name, variant, keeps, len(calls))

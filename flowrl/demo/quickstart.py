"""``flowrl quickstart``: RL fine-tuning that visibly learns, in minutes on a laptop CPU.

    flowrl quickstart                       # pre-trains the digits model on first use, then fine-tunes
    flowrl quickstart --epochs 10 --out runs/qs --seed 1

1. Load the digits model (:mod:`flowrl.demo.digits`: a tiny text-to-image diffusion model of
   scikit-learn's bundled 8x8 handwritten digits), pre-training it on first use.
2. Measure prompt alignment before: for each digit d, ``samples_per_digit`` images of
   "a handwritten digit d" from a fixed seed, scored by the ``digit_alignment`` reward
   p_classifier(d | image); once with deterministic DDIM (eta 0) and once with the stochastic
   sampler the policy is trained with (eta 1). No classifier-free guidance, as in training.
3. Fine-tune with ``tasks/digits.yaml`` (DDPO) through the run shell, :class:`flowrl.run.Run`.
4. Measure again with the trained weights (the same noise, so before and after are paired), and
   write a report folder: ``report.md``, ``report.json``, ``before.png`` / ``after.png`` (one row
   per digit) and ``digits/digit_<d>.png`` (before above after), and the training run's folder
   ``finetune/`` with ``metrics.jsonl`` and ``reward_curve.png``.

Shapes: ``N`` = 10 x samples_per_digit images, (N, 1, 8, 8) in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

SAMPLES_PER_DIGIT = 20
GRID_COLUMNS = 10


@torch.no_grad()
def measure_alignment(
    adapter,
    scheduler_config: dict,
    num_steps: int,
    eta: float,
    samples_per_digit: int = SAMPLES_PER_DIGIT,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> dict:
    """Prompt alignment of ``samples_per_digit`` samples of each digit from a fixed seed.

    Returns a dict with ``alignment`` (mean p(named digit)), ``accuracy`` (classifier argmax is the
    named digit), their per-digit lists ``alignment_per_digit`` / ``accuracy_per_digit`` (10,),
    and ``images`` (N, 1, 8, 8) ordered digit by digit.
    """
    from flowrl.demo.digits import digit_prompt, load_digit_classifier
    from flowrl.samplers.ddim import DDIMSampler

    digits = torch.arange(10).repeat_interleave(samples_per_digit)  # (N,)
    prompts = [digit_prompt(int(d)) for d in digits]
    sampler = DDIMSampler(scheduler_config, num_steps, eta)
    gen = torch.Generator().manual_seed(seed)
    chain = sampler.sample(adapter, prompts, guidance_scale, generator=gen)
    images = adapter.decode(chain.latents[:, -1]).cpu()
    # the digit_alignment reward, p(named digit | image), and the classifier's accuracy
    probs = load_digit_classifier()(images).softmax(dim=-1)  # (N, 10)
    alignment = probs.gather(1, digits[:, None]).squeeze(1)  # (N,)
    correct = (probs.argmax(dim=-1) == digits).float()  # (N,)
    return {
        "alignment": alignment.mean().item(),
        "accuracy": correct.mean().item(),
        "alignment_per_digit": alignment.view(10, -1).mean(dim=1).tolist(),
        "accuracy_per_digit": correct.view(10, -1).mean(dim=1).tolist(),
        "images": images,
    }


def _digit_grid(images: torch.Tensor, rows: list[int], columns: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``columns`` images of each digit in ``rows`` (images ordered digit by digit)."""
    per_digit = images.shape[0] // 10
    picked = torch.cat([images[d * per_digit : d * per_digit + columns] for d in rows])
    labels = [f"{d}" for d in rows for _ in range(columns)]
    return picked, labels


def _write_report(out: Path, result: dict) -> str:
    """Write report.md; return the summary table (also printed)."""
    b0, a0 = result["before"]["eta0"], result["after"]["eta0"]
    b1, a1 = result["before"]["eta1"], result["after"]["eta1"]
    n = result["samples_per_digit"]
    lines = [
        "| digit | before, eta 0 | after, eta 0 | before, eta 1 | after, eta 1 |",
        "|---|---|---|---|---|",
    ]
    for d in range(10):
        cells = [r["alignment_per_digit"][d] for r in (b0, a0, b1, a1)]
        lines.append(f"| {d} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    lines.append("| **all** | " + " | ".join(f"**{r['alignment']:.3f}**" for r in (b0, a0, b1, a1)) + " |")
    lines.append("| accuracy | " + " | ".join(f"{r['accuracy']:.3f}" for r in (b0, a0, b1, a1)) + " |")
    table = "\n".join(lines)
    t = result["train"]
    md = f"""# flowrl quickstart: DDPO on the digits model

Prompt alignment = p_classifier(named digit | image), the `digit_alignment` reward, averaged over
{n} samples per digit of "a handwritten digit d" (10 DDIM steps, no guidance, seed {result["seed"]};
the same noise before and after). eta 0 is deterministic DDIM; eta 1 is the stochastic sampler
the policy is trained with. Accuracy: the classifier's top class is the named digit.

{table}

Fine-tuning: {t["algorithm"]}, {t["epochs"]} epochs of {t["samples_per_epoch"]} samples, {t["seconds"]:.0f} s
({result["device"]}). Training reward (mean alignment of each epoch's samples): {t["reward_first"]:.3f} at
epoch 0 -> {t["reward_last"]:.3f} at the last epoch.

![reward curve](finetune/reward_curve.png)

Before (eta 0, one row per digit):

![before](before.png)

After:

![after](after.png)

Per digit, before (top) and after (bottom): `digits/digit_<d>.png`. Numbers: `report.json`.
Training run (metrics.jsonl, checkpoints, evaluation grids): `finetune/`.
"""
    (out / "report.md").write_text(md)
    return table


def run(epochs: int | None = None, out: str | os.PathLike | None = None, seed: int = 0) -> dict:
    """Pre-train or load the digits model, measure, fine-tune, measure, write the report folder.

    Args:
        epochs: training epochs (None: as ``tasks/digits.yaml`` says).
        out: report folder (None: ``runs/quickstart-<date>-<time>``); must not exist yet.
        seed: training seed and evaluation-noise seed.

    Returns the numbers written to ``report.json``.
    """
    from flowrl.config import load_config, tasks_dir
    from flowrl.demo.digits import load_digits_pipeline
    from flowrl.report import save_image_grid
    from flowrl.run import Run

    out = Path(out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"quickstart: report folder {out} already exists and is not empty; pass another --out"
        )
    start = time.perf_counter()
    load_digits_pipeline()  # pre-trains on first use (with a progress bar), so the run only loads
    overrides = [f"train.output_dir={out}", "train.run_name=finetune", f"train.seed={seed}"]
    if epochs is not None:
        overrides.append(f"train.num_epochs={epochs}")
    cfg = load_config(str(tasks_dir() / "digits.yaml"), overrides)
    trainer = Run(cfg, task_name="digits")
    adapter, s = trainer.adapter, cfg.sampler
    config = trainer.adapter.scheduler_config

    def measure() -> dict:
        return {
            f"eta{eta:g}": measure_alignment(adapter, config, s.num_steps, eta, seed=seed + 1000)
            for eta in (0.0, 1.0)
        }

    print("measuring alignment before fine-tuning ...")
    before = measure()
    t0 = time.perf_counter()
    history = [r for r in trainer.train() if "reward_mean" in r]  # the training epochs' rows
    train_seconds = time.perf_counter() - t0
    with trainer.ema_weights():
        print("measuring alignment after fine-tuning ...")
        after = measure()

    cols = GRID_COLUMNS
    for name, result in (("before", before), ("after", after)):
        images, labels = _digit_grid(result["eta0"]["images"], list(range(10)), cols)
        save_image_grid(images, out / f"{name}.png", labels=labels, ncol=cols)
    for d in range(10):
        b, _ = _digit_grid(before["eta0"]["images"], [d], cols)
        a, _ = _digit_grid(after["eta0"]["images"], [d], cols)
        save_image_grid(torch.cat([b, a]), out / "digits" / f"digit_{d}.png", ncol=cols)

    strip = lambda r: {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in r.items()}  # noqa: E731
    result = {
        "seed": seed,
        "samples_per_digit": SAMPLES_PER_DIGIT,
        "device": str(trainer.device),
        "before": strip(before),
        "after": strip(after),
        "train": {
            "algorithm": cfg.algorithm.name,
            "epochs": cfg.train.num_epochs,
            "samples_per_epoch": cfg.train.sample_batch_size * cfg.train.num_batches_per_epoch,
            "seconds": round(train_seconds, 1),
            "reward_first": history[0]["reward_mean"],
            "reward_last": history[-1]["reward_mean"],
            "reward_per_epoch": [round(r["reward_mean"], 4) for r in history],
        },
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _write_report(out, result)
    shutil.copy(trainer.run_dir / "reward_curve.png", out / "reward_curve.png")
    print(f"\nprompt alignment p(named digit), {SAMPLES_PER_DIGIT} samples per digit, seed {seed}:\n")
    print(table)
    b, a = before["eta0"]["alignment"], after["eta0"]["alignment"]
    print(
        f"\nalignment (deterministic DDIM) {b:.3f} -> {a:.3f} after {train_seconds:.0f} s of {cfg.algorithm.name}"
    )
    print(f"report: {out / 'report.md'}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: as tasks/digits.yaml says)")
    parser.add_argument("--out", help="report folder (default: runs/quickstart-<date>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="training and evaluation seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(
        argparse.ArgumentParser(prog="flowrl quickstart", description=__doc__.splitlines()[0])
    ).parse_args(argv)
    run(args.epochs, args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

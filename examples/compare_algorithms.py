"""DDPO, GRPO, LOOP and REINFORCE on the digits task, at equal reward queries.

python examples/compare_algorithms.py                  # about 2.5 minutes on 2 CPU cores (15 epochs each)
python examples/compare_algorithms.py --epochs 2 --out /tmp/compare

Every algorithm fine-tunes the same pre-trained digits model (tasks/digits.yaml) with the same
samples per epoch and the same epochs, so each makes the same number of reward queries. GRPO
and LOOP draw 8 samples per prompt (8 prompts per epoch); DDPO and REINFORCE one per prompt.
Writes compare.png (mean reward of each epoch's samples against cumulative reward queries),
table.md and one run folder per algorithm, and prints the table. "alignment, eta 0" is the
prompt alignment of 20 deterministic samples per digit after training (before: the first row).
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flowrl.config import load_config, tasks_dir  # noqa: E402
from flowrl.demo.quickstart import measure_alignment  # noqa: E402
from flowrl.run import Run  # noqa: E402

ALGORITHMS = {
    "ddpo": ["algorithm.name=ddpo"],
    "grpo": ["algorithm.name=grpo", "algorithm.group_size=8"],
    "loop": ["algorithm.name=loop", "algorithm.group_size=8"],
    "reinforce": ["algorithm.name=reinforce"],
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per algorithm")
    parser.add_argument("--out", default=f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    args = parser.parse_args()
    out = Path(args.out)

    rows, curves = [], {}
    for name in args.algorithms:
        overrides = ALGORITHMS[name] + [
            f"train.num_epochs={args.epochs}",
            f"train.seed={args.seed}",
            f"train.output_dir={out}",
            f"train.run_name={name}",
            "train.eval_every=0",
            "train.save_every=0",
        ]
        cfg = load_config(str(tasks_dir() / "digits.yaml"), overrides)
        trainer = Run(cfg, task_name=name)
        if not rows:  # the shared starting point, measured once
            before = measure_alignment(
                trainer.adapter, trainer.adapter.scheduler_config, cfg.sampler.num_steps, 0.0
            )
        start = time.perf_counter()
        history = [r for r in trainer.train() if "reward_mean" in r]  # the epochs' rows
        seconds = time.perf_counter() - start
        after = measure_alignment(
            trainer.adapter, trainer.adapter.scheduler_config, cfg.sampler.num_steps, 0.0
        )
        queries, total = [], 0
        for r in history:
            total += r["samples"]
            queries.append(total)
        curves[name] = (queries, [r["reward_mean"] for r in history])
        last = history[-3:]
        rows.append(
            (
                name,
                history[0]["reward_mean"],
                sum(r["reward_mean"] for r in last) / len(last),
                after["alignment"],
                total,
                seconds,
            )
        )

    header = "| algorithm | reward, epoch 0 | reward, last 3 epochs | alignment, eta 0 | reward queries | seconds |"
    lines = [header, "|---|---|---|---|---|---|", f"| (before) | | | {before['alignment']:.3f} | 0 | |"]
    lines += [f"| {n} | {r0:.3f} | {r1:.3f} | {al:.3f} | {q} | {s:.0f} |" for n, r0, r1, al, q, s in rows]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    ax.set_xlabel("reward queries (samples scored)")
    ax.set_ylabel("mean alignment of the epoch's samples")
    ax.set_title(f"digits, {args.epochs} epochs, seed {args.seed}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    print(table)
    print(f"plot: {out / 'compare.png'}")

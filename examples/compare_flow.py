"""The flow-model learning-efficiency benchmark: the flow-only objectives on the tiny SD3-style
transformer with the JPEG-compressibility reward, at equal reward queries and at equal wall-clock.

python examples/compare_flow.py                                   # every method: 43 min wall on a heavily loaded 2-core CPU
python examples/compare_flow.py --methods flow_grpo nft --queries 64 --out /tmp/compare_flow
python examples/compare_flow.py --replot --out runs/compare_flow  # table and plot from results.json

Every method fine-tunes the same tiny transformer (built from config with a fixed seed, no download)
from its ready task file (``tasks/*_tiny.yaml``, the method's own defaults), for the epochs that
make ``--queries`` reward queries (samples scored). The common overrides: ``--eval-prompts``
evaluation images, ``sampler.eval_num_steps=12`` (every method evaluated by the same 12-step Euler
ODE from the same fixed noise, after every epoch), and for Flow-GRPO (``tasks/flow_grpo_tiny.yaml``,
whose LoRA rank 8 at lr 3e-3 gains within noise on this random model) the full fine-tuning, lr 1e-2
and 16 samples per epoch of the other tiny tasks. Wall-clock is the sum of the epochs' sampling and
update time (evaluation excluded).

The table gives, for each method, the held-out (ODE) reward at equal queries and at equal seconds,
and the time to first reach the evaluation reward Flow-GRPO reaches at the end of its run, as a
ratio to Flow-GRPO's time. Writes ``compare_flow.png``, ``table.md``, ``results.json`` and one run
folder per method to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flowrl.efficiency import table  # noqa: E402

# method -> (task file under tasks/, overrides)
METHODS = {
    "flow_grpo": (
        "flow_grpo_tiny.yaml",
        ["model.finetune=full", "optim.learning_rate=1.0e-2", "train.num_batches_per_epoch=1"],
    ),
    "mixgrpo": ("mixgrpo_tiny.yaml", []),
    "mixgrpo_flash": ("mixgrpo_flash_tiny.yaml", []),
    "nft": ("nft_flow_tiny.yaml", []),
    "fpo": ("fpo_flow_tiny.yaml", []),
    "step_critic": ("acflow_tiny.yaml", []),
}
BASELINE = "flow_grpo"


def run_method(name: str, args, out: Path) -> dict:
    """Train one method for ``args.queries`` reward queries; returns its curves."""
    from flowrl.config import load_config, tasks_dir
    from flowrl.run import Run

    task, overrides = METHODS[name]
    cfg = load_config(str(tasks_dir() / task), overrides)
    per_epoch = cfg.train.sample_batch_size * cfg.train.num_batches_per_epoch
    epochs = max(1, math.ceil(args.queries / per_epoch))
    prompts = cfg.train.prompts
    from flowrl.data.prompts import load_prompts

    pool = load_prompts(prompts)
    eval_prompts = [pool[i % len(pool)] for i in range(args.eval_prompts)]
    overrides = [
        *overrides,
        f"train.num_epochs={epochs}",
        f"train.seed={args.seed}",
        f"train.output_dir={out}",
        f"train.run_name={name}",
        "train.eval_every=1",
        "train.save_every=0",
        "sampler.eval_num_steps=12",
        "train.eval_prompts=" + json.dumps(eval_prompts),
    ]
    run = Run(load_config(str(tasks_dir() / task), overrides), task_name=name, progress=not args.quiet)
    history = run.train()
    queries, seconds, reward, held = [0], [0.0], [None], []
    for row in history:
        if "reward_mean" in row:
            queries.append(queries[-1] + row.get("samples", per_epoch))
            seconds.append(seconds[-1] + row["time_collect"] + row["time_update"])
            reward.append(row["reward_mean"])
        held.append(row["eval_reward_mean"])
    return {"queries": queries, "seconds": seconds, "reward": reward, "eval": held}


def plot(curves: dict, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    colors = plt.get_cmap("tab10").colors
    for i, (name, c) in enumerate(curves.items()):
        style = {"color": colors[i % 10], "marker": "os^vD"[i % 5], "ms": 3, "lw": 1.2, "label": name}
        axes[0].plot(c["queries"], c["eval"], **style)
        axes[1].plot(c["seconds"], c["eval"], **style)
        axes[2].plot(c["queries"][1:], c["reward"][1:], **style)
    labels = ("reward queries (samples scored)", "seconds (sampling + update)", "reward queries")
    ylabels = ("evaluation reward (12-step ODE)", "evaluation reward (12-step ODE)", "training batch reward")
    for ax, xl, yl in zip(axes, labels, ylabels):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=128, help="reward queries per method (8 epochs of 16)")
    parser.add_argument("--eval-prompts", type=int, default=16, help="evaluation images per evaluation")
    parser.add_argument("--out", default=f"runs/compare_flow-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--replot", action="store_true", help="only table and plot from --out's results.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {sorted(METHODS)}")
    if args.replot:
        curves = json.loads((out / "results.json").read_text())
    else:
        curves = {}
        for name in args.methods:
            curves[name] = run_method(name, args, out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(curves))  # each finished method kept
    text = table(
        curves,
        "eval",
        BASELINE,
        "Flow-GRPO",
        "eval reward before",
        "Flow-GRPO's final evaluation reward (the target): {} (JPEG kB, negated)",
        digits=4,
        per_epoch=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    queries = max(c["queries"][-1] for c in curves.values())
    plot(
        curves,
        out / "compare_flow.png",
        f"tiny SD3-style flow model, JPEG reward, {queries} queries, seed {args.seed}",
    )
    print(text)
    print(f"plot: {out / 'compare_flow.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

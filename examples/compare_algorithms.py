"""The learning-efficiency benchmark: every objective on the digits task, at equal reward queries
and at equal wall-clock, with held-out alignment.

python examples/compare_algorithms.py                                  # every method, ~30 min on 2 CPU cores
python examples/compare_algorithms.py --methods ddpo draft raft --queries 640 --out /tmp/compare
python examples/compare_algorithms.py --held-out-only                  # the reward-hacking panel alone

Every method fine-tunes the same pre-trained digits model from its ready task file
(``tasks/digits*.yaml``, the method's own defaults), for the number of epochs that makes
``--queries`` reward queries (samples scored). After every epoch the run's own evaluation scores
a fixed, held-out set of deterministic samples (DDIM eta 0, ``--eval-samples`` per digit, a seed
no training batch uses): that is the *alignment* of the curves. Wall-clock is the sum of the
epochs' sampling and update time (evaluation excluded), so the methods are compared at equal
compute as well as at equal queries.

The target a user cares about is wall-clock to a reward level: the table gives, for each method,
the time to first reach the held-out alignment that DDPO (``tasks/digits.yaml``, its published
defaults) reaches at the end of its run, and that time as a ratio to DDPO's. Held-out evaluation
against reward hacking: ``--held-out`` methods also train on ``digit_thickness`` (mean ink) while
the held-out alignment is logged (weight 0, never optimized); their curves are the second row of
the plot.

Writes to ``--out``: ``compare.png`` (reward and held-out alignment against queries and against
seconds; the thickness runs below), ``table.md``, ``results.json`` and one run folder per method.
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

from flowrl.config import load_config, tasks_dir  # noqa: E402
from flowrl.demo.digits import digit_prompt  # noqa: E402
from flowrl.efficiency import table  # noqa: E402
from flowrl.run import Run  # noqa: E402

# method -> (task file under tasks/, overrides): each method from its ready task file
METHODS = {
    "ddpo": ("digits.yaml", []),
    "grpo": ("digits.yaml", ["algorithm.name=grpo", "algorithm.group_size=8"]),
    "loop": ("digits.yaml", ["algorithm.name=loop", "algorithm.group_size=8"]),
    "reinforce": ("digits.yaml", ["algorithm.name=reinforce"]),
    "draft": ("digits_draft.yaml", []),
    "draft-lv": ("digits_draft_lv.yaml", []),
    "fpo": ("digits.yaml", ["algorithm.name=fpo"]),
    "raft": ("digits_raft.yaml", []),
    "prdp": ("digits_prdp.yaml", []),
    "d3po": ("digits_d3po.yaml", []),
    "dpo": ("digits_dpo.yaml", []),  # offline: its task's epochs over a pairs file of 80 scored samples
    "find": ("digits_find.yaml", []),
    "texforce": ("digits_texforce.yaml", []),
}
HELD_OUT = ["ddpo", "draft", "raft"]
OFFLINE = {"dpo": 80}  # method -> the reward queries that made its pairs file (8 samples per digit)
ALIGNMENT = "digit_alignment"


def run_method(name: str, task: str, overrides: list[str], args, out: Path, tag: str, queries: int) -> dict:
    """Train one method for ``queries`` reward queries; returns its curves."""
    cfg = load_config(str(tasks_dir() / task), overrides)
    per_epoch = cfg.train.sample_batch_size * cfg.train.num_batches_per_epoch
    epochs = max(1, math.ceil(queries / per_epoch))
    eval_prompts = [digit_prompt(d) for d in range(10) for _ in range(args.eval_samples)]
    if name in OFFLINE:  # the pairs file is made (and scored) once; the task's own epochs train on it
        from flowrl.data.pairs import digits_pairs

        pairs = out / "pairs" / "digits.jsonl"
        if not pairs.exists():
            digits_pairs(pairs)
        overrides, epochs = [*overrides, f"train.pairs={pairs}"], cfg.train.num_epochs
    overrides = [
        *overrides,
        f"train.num_epochs={epochs}",
        f"train.seed={args.seed}",
        f"train.output_dir={out}",
        f"train.run_name={tag}",
        "train.eval_every=1",
        "train.save_every=0",
        "train.eval_prompts=" + json.dumps(eval_prompts),
    ]
    if "thickness" in tag:  # train on ink; alignment is the held-out reward (weight 0)
        overrides.append("rewards=[{name: digit_thickness}, {name: " + ALIGNMENT + ", weight: 0.0}]")
    cfg = load_config(str(tasks_dir() / task), overrides)
    run = Run(cfg, task_name=tag, progress=not args.quiet)
    history = run.train()
    queries, seconds, reward, alignment = [0], [0.0], [None], []
    for row in history:
        if "reward_mean" in row or (name in OFFLINE and row["epoch"] > 0):
            queries.append(OFFLINE[name] if name in OFFLINE else queries[-1] + row.get("samples", per_epoch))
            seconds.append(seconds[-1] + row["time_collect"] + row["time_update"])
            reward.append(row.get("reward_mean"))
        key = (
            f"eval_reward/{ALIGNMENT}_mean" if f"eval_reward/{ALIGNMENT}_mean" in row else "eval_reward_mean"
        )
        alignment.append(row[key])
    return {"queries": queries, "seconds": seconds, "reward": reward, "alignment": alignment}


def plot(curves: dict, held: dict, path: Path, title: str) -> None:
    rows = 2 if held else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), dpi=100, squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for i, (name, c) in enumerate(curves.items()):
        for j, axis in enumerate(("queries", "seconds")):
            style = {"color": colors[i % 20], "marker": "os^vD"[i % 5], "ms": 2.5, "lw": 1.2}
            axes[0][j].plot(c[axis], c["alignment"], label=name, **style)
    for j, axis in enumerate(("reward queries (samples scored)", "seconds (sampling + update)")):
        axes[0][j].set_xlabel(axis)
        axes[0][j].set_ylabel("held-out alignment (eta 0)")
    axes[0][0].set_title("trained on alignment: held-out alignment")
    for name, c in held.items():
        axes[1][0].plot(c["queries"][1:], c["reward"][1:], marker="o", ms=2, label=f"{name}: ink (trained)")
        axes[1][1].plot(c["queries"], c["alignment"], marker="o", ms=2, label=f"{name}: alignment (held out)")
    if held:
        axes[1][0].set_title("trained on ink (digit_thickness)")
        axes[1][1].set_title("the same runs: held-out alignment")
        for ax in axes[1]:
            ax.set_xlabel("reward queries (samples scored)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queries", type=int, default=1920, help="reward queries per method (DDPO's 30 epochs)"
    )
    parser.add_argument("--eval-samples", type=int, default=10, help="held-out samples per digit")
    parser.add_argument("--out", default=f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=None, help=f"of {', '.join(METHODS)}")
    parser.add_argument("--held-out", nargs="*", default=HELD_OUT, help="methods also trained on ink")
    parser.add_argument("--held-out-only", action="store_true", help="only the ink runs")
    parser.add_argument("--held-out-queries", type=int, default=960, help="reward queries of each ink run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--replot", action="store_true", help="only re-write table and plot from --out's results.json"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    available = {n: m for n, m in METHODS.items() if (tasks_dir() / m[0]).exists()}
    methods = args.methods or list(available)
    unknown = [m for m in methods + list(args.held_out) if m not in available]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {sorted(available)}")

    curves, held = {}, {}
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        curves, held = saved["alignment_task"], saved["thickness_task"]
        args.queries = max((c["queries"][-1] for c in curves.values()), default=args.queries)
    elif not args.held_out_only:
        for name in methods:
            curves[name] = run_method(name, *available[name], args, out, name, args.queries)
    for name in [] if args.replot else args.held_out:
        held[name] = run_method(name, *available[name], args, out, f"{name}-thickness", args.held_out_queries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"alignment_task": curves, "thickness_task": held}))
    note = "DDPO's final held-out alignment (the target): {}"
    text = (
        table(curves, "alignment", "ddpo", "DDPO", "alignment before", note, offline=tuple(OFFLINE))
        if curves
        else ""
    )
    if held:
        text += "\n\nTrained on ink, held-out alignment (reward hacking):\n\n| method | ink before | ink final | alignment before | alignment final |\n|---|---|---|---|---|\n"
        text += "\n".join(
            f"| {n} | {c['reward'][1]:.3f} | {c['reward'][-1]:.3f} | {c['alignment'][0]:.3f} | {c['alignment'][-1]:.3f} |"
            for n, c in held.items()
        )
    (out / "table.md").write_text(text + "\n")
    plot(
        curves,
        held,
        out / "compare.png",
        f"digits, {args.queries} reward queries per method, seed {args.seed}",
    )
    print(text)
    print(f"plot: {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

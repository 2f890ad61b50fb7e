"""Does inference-time guidance raise a robot policy's return? (issue 17)

Every guide of ``flowrl evaluate --guide`` on the BC policy of a task, against the unguided BC
policy, on the same fixed evaluation seeds: deterministic evaluation (``flowrl.envs.rollouts.
evaluate``), each row one ``flowrl evaluate`` call through ``flowrl.cli.main`` in this process.

    python bench/bench_robot_guidance.py --work /tmp/guidance_bench            # InvertedPendulum
    python bench/bench_robot_guidance.py --work W --finetune RUN/checkpoints/epoch_000010   # + rlg rows

1. ``flowrl pretrain TASK pretrain.output_dir=W/bc`` (reused when W/bc/policy.json exists);
2. for each row and each evaluation seed s in ``--seeds``: ``flowrl evaluate TASK
   pretrain.output_dir=W/bc --episodes E --seed s <row's options> --out W/<row>_<s>.json``;
3. a markdown table (mean return over all E x seeds episodes, the per-seed means, the change
   against the unguided BC policy and its 95% interval from the per-episode paired differences)
   to stdout and W/table_TAG.md, every row's command in W/commands_TAG.txt.

One process, one torch thread (``train.torch_threads=1``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

# name -> options of flowrl evaluate (the guide and its settings)
ROWS = {
    "none": [],
    "best-of-n simulated_return, penalty 10": [
        "--guide", "best-of-n", "--reward", "simulated_return", "--reward-kwargs", '{"termination_penalty": 10}'
    ],
    "best-of-n simulated_return, state_cost [0,10,0,1]": [
        "--guide", "best-of-n", "--reward", "simulated_return",
        "--reward-kwargs", '{"termination_penalty": 10, "state_cost": [0, 10, 0, 1]}',
    ],
    "best-of-n simulated_return, state_cost [1,1,.1,.1]": [
        "--guide", "best-of-n", "--reward", "simulated_return",
        "--reward-kwargs", '{"termination_penalty": 10, "state_cost": [1, 1, 0.1, 0.1]}',
    ],
    "best-of-n lqr_value": ["--guide", "best-of-n", "--reward", "lqr_value"],
    "smc lqr_value": ["--guide", "smc", "--reward", "lqr_value"],
    "reward-grad lqr_value": ["--guide", "reward-grad", "--reward", "lqr_value"],
    "reward-grad lqr_value, scale 0.1": ["--guide", "reward-grad", "--reward", "lqr_value", "--guide-scale", "0.1"],
    "reward-grad lqr_value, through the model (DPS)": [
        "--guide", "reward-grad", "--reward", "lqr_value", "--through-model"
    ],
}  # fmt: skip


def interval95(d: np.ndarray) -> float:
    """Half-width of the 95% Student-t interval of the mean of ``d``."""
    from scipy import stats

    return (
        float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        if len(d) > 1
        else float("nan")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="robot_inverted_pendulum_reinflow")
    ap.add_argument("--work", required=True, help="folder for the BC policy, the results and the table")
    ap.add_argument(
        "--seeds", default="0,100,200", help="evaluation seeds (each: --episodes reset seeds from it)"
    )
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--rows", help="row names separated by | (default: all); see ROWS")
    ap.add_argument("--set", nargs="*", default=[], help="task overrides for pretrain and every evaluation")
    ap.add_argument(
        "--finetune",
        help="a fine-tuned checkpoint: adds its row and the rlg rows (w 0.5, 2; base the BC policy)",
    )
    ap.add_argument(
        "--tag", default="all", help="names this call's table_TAG.md, commands_TAG.txt, results_TAG.json"
    )
    ap.add_argument("--extra", action="append", default=[], help="NAME=OPTIONS: one more row, shlex-split")
    args = ap.parse_args()

    from flowrl.cli import main as cli

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = [args.task, *args.set, f"pretrain.output_dir={work / 'bc'}", "train.torch_threads=1"]
    if not (work / "bc" / "policy.json").is_file():
        t0 = time.perf_counter()
        assert cli(["pretrain", *common]) == 0
        print(f"BC policy in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = dict(ROWS) if not args.rows else {k: ROWS[k] for k in args.rows.split("|")}
    if args.finetune:
        rows["fine-tuned"] = ["--policy", args.finetune]
        for w in ("0.5", "2"):
            rows[f"rlg w {w}"] = ["--policy", args.finetune, "--guide", "rlg", "--rlg-weight", w]
    for spec in args.extra:
        name, _, opts = spec.partition("=")
        rows[name] = shlex.split(opts)
    seeds = [int(s) for s in args.seeds.split(",")]
    results, commands = {}, []
    for name, opts in rows.items():
        per_seed, t0 = [], time.perf_counter()
        for s in seeds:
            out = work / f"{name.replace(' ', '_').replace(',', '').replace('/', '')}_{s}.json"
            argv = ["evaluate", *common, "--episodes", str(args.episodes), "--seed", str(s), *opts]
            commands.append("flowrl " + shlex.join(argv))
            if not out.is_file():
                assert cli([*argv, "--out", str(out)]) == 0, name
            per_seed.append(json.loads(out.read_text())["returns"])
        results[name] = {"returns": per_seed, "seconds": time.perf_counter() - t0}
        print(f"{name}: {np.mean(per_seed):.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = np.concatenate(results["none"]["returns"]) if "none" in results else None
    lines = [
        f"| guide ({args.task}, {len(seeds)} x {args.episodes} episodes) | mean return | per seed | "
        "change vs none (95% interval) | seconds |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        flat = np.concatenate(r["returns"])
        change = ""
        if base is not None and name != "none":
            d = flat - base
            change = f"{d.mean():+.1f} (+- {interval95(d):.1f})"
        per = " / ".join(f"{np.mean(x):.0f}" for x in r["returns"])
        lines.append(f"| {name} | {flat.mean():.1f} | {per} | {change} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (work / f"table_{args.tag}.md").write_text(table + "\n")
    (work / f"commands_{args.tag}.txt").write_text("\n".join(commands) + "\n")
    (work / f"results_{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())

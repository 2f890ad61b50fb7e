"""ReinFlow vs DPPO on the same robot task, side by side: wall-clock seconds and environment steps
to first reach the same deterministic evaluation return, from BC policies cloned from the same
demonstrations.

For one environment (default InvertedPendulum-v5, the tests' smoke task) the two task files are
the library's own: ``tasks/robot_*_reinflow.yaml`` (flow policy, ReinFlow) and
``tasks/robot_*_dppo.yaml`` (diffusion policy, DPPO) with that ``env.id``; ``--task-pair`` names
them explicitly. Then:

1. the demonstrations are generated once (the ReinFlow task's ``demos`` section, the scripted
   expert) and both tasks clone them (``demos.path``), so both BC policies see the same data;
2. per algorithm, ``flowrl.pretrain.pretrain`` (timed on its own, evaluation excluded) and
   ``flowrl.run.Run.train`` for ``--iterations`` epochs with the deterministic evaluation
   (``env.eval_episodes`` episodes on the fixed seeds ``train.eval_seed + i``) every
   ``--eval-every`` epochs and at epoch 0 (the BC policy);
3. from the trainer's metrics rows: cumulative env steps and cumulative training seconds
   (rollout + PPO update: ``time_collect + time_update``; evaluation, plotting and checkpoints
   are excluded), and the first evaluation reaching the target return (default 90% of the task's
   ``env.success_return``, the episode cap on the pendulum; or ``--target``).

Each task keeps its own hyperparameters (network size, minibatches, samplers: ReinFlow K = 4 flow
steps, DPPO T = 20 DDPM steps of which K = 10 are fine-tuned); both tasks must collect the same env
steps per iteration for the env-step axis to be a like-for-like budget (the script says if not).
The seconds-to-target is only as fine as ``--eval-every``. One torch thread (``--threads``).

    python bench/bench_robot_algos.py                       # InvertedPendulum-v5, ~3-6 min on 1 core
    python bench/bench_robot_algos.py --iterations 15 --seed 1
    python bench/bench_robot_algos.py --seeds 0,1,2                # 3 seeds: mean +- 95% interval
    python bench/bench_robot_algos.py --task-pair robot_double_pendulum_reinflow my_double_pendulum_dppo.yaml
    python bench/bench_robot_algos.py --task-pair robot_double_pendulum_reinflow robot_double_pendulum_reinflow \\
        --set-dppo model.family=diffusion_policy algorithm.name=dppo algorithm.ratio_scope=step \\
        algorithm.denoising_discount=0.99 train.minibatch_size=2000

Writes ``--out`` (default bench/out): ``robot_algos_<env>.md`` (the table), ``.json`` (the curves)
and ``.png`` (evaluation return against env steps and against training seconds, both
algorithms), plus the demonstrations, BC policies and run folders under ``<out>/<env>/``.
With ``--seeds 0,1,2`` every seed runs both algorithms (one table each, the same demonstrations),
and an aggregate table gives, per algorithm, the mean and 95% t interval over seeds
(``flowrl.seeds.mean_interval``) of the final return and of the env steps and training seconds
to the target (over the seeds that reached it); the plot shows the seeds' mean curves.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALGOS = ("reinflow", "dppo")


def find_task_pair(env_id: str) -> tuple[str, str]:
    """The first ``tasks/robot_*.yaml`` of each algorithm whose ``env.id`` is ``env_id``."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "tasks").glob("robot_*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        env = (data.get("env") or {}).get("id", "InvertedPendulum-v5")
        algo = (data.get("algorithm") or {}).get("name", "reinflow")
        if env == env_id and algo in ALGOS and not (data.get("clip_reward") or {}).get("enabled"):
            found.setdefault(algo, path.stem)
    missing = [a for a in ALGOS if a not in found]
    if missing:
        raise SystemExit(
            f"no {' or '.join(missing)} task file in {ROOT / 'tasks'} has env.id {env_id} "
            f"(found: {found or 'none'}); pass --task-pair REINFLOW_TASK DPPO_TASK, e.g. the ReinFlow file "
            "twice with --set-dppo model.family=diffusion_policy algorithm.name=dppo algorithm.ratio_scope=step ..."
        )
    return found["reinflow"], found["dppo"]


def first_reach(rows: list[dict], target: float) -> dict | None:
    """The first evaluated row whose mean evaluation return is >= target."""
    for r in rows:
        if r.get("eval_return_mean") is not None and r["eval_return_mean"] >= target:
            return r
    return None


def run_algo(algo: str, task: str, overrides: list[str], work: Path) -> dict:
    """BC-pretrain then fine-tune one algorithm through the library; its curve and timings."""
    from flowrl.config import load_config
    from flowrl.pretrain import pretrain
    from flowrl.run import Run

    cfg = load_config(
        task,
        [
            f"pretrain.output_dir={work / f'bc_{algo}'}",
            "pretrain.eval_episodes=0",  # the BC policy is evaluated as the run's epoch 0
            f"train.output_dir={work / 'runs'}",
            f"train.run_name={algo}",
            *overrides,
        ],
    )
    if cfg.algorithm.name != algo:
        raise SystemExit(f"task {task} runs algorithm.name={cfg.algorithm.name}, expected {algo}")
    print(f"[{algo}] behavior cloning ({task}: {cfg.pretrain.steps} steps) ...", flush=True)
    t0 = time.perf_counter()
    bc = pretrain(cfg, task, progress=False)
    bc_wall = time.perf_counter() - t0
    shutil.rmtree(work / "runs" / algo, ignore_errors=True)  # this script's own previous run
    print(f"[{algo}] fine-tuning {cfg.train.num_epochs} epochs ...", flush=True)
    trainer = Run(cfg, task, progress=False)
    t0 = time.perf_counter()
    rows = trainer.train()
    total_wall = time.perf_counter() - t0
    seconds, curve = 0.0, []
    for r in rows:
        seconds += r.get("time_collect", 0.0) + r.get("time_update", 0.0)
        r["train_seconds"] = seconds
        if r.get("eval_return_mean") is not None:
            curve.append(
                {
                    "iteration": r["epoch"],
                    "env_steps": r["env_steps"],
                    "train_seconds": seconds,
                    "eval_return_mean": r["eval_return_mean"],
                    "eval_return_std": r["eval_return_std"],
                    "train_return_mean": r.get("train_return_mean"),
                }
            )
        print(
            f"[{algo}] it {r['epoch']:>3}  env steps {r['env_steps']:>7}  train s {seconds:7.1f}  "
            f"eval {r.get('eval_return_mean', float('nan')):8.1f}",
            flush=True,
        )
    env_steps = rows[-1]["env_steps"]
    rollout_s = sum(r.get("time_collect", 0.0) for r in rows)
    c = cfg.env
    return {
        "algorithm": algo,
        "task": task,
        "env": cfg.env.id,
        "success_return": cfg.env.success_return,
        "sampler": (
            f"DDPM T={cfg.model.num_train_steps} (K={cfg.sampler.ft_steps} fine-tuned)"
            if cfg.model.family == "diffusion_policy"
            else f"flow K={cfg.sampler.num_steps}"
        ),
        "hidden_dims": cfg.model.hidden_dims,
        "steps_per_iteration": c.num_envs * c.n_steps * cfg.env.action_steps,
        "bc_steps": cfg.pretrain.steps,
        "bc_seconds": bc["train_seconds"],
        "bc_wall_seconds": bc_wall,
        "bc_loss_last": bc["bc_loss_last"],
        "bc_return": rows[0]["eval_return_mean"],
        "best_return": max(p["eval_return_mean"] for p in curve),
        "final_return": curve[-1]["eval_return_mean"],
        "iterations": rows[-1]["epoch"],
        "env_steps": env_steps,
        "train_seconds": rows[-1]["train_seconds"],
        "rollout_seconds": rollout_s,
        "wall_seconds_with_eval": total_wall,
        "env_steps_per_s": env_steps / max(rows[-1]["train_seconds"], 1e-9),
        "rollout_env_steps_per_s": env_steps / max(rollout_s, 1e-9),
        "curve": curve,
        "run_dir": str(trainer.run_dir),
    }


def fmt(x, spec: str = ".0f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: list[dict], target: float) -> str:
    head = (
        "| algorithm | sampler | BC s | BC return | best return | final return "
        f"| env steps to {target:g} | train s to {target:g} | total env steps | total train s "
        "| env-steps/s (train) | env-steps/s (rollout) |"
    )
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in results:
        hit = r["reached"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["algorithm"],
                    r["sampler"],
                    fmt(r["bc_seconds"], ".1f"),
                    fmt(r["bc_return"], ".1f"),
                    fmt(r["best_return"], ".1f"),
                    fmt(r["final_return"], ".1f"),
                    fmt(hit["env_steps"], "d") if hit else "not reached",
                    fmt(hit["train_seconds"], ".1f") if hit else "not reached",
                    fmt(r["env_steps"], "d"),
                    fmt(r["train_seconds"], ".1f"),
                    fmt(r["env_steps_per_s"], ".0f"),
                    fmt(r["rollout_env_steps_per_s"], ".0f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def aggregate_table(by_seed: dict[int, list[dict]], target: float) -> str:
    """Per algorithm over seeds: the final return, and the env steps and training seconds to the
    target over the seeds that reached it, each mean +/- the 95% t interval."""
    from flowrl.seeds import mean_interval

    def pm(values, spec):
        if not values:
            return "not reached"
        m, ci = mean_interval(values)
        return fmt(m, spec) + ("" if ci is None else f" ± {fmt(ci, spec)}")

    lines = [
        f"| algorithm | seeds reaching {target:g} | final return | env steps to {target:g} | train s to {target:g} |",
        "|---|---|---|---|---|",
    ]
    seconds = {}
    for i, algo in enumerate(ALGOS):
        runs = [results[i] for results in by_seed.values()]
        hits = [r["reached"] for r in runs if r["reached"]]
        seconds[algo] = [h["train_seconds"] for h in hits]
        lines.append(
            f"| {algo} | {len(hits)}/{len(runs)} | {pm([r['final_return'] for r in runs], '.1f')} "
            f"| {pm([h['env_steps'] for h in hits], '.0f')} | {pm(seconds[algo], '.1f')} |"
        )
    if seconds["reinflow"] and seconds["dppo"]:
        saved = 1 - np.mean(seconds["reinflow"]) / np.mean(seconds["dppo"])
        lines += ["", f"ReinFlow's mean training seconds to {target:g} are {saved:.1%} less than DPPO's."]
    return "\n".join(lines)


def mean_curves(by_seed: dict[int, list[dict]]) -> list[dict]:
    """Per algorithm, the seeds' evaluations averaged at the iterations every seed evaluated:
    steps and seconds their means, the return its mean with the 95% t interval as the band."""
    from flowrl.seeds import mean_interval

    out = []
    for i, algo in enumerate(ALGOS):
        curves = [{p["iteration"]: p for p in results[i]["curve"]} for results in by_seed.values()]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        points = []
        for it in common:
            m, ci = mean_interval([c[it]["eval_return_mean"] for c in curves])
            points.append(
                {
                    "env_steps": float(np.mean([c[it]["env_steps"] for c in curves])),
                    "train_seconds": float(np.mean([c[it]["train_seconds"] for c in curves])),
                    "eval_return_mean": m,
                    "eval_return_std": ci or 0.0,
                }
            )
        first = next(iter(by_seed.values()))[i]
        out.append(
            {"algorithm": f"{algo}, {len(curves)} seeds", "sampler": first["sampler"], "curve": points}
        )
    return out


def plot(results: list[dict], target: float, path: Path, title: str, band: str = "mean +/- std") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=True)
    for ax, key, label in (
        (axes[0], "env_steps", "environment steps"),
        (axes[1], "train_seconds", "training seconds (rollout + update, 1 core)"),
    ):
        for r in results:
            x = np.array([p[key] for p in r["curve"]])
            m = np.array([p["eval_return_mean"] for p in r["curve"]])
            s = np.array([p["eval_return_std"] for p in r["curve"]])
            (line,) = ax.plot(x, m, marker="o", ms=3, label=f"{r['algorithm']} ({r['sampler']})")
            ax.fill_between(x, m - s, m + s, alpha=0.15, color=line.get_color())
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"deterministic eval return ({band})")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--env", default="InvertedPendulum-v5", help="picks tasks/robot_*_{reinflow,dppo}.yaml by env.id"
    )
    ap.add_argument("--task-pair", nargs=2, metavar=("REINFLOW_TASK", "DPPO_TASK"), help="overrides --env")
    ap.add_argument("--iterations", type=int, default=15, help="RL fine-tuning iterations per algorithm")
    ap.add_argument(
        "--eval-every", type=int, default=1, help="evaluate every N iterations (and at 0 and the end)"
    )
    ap.add_argument("--eval-episodes", type=int, default=None, help="default: the task's env.eval_episodes")
    ap.add_argument(
        "--target", type=float, default=None, help="target return (default: --target-frac x success_return)"
    )
    ap.add_argument("--target-frac", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0, help="train.seed: BC init/minibatches and RL rollouts")
    ap.add_argument("--seeds", help="several train.seed values, e.g. 0,1,2 (overrides --seed)")
    ap.add_argument("--bc-steps", type=int, default=None, help="default: each task's pretrain.steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both tasks")
    ap.add_argument("--set-reinflow", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-dppo", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flowrl.config import load_config
    from flowrl.data.experts import resolve_demonstrations

    tasks = dict(zip(ALGOS, args.task_pair or find_task_pair(args.env)))
    common = [
        f"train.num_epochs={args.iterations}",
        f"train.eval_every={args.eval_every}",
        "train.save_every=0",
        f"train.torch_threads={args.threads}",
        *([f"env.eval_episodes={args.eval_episodes}"] if args.eval_episodes else []),
        *([f"pretrain.steps={args.bc_steps}"] if args.bc_steps else []),
        *args.set,
    ]
    per_algo = {"reinflow": common + args.set_reinflow, "dppo": common + args.set_dppo}
    cfgs = {a: load_config(tasks[a], per_algo[a]) for a in ALGOS}
    ref = cfgs["reinflow"]
    env_id = ref.env.id
    for key in ("id", "action_steps", "obs_horizon", "kwargs", "max_episode_steps"):
        if getattr(ref.env, key) != getattr(cfgs["dppo"].env, key):
            raise SystemExit(f"the two tasks differ in env.{key}: {tasks}")
    if (
        ref.env.eval_episodes != cfgs["dppo"].env.eval_episodes
        or ref.train.eval_seed != cfgs["dppo"].train.eval_seed
    ):
        raise SystemExit(
            "the two tasks evaluate on different episodes: set env.eval_episodes/train.eval_seed with --set"
        )
    if ref.demos != cfgs["dppo"].demos:
        print(f"note: the tasks' demos sections differ; both clone the ReinFlow task's ({tasks['reinflow']})")
    if args.target is not None:
        target = args.target
    elif ref.env.success_return is not None:
        target = args.target_frac * ref.env.success_return
    else:
        raise SystemExit(f"{tasks['reinflow']} has no env.success_return: pass --target")

    out = Path(args.out)
    work = out / env_id
    work.mkdir(parents=True, exist_ok=True)
    # 1. the demonstrations, once, shared by both BC policies
    demo_dir = work / "demos"
    shutil.rmtree(demo_dir, ignore_errors=True)  # regenerate: the cache does not key on the config
    t0 = time.perf_counter()
    demos = resolve_demonstrations(ref, demo_dir) if ref.demos.path is None else None
    demo_path = demo_dir / "demos.npz" if demos is not None else Path(ref.demos.path)
    demo_s = time.perf_counter() - t0
    if demos is not None:
        rets = demos.episode_returns()
        print(
            f"demonstrations: {demos.num_episodes} episodes, {len(demos.actions)} steps, "
            f"return {fmt(float(np.mean(rets)) if rets is not None else None, '.1f')} ({demo_s:.1f} s) -> {demo_path}"
        )
    demo_override = [
        f"demos.path={demo_path}",
        f"demos.format={ref.demos.format if demos is None else 'npz'}",
    ]
    if demos is None and ref.demos.obs_keys:
        demo_override.append(f"demos.obs_keys={json.dumps(ref.demos.obs_keys)}")

    # 2. BC + RL per algorithm and seed, one after the other (one process, one thread)
    from flowrl.seeds import parse_seeds

    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    by_seed: dict[int, list[dict]] = {}
    for seed in seeds:
        folder = work / f"seed_{seed}" if len(seeds) > 1 else work
        results = []
        for algo in ALGOS:
            r = run_algo(algo, tasks[algo], [*demo_override, *per_algo[algo], f"train.seed={seed}"], folder)
            r["reached"], r["seed"] = first_reach(r["curve"], target), seed
            results.append(r)
        by_seed[seed] = results
    if results[0]["steps_per_iteration"] != results[1]["steps_per_iteration"]:
        print("note: the tasks collect different env steps per iteration; compare on the env-step axis")

    # 3. report
    title = (
        f"{env_id}: ReinFlow ({tasks['reinflow']}) vs DPPO ({tasks['dppo']}), "
        f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}, "
        f"{args.threads} torch thread(s), eval {ref.env.eval_episodes} fixed-seed episodes"
    )
    lines = [
        f"# {title}",
        "",
        f"Target return {target:g}; {args.iterations} iterations x "
        f"up to {results[0]['steps_per_iteration']} env steps, evaluation every {args.eval_every}; "
        "train s = rollout + PPO update (evaluation excluded); BC s = behavior-cloning time "
        f"(same {demo_path.name}, {ref.demos.num_episodes if demos is not None else '?'} demonstration episodes).",
        "",
    ]
    if len(seeds) > 1:
        lines += [f"## {len(seeds)} seeds: mean ± 95% interval (t)", "", aggregate_table(by_seed, target), ""]
    for seed, results in by_seed.items():
        lines += ([f"## seed {seed}", ""] if len(seeds) > 1 else []) + [table(results, target), ""]
    md = "\n".join(lines)
    stem = f"robot_algos_{env_id}"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(
        json.dumps({"target": target, "tasks": tasks, "args": vars(args), "results": by_seed}, indent=2)
    )
    shown = mean_curves(by_seed) if len(seeds) > 1 else by_seed[seeds[0]]
    band = "mean +/- 95% interval over seeds" if len(seeds) > 1 else "mean +/- std"
    plot(shown, target, out / f"{stem}.png", title.replace("), seed", "),\nseed"), band)
    print()
    print(md)
    print(f"wrote {out / stem}.md, .json, .png")


if __name__ == "__main__":
    main()

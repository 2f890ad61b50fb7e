"""Multi-seed runs: one task, N training seeds, one table and one plot.

    flowrl seeds TASK [key=value ...] --seeds 0,1,2 [--parallel N] [--pretrain]

Seed s is the task's run with ``train.seed=s`` in its own folder ``<root>/seed_<s>``, where
``<root>`` is ``<train.output_dir>/<task>_seeds`` (or ``<train.output_dir>/<train.run_name>``).
With ``--parallel N > 1`` the seeds run as N processes at a time (``python -m flowrl.seeds``, one
log file each, ``<root>/seed_<s>.log``), the machine's cores split between them
(``train.torch_threads``); with N = 1 they run one after another in this process. By default
N is as many as the seeds and the cores allow for environment tasks (their small policies run on
one thread each) and 1 for text-to-image tasks (whose runs would share one GPU). Environment
tasks fine-tune the task's BC policy (``flowrl pretrain``) from every seed; ``--pretrain``
behavior-clones a policy per seed first (``<root>/seed_<s>_bc``), so the spread includes the BC's.
A seed whose run already finished is read, not re-run; one with checkpoints is resumed.

Then ``<root>/summary.md`` and ``summary.json`` hold, over the seeds, the mean and the 95%
confidence interval (Student's t with n - 1 degrees of freedom: mean +/- t_{0.975, n-1} s / sqrt(n))
of the final deterministic evaluation return (``eval_return_mean``; text-to-image tasks: the
evaluation reward ``eval_reward_mean``) and success rate, and ``<root>/curves.png`` plots the mean
+/- the interval at every evaluation against environment steps (text-to-image: samples) and
against training wall-clock (the cumulative rollout + update seconds ``time_collect +
time_update``; evaluations, plots and checkpoints excluded; seeds run side by side share the
cores, so their seconds are a parallel run's). Reference lines: the BC policy (the epoch-0
evaluation, on the same fixed starts) and the expert (the demonstrations' mean return, from the BC
folder's ``eval.json``), where known.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flowrl.errors import ConfigError

# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the Cornish-Fisher expansion below
T975 = [
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
]  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964  # the normal quantile, corrected to order 1/df^2 (Abramowitz & Stegun 26.7.5)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t interval); the half-width is None for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), None
    return float(x.mean()), float(t_quantile_975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (or a mix, ``"0-2,7"``) -> distinct seeds in order."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: give integers separated by commas or a range, e.g. 0,1,2 or 0-4"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: give distinct non-negative seeds, e.g. --seeds 0,1,2")
    return seeds


# ---------------------------------------------------------------------- running the seeds
def seed_overrides(cfg, task_name: str, root: Path, seed: int, threads: int, pretrain: bool) -> list[str]:
    """What seed ``seed``'s run adds to the user's overrides: its seed, folder, BC folder, threads."""
    bc = root / f"seed_{seed}_bc" if pretrain else cfg.bc_dir(task_name).resolve()
    out = [f"train.seed={seed}", f"train.output_dir={root}", f"train.run_name=seed_{seed}"]
    if cfg.kind == "env":
        out.append(f"pretrain.output_dir={bc}")
    return [*out, f"train.torch_threads={threads}"]


def _state(run_dir: Path, num_epochs: int) -> str:
    """``done`` (a checkpoint of the last epoch), ``partial`` (earlier checkpoints) or ``new``."""
    from flowrl.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    if last is None:
        return "new"
    return "done" if int(last.name.split("_")[1]) >= num_epochs else "partial"


def run_one_seed(task: str, overrides: list[str], pretrain: bool, progress: bool = False) -> None:
    """One seed's run in this process: behavior cloning first when asked (or when an environment
    task's BC folder has no policy yet with ``--pretrain``), then training."""
    from flowrl.config import load_config, resolve_task_path
    from flowrl.run import Run

    name = resolve_task_path(task).stem
    cfg = load_config(task, overrides)
    if pretrain and not (cfg.bc_dir(name) / "policy.json").is_file():
        from flowrl.pretrain import pretrain as behavior_clone

        behavior_clone(cfg, name, progress=progress)
    Run(cfg, name, progress=progress).train()


def run_seeds(
    task: str, overrides: list[str], seeds: list[int], parallel: int | None = None, pretrain: bool = False
) -> dict:
    """Run (or resume, or read) every seed, then aggregate and write the summary; returns it."""
    from flowrl.config import load_config, resolve_task_path

    if parallel is not None and parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}; e.g. --parallel 2")
    name = resolve_task_path(task).stem
    cfg = load_config(task, overrides)  # every mistake in the task or the overrides fails here, once
    cores = os.cpu_count() or 1
    if parallel is None:
        parallel = cores if cfg.kind == "env" else 1
    if pretrain and cfg.kind != "env":
        raise ConfigError("--pretrain behavior-clones a policy per seed: it is for kind: env tasks")
    root = (Path(cfg.train.output_dir) / (cfg.train.run_name or f"{name}_seeds")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    parallel = min(parallel, len(seeds))
    threads = max(1, cores // parallel)
    if cfg.train.torch_threads is not None:
        threads = min(threads, cfg.train.torch_threads)
    jobs = []
    for s in seeds:
        extra = seed_overrides(cfg, name, root, s, threads, pretrain)
        state = _state(root / f"seed_{s}", cfg.train.num_epochs)
        if state == "done":
            print(f"seed {s}: finished before, read from {root / f'seed_{s}'}")
            continue
        if state == "partial":
            extra.append("train.resume=auto")
        jobs.append((s, [*overrides, *extra]))
    failed = _run_jobs(task, jobs, parallel, pretrain, threads, root)
    if len(failed) == len(seeds):
        raise ConfigError(f"every seed failed; the first: {failed[seeds[0]]} (logs: {root}/seed_*.log)")
    summary = summarize(root, [s for s in seeds if s not in failed], cfg, name, pretrain)
    summary["failed_seeds"] = sorted(failed)
    summary["root"] = str(root)
    write_summary(root, summary)
    return summary


def _run_jobs(
    task: str, jobs: list, parallel: int, pretrain: bool, threads: int, root: Path
) -> dict[int, str]:
    """Run the seeds' jobs, ``parallel`` at a time; returns {seed: why} of the ones that failed."""
    failed: dict[int, str] = {}
    if parallel == 1:
        for s, ovr in jobs:
            t0 = time.perf_counter()
            run_one_seed(task, ovr, pretrain)
            print(f"seed {s}: done in {time.perf_counter() - t0:.0f} s")
        return failed
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running = list(jobs), {}
    while pending or running:
        while pending and len(running) < parallel:
            s, ovr = pending.pop(0)
            log = open(root / f"seed_{s}.log", "w")
            cmd = [
                sys.executable,
                "-m",
                "flowrl.seeds",
                task,
                *(["--pretrain"] if pretrain else []),
                "--",
                *ovr,
            ]
            running[s] = (
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                log,
                time.perf_counter(),
            )
        time.sleep(0.2)
        for s in [s for s, (p, _, _) in running.items() if p.poll() is not None]:
            proc, log, t0 = running.pop(s)
            log.close()
            if proc.returncode == 0:
                print(f"seed {s}: done in {time.perf_counter() - t0:.0f} s")
            else:
                tail = (root / f"seed_{s}.log").read_text(errors="replace").strip().splitlines()[-1:]
                failed[s] = tail[0] if tail else f"exit code {proc.returncode}"
                print(f"seed {s}: failed ({failed[s]}); its log: {root / f'seed_{s}.log'}")
    return failed


# ---------------------------------------------------------------------- aggregation
def _rows(run_dir: Path) -> list[dict]:
    from flowrl.report import MetricsWriter

    return MetricsWriter(run_dir / "metrics.jsonl").rows()


def summarize(root: Path, seeds: list[int], cfg, task_name: str, pretrain: bool = False) -> dict:
    """The seeds' final results and curves, aggregated (see the module docstring)."""
    env = cfg.kind == "env"
    metric = "eval_return_mean" if env else "eval_reward_mean"
    per_seed, curves = {}, {}
    for s in seeds:
        rows = _rows(root / f"seed_{s}")
        x = wall = 0.0
        points = {}
        for r in rows:
            x = r["env_steps"] if env and "env_steps" in r else x + r.get("samples", 0)
            wall += r.get("time_collect", 0.0) + r.get("time_update", 0.0)
            if r.get(metric) is not None:
                points[r["epoch"]] = (x, wall, r[metric], r.get("eval_success_rate"))
        if not points:
            continue
        last = max(points)
        per_seed[s] = {
            "epoch": last,
            "final": points[last][2],
            "success_rate": points[last][3],
            "steps": points[last][0],
            "seconds": points[last][1],
            "start": points[min(points)][2] if min(points) == 0 else None,
        }
        curves[s] = points
    if not per_seed:
        raise ConfigError(f"no seed under {root} has an evaluation in its metrics.jsonl; see the seeds' logs")
    ok = list(per_seed)
    common = sorted(set.intersection(*(set(curves[s]) for s in ok)))
    curve = []
    for e in common:
        m, ci = mean_interval([curves[s][e][2] for s in ok])
        curve.append(
            {
                "epoch": e,
                "steps": float(np.mean([curves[s][e][0] for s in ok])),
                "seconds": float(np.mean([curves[s][e][1] for s in ok])),
                "mean": m,
                "ci95": ci,
            }
        )
    final, final_ci = mean_interval([per_seed[s]["final"] for s in ok])
    out = {
        "task": task_name,
        "kind": cfg.kind,
        "metric": metric,
        "seeds": ok,
        "final_mean": final,
        "final_ci95": final_ci,
        "per_seed": per_seed,
        "curve": curve,
        "steps_unit": "env steps" if env else "samples",
    }
    if all(per_seed[s]["success_rate"] is not None for s in ok):
        out["success_mean"], out["success_ci95"] = mean_interval([per_seed[s]["success_rate"] for s in ok])
    starts = [per_seed[s]["start"] for s in ok if per_seed[s]["start"] is not None]
    if starts:
        out["start_mean"] = float(np.mean(starts))  # the BC policy (env) or the base model
    if env:
        experts = []
        for s in ok:
            bc = root / f"seed_{s}_bc" if pretrain else cfg.bc_dir(task_name)
            path = bc / "eval.json"
            if path.is_file():
                demo = json.loads(path.read_text()).get("demo_return_mean")
                if demo is not None:
                    experts.append(demo)
        if experts:
            out["expert_return"] = float(np.mean(experts))
    return out


def _pm(mean: float, ci: float | None, fmt: str = ".1f") -> str:
    return f"{mean:{fmt}}" + ("" if ci is None else f" ± {ci:{fmt}}")


def summary_markdown(s: dict) -> str:
    """The aggregated table and the per-seed rows, as markdown."""
    what = "return" if s["kind"] == "env" else "reward"
    fmt = ".1f" if s["kind"] == "env" else ".4f"
    n = len(s["seeds"])
    lines = [
        f"# {s['task']}: {n} seeds ({', '.join(map(str, s['seeds']))})",
        "",
        f"Final deterministic evaluation {what} (`{s['metric']}`): mean ± 95% interval (Student's t, "
        f"{n - 1} degrees of freedom) over seeds.",
        "",
        f"| seeds | final {what} | success rate | {s['steps_unit']} | training seconds |",
        "|---|---|---|---|---|",
    ]
    success = (
        _pm(100 * s["success_mean"], s["success_ci95"] and 100 * s["success_ci95"], ".0f") + "%"
        if "success_mean" in s
        else "-"
    )
    steps = np.mean([p["steps"] for p in s["per_seed"].values()])
    secs = np.mean([p["seconds"] for p in s["per_seed"].values()])
    lines.append(
        f"| {n} | {_pm(s['final_mean'], s['final_ci95'], fmt)} | {success} | {steps:.0f} | {secs:.1f} |"
    )
    refs = []
    if "start_mean" in s:
        refs.append(
            f"{'BC policy' if s['kind'] == 'env' else 'base model'} (epoch 0): {s['start_mean']:{fmt}}"
        )
    if "expert_return" in s:
        refs.append(f"expert (demonstrations): {s['expert_return']:{fmt}}")
    if refs:
        lines += ["", "Reference: " + "; ".join(refs) + "."]
    lines += [
        "",
        f"| seed | epoch | final {what} | success rate | {s['steps_unit']} | training seconds |",
        "|---|---|---|---|---|---|",
    ]
    for seed, p in s["per_seed"].items():
        rate = "-" if p["success_rate"] is None else f"{100 * p['success_rate']:.0f}%"
        lines.append(
            f"| {seed} | {p['epoch']} | {p['final']:{fmt}} | {rate} | {p['steps']:.0f} | {p['seconds']:.1f} |"
        )
    if s.get("failed_seeds"):
        lines += ["", f"Failed seeds (see their logs): {s['failed_seeds']}"]
    return "\n".join(lines) + "\n"


def plot_seeds(s: dict, path: Path) -> None:
    """Mean +/- the 95% interval against steps and against training seconds, with references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = s["curve"]
    if not c:
        return
    m = np.array([p["mean"] for p in c])
    ci = np.array([p["ci95"] or 0.0 for p in c])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100, sharey=True)
    for ax, key, label in zip(axes, ("steps", "seconds"), (s["steps_unit"], "training wall-clock (s)")):
        x = np.array([p[key] for p in c])
        ax.plot(x, m, marker="o", ms=3, label=f"mean of {len(s['seeds'])} seeds")
        ax.fill_between(x, m - ci, m + ci, alpha=0.2, label="95% interval (t)")
        if "start_mean" in s:
            name = "BC policy" if s["kind"] == "env" else "base model"
            ax.axhline(s["start_mean"], color="gray", ls="--", lw=1, label=name)
        if "expert_return" in s:
            ax.axhline(s["expert_return"], color="green", ls=":", lw=1, label="expert (demonstrations)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("evaluation " + ("return" if s["kind"] == "env" else "reward"))
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{s['task']}: {len(s['seeds'])} seeds")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(root: Path, s: dict) -> None:
    (root / "summary.json").write_text(json.dumps(s, indent=2))
    (root / "summary.md").write_text(summary_markdown(s))
    plot_seeds(s, root / "curves.png")


def _worker(argv: list[str]) -> int:
    """``python -m flowrl.seeds TASK [--pretrain] -- key=value ...``: one seed's run, in its own
    process; errors are reported as ``flowrl train`` reports them (one line, exit code 2)."""
    from flowrl.cli import user_error_message

    task, rest = argv[0], argv[1:]
    pretrain = rest[:1] == ["--pretrain"]
    overrides = rest[rest.index("--") + 1 :] if "--" in rest else []
    try:
        run_one_seed(task, overrides, pretrain)
    except Exception as e:
        msg = user_error_message(e)
        if msg is None:
            raise
        print(f"flowrl: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))

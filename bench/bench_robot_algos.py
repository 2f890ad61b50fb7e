"""Every robot fine-tuning method on the same task, side by side: the final deterministic return and
the environment steps and wall-clock seconds to first reach one common return, from BC policies
cloned from the same demonstrations, over several seeds.

The methods (``--methods``, default all of :data:`METHODS`): DPPO (DDPM, and DPPO's DDIM), ReinFlow,
pi-RL's Flow-SDE and Flow-Noise, FPO and FPO++, and the Gaussian heads (DPPO's Gaussian MLP + PPO,
ResiP's residual PPO, DSRL's noise-space PPO and SAC). For one environment (``--env``, default
InvertedPendulum-v5):

1. each method's task: the library's own ``tasks/robot_*.yaml`` with that ``env.id`` that runs the
   method (``algorithm.name``, and the sampler for DPPO's DDIM), else the env's ReinFlow task file
   (``--base-task``) with the method's overrides from :data:`METHODS` (each method's settings from
   its InvertedPendulum task file: family, sampler, clip range, ...); the table says which;
2. the demonstrations are generated once (the base task's ``demos`` section, its scripted expert)
   and every method clones them (``demos.path``), so every BC policy sees the same data; methods
   whose BC policy is the same (same family, architecture, BC settings and seed: ReinFlow, pi-RL,
   FPO and the residual / DSRL heads all steer or fine-tune the flow policy) share one BC run;
3. per method and seed, ``flowrl.pretrain.pretrain`` (timed on its own, its evaluation off) and
   ``flowrl.run.Run.train`` for ``--iterations`` epochs with the deterministic evaluation
   (``env.eval_episodes`` episodes on the fixed seeds ``train.eval_seed + i``, the same for every
   method) every ``--eval-every`` epochs and at epoch 0 (the BC policy);
4. from the trainer's metrics rows: cumulative env steps and cumulative training seconds
   (rollout + update: ``time_collect + time_update``; evaluation, plotting and checkpoints
   excluded), and the first evaluation reaching the target return: ``--target``, else
   ``--target-frac`` (0.9) x the task's ``env.success_return``, else (Reacher: no success return)
   the scripted expert's mean demonstration return.

Per method over the seeds: the final return's mean and 95% t interval (``flowrl.seeds.mean_interval``),
how many seeds reached the target, and over those the env steps and training seconds to it (mean
+- interval), and the ratio of its mean seconds to DPPO's; then each method against DPPO paired by
seed (the ratio of seconds to the target where both reached it, a bound where one did, and of
seconds per iteration, mean +- interval over seeds). ``--report-only`` tabulates what finished
under ``--out``, runs of more than ``--iterations`` cut at ``--iterations`` (the same budget for
every method; the learning rate is constant, so a run's first N iterations are an N-iteration run). The seconds-to-target are only as fine
as ``--eval-every``; seconds measured while other work shares the cores are inflated and noisy (the
report states the load average), env steps are not. ``--parallel N`` runs N (method, seed) jobs at
once (one torch thread each).

    python bench/bench_robot_algos.py --methods reinflow,dppo --seeds 0,1,2       # InvertedPendulum-v5
    python bench/bench_robot_algos.py --env InvertedDoublePendulum-v5 --seeds 0,1,2 --iterations 10
    python bench/bench_robot_algos.py --env Reacher-v5 --methods dppo,reinflow,gaussian_ppo --parallel 3
    python bench/bench_robot_algos.py --task-pair robot_double_pendulum_reinflow my_dppo_task.yaml

Writes ``--out`` (default bench/out): ``robot_algos_<env>.md`` (the tables), ``.json`` (the curves)
and ``.png`` (the seeds' mean evaluation return +- interval against env steps and against training
seconds, every method), plus the demonstrations, BC policies and run folders under ``<out>/<env>/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent

_FLOW_CLIPS = ["sampler.denoised_clip=1.0", "sampler.noise_clip=null", "sampler.logprob_clip=null"]
# method -> (algorithm.name, sampler.name a task file of it sets or None, overrides on the env's
# ReinFlow task file). The overrides are each method's settings in its InvertedPendulum task file
# (tasks/robot_inverted_pendulum_<method>.yaml) that differ from the ReinFlow one; everything else
# (network widths, env, demonstrations, BC, learning rates, epochs) stays the base task's.
METHODS: dict[str, tuple[str, str | None, list[str]]] = {
    "dppo": (
        "dppo",
        None,
        [
            "model.family=diffusion_policy",
            "model.num_train_steps=20",  # DPPO: denoising_steps 20
            "sampler.name=ddpm",
            "sampler.ft_steps=10",  # DPPO: ft_denoising_steps 10
            "sampler.min_std=0.1",  # DPPO: min_sampling_denoising_std 0.1
            "algorithm.name=dppo",
            "algorithm.ratio_scope=step",
            "algorithm.denoising_discount=0.99",  # DPPO: gamma_denoising 0.99
            "train.minibatch_size=2000",  # (env step, denoising step) pairs
        ],
    ),
    "dppo_ddim": (
        "dppo",
        "ddim",
        [
            "model.family=diffusion_policy",
            "model.num_train_steps=20",
            "sampler.name=ddim",
            "sampler.num_steps=5",  # DPPO robomimic: ddim_steps 5
            "sampler.ft_steps=5",
            "sampler.eta=1.0",
            "sampler.min_std=0.1",
            "algorithm.name=dppo",
            "algorithm.ratio_scope=step",
            "algorithm.denoising_discount=0.99",
            "algorithm.clip_range=0.1",
            "algorithm.clip_range_base=0.01",
            "algorithm.clip_range_rate=3",  # DPPO: clip_ploss_coef_rate 3
            "train.minibatch_size=2000",
        ],
    ),
    "reinflow": ("reinflow", None, ["algorithm.name=reinflow"]),
    # ReinFlow on a shortcut flow policy at 2 steps, d = 1/2 (its task file names sampler.name: reinflow,
    # which tells it from the plain ReinFlow task files: they leave it unset)
    "reinflow_shortcut": (
        "reinflow",
        "reinflow",
        ["algorithm.name=reinflow", "sampler.name=reinflow", "model.shortcut=true", "sampler.num_steps=2"],
    ),
    "gaussian_ppo": (
        "gaussian_ppo",
        None,
        [
            "model.family=gaussian_policy",
            "model.gaussian_std_init=0.1",  # DPPO's Gaussian: fixed_std 0.1
            "model.gaussian_std_min=0.01",
            "model.gaussian_std_max=0.2",
            "model.gaussian_tanh_mean=true",
            "sampler.name=gaussian",
            "sampler.noise_clip=3.0",
            "sampler.logprob_clip=[-5.0, 2.0]",
            "sampler.logprob_reduction=mean",
            "algorithm.name=gaussian_ppo",
            "algorithm.ratio_scope=step",
            "algorithm.clip_range=0.01",
            "train.update_epochs=10",  # DPPO's Gaussian: update_epochs 10
        ],
    ),
    "pirl_flow_sde": (
        "pirl_flow_sde",
        None,
        [
            "sampler.name=flow_sde",
            "sampler.noise_level=0.5",  # pi-RL / RLinf: noise_level 0.5
            "sampler.sde_window=1",
            "algorithm.name=pirl_flow_sde",
            "algorithm.ratio_scope=step",
            "algorithm.clip_range=0.2",  # RLinf ppo: clip_ratio 0.2
        ],
    ),
    "pirl_flow_noise": (
        "pirl_flow_noise",
        None,
        [
            "sampler.name=flow_noise",
            "sampler.noise_min_std=0.08",  # pi-RL: noise_logvar_range [0.08, 0.16]
            "sampler.noise_max_std=0.16",
            "sampler.denoised_clip=null",
            "sampler.noise_clip=null",
            "algorithm.name=pirl_flow_noise",
            "algorithm.ratio_scope=chain",
            "algorithm.chain_logprob=reinflow",
            "algorithm.clip_range=0.2",
        ],
    ),
    "fpo": (
        "fpo",
        None,
        [
            "sampler.name=euler",
            "sampler.noise_std=0.1",
            "~algorithm.ratio_scope",  # PPO's options, not FPO's
            "~algorithm.ent_coef",
            "algorithm.name=fpo",
            "algorithm.clip_range=0.05",  # FPO playground: clipping_epsilon 0.05
            "algorithm.num_mc_samples=8",
            "algorithm.target_kl=null",
        ],
    ),
    "fpo++": (
        "fpo++",
        None,
        [
            "sampler.name=euler",
            "sampler.noise_std=0.1",
            "~algorithm.ratio_scope",  # PPO's options, not FPO's
            "~algorithm.ent_coef",
            "algorithm.name=fpo++",
            "algorithm.clip_range=0.05",
            "algorithm.num_mc_samples=8",
            "algorithm.target_kl=null",
        ],
    ),
    "residual_ppo": (
        "residual_ppo",
        None,
        [
            "model.family=residual_policy",
            "model.base_family=flow_policy",
            "model.head_hidden_dims=[256, 256]",  # ResiP: 2 x 256
            "model.residual_scale=0.1",  # ResiP: action_scale 0.1
            "model.base_noise=sampled",
            "model.gaussian_std_init=0.22313",  # ResiP: init_logstd -1.5
            "model.gaussian_std_min=0.001",
            "model.gaussian_std_max=1.0",
            "sampler.name=gaussian",
            *_FLOW_CLIPS,
            "sampler.logprob_reduction=sum",
            "algorithm.name=residual_ppo",
            "algorithm.ratio_scope=step",
            "algorithm.clip_range=0.2",  # ResiP: clip_coef 0.2
            "algorithm.target_kl=0.1",  # ResiP: target_kl 0.1
            "optim.learning_rate=3.0e-4",
        ],
    ),
    "dsrl_ppo": (
        "dsrl_ppo",
        None,
        [
            "model.family=dsrl_policy",
            "model.base_family=flow_policy",
            "model.head_hidden_dims=[128, 128, 128]",  # DSRL gym: 3 layers of 128
            "model.dsrl_noise_bound=1.5",  # DSRL: action_magnitude 1.5
            "model.gaussian_std_init=0.5",
            "model.gaussian_std_min=0.01",
            "model.gaussian_std_max=1.0",
            "sampler.name=gaussian",
            *_FLOW_CLIPS,
            "sampler.logprob_reduction=sum",
            "algorithm.name=dsrl_ppo",
            "algorithm.ratio_scope=step",
            "algorithm.clip_range=0.2",
            "algorithm.target_kl=1.0",
            "optim.learning_rate=3.0e-4",  # DSRL: actor_lr 3e-4
        ],
    ),
    "dsrl_sac": (
        "dsrl_sac",
        None,
        [
            "model.family=dsrl_policy",
            "model.base_family=flow_policy",
            "model.dsrl_head=squashed",  # SB3's squashed-Gaussian actor
            "model.head_hidden_dims=[128, 128, 128]",  # DSRL gym: 3 layers of 128
            "model.dsrl_noise_bound=1.5",  # DSRL: action_magnitude 1.5
            "sampler.name=gaussian",
            *_FLOW_CLIPS,
            "sampler.logprob_reduction=sum",
            "~algorithm.ratio_scope",  # PPO's options, not SAC's
            "~algorithm.ent_coef",
            "algorithm.name=dsrl_sac",
            "algorithm.warmup_steps=50",  # as tasks/robot_inverted_pendulum_dsrl_sac.yaml (DSRL: 2001)
            "optim.learning_rate=3.0e-4",  # DSRL: actor_lr 3e-4
        ],
    ),
}
# the order of --methods all: the most compared first
ORDER = (
    "dppo",
    "reinflow",
    "gaussian_ppo",
    "pirl_flow_sde",
    "dppo_ddim",
    "pirl_flow_noise",
    "reinflow_shortcut",
    "fpo",
    "fpo++",
    "residual_ppo",
    "dsrl_ppo",
    "dsrl_sac",
)
assert set(ORDER) == set(METHODS)


def _task_data(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def find_tasks(env_id: str, methods: list[str], base_task: str | None) -> dict[str, tuple[str, list[str]]]:
    """Per method: (task file, overrides): the method's own ``tasks/robot_*.yaml`` for ``env_id`` if
    there is one, else the env's ReinFlow task (or ``base_task``) with the method's overrides."""
    own: dict[str, str] = {}
    base = base_task
    for path in sorted((ROOT / "tasks").glob("robot_*.yaml")):
        data = _task_data(path)
        if (data.get("env") or {}).get("id", "InvertedPendulum-v5") != env_id:
            continue
        if (data.get("clip_reward") or {}).get("enabled") or "expert" in path.stem:
            continue
        algo = (data.get("algorithm") or {}).get("name", "reinflow")
        sampler = (data.get("sampler") or {}).get("name")
        for m, (name, sampler_name, _) in METHODS.items():
            if name == algo and (sampler_name is None or sampler == sampler_name):
                if sampler_name is None and m.startswith("dppo") and sampler == "ddim":
                    continue  # the DDIM task is dppo_ddim's, not DDPM DPPO's
                own.setdefault(m, path.stem)
        if algo == "reinflow" and base is None:
            base = path.stem
    out = {}
    for m in methods:
        if m in own:
            out[m] = (own[m], [])
        elif base is not None:
            out[m] = (base, METHODS[m][2])
        else:
            raise SystemExit(
                f"no ReinFlow task file in {ROOT / 'tasks'} has env.id {env_id} to derive {m} from; "
                "pass --base-task TASK"
            )
    return out


def first_reach(curve: list[dict], target: float) -> dict | None:
    """The first evaluation whose mean return is >= target."""
    for p in curve:
        if p["eval_return_mean"] >= target:
            return p
    return None


def bc_key(cfg) -> str:
    """What makes two methods' BC policies the same: the cloned family, its architecture and the
    BC settings (with the same demonstrations and seed)."""
    m = cfg.model
    family = m.base_family if m.family in ("residual_policy", "dsrl_policy") else m.family
    key = {
        "family": family,
        "hidden_dims": m.hidden_dims,
        "time_dim": m.time_dim,
        "action_horizon": m.action_horizon,
        "obs_horizon": cfg.env.obs_horizon,
        "pretrain": [
            cfg.pretrain.steps,
            cfg.pretrain.batch_size,
            cfg.pretrain.learning_rate,
            cfg.pretrain.weight_decay,
        ],
        "seed": cfg.train.seed,
    }
    if family == "diffusion_policy":
        key["T"] = m.num_train_steps
    if family == "gaussian_policy":
        key["gaussian"] = [m.gaussian_std_init, m.gaussian_std_min, m.gaussian_std_max, m.gaussian_tanh_mean]
    if family == "flow_policy" and m.shortcut:  # a shortcut policy: its own network and BC loss
        key["shortcut"] = [m.shortcut_levels, m.shortcut_sc_fraction, m.shortcut_delta]
    return family + "_" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def sampler_label(cfg) -> str:
    s, m = cfg.sampler, cfg.model
    if m.family == "diffusion_policy":
        if s.name == "ddim":
            return f"DDIM {s.num_steps} of T={m.num_train_steps} (K={s.ft_steps} fine-tuned)"
        return f"DDPM T={m.num_train_steps} (K={s.ft_steps} fine-tuned)"
    if m.family == "gaussian_policy":
        return "Gaussian MLP"
    if m.family in ("residual_policy", "dsrl_policy"):
        return f"{m.family.split('_')[0]} head on flow K={s.num_steps}"
    return f"{s.name or 'reinflow'} K={s.num_steps}"


def _load(task: str, overrides: list[str]):
    """The task's config with the overrides; ``~section.key`` removes a key of the task file (an
    option of the base method's objective that the derived method's does not take)."""
    from flowrl.config import from_dict, read_task

    data = read_task(task, [o for o in overrides if not o.startswith("~")])
    for o in overrides:
        if o.startswith("~"):
            section, _, key = o[1:].partition(".")
            (data.get(section) or {}).pop(key, None)
    return from_dict(data)


def run_bc(task: str, overrides: list[str], bc_dir: str, threads: int) -> dict:
    """One BC policy into ``bc_dir`` (a job of the pool)."""
    torch.set_num_threads(threads)
    from flowrl.pretrain import pretrain

    cfg = _load(task, [*overrides, f"pretrain.output_dir={bc_dir}", "pretrain.eval_episodes=0"])
    t0 = time.perf_counter()
    bc = pretrain(cfg, task, progress=False)
    return {
        "bc_seconds": bc["train_seconds"],
        "bc_wall_seconds": time.perf_counter() - t0,
        "bc_loss_last": bc["bc_loss_last"],
    }


def finished_bc(bc_dir: str) -> dict | None:
    """A BC folder's timings if its policy was saved (``eval.json`` is written last)."""
    f = Path(bc_dir) / "eval.json"
    if not (f.is_file() and (Path(bc_dir) / "policy.safetensors").is_file()):
        return None
    e = json.loads(f.read_text())
    return {"bc_seconds": e["train_seconds"], "bc_loss_last": e["bc_loss_last"]}


def summarize(method, task, overrides, cfg, rows, run_dir, total_wall=None) -> dict:
    """One run's curve (every evaluation: env steps, cumulative training seconds, return) and totals,
    from the trainer's metrics rows up to its last evaluation."""
    last = max(r["epoch"] for r in rows if r.get("eval_return_mean") is not None)
    rows = [r for r in rows if r["epoch"] <= last]
    seconds, curve = 0.0, []
    for r in rows:
        seconds += r.get("time_collect", 0.0) + r.get("time_update", 0.0)
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
    c = cfg.env
    return {
        "method": method,
        "task": task,
        "derived": bool(overrides and any(o.startswith("algorithm.name=") for o in overrides)),
        "seed": cfg.train.seed,
        "sampler": sampler_label(cfg),
        "hidden_dims": cfg.model.hidden_dims,
        "steps_per_iteration": c.num_envs * c.n_steps * c.action_steps,
        "bc_return": curve[0]["eval_return_mean"],
        "best_return": max(p["eval_return_mean"] for p in curve),
        "final_return": curve[-1]["eval_return_mean"],
        "iterations": last,
        "planned_iterations": cfg.train.num_epochs,
        "env_steps": rows[-1]["env_steps"],
        "train_seconds": seconds,
        "rollout_seconds": sum(r.get("time_collect", 0.0) for r in rows),
        "wall_seconds_with_eval": total_wall,
        "curve": curve,
        "run_dir": str(run_dir),
    }


def partial_result(
    method: str, task: str, overrides: list[str], work: str, budget: int | None = None
) -> dict | None:
    """A run that was stopped before its end (no result file), or one cut at ``budget`` iterations:
    its metrics rows (up to ``budget``) up to its last evaluation, if it evaluated after training
    at least once."""
    name = method.replace("+", "p")
    metrics = Path(work) / name / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if budget is None or r["epoch"] <= budget]
    if sum(r.get("eval_return_mean") is not None for r in rows) < 2:
        return None
    cfg = _load(task, overrides)
    return summarize(method, task, overrides, cfg, rows, metrics.parent)


def run_method(method: str, task: str, overrides: list[str], bc_dir: str, work: str, threads: int) -> dict:
    """Fine-tune one method from its BC policy through the library; its curve and timings (a job)."""
    torch.set_num_threads(threads)
    from flowrl.run import Run

    name = method.replace("+", "p")
    cfg = _load(
        task,
        [*overrides, f"pretrain.output_dir={bc_dir}", f"train.output_dir={work}", f"train.run_name={name}"],
    )
    shutil.rmtree(Path(work) / name, ignore_errors=True)  # this script's own previous run
    print(
        f"[{method} seed {cfg.train.seed}] fine-tuning {cfg.train.num_epochs} epochs ({task}) ...", flush=True
    )
    trainer = Run(cfg, task, progress=False)
    t0 = time.perf_counter()
    rows = trainer.train()
    result = summarize(method, task, overrides, cfg, rows, trainer.run_dir, time.perf_counter() - t0)
    print(
        f"[{method} seed {cfg.train.seed}] done: eval "
        + " ".join(f"{p['eval_return_mean']:.1f}" for p in result["curve"])
        + f" ({result['train_seconds']:.1f} train s)",
        flush=True,
    )
    # each job's result as it ends, so --report-only can tabulate the jobs that finished
    (Path(work) / f"{name}.result.json").write_text(json.dumps(result, indent=2))
    return result


def finished_result(method: str, task: str, overrides: list[str], work: str, budget: int) -> dict | None:
    """A job's result file, or (``--report-only``) its run cut at ``budget`` iterations when it ran
    more (re-read from its metrics rows, so every method is tabulated at the same budget), or its
    stopped run up to its last evaluation."""
    f = Path(work) / f"{method.replace('+', 'p')}.result.json"
    if f.is_file():
        r = json.loads(f.read_text())
        if r["iterations"] <= budget:
            return r
    return partial_result(method, task, overrides, work, budget)


def fmt(x, spec: str = ".0f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def pm(values, spec: str) -> str:
    from flowrl.seeds import mean_interval

    if not values:
        return "n/a"
    m, ci = mean_interval(values)
    return fmt(m, spec) + ("" if ci is None else f" ± {fmt(ci, spec)}")


def aggregate_table(results: dict[str, list[dict]], target: float) -> str:
    """Per method over seeds: BC and final return, seeds reaching the target, env steps and training
    seconds to it (over those seeds), mean +- the 95% t interval; seconds also as a ratio to DPPO's."""
    lines = [
        f"| method | sampler | task | BC return | final return | reached {target:g} | env steps to {target:g} "
        f"| train s to {target:g} | s-to-target / DPPO's | train s per iteration | iterations run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def hits(m):
        return [r["reached"] for r in results[m] if r["reached"]]

    ref = [h["train_seconds"] for h in hits("dppo")] if "dppo" in results else []
    for m, runs in results.items():
        h = hits(m)
        secs = [x["train_seconds"] for x in h]
        ratio = fmt(np.mean(secs) / np.mean(ref), ".2f") if secs and ref else "n/a"
        task = runs[0]["task"] + (" + overrides" if runs[0]["derived"] else "")
        lines.append(
            f"| {m} | {runs[0]['sampler']} | {task} | {pm([r['bc_return'] for r in runs], '.1f')} "
            f"| {pm([r['final_return'] for r in runs], '.1f')} | {len(h)}/{len(runs)} "
            f"| {pm([x['env_steps'] for x in h], '.0f')} | {pm(secs, '.1f')} | {ratio} "
            f"| {pm([r['train_seconds'] / max(r['iterations'], 1) for r in runs], '.1f')} | {iterations_run(runs)} |"
        )
    return "\n".join(lines)


def paired_table(results: dict[str, list[dict]], target: float, ref: str = "dppo") -> str:
    """Every method against ``ref`` (DPPO) seed by seed: the ratio of training seconds to the target
    (where both reached it; where one did, a bound from the other's total seconds) and of training
    seconds per iteration, with the mean and 95% t interval over the seeds that have the ratio."""
    if ref not in results:
        return ""
    by_seed = {r["seed"]: r for r in results[ref]}
    lines = [
        f"| method | seeds paired with {ref} | s-to-{target:g} / {ref}'s, per seed | mean ± 95% interval "
        f"| train s per iteration / {ref}'s | env steps to {target:g} / {ref}'s |",
        "|---|---|---|---|---|---|",
    ]
    for m, runs in results.items():
        if m == ref:
            continue
        pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        if not pairs:
            continue
        cells, ratios, steps = [], [], []
        for a, b in pairs:
            ha, hb = a["reached"], b["reached"]
            if ha and ha["train_seconds"] == 0:
                cells.append(f"{a['seed']}: 0 (BC at the target)")
            elif ha and hb and hb["train_seconds"] > 0:
                ratios.append(ha["train_seconds"] / hb["train_seconds"])
                cells.append(f"{a['seed']}: {ratios[-1]:.2f}")
                if hb["env_steps"] > 0:
                    steps.append(ha["env_steps"] / hb["env_steps"])
            elif ha and not hb:  # ref's seconds to the target exceed its whole run's
                cells.append(f"{a['seed']}: < {ha['train_seconds'] / b['train_seconds']:.2f}")
            elif hb and not ha and hb["train_seconds"] > 0:
                cells.append(f"{a['seed']}: > {a['train_seconds'] / hb['train_seconds']:.2f}")
            else:
                cells.append(f"{a['seed']}: n/a")
        per_it = [
            (a["train_seconds"] / max(a["iterations"], 1)) / (b["train_seconds"] / max(b["iterations"], 1))
            for a, b in pairs
        ]
        lines.append(
            f"| {m} | {len(pairs)} | {', '.join(cells)} | {pm(ratios, '.2f')} ({len(ratios)} seeds) "
            f"| {pm(per_it, '.2f')} | {pm(steps, '.2f')} |"
        )
    return "\n".join(lines)


def iterations_run(runs: list[dict]) -> str:
    """``5`` when every seed ran its planned iterations, else e.g. ``2-3 of 5 (stopped)``."""
    done = sorted({r["iterations"] for r in runs})
    planned = max(r.get("planned_iterations", r["iterations"]) for r in runs)
    if done == [planned]:
        return str(planned)
    return f"{done[0]}{'' if len(done) == 1 else f'-{done[-1]}'} of {planned} (stopped)"


def seed_table(results: dict[str, list[dict]], target: float) -> str:
    lines = [
        "| method | seed | BC return | best | final | env steps to target | train s to target | total train s "
        "| iterations |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, runs in results.items():
        for r in runs:
            h = r["reached"]
            lines.append(
                f"| {m} | {r['seed']} | {fmt(r['bc_return'], '.1f')} | {fmt(r['best_return'], '.1f')} "
                f"| {fmt(r['final_return'], '.1f')} | {fmt(h['env_steps'], 'd') if h else 'not reached'} "
                f"| {fmt(h['train_seconds'], '.1f') if h else 'not reached'} | {fmt(r['train_seconds'], '.1f')} "
                f"| {iterations_run([r])} |"
            )
    return "\n".join(lines)


def mean_curves(results: dict[str, list[dict]]) -> list[dict]:
    """Per method, the seeds' evaluations averaged at the iterations every seed evaluated: steps and
    seconds their means, the return its mean with the 95% t interval as the band."""
    from flowrl.seeds import mean_interval

    out = []
    for m, runs in results.items():
        curves = [{p["iteration"]: p for p in r["curve"]} for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        points = []
        for it in common:
            mean, ci = mean_interval([c[it]["eval_return_mean"] for c in curves])
            points.append(
                {
                    "env_steps": float(np.mean([c[it]["env_steps"] for c in curves])),
                    "train_seconds": float(np.mean([c[it]["train_seconds"] for c in curves])),
                    "eval_return_mean": mean,
                    "eval_return_std": ci or 0.0,
                }
            )
        out.append({"label": f"{m} ({runs[0]['sampler']}), {len(runs)} seed(s)", "curve": points})
    return out


def plot(curves: list[dict], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100, sharey=True)
    for ax, key, label in (
        (axes[0], "env_steps", "environment steps"),
        (axes[1], "train_seconds", "training seconds (rollout + update, 1 thread)"),
    ):
        for c in curves:
            x = np.array([p[key] for p in c["curve"]])
            m = np.array([p["eval_return_mean"] for p in c["curve"]])
            s = np.array([p["eval_return_std"] for p in c["curve"]])
            (line,) = ax.plot(x, m, marker="o", ms=3, label=c["label"])
            ax.fill_between(x, m - s, m + s, alpha=0.12, color=line.get_color())
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("deterministic eval return (mean +/- 95% interval over seeds)")
    axes[0].legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pool(n: int):
    return ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn")) if n > 1 else None


def _map(pool, fn, jobs: list[tuple]) -> list:
    if pool is None:
        return [fn(*j) for j in jobs]
    return [f.result() for f in [pool.submit(fn, *j) for j in jobs]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="InvertedPendulum-v5", help="picks tasks/robot_*.yaml by env.id")
    ap.add_argument("--methods", default="all", help=f"comma-separated, of {', '.join(ORDER)} (default all)")
    ap.add_argument("--base-task", help="the task the methods without a task file of their own derive from")
    ap.add_argument(
        "--task-pair",
        nargs=2,
        metavar=("REINFLOW_TASK", "DPPO_TASK"),
        help="ReinFlow vs DPPO from these two files",
    )
    ap.add_argument("--iterations", type=int, default=15, help="RL fine-tuning iterations per method")
    ap.add_argument(
        "--eval-every", type=int, default=1, help="evaluate every N iterations (and at 0 and the end)"
    )
    ap.add_argument(
        "--eval-episodes", type=int, default=None, help="default: the base task's env.eval_episodes"
    )
    ap.add_argument("--target", type=float, default=None, help="target return (default: see --target-frac)")
    ap.add_argument(
        "--target-frac",
        type=float,
        default=0.9,
        help="target = this x env.success_return; without a success return, the expert's mean demonstration return",
    )
    ap.add_argument(
        "--seeds", default="0", help="train.seed values, e.g. 0,1,2 (BC init/minibatches and RL rollouts)"
    )
    ap.add_argument("--seed", type=int, default=None, help="one seed (as --seeds S)")
    ap.add_argument("--bc-steps", type=int, default=None, help="default: each task's pretrain.steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every method")
    ap.add_argument(
        "--set-method",
        nargs=2,
        action="append",
        default=[],
        metavar=("METHOD", "KEY=VALUE"),
        help="one method's override",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="tabulate the finished jobs' results under --out (e.g. another --target); runs of more "
        "than --iterations iterations are cut at --iterations, so every method has the same budget",
    )
    ap.add_argument(
        "--reuse-bc",
        action="store_true",
        help="keep the demonstrations and the BC policies a previous run under --out finished",
    )
    ap.add_argument("--parallel", type=int, default=1, help="(method, seed) jobs at once")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flowrl.data.experts import resolve_demonstrations
    from flowrl.seeds import parse_seeds

    if args.task_pair:
        tasks = {"reinflow": (args.task_pair[0], []), "dppo": (args.task_pair[1], [])}
    else:
        methods = list(ORDER) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(ORDER)}")
        tasks = find_tasks(args.env, methods, args.base_task)
    seeds = [args.seed] if args.seed is not None else parse_seeds(args.seeds)
    common = [
        f"train.num_epochs={args.iterations}",
        f"train.eval_every={args.eval_every}",
        "train.save_every=0",
        f"train.torch_threads={args.threads}",
        *([f"pretrain.steps={args.bc_steps}"] if args.bc_steps else []),
        *args.set,
    ]
    per_method = {
        m: [*ov, *common, *[kv for mm, kv in args.set_method if mm == m]] for m, (task, ov) in tasks.items()
    }
    cfgs = {m: _load(tasks[m][0], per_method[m]) for m in tasks}
    first = next(iter(tasks))
    ref = cfgs[first]
    env_id = ref.env.id
    episodes = args.eval_episodes or ref.env.eval_episodes
    for m, cfg in cfgs.items():
        for key in ("id", "action_steps", "obs_horizon", "kwargs", "max_episode_steps"):
            if getattr(cfg.env, key) != getattr(ref.env, key):
                raise SystemExit(f"{m}'s task {tasks[m][0]} differs from {tasks[first][0]} in env.{key}")
        if cfg.demos != ref.demos:
            print(f"note: {m}'s task has another demos section; every method clones {tasks[first][0]}'s")
        per_method[m] += [f"env.eval_episodes={episodes}", f"train.eval_seed={ref.train.eval_seed}"]

    out = Path(args.out)
    work = out / env_id
    work.mkdir(parents=True, exist_ok=True)
    # 1. the demonstrations, once, shared by every BC policy
    demo_dir = work / "demos"
    if not (args.report_only or args.reuse_bc):
        shutil.rmtree(demo_dir, ignore_errors=True)  # regenerate: the cache does not key on the config
    demos = resolve_demonstrations(ref, demo_dir) if ref.demos.path is None else None
    demo_path = demo_dir / "demos.npz" if demos is not None else Path(ref.demos.path)
    demo_return = None
    if demos is not None:
        rets = demos.episode_returns()
        demo_return = float(np.mean(rets)) if rets is not None else None
        print(
            f"demonstrations: {demos.num_episodes} episodes, return {fmt(demo_return, '.1f')} -> {demo_path}"
        )
    demo_override = [
        f"demos.path={demo_path}",
        f"demos.format={ref.demos.format if demos is None else 'npz'}",
    ]
    if demos is None and ref.demos.obs_keys:
        demo_override.append(f"demos.obs_keys={json.dumps(ref.demos.obs_keys)}")
    if args.target is not None:
        target, target_doc = args.target, "--target"
    elif ref.env.success_return is not None:
        target = args.target_frac * ref.env.success_return
        target_doc = f"{args.target_frac:g} x env.success_return {ref.env.success_return:g}"
    elif demo_return is not None:
        target, target_doc = round(demo_return, 2), "the scripted expert's mean demonstration return"
    else:
        raise SystemExit(f"{tasks[first][0]} has no env.success_return and no expert return: pass --target")

    # 2. BC per distinct BC policy and seed, then RL per method and seed
    jobs, bc_jobs = [], {}
    for seed in seeds:
        for m in tasks:
            ov = [*demo_override, *per_method[m], f"train.seed={seed}"]
            key = bc_key(_load(tasks[m][0], ov))
            bc_dir = str(work / "bc" / key)
            bc_jobs.setdefault(key, (tasks[m][0], ov, bc_dir, args.threads))
            jobs.append((m, tasks[m][0], ov, bc_dir, str(work / f"seed_{seed}"), args.threads, seed, key))
    jobs.sort(key=lambda j: list(tasks).index(j[0]))  # all seeds of the first method first
    load0 = os.getloadavg()[0]
    t_start = time.time()
    if args.report_only:  # the jobs that finished (their result files), BC times from their folders
        runs = [finished_result(j[0], j[1], j[2], j[4], args.iterations) for j in jobs]
        bcs = {k: done for k, v in bc_jobs.items() if (done := finished_bc(v[2]))}
        missing = [f"{j[0]}/seed {j[6]}" for j, r in zip(jobs, runs) if r is None]
        if missing:
            print(f"not run (left out of the tables): {', '.join(missing)}")
    else:
        pool = _pool(args.parallel)
        print(f"behavior cloning: {len(bc_jobs)} policies ({', '.join(bc_jobs)}) ...", flush=True)
        bcs = {k: done for k, v in bc_jobs.items() if args.reuse_bc and (done := finished_bc(v[2]))}
        if bcs:
            print(f"reusing {len(bcs)} finished BC policies (--reuse-bc)", flush=True)
        todo = [k for k in bc_jobs if k not in bcs]
        bcs.update(zip(todo, _map(pool, run_bc, [bc_jobs[k] for k in todo])))
        runs = _map(pool, run_method, [j[:-2] for j in jobs])
        if pool is not None:
            pool.shutdown()
    load1 = os.getloadavg()[0]
    results: dict[str, list[dict]] = {}
    for j, r in zip(jobs, runs):
        if r is None:
            continue
        r["reached"] = first_reach(r["curve"], target)
        r.update(bcs.get(j[-1], {}), bc_key=j[-1])
        results.setdefault(j[0], []).append(r)
    if not results:
        raise SystemExit(f"no finished runs under {work}")

    # 3. report
    steps = {r[0]["steps_per_iteration"] for r in results.values()}
    title = (
        f"{env_id}: {len(tasks)} methods, seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}, "
        f"{args.threads} torch thread(s) per job, {args.parallel} job(s) at once, eval {episodes} fixed-seed episodes"
    )
    lines = [
        f"# {title}",
        "",
        f"Target return {target:g} ({target_doc}); {args.iterations} iterations x "
        f"{'/'.join(map(str, sorted(steps)))} env steps, evaluation every {args.eval_every}; "
        "train s = rollout + update (evaluation excluded), "
        + (
            f"tabulated from the runs' files (--report-only; runs of more iterations cut at {args.iterations}); "
            if args.report_only
            else f"measured at load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores "
            f"({(time.time() - t_start) / 60:.1f} min wall in all); "
        )
        + f"the same "
        f"{demo_path.name} for every BC policy (expert return {fmt(demo_return, '.1f')}).",
        "",
        f"## {len(seeds)} seed(s): mean ± 95% interval (t)",
        "",
        aggregate_table(results, target),
        "",
        "## per seed",
        "",
        seed_table(results, target),
        "",
    ]
    paired = paired_table(results, target)
    if paired:
        lines += ["## against DPPO, paired by seed", "", paired, ""]
    if len(steps) > 1:
        lines.insert(
            3, "Note: the methods collect different env steps per iteration; compare on the env-step axis.\n"
        )
    md = "\n".join(lines)
    stem = f"robot_algos_{env_id}"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "target": target,
                "target_doc": target_doc,
                "tasks": tasks,
                "args": vars(args),
                "results": results,
            },
            indent=2,
        )
    )
    plot(mean_curves(results), target, out / f"{stem}.png", title)
    print()
    print(md)
    print(f"wrote {out / stem}.md, .json, .png")


if __name__ == "__main__":
    main()

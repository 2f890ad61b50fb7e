"""``flowrl pretrain <task>`` and ``flowrl train <task>`` for robot task files (``kind: robot``).

flowrl pretrain tasks/robot_inverted_pendulum_reinflow.yaml pretrain.steps=1000
flowrl train tasks/robot_inverted_pendulum_reinflow.yaml train.num_iterations=5 --resume auto
flowrl evaluate tasks/robot_inverted_pendulum_reinflow.yaml --policy runs/<run>/checkpoints/epoch_000010 \
    --guide best-of-n --reward simulated_return --reward-kwargs '{"termination_penalty": 10}'
"""

from __future__ import annotations

import argparse

import torch


def _fmt(ev: dict, prefix: str = "eval_") -> str:
    text = f"{ev[prefix + 'return_mean']:.1f} +/- {ev[prefix + 'return_std']:.1f}"
    if prefix + "success_rate" in ev:
        text += f" (success {ev[prefix + 'success_rate']:.0%})"
    return text


def pretrain_robot(args: argparse.Namespace) -> int:
    from flowrl.config import resolve_task_path
    from flowrl.robot.config import load_robot_config
    from flowrl.robot.pretrain import pretrain

    cfg = load_robot_config(args.task, list(args.overrides))
    torch.set_num_threads(cfg.train.torch_threads)
    summary = pretrain(cfg, task_name=resolve_task_path(args.task).stem)
    print(
        f"BC loss {summary['bc_loss_first']:.4f} -> {summary['bc_loss_last']:.4f} on {summary['demo_episodes']} demonstrations"
    )
    if "eval_return_mean" in summary:
        n = len(summary["eval_returns"])
        print(f"BC policy, {n} evaluation episodes: return {_fmt(summary)}")
    print(f"policy folder: {summary['folder']} (policy.safetensors, policy.json, eval.json, metrics.jsonl)")
    return 0


def train_robot(args: argparse.Namespace) -> int:
    from flowrl.config import resolve_task_path
    from flowrl.robot.config import load_robot_config
    from flowrl.robot.trainer import RobotTrainer

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_robot_config(args.task, overrides)
    torch.set_num_threads(cfg.train.torch_threads)
    trainer = RobotTrainer(cfg, task_name=resolve_task_path(args.task).stem)
    history = trainer.train()
    evals = [r for r in history if "eval_return_mean" in r]
    if evals:
        first, last = evals[0], evals[-1]
        print(
            f"evaluation return ({cfg.train.eval_episodes} fixed-seed episodes, deterministic): "
            f"iteration {first['iteration']} {_fmt(first)} -> iteration {last['iteration']} {_fmt(last)}"
        )
    print(f"run folder: {trainer.run_dir} (metrics.jsonl, learning_curve.png, checkpoints/)")
    return 0


def evaluate_robot(args: argparse.Namespace) -> int:
    """Evaluation rollouts of a saved policy (``--policy``, default the BC policy), optionally
    guided: ``rlg`` mixes it with the BC policy (``--base``), ``reward-grad`` / ``best-of-n`` /
    ``smc`` steer every chunk with an action reward from ``ACTION_REWARDS``."""
    import json
    from pathlib import Path

    from flowrl.config import resolve_task_path
    from flowrl.guidance import ACTION_REWARDS, ChunkReward, GuidedSampler, RLGuidedAdapter
    from flowrl.models.policy import load_policy
    from flowrl.robot.config import load_robot_config
    from flowrl.robot.evaluate import build_policy_sampler, evaluate

    cfg = load_robot_config(args.task, list(args.overrides))
    torch.set_num_threads(cfg.train.torch_threads)
    d = cfg.train.device
    device = "cuda" if d == "cuda" or (d == "auto" and torch.cuda.is_available()) else "cpu"
    bc_dir = cfg.bc_dir(resolve_task_path(args.task).stem)
    policy = load_policy(Path(args.policy) if args.policy else bc_dir, device)
    sampler = build_policy_sampler(cfg, policy)
    if args.guide == "rlg":
        base = None
        if args.base or not policy.has_reference:
            base = load_policy(Path(args.base) if args.base else bc_dir, device)
        policy = RLGuidedAdapter(policy, args.rlg_weight, base=base)
    elif args.guide != "none":
        if args.reward not in ACTION_REWARDS:
            raise SystemExit(
                f"flowrl evaluate: --guide {args.guide} needs --reward, one of {sorted(ACTION_REWARDS)}"
            )
        from flowrl.cli import reward_kwargs

        kwargs = reward_kwargs(args)
        if args.reward == "simulated_return":
            kwargs.setdefault("env_id", cfg.env.id)
        reward = ACTION_REWARDS[args.reward](**kwargs)
        options = {
            "reward-grad": {"scale": args.guide_scale},
            "best-of-n": {"n": args.particles},
            "smc": {"num_particles": args.particles, "lam": args.smc_lambda},
        }[args.guide]
        sampler = GuidedSampler(
            sampler, args.guide, ChunkReward(reward), stochastic=args.stochastic, **options
        )
    n = args.episodes or cfg.train.eval_episodes
    seed = cfg.train.eval_seed if args.seed is None else args.seed  # default: training's evaluation starts
    result = evaluate(policy, sampler, cfg, n, seed)
    print(f"{args.guide}: {n} evaluation episodes (seeds {seed}..{seed + n - 1}): return {_fmt(result, '')}")
    if args.out:
        Path(args.out).write_text(json.dumps({"guide": args.guide, **result}, indent=2))
    return 0

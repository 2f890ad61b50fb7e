"""``flowrl pretrain <task>`` and ``flowrl train <task>`` for robot task files (``kind: robot``).

flowrl pretrain tasks/robot_inverted_pendulum_reinflow.yaml pretrain.steps=1000
flowrl train tasks/robot_inverted_pendulum_reinflow.yaml train.num_iterations=5 --resume auto
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

"""``flowrl train``, ``flowrl sample`` and, for robot tasks, ``flowrl pretrain`` / ``flowrl evaluate``.

flowrl train tasks/jpeg_tiny.yaml train.num_epochs=40 model.pretrained=./my-sd15
flowrl sample --model tiny --lora runs/jpeg_tiny/checkpoints/epoch_000020 --prompt "a cat" -n 4
accelerate launch --num_processes 2 -m flowrl.cli train tasks/jpeg_tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _is_robot_task(task: str) -> bool:
    """A task file with ``kind: robot`` at the top goes to the robot trainer (flowrl.robot)."""
    import yaml

    from flowrl.config import resolve_task_path

    try:
        data = yaml.safe_load(resolve_task_path(task).read_text())
    except yaml.YAMLError:
        return False  # load_config reports it
    return isinstance(data, dict) and data.get("kind") == "robot"


def _train(args: argparse.Namespace) -> int:
    if _is_robot_task(args.task):
        from flowrl.robot.cli import train_robot

        return train_robot(args)
    from flowrl.config import load_config, resolve_task_path
    from flowrl.trainer import Trainer

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.task, overrides)
    trainer = Trainer(cfg, task_name=resolve_task_path(args.task).stem)
    history = trainer.train()
    if trainer.accelerator.is_main_process and history:
        first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
        print(f"reward: epoch {history[0]['epoch']} {first:.4f} -> epoch {history[-1]['epoch']} {last:.4f}")
        print(f"run folder: {trainer.run_dir} (metrics.jsonl, reward_curve.png, samples/, checkpoints/)")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from flowrl.robot.cli import pretrain_robot

    return pretrain_robot(args)


def _evaluate(args: argparse.Namespace) -> int:
    from flowrl.robot.cli import evaluate_robot

    return evaluate_robot(args)


LORA_FILE = "pytorch_lora_weights.safetensors"


def _checked_sample_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``flowrl sample``, each repeated --num-per-prompt times, after checking
    every option that needs no weights (so a mistake costs no model load)."""
    from flowrl.config import ConfigError

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from flowrl.data.prompts import load_prompts

        if not Path(args.prompts_file).is_file():
            raise ConfigError(
                f"--prompts-file {args.prompts_file}: no such file; give a text file with one prompt per line"
            )
        prompts += load_prompts(args.prompts_file)
    if not prompts:
        raise ConfigError("flowrl sample: give at least one --prompt or --prompts-file")
    if args.lora:
        lora = Path(args.lora)
        if not lora.exists():
            raise ConfigError(
                f"--lora {lora} does not exist; give a flowrl checkpoint folder (checkpoints/epoch_N) "
                f"or a {LORA_FILE} file"
            )
        if lora.is_file() and lora.suffix != ".safetensors":
            raise ConfigError(
                f"--lora {lora} is not a .safetensors weights file; give its checkpoint folder {lora.parent} "
                f"or the {LORA_FILE} in it"
            )
    guide = args.guide
    if guide == "rlg" and not args.lora:
        raise ConfigError("--guide rlg mixes the base model and a fine-tune: give --lora")
    if guide in ("reward-grad", "best-of-n", "smc"):
        if not args.reward:
            raise ConfigError(f"--guide {guide} needs --reward (a reward name or a script path)")
        from flowrl.rewards import resolve_reward

        _, differentiable = resolve_reward(args.reward)  # a misspelt name fails here
        if guide == "reward-grad" and not differentiable:
            raise ConfigError(
                f"--guide reward-grad follows the reward's gradient, and {args.reward!r} is not "
                "differentiable; use --guide best-of-n or --guide smc with it"
            )
        reward_kwargs(args)
    if args.save_trajectory and guide not in ("none", "rlg"):
        raise ConfigError(f"--save-trajectory records plain or RL-guided chains, not --guide {guide}")
    return [p for p in prompts for _ in range(args.num_per_prompt)]


def _load_finetuned(pipe, family: str, path: Path) -> str:
    """Put a flowrl checkpoint's weights into the pipeline: a LoRA (``pytorch_lora_weights.
    safetensors`` in the folder, or that file itself) or, for a full fine-tune, the denoiser's
    diffusers folder (``unet/`` or ``transformer/``). Returns ``"lora"`` or ``"full"``."""
    from flowrl.config import ConfigError
    from flowrl.models import adapter_class

    sub = adapter_class(family).denoiser_subfolder  # the pipeline attribute and checkpoint subfolder
    if path.is_dir() and not (path / LORA_FILE).is_file():
        if not (path / sub / "config.json").is_file():
            raise ConfigError(
                f"--lora {path}: holds neither {LORA_FILE} (a LoRA run) nor {sub}/ (a full fine-tune of a "
                f"{family} model); give a flowrl checkpoint folder (checkpoints/epoch_N), or pass --family "
                "to match the run's model"
            )
        denoiser = getattr(pipe, sub)
        setattr(pipe, sub, type(denoiser).from_pretrained(path / sub).to(denoiser.dtype))
        return "full"
    from diffusers.utils import logging as diffusers_logging

    folder, weight = (path, LORA_FILE) if path.is_dir() else (path.parent, path.name)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "no LoRA keys for the text encoder" notes: checked below
    try:
        pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name="default")
    finally:
        diffusers_logging.set_verbosity(level)
    if not any("lora_" in n for n, _ in getattr(pipe, sub).named_parameters()):
        raise ConfigError(
            f"--lora {path} holds no LoRA weights for this {family} pipeline's {sub}: it was trained on "
            "another model family; pass --family (sd, sdxl, sd3, lcm or flux) as the run's model.family"
        )
    return "lora"


def _sample(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from flowrl.config import ConfigError
    from flowrl.models import FAMILIES, build_adapter, detect_family, load_pipeline
    from flowrl.report import save_image_grid
    from flowrl.samplers import build_sampler

    prompts = _checked_sample_prompts(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family = detect_family(args.model, args.family)
    sampler_name = args.sampler or FAMILIES[family][1][0]
    pipe = load_pipeline(args.model, family, image_size=args.tiny_image_size)
    kind = _load_finetuned(pipe, family, Path(args.lora)) if args.lora else None
    if args.guide == "rlg" and kind == "full":
        raise ConfigError(
            "--guide rlg needs a LoRA checkpoint (its base is the model with the adapter off); "
            f"{args.lora} is a full fine-tune"
        )
    adapter = build_adapter(pipe, family, finetune="frozen").to(device)
    noise = args.eta if sampler_name == "ddim" else args.noise_level
    sampler = build_sampler(
        sampler_name,
        adapter.scheduler_config,
        args.num_steps,
        eta=args.eta,
        noise_level=noise,
        deterministic=noise == 0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chain = None
    if args.guide in ("none", "rlg"):
        if args.guide == "rlg":
            from flowrl.guidance import RLGuidedAdapter

            adapter = RLGuidedAdapter(adapter, args.rlg_weight)
        chain = sampler.sample(adapter, prompts, args.guidance_scale, generator=gen, progress=True)
        images = adapter.decode(chain.latents[:, -1])
    else:
        images = _guided(args, sampler, adapter, prompts, gen)
    from PIL import Image

    for i, img in enumerate(images):
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out / f"{i:04d}.png")
    save_image_grid(images, out / "grid.png", labels=prompts)
    if args.save_trajectory:
        meta = {
            "prompts": json.dumps(prompts),
            "guidance_scale": str(args.guidance_scale),
            "eta": str(args.eta),
            "noise_level": str(args.noise_level),
            "sampler": sampler_name,
            "family": family,
            "num_steps": str(args.num_steps),
            "prediction_type": sampler.prediction_type,
            "logprob_reduction": sampler.logprob_reduction,
            "scheduler_config": json.dumps(dict(sampler.config)),
        }
        save_file(
            {k: v.cpu() for k, v in chain.tensors().items()},
            str(out / "trajectory.safetensors"),
            metadata=meta,
        )
    print(
        f"wrote {len(images)} images to {out}"
        + (" and trajectory.safetensors" if args.save_trajectory else "")
    )
    return 0


def _guided(args: argparse.Namespace, sampler, adapter, prompts: list[str], gen):
    """Images from reward-gradient guidance, best-of-N or SMC, with the reward --reward names."""
    from flowrl.guidance import best_of_n, reward_gradient_guidance, smc_guidance
    from flowrl.rewards import Reward

    reward = Reward([{"name": args.reward, "kwargs": reward_kwargs(args)}], device=adapter.device)
    g = args.guidance_scale
    if args.guide == "reward-grad":
        result = reward_gradient_guidance(
            sampler, adapter, reward, prompts, scale=args.guide_scale, guidance_scale=g, generator=gen
        )
    elif args.guide == "best-of-n":
        result = best_of_n(
            sampler, adapter, reward, prompts, n=args.particles, guidance_scale=g, generator=gen
        )
    else:
        result = smc_guidance(
            sampler,
            adapter,
            reward,
            prompts,
            num_particles=args.particles,
            lam=args.smc_lambda,
            guidance_scale=g,
            generator=gen,
        )
    print(
        f"{args.guide}: mean reward {result.rewards.mean().item():.4f} at {result.nfe:.0f} network evaluations per image"
    )
    return result.images


def _quickstart(args: argparse.Namespace) -> int:
    from flowrl.demo.quickstart import run

    try:
        run(args.epochs, args.out, args.seed)
    except FileExistsError as e:
        print(f"flowrl: error: {e}", file=sys.stderr)
        return 2
    return 0


def reward_kwargs(args: argparse.Namespace) -> dict:
    """--reward-kwargs parsed as a JSON object, or one error naming the option and the fix."""
    from flowrl.config import ConfigError

    try:
        kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--reward-kwargs is not valid JSON ({e.msg} at character {e.pos}): {args.reward_kwargs!r}; "
            """write a JSON object, e.g. --reward-kwargs '{"quality": 80}'"""
        ) from None
    if not isinstance(kwargs, dict):
        raise ConfigError(
            f"--reward-kwargs must be a JSON object of keyword arguments, got {args.reward_kwargs!r}; "
            """e.g. --reward-kwargs '{"quality": 80}'"""
        )
    return kwargs


def _add_guidance_arguments(
    parser: argparse.ArgumentParser, guide_help: str, reward_help: str, what: str
) -> None:
    """The inference-time guidance options ``flowrl sample`` and ``flowrl evaluate`` share."""
    parser.add_argument(
        "--guide", choices=["none", "rlg", "reward-grad", "best-of-n", "smc"], default="none", help=guide_help
    )
    parser.add_argument(
        "--rlg-weight", type=float, default=1.0, help="RL guidance w: 0 base, 1 fine-tuned, >1 stronger"
    )
    parser.add_argument("--reward", help=reward_help)
    parser.add_argument("--reward-kwargs", default="{}", help="the reward's options as JSON")
    parser.add_argument(
        "--guide-scale", type=float, default=0.1, help=f"reward-gradient step (units of the {what}'s RMS)"
    )
    parser.add_argument("--particles", type=int, default=4, help="N for best-of-n, particles for smc")
    parser.add_argument("--smc-lambda", type=float, default=10.0, help="SMC potential sharpness lambda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowrl", description="RL fine-tuning of denoising generative models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="fine-tune a model on a task file")
    tr.add_argument("task", help="task file (tasks/<name>.yaml) or the name of a built-in task")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_epochs=5")
    tr.add_argument("--resume", help="checkpoint folder, or 'auto' for the run's latest complete checkpoint")
    tr.set_defaults(func=_train)

    pt = sub.add_parser(
        "pretrain", help="behavior-clone a robot policy on demonstrations (kind: robot tasks)"
    )
    pt.add_argument("task", help="robot task file (tasks/robot_*.yaml) or its name")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.steps=1000")
    pt.set_defaults(func=_pretrain)

    ev = sub.add_parser(
        "evaluate", help="evaluation rollouts of a robot policy, optionally reward-guided (kind: robot tasks)"
    )
    ev.add_argument("task", help="robot task file (tasks/robot_*.yaml) or its name")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. env.max_episode_steps=200")
    ev.add_argument("--policy", help="policy folder (policy.json): a checkpoint; default: the BC policy")
    ev.add_argument("--episodes", type=int, help="evaluation episodes (default: train.eval_episodes)")
    ev.add_argument(
        "--seed",
        type=int,
        help="reset seeds seed, seed+1, ... (default: train.eval_seed, the starts training evaluates on)",
    )
    _add_guidance_arguments(
        ev,
        guide_help="inference-time guidance: RL guidance, reward gradient, best-of-N, SMC over action chunks",
        reward_help="action reward: target | smoothness | simulated_return",
        what="chunk",
    )
    ev.add_argument(
        "--base",
        help="rlg: the base policy folder (default: a DPPO fine-tune's frozen copy, else the BC policy)",
    )
    ev.add_argument(
        "--stochastic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample every denoising step (default: for smc, and best-of-n on a DDPM policy; else the mean path)",
    )
    ev.add_argument("--out", help="also write the result as JSON to this file")
    ev.set_defaults(func=_evaluate)

    sa = sub.add_parser("sample", help="generate images from a base model plus an optional trained LoRA")
    sa.add_argument("--model", default="tiny", help="diffusers pipeline: hub id, local folder, or 'tiny'")
    sa.add_argument(
        "--lora",
        help="fine-tuned weights: a flowrl checkpoint folder (LoRA or full fine-tune) or a pytorch_lora_weights.safetensors file",
    )
    sa.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sa.add_argument("--prompts-file", help="a file with one prompt per line")
    sa.add_argument("-n", "--num-per-prompt", type=int, default=1)
    sa.add_argument("--num-steps", type=int, default=20)
    sa.add_argument("--family", default="auto", help="model family: auto | sd | sdxl | sd3 | lcm | flux")
    sa.add_argument("--sampler", help="ddim | flow_sde | flow_cps | lcm (default: the family's)")
    sa.add_argument("--eta", type=float, default=0.0, help="DDIM eta; 0 = deterministic DDIM (evaluation)")
    sa.add_argument("--noise-level", type=float, default=0.0, help="flow samplers' noise level; 0 = the ODE")
    sa.add_argument("--guidance-scale", type=float, default=1.0)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--tiny-image-size", type=int, default=32)
    sa.add_argument("--device")
    sa.add_argument("--out", default="samples")
    _add_guidance_arguments(
        sa,
        guide_help="inference-time guidance: RL guidance (needs --lora), reward gradient, best-of-N, SMC",
        reward_help="reward for reward-grad / best-of-n / smc: a name or a script path",
        what="sample",
    )
    sa.add_argument(
        "--save-trajectory",
        action="store_true",
        help="also save latents per step, timesteps and log-probs (safetensors)",
    )
    sa.set_defaults(func=_sample)

    from flowrl.demo.quickstart import add_arguments

    qs = sub.add_parser(
        "quickstart",
        help="pre-train a tiny text-to-image model of digits, fine-tune it with DDPO and report (CPU, minutes)",
    )
    add_arguments(qs).set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flowrl.config import ConfigError
    from flowrl.rewards import RewardError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RewardError, FileNotFoundError) as e:
        print(f"flowrl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

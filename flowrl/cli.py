"""The ``flowrl`` command: one CLI for every task kind.

    flowrl train TASK [key=value ...] [--resume auto]     any task (text-to-image or environment)
    flowrl seeds TASK [key=value ...] --seeds 0,1,2       several seeds, aggregated (mean, 95% interval, plot)
    flowrl pretrain TASK [key=value ...]                  behavior-clone a policy (kind: env)
    flowrl evaluate TASK [--policy DIR] [--guide ...]     evaluation rollouts of a policy (kind: env)
    flowrl sample --model tiny --prompt "a cat" [...]     images from a model, optionally guided
    flowrl quickstart                                     the digits demo, minutes on a CPU
    flowrl serve-reward aesthetic [--port 8765]           a reward over HTTP (the ``remote`` reward)

    torchrun --nproc_per_node 2 -m flowrl.cli train TASK  (or accelerate launch) for several processes

A user's mistake is one ``flowrl: error:`` line naming the cause and the fix, exit code 2, for
every command (:func:`main` is the one boundary: a :class:`~flowrl.errors.FlowrlError`, a usage
mistake, or an operating-system error on a path the user chose: a full disk, a read-only or
missing folder). Anything else is a bug in flowrl: its traceback, a line asking to report it,
exit code 1. Ctrl-C is one line and exit code 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import typing
from pathlib import Path

from flowrl.errors import ConfigError, FlowrlError, one_line

# ---------------------------------------------------------------------- train / pretrain / evaluate


def _task_config(args: argparse.Namespace, extra: list[str] | None = None):
    from flowrl.config import load_config, resolve_task_path

    cfg = load_config(args.task, [*args.overrides, *(extra or [])])
    return cfg, resolve_task_path(args.task).stem


def _train(args: argparse.Namespace) -> int:
    from flowrl.run import Run

    extra = [f"train.resume={args.resume}"] if args.resume else []
    if args.allow_config_change:
        extra.append("train.resume_allow_changes=true")
    cfg, name = _task_config(args, extra)
    run = Run(cfg, task_name=name)
    history = run.train()
    if run.accelerator.is_main_process:
        for line in run.collector.summary(history):
            print(line)
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from flowrl.seeds import parse_seeds, run_seeds, summary_markdown

    summary = run_seeds(args.task, args.overrides, parse_seeds(args.seeds), args.parallel, args.pretrain)
    print(summary_markdown(summary), end="")
    print(f"summary: {summary['root']} (summary.md, summary.json, curves.png, seed_*/)")
    return 1 if summary["failed_seeds"] else 0


def _need_env(cfg, command: str) -> None:

    if cfg.kind != "env":
        raise ConfigError(
            f"flowrl {command} is for kind: env tasks (policies in environments); this task is kind: {cfg.kind}"
        )


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from flowrl.pretrain import bc_quality_lines, pretrain

    cfg, name = _task_config(args)
    _need_env(cfg, "pretrain")
    if cfg.train.torch_threads is not None:
        torch.set_num_threads(cfg.train.torch_threads)
    summary = pretrain(cfg, task_name=name)
    print(
        f"BC loss {summary['bc_loss_first']:.4f} -> {summary['bc_loss_last']:.4f} on {summary['demo_episodes']} demonstrations"
    )
    for line in bc_quality_lines(summary):  # the expert's return and the BC policy's
        print(line)
    print(
        f"policy folder: {summary['folder']} (policy.safetensors, policy.json, eval.json, metrics.jsonl, bc_quality.png)"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Evaluation rollouts of a saved policy (``--policy``, default the BC policy), optionally
    guided: ``rlg`` mixes it with the BC policy (``--base``), ``reward-grad`` / ``best-of-n`` /
    ``smc`` steer every chunk with an action reward from ``ACTION_REWARDS``."""
    import torch

    from flowrl.envs.rollouts import evaluate, format_return
    from flowrl.guidance import ChunkReward, GuidedSampler, RLGuidedAdapter
    from flowrl.guidance.actions import ACTION_REWARDS, action_reward_factory
    from flowrl.models.policy import load_policy
    from flowrl.samplers import sampler_for

    _check_numbers(args)
    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}; e.g. --episodes 10")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out {args.out} is a folder; give a .json file path")
        check_output_folder(str(out.parent), "--out's folder")
    if args.policy and not (Path(args.policy) / "policy.json").is_file():
        raise ConfigError(
            f"--policy {args.policy} holds no policy.json; give a policy folder (the BC folder or a checkpoint)"
        )
    if args.video:
        from flowrl.envs.rollouts import check_video_path, render_available

        check_output_folder(str(check_video_path(args.video).parent), "--video's folder")
        if not render_available():
            raise ConfigError(
                "--video: MuJoCo cannot render here; set MUJOCO_GL=egl (headless GPU/CPU) or osmesa"
            )
    cfg, name = _task_config(args)
    _need_env(cfg, "evaluate")
    factory = None
    if args.guide not in ("none", "rlg"):  # the action reward, before any policy loads
        if not args.reward:
            raise ConfigError(
                f"flowrl evaluate: --guide {args.guide} needs --reward, one of {sorted(ACTION_REWARDS)} "
                "or a script file.py defining action_reward(obs, actions)"
            )
        factory = action_reward_factory(args.reward)
        kwargs = reward_kwargs(args)
    if cfg.train.torch_threads is not None:
        torch.set_num_threads(cfg.train.torch_threads)
    d = cfg.train.device
    device = "cuda" if d == "cuda" or (d == "auto" and torch.cuda.is_available()) else "cpu"
    bc_dir = cfg.bc_dir(name)
    _check_evaluate_memory(cfg, Path(args.policy) if args.policy else bc_dir, args, device)
    policy = load_policy(Path(args.policy) if args.policy else bc_dir, device)
    sampler = sampler_for(cfg, policy)
    if args.guide == "rlg":
        base = None
        if args.base or not policy.has_reference:
            base = load_policy(Path(args.base) if args.base else bc_dir, device)
        policy = RLGuidedAdapter(policy, args.rlg_weight, base=base)
    elif factory is not None:
        if args.reward in ("simulated_return", "lqr_value"):
            kwargs.setdefault("env_id", cfg.env.id)
        reward = _build_action_reward(args.reward, factory, kwargs)
        timeout, option = (
            (args.reward_timeout, "--reward-timeout")
            if args.reward_timeout is not None
            else (cfg.reward_timeout, "reward_timeout")
        )
        options = {
            "reward-grad": {"scale": args.guide_scale, "through_model": args.through_model},
            "best-of-n": {"n": args.particles},
            "smc": {"num_particles": args.particles, "lam": args.smc_lambda},
        }[args.guide]
        sampler = GuidedSampler(
            sampler,
            args.guide,
            ChunkReward(reward, args.reward, timeout, option),
            stochastic=args.stochastic,
            **options,
        )
    n = args.episodes or cfg.env.eval_episodes
    seed = cfg.eval_seed if args.seed is None else args.seed  # default: training's evaluation starts
    result = evaluate(policy, sampler, cfg, n, seed)
    print(
        f"{args.guide}: {n} evaluation episodes (seeds {seed}..{seed + n - 1}): return {format_return(result, '')}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"guide": args.guide, **result}, indent=2))
    if args.video:  # the BC policy and the evaluated one side by side, from the first evaluation start
        from flowrl.envs.rollouts import record_comparison

        label = ("fine-tuned" if args.policy else "BC policy") + (
            "" if args.guide == "none" else f", {args.guide}"
        )
        runs = [(label, policy, sampler)]
        if args.policy:
            bc = load_policy(Path(args.base) if args.base else bc_dir, device)
            runs.insert(0, ("BC policy", bc, sampler_for(cfg, bc)))
        returns = record_comparison(runs, cfg, args.video, seed)
        shown = ", ".join(f"{r[0]} {g:.1f}" for r, g in zip(runs, returns))
        print(f"video: {args.video} (reset seed {seed}; returns: {shown})")
    return 0


def _check_evaluate_memory(cfg, folder: Path, args: argparse.Namespace, device: str) -> None:
    """The episodes (one environment each, all at once) and particles that cannot fit: refused
    before the policy loads (:mod:`flowrl.memory`; train.skip_memory_check=true skips it)."""
    from flowrl import memory
    from flowrl.errors import read_json

    if cfg.train.skip_memory_check or not (folder / "policy.json").is_file():
        return
    arch = read_json(folder / "policy.json", "policy file")
    if not isinstance(arch, dict) or "obs_dim" not in arch or "action_dim" not in arch:
        return  # load_policy names what is missing
    particles = args.particles if args.guide in ("best-of-n", "smc") else 1
    n = args.episodes or cfg.env.eval_episodes
    est = memory.estimate_env(cfg, int(arch["obs_dim"]), int(arch["action_dim"]), n, particles)
    memory.check(est, device, "train.skip_memory_check=true", what="evaluation")


def _build_action_reward(spec: str, factory, kwargs: dict):
    """An action reward from its factory; options it does not take, a raise or ``sys.exit()`` in
    it are one error naming the reward."""
    from flowrl.rewards import RewardError

    try:
        return factory(**kwargs)
    except FlowrlError:
        raise
    except TypeError as e:
        raise ConfigError(
            f"--reward {spec}: its options {kwargs} do not fit ({e}); fix --reward-kwargs"
        ) from e
    except BaseException as e:
        what = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        raise RewardError(
            f"action reward {spec!r} failed to build: {what}; fix the reward or --reward-kwargs"
        ) from e


# ---------------------------------------------------------------------- sample

LORA_FILE = "pytorch_lora_weights.safetensors"

# flowrl sample's model and sampler options: each is a field of the task schema, with its type,
# help and default from the dataclass (a default given here is sample's own, and says why)
SAMPLE_OPTIONS = {
    "--model": ("model", "pretrained", {}),
    "--family": ("model", "family", {}),
    "--tiny-image-size": ("model", "tiny_image_size", {}),
    "--sampler": ("sampler", "name", {}),
    "--num-steps": ("sampler", "num_steps", {}),
    "--eta": (
        "sampler",
        "eta",
        {
            "default": None,
            "why": "default 0: deterministic DDIM, as evaluation samples; 1 for --guide smc, whose "
            "resampling needs noise",
        },
    ),
    "--noise-level": (
        "sampler",
        "noise_level",
        {
            "default": None,
            "why": "default 0: the ODE, as evaluation samples; for --guide smc the sampler's training "
            "level (flow_sde 0.7, flow_cps 0.8)",
        },
    ),
    "--guidance-scale": ("sampler", "guidance_scale", {}),
}


def _add_config_options(parser: argparse.ArgumentParser, options: dict) -> None:
    """Add ``--flag`` options derived from config dataclass fields (type, help and default)."""
    import dataclasses

    from flowrl import config as C

    sections = {"model": C.ModelConfig, "sampler": C.SamplerConfig}
    for flag, (section, name, extra) in options.items():
        cls = sections[section]
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        hint = typing.get_type_hints(cls)[name]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        default = extra.get("default", f.default)
        doc = C.field_docs(cls)[name]
        help = f"{doc} [{section}.{name}; {extra['why'] if 'why' in extra else f'default {default}'}]"
        parser.add_argument(flag, type=base, default=default, help=help, dest=f"{section}_{name}")


def _checked_sample_prompts(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """The prompts of ``flowrl sample`` and their metadata, each repeated --num-per-prompt times,
    after checking every option that needs no weights (so a mistake costs no model load)."""

    prompts = list(args.prompt or [])
    metadata: list[dict] = [{} for _ in prompts]
    if args.prompts_file:
        from flowrl.data.prompts import load_prompt_data

        if not Path(args.prompts_file).is_file():
            raise ConfigError(
                f"--prompts-file {args.prompts_file}: no such file; give a text file with one prompt per line "
                'or a JSONL file with one {"prompt": ..., metadata fields} per line'
            )
        data = load_prompt_data(args.prompts_file, "--prompts-file")
        prompts, metadata = prompts + data.prompts, metadata + data.metadata
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
    _check_numbers(args)
    if args.num_per_prompt < 1:
        raise ConfigError(f"-n/--num-per-prompt must be >= 1, got {args.num_per_prompt}; e.g. -n 4")
    steps = args.sampler_num_steps
    if steps is not None and steps < 1:
        raise ConfigError(f"--num-steps must be >= 1, got {steps}; e.g. --num-steps 20")
    res = args.resolution
    if res is not None and (len(res) > 2 or min(res) < 1 or max(res) > 8192):
        raise ConfigError(
            f"--resolution takes one size (a square) or HEIGHT WIDTH in pixels in [1, 8192], got {res}; "
            "e.g. --resolution 512 or --resolution 512 768"
        )
    size = args.model_tiny_image_size
    if size < 8 or size % 8 or size > MAX_TINY_IMAGE_SIZE:
        raise ConfigError(
            f"--tiny-image-size must be a multiple of 8 in [8, {MAX_TINY_IMAGE_SIZE}], got {size}; e.g. --tiny-image-size 32"
        )
    if args.sampler_guidance_scale is not None and args.sampler_guidance_scale < 1:
        raise ConfigError(
            f"--guidance-scale must be >= 1 (1 = no classifier-free guidance), got {args.sampler_guidance_scale}"
        )
    if args.device and args.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {args.device!r}: give cpu, cuda or cuda:N")
    check_output_folder(args.out, "--out")
    n = args.num_per_prompt
    return [p for p in prompts for _ in range(n)], [m for m in metadata for _ in range(n)]


MAX_TINY_IMAGE_SIZE = 512  # the tiny model's activations grow with the square: 65536 would need terabytes
SAMPLE_REWARD_TIMEOUT = 1800.0  # flowrl sample's default --reward-timeout: the task schema's reward_timeout


def _check_numbers(args: argparse.Namespace) -> None:
    """The guidance options of sample and evaluate: finite, in range, before anything loads."""
    for flag, value in [
        ("--rlg-weight", args.rlg_weight),
        ("--guide-scale", args.guide_scale),
        ("--smc-lambda", args.smc_lambda),
    ]:
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if args.particles < 1:
        raise ConfigError(f"--particles must be >= 1, got {args.particles}; e.g. --particles 4")
    if args.reward_timeout is not None and not 0 < args.reward_timeout < math.inf:
        raise ConfigError(
            f"--reward-timeout must be a positive number of seconds, got {args.reward_timeout}; e.g. --reward-timeout 600"
        )
    if args.guide == "reward-grad" and args.guide_scale <= 0:
        raise ConfigError(
            f"--guide-scale must be > 0 for --guide reward-grad, got {args.guide_scale}; e.g. 0.1"
        )
    if args.guide == "smc" and args.smc_lambda <= 0:
        raise ConfigError(f"--smc-lambda must be > 0, got {args.smc_lambda}; e.g. --smc-lambda 10")


def check_output_folder(out: str, flag: str) -> None:
    """An output folder that is a file, or under a file or a read-only folder, fails here, before
    any work (the folder itself is made only when there is something to write)."""
    import os

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder; give a folder path")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{flag} {out}: {parent} is a file, so no folder can be made under it; give another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {parent} is not writable; give a folder you can write to")


def _load_finetuned(pipe, family: str, path: Path) -> str:
    """Put a flowrl checkpoint's weights into the pipeline: a LoRA (``pytorch_lora_weights.
    safetensors`` in the folder, or that file itself) or, for a full fine-tune, the denoiser's
    diffusers folder (``unet/`` or ``transformer/``). Returns ``"lora"`` or ``"full"``."""
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

    from flowrl.models import FAMILIES, build_adapter, detect_family, load_pipeline
    from flowrl.samplers import build_sampler

    prompts, metadata = _checked_sample_prompts(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family = detect_family(args.model_pretrained, args.model_family)
    if FAMILIES[family].kind != "text_to_image":
        raise ConfigError(f"flowrl sample draws images; --family {family} is a policy (use flowrl evaluate)")
    sampler_name = args.sampler_name or FAMILIES[family].samplers[0]
    _check_sample_memory(args, family, len(prompts), device)
    pipe = load_pipeline(args.model_pretrained, family, image_size=args.model_tiny_image_size)
    kind = _load_finetuned(pipe, family, Path(args.lora)) if args.lora else None
    if args.guide == "rlg" and kind == "full":
        raise ConfigError(
            "--guide rlg needs a LoRA checkpoint (its base is the model with the adapter off); "
            f"{args.lora} is a full fine-tune"
        )
    res = args.resolution
    resolution = None if res is None else res[0] if len(res) == 1 else list(res)
    adapter = build_adapter(pipe, family, finetune="frozen", resolution=resolution).to(device)
    eta, noise = _sample_noise(args, sampler_name)
    sampler = build_sampler(
        sampler_name,
        adapter.scheduler_config,
        args.sampler_num_steps,
        eta=eta,
        noise_level=noise,
        deterministic=(eta if sampler_name == "ddim" else noise) == 0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    chain = None
    g = args.sampler_guidance_scale
    if args.guide in ("none", "rlg"):
        if args.guide == "rlg":
            from flowrl.guidance import RLGuidedAdapter

            adapter = RLGuidedAdapter(adapter, args.rlg_weight)
        chain = sampler.sample(adapter, prompts, g, generator=gen, progress=True)
        images = adapter.decode(chain.latents[:, -1])
    else:
        images = _guided(args, sampler, adapter, prompts, gen, metadata)
    created = not out.exists()  # made only once there is something to write; removed if writing fails
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_samples(out, images, prompts, chain, args, sampler, sampler_name, family)
    except BaseException:
        if created:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    print(
        f"wrote {len(images)} images to {out}"
        + (" and trajectory.safetensors" if args.save_trajectory else "")
    )
    return 0


def _sample_noise(args: argparse.Namespace, sampler_name: str) -> tuple[float, float | None]:
    """flowrl sample's --eta and --noise-level: 0 (the deterministic chain evaluation samples)
    unless given, but for --guide smc the training sampler's noise (eta 1; the flow samplers' own
    level): SMC's resampling differs from best-of-N only when the particles' steps draw noise, as
    ``flowrl evaluate`` samples SMC's chunks stochastically. An explicit 0 with smc is refused."""
    smc = args.guide == "smc"
    eta = args.sampler_eta if args.sampler_eta is not None else 1.0 if smc else 0.0
    noise = args.sampler_noise_level if args.sampler_noise_level is not None else None if smc else 0.0
    if smc and (eta if sampler_name == "ddim" else noise) == 0:
        flag = "--eta" if sampler_name == "ddim" else "--noise-level"
        raise ConfigError(
            f"--guide smc with {flag} 0: every step is deterministic, so resampled particles stay identical "
            f"copies and SMC is best-of-N; drop {flag} (smc's default samples with noise) or use --guide best-of-n"
        )
    args.sampler_eta, args.sampler_noise_level = eta, noise
    return eta, noise


def _check_sample_memory(args: argparse.Namespace, family: str, num_images: int, device) -> None:
    """Sizes that cannot fit (every image of the command samples in one chain): refused before the
    model loads (:mod:`flowrl.memory`; --skip-memory-check skips it)."""
    from flowrl import memory

    if args.skip_memory_check:
        return
    sizes = memory.read_model_sizes(args.model_pretrained, args.model_tiny_image_size)
    if sizes is None:
        return
    particles = args.particles if args.guide in ("best-of-n", "smc") else 1
    steps = args.sampler_num_steps or 20
    est = memory.estimate_sample(
        num_images,
        particles,
        steps,
        args.sampler_guidance_scale,
        family,
        sizes,
        args.model_pretrained == "tiny",
        gradient=args.guide == "reward-grad",
    )
    memory.check(est, str(device), "--skip-memory-check", what="command")


def _write_samples(out: Path, images, prompts, chain, args, sampler, sampler_name: str, family: str) -> None:
    """``flowrl sample``'s files: one PNG per image, grid.png, and the chain when asked."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from flowrl.report import save_image_grid

    eta, noise, g = args.sampler_eta, args.sampler_noise_level, args.sampler_guidance_scale
    for i, img in enumerate(images):
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out / f"{i:04d}.png")
    save_image_grid(images, out / "grid.png", labels=prompts)
    if args.save_trajectory:
        meta = {
            "prompts": json.dumps(prompts),
            "guidance_scale": str(g),
            "eta": str(eta),
            "noise_level": str(noise),
            "sampler": sampler_name,
            "family": family,
            "num_steps": str(args.sampler_num_steps),
            "prediction_type": sampler.prediction_type,
            "logprob_reduction": sampler.logprob_reduction,
            "scheduler_config": json.dumps(dict(sampler.config)),
        }
        save_file(
            {k: v.cpu() for k, v in chain.tensors().items()},
            str(out / "trajectory.safetensors"),
            metadata=meta,
        )


def _guided(args: argparse.Namespace, sampler, adapter, prompts: list[str], gen, metadata: list[dict]):
    """Images from reward-gradient guidance, best-of-N or SMC, with the reward --reward names."""
    from flowrl.guidance import GuidedSampler
    from flowrl.rewards import Reward

    timeout = SAMPLE_REWARD_TIMEOUT if args.reward_timeout is None else args.reward_timeout
    reward = Reward(
        [{"name": args.reward, "kwargs": reward_kwargs(args)}],
        device=adapter.device,
        timeout=timeout,
        timeout_option="--reward-timeout",
    )
    options = {
        "reward-grad": {"scale": args.guide_scale},
        "best-of-n": {"n": args.particles},
        "smc": {"num_particles": args.particles, "lam": args.smc_lambda},
    }[args.guide]
    from flowrl.data.prompts import WithPromptMetadata

    reward = WithPromptMetadata(reward, prompts, metadata)  # the --prompts-file's metadata, by prompt
    guide = GuidedSampler(sampler, args.guide, reward, stochastic=True, **options)
    result = guide.guide(adapter, prompts, gen, args.sampler_guidance_scale)
    print(
        f"{args.guide}: mean reward {result.rewards.mean().item():.4f} at {result.nfe:.0f} network evaluations per image"
    )
    return result.images


def _serve_reward(args: argparse.Namespace) -> int:
    """Serve a reward over HTTP until Ctrl-C (:mod:`flowrl.rewards.server`)."""
    import torch

    from flowrl.rewards.server import RewardServer, is_loopback

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    server = RewardServer(
        args.reward,
        reward_kwargs(args),
        args.host,
        args.port,
        args.max_batch,
        args.max_wait_ms / 1000,
        device,
        args.max_request_mb,
    )
    if not is_loopback(args.host):
        print(
            f"flowrl: warning: --host {args.host} serves the reward beyond this machine, to anyone who can "
            "reach the port, without authentication; bind 127.0.0.1 (the default) unless the network is trusted",
            file=sys.stderr,
        )
    print(f"flowrl: serving reward {args.reward!r} on {device} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


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
    parser: argparse.ArgumentParser, guide_help: str, reward_help: str, what: str, scale: float = 0.1
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
        "--reward-timeout",
        type=float,
        help="seconds one scoring call of the guidance reward may take before the command stops, naming it "
        "(default: the task's reward_timeout; sample: 1800)",
    )
    parser.add_argument(
        "--guide-scale",
        type=float,
        default=scale,
        help=f"reward-gradient step (units of the {what}'s RMS; default {scale:g})",
    )
    parser.add_argument("--particles", type=int, default=4, help="N for best-of-n, particles for smc")
    parser.add_argument("--smc-lambda", type=float, default=10.0, help="SMC potential sharpness lambda")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowrl", description="RL fine-tuning of denoising generative models.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="fine-tune a model on a task file (text-to-image or environment)")
    tr.add_argument("task", help="task file (tasks/<name>.yaml) or the name of a built-in task")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_epochs=5")
    tr.add_argument("--resume", help="checkpoint folder, or 'auto' for the run's latest complete checkpoint")
    tr.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the checkpoint's in keys that break exactness "
        "(train.resume_allow_changes)",
    )
    tr.set_defaults(func=_train)

    se = sub.add_parser(
        "seeds", help="train a task from several seeds and aggregate (mean, 95%% interval, plot)"
    )
    se.add_argument("task", help="task file (tasks/<name>.yaml) or the name of a built-in task")
    se.add_argument(
        "overrides", nargs="*", help="key=value overrides for every seed, e.g. train.num_epochs=5"
    )
    se.add_argument("--seeds", default="0,1,2", help="training seeds: 0,1,2 or a range 0-4 (default 0,1,2)")
    se.add_argument(
        "--parallel",
        type=int,
        help="seeds run at once, as processes sharing the cores (default: kind env as many as the cores "
        "allow, text-to-image 1)",
    )
    se.add_argument(
        "--pretrain", action="store_true", help="kind: env: behavior-clone a BC policy per seed first"
    )
    se.set_defaults(func=_seeds)

    pt = sub.add_parser("pretrain", help="behavior-clone a policy on demonstrations (kind: env tasks)")
    pt.add_argument("task", help="environment task file (tasks/robot_*.yaml) or its name")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.steps=1000")
    pt.set_defaults(func=_pretrain)

    ev = sub.add_parser(
        "evaluate", help="evaluation rollouts of a policy, optionally reward-guided (kind: env tasks)"
    )
    ev.add_argument("task", help="environment task file (tasks/robot_*.yaml) or its name")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. env.max_episode_steps=200")
    ev.add_argument("--policy", help="policy folder (policy.json): a checkpoint; default: the BC policy")
    ev.add_argument("--episodes", type=int, help="evaluation episodes (default: env.eval_episodes)")
    ev.add_argument(
        "--seed",
        type=int,
        help="reset seeds seed, seed+1, ... (default: train.eval_seed, the starts training evaluates on)",
    )
    _add_guidance_arguments(
        ev,
        guide_help="inference-time guidance: RL guidance, reward gradient, best-of-N, SMC over action chunks",
        reward_help="action reward: target | smoothness | simulated_return | lqr_value, or a script "
        "file.py[:name] defining action_reward(obs, actions) or make_action_reward(**kwargs)",
        what="chunk",
        scale=0.03,  # BENCHMARKS.md section 6: 0.03-0.05 on the pendulum's BC policy, 0.1 already overshoots
    )
    ev.add_argument(
        "--through-model",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="reward-grad: DPS's gradient through the policy network (default: at the predicted chunk only; "
        "through a few-step flow it points nowhere, BENCHMARKS.md section 6)",
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
    ev.add_argument(
        "--video",
        help="also render the episode from the first evaluation start to this .gif (.mp4 with PyAV): with "
        "--policy, the BC policy (or --base) and the policy side by side",
    )
    ev.set_defaults(func=_evaluate)

    sa = sub.add_parser("sample", help="generate images from a base model plus an optional trained LoRA")
    _add_config_options(sa, SAMPLE_OPTIONS)
    sa.add_argument(
        "--resolution",
        type=int,
        nargs="+",
        metavar="PX",
        help="image size in pixels: one int (a square) or HEIGHT WIDTH [model.resolution; default: the model's own]",
    )
    sa.add_argument(
        "--lora",
        help="fine-tuned weights: a flowrl checkpoint folder (LoRA or full fine-tune) or a pytorch_lora_weights.safetensors file",
    )
    sa.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sa.add_argument("--prompts-file", help="a file with one prompt per line")
    sa.add_argument("-n", "--num-per-prompt", type=int, default=1)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--device")
    sa.add_argument("--out", default="samples")
    _add_guidance_arguments(
        sa,
        guide_help="inference-time guidance: RL guidance (needs --lora), reward gradient, best-of-N, SMC",
        reward_help="reward for reward-grad / best-of-n / smc: a name or a script path",
        what="sample",
    )
    sa.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="skip the memory estimate that refuses sizes that cannot fit before the model loads "
        "(an order-of-magnitude estimate, flowrl.memory)",
    )
    sa.add_argument(
        "--save-trajectory",
        action="store_true",
        help="also save latents per step, timesteps and log-probs (safetensors)",
    )
    sa.set_defaults(func=_sample)

    sr = sub.add_parser(
        "serve-reward",
        help="serve a reward over HTTP, for the remote reward (a heavy model in its own process or machine)",
    )
    sr.add_argument("reward", help="a registered reward name or a reward script path (as rewards[].name)")
    sr.add_argument("--reward-kwargs", "--kwargs", default="{}", help="the reward's options as JSON")
    sr.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sr.add_argument("--port", type=int, default=8765, help="port (0: a free one, printed)")
    sr.add_argument("--max-batch", type=int, default=64, help="images scored per batch at most")
    sr.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to join its batch"
    )
    sr.add_argument("--device", help="where the reward runs (default cuda if available, else cpu)")
    sr.add_argument("--max-request-mb", type=float, default=1024.0, help="largest request accepted")
    sr.set_defaults(func=_serve_reward)

    from flowrl.demo.quickstart import add_arguments

    qs = sub.add_parser(
        "quickstart",
        help="fine-tune a tiny text-to-image model of digits with DDPO and report (CPU, minutes)",
    )
    add_arguments(qs).set_defaults(func=_quickstart)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage mistakes are one ``flowrl: error:`` line like every other."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}; see {self.prog} --help")


# operating-system errors on paths the user chose, and what to do about each
OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space, or write to another disk (train.output_dir, --out)",
    errno.EDQUOT: "the disk quota is exceeded: free space, or write to another disk (train.output_dir, --out)",
    errno.EACCES: "permission denied: choose a folder you can write to (train.output_dir, --out)",
    errno.EPERM: "permission denied: choose a folder you can write to (train.output_dir, --out)",
    errno.EROFS: "the file system is read-only: choose another folder (train.output_dir, --out)",
    errno.ENOTDIR: "a file is where a folder should be: remove it or choose another path",
    errno.EISDIR: "a folder is where a file should be: remove it or choose another path",
    errno.EEXIST: "something is in the way: remove it or choose another path",
    errno.ENOENT: "check the path",
}


def user_error_message(e: BaseException) -> str | None:
    """The one line for an error the user caused, or None for a bug (which keeps its traceback)."""
    if isinstance(e, FlowrlError):
        return one_line(e)
    if isinstance(e, OSError) and e.errno in OS_FIXES:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or one_line(e)}{where}; {OS_FIXES[e.errno]}"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (
            f"out of memory ({one_line(e)[:160]}); lower train.sample_batch_size, train.minibatch_size "
            "or the image size, or set train.gradient_checkpointing=true"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """The ``flowrl`` command; returns the exit code (0, 2 for a user's mistake, 1 for a bug)."""
    import traceback

    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        return args.func(args)
    except KeyboardInterrupt:
        print("flowrl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        msg = user_error_message(e)
        if msg is not None:
            print(f"flowrl: error: {msg}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"flowrl: internal error ({type(e).__name__}): this is a bug in flowrl, not in your input; please "
            "report it to flowrl's maintainers with the command and the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

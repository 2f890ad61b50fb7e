"""Task configuration: nested dataclasses, loaded from YAML with ``key=value`` overrides.

Every field has a one-line docstring (the comment above it); unknown keys are rejected with a
suggestion, types are checked, and ``validate()`` names the field and the fix for bad values
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowrl.core.schedule import LR_SCHEDULES


class ConfigError(ValueError):
    """A task file or override is wrong; the message names the key and the fix."""


@dataclass
class ModelConfig:
    # diffusers pipeline: a hub id, a local folder with model_index.json, "tiny" (random, from config) or "digits"
    pretrained: str = "tiny"
    # auto (read model_index.json) | sd | sdxl | sd3 | lcm | flux; with pretrained=tiny it picks the tiny family
    family: str = "auto"
    # hub revision (branch, tag or commit) when `pretrained` is a hub id
    revision: str | None = None
    # override the scheduler's prediction type: epsilon | v_prediction | sample (null: as the pipeline says)
    prediction_type: str | None = None
    # lora (peft adapter, the reference policy is the adapter disabled) or full fine-tuning
    finetune: str = "lora"
    # LoRA rank r
    lora_rank: int = 4
    # LoRA alpha (scale alpha / r); null means alpha = r
    lora_alpha: float | None = None
    # image size of the tiny pipeline, pixels (latents are half)
    tiny_image_size: int = 32
    # seed used to initialize the tiny pipeline's random weights
    tiny_seed: int = 0


@dataclass
class SamplerConfig:
    # ddim (SD/SDXL, DDPO) | flow_sde (SD3/Flux, Flow-GRPO) | flow_cps (SD3/Flux, coefficient-preserving) | lcm (RLCM)
    name: str = "ddim"
    # K, denoising steps per training sample
    num_steps: int = 20
    # denoising steps for evaluation images (null: num_steps); Flow-GRPO trains on fewer steps than it evaluates
    eval_num_steps: int | None = None
    # DDIM eta during training samples (0 would be deterministic and have no log-prob)
    eta: float = 1.0
    # flow samplers' noise level a (null: Flow-GRPO's 0.7 for flow_sde, 0.8 for flow_cps)
    noise_level: float | None = None
    # flow samplers: 0 = every step stochastic; w > 0 = a window of w SDE steps per batch (Flow-GRPO-Fast), only those trained
    sde_window: int = 0
    # flow samplers: latest start of the SDE window (null: num_steps // 2)
    window_max_start: int | None = None
    # classifier-free guidance scale, used for sampling and for re-evaluating log-probs (1 = off)
    guidance_scale: float = 5.0


@dataclass
class RewardConfig:
    # a registered reward name (jpeg_compressibility, aesthetic, clip_score, ...) or a path file.py[:function]
    name: str = "jpeg_compressibility"
    # weight of this term in the summed reward
    weight: float = 1.0
    # keyword options passed to the reward's factory
    kwargs: dict = field(default_factory=dict)


@dataclass
class AlgorithmConfig:
    # ddpo (PPO-clip, per-prompt statistics) | grpo (group-relative) | loop (leave-one-out) | reinforce
    name: str = "ddpo"
    # PPO clip range on per-step ratios (DDPO: 1e-4 with mean-reduced log-probs); null = no clipping
    clip_range: float | None = 1e-4
    # advantages are clipped to [-adv_clip_max, adv_clip_max]
    adv_clip_max: float = 5.0
    # samples per prompt in each batch (grpo and loop need >= 2)
    group_size: int = 1
    # grpo: divide by the group's std, the batch's std, or none
    std_scope: str = "group"
    # reinforce: subtract the batch-mean reward as a baseline
    reinforce_baseline: bool = True
    # ddpo: rewards kept per prompt for its statistics
    stat_buffer_size: int = 16
    # ddpo: rewards a prompt needs before its own statistics are used (else batch statistics)
    stat_min_count: int = 16
    # coefficient beta of the closed-form KL to the reference policy (0 = off)
    kl_coef: float = 0.0
    # how per-step log-probs reduce over latent dims: mean (DDPO, Flow-GRPO) or sum
    logprob_reduction: str = "mean"
    # fraction of the K denoising steps trained per sample (DDPO's timestep_fraction)
    timestep_fraction: float = 1.0
    # passes over each epoch's samples
    inner_epochs: int = 1


@dataclass
class OptimConfig:
    # AdamW learning rate
    learning_rate: float = 3e-4
    # AdamW beta1
    beta1: float = 0.9
    # AdamW beta2
    beta2: float = 0.999
    # AdamW weight decay
    weight_decay: float = 1e-4
    # AdamW epsilon
    eps: float = 1e-8
    # gradient-norm clip
    max_grad_norm: float = 1.0
    # minibatches accumulated per optimizer step (each over all trained timesteps)
    gradient_accumulation_steps: int = 1
    # learning rate after warmup, per optimizer step: constant | linear | cosine (both decay to
    # lr_final_ratio x learning_rate at the run's last optimizer step)
    lr_schedule: str = "constant"
    # optimizer steps of linear warmup from learning_rate / lr_warmup_steps up to learning_rate (0 = none)
    lr_warmup_steps: int = 0
    # linear / cosine: the learning rate of the last optimizer step, as a fraction of learning_rate
    lr_final_ratio: float = 0.0


@dataclass
class TrainConfig:
    # name of the run, its folder under output_dir (null: the task file's name)
    run_name: str | None = None
    # where run folders are written
    output_dir: str = "runs"
    # global seed: sampling noise, prompt choice, shuffling all derive from (seed, epoch, rank)
    seed: int = 0
    # training epochs (each: sample, score, update)
    num_epochs: int = 20
    # samples per sampling batch, per process
    sample_batch_size: int = 8
    # sampling batches per epoch, per process
    num_batches_per_epoch: int = 2
    # trajectories per training minibatch, per process
    train_batch_size: int = 8
    # denoising steps per training forward: each forward carries train_batch_size x this many
    # (trajectory, step) pairs, with the same gradient for any value. 1 = one step per forward as
    # DDPO / trl do (least activation memory: the default, safe for full-size models);
    # 0 = all trained steps of a minibatch in one forward (fastest for small models and CPUs)
    timestep_batch: int = 1
    # recompute activations in the backward pass (less memory, more time)
    gradient_checkpointing: bool = False
    # torch.compile the denoiser in place, static shapes (sampling, training and the LoRA-disabled
    # reference each get their graph; names and checkpoints are unchanged). The first epoch pays
    # the compile: ~110 s for the tiny CPU model, which then samples 1.2x and trains 1.09x faster
    # (LoRA, CFG; full fine-tuning 1.00x). For long runs; bench/bench_train_step.py --compile
    compile: bool = False
    # a non-finite reward, advantage, log-prob, loss or gradient: stop (raise, naming the epoch,
    # step and prompts) or skip (no update from that batch or epoch; counted as skipped_updates)
    on_nonfinite: str = "stop"
    # prompts: a list, a named set (see flowrl.data.prompts), or a text file with one prompt per line
    prompts: typing.Any = "simple_animals"
    # prompts rendered into the evaluation image grid (deterministic DDIM, fixed seed)
    eval_prompts: list | None = None
    # write an evaluation grid every this many epochs (0 = never)
    eval_every: int = 5
    # write a checkpoint every this many epochs (0 = only at the end)
    save_every: int = 5
    # keep at most this many checkpoints (oldest deleted)
    keep_checkpoints: int = 3
    # no | fp16 | bf16 (through accelerate)
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "fp16", "bf16")})
    # null | tensorboard | wandb (through accelerate), besides the JSONL metrics always written
    log_with: str | None = None
    # keep an exponential moving average of the trained weights (used for evaluation and saving)
    ema: bool = False
    # EMA decay per optimizer step
    ema_decay: float = 0.99
    # score rewards in a background thread while the next batch samples
    async_reward: bool = True
    # resume from a checkpoint folder, or "auto" for the latest complete one in the run folder
    resume: str | None = None


@dataclass
class TaskConfig:
    # one-line description of the task
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> TaskConfig:
        """Check values that are well-typed but wrong; raise ConfigError naming field and fix."""
        a, s, t, m, o = self.algorithm, self.sampler, self.train, self.model, self.optim

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(
            a.name in ALGORITHMS,
            f"algorithm.name: unknown algorithm {a.name!r}{_suggest(a.name, ALGORITHMS)}; choose one of {ALGORITHMS}",
        )
        need(
            m.finetune in ("lora", "full"),
            f"model.finetune: unknown mode {m.finetune!r}{_suggest(m.finetune, ('lora', 'full'))}; "
            "set model.finetune=lora (an adapter) or model.finetune=full (all weights)",
        )
        need(
            m.family in FAMILY_NAMES,
            f"model.family: unknown family {m.family!r}{_suggest(m.family, FAMILY_NAMES)}; choose one of {FAMILY_NAMES}",
        )
        need(
            m.finetune != "lora" or m.lora_rank >= 1,
            f"model.lora_rank must be >= 1, got {m.lora_rank}: a rank-0 adapter has no weights to train; "
            "set model.lora_rank=4 (or more), or model.finetune=full to train all weights",
        )
        need(
            m.lora_alpha is None or m.lora_alpha > 0,
            f"model.lora_alpha must be > 0 or null, got {m.lora_alpha}; set model.lora_alpha=null for alpha = rank",
        )
        need(
            s.name in SAMPLER_NAMES,
            f"sampler.name: unknown sampler {s.name!r}{_suggest(s.name, SAMPLER_NAMES)}; choose one of {SAMPLER_NAMES}",
        )
        need(
            s.num_steps >= 1,
            f"sampler.num_steps must be >= 1, got {s.num_steps}: a chain needs at least one denoising step; "
            "set e.g. sampler.num_steps=20",
        )
        need(
            s.eval_num_steps is None or s.eval_num_steps >= 1,
            f"sampler.eval_num_steps must be >= 1 or null, got {s.eval_num_steps}; "
            "set sampler.eval_num_steps=null to evaluate with sampler.num_steps",
        )
        need(
            s.noise_level is None or s.noise_level > 0,
            f"sampler.noise_level must be > 0 or null, got {s.noise_level}: noise level 0 is the ODE and has no "
            "log-prob; set sampler.noise_level=null for Flow-GRPO's default",
        )
        need(
            0 <= s.sde_window <= s.num_steps,
            f"sampler.sde_window must be in [0, sampler.num_steps={s.num_steps}], got {s.sde_window}; "
            "set 0 for every step stochastic, or a window of a few steps",
        )
        need(
            s.name != "ddim" or s.eta > 0,
            f"sampler.eta must be > 0 for training, got {s.eta}: eta=0 is deterministic DDIM and has no "
            "log-prob; set sampler.eta=1.0 (DDPO)",
        )
        need(
            s.guidance_scale >= 1.0,
            f"sampler.guidance_scale must be >= 1, got {s.guidance_scale}; set sampler.guidance_scale=1 "
            "for no classifier-free guidance",
        )
        need(
            o.learning_rate > 0,
            f"optim.learning_rate must be > 0, got {o.learning_rate}: the optimizer would not descend; "
            "set e.g. optim.learning_rate=3e-4",
        )
        need(
            o.max_grad_norm > 0,
            f"optim.max_grad_norm must be > 0, got {o.max_grad_norm}; set e.g. optim.max_grad_norm=1.0",
        )
        need(
            0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
            f"optim.beta1 and optim.beta2 must be in [0, 1), got {o.beta1}, {o.beta2}; "
            "AdamW's defaults are optim.beta1=0.9 and optim.beta2=0.999",
        )
        need(
            o.gradient_accumulation_steps >= 1,
            f"optim.gradient_accumulation_steps must be >= 1, got {o.gradient_accumulation_steps}; "
            "set 1 for one optimizer step per minibatch",
        )
        problem = lr_schedule_problem(o.lr_schedule, o.lr_warmup_steps, o.lr_final_ratio, "lr_warmup_steps")
        need(problem is None, problem or "")
        need(
            a.clip_range is None or a.clip_range > 0,
            f"algorithm.clip_range must be > 0 or null, got {a.clip_range}: a clip range <= 0 leaves no "
            "trust region; set e.g. algorithm.clip_range=1e-4, or null for no clipping",
        )
        need(
            a.adv_clip_max > 0,
            f"algorithm.adv_clip_max must be > 0, got {a.adv_clip_max}: it would zero every advantage; "
            "set e.g. algorithm.adv_clip_max=5",
        )
        need(
            0 < a.timestep_fraction <= 1,
            f"algorithm.timestep_fraction must be in (0, 1], got {a.timestep_fraction}; "
            "set 1.0 to train every denoising step",
        )
        need(
            a.logprob_reduction in ("mean", "sum"),
            f"algorithm.logprob_reduction: unknown reduction {a.logprob_reduction!r}; "
            "set algorithm.logprob_reduction=mean (DDPO, Flow-GRPO) or sum",
        )
        need(
            a.std_scope in ("group", "batch", "none"),
            f"algorithm.std_scope: unknown scope {a.std_scope!r}; set algorithm.std_scope=group, batch or none",
        )
        need(
            a.group_size >= 1,
            f"algorithm.group_size must be >= 1, got {a.group_size}; set 1 for one sample per prompt",
        )
        need(
            a.kl_coef >= 0,
            f"algorithm.kl_coef must be >= 0, got {a.kl_coef}: a negative KL weight pushes away from the "
            "reference; set 0 (off) or a small positive value such as 0.04",
        )
        need(
            a.inner_epochs >= 1,
            f"algorithm.inner_epochs must be >= 1, got {a.inner_epochs}; set 1 for one pass over each epoch's samples",
        )
        need(
            a.stat_buffer_size >= 1 and a.stat_min_count >= 1,
            f"algorithm.stat_buffer_size and stat_min_count must be >= 1, got {a.stat_buffer_size}, "
            f"{a.stat_min_count}; DDPO uses 16 and 16",
        )
        if a.name in ("grpo", "loop"):
            need(
                a.group_size >= 2,
                f"algorithm.group_size must be >= 2 for {a.name}, got {a.group_size}: its advantages are "
                "relative within a group of samples of one prompt; set e.g. algorithm.group_size=4",
            )
        for key in ("sample_batch_size", "num_batches_per_epoch", "train_batch_size", "num_epochs"):
            need(
                getattr(t, key) >= 1,
                f"train.{key} must be >= 1, got {getattr(t, key)}; set a positive count, e.g. train.{key}=4",
            )
        need(
            t.sample_batch_size % a.group_size == 0,
            f"train.sample_batch_size ({t.sample_batch_size}) must be divisible by algorithm.group_size "
            f"({a.group_size}): each batch holds whole groups; set train.sample_batch_size to a "
            f"multiple of {a.group_size}",
        )
        total = t.sample_batch_size * t.num_batches_per_epoch
        need(
            total % t.train_batch_size == 0,
            f"train.train_batch_size ({t.train_batch_size}) must divide the samples per epoch "
            f"(sample_batch_size x num_batches_per_epoch = {total}); set train.train_batch_size to a divisor of {total}",
        )
        for key in ("eval_every", "save_every", "keep_checkpoints"):
            need(
                getattr(t, key) >= 0,
                f"train.{key} must be >= 0, got {getattr(t, key)}; set 0 to turn it off",
            )
        need(
            t.mixed_precision in ("no", "fp16", "bf16"),
            f"train.mixed_precision: unknown precision {t.mixed_precision!r}; set no, fp16 or bf16",
        )
        need(
            t.log_with in (None, "tensorboard", "wandb"),
            f"train.log_with: unknown tracker {t.log_with!r}; set null, tensorboard or wandb",
        )
        need(
            t.timestep_batch >= 0,
            f"train.timestep_batch must be >= 0 (0 = all steps at once), got {t.timestep_batch}",
        )
        need(
            t.on_nonfinite in ("stop", "skip"),
            f"train.on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}",
        )
        need(
            0 < t.ema_decay < 1,
            f"train.ema_decay must be in (0, 1), got {t.ema_decay}; set e.g. train.ema_decay=0.99",
        )
        need(
            len(self.rewards) >= 1,
            "rewards: the list is empty, so there is nothing to optimize; give at least one, "
            "e.g. rewards=[{name: jpeg_compressibility}]",
        )
        for i, r in enumerate(self.rewards):
            need(
                r.name.strip() != "",
                f"rewards[{i}].name is empty; give a registered reward name or a path to a reward script",
            )
            need(
                math.isfinite(r.weight),
                f"rewards[{i}].weight must be a finite number, got {r.weight}; set e.g. rewards.{i}.weight=1.0",
            )
        return self


ALGORITHMS = ["ddpo", "grpo", "loop", "reinforce"]
SAMPLER_NAMES = ["ddim", "flow_sde", "flow_cps", "lcm"]
FAMILY_NAMES = ["auto", "sd", "sdxl", "sd3", "lcm", "flux"]


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def lr_schedule_problem(schedule: str, warmup: int, final_ratio: float, warmup_key: str) -> str | None:
    """What is wrong with ``optim``'s learning-rate schedule fields, or None (shared by robot tasks)."""
    if schedule not in LR_SCHEDULES:
        return (
            f"optim.lr_schedule: unknown schedule {schedule!r}{_suggest(schedule, LR_SCHEDULES)}; "
            f"choose one of {list(LR_SCHEDULES)}"
        )
    if warmup < 0:
        return f"optim.{warmup_key} must be >= 0, got {warmup}; set 0 for no warmup"
    if not 0 <= final_ratio <= 1:
        return (
            f"optim.lr_final_ratio must be in [0, 1], got {final_ratio}: it is the last step's learning rate "
            "as a fraction of the base one; set e.g. optim.lr_final_ratio=0.1"
        )
    return None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


_EXAMPLES = {int: "4", float: "0.001", bool: "true", str: "some-text", list: "[a, b]", dict: "{key: value}"}


def _type_error(where: str, expected: str, value, example: str | None) -> ConfigError:
    fix = f"set it like {where}={example}" if example else f"give a {expected}"
    if isinstance(value, (int, float, bool)) and expected.startswith("str"):
        fix += f" (YAML reads {value!r} as {type(value).__name__}: quote it, \"{where}='{value}'\")"
    return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__}); {fix}")


def _coerce(value, tp, where: str, choices: tuple | None = None):
    """Check ``value`` against the annotation ``tp`` (ints pass as floats); raise ConfigError.

    ``choices``: the fixed values of a string field. YAML 1.1 reads ``no`` / ``yes`` / ``off`` /
    ``on`` as booleans, so for such a field False and True map back to the choice among ``no`` /
    ``off`` / ``false`` or ``yes`` / ``on`` / ``true`` (``train.mixed_precision=no``)."""
    if choices and isinstance(value, bool):
        for word in ("yes", "on", "true") if value else ("no", "off", "false"):
            if word in choices:
                return word
        raise ConfigError(
            f"{where}: got the boolean {value} (YAML reads yes/no/on/off as booleans); "
            f"set one of {', '.join(choices)}"
        )
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        real = [a for a in args if a is not type(None)]
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in args)
        example = _EXAMPLES.get(typing.get_origin(real[0]) or real[0]) if real else None
        raise _type_error(where, names, value, example)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            first = dataclasses.fields(tp)[0].name
            raise ConfigError(
                f"{where}: expected a section (a mapping of {tp.__name__} fields), got {value!r}; "
                f"set its keys one by one, e.g. {where}.{first}=..."
            )
        return _from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            if where == "rewards":
                raise ConfigError(
                    f"rewards: expected a list of rewards, got {value!r} ({type(value).__name__}); "
                    f"write rewards=[{{name: {value}}}]"
                )
            raise _type_error(where, "list", value, _EXAMPLES[list])
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(where, "mapping", value, _EXAMPLES[dict])
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is list and isinstance(value, list):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _type_error(where, _type_name(tp), value, _EXAMPLES.get(tp))


def _from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if not isinstance(key, str) or key not in names:
            raise ConfigError(
                f"unknown config key {path!r}{_suggest(str(key), names)}; valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], path, fields[key].metadata.get("choices"))
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):  # rewards.0.weight=2
            if not k.isdigit() or int(k) >= len(node):
                example = ".".join([*keys[:i], "0", *keys[i + 1 :]])
                raise ConfigError(
                    f"override {dotted!r}: {k!r} is not an index of a {len(node)}-item list; "
                    f"use an index from 0 to {len(node) - 1}, e.g. {example}=..."
                    if node
                    else f"override {dotted!r}: the list is empty; set the whole list instead"
                )
            if last:
                node[int(k)] = value
            else:
                node = node[int(k)]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise ConfigError(
                f"override {dotted!r}: {keys[i - 1]!r} is not a section; set {'.'.join(keys[:i])} itself"
            )


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """``["train.num_epochs=5", "model.pretrained=./sd"]`` -> [(key, YAML-parsed value)]."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.num_epochs=5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        out.append((key.strip(), value))
    return out


def tasks_dir() -> Path:
    """Built-in task files: ``flowrl/_tasks`` in an installed wheel, else the checkout's ``tasks/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_tasks", here.parent / "tasks"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("flowrl's built-in tasks folder is missing; reinstall flowrl")


def resolve_task_path(task: str) -> Path:
    """A task file by path, or by name among the built-in tasks (``jpeg_tiny`` or ``tasks/jpeg_tiny.yaml``)."""
    p = Path(task).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    builtin = tasks_dir() / name
    if builtin.is_file():
        return builtin
    known = sorted(f.stem for f in tasks_dir().glob("*.yaml"))
    raise ConfigError(
        f"task file {task!r} not found{_suggest(p.stem, known)}; built-in tasks: {', '.join(known)}"
    )


def load_config(task: str | None = None, overrides: list[str] | None = None) -> TaskConfig:
    """Load a task file (or the defaults when None), apply overrides, type-check and validate."""
    data: dict = {}
    if task is not None:
        path = resolve_task_path(task)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"task file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"task file {path} must be a mapping of sections (model, sampler, ...)")
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    return _from_dict(TaskConfig, data).validate()


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

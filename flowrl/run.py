"""The run shell: everything a training run is besides its domain and its loss, written once.

    task config -> Run: accelerator (processes, precision, trackers), seeds, the model, the sampler,
                        the collector, the objective, the optimizer, checkpoint/resume, metrics
    each epoch:   collect -> check finite -> advantages -> check finite -> update -> evaluate -> log -> save

The collector (:mod:`flowrl.collectors`) is the only domain-specific part; the update loop
(:func:`flowrl.train.update`) and the objective (:mod:`flowrl.objectives`) are shared. Every
random draw derives from (seed, epoch, rank) (:class:`~flowrl.core.seeding.Seeds`), so a run
resumed from a checkpoint repeats exactly what the uninterrupted run would have done.

A metrics row is written per epoch; its ``epoch`` is the number of epochs done (row 0 is the
evaluation before training), the same number that names checkpoints and evaluation grids.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from flowrl.chain import Chain
from flowrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowrl.collectors import collector_class
from flowrl.config import TaskConfig, config_to_dict
from flowrl.core import seeding
from flowrl.errors import ConfigError, FlowrlError, InputError, NonFiniteError, one_line
from flowrl.report import MetricsWriter, log_sample_images
from flowrl.runfolder import RunFolder, check_resume


class EMA:
    """Exponential moving average of the trained parameters: s <- d * s + (1 - d) * p."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)


class TrainedModules(nn.Module):
    """The modules whose parameters the optimizer trains (the model's, the value network's), as
    one module for accelerate to prepare. Its forward runs a closure: the whole loss computation
    goes through the DDP wrapper in a multi-process run, so every trained parameter's gradient
    is all-reduced (overlapping the backward), whichever objective computed it."""

    def __init__(self, model: nn.Module, value: nn.Module | None):
        super().__init__()
        self.model = model
        self.value = value

    def forward(self, fn):
        return fn()


class Run:
    """One training run of a task (text-to-image or environment, any objective).

    Args:
        cfg: a validated :class:`~flowrl.config.TaskConfig`.
        task_name: names the run folder when ``train.run_name`` is null (and the BC folder).
        progress: show progress bars.
    """

    def __init__(self, cfg: TaskConfig, task_name: str = "task", progress: bool = True):
        self.folder = None  # the run folder's lock and clean-up (flowrl.runfolder), taken before writing
        try:
            self._setup(cfg, task_name, progress)
        except BaseException:
            if self.folder is not None:
                self.folder.abandon()  # unlock; remove the folder if this run made it
            raise

    def _setup(self, cfg: TaskConfig, task_name: str, progress: bool) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        from flowrl.models import build_model
        from flowrl.objectives import build_objective
        from flowrl.samplers import sampler_for

        self.cfg, self.task_name, self.progress = cfg, task_name, progress
        t, o = cfg.train, cfg.optim
        self.run_dir = Path(t.output_dir) / (t.run_name or task_name)
        Collector = collector_class(cfg.kind)
        # before anything heavy: bad prompts, reward names, model folders and resume folders fail fast
        Collector.check(cfg, task_name)
        from flowrl.memory import check_run

        check_run(cfg, task_name)  # sizes that cannot fit: refused (or warned) before any weights load
        resume_from = self._resume_folder()
        if resume_from is not None:
            check_resume(cfg, resume_from)  # changed keys that break exactness: refused, listed
        self.folder = RunFolder(self.run_dir, main=os.environ.get("RANK", "0") == "0")
        self.folder.acquire()  # a second writer of the folder stops here
        if t.torch_threads is not None:
            torch.set_num_threads(t.torch_threads)

        # accelerate keeps one global state per process; a second Run in the same process (tests,
        # notebooks, sweeps) may ask for another precision, so start from a clean accelerator state
        # (the distributed process group, if any, is kept).
        AcceleratorState._reset_state()
        GradientState._reset_state()
        use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        if t.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; set train.device=auto or cpu")
        self.accelerator = Accelerator(
            cpu=not use_cuda,  # so torchrun on a CPU machine gives MULTI_CPU (gloo)
            mixed_precision=t.mixed_precision,
            log_with=t.log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=cfg.algorithm.critic_warmup_epochs > 0)
            ],
        )
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.seeds = seeding.Seeds(t.seed, self.rank, Collector.SEED_SCHEME)
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t.mixed_precision]

        # the model, its sampler, the domain, the value function, the objective
        keep_reference = cfg.method.objective_class().keeps_reference(cfg)
        self.adapter = build_model(cfg, task_name, self.device, weight_dtype, keep_reference)
        self.sampler = sampler_for(cfg, self.adapter)
        if t.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing()
        if t.compile:
            self.adapter.compile_network()
        self.collector = Collector(cfg, self)
        self.value = self.collector.value_function() if cfg.advantage in ("gae", "step_critic") else None
        self.objective = build_objective(
            cfg,
            self.adapter,
            self.sampler,
            self.value,
            self.collector.demonstrations(),
            getattr(self.collector, "reward", None),
        )

        groups = [{"params": self.adapter.trainable_parameters(), "lr": o.learning_rate}]
        if self.value is not None:
            groups.append({"params": list(self.value.parameters()), "lr": o.value_learning_rate})
        self.base_lrs = [g["lr"] for g in groups]
        optimizer = torch.optim.AdamW(
            groups, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps
        )
        self.modules, self.optimizer = acc.prepare(
            TrainedModules(self.adapter.trainable_module, self.value), optimizer
        )
        self.ema = EMA(self.adapter.trainable_state_dict(), t.ema_decay) if t.ema else None
        self.schedule_steps = self._schedule_steps()
        self.start_epoch, self.global_step = 0, 0

        if resume_from is not None:
            try:
                self._load(resume_from)
            except (KeyError, RuntimeError, ValueError) as e:  # tensors or state of another model
                if isinstance(e, FlowrlError):
                    raise
                raise InputError(
                    f"train.resume: checkpoint {resume_from} does not fit this run's model, optimizer or objective "
                    f"({type(e).__name__}: {one_line(e)[:300]}); resume with the config it was trained with"
                ) from e
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        # rows are numbered by epochs done: on resume keep those up to the checkpoint's
        self.metrics = (
            MetricsWriter(
                self.run_dir / "metrics.jsonl",
                truncate_from_epoch=self.start_epoch + 1 if self.start_epoch else 0,
            )
            if acc.is_main_process
            else None
        )
        if t.log_with:
            acc.init_trackers(self.run_dir.name, config=_flat(config_to_dict(cfg)))

    def _schedule_steps(self) -> int:
        """The length of the learning-rate schedule: optimizer steps (at most, with target_kl) or epochs."""
        t, o = self.cfg.train, self.cfg.optim
        if self.cfg.lr_schedule_unit == "epoch":
            return t.num_epochs
        return (
            t.num_epochs
            * t.update_epochs
            * math.ceil(self.minibatches_per_pass() / o.gradient_accumulation_steps)
        )

    def minibatches_per_pass(self) -> int:
        """Minibatches in one pass over an epoch's data on this process."""
        t, cfg = self.cfg.train, self.cfg
        if cfg.kind == "env":
            rows = cfg.env.num_envs * cfg.env.n_steps
        else:
            rows = t.sample_batch_size * t.num_batches_per_epoch
        if t.minibatch_unit == "pair":
            rows *= self.sampler.recorded_steps
        return math.ceil(rows / t.minibatch_size)

    # ------------------------------------------------------------------ resume
    def _resume_folder(self) -> Path | None:
        t = self.cfg.train
        if t.resume is None:
            if latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(
                    f"run folder {self.run_dir} already has checkpoints: pass train.resume=auto to continue it, "
                    "or choose another train.run_name"
                )
            return None
        if t.resume == "auto":
            found = latest_checkpoint(self.run_dir)
            if found is None:
                raise ConfigError(
                    f"train.resume=auto: no complete checkpoint under {self.run_dir}/checkpoints to resume from; "
                    "drop train.resume to start a new run, or check train.output_dir and train.run_name"
                )
            return found
        folder = Path(t.resume)
        if not (folder / "state.json").is_file():
            raise ConfigError(
                f"train.resume: {folder} is not a complete flowrl checkpoint folder (no state.json); use train.resume=auto"
            )
        return folder

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's trained state and, under ``value.``, the value network's; under ``objective.``
        the objective's own (DiffusionNFT's old policy)."""
        out = dict(self.adapter.trainable_state_dict())
        if self.value is not None:
            out.update({f"value.{k}": v for k, v in self.value.state_dict().items()})
        out.update({f"objective.{k}": v for k, v in self.objective.state_dict().items()})
        return out

    def _load(self, folder: Path) -> None:
        ckpt = load_checkpoint(folder, map_location=self.device)
        weights = ckpt["trainable"]
        self.adapter.load_trainable_state_dict(
            {k: v for k, v in weights.items() if not k.startswith(("value.", "objective."))}
        )
        if self.value is not None:
            self.value.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("value.")})
        self.objective.load_state_dict({k[10:]: v for k, v in weights.items() if k.startswith("objective.")})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        self.start_epoch, self.global_step = state["next_epoch"], state["global_step"]
        self.collector.load_state_dict(state["collector"])
        if self.accelerator.scaler is not None and state.get("grad_scaler"):  # fp16's loss scale
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ConfigError(
                    f"train.ema is on but checkpoint {folder} has no EMA weights; resume with train.ema=false"
                )
            self.ema.shadow = {k: v.float() for k, v in ckpt["ema"].items()}
        self.accelerator.print(f"resumed from {folder} at epoch {self.start_epoch}")

    def save(self, next_epoch: int) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        state = {
            "next_epoch": next_epoch,
            "global_step": self.global_step,
            "collector": self.collector.state_dict(),
        }
        if acc.scaler is not None:  # fp16: the loss scale found so far (floats and ints, JSON)
            state["grad_scaler"] = acc.scaler.state_dict()
        return save_checkpoint(
            self.run_dir,
            next_epoch,
            self.trainable_state_dict(),
            self.optimizer.state_dict(),
            state,
            ema=self.ema.shadow if self.ema else None,
            extra_writer=self._write_pretrained,
            keep=self.cfg.train.keep_checkpoints,
        )

    def _write_pretrained(self, folder: Path) -> None:
        # the config the checkpoint was trained with, which a resume compares its own with
        (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        with self.ema_weights():
            self.adapter.save_pretrained_weights(folder)

    def ema_weights(self):
        """Context in which the trained parameters hold their EMA (no-op without EMA)."""

        @contextlib.contextmanager
        def swap():
            if self.ema is None:
                yield
                return
            backup = {k: v.clone() for k, v in self.adapter.trainable_state_dict().items()}
            self.adapter.load_trainable_state_dict(self.ema.shadow)
            try:
                yield
            finally:
                self.adapter.load_trainable_state_dict(backup)

        return swap()

    # ------------------------------------------------------------------ the non-finite policy
    def find_nonfinite(
        self, epoch: int, chain: Chain, values: torch.Tensor | None = None, what: str = ""
    ) -> str | None:
        """None if the epoch's samples, log-probs and rewards (or the given (B,) ``values``) are
        finite on every process; else a message naming the epoch, what, and the inputs."""
        if values is None:
            B = len(chain)
            bad_latents = ~torch.isfinite(chain.latents.reshape(B, -1)).all(1)
            bad_logp = torch.isinf(chain.log_probs).any(1)  # NaN marks a deterministic step
            bad_reward = ~torch.isfinite(chain.rewards)
            flags = torch.stack([bad_latents, bad_logp, bad_reward], 1)  # (B, 3)
        else:
            flags = (~torch.isfinite(values))[:, None]  # (B, 1)
        if not bool(self.accelerator.gather(flags.any()[None]).any()):
            return None
        if not flags.any():
            return f"non-finite values on another process at epoch {epoch}"
        names = ["samples", "log-probs", "rewards"] if values is None else [what]
        parts = []
        for j, name in enumerate(names):
            rows = flags[:, j].nonzero().flatten().tolist()
            if not rows:
                continue
            if name == "rewards":
                terms = [
                    k
                    for k, v in chain.metadata.get("reward_terms", {}).items()
                    if not torch.isfinite(v).all()
                ]
                name = f"rewards ({', '.join(terms)})" if terms else name
            parts.append(f"{name} of {len(rows)} trajectories ({self.collector.describe(chain, rows)})")
        return f"non-finite {'; '.join(parts)} at epoch {epoch}"

    def nonfinite(self, what: str, fix: str) -> None:
        """``train.on_nonfinite``: stop with a NonFiniteError, or warn and let the caller skip."""
        msg = f"{what}: the update was not applied; {fix}"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(msg + " (or set train.on_nonfinite=skip to drop such updates and go on)")
        self.accelerator.print(f"flowrl: warning: {msg}; skipped (train.on_nonfinite=skip)")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, epoch: int) -> dict:
        self.modules.eval()
        return self.collector.evaluate(epoch)

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Run the remaining epochs; returns the metrics rows written. A fresh run that fails
        before it finished an epoch leaves no run folder; the folder's lock is released."""
        history: list[dict] = []
        try:
            return self._train(history)
        except BaseException:
            self.folder.abandon(progress=self.start_epoch > 0 or len(history) > 1)
            raise
        finally:
            self.folder.release()

    def _train(self, history: list[dict]) -> list[dict]:
        from tqdm.auto import tqdm

        from flowrl.train import update

        t, acc = self.cfg.train, self.accelerator
        if self.start_epoch == 0:
            self._write({"epoch": 0, **self.evaluate(0)}, history)
        bar = tqdm(
            range(self.start_epoch, t.num_epochs),
            desc="epochs",
            disable=not (self.progress and acc.is_local_main_process),
            initial=self.start_epoch,
            total=t.num_epochs,
        )
        try:
            for epoch in bar:
                torch.manual_seed(self.seeds.int(epoch, seeding.TORCH))
                t0 = time.perf_counter()
                self.modules.eval()
                with self.objective.sampling(epoch, self.global_step):  # DiffusionNFT: its old policy
                    chain, stats = self.collector.collect(epoch)
                t1 = time.perf_counter()
                adv_info: dict = {}
                problem = self.find_nonfinite(epoch, chain)
                if problem is None:
                    chain.advantages, adv_info = self.collector.advantages(chain)
                    problem = self.find_nonfinite(epoch, chain, chain.advantages, "advantages")
                if problem is None:
                    self.modules.train()
                    update_info = self.mean_over_ranks(update(self, chain, epoch))
                else:  # on_nonfinite=skip: no statistics, no update from this epoch
                    self.nonfinite(problem, "check the reward, the model's precision and optim.learning_rate")
                    finite = chain.rewards[torch.isfinite(chain.rewards)]
                    adv_info = {"reward_mean": finite.mean().item() if len(finite) else float("nan")}
                    update_info = {"skipped_updates": 1, "nonfinite": problem}
                t2 = time.perf_counter()
                done = epoch + 1
                row = {"epoch": done, "global_step": self.global_step, **stats, **adv_info, **update_info}
                row.update(time_collect=t1 - t0, time_update=t2 - t1)
                if "samples" in stats:
                    row["samples_per_s"] = stats["samples"] / (t2 - t0)
                if "env_steps_epoch" in stats:
                    row["env_steps_per_s"] = stats["env_steps_epoch"] / (t1 - t0)
                if (t.eval_every and done % t.eval_every == 0) or done == t.num_epochs:
                    row.update(self.evaluate(done))
                self._write(row, history)
                if t.log_with and t.log_images and chain.samples is not None and chain.prompts:
                    if acc.is_main_process:  # this process's first samples, as ddpo-pytorch logs them
                        log_sample_images(
                            acc.trackers, chain.samples, chain.prompts, chain.rewards, done, t.log_images
                        )
                bar.set_postfix(self.collector.postfix(row))
                if done == t.num_epochs or (t.save_every and done % t.save_every == 0):
                    self.save(done)
        finally:
            self.collector.close()
            if t.log_with:
                acc.end_training()
        return history

    def mean_over_ranks(self, info: dict) -> dict:
        """``info`` with its float values averaged over the processes, in one all-reduce of them
        stacked: each rank's loss, clipfrac, approx_kl, ... are means over its own minibatches, so the
        run's are their mean (the same on every rank; ranks hold equal numbers of minibatches)."""
        keys = [k for k, v in info.items() if isinstance(v, float)]
        if self.world == 1 or not keys:
            return info
        values = torch.tensor([info[k] for k in keys], dtype=torch.float64, device=self.device)
        return {**info, **dict(zip(keys, self.accelerator.reduce(values, "mean").tolist()))}

    def _write(self, row: dict, history: list[dict]) -> None:
        history.append(row)
        acc = self.accelerator
        if acc.is_main_process:
            self.metrics.write(row)
            self.collector.plot(self.metrics.rows())
        if self.cfg.train.log_with:
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["epoch"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out

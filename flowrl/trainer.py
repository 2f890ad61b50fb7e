"""The training loop: sample -> score -> advantages -> per-step policy-gradient updates.

    B  trajectories per epoch on this process     K  denoising steps
    Kt trained steps per trajectory (ceil(timestep_fraction * K))

Every epoch's randomness (sampling noise, prompt draws, shuffles, timestep subsets) is derived
from (seed, epoch, process index), so a run resumed from a checkpoint repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from flowrl.chain import Chain
from flowrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowrl.config import ConfigError, TaskConfig, config_to_dict
from flowrl.core import gaussian_kl, policy_loss
from flowrl.core.advantages import PerPromptStatTracker, group_advantages, leave_one_out_advantages
from flowrl.core.schedule import lr_factor, set_lr
from flowrl.data.prompts import load_prompts
from flowrl.models import FAMILIES, build_adapter, detect_family, load_pipeline
from flowrl.report import MetricsWriter, plot_reward_curve, save_image_grid
from flowrl.rewards import Reward, resolve_reward
from flowrl.samplers import build_sampler


class NonFiniteError(FloatingPointError):
    """A loss or gradient went NaN/inf; the update was not applied."""


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    return int(
        np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32).astype(np.uint64)
        @ np.array([1 << 31, 1], dtype=np.uint64)
    ) % (1 << 63)


@dataclass
class EpochResult:
    epoch: int
    metrics: dict


class EMA:
    """Exponential moving average of the trained parameters: s <- d * s + (1 - d) * p."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)


class Trainer:
    """Fine-tunes a Stable Diffusion UNet on a reward with DDPO / GRPO / LOOP / REINFORCE.

    Args:
        cfg: a validated :class:`~flowrl.config.TaskConfig`.
        task_name: names the run folder when ``train.run_name`` is null.
    """

    def __init__(self, cfg: TaskConfig, task_name: str = "task"):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg = cfg
        t, m, a = cfg.train, cfg.model, cfg.algorithm
        self.run_dir = Path(t.output_dir) / (t.run_name or task_name)
        # before anything heavy: bad prompts or reward names fail fast
        self.prompts = load_prompts(t.prompts)
        for i, r in enumerate(cfg.rewards):
            try:
                resolve_reward(r.name)
            except (KeyError, AttributeError) as e:  # unknown name; a script without a reward function
                raise ConfigError(f"rewards[{i}].name: {e.args[0] if e.args else e}") from e
        # the model family and its samplers, from the name or model_index.json (no weights loaded)
        self.family = detect_family(m.pretrained, m.family)
        fitting = FAMILIES[self.family][1]
        if cfg.sampler.name not in fitting:
            raise ConfigError(
                f"sampler.name {cfg.sampler.name!r} does not fit model family {self.family!r}; "
                f"use sampler.name={fitting[0]}"
                + (f" (or one of {list(fitting)})" if len(fitting) > 1 else "")
            )
        self.eval_prompts = list(t.eval_prompts) if t.eval_prompts else self.prompts[:8]
        resume_from = self._resume_folder()

        # accelerate keeps one global state per process; a second Trainer in the same process (tests,
        # notebooks, sweeps) may ask for another precision, so start from a clean accelerator state
        # (the distributed process group, if any, is kept).
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # so torchrun on a CPU machine gives MULTI_CPU (gloo)
            mixed_precision=t.mixed_precision,
            log_with=t.log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
        )
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t.mixed_precision]

        pipe = load_pipeline(
            m.pretrained,
            self.family,
            revision=m.revision,
            prediction_type=m.prediction_type,
            image_size=m.tiny_image_size,
            seed=m.tiny_seed,
        )
        self.adapter = build_adapter(
            pipe,
            self.family,
            m.finetune,
            m.lora_rank,
            m.lora_alpha,
            weight_dtype,
            keep_reference=a.kl_coef > 0 and m.finetune == "full",
        ).to(self.device)
        self.sampler = self._sampler(deterministic=False)
        if t.gradient_checkpointing:
            if not hasattr(self.adapter.denoiser, "enable_gradient_checkpointing"):
                raise ConfigError(
                    f"train.gradient_checkpointing: {type(self.adapter.denoiser).__name__} does not support it; "
                    "set train.gradient_checkpointing=false"
                )
            self.adapter.denoiser.enable_gradient_checkpointing()
        if t.compile:
            # in place (nn.Module.compile): parameter names, state dicts, LoRA adapter switching
            # and the DDP wrapper all see the same module; only its forward is compiled
            self.adapter.denoiser.compile(dynamic=False)  # static shapes: one graph per batch shape
        self.reward = Reward(
            [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in cfg.rewards],
            device=self.device,
            allow_nonfinite=True,  # reported by _find_nonfinite with the epoch and prompts
        )

        o = cfg.optim
        params = self.adapter.trainable_parameters()
        optimizer = torch.optim.AdamW(
            params, lr=o.learning_rate, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps
        )
        self.net, self.optimizer = acc.prepare(self.adapter.denoiser, optimizer)
        n_mb = t.sample_batch_size * t.num_batches_per_epoch // t.train_batch_size
        # optimizer steps in the whole run, the length of the learning-rate schedule
        self.total_steps = t.num_epochs * a.inner_epochs * math.ceil(n_mb / o.gradient_accumulation_steps)
        self.stat_tracker = PerPromptStatTracker(a.stat_buffer_size, a.stat_min_count)
        self.ema = EMA(self.adapter.trainable_state_dict(), t.ema_decay) if t.ema else None
        self.start_epoch, self.global_step = 0, 0

        if resume_from is not None:
            self._load(resume_from)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        self.metrics = (
            MetricsWriter(self.run_dir / "metrics.jsonl", truncate_from_epoch=self.start_epoch)
            if acc.is_main_process
            else None
        )
        if t.log_with:
            acc.init_trackers(self.run_dir.name, config=_flat(config_to_dict(cfg)))

    def _sampler(self, deterministic: bool):
        sc = self.cfg.sampler
        steps = (sc.eval_num_steps or sc.num_steps) if deterministic else sc.num_steps
        return build_sampler(
            sc.name,
            self.adapter.scheduler_config,
            steps,
            eta=sc.eta,
            noise_level=sc.noise_level,
            sde_window=sc.sde_window,
            window_max_start=sc.window_max_start,
            logprob_reduction=self.cfg.algorithm.logprob_reduction,
            deterministic=deterministic,
        )

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

    def _load(self, folder: Path) -> None:
        ckpt = load_checkpoint(folder, map_location=self.device)
        self.adapter.load_trainable_state_dict(ckpt["trainable"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        self.start_epoch, self.global_step = state["next_epoch"], state["global_step"]
        self.stat_tracker.load_state_dict(state["stat_tracker"])
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
            "stat_tracker": self.stat_tracker.state_dict(),
        }
        if acc.scaler is not None:  # fp16: the loss scale found so far (floats and ints, JSON)
            state["grad_scaler"] = acc.scaler.state_dict()
        return save_checkpoint(
            self.run_dir,
            next_epoch,
            self.adapter.trainable_state_dict(),
            self.optimizer.state_dict(),
            state,
            ema=self.ema.shadow if self.ema else None,
            extra_writer=self._write_pretrained,
            keep=self.cfg.train.keep_checkpoints,
        )

    def _write_pretrained(self, folder: Path) -> None:
        if self.ema is None:
            self.adapter.save_pretrained_weights(folder)
            return
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

    # ------------------------------------------------------------------ one epoch
    def sample_epoch(self, epoch: int) -> Chain:
        """num_batches_per_epoch x sample_batch_size trajectories on this process, scored."""
        t, a = self.cfg.train, self.cfg.algorithm
        gen = torch.Generator().manual_seed(_seed_for(t.seed, epoch, self.rank, 0))
        rng = np.random.default_rng(_seed_for(t.seed, epoch, self.rank, 1))
        per_batch = t.sample_batch_size // a.group_size
        chains, pending = [], []
        self.net.eval()
        for i in range(t.num_batches_per_epoch):
            idx = rng.integers(len(self.prompts), size=per_batch)
            prompts = [self.prompts[j] for j in idx for _ in range(a.group_size)]
            with self.accelerator.autocast():  # the same precision as the training forward: ratio 1 on-policy
                chain = self.sampler.sample(
                    self.adapter, prompts, self.cfg.sampler.guidance_scale, generator=gen
                )
            chain.samples = self.adapter.decode(chain.latents[:, -1])
            # (rank, batch, group) -> a globally unique group id for GRPO / LOOP
            group = torch.arange(per_batch, device=self.device).repeat_interleave(a.group_size)
            chain.metadata["group"] = group + per_batch * (i + t.num_batches_per_epoch * self.rank)
            pending.append(
                self.reward.submit(chain.samples, prompts)
                if t.async_reward
                else self.reward(chain.samples, prompts)
            )
            chains.append(chain)
        infos = []
        for chain, p in zip(chains, pending):
            rewards, info = p.result() if t.async_reward else p
            chain.rewards = rewards
            infos.append(info)
        out = Chain.cat(chains)
        out.metadata["group"] = torch.cat([c.metadata["group"] for c in chains])
        out.metadata["reward_terms"] = {
            k: torch.cat([i[k] for i in infos]) for k in infos[0] if k.startswith("reward/")
        }
        return out

    def compute_advantages(self, chain: Chain) -> tuple[Tensor, dict]:
        """(B,) advantages of this process's trajectories, from statistics over all processes."""
        acc, a = self.accelerator, self.cfg.algorithm
        rewards = acc.gather(chain.rewards)
        groups = acc.gather(chain.metadata["group"])
        info: dict = {}
        if a.name == "ddpo":
            from accelerate.utils import gather_object

            prompts = gather_object(chain.prompts) if self.world > 1 else chain.prompts
            adv = self.stat_tracker.update(prompts, rewards)
        elif a.name == "grpo":
            adv, informative = group_advantages(rewards, groups, a.std_scope)
            info["zero_std_fraction"] = 1.0 - informative.float().mean().item()
        elif a.name == "loop":
            adv = leave_one_out_advantages(rewards, groups)
        else:  # reinforce
            adv = rewards - rewards.mean() if a.reinforce_baseline else rewards.clone()
        adv = adv.clamp(-a.adv_clip_max, a.adv_clip_max)
        info["reward_mean"] = rewards.mean().item()
        info["reward_std"] = rewards.std(unbiased=False).item()
        return adv.reshape(self.world, -1)[self.rank].to(self.device), info

    def train_epoch(self, epoch: int, chain: Chain) -> dict:
        """PPO/REINFORCE updates over the epoch's trajectories; returns averaged diagnostics.

        Each minibatch of Bm trajectories trains on Kt (trajectory, step) pairs per trajectory;
        ``train.timestep_batch`` J of a trajectory's steps share one forward (Bm x J pairs), so a
        minibatch costs ceil(Kt / J) forward+backward passes. The gradient is the same for any J:
        the mean over all Bm x Kt pairs. Diagnostics stay on the device until the epoch ends (no
        host sync per step); a non-finite loss or gradient is caught at the optimizer step."""
        t, a, o = self.cfg.train, self.cfg.algorithm, self.cfg.optim
        acc = self.accelerator
        B, K = len(chain), chain.num_steps
        stochastic = torch.isfinite(chain.log_probs).cpu()  # (B, K)
        n_stochastic = int(stochastic.sum(1).min())
        if n_stochastic == 0:
            raise ConfigError(
                "the sampler produced no stochastic step to train on (check sampler.eta / noise_level / sde_window)"
            )
        Kt = math.ceil(a.timestep_fraction * n_stochastic)
        J = min(t.timestep_batch or Kt, Kt)
        n_mb = B // t.train_batch_size
        self.net.train()
        sums: dict[str, Tensor] = {}
        count = 0
        grad_norms, skipped, scaler_skips = [], 0, 0
        for inner in range(a.inner_epochs):
            g = torch.Generator().manual_seed(_seed_for(t.seed, epoch, self.rank, 2, inner))
            perm = torch.randperm(B, generator=g)
            shuffled = chain.select(perm.to(chain.latents.device))
            # each trajectory trains on its own random subset of Kt of its stochastic steps (those
            # with a log-prob; all K for DDIM, the SDE window for Flow-GRPO-Fast): (B, Kt), CPU
            scores = torch.rand(B, K, generator=g).masked_fill(~stochastic[perm], 2.0)
            steps = torch.argsort(scores, dim=1)[:, :Kt]
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
            for mb in range(n_mb):
                sl = slice(mb * t.train_batch_size, (mb + 1) * t.train_batch_size)
                sub, sub_steps = shuffled.select(sl), steps[sl]
                last_of_cycle = (mb + 1) % o.gradient_accumulation_steps == 0 or mb == n_mb - 1
                for j0 in range(0, Kt, J):
                    cols = sub_steps[:, j0 : j0 + J]  # (Bm, Jc)
                    traj = torch.arange(len(sub)).repeat_interleave(cols.shape[1])  # (Bm * Jc,)
                    sync = last_of_cycle and j0 + J >= Kt
                    ctx = acc.no_sync(self.net) if not sync and self.world > 1 else contextlib.nullcontext()
                    with ctx, acc.autocast():
                        terms = self.step_loss(sub, cols.reshape(-1), traj)
                        bad |= ~torch.isfinite(terms["loss"])
                        # the mean over this forward's pairs, weighted to the mean over all Kt steps
                        acc.backward(terms["loss"] * (cols.shape[1] / (Kt * o.gradient_accumulation_steps)))
                    for k, v in terms.items():
                        sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
                    count += 1
                if last_of_cycle:
                    grad_norm = acc.clip_grad_norm_(self.adapter.trainable_parameters(), o.max_grad_norm)
                    finite = bool(torch.isfinite(grad_norm) & ~bad)  # the one host sync per update
                    if not finite and acc.scaler is not None and not bad.item():
                        # fp16 loss scaling (CUDA): an overflowing gradient is how the scaler finds
                        # its scale too high. Its step skips the update and lowers the scale; the
                        # step count, learning rate and EMA stay where they are.
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        scaler_skips += 1
                        continue
                    if not finite:
                        self.optimizer.zero_grad(set_to_none=True)
                        what = "loss" if bad.item() else "gradient norm"
                        self._nonfinite(
                            f"non-finite {what} at epoch {epoch}, inner epoch {inner}, minibatch {mb} "
                            f"(prompts {sub.prompts[:4]}{'...' if len(sub) > 4 else ''})",
                            "check the reward and lower optim.learning_rate",
                        )
                        skipped += 1
                        bad.zero_()
                        continue
                    factor = lr_factor(
                        self.global_step, self.total_steps, o.lr_warmup_steps, o.lr_schedule, o.lr_final_ratio
                    )
                    set_lr(self.optimizer, [o.learning_rate], factor)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.global_step += 1
                    grad_norms.append(grad_norm.detach())
                    if self.ema is not None:
                        self.ema.update(self.adapter.trainable_state_dict())
        out = {k: (v / count).item() for k, v in sums.items()}
        out["grad_norm"] = torch.stack(grad_norms).mean().item() if grad_norms else float("nan")
        out["lr"] = self.optimizer.param_groups[0]["lr"]  # of the epoch's last optimizer step
        if skipped:
            out["skipped_updates"] = skipped
        if scaler_skips:
            out["fp16_overflow_steps"] = scaler_skips
        return out

    def _find_nonfinite(
        self, epoch: int, chain: Chain, values: Tensor | None = None, what: str = ""
    ) -> str | None:
        """None if the epoch's samples, log-probs and rewards (or the given (B,) ``values``) are
        finite on every process; else a message naming the epoch, what, and the prompts."""
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
                terms = [k for k, v in chain.metadata["reward_terms"].items() if not torch.isfinite(v).all()]
                name = f"rewards ({', '.join(terms)})" if terms else name
            prompts = sorted({chain.prompts[i] for i in rows})
            parts.append(
                f"{name} of {len(rows)} trajectories (prompts {prompts[:4]}{'...' if len(prompts) > 4 else ''})"
            )
        return f"non-finite {'; '.join(parts)} at epoch {epoch}"

    def _nonfinite(self, what: str, fix: str) -> None:
        """``train.on_nonfinite``: stop with a NonFiniteError, or warn and let the caller skip."""
        msg = f"{what}: the update was not applied; {fix}"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(msg + " (or set train.on_nonfinite=skip to drop such updates and go on)")
        self.accelerator.print(f"flowrl: warning: {msg}; skipped (train.on_nonfinite=skip)")

    def step_loss(self, sub: Chain, idx: torch.Tensor, traj: torch.Tensor | None = None) -> dict:
        """The loss terms for pairs (trajectory ``traj[p]``, denoising step ``idx[p]``) of a
        minibatch, in one forward (``traj`` None: one step per trajectory)."""
        a = self.cfg.algorithm
        out = self.sampler.log_prob(self.adapter, sub, idx, net=self.net, traj_index=traj)
        b = torch.arange(len(sub)) if traj is None else traj
        b, k = b.to(self.device), idx.to(self.device)
        old, adv = sub.log_probs[b, k], sub.advantages[b]
        kl = None
        if a.kl_coef > 0:
            ref = self.sampler.log_prob(self.adapter, sub, idx, reference=True, traj_index=traj)
            kl = gaussian_kl(out.mean, ref.mean.detach(), out.std, a.logprob_reduction)
        return policy_loss(
            out.log_prob, old, adv, None if a.name == "reinforce" else a.clip_range, kl, a.kl_coef
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> torch.Tensor:
        """Images of the evaluation prompts from a fixed seed with the deterministic sampler
        (DDIM eta 0, flow ODE; LCM stays seeded-stochastic)."""
        sampler = self._sampler(deterministic=True)
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 12345)
        with self.ema_weights():
            chain = sampler.sample(
                self.adapter, self.eval_prompts, self.cfg.sampler.guidance_scale, generator=gen
            )
            images = self.adapter.decode(chain.latents[:, -1])
        if self.accelerator.is_main_process:
            save_image_grid(
                images, self.run_dir / "samples" / f"epoch_{epoch:04d}.png", labels=self.eval_prompts
            )
        return images

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        t = self.cfg.train
        acc = self.accelerator
        history = []
        if self.start_epoch == 0 and t.eval_every:
            self.evaluate(0)
        bar = tqdm(
            range(self.start_epoch, t.num_epochs),
            desc="epochs",
            disable=not acc.is_local_main_process,
            initial=self.start_epoch,
            total=t.num_epochs,
        )
        try:
            for epoch in bar:
                torch.manual_seed(_seed_for(t.seed, epoch, self.rank, 3))
                t0 = time.perf_counter()
                chain = self.sample_epoch(epoch)
                t1 = time.perf_counter()
                problem = self._find_nonfinite(epoch, chain)
                if problem is None:
                    chain.advantages, adv_info = self.compute_advantages(chain)
                    problem = self._find_nonfinite(epoch, chain, chain.advantages, "advantages")
                if problem is None:
                    train_info = self.train_epoch(epoch, chain)
                else:  # on_nonfinite=skip: no statistics, no update from this epoch
                    self._nonfinite(
                        problem, "check the reward, the model's precision and optim.learning_rate"
                    )
                    finite = chain.rewards[torch.isfinite(chain.rewards)]
                    adv_info = {"reward_mean": finite.mean().item() if len(finite) else float("nan")}
                    train_info = {"skipped_updates": 1, "nonfinite": problem}
                t2 = time.perf_counter()
                row = {"epoch": epoch, "global_step": self.global_step, **adv_info, **train_info}
                for k, v in chain.metadata["reward_terms"].items():
                    row[k + "_mean"] = acc.gather(v).mean().item()
                n = len(chain) * self.world
                row.update(samples=n, time_sample=t1 - t0, time_train=t2 - t1, samples_per_s=n / (t2 - t0))
                history.append(row)
                bar.set_postfix(reward=f"{row['reward_mean']:.4g}", kl=f"{row.get('approx_kl', 0):.2g}")
                if acc.is_main_process:
                    self.metrics.write(row)
                    plot_reward_curve(
                        self.metrics.rows(),
                        self.run_dir / "reward_curve.png",
                        title=f"{self.run_dir.name}: reward",
                    )
                if t.log_with:
                    acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
                done = epoch + 1
                if t.eval_every and done % t.eval_every == 0:
                    self.evaluate(done)
                if done == t.num_epochs or (t.save_every and done % t.save_every == 0):
                    self.save(done)
        finally:
            self.reward.close()
            if t.log_with:
                acc.end_training()
        return history


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


Tensor = torch.Tensor

"""Text-to-image collection: prompts -> sample -> decode -> reward -> advantages.

    B  trajectories per epoch on this process = sample_batch_size x num_batches_per_epoch
    G  samples per prompt draw (algorithm.group_size)

Each sampling batch draws sample_batch_size / G prompts (seeded by (seed, epoch, rank)) and
samples G trajectories of each with the training sampler; rewards are scored in a background
thread while the next batch samples. Advantages come from statistics over every process:

    per_prompt     DDPO's running per-prompt mean and std (PerPromptStatTracker)
    group          GRPO: within the G samples of one prompt draw (std over the group or the batch)
    leave_one_out  LOOP / RLOO: r_i minus the mean of the other samples of its draw
    batch_mean     REINFORCE's baseline: r - mean(r);  none: the rewards themselves
    step_critic    per denoising step: GAE over the chain's steps with a learned critic
                   V(x_k, t_k, c), the final reward shaped by one of the above
                   (algorithm.step_critic_shaping; AC-Flow style, :mod:`flowrl.core.step_critic`)

then clipped to [-adv_clip_max, adv_clip_max] (DDPO).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.collectors.base import Collector
from flowrl.core import seeding
from flowrl.core.advantages import PerPromptStatTracker, group_advantages, leave_one_out_advantages
from flowrl.core.step_critic import denoising_gae
from flowrl.errors import ConfigError
from flowrl.rewards.registry import mean_info


class TextToImageCollector(Collector):
    kind = "text_to_image"
    DEFAULTS: dict = {}  # the dataclass defaults are text-to-image's (DDPO's)
    ADVANTAGES = ("per_prompt", "group", "leave_one_out", "batch_mean", "none", "step_critic")
    SEED_SCHEME = "text_to_image"

    @classmethod
    def validate(cls, cfg) -> None:
        t, a = cfg.train, cfg.algorithm
        for key in ("sample_batch_size", "num_batches_per_epoch"):
            if getattr(t, key) < 1:
                raise ConfigError(
                    f"train.{key} must be >= 1, got {getattr(t, key)}; set a positive count, e.g. train.{key}=4"
                )
        if t.sample_batch_size % a.group_size:
            raise ConfigError(
                f"train.sample_batch_size ({t.sample_batch_size}) must be divisible by algorithm.group_size "
                f"({a.group_size}): each batch holds whole groups; set train.sample_batch_size to a "
                f"multiple of {a.group_size}"
            )
        total = t.sample_batch_size * t.num_batches_per_epoch
        if t.minibatch_unit == "trajectory" and total % t.minibatch_size:
            raise ConfigError(
                f"train.minibatch_size ({t.minibatch_size}) must divide the samples per epoch "
                f"(sample_batch_size x num_batches_per_epoch = {total}); set train.minibatch_size to a divisor of {total}"
            )
        if t.eval_batch_size is not None and t.eval_batch_size < 1:
            raise ConfigError(
                f"train.eval_batch_size must be >= 1 or null (all at once), got {t.eval_batch_size}; e.g. 16"
            )
        if t.pairs and cfg.method.objective != "dpo":
            raise ConfigError(
                f"train.pairs gives preference pairs, which only algorithm.name=dpo trains on (this task's is "
                f"{a.name!r}); set algorithm.name=dpo, or train.pairs=null to sample"
            )
        if not cfg.rewards:
            raise ConfigError(
                "rewards: the list is empty, so there is nothing to optimize; give at least one, "
                "e.g. rewards=[{name: jpeg_compressibility}]"
            )
        for i, r in enumerate(cfg.rewards):
            if r.name.strip() == "":
                raise ConfigError(
                    f"rewards[{i}].name is empty; give a registered reward name or a path to a reward script"
                )
            if not math.isfinite(r.weight):
                raise ConfigError(
                    f"rewards[{i}].weight must be a finite number, got {r.weight}; set e.g. rewards.{i}.weight=1.0"
                )

    @classmethod
    def check(cls, cfg, task_name: str) -> None:
        from flowrl.data.prompts import load_eval_prompt_data, load_prompt_data
        from flowrl.models import check_resolution, detect_family, text_encoder_options
        from flowrl.rewards import resolve_reward
        from flowrl.samplers import check_fits

        train = load_prompt_data(cfg.train.prompts)
        load_eval_prompt_data(cfg.train.eval_prompts or None, cfg.train.prompts, train)
        if cfg.train.pairs:  # Diffusion-DPO's offline pairs (flowrl.data.pairs)
            from flowrl.data.pairs import load_pairs

            load_pairs(cfg.train.pairs)
        for i, r in enumerate(cfg.rewards):
            try:
                resolve_reward(r.name)
            except (KeyError, AttributeError) as e:  # unknown name; a script without a reward function
                raise ConfigError(f"rewards[{i}].name: {e.args[0] if e.args else e}") from e
        family = detect_family(cfg.model.pretrained, cfg.model.family)
        check_fits(cfg, family)
        text_encoder_options(cfg.model, family)  # a family that cannot train its text encoder (TexForce)
        check_resolution(cfg.model, family)  # model.resolution against the VAE and patch size

    def __init__(self, cfg, run):
        from flowrl.data.prompts import load_eval_prompt_data, load_prompt_data
        from flowrl.rewards import Reward

        super().__init__(cfg, run)
        t, a = cfg.train, cfg.algorithm
        self.prompt_data = load_prompt_data(t.prompts)  # prompts and per-prompt metadata
        self.prompts = self.prompt_data.prompts
        self.eval_data = load_eval_prompt_data(t.eval_prompts or None, t.prompts, self.prompt_data)
        self.eval_prompts = self.eval_data.prompts
        self.reward = Reward(
            [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in cfg.rewards],
            device=run.device,
            allow_nonfinite=True,  # reported with the epoch and prompts by the run shell
            combine=cfg.reward_combine,
            uwo_coef=cfg.reward_uwo_coef,
            timeout=cfg.reward_timeout,
        )
        self.stat_tracker = PerPromptStatTracker(a.stat_buffer_size, a.stat_min_count)
        self.pairs = None
        if t.pairs:  # each epoch's rows are preference pairs from the file, not samples
            from flowrl.data.pairs import PairSource

            self.pairs = PairSource(cfg, run)

    def value_function(self):
        """The step critic V(x_k, t_k, c) of ``advantage: step_critic`` (else None), seeded by train.seed."""
        if self.cfg.advantage != "step_critic":
            return None
        from flowrl.core.step_critic import StepCritic

        run = self.run
        width = run.adapter.condition([""], 1.0)["prompt_embeds"].shape[-1]
        torch.manual_seed(self.cfg.train.seed)
        critic = StepCritic(
            run.adapter.latent_shape,
            width,
            self.cfg.model.value_hidden_dims,
            time_scale=getattr(run.sampler, "num_train_timesteps", 1000),
        )
        return critic.to(run.device)

    # ------------------------------------------------------------------ one epoch
    def collect(self, epoch: int) -> tuple[Chain, dict]:
        """num_batches_per_epoch x sample_batch_size trajectories on this process, scored."""
        run, t, a = self.run, self.cfg.train, self.cfg.algorithm
        if self.pairs is not None:
            return self.pairs.collect(epoch)
        gen = run.seeds.generator(epoch, seeding.SAMPLE)
        rng = run.seeds.numpy(epoch, seeding.PROMPTS)
        window = run.sampler.set_epoch(epoch)  # MixGRPO's sliding SDE window moves with the epoch
        per_batch = t.sample_batch_size // a.group_size
        chains, pending = [], []
        for i in range(t.num_batches_per_epoch):
            idx = rng.integers(len(self.prompts), size=per_batch)
            prompts, metadata = self.prompt_data.take([j for j in idx for _ in range(a.group_size)])
            latents = None  # MixGRPO's init_same_noise: one initial noise per prompt draw
            if self.cfg.sampler.group_same_noise:
                shape = (per_batch, *run.adapter.latent_shape)
                latents = seeding.randn(shape, gen, run.device).repeat_interleave(a.group_size, 0)
            with run.accelerator.autocast():  # the precision of the training forward: ratio 1 on-policy
                chain = run.sampler.sample(
                    run.adapter, prompts, self.cfg.sampler.guidance_scale, generator=gen, latents=latents
                )
            chain.samples = run.adapter.decode(chain.latents[:, -1])
            # (rank, batch, group) -> a globally unique group id for GRPO / LOOP
            group = torch.arange(per_batch, device=run.device).repeat_interleave(a.group_size)
            chain.metadata["group"] = group + per_batch * (i + t.num_batches_per_epoch * run.rank)
            chain.metadata["prompt_metadata"] = metadata  # B dicts, what the reward received
            pending.append(
                self.reward.submit(chain.samples, prompts, metadata)
                if t.async_reward
                else self.reward(chain.samples, prompts, metadata)
            )
            chains.append(chain)
        infos = []
        for chain, p in zip(chains, pending):
            rewards, info = p.result() if t.async_reward else p
            chain.rewards = rewards
            infos.append(info)
        out = Chain.cat(chains)
        out.metadata["group"] = torch.cat([c.metadata["group"] for c in chains])
        out.metadata["prompt_metadata"] = [m for c in chains for m in c.metadata["prompt_metadata"]]
        out.metadata["reward_terms"] = {
            k: torch.cat([i[k] for i in infos]) for k in infos[0] if k.startswith("reward/")
        }
        out.metadata["reward_info"] = mean_info(infos)  # each reward's own info, as numbers
        n = len(out) * run.world
        return out, {"samples": n, **window}

    def advantages(self, chain: Chain) -> tuple[Tensor, dict]:
        """(B,) advantages of this process's trajectories, from statistics over all processes."""
        run, a = self.run, self.cfg.algorithm
        if self.pairs is not None:  # preference pairs: no reward, no advantage
            return torch.zeros(len(chain), device=run.device), {}
        acc = run.accelerator
        rewards = acc.gather(chain.rewards)
        groups = acc.gather(chain.metadata["group"])
        info: dict = {}
        estimator = self.cfg.advantage
        if estimator == "step_critic":  # the final reward shaped by a trajectory estimator
            estimator = a.step_critic_shaping
        if estimator == "per_prompt":
            from accelerate.utils import gather_object

            prompts = gather_object(chain.prompts) if run.world > 1 else chain.prompts
            adv = self.stat_tracker.update(prompts, rewards)
        elif estimator == "group":
            adv, informative = group_advantages(rewards, groups, a.std_scope)
            info["zero_std_fraction"] = 1.0 - informative.float().mean().item()
            if a.drop_zero_std:  # this process's rows that the update trains on
                chain.metadata["keep"] = informative.reshape(run.world, -1)[run.rank].cpu()
        elif estimator == "leave_one_out":
            adv = leave_one_out_advantages(rewards, groups)
        elif estimator == "batch_mean":
            adv = rewards - rewards.mean()
        else:  # none
            adv = rewards.clone()
        mine = adv.reshape(run.world, -1)[run.rank].to(run.device)  # this process's rows
        if self.cfg.advantage == "step_critic":
            mine = self._step_advantages(chain, mine, info)
        info["reward_mean"] = rewards.mean().item()
        info["reward_std"] = rewards.std(unbiased=False).item()
        for k, v in chain.metadata["reward_terms"].items():
            info[k + "_mean"] = acc.gather(v).mean().item()
        for k, v in chain.metadata.get("reward_info", {}).items():  # reward_info/<reward>/<key>
            info[k] = v if run.world == 1 else acc.gather(torch.tensor([v], device=run.device)).mean().item()
        return mine.clamp(-a.adv_clip_max, a.adv_clip_max), info

    @torch.no_grad()
    def _step_advantages(self, chain: Chain, shaped: Tensor, info: dict) -> Tensor:
        """GAE over the denoising steps with the step critic (:mod:`flowrl.core.step_critic`):
        ``metadata["step_advantages"]`` (B, K), clipped, and ``metadata["returns"]`` (B, K), the
        critic's targets. Returns the (B,) shaped rewards, NaN on a row whose step advantages are not
        finite (so the run's check names it)."""
        a = self.cfg.algorithm
        values = self.run.value.chain_values(chain).float()  # (B, K)
        step, returns = denoising_gae(shaped.float(), values, a.gamma, a.gae_lambda)
        chain.metadata["step_advantages"] = step.clamp(-a.adv_clip_max, a.adv_clip_max)
        chain.metadata["returns"] = returns
        target = returns.reshape(-1)
        info["explained_variance"] = float(
            1 - (target - values.reshape(-1)).var() / target.var().clamp(min=1e-8)
        )
        info["value_mean"] = values.mean().item()
        finite = torch.isfinite(step).all(1)
        return torch.where(finite, shaped, torch.full_like(shaped, float("nan")))

    def describe(self, chain: Chain, rows: list[int]) -> str:
        prompts = sorted({chain.prompts[i] for i in rows})
        return f"prompts {prompts[:4]}{'...' if len(prompts) > 4 else ''}"

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Images of the evaluation prompts from a fixed seed with the deterministic sampler
        (DDIM eta 0, flow ODE; LCM stays seeded-stochastic), their mean reward, and a grid
        ``samples/epoch_<epoch>.png`` (of the first 64). ``train.eval_batch_size`` prompts are sampled
        and scored at a time (a test split of thousands fits), the noise drawn in that order."""
        from flowrl.report import save_image_grid
        from flowrl.samplers import sampler_for

        run, size, grid = self.run, self.cfg.train.eval_batch_size or len(self.eval_prompts), 64
        sampler = sampler_for(self.cfg, run.adapter, evaluation=True)
        gen = torch.Generator().manual_seed(self.cfg.eval_seed)
        _, metadata = self.eval_data.take(range(len(self.eval_data)))
        shown, scores, infos = [], [], []
        with run.ema_weights():
            for s in range(0, len(self.eval_prompts), size):
                prompts = self.eval_prompts[s : s + size]
                with run.accelerator.autocast():
                    chain = sampler.sample(
                        run.adapter, prompts, self.cfg.sampler.guidance_scale, generator=gen
                    )
                    images = run.adapter.decode(chain.latents[:, -1])
                r, i = self.reward(images, prompts, metadata[s : s + size])
                scores.append(r)
                infos.append(i)
                shown.append(images[: max(grid - s, 0)])
        rewards = torch.cat(scores)
        info = {k: torch.cat([i[k] for i in infos]) for k in infos[0] if k.startswith("reward/")}
        if run.accelerator.is_main_process:
            save_image_grid(
                torch.cat(shown),
                run.run_dir / "samples" / f"epoch_{epoch:04d}.png",
                labels=self.eval_prompts[:grid],
            )
        row = {"eval_reward_mean": rewards.mean().item()}
        row.update({f"eval_{k}": v for k, v in mean_info(infos).items()})
        if len(self.reward.terms) > 1:  # each term alone, a held-out one (weight 0) included
            terms = {k: v for k, v in info.items() if k.startswith("reward/")}
            row.update({f"eval_{k}_mean": v.float().mean().item() for k, v in terms.items()})
        return row

    def plot(self, rows: list[dict]) -> None:
        from flowrl.report import plot_reward_curve

        run_dir = self.run.run_dir
        plot_reward_curve(rows, run_dir / "reward_curve.png", title=f"{run_dir.name}: reward")

    def postfix(self, row: dict) -> dict:
        return {
            "reward": f"{row.get('reward_mean', float('nan')):.4g}",
            "kl": f"{row.get('approx_kl', 0):.2g}",
        }

    def summary(self, history: list[dict]) -> list[str]:
        rows = [r for r in history if "reward_mean" in r]
        if not rows:
            return []
        first, last = rows[0], rows[-1]
        return [
            f"reward: epoch {first['epoch']} {first['reward_mean']:.4f} -> epoch {last['epoch']} {last['reward_mean']:.4f}",
            f"run folder: {self.run.run_dir} (metrics.jsonl, reward_curve.png, samples/, checkpoints/)",
        ]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"stat_tracker": self.stat_tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stat_tracker.load_state_dict(state["stat_tracker"])

    def close(self) -> None:
        self.reward.close()

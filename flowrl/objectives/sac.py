"""DSRL-SAC: soft actor-critic over the initial noise of a frozen diffusion or flow policy.

    N  envs   M  replay batch   D_s = To * Do   D_a = Ta * Da   b  DSRL's action_magnitude

DSRL (Wagenmaker et al. 2025, arXiv 2506.15799; its ``train_dsrl.py`` with
``algorithm: dsrl_sac``) makes the frozen chain part of the environment: the MDP's action is the
chain's initial noise w in [-b, b]^(D_a), the policy's squashed Gaussian draws it
(:class:`~flowrl.models.gaussian_policy.DSRLPolicy` with ``model.dsrl_head: squashed``), and
stable-baselines3's SAC learns it off-policy. The critics see the action SB3's replay buffer
stores, a = w / b = tanh(u) in [-1, 1].

Collection and learning interleave as in SB3's ``learn``: after each chunk step of the N envs the
collector hands the N transitions (s, a, r, s', terminated, truncated) to :meth:`SAC.observe`
(s, s' in the env's units, normalized when sampled; r the chunk's summed reward). The first
``warmup_steps`` chunk steps act with the base policy's own noise, w = clip(eps, -b, b) with
eps ~ N(0, I) (DSRL's ``collect_rollouts``, ``init_rollout_steps``); after them, every
``train_freq`` chunk steps run ``gradient_steps`` of the following, each on M transitions drawn
uniformly with replacement (SB3's ``SAC.train``, in its order):

    1. u = mu(s) + sigma(s) eps,  a_pi = tanh(u)          eps ~ N(0, I)
       log pi(a_pi | s) = sum log N(u; mu, sigma^2) - sum log(1 - tanh(u)^2 + 1e-6)
    2. alpha = exp(log alpha)  (this value in 3 and 5)
       loss_alpha  = -mean(log alpha * (log pi(a_pi | s) + H_target))          -> step log alpha
    3. y = r + gamma (1 - d) (min_i Qbar_i(s', a') - alpha log pi(a' | s')),  a' ~ pi(. | s')   (no grad)
    4. loss_critic = 1/2 sum_i mean (Q_i(s, a) - y)^2                           -> step the Q_i
    5. loss_actor  = mean(alpha log pi(a_pi | s) - min_i Q_i(s, a_pi))  (the stepped Q_i)  -> step pi
    6. Qbar_i <- (1 - tau) Qbar_i + tau Q_i                                     (target_update_interval 1)

d = terminated: a time limit or the end of an epoch's collection bootstraps
(``bootstrap_truncated: false`` ends at a time limit too, as DSRL's chunk wrapper reports it).
The actor trains with the run's optimizer (``optim.*``), the Q_i and log alpha with AdamW at the
same settings (SB3's one ``learning_rate``; log alpha without weight decay); no gradient clipping
(SB3's SAC has none). The learning rate follows ``optim.lr_schedule`` per epoch.

Every draw comes from the epoch's generator (seed, epoch), and the buffer, the Q_i and Qbar_i,
log alpha, both optimizers' moments and the step count are in the checkpoint, so a resumed run
repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from flowrl.chain import Chain
from flowrl.core.schedule import lr_factor, set_lr
from flowrl.core.seeding import OBJECTIVE, randn
from flowrl.errors import ConfigError, NonFiniteError
from flowrl.models.sac import TwinQ
from flowrl.objectives.base import Objective

TANH_EPS = 1e-6  # SB3's SquashedDiagGaussianDistribution epsilon


@dataclass
class SACOptions:
    # (DSRL's gym configs, cfg/gym/dsrl_{hopper,walker,halfcheetah}.yaml, section train, unless said)
    # polyak rate of the target Q networks (DSRL: tau 0.005)
    tau: float = 0.005
    # transitions per gradient step (DSRL: batch_size 256)
    replay_batch_size: int = 256
    # chunk steps of the N envs between updates (DSRL: train_freq 2)
    train_freq: int = 2
    # gradient steps per update (DSRL: utd 20)
    gradient_steps: int = 20
    # first chunk steps of the N envs acting with the base policy's noise clip(N(0, I), -b, b), no
    # learning (DSRL: init_rollout_steps 2001)
    warmup_steps: int = 2001
    # replay capacity in transitions (SB3's default 1e6; DSRL sets 2e7)
    buffer_size: int = 1_000_000
    # H_target of the entropy tuning (DSRL: target_ent 0.0); null: SB3's "auto", -D_a
    target_entropy: float | None = 0.0
    # alpha at the start (SB3's ent_coef "auto": 1.0)
    init_alpha: float = 1.0
    # hidden widths of each Q network (DSRL hopper: layer_size 128 x num_layers 3)
    critic_hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    # LayerNorm after each hidden linear layer of the Q networks (DSRL: use_layer_norm)
    critic_layer_norm: bool = True
    # Q networks; the target is their minimum (DSRL: n_critics 2, critic_backup_combine_type min)
    n_critics: int = 2
    # a time limit bootstraps (its state is not terminal); false: DSRL's, whose chunk wrapper reports it as done
    bootstrap_truncated: bool = True


class ReplayBuffer:
    """A circular buffer of transitions (SB3's ``ReplayBuffer``), grown as it fills.

    Fields, per transition: ``obs`` (To, Do) and ``next_obs`` in the env's units, ``action`` (D_a,)
    in [-1, 1], ``reward``, ``terminated``, ``truncated``.
    """

    FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.data: dict[str, Tensor] = {}
        self.pos, self.size = 0, 0

    def add(self, **rows: Tensor) -> None:
        """Append N transitions (each field's leading dim N), overwriting the oldest when full."""
        n = len(rows["reward"])
        if not self.data:
            self.data = {
                k: torch.zeros(0, *v.shape[1:], dtype=v.dtype, device=v.device) for k, v in rows.items()
            }
        held = len(self.data["reward"])
        if held < min(self.size + n, self.capacity):  # grow geometrically up to the capacity
            grow = min(self.capacity, max(self.size + n, 2 * held)) - held
            self.data = {k: torch.cat([v, v.new_zeros(grow, *v.shape[1:])]) for k, v in self.data.items()}
        at = (self.pos + torch.arange(n)) % self.capacity
        for k, v in rows.items():
            self.data[k][at.to(v.device)] = v
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, m: int, generator: torch.Generator) -> dict[str, Tensor]:
        """M transitions drawn uniformly, with replacement."""
        i = torch.randint(0, self.size, (m,), generator=generator)
        return {k: v[i.to(v.device)] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Tensor]:
        out = {k: v[: self.size] for k, v in self.data.items()}
        out["pos"] = torch.tensor(float(self.pos))
        return out

    def load_state_dict(self, state: dict[str, Tensor], device) -> None:
        # a checkpoint holds every tensor as float32: the flags come back as bools
        self.data = {
            k: state[k].to(device, torch.bool if k in ("terminated", "truncated") else torch.float32)
            for k in self.FIELDS
        }
        self.size, self.pos = len(self.data["reward"]), int(state["pos"])


def bootstrap_mask(terminated: Tensor, truncated: Tensor, bootstrap_truncated: bool = True) -> Tensor:
    """1 - d of y = r + gamma (1 - d) V(s'): 0 where the episode ended at a terminal state (and, with
    ``bootstrap_truncated=False``, at a time limit too), else 1."""
    done = terminated if bootstrap_truncated else terminated | truncated
    return 1.0 - done.float()


def squashed_sample(head, s: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """a = tanh(mu(s) + sigma(s) eps) (B, D_a) and log pi(a | s) (B,) with the tanh log-det (step 1)."""
    mu, std = head(s)
    mu, std = mu.flatten(1), std.flatten(1)
    u = mu + std * eps
    a = torch.tanh(u)
    log_normal = -((u - mu) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return a, log_normal.sum(1) - torch.log(1 - a**2 + TANH_EPS).sum(1)


class SAC(Objective):
    """DSRL-SAC (see the module docstring); trains between env steps (:meth:`observe`)."""

    Options = SACOptions
    needs_log_probs = False

    def __init__(self, cfg, adapter, sampler, value=None, demonstrations=None, reward=None):
        super().__init__(cfg, adapter, sampler, value, demonstrations, reward)
        o, opt, device = self.options, cfg.optim, adapter.device
        self.bound = adapter.noise_bound
        s_dim, a_dim = adapter.obs_horizon * adapter.obs_dim, math.prod(adapter.action_shape)
        torch.manual_seed(cfg.train.seed)
        self.critic = TwinQ(s_dim, a_dim, o.critic_hidden_dims, o.n_critics, o.critic_layer_norm).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(o.init_alpha), device=device, requires_grad=True)
        self.target_entropy = -float(a_dim) if o.target_entropy is None else o.target_entropy
        adam = {"lr": opt.learning_rate, "betas": (opt.beta1, opt.beta2), "eps": opt.eps}
        self.critic_optimizer = torch.optim.AdamW(
            self.critic.parameters(), weight_decay=opt.weight_decay, **adam
        )
        self.alpha_optimizer = torch.optim.AdamW([self.log_alpha], weight_decay=0.0, **adam)
        self.buffer = ReplayBuffer(o.buffer_size)
        self.chunk_steps = 0  # chunk steps of the N envs so far
        self.epoch, self.generator = None, None
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    @classmethod
    def validate(cls, cfg) -> None:
        o = cfg.algorithm.options
        for key in ("replay_batch_size", "train_freq", "buffer_size", "n_critics"):
            if getattr(o, key) < 1:
                raise ConfigError(f"algorithm.{key} must be >= 1, got {getattr(o, key)}")
        for key in ("gradient_steps", "warmup_steps"):
            if getattr(o, key) < 0:
                raise ConfigError(f"algorithm.{key} must be >= 0, got {getattr(o, key)}")
        if not 0 < o.tau <= 1:
            raise ConfigError(f"algorithm.tau must be in (0, 1], got {o.tau}; DSRL's is 0.005")
        if not o.init_alpha > 0:
            raise ConfigError(f"algorithm.init_alpha must be > 0, got {o.init_alpha}; SB3 starts at 1.0")
        if not o.critic_hidden_dims or min(o.critic_hidden_dims) < 1:
            raise ConfigError(
                f"algorithm.critic_hidden_dims must be positive widths, got {o.critic_hidden_dims}"
            )
        if cfg.train.mixed_precision != "no":
            raise ConfigError(
                f"train.mixed_precision={cfg.train.mixed_precision}: {cfg.algorithm.name} trains its small networks "
                "in float32; set train.mixed_precision=no"
            )

    # ------------------------------------------------------------------ collection
    def sampling(self, epoch: int, global_step: int):
        """The epoch's collection: the base policy's own noise while warming up (:meth:`observe` ends it)."""

        @contextlib.contextmanager
        def warmup():
            self.adapter.warmup = self.chunk_steps < self.options.warmup_steps
            try:
                yield
            finally:
                self.adapter.warmup = False

        return warmup()

    @torch.no_grad()
    def observe(self, run, epoch: int, chain: Chain, obs, reward, terminated, truncated, next_obs) -> None:
        """One chunk step of the N envs: store its transitions, then train when it is time (module docstring)."""
        o = self.options
        if epoch != self.epoch:
            self.begin_epoch(run, epoch)
        if not np.isfinite(reward).all():
            raise NonFiniteError(
                f"non-finite chunk rewards at epoch {epoch}, chunk step {self.chunk_steps} (envs "
                f"{np.flatnonzero(~np.isfinite(reward)).tolist()[:4]}); check the environment's reward"
            )
        u = chain.latents[:, 1].flatten(1).float()  # the Gaussian step's draw, before squashing
        action = u.clamp(-self.bound, self.bound) / self.bound if self.adapter.warmup else torch.tanh(u)
        device = self.adapter.device
        self.buffer.add(
            obs=torch.as_tensor(obs, dtype=torch.float32, device=device),
            action=action,
            reward=torch.as_tensor(reward, dtype=torch.float32, device=device),
            next_obs=torch.as_tensor(next_obs, dtype=torch.float32, device=device),
            terminated=torch.as_tensor(terminated, device=device),
            truncated=torch.as_tensor(truncated, device=device),
        )
        self.chunk_steps += 1
        self.adapter.warmup = self.chunk_steps < o.warmup_steps
        after = self.chunk_steps - o.warmup_steps
        if after > 0 and after % o.train_freq == 0:
            with torch.enable_grad():
                self.train_steps(run, o.gradient_steps)

    def begin_epoch(self, run, epoch: int) -> None:
        if run.world > 1:
            raise ConfigError(
                f"algorithm.name={self.algo.name} runs in one process (its replay buffer and updates are not "
                "distributed); launch it without torchrun / accelerate"
            )
        self.epoch, self.generator = epoch, run.seeds.generator(epoch, OBJECTIVE)
        self.sums, self.count = {}, 0
        o = self.cfg.optim
        factor = lr_factor(epoch, run.schedule_steps, o.lr_warmup, o.lr_schedule, o.lr_final_ratio)
        set_lr(run.optimizer, run.base_lrs, factor)
        for optimizer in (self.critic_optimizer, self.alpha_optimizer):
            set_lr(optimizer, [o.learning_rate], factor)

    # ------------------------------------------------------------------ learning
    def train_steps(self, run, n: int) -> None:
        """``n`` gradient steps (module docstring, 1-6) on batches from the buffer; one host sync."""
        bad = torch.zeros((), dtype=torch.bool, device=self.adapter.device)
        for _ in range(n):
            terms = self.gradient_step(run.optimizer, self.batch())
            bad |= ~torch.isfinite(torch.stack(list(terms.values()))).all()
            for k, v in terms.items():
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.count += 1
            run.global_step += 1
            if run.ema is not None:
                run.ema.update(self.adapter.trainable_state_dict())
        if bool(bad):
            raise NonFiniteError(
                f"a non-finite SAC loss at epoch {self.epoch}, chunk step {self.chunk_steps}: the run stopped before "
                "saving; lower optim.learning_rate, and resume from the last checkpoint"
            )

    def batch(self) -> dict[str, Tensor]:
        """M transitions with their states normalized and flattened, and the actor's two noises."""
        b = self.buffer.sample(self.options.replay_batch_size, self.generator)
        norm, M = self.adapter.normalizer, len(b["reward"])
        b["obs"] = norm.normalize_obs(b["obs"]).flatten(1)
        b["next_obs"] = norm.normalize_obs(b["next_obs"]).flatten(1)
        D_a, device = b["action"].shape[1], b["action"].device
        b["eps"] = randn((M, D_a), self.generator, device)
        b["eps_next"] = randn((M, D_a), self.generator, device)
        return b

    def gradient_step(self, actor_optimizer, b: dict[str, Tensor]) -> dict[str, Tensor]:
        """One SAC update on batch ``b`` (module docstring, 1-6); returns the detached terms."""
        o, head = self.options, self.adapter.net
        # 1. the actor's action and log-density at s (reparameterized)
        a_pi, log_pi = squashed_sample(head, b["obs"], b["eps"])
        # 2. the entropy temperature, stepped with the log-density of 1
        alpha = self.log_alpha.detach().exp()
        loss_alpha = -(self.log_alpha * (log_pi + self.target_entropy).detach()).mean()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        loss_alpha.backward()
        self.alpha_optimizer.step()
        # 3. the soft Bellman target from the target networks at s'
        y = self.soft_target(b, alpha)
        # 4. the critics' regression onto y
        q = self.critic(b["obs"], b["action"])  # (n, M)
        loss_critic = 0.5 * ((q - y) ** 2).mean(1).sum()
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss_critic.backward()
        self.critic_optimizer.step()
        # 5. the actor against the stepped critics (their gradients from this loss are cleared in 4)
        loss_actor = (alpha * log_pi - self.critic(b["obs"], a_pi).min(0).values).mean()
        actor_optimizer.zero_grad(set_to_none=True)
        loss_actor.backward()
        actor_optimizer.step()
        # 6. polyak averaging of the targets
        with torch.no_grad():
            for p, p_target in zip(self.critic.parameters(), self.critic_target.parameters()):
                p_target.mul_(1 - o.tau).add_(p, alpha=o.tau)
        return {
            "loss_critic": loss_critic.detach(),
            "loss_actor": loss_actor.detach(),
            "loss_alpha": loss_alpha.detach(),
            "alpha": alpha,
            "q_mean": q.detach().mean(),
            "entropy": -log_pi.detach().mean(),
        }

    @torch.no_grad()
    def soft_target(self, b: dict[str, Tensor], alpha: Tensor) -> Tensor:
        """(M,) y = r + gamma (1 - d) (min_i Qbar_i(s', a') - alpha log pi(a' | s')), a' ~ pi(. | s') (step 3)."""
        a_next, log_pi_next = squashed_sample(self.adapter.net, b["next_obs"], b["eps_next"])
        v_next = self.critic_target(b["next_obs"], a_next).min(0).values - alpha * log_pi_next
        keep = bootstrap_mask(b["terminated"], b["truncated"], self.options.bootstrap_truncated)
        return b["reward"] + self.algo.gamma * keep * v_next

    def update(self, run, chain: Chain, epoch: int) -> dict:
        """The epoch's diagnostics: the means over its gradient steps (they ran in :meth:`observe`)."""
        out = {k: (v / self.count).item() for k, v in self.sums.items()} if self.count else {}
        out.update(gradient_steps=self.count, replay_size=self.buffer.size, updates=self.count)
        out["lr"] = run.optimizer.param_groups[0]["lr"]
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        out = {f"critic.{k}": v for k, v in self.critic.state_dict().items()}
        out.update({f"critic_target.{k}": v for k, v in self.critic_target.state_dict().items()})
        out.update({f"replay.{k}": v for k, v in self.buffer.state_dict().items()})
        for name, optimizer in (
            ("critic_optim", self.critic_optimizer),
            ("alpha_optim", self.alpha_optimizer),
        ):
            for i, moments in optimizer.state_dict()["state"].items():
                out.update({f"{name}.{i}.{k}": v for k, v in moments.items()})
        out["log_alpha"] = self.log_alpha.detach()
        out["chunk_steps"] = torch.tensor(float(self.chunk_steps))
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        self.critic.load_state_dict(part("critic."))
        self.critic_target.load_state_dict(part("critic_target."))
        self.buffer.load_state_dict(part("replay."), self.adapter.device)
        for name, optimizer in (
            ("critic_optim", self.critic_optimizer),
            ("alpha_optim", self.alpha_optimizer),
        ):
            saved = optimizer.state_dict()
            moments: dict[int, dict[str, Tensor]] = {}
            for k, v in part(f"{name}.").items():
                i, _, key = k.partition(".")
                # Adam keeps its step counts on the CPU
                moments.setdefault(int(i), {})[key] = v.cpu() if key == "step" else v
            saved["state"] = moments
            optimizer.load_state_dict(saved)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.chunk_steps = int(state["chunk_steps"])


__all__ = ["SAC", "ReplayBuffer", "SACOptions", "bootstrap_mask", "squashed_sample"]
